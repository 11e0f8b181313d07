"""The per-tile choice: a plane is stored as JPEG-LS or JPEG XL where that is smaller than the
model (format version 2), decodes exactly, and is never larger than the classical codestream;
streams without such planes stay version 1; damaged or misplaced classical planes are errors."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace

import imagecodecs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvpnet import compress, decompress
from lvpnet.codec import CodecOptions, PlaneMode, stream_stats
from lvpnet.errors import CorruptStreamError, UnsupportedInputError
from lvpnet.spec.container import Chunk, pack_header, parse_header
from lvpnet.zoo import ModelBundle
from tests.lvpnet.synthetic import DTYPES, smooth_image


def _palette_image(rng: np.random.Generator) -> np.ndarray:
    """Few distinct values in flat regions (a rendered overlay, an ultrasound frame's surround):
    where a learned per-pixel model loses to the classical coders."""
    image = np.zeros((96, 80), np.uint8)
    image[10:40, 5:70] = 200
    image[50:90, 20:60] = 90
    image[60:70, :] = rng.integers(0, 4, (10, 80)) * 60
    return image


def test_classical_planes_win_where_smaller_and_round_trip(seeded: ModelBundle) -> None:
    image = _palette_image(np.random.default_rng(3))
    stream = compress(image, model=seeded.name)
    stats = stream_stats(stream)
    assert stats["planes_jpegls"] + stats["planes_jpegxl"] == 1 and stats["planes_model"] == 0
    assert parse_header(stream).version == 2
    assert np.array_equal(decompress(stream), image)
    # Never more than the plane's own classical codestream plus the stream's framing
    framing = stats["header"] + stats["plane_records"]
    jpegls = len(imagecodecs.jpegls_encode(image - image.min(), level=0))
    assert len(stream) <= framing + jpegls

    learned_only = compress(image, model=seeded.name, options=CodecOptions(classical_planes=()))
    assert parse_header(learned_only).version == 1  # readable by every earlier reader
    assert len(learned_only) > len(stream)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(list(DTYPES)),
    st.integers(1, 50),
    st.integers(1, 50),
    st.sampled_from([("jpegls",), ("jpegxl",)]),
    st.integers(0, 2**32 - 1),
)
def test_each_classical_mode_round_trips_any_depth(
    seeded: ModelBundle, dtype: str, rows: int, cols: int, classical: tuple[str, ...], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    full = 8 if dtype.endswith("8") else 16
    image = smooth_image(rng, (rows, cols), dtype, full)
    # Model coding off in effect: the classical codec or raw bits must carry every plane
    stream = compress(image, model=seeded.name, options=CodecOptions(classical_planes=classical))
    assert np.array_equal(decompress(stream), image) and decompress(stream).dtype == image.dtype


def _first_plane(stream: bytes) -> tuple[int, int]:
    """(offset of the first chunk's payload, its plane mode)."""
    header = parse_header(stream)
    offset = header.header_length + header.chunks[0].offset
    return offset, stream[offset]


def _rechunk(stream: bytes, payload: bytes, version: int | None = None) -> bytes:
    """The stream with its single chunk replaced (CRC and table consistent)."""
    header = parse_header(stream)
    assert len(header.chunks) == 1
    header = replace(header, chunks=[Chunk(0, len(payload), zlib.crc32(payload))])
    if version is not None:
        header = replace(header, version=version)
    return pack_header(header) + payload


def test_damaged_or_misplaced_classical_planes_are_errors(seeded: ModelBundle) -> None:
    image = _palette_image(np.random.default_rng(4))
    for name, mode in (("jpegls", PlaneMode.JPEGLS), ("jpegxl", PlaneMode.JPEGXL)):
        stream = compress(image, model=seeded.name, options=CodecOptions(classical_planes=(name,)))
        offset, found = _first_plane(stream)
        assert found == mode
        payload = bytearray(stream[offset:])
        # A flip inside the codestream, CRC recomputed: the decoder or the SHA-256 refuses it
        for position in (12, len(payload) // 2, len(payload) - 3):
            damaged = bytearray(payload)
            damaged[position] ^= 0x21
            with pytest.raises(CorruptStreamError):
                decompress(_rechunk(stream, bytes(damaged)))
        # Mode 3/4 in a version 1 stream: not a plane that version can hold
        with pytest.raises(CorruptStreamError, match="version 1"):
            decompress(_rechunk(stream, bytes(payload), version=1))
        # A bit depth past what the classical codecs take
        too_wide = bytearray(payload)
        too_wide[5] = 17
        with pytest.raises(CorruptStreamError):
            decompress(_rechunk(stream, bytes(too_wide)))
        # A codestream of another shape (the plane record says 96 x 80)
        other = bytes(imagecodecs.jpegls_encode(np.zeros((8, 8), np.uint8), level=0))
        wrong_shape = bytes(payload[:6]) + struct.pack("<I", len(other)) + other
        with pytest.raises(CorruptStreamError):
            decompress(_rechunk(stream, wrong_shape))


def _photo_rgb(rng: np.random.Generator, dtype: str = "uint8") -> np.ndarray:
    """Correlated colour channels (a rendered secondary capture): what libjxl codes jointly better
    than three planes after one fixed colour transform."""
    grey = smooth_image(rng, (72, 88), "uint8", 8).astype(np.int32)
    rgb = np.stack([grey, (grey * 3) // 4 + 20, 255 - grey], axis=-1)
    rgb[20:40, 10:50] = (30, 200, 90)
    scale = 1 if dtype == "uint8" else 64
    return (rgb * scale).astype(dtype)


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("color", ["RGB", None])
def test_rgb_tiles_may_be_one_joint_jpegxl_codestream(seeded: ModelBundle, dtype: str, color: str | None) -> None:
    image = _photo_rgb(np.random.default_rng(5), dtype)
    stream = compress(image, color=color, samples_axis=True, model=seeded.name, tile_size=48)
    stats = stream_stats(stream)
    assert stats["planes_jpegxl_tile"] >= 1  # of the four 48 x 48 tiles, where it is smaller
    assert parse_header(stream).version == 3
    assert sum(v for k, v in stats.items() if not k.startswith("planes_")) == len(stream)
    decoded = decompress(stream)
    assert decoded.dtype == image.dtype and np.array_equal(decoded, image)
    # smaller than the planes coded apart (the choice that made it)
    apart = compress(image, color=color, samples_axis=True, model=seeded.name, tile_size=48,
                     options=CodecOptions(classical_planes=("jpegls",)))  # fmt: skip
    assert stream_stats(apart)["planes_jpegxl_tile"] == 0 and len(stream) < len(apart)


def test_damaged_or_misplaced_joint_tiles_are_errors(seeded: ModelBundle) -> None:
    image = _photo_rgb(np.random.default_rng(6))
    stream = compress(image, color="RGB", model=seeded.name)
    offset, found = _first_plane(stream)
    assert found == PlaneMode.JPEGXL_TILE
    payload = bytes(stream[offset:])
    for position in (15, len(payload) // 2, len(payload) - 3):
        damaged = bytearray(payload)
        damaged[position] ^= 0x21
        with pytest.raises(CorruptStreamError):
            decompress(_rechunk(stream, bytes(damaged)))
    with pytest.raises(CorruptStreamError, match="version 2"):  # mode 5 needs a version 3 stream
        decompress(_rechunk(stream, payload, version=2))
    with pytest.raises(CorruptStreamError, match="minimum"):
        decompress(_rechunk(stream, payload[:1] + struct.pack("<i", 7) + payload[5:]))
    with pytest.raises(CorruptStreamError):  # more bits than the tile's data type holds
        decompress(_rechunk(stream, payload[:5] + bytes([9]) + payload[6:]))
    other = bytes(imagecodecs.jpegxl_encode(np.zeros((8, 8, 3), np.uint8), lossless=True))
    with pytest.raises(CorruptStreamError, match="shape"):
        decompress(_rechunk(stream, payload[:6] + struct.pack("<I", len(other)) + other))
    with pytest.raises(CorruptStreamError, match="trailing"):
        decompress(_rechunk(stream, payload + b"\x00"))


def test_frames_the_model_loses_everywhere_may_be_one_classical_tile(seeded: ModelBundle) -> None:
    # The untrained model loses every plane of this 96 x 80 image to the classical codecs, so the
    # encoder also tries whole frames (no tile edges) and keeps that when smaller
    image = np.stack([_palette_image(np.random.default_rng(s)) for s in (8, 9)])
    stream = compress(image, model=seeded.name, tile_size=48)
    header = parse_header(stream)
    assert header.descriptor.tile_size == 96 and len(header.chunks) == 2  # one tile per frame
    assert stream_stats(stream)["planes_model"] == 0
    assert np.array_equal(decompress(stream), image)
    # with the model on every plane, the requested tiling stays
    model_only = compress(image, model=seeded.name, tile_size=48, options=CodecOptions(raw_fallback=False))
    assert parse_header(model_only).descriptor.tile_size == 48
    with pytest.raises(UnsupportedInputError, match="tile size"):
        compress(image, model=seeded.name, tile_size=65536)


def test_codestreams_declaring_another_size_are_refused_before_decoding(seeded: ModelBundle) -> None:
    # A few hundred bytes of JPEG XL can declare a huge image: the plane's shape is enforced first
    image = _palette_image(np.random.default_rng(11))
    stream = compress(image, model=seeded.name, tile_size=96, options=CodecOptions(classical_planes=("jpegxl",)))
    offset, found = _first_plane(stream)
    assert found == PlaneMode.JPEGXL
    payload = bytes(stream[offset:])
    big = bytes(imagecodecs.jpegxl_encode(np.zeros((4096, 4096), np.uint8), lossless=True, effort=1))
    with pytest.raises(CorruptStreamError, match="could not be decoded"):
        decompress(_rechunk(stream, payload[:6] + struct.pack("<I", len(big)) + big))
    rgb = _photo_rgb(np.random.default_rng(12))
    joint = compress(rgb, color="RGB", model=seeded.name)
    offset, found = _first_plane(joint)
    assert found == PlaneMode.JPEGXL_TILE
    big_rgb = bytes(imagecodecs.jpegxl_encode(np.zeros((4096, 4096, 3), np.uint8), lossless=True, effort=1))
    tile = bytes(joint[offset:])
    with pytest.raises(CorruptStreamError, match="could not be decoded"):
        decompress(_rechunk(joint, tile[:6] + struct.pack("<I", len(big_rgb)) + big_rgb))


def test_a_joint_tile_that_saves_too_little_does_not_bump_the_version(seeded: ModelBundle) -> None:
    from lvpnet.codec import _Plane, _with_joint_tiles

    planes = [_Plane(np.zeros((2, 2), np.int64), 0, 1, PlaneMode.RAW, b"\x00" * 20) for _ in range(3)]
    joint = _Plane(np.zeros((2, 2, 3), np.int64), 0, 1, PlaneMode.JPEGXL_TILE, b"\x00" * 60)
    # records: 3 x (5 + 1 + 20) = 78 bytes apart, 6 + 60 = 66 joint: saves 12 > 4
    assert _with_joint_tiles([planes], [joint], version_paid=False) == [[joint]]
    close = _Plane(joint.values, 0, 1, PlaneMode.JPEGXL_TILE, b"\x00" * 69)  # saves 3: not worth version 3
    assert _with_joint_tiles([planes], [close], version_paid=False) == [planes]
    assert _with_joint_tiles([planes], [close], version_paid=True) == [[close]]
