"""Classical lossless codecs as baselines for the benchmark: JPEG-LS, JPEG 2000, HTJ2K, JPEG XL, PNG.

Settings follow the classical-codec reference report (shared/reference/classical-codecs-dev.md) so
that figures can be compared with it:

* every codec is lossless and single-threaded; colour (rows, cols, 3) frames go in interleaved, as
  each codec takes RGB natively (JPEG-LS ILV=sample, RCT in JPEG 2000 / HTJ2K, RGB in JPEG XL / PNG);
* the codec is told BitsStored where it has a depth parameter (j2k, jxl, jpegls-bs); jpegls
  (imagecodecs) and htj2k have none and declare the 8/16-bit container depth, png stores it;
* signed data is coded as value - minimum (in int32) as unsigned, never as the two's-complement
  bit pattern (which costs up to +17 % on wavelet codecs).

Each stream starts with a small side header so that `decode(bytes)` alone rebuilds the array:
one flag byte (signed, 16-bit container) plus, for signed data, the int32 minimum.  Those 1 or 5
bytes are counted in the stream length (every byte counted, as for LVPNet).
"""

from __future__ import annotations

import importlib.metadata
import struct
from collections.abc import Callable
from dataclasses import dataclass

import imagecodecs
import numpy as np

__all__ = ["CLASSICAL_CODECS", "Codec", "UnsupportedFrameError", "codec_versions"]

_SIGNED = 0x01
_WIDE = 0x02  # 16-bit container (uint16 / int16)
_DTYPES = {
    (False, False): np.dtype(np.uint8),
    (False, True): np.dtype(np.uint16),
    (True, False): np.dtype(np.int8),
    (True, True): np.dtype(np.int16),
}


class UnsupportedFrameError(ValueError):
    """The codec cannot take this frame (recorded as not covered, never silently skipped)."""


@dataclass(frozen=True)
class Prepared:
    """A frame as the codecs see it: unsigned samples in the container width, and their depth."""

    samples: np.ndarray  # uint8 or uint16, (rows, cols) or (rows, cols, 3)
    depth: int  # bits the codec is told: BitsStored, raised if the values need more
    prefix: bytes  # side header of the stream


def _prepare(array: np.ndarray, bits_stored: int) -> Prepared:
    array = np.asarray(array)
    if array.dtype not in _DTYPES.values():
        raise UnsupportedFrameError(f"dtype {array.dtype} (uint8/int8/uint16/int16 supported)")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3) or array.size == 0:
        raise UnsupportedFrameError(f"shape {array.shape} is not (rows, cols) or (rows, cols, 3)")
    wide = array.dtype.itemsize == 2
    unsigned = np.dtype(np.uint16 if wide else np.uint8)
    flags = _WIDE if wide else 0
    if array.dtype.kind == "i":
        # Offset to unsigned: value - min fits the container (max - min <= 2**bits - 1).
        minimum = int(array.min())
        samples = (array.astype(np.int32) - minimum).astype(unsigned)
        prefix = struct.pack("<Bi", flags | _SIGNED, minimum)
    else:
        samples, prefix = array, struct.pack("<B", flags)
    # Native words may carry bits above BitsStored (overlays): the codec must be told enough bits.
    depth = max(1, int(bits_stored), int(samples.max()).bit_length())
    return Prepared(np.ascontiguousarray(samples), min(depth, 8 * unsigned.itemsize), prefix)


def _restore(data: bytes, decode: Callable[[bytes], np.ndarray]) -> np.ndarray:
    flags = data[0]
    wide, signed = bool(flags & _WIDE), bool(flags & _SIGNED)
    offset = 5 if signed else 1
    decoded = np.asarray(decode(data[offset:]))
    samples = decoded.astype(np.uint16 if wide else np.uint8, copy=False)
    if not signed:
        return samples
    (minimum,) = struct.unpack_from("<i", data, 1)
    return (samples.astype(np.int32) + minimum).astype(_DTYPES[(True, wide)])


@dataclass(frozen=True)
class Codec:
    """encode(array, bits_stored) -> bytes; decode(bytes) -> the same array (dtype and shape)."""

    name: str
    library: str
    params: str
    _encode: Callable[[Prepared], bytes | bytearray]
    _decode: Callable[[bytes], np.ndarray]

    def encode(self, array: np.ndarray, bits_stored: int) -> bytes:
        prepared = _prepare(array, bits_stored)
        return prepared.prefix + bytes(self._encode(prepared))

    def decode(self, data: bytes) -> np.ndarray:
        return _restore(data, self._decode)


# ------------------------------------------------------------------------------------ codecs


def _jpegls_encode(p: Prepared) -> bytes | bytearray:
    # CharLS's output estimate is too small for noisy RGB: give it room (raw size + margin).
    return imagecodecs.jpegls_encode(p.samples, level=0, out=2 * p.samples.nbytes + 4096)


def _narrow(p: Prepared) -> np.ndarray:
    """8-bit samples when the depth allows (libjxl rejects bitspersample <= 8 on uint16 input)."""
    return p.samples.astype(np.uint8) if p.depth <= 8 and p.samples.dtype != np.uint8 else p.samples


def _jpegls_bs_encode(p: Prepared) -> bytes:
    from jpeg_ls import encode_buffer

    samples = _narrow(p)
    rows, cols = samples.shape[:2]
    spp = 1 if samples.ndim == 2 else samples.shape[2]
    # DICOM-style JPEG-LS: P = BitsStored (CharLS needs P >= 2); ILV=2 (sample) for RGB.
    return bytes(
        encode_buffer(
            samples.astype(samples.dtype.newbyteorder("<")).tobytes(),
            rows,
            cols,
            spp,
            max(2, p.depth),
            lossy_error=0,
            interleave_mode=2 if spp == 3 else None,
        )
    )


def _jpegls_bs_decode(data: bytes) -> np.ndarray:
    from jpeg_ls import decode_buffer

    buffer, info = decode_buffer(data)
    dtype = np.dtype("<u1" if info["bits_per_sample"] <= 8 else "<u2")
    shape = (info["height"], info["width"]) + ((info["components"],) if info["components"] > 1 else ())
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape)


def _has_pyjpegls() -> bool:
    try:
        import jpeg_ls  # noqa: F401
    except ImportError:
        return False
    return True


def _build() -> dict[str, Codec]:
    codecs = [
        Codec(
            "jpegls",
            "imagecodecs / CharLS",
            "jpegls_encode(level=0)  # NEAR=0; P = container depth 8/16; ILV=sample for RGB",
            _jpegls_encode,
            imagecodecs.jpegls_decode,
        ),
    ]
    if _has_pyjpegls():  # optional: the only binding that lets CharLS be told P = BitsStored
        codecs.append(
            Codec(
                "jpegls-bs",
                "pyjpegls / CharLS",
                "encode_buffer(bits_stored=BitsStored, lossy_error=0, ILV=2 for RGB)  # DICOM-style P",
                _jpegls_bs_encode,
                _jpegls_bs_decode,
            )
        )
    codecs += [
        Codec(
            "j2k",
            "imagecodecs / OpenJPEG",
            "jpeg2k_encode(level=0, reversible=True, codecformat='J2K', bitspersample=BitsStored, "
            "numthreads=1)  # 5/3 DWT, RCT for RGB",
            lambda p: imagecodecs.jpeg2k_encode(
                p.samples, level=0, reversible=True, codecformat="J2K", bitspersample=p.depth, numthreads=1
            ),
            lambda data: imagecodecs.jpeg2k_decode(data, numthreads=1),
        ),
        Codec(
            "htj2k",
            "imagecodecs / OpenJPH",
            "htj2k_encode(reversible=True)  # 5/3; SIZ depth = container (no option); RCT for RGB",
            lambda p: imagecodecs.htj2k_encode(p.samples, reversible=True),
            imagecodecs.htj2k_decode,
        ),
        Codec(
            "jxl-e7",
            "imagecodecs / libjxl",
            "jpegxl_encode(lossless=True, effort=7, bitspersample=BitsStored, numthreads=1)",
            lambda p: imagecodecs.jpegxl_encode(
                _narrow(p), lossless=True, effort=7, bitspersample=p.depth, numthreads=1
            ),
            lambda data: imagecodecs.jpegxl_decode(data, numthreads=1),
        ),
        Codec(
            "png",
            "imagecodecs / libpng + zlib",
            "png_encode(level=9)  # zlib 9, adaptive filters; 16-bit container stored as 16-bit",
            lambda p: imagecodecs.png_encode(p.samples, level=9),
            imagecodecs.png_decode,
        ),
    ]
    return {c.name: c for c in codecs}


CLASSICAL_CODECS: dict[str, Codec] = _build()


def codec_versions() -> dict[str, str]:
    """Library versions behind the codecs (for the report)."""
    wanted = ("imagecodecs", "charls", "openjpeg", "openjph", "libjxl", "libpng", "zlib")
    found: dict[str, str] = {}
    for item in str(imagecodecs.version()).split(", "):
        name, _, version = item.partition("-")
        if name in wanted:
            found[name] = version
    if _has_pyjpegls():
        found["pyjpegls"] = importlib.metadata.version("pyjpegls")
    return found
