"""LVPNet as the paper describes it: GMSM -> y -> z = floor(y / Q_step) -> QCM -> upsampling ->
per-pixel discretised Laplace parameters.  This is the float (training) network; the decoder
runs its integer twin (:mod:`lvpnet.model.exact`), built from it by :func:`lvpnet.model.export`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

LATENT_STRIDE = 8
#: real-valued activation clamps; the integer twin clamps at the same values
HIDDEN_LIMIT = 1024.0
HEAD_LIMIT = 64.0
Z_LIMIT = 2**20


@dataclass(frozen=True)
class LVPNetConfig:
    """Hyper-parameters; `name` is the configuration's id in model cards and the zoo."""

    name: str = "lvpnet-dataset"
    sampling_ratio: float = 0.15
    q_step: float = 0.01
    qcm_blocks: int = 24
    qcm_channels: int = 16
    use_qcm: bool = True
    sampler: str = "gmsm"  # "gmsm" or "cnn" (the paper's ablation)
    recon_channels: int = 64
    pixel_features: int = 4
    head_channels: int = 16

    @property
    def latent_channels(self) -> int:
        # r = (latent elements) / (pixels) with the latent at stride 8.
        return max(1, round(self.sampling_ratio * LATENT_STRIDE**2))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


CONFIGS = {
    "lvpnet-dataset": LVPNetConfig(),
    "lvpnet-single": LVPNetConfig(name="lvpnet-single", qcm_blocks=3),
    "lvpnet-cnn": LVPNetConfig(name="lvpnet-cnn", sampler="cnn"),
    "lvpnet-noqcm": LVPNetConfig(name="lvpnet-noqcm", use_qcm=False),
}


class GMSM(nn.Module):
    """Global Multi-scale Sensing Module.

    Stage 1 repeats f_{t+1} = Conv2x2/s2(f_t) + Pool(f_t), with Pool a volume-preserving
    space-to-depth, so C x H x W -> 4C x H/2 x W/2.  Stage 2 brings every level to the latent
    grid, concatenates them and samples with 1x1 convolutions to the ratio r.
    """

    def __init__(self, latent_channels: int, levels: int = 3) -> None:
        super().__init__()
        self.levels = levels
        self.down = nn.ModuleList(nn.Conv2d(4**t, 4 ** (t + 1), 2, stride=2) for t in range(levels))
        gathered = levels * 4**levels
        self.sample = nn.Sequential(
            nn.Conv2d(gathered, 64, 1), nn.ReLU(inplace=True), nn.Conv2d(64, latent_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, f = [], x
        for t, conv in enumerate(self.down):
            f = conv(f) + F.pixel_unshuffle(f, 2)
            features.append(F.pixel_unshuffle(f, 2 ** (self.levels - 1 - t)) if t < self.levels - 1 else f)
        return self.sample(torch.cat(features, dim=1))


class CNNSampler(nn.Module):
    """The ablation's plain CNN sampler: three strided 3x3 convolutions."""

    def __init__(self, latent_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, latent_channels, 3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = hidden_clamp(F.relu(self.conv1(x)))
        return hidden_clamp(x + hidden_clamp(self.conv2(h)))


class QCM(nn.Module):
    """Quantisation Compensation Module: N residual blocks, a global shortcut, and a final ReLU
    so the compensation is non-negative (floor quantisation only ever lowers y)."""

    def __init__(self, latent_channels: int, channels: int, blocks: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(channels) for _ in range(blocks))
        self.conv_out = nn.Conv2d(channels, latent_channels, 3, padding=1)

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        f0 = hidden_clamp(self.conv_in(y_hat))
        f = f0
        for block in self.blocks:
            f = block(f)
        compensation = hidden_clamp(F.relu(self.conv_out(hidden_clamp(f + f0))))
        return hidden_clamp(y_hat + compensation)


class Reconstruction(nn.Module):
    """Upsampling + probability prediction: latent -> per-pixel (mean, 8*log2 scale)."""

    def __init__(self, config: LVPNetConfig) -> None:
        super().__init__()
        m, p = config.latent_channels, config.pixel_features
        self.conv1 = nn.Conv2d(m, config.recon_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(config.recon_channels, p * LATENT_STRIDE**2, 1)
        self.head1 = nn.Conv2d(p, config.head_channels, 1)
        self.head2 = nn.Conv2d(config.head_channels, 2, 1)
        with torch.no_grad():
            # Untrained start: mean mid-range, scale 1/8 of the range (8*log2(1/8) = -24).
            self.head2.bias.copy_(torch.tensor([0.5, -24.0]))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = hidden_clamp(F.relu(self.conv1(latent)))
        h = F.pixel_shuffle(self.conv2(h), LATENT_STRIDE)
        h = head_clamp(F.relu(h))
        h = head_clamp(F.relu(self.head1(h)))
        return head_clamp(self.head2(h))


def hidden_clamp(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-HIDDEN_LIMIT, HIDDEN_LIMIT)


def head_clamp(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-HEAD_LIMIT, HEAD_LIMIT)


class LVPNet(nn.Module):
    """The float network.  `forward` returns (z, y, params) for training."""

    def __init__(self, config: LVPNetConfig) -> None:
        super().__init__()
        self.config = config
        m = config.latent_channels
        self.sampler: nn.Module = GMSM(m) if config.sampler == "gmsm" else CNNSampler(m)
        self.qcm = QCM(m, config.qcm_channels, config.qcm_blocks) if config.use_qcm else None
        self.reconstruction = Reconstruction(config)

    def analyse(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Encoder side: the quantised latent z (int64) of padded, normalised tiles."""
        with torch.no_grad():
            y = self.sampler(x_norm)
            return torch.floor(y / self.config.q_step).clamp(-Z_LIMIT, Z_LIMIT).to(torch.int64)

    def forward(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = self.sampler(x_norm)
        scaled = y / self.config.q_step
        # Straight-through: forward floor, backward identity on y / Q (gradient scaled 1/Q).
        z = scaled + (torch.floor(scaled) - scaled).detach()
        z = z.clamp(-Z_LIMIT, Z_LIMIT)
        return z, y, self.synthesise(z)

    def synthesise(self, z: torch.Tensor) -> torch.Tensor:
        y_hat = z * self.config.q_step
        latent = self.qcm(y_hat) if self.qcm is not None else y_hat
        return self.reconstruction(latent)


def laplace_bits(x_int: torch.Tensor, params: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Differentiable code length (bits) of integer samples under the discretised Laplace.

    x_int: (B,1,H,W) sample values in [0, 2**bits); params: (B,2,H,W) = (mean_norm, 8*log2 s_norm);
    bits: (B,) normalisation bit depth.  Everything in normalised units (sample / 2**bits).
    """
    unit = torch.exp2(-bits.to(params.dtype)).view(-1, 1, 1, 1)
    mean = params[:, :1]
    scale = torch.exp2(params[:, 1:] / 8.0).clamp_min(1e-7)
    x = x_int.to(params.dtype) * unit
    upper = _laplace_cdf((x + 0.5 * unit - mean) / scale)
    lower = _laplace_cdf((x - 0.5 * unit - mean) / scale)
    probability = (upper - lower).clamp_min(2**-24)
    return -torch.log2(probability)


def _laplace_cdf(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t < 0, 0.5 * torch.exp(t.clamp(max=0)), 1 - 0.5 * torch.exp(-t.clamp(min=0)))
