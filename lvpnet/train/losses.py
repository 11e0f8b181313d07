"""Per-batch code lengths (differentiable) for each model family: bits(x | z, context) and bits(z)."""

from __future__ import annotations

import torch

from lvpnet.entropy.tables import LEVELS_PER_OCTAVE, MAX_SCALE_INDEX, MEAN_FRACTION_BITS, SCALE_OCTAVE_OFFSET
from lvpnet.model.context import (
    ContextLVPNet,
    context_features,
    gather_context,
    latent_cells,
    level_schedule,
    log8,
    step_targets,
    straight_through,
)
from lvpnet.model.context_coding import level_index
from lvpnet.model.lvpnet import LVPNet, laplace_bits


def latent_rate_proxy(z: torch.Tensor) -> torch.Tensor:
    """Bits of z under a per-channel discretised Laplace fitted to the batch (differentiable)."""
    flat = z.transpose(0, 1).reshape(z.shape[1], -1)
    centre = flat.detach().median(dim=1, keepdim=True).values
    scale = (flat - centre).abs().mean(dim=1, keepdim=True).detach().clamp_min(0.2)
    upper = _cdf((flat + 0.5 - centre) / scale)
    lower = _cdf((flat - 0.5 - centre) / scale)
    return -torch.log2((upper - lower).clamp_min(2**-20)).sum()


def _cdf(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t < 0, 0.5 * torch.exp(t.clamp(max=0)), 1 - 0.5 * torch.exp(-t.clamp(min=0)))


def faithful_bits(
    model: LVPNet, x_norm: torch.Tensor, x_int: torch.Tensor, mask: torch.Tensor, bits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total pixel bits, total z bits) of a batch under the paper's model."""
    z, _y, params = model(x_norm)
    return (laplace_bits(x_int, params, bits) * mask).sum(), latent_rate_proxy(z)


def context_bits(
    model: ContextLVPNet, x_norm: torch.Tensor, x_int: torch.Tensor, mask: torch.Tensor, bits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total pixel bits, total z bits) under the hierarchical context model, steps as in coding."""
    x = x_int[:, 0]
    valid = mask[:, 0]
    _, h, w = x.shape
    latent_map = None
    z_bits = torch.zeros((), device=x.device)
    if model.latent is not None:
        # Training crops are multiples of the latent stride (the codec edge-pads tiles instead).
        z = model.latent_with_ste(x_norm)
        z_bits = latent_rate_proxy(z)
        latent_map = model.latent.features(z)
    known = torch.zeros_like(x)
    known[:, 0, 0] = x[:, 0, 0]
    total = torch.zeros((), device=x.device)
    for s in level_schedule(h, w):
        for step in ("D", "H", "V"):
            rows, cols = step_targets(h, w, s, step)
            if rows.start >= h or cols.start >= w:
                continue
            neighbours, p16, activity = gather_context(known, h, w, s, step)
            features = context_features(neighbours, p16, activity, bits, level_index(s))
            latent = None
            if latent_map is not None:
                latent = latent_cells(latent_map, h, w, s, step, model.config.latent_stride)
            out = model.step_params(step, features, latent)
            unit = (activity + 1).to(out.dtype)
            mean = p16.to(out.dtype) / 16 + out[:, 0] * unit
            log8_unit = log8(activity + 1).to(out.dtype)
            offset = out[:, 1]
            if model.quantisation_aware:
                # as coding_params: mu16 = p16 + floor(16 unit out0) clamped to the valid range,
                # scale index = log8(unit) + round-half-up(out1), in 1/8 octave
                top = ((1 << (bits.view(-1, 1, 1) + MEAN_FRACTION_BITS)) - 1).to(out.dtype)
                mu16 = torch.minimum((p16.to(out.dtype) + torch.floor(out[:, 0] * unit * 16)).clamp_min(0), top)
                mean = straight_through(mean, mu16 / 16)
                base = log8_unit + LEVELS_PER_OCTAVE * SCALE_OCTAVE_OFFSET
                index = (base + torch.floor(offset + 0.5)).clamp(0, MAX_SCALE_INDEX)
                offset = straight_through(offset, index - base)
            log2_scale = (log8_unit + offset) / 8
            scale = torch.exp2(log2_scale).clamp_min(0.05)
            target = x[:, rows, cols].to(out.dtype)
            upper = _cdf((target + 0.5 - mean) / scale)
            lower = _cdf((target - 0.5 - mean) / scale)
            step_bits = -torch.log2((upper - lower).clamp_min(2**-20))
            total = total + (step_bits * valid[:, rows, cols]).sum()
            known[:, rows, cols] = x[:, rows, cols]
    return total, z_bits
