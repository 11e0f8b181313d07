"""The candidates of the best-of: LVPNet, JPEG-LS, JPEG XL (the classical codecs from
`lvpnet.eval.classical`, one stream per frame) and zstd on the raw words.  Each takes the stored
words exactly as `native_pixel_array` gives them and gives them back exactly, or raises."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from service.record import ZSTD_LEVEL

MAX_DECODED_BYTES = 1 << 34


@dataclass(frozen=True)
class PixelCodec:
    name: str
    encode: Callable[[np.ndarray, dict[str, Any]], bytes]
    decode: Callable[[bytes, dict[str, Any]], np.ndarray]


def _color(spec: dict[str, Any]) -> tuple[str | None, bool | None]:
    if spec["samples"] == 1:
        return "MONOCHROME", None
    if spec["photometric"] == "RGB":
        return "RGB", None
    return None, True  # other 3-sample data (YBR_FULL...) coded as plain channels


def _lvpnet_encode(array: np.ndarray, spec: dict[str, Any]) -> bytes:
    from dataclasses import replace

    from lvpnet import compress
    from worker.runtime import codec_options, default_model

    color, samples_axis = _color(spec)
    # single-image mode: an encoder choice riding in the spec (compression effort "max")
    options = replace(codec_options(), adapt_steps=int(spec.get("adapt_steps", 0)))
    return compress(
        array,
        bits_stored=spec["bits_stored"],
        color=color,
        samples_axis=samples_axis,
        model=default_model(),
        options=options,
    )


def _lvpnet_decode(data: bytes, spec: dict[str, Any]) -> np.ndarray:
    from lvpnet import decompress
    from worker.runtime import codec_options

    return decompress(data, options=codec_options())


def _frames(array: np.ndarray, spec: dict[str, Any]) -> list[np.ndarray]:
    return list(array) if spec["frames"] > 1 else [array]


def _classical(name: str) -> PixelCodec:
    def codec() -> Any:
        from lvpnet.eval.classical import CLASSICAL_CODECS

        return CLASSICAL_CODECS[name]

    def encode(array: np.ndarray, spec: dict[str, Any]) -> bytes:
        implementation = codec()
        streams = [implementation.encode(np.ascontiguousarray(f), spec["bits_stored"]) for f in _frames(array, spec)]
        return struct.pack("<I", len(streams)) + b"".join(struct.pack("<I", len(s)) + s for s in streams)

    def decode(data: bytes, spec: dict[str, Any]) -> np.ndarray:
        implementation = codec()
        (count,), offset, frames = struct.unpack_from("<I", data, 0), 4, []
        for _ in range(count):
            (length,) = struct.unpack_from("<I", data, offset)
            frames.append(np.asarray(implementation.decode(data[offset + 4 : offset + 4 + length])))
            offset += 4 + length
        if offset != len(data):
            raise ValueError("trailing bytes after the last frame")
        return np.stack(frames) if spec["frames"] > 1 else frames[0]

    return PixelCodec(name, encode, decode)


def _zstd_encode(array: np.ndarray, spec: dict[str, Any]) -> bytes:
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return zstandard.ZstdCompressor(level=spec.get("zstd_level", ZSTD_LEVEL)).compress(little.tobytes())


def _zstd_decode(data: bytes, spec: dict[str, Any]) -> np.ndarray:
    raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_DECODED_BYTES)
    dtype = np.dtype(spec["dtype"])
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(spec["shape"])


PIXEL_CODECS: dict[str, PixelCodec] = {
    "lvpnet": PixelCodec("lvpnet", _lvpnet_encode, _lvpnet_decode),
    "jpegls": _classical("jpegls"),
    "jxl-e7": _classical("jxl-e7"),
    "zstd": PixelCodec("zstd", _zstd_encode, _zstd_decode),
}
