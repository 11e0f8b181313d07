"""Synthetic test images."""

from __future__ import annotations

import numpy as np

from lvpnet.codec import CodecOptions

#: code every varying plane with the model (the untrained test model rarely beats raw bits)
MODEL_ONLY = CodecOptions(raw_fallback=False)

DTYPES = {"uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767)}


def smooth_image(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, bits: int) -> np.ndarray:
    """A smooth field plus noise within `bits` stored bits (signed types centred on zero)."""
    lo, hi = DTYPES[dtype]
    span = (1 << bits) - 1
    base = 0 if lo == 0 else -(1 << (bits - 1))
    field = rng.normal(size=shape).cumsum(axis=-1).cumsum(axis=-2 if len(shape) > 1 else -1)
    field = (field - field.min()) / max(np.ptp(field), 1e-9) * span * 0.8 + rng.normal(0, 2, size=shape)
    return np.clip(np.round(field) + base, max(lo, base), min(hi, base + span)).astype(dtype)
