"""LVPNet with context: latent-conditioned hierarchical polyphase coding (our default model family).

A tile is coded coarse to fine.  At level s (a power of two) the samples on the s-grid are known;
three steps add the s/2-grid: D (cell centres, from the four corners), H (between horizontal
neighbours, from the known grid and D) and V (between vertical neighbours, from everything).  Each
step decodes a whole sub-image at once, so decoding is a few dozen vectorised passes per tile.

For every target sample the context is a fixed set of already-decoded neighbours.  From them, in
exact integer arithmetic: an edge-directed predictor P (1/16 units), a local activity a, and
scale-free features (neighbour - P) / (a + 1).  A small per-step network (shared across levels,
told the level) turns the features, the level and the latent's features into a mean correction
(in units of a + 1) and a log-scale offset, so one network serves 8-bit ultrasound and 16-bit CT.
The latent z (GMSM at stride 16, rate counted) gives the global side information.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lvpnet.entropy.tables import LEVELS_PER_OCTAVE, MAX_SCALE_INDEX, MEAN_FRACTION_BITS, SCALE_OCTAVE_OFFSET

STEP_TYPES = ("D", "H", "V")
#: levels beyond this share the last level embedding
LEVEL_SLOTS = 5
FEATURE_LIMIT = 255  # features are clamped to +-255 (1/16 of the activity unit)
LOG_ACTIVITY_LIMIT = 8 * 17


# Neighbour offsets (dy, dx) in units of u = s/2, per step, with the phase they come from.
# The first four of each list are the close neighbours the predictor and activity use.
NEIGHBOURS: dict[str, list[tuple[int, int]]] = {
    "D": [(-1, -1), (-1, 1), (1, -1), (1, 1),
          (-1, -3), (-1, 3), (1, -3), (1, 3), (-3, -1), (-3, 1), (3, -1), (3, 1)],
    "H": [(0, -1), (0, 1), (-1, 0), (1, 0),
          (0, -3), (0, 3), (-1, -2), (-1, 2), (1, -2), (1, 2), (-2, -1), (-2, 1), (2, -1), (2, 1)],
    "V": [(-1, 0), (1, 0), (0, -1), (0, 1),
          (-3, 0), (3, 0), (-1, -1), (-1, 1), (1, -1), (1, 1), (-2, -1), (-2, 1), (2, -1), (2, 1)],
}  # fmt: skip
#: where a step's targets sit inside an s x s cell, in units of u
TARGET_OFFSET = {"D": (1, 1), "H": (0, 1), "V": (1, 0)}
MAX_NEIGHBOURS = max(len(v) for v in NEIGHBOURS.values())


@dataclass(frozen=True)
class ContextConfig:
    name: str = "lvpnet-ctx"
    hidden: int = 32
    latent_channels: int = 8  # 0: no latent (context only)
    latent_stride: int = 16
    latent_features: int = 4
    q_step: float = 0.01  # float value of one z step (the paper's default; the loss fixes y's scale)
    kind: str = "context"

    @property
    def inputs(self) -> int:
        # neighbour features + log activity + (log activity - bit depth) + level one-hot + latent
        return MAX_NEIGHBOURS + 2 + LEVEL_SLOTS + self.latent_features * (self.latent_channels > 0)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# ---------------------------------------------------------------------------- exact integer context


def _log_table() -> np.ndarray:
    # LUT[t] = floor(8*log2(1 + t/256)) by integer comparison only (no libm): 2**k <= ((256+t)/256)**8.
    table = np.zeros(256, dtype=np.int64)
    for t in range(256):
        k = 0
        while (1 << (k + 1)) * 256**8 <= (256 + t) ** 8:
            k += 1
        table[t] = k
    return table


LOG_LUT = torch.from_numpy(_log_table())
EXACT_INT_FLOAT64 = 2**53


def log8(a: torch.Tensor) -> torch.Tensor:
    """floor-ish 8*log2(a) for integer a >= 1, exactly reproducible (integer ops and a table)."""
    a = a.clamp(min=1)
    if a.numel() and int(a.max()) < EXACT_INT_FLOAT64:
        # frexp only reads the exponent field of an exactly represented integer: no rounding, no
        # libm, the same bits on every platform; a = m * 2**e with m in [0.5, 1), so floor(log2 a) = e - 1.
        exponent = torch.frexp(a.to(torch.float64)).exponent.to(torch.int64) - 1
    else:  # beyond float64's integers (no decoder input gets there): binary search on shifts
        exponent = torch.zeros_like(a)
        v = a.clone()
        for step in (32, 16, 8, 4, 2, 1):
            big = v >= (1 << step)
            exponent += big * step
            v = torch.where(big, v >> step, v)
    # 8 mantissa bits below the leading one
    mantissa = torch.where(exponent >= 8, a >> (exponent - 8).clamp(min=0), a << (8 - exponent).clamp(min=0)) & 255
    return 8 * exponent + LOG_LUT.to(a.device)[mantissa]


def level_schedule(h: int, w: int) -> list[int]:
    """Strides s (coarse to fine) of the levels that refine a tile of h x w down to every sample."""
    top = 1
    while top < max(h, w):
        top *= 2
    levels = []
    s = top
    while s >= 2:
        levels.append(s)
        s //= 2
    return levels


def step_targets(h: int, w: int, s: int, step: str) -> tuple[slice, slice]:
    oy, ox = TARGET_OFFSET[step]
    u = s // 2
    return slice(oy * u, h, s), slice(ox * u, w, s)


def gather_context(
    known: torch.Tensor, h: int, w: int, s: int, step: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbours of a step's targets from the decoded samples so far.

    known: int64 (B, h, w), valid on the samples decoded before this step.  Returns
    (neighbours (B, K, nr, nc), P16 (B, nr, nc), activity (B, nr, nc)), all int64.
    Neighbours outside the tile are replaced by the nearest decoded sample of the same phase.
    """
    index = _neighbour_index(h, w, s, step, known.device)
    batch = known.shape[0]
    k, nr, nc = index.shape
    neighbours = torch.index_select(known.reshape(batch, h * w), 1, index.reshape(-1)).reshape(batch, k, nr, nc)
    a, b, c, d = (neighbours[:, i] for i in range(4))
    # Edge-directed: weight each opposite pair by the other pair's difference (smoother pair wins).
    # In-place on temporaries (never on `neighbours`): integer ops, so identical to the plain form
    # p16 = ((d2 + 1) * (a + b) + (d1 + 1) * (c + d)) * 8 // (d1 + d2 + 2), with fewer allocations.
    d1, d2 = (a - b).abs_(), (c - d).abs_()
    weighted = (d1 + 1).mul_(c + d)
    p16 = (d2 + 1).mul_(a + b).add_(weighted).mul_(8).div_(d1.add_(d2).add_(2), rounding_mode="floor")
    close = (neighbours[:, :4] * 16).sub_(p16[:, None]).abs_().sum(dim=1)
    activity = close.add_(32).div_(64, rounding_mode="floor")
    return neighbours, p16, activity


@functools.lru_cache(maxsize=512)
def _neighbour_index(h: int, w: int, s: int, step: str, device: torch.device) -> torch.Tensor:
    """Flat indices (K, nr, nc) of every target's neighbours: one gather per step."""
    u = s // 2
    oy, ox = TARGET_OFFSET[step]
    rows = torch.arange(oy * u, h, s)
    cols = torch.arange(ox * u, w, s)
    planes = []
    for dy, dx in NEIGHBOURS[step]:
        y = _clamp_phase(rows + dy * u, h, u)
        x = _clamp_phase(cols + dx * u, w, u)
        planes.append(y[:, None] * w + x[None, :])
    return torch.stack(planes).to(device)


def _clamp_phase(index: torch.Tensor, size: int, u: int) -> torch.Tensor:
    # Keep the phase (index mod 2u) while staying inside [0, size): step back by 2u until inside.
    phase_step = 2 * u
    too_big = index >= size
    index = torch.where(too_big, index - ((index - size) // phase_step + 1) * phase_step, index)
    too_small = index < 0
    return torch.where(too_small, index + ((-index - 1) // phase_step + 1) * phase_step, index).clamp(0, size - 1)


def context_features(
    neighbours: torch.Tensor,
    p16: torch.Tensor,
    activity: torch.Tensor,
    bits: torch.Tensor,
    level: int,
    log_unit: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer network inputs (B, inputs_without_latent [+ extra channels], nr, nc), each in [-255, 255].

    `log_unit`: log8(activity + 1) when the caller has it already; `extra`: channels appended
    (the latent cells), written into the same tensor instead of a second concatenation.
    """
    batch, k, nr, nc = neighbours.shape
    extra_channels = 0 if extra is None else extra.shape[1]
    out = neighbours.new_empty(batch, MAX_NEIGHBOURS + 2 + LEVEL_SLOTS + extra_channels, nr, nc)
    unit = activity + 1
    rel = out[:, :k]
    torch.mul(neighbours, 16, out=rel)
    rel.sub_(p16[:, None]).div_(unit[:, None], rounding_mode="floor").clamp_(-FEATURE_LIMIT, FEATURE_LIMIT)
    out[:, k:MAX_NEIGHBOURS] = 0
    la = log8(unit) if log_unit is None else log_unit
    out[:, MAX_NEIGHBOURS] = la.clamp(max=FEATURE_LIMIT)
    la_rel = out[:, MAX_NEIGHBOURS + 1]
    torch.sub(la, 8 * bits.view(-1, 1, 1), out=la_rel)
    la_rel.clamp_(-FEATURE_LIMIT, FEATURE_LIMIT)
    onehot = out[:, MAX_NEIGHBOURS + 2 : MAX_NEIGHBOURS + 2 + LEVEL_SLOTS]
    onehot.zero_()
    onehot[:, min(level, LEVEL_SLOTS - 1)] = 128
    if extra is not None:
        out[:, MAX_NEIGHBOURS + 2 + LEVEL_SLOTS :] = extra
    return out


def coding_params(
    p16: torch.Tensor,
    activity: torch.Tensor,
    mean_out: torch.Tensor,
    scale_out: torch.Tensor,
    bits: torch.Tensor,
    log_unit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact: mean_out in 1/256 of (a + 1), scale_out in 1/256 of an eighth octave -> (mu16, J)."""
    unit = activity + 1
    mu16 = p16 + torch.div(mean_out * unit * 16, 256, rounding_mode="floor")
    top = (1 << (bits.view(-1, 1, 1) + MEAN_FRACTION_BITS)) - 1
    mu16 = torch.minimum(mu16.clamp(min=0), top)
    base = (log8(unit) if log_unit is None else log_unit) + LEVELS_PER_OCTAVE * SCALE_OCTAVE_OFFSET
    scale_index = base + torch.div(scale_out + 128, 256, rounding_mode="floor")
    return mu16, scale_index.clamp(0, MAX_SCALE_INDEX)


# ----------------------------------------------------------------------------------- float network


# Fixed-point formats of the exact step networks (export_context quantises to these): inputs in
# 1/16, hidden activations and outputs in 1/256, weights in 1/4096.
FEATURE_BITS = 4
HIDDEN_BITS = 8
OUT_BITS = 8
WEIGHT_BITS = 12


def straight_through(x: torch.Tensor, quantised: torch.Tensor) -> torch.Tensor:
    """`quantised` in the forward pass, the gradient of `x` in the backward pass."""
    return x + (quantised - x).detach()


def _fixed_point_conv(conv: nn.Conv2d, x: torch.Tensor, in_bits: int, out_bits: int) -> torch.Tensor:
    """What the integer twin computes: weights rounded to 1/2**WEIGHT_BITS, the bias to the
    accumulator's unit, and the output floored to 1/2**out_bits (straight-through gradients)."""
    w_scale, b_scale = 2.0**WEIGHT_BITS, 2.0 ** (WEIGHT_BITS + in_bits)
    weight = straight_through(conv.weight, torch.round(conv.weight * w_scale) / w_scale)
    bias = straight_through(conv.bias, torch.round(conv.bias * b_scale) / b_scale)
    y = F.conv2d(x, weight, bias)
    return straight_through(y, torch.floor(y * 2.0**out_bits) / 2.0**out_bits)


class StepNet(nn.Module):
    """Per-sample MLP (1x1 convolutions): features -> (mean correction, log-scale offset).

    `quantisation_aware`: the forward pass rounds as the exact integer decoder does (training
    for the integer decode path; gradients pass straight through the rounding)."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(inputs, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, hidden, 1)
        self.fc3 = nn.Conv2d(hidden, 2, 1)
        self.quantisation_aware = False
        with torch.no_grad():
            self.fc3.weight.mul_(0.1)
            self.fc3.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantisation_aware:
            h = F.relu(_fixed_point_conv(self.fc1, x, FEATURE_BITS, HIDDEN_BITS)).clamp(max=HIDDEN_LIMIT)
            h = F.relu(_fixed_point_conv(self.fc2, h, HIDDEN_BITS, HIDDEN_BITS)).clamp(max=HIDDEN_LIMIT)
            return _fixed_point_conv(self.fc3, h, HIDDEN_BITS, OUT_BITS).clamp(-OUT_LIMIT, OUT_LIMIT)
        h = F.relu(self.fc1(x)).clamp(max=HIDDEN_LIMIT)
        h = F.relu(self.fc2(h)).clamp(max=HIDDEN_LIMIT)
        return self.fc3(h).clamp(-OUT_LIMIT, OUT_LIMIT)


HIDDEN_LIMIT = 64.0
OUT_LIMIT = 64.0
FEATURE_SCALE = 1 / 16  # network sees features / 16 (integers are 1/16 activity units)


class LatentBranch(nn.Module):
    """GMSM-style sampler to z (encoder only) and z -> per-cell features (decoder side)."""

    def __init__(self, config: ContextConfig) -> None:
        super().__init__()
        from lvpnet.model.lvpnet import GMSM

        levels = int(np.log2(config.latent_stride))
        self.sampler = GMSM(config.latent_channels, levels=levels)
        self.conv1 = nn.Conv2d(config.latent_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, config.latent_features, 1)
        self.q_step = config.q_step

    def features(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(z * self.q_step)).clamp(max=HIDDEN_LIMIT)
        return self.conv2(h).clamp(-FEATURE_LIMIT / 16, FEATURE_LIMIT / 16)


class ContextLVPNet(nn.Module):
    def __init__(self, config: ContextConfig) -> None:
        super().__init__()
        self.config = config
        self.steps = nn.ModuleDict({t: StepNet(config.inputs, config.hidden) for t in STEP_TYPES})
        self.latent = LatentBranch(config) if config.latent_channels else None
        self.quantisation_aware = False

    def analyse(self, x_norm: torch.Tensor) -> torch.Tensor:
        assert self.latent is not None
        with torch.no_grad():
            return torch.floor(self.latent.sampler(x_norm) / self.config.q_step).clamp(-(2**20), 2**20).long()

    def latent_with_ste(self, x_norm: torch.Tensor) -> torch.Tensor:
        assert self.latent is not None
        scaled = self.latent.sampler(x_norm) / self.config.q_step
        return (scaled + (torch.floor(scaled) - scaled).detach()).clamp(-(2**20), 2**20)

    def set_quantisation_aware(self, enabled: bool = True) -> None:
        """Train against the integer decode path: fixed-point step networks here, and in the loss
        the mean rounded to 1/16 and the log-scale to 1/8 octave as the coder's tables take them."""
        if enabled and self.latent is not None:
            # the exact decoder also rounds the latent branch's features; the float branch does not
            raise ValueError("quantisation-aware training is built for the context model without a latent")
        self.quantisation_aware = enabled
        for net in self.steps.values():
            net.quantisation_aware = enabled  # type: ignore[assignment]

    def step_params(
        self,
        step: str,
        features: torch.Tensor,
        latent_features: torch.Tensor | None,
    ) -> torch.Tensor:
        x = features.to(torch.float32) * FEATURE_SCALE
        if latent_features is not None:
            x = torch.cat([x, latent_features], dim=1)
        return self.steps[step](x)


def latent_cells(latent_map: torch.Tensor, h: int, w: int, s: int, step: str, stride: int) -> torch.Tensor:
    """Pick each target's latent cell from a (B, C, ceil(h/stride), ceil(w/stride)) map."""
    rows, cols = step_targets(h, w, s, step)
    r = torch.arange(rows.start, h, rows.step, device=latent_map.device) // stride
    c = torch.arange(cols.start, w, cols.step, device=latent_map.device) // stride
    return latent_map[:, :, r][:, :, :, c]
