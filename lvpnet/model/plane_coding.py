"""Plane coders: what a model does with one tile plane.  `codec.py` frames, batches and chooses
between them and the raw fallback; a plane coder turns same-shaped planes into (z, pixel)
payload pairs and back, with the exact integer decoder on both sides."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from lvpnet.entropy.latent import decode_latent, encode_latent
from lvpnet.entropy.pixelcoder import PixelCoder, StepParams
from lvpnet.errors import CorruptStreamError
from lvpnet.model.exact import ExactLVPNet
from lvpnet.model.lvpnet import LATENT_STRIDE, LVPNet


class ExecutionOptions(Protocol):
    compute: str
    device: str
    channels_last: bool


class PlaneCoder(Protocol):
    def encode(self, values: np.ndarray, bits: np.ndarray, options: ExecutionOptions) -> list[tuple[bytes, bytes]]:
        """values: int64 (B, h, w) in [0, 2**bits); returns (z payload, pixel payload) per plane."""
        ...

    def decode(
        self,
        payloads: list[tuple[bytes, bytes]],
        shape: tuple[int, int],
        bits: np.ndarray,
        options: ExecutionOptions,
    ) -> np.ndarray:
        """Inverse of `encode`: int64 (B, h, w); raises CorruptStreamError on damaged payloads."""
        ...


def padded_shape(h: int, w: int, stride: int) -> tuple[int, int]:
    return -(-h // stride) * stride, -(-w // stride) * stride


def normalised_padded(values: np.ndarray, bits: np.ndarray, stride: int) -> torch.Tensor:
    """Encoder-side network input: edge-padded to the latent grid, scaled to [0, 1)."""
    _, h, w = values.shape
    hp, wp = padded_shape(h, w, stride)
    padded = np.pad(values, ((0, 0), (0, hp - h), (0, wp - w)), mode="edge").astype(np.float32)
    return torch.from_numpy(padded / (2.0 ** bits[:, None, None]).astype(np.float32))[:, None]


def check_range(values: np.ndarray, bits: int) -> None:
    if values.size and (values.min() < 0 or values.max() >= (1 << bits)):
        raise CorruptStreamError("decoded samples outside the plane's range")


class FaithfulPlaneCoder:
    """The paper's LVPNet: z from GMSM, every sample coded with p(x | z) in one step."""

    def __init__(self, encoder: LVPNet | None, exact: ExactLVPNet, coder: PixelCoder, latent_channels: int):
        self._encoder, self._exact, self._coder = encoder, exact, coder
        self._channels = latent_channels

    def encode(self, values: np.ndarray, bits: np.ndarray, options: ExecutionOptions) -> list[tuple[bytes, bytes]]:
        assert self._encoder is not None
        z = self._encoder.analyse(normalised_padded(values, bits, LATENT_STRIDE)).numpy()
        mu16, scale_index = self._predict(z, bits, options)
        _, h, w = values.shape
        out = []
        for i in range(len(values)):
            params = StepParams(mu16[i, :h, :w].ravel(), scale_index[i, :h, :w].ravel())
            out.append((encode_latent(z[i].astype(np.int32)), self._coder.encode([values[i].ravel()], [params])))
        return out

    def decode(
        self,
        payloads: list[tuple[bytes, bytes]],
        shape: tuple[int, int],
        bits: np.ndarray,
        options: ExecutionOptions,
    ) -> np.ndarray:
        h, w = shape
        hp, wp = padded_shape(h, w, LATENT_STRIDE)
        z_shape = (self._channels, hp // LATENT_STRIDE, wp // LATENT_STRIDE)
        z = np.stack([decode_latent(z_payload, z_shape) for z_payload, _ in payloads]).astype(np.int64)
        mu16, scale_index = self._predict(z, bits, options)
        out = np.empty((len(payloads), h, w), dtype=np.int64)
        for i, (_, pixel_payload) in enumerate(payloads):
            decoder = self._coder.decoder(pixel_payload)
            values = decoder.decode_step(StepParams(mu16[i, :h, :w].ravel(), scale_index[i, :h, :w].ravel()))
            decoder.finish()
            check_range(values, int(bits[i]))
            out[i] = values.reshape(h, w)
        return out

    def _predict(self, z: np.ndarray, bits: np.ndarray, options: ExecutionOptions) -> tuple[np.ndarray, np.ndarray]:
        return self._exact.predict(
            z, bits, compute=options.compute, device=options.device, channels_last=options.channels_last
        )
