"""Float LVPNet -> integer decoder layers (the explicit export step, as CompressAI's update())."""

from __future__ import annotations

import torch

from lvpnet.model.exact import HIDDEN_BITS, LOG_SCALE_BITS, MEAN_BITS, ExactLVPNet
from lvpnet.model.intnet import IntConv, quantise_conv
from lvpnet.model.lvpnet import HEAD_LIMIT, HIDDEN_LIMIT, Z_LIMIT, LVPNet

#: weight fraction bits: the first layers see raw z scaled by Q_step (small), so more bits there
Z_WEIGHT_BITS = 24
WEIGHT_BITS = 16


def export_exact(model: LVPNet) -> ExactLVPNet:
    """Quantise the decoder side of a trained float model to exact integer layers."""
    cfg = model.config
    hidden_bound = int(HIDDEN_LIMIT * 2**HIDDEN_BITS)
    head_bound = int(HEAD_LIMIT * 2**HIDDEN_BITS)
    layers: dict[str, IntConv] = {}

    def conv(name: str, module: torch.nn.Conv2d, **kwargs: object) -> None:
        layers[name] = quantise_conv(module.weight, module.bias, **kwargs)  # type: ignore[arg-type]

    m = cfg.latent_channels
    identity = torch.eye(m).view(m, m, 1, 1)
    layers["dequantise"] = quantise_conv(
        identity,
        None,
        in_fraction_bits=0,
        out_fraction_bits=HIDDEN_BITS,
        weight_bits=Z_WEIGHT_BITS,
        in_bound=Z_LIMIT,
        out_limit=HIDDEN_LIMIT,
        relu=False,
        input_scale=cfg.q_step,
    )
    hidden = dict(
        in_fraction_bits=HIDDEN_BITS,
        out_fraction_bits=HIDDEN_BITS,
        weight_bits=WEIGHT_BITS,
        in_bound=hidden_bound,
        out_limit=HIDDEN_LIMIT,
    )
    if model.qcm is not None:
        conv(
            "qcm.conv_in",
            model.qcm.conv_in,
            in_fraction_bits=0,
            out_fraction_bits=HIDDEN_BITS,
            weight_bits=Z_WEIGHT_BITS,
            in_bound=Z_LIMIT,
            out_limit=HIDDEN_LIMIT,
            relu=False,
            input_scale=cfg.q_step,
        )
        for i, block in enumerate(model.qcm.blocks):
            conv(f"qcm.blocks.{i}.conv1", block.conv1, relu=True, **hidden)
            conv(f"qcm.blocks.{i}.conv2", block.conv2, relu=False, **hidden)
        conv("qcm.conv_out", model.qcm.conv_out, relu=True, **hidden)
    recon = model.reconstruction
    conv("recon.conv1", recon.conv1, relu=True, **hidden)
    conv("recon.conv2", recon.conv2, relu=False, **{**hidden, "out_limit": HEAD_LIMIT})
    head = dict(in_fraction_bits=HIDDEN_BITS, weight_bits=WEIGHT_BITS, in_bound=head_bound, out_limit=HEAD_LIMIT)
    conv("recon.head1", recon.head1, relu=True, out_fraction_bits=HIDDEN_BITS, **head)
    conv("recon.head2", recon.head2, relu=False, out_fraction_bits=[MEAN_BITS, LOG_SCALE_BITS], **head)
    return ExactLVPNet(layers, cfg.qcm_blocks if cfg.use_qcm else 0, cfg.use_qcm)
