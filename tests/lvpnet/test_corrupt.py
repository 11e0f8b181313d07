"""Damaged, truncated, foreign and hostile streams: always a specific error, never wrong pixels."""

from __future__ import annotations

import struct
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvpnet import compress, decompress
from lvpnet.codec import stream_stats
from lvpnet.errors import CorruptStreamError, LVPNetError, UnsupportedStreamError, WeightsError
from lvpnet.spec.container import MAGIC, pack_header, parse_header
from lvpnet.zoo import ModelBundle
from tests.lvpnet.synthetic import MODEL_ONLY, smooth_image


@pytest.fixture(scope="module")
def stream(seeded: ModelBundle) -> tuple[np.ndarray, bytes]:
    image = smooth_image(np.random.default_rng(7), (2, 90, 130), "uint16", 12)
    return image, compress(image, bits_stored=12, model=seeded.name, tile_size=64, options=MODEL_ONLY)


def rewrite_header(data: bytes, **changes: object) -> bytes:
    header = parse_header(data)
    payload = data[header.header_length :]
    return pack_header(replace(header, **changes)) + payload


def test_wrong_magic(stream: tuple[np.ndarray, bytes]) -> None:
    _, data = stream
    with pytest.raises(CorruptStreamError, match="magic"):
        decompress(b"XXXX" + data[4:])


def test_unknown_version(stream: tuple[np.ndarray, bytes]) -> None:
    _, data = stream
    bumped = data[: len(MAGIC)] + struct.pack("<H", 99) + data[len(MAGIC) + 2 :]
    with pytest.raises(UnsupportedStreamError, match="version 99"):
        decompress(bumped)


def test_header_crc(stream: tuple[np.ndarray, bytes]) -> None:
    _, data = stream
    damaged = bytearray(data)
    damaged[20] ^= 0x01
    with pytest.raises(CorruptStreamError):
        decompress(bytes(damaged))


def test_chunk_crc(stream: tuple[np.ndarray, bytes]) -> None:
    _, data = stream
    damaged = bytearray(data)
    damaged[-3] ^= 0x40
    with pytest.raises(CorruptStreamError, match="CRC"):
        decompress(bytes(damaged))


@pytest.mark.parametrize("cut", [0, 5, 12, 40, 200, -200, -1])
def test_truncation(stream: tuple[np.ndarray, bytes], cut: int) -> None:
    _, data = stream
    with pytest.raises(CorruptStreamError):
        decompress(data[:cut])


def test_trailing_garbage(stream: tuple[np.ndarray, bytes]) -> None:
    _, data = stream
    with pytest.raises(CorruptStreamError):
        decompress(data + b"\0")


@pytest.mark.parametrize("field,value", [("rows", 91), ("cols", 129), ("frames", 1), ("tile_size", 32)])
def test_descriptor_inconsistent_with_payload(stream: tuple[np.ndarray, bytes], field: str, value: int) -> None:
    _, data = stream
    header = parse_header(data)
    descriptor = replace(header.descriptor, **{field: value})
    frame_sha = header.frame_sha256[: descriptor.frames] + [b"\0" * 32] * max(0, descriptor.frames - 2)
    try:
        forged = rewrite_header(data, descriptor=descriptor, frame_sha256=frame_sha)
    except ValueError:
        return  # the writer itself refuses a table that does not match the descriptor
    with pytest.raises(CorruptStreamError):
        decompress(forged)


def test_wrong_raw_checksum_is_never_returned(stream: tuple[np.ndarray, bytes]) -> None:
    _, data = stream
    with pytest.raises(CorruptStreamError, match="SHA-256"):
        decompress(rewrite_header(data, raw_sha256=b"\1" * 32))


def test_coder_version_mismatch(stream: tuple[np.ndarray, bytes]) -> None:
    _, data = stream
    with pytest.raises(UnsupportedStreamError, match="entropy coder"):
        decompress(rewrite_header(data, coder_version="constriction==0.0.1;ans32"))


def test_unknown_model_is_named(stream: tuple[np.ndarray, bytes]) -> None:
    _, data = stream
    assert stream_stats(data)["planes_model"] > 0  # decoding needs the model
    with pytest.raises(UnsupportedStreamError, match="lvpnet-from-the-future"):
        decompress(rewrite_header(data, codec_id="lvpnet-from-the-future", weights_sha256=b"\5" * 32))


def test_known_model_with_unknown_weights(stream: tuple[np.ndarray, bytes], seeded: ModelBundle) -> None:
    _, data = stream
    with pytest.raises(UnsupportedStreamError, match="SHA-256"):
        decompress(rewrite_header(data, weights_sha256=b"\7" * 32))


def test_weights_hash_mismatch_is_refused(seeded: ModelBundle) -> None:
    with pytest.raises(WeightsError, match="does not match"):
        ModelBundle.from_bytes(seeded.serialized, expected_sha256="0" * 64)
    tampered = bytearray(seeded.serialized)
    tampered[len(tampered) // 2] ^= 0xFF
    with pytest.raises(WeightsError):
        ModelBundle.from_bytes(bytes(tampered), expected_sha256=seeded.sha256)


def test_absurd_dimensions_refused_before_allocation(stream: tuple[np.ndarray, bytes]) -> None:
    _, data = stream
    header = parse_header(data)
    huge = replace(header.descriptor, rows=1 << 20, cols=1 << 20, tile_size=65528)
    with pytest.raises(ValueError):
        rewrite_header(data, descriptor=huge)  # chunk table no longer matches: the writer refuses
    # A forged header that is self-consistent but describes 2**40 samples is refused by size.
    from lvpnet.spec.container import Chunk

    chunks = [Chunk(0, 0, 0)] * huge.frames * huge.tiles_per_frame
    forged = pack_header(replace(header, descriptor=huge, chunks=chunks))
    with pytest.raises(UnsupportedStreamError, match="limit"):
        decompress(forged)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_damage_never_yields_wrong_pixels(stream: tuple[np.ndarray, bytes], data: st.DataObject) -> None:
    image, encoded = stream
    damaged = bytearray(encoded)
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(damaged) - 1))
            damaged[position] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        damaged = damaged[: data.draw(st.integers(0, len(damaged) - 1))]
    else:
        start = data.draw(st.integers(0, len(damaged) - 1))
        damaged[start : start + 8] = data.draw(st.binary(min_size=8, max_size=8))
    try:
        out = decompress(bytes(damaged))
    except LVPNetError:
        return
    assert np.array_equal(out, image)  # only an unchanged splice may decode at all
