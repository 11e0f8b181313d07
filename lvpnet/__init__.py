"""LVPNet: lossless compression of medical images with a latent-variable, prediction-driven model."""

from lvpnet.errors import (
    CorruptStreamError,
    LVPNetError,
    UnsupportedInputError,
    UnsupportedStreamError,
    WeightsError,
)

__all__ = [
    "CorruptStreamError",
    "LVPNetError",
    "UnsupportedInputError",
    "UnsupportedStreamError",
    "WeightsError",
    "compress",
    "decompress",
    "decompress_frames",
]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # Lazy: `import lvpnet.spec` (header parsing, used by the service) must not import torch.
    if name in ("compress", "decompress", "decompress_frames"):
        from lvpnet import codec

        return getattr(codec, name)
    raise AttributeError(name)
