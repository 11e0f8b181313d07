"""The integer twin of LVPNet's decoder side (z -> distribution parameters), bit-exact anywhere."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lvpnet.entropy.tables import LEVELS_PER_OCTAVE, MAX_SCALE_INDEX, MEAN_FRACTION_BITS, SCALE_OCTAVE_OFFSET
from lvpnet.model.intnet import IntConv
from lvpnet.model.lvpnet import LATENT_STRIDE, Z_LIMIT

#: fixed-point fraction bits of hidden activations, the mean and the log-scale outputs
HIDDEN_BITS = 16
MEAN_BITS = 24
LOG_SCALE_BITS = 8


class ExactLVPNet:
    """Runs the decoder side with :class:`IntConv` layers; identical results on any machine."""

    def __init__(self, layers: dict[str, IntConv], qcm_blocks: int, use_qcm: bool) -> None:
        self.layers = layers
        self.qcm_blocks = qcm_blocks
        self.use_qcm = use_qcm

    def _run(self, name: str, x: torch.Tensor, compute: str) -> torch.Tensor:
        return self.layers[name](x, compute)

    def predict(
        self,
        z: np.ndarray,
        bits: np.ndarray,
        *,
        compute: str = "float64",
        device: str = "cpu",
        channels_last: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """z: int (B, M, h, w); bits: (B,) normalisation bit depths.

        Returns (mu16, scale_index), each int64 (B, 8h, 8w).
        """
        x = torch.from_numpy(np.clip(z, -Z_LIMIT, Z_LIMIT).astype(np.float64)).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            y_hat = self._run("dequantise", x, compute)
            if self.use_qcm:
                f0 = self._run("qcm.conv_in", x, compute)
                f = f0
                for i in range(self.qcm_blocks):
                    h = self._run(f"qcm.blocks.{i}.conv1", f, compute)
                    f = _clamp_like(f + self._run(f"qcm.blocks.{i}.conv2", h, compute), self.layers["qcm.conv_in"])
                comp = self._run("qcm.conv_out", _clamp_like(f + f0, self.layers["qcm.conv_in"]), compute)
                latent = _clamp_like(y_hat + comp, self.layers["qcm.conv_in"])
            else:
                latent = y_hat
            h = self._run("recon.conv1", latent, compute)
            h = F.pixel_shuffle(self._run("recon.conv2", h, compute), LATENT_STRIDE)
            h = self._run("recon.head1", h.clamp(min=0), compute)
            out = self._run("recon.head2", h, compute)
        out_np = out.cpu().numpy().astype(np.int64)
        return to_coding_params(out_np[:, 0], out_np[:, 1], bits)


def _clamp_like(x: torch.Tensor, layer: IntConv) -> torch.Tensor:
    return x.clamp(layer.lo, layer.hi)


def to_coding_params(
    mean_fixed: np.ndarray, log_scale_fixed: np.ndarray, bits: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point network outputs -> (mu16, J) in sample units of each tile's bit depth."""
    bits = np.asarray(bits, dtype=np.int64).reshape(-1, *([1] * (mean_fixed.ndim - 1)))
    # mean_norm * 2**bits * 16 = mean_fixed * 2**(bits + 4 - MEAN_BITS): a shift either way.
    shift = bits + MEAN_FRACTION_BITS - MEAN_BITS
    mu16 = np.where(shift >= 0, mean_fixed << np.maximum(shift, 0), mean_fixed >> np.maximum(-shift, 0))
    mu16 = np.clip(mu16, 0, (np.int64(1) << (bits + MEAN_FRACTION_BITS)) - 1)
    # J = round(8*log2(s_norm) + 8*bits + 8*3), with the network giving 8*log2(s_norm) in 1/256.
    offset = (LEVELS_PER_OCTAVE * (bits + SCALE_OCTAVE_OFFSET)) << LOG_SCALE_BITS
    half = 1 << (LOG_SCALE_BITS - 1)
    scale_index = (log_scale_fixed + offset + half) >> LOG_SCALE_BITS
    return mu16, np.clip(scale_index, 0, MAX_SCALE_INDEX)
