"""Tests of the latent entropy coder (lvpnet.entropy.latent) and its bit helpers (lvpnet.entropy.bits)."""

from __future__ import annotations

import heapq
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lvpnet.entropy.bits import (
    BitReader,
    bit_length,
    expgolomb_encode,
    pack_bits,
    peek_windows,
    read_svarint,
    read_uvarint,
    write_svarint,
    write_uvarint,
)
from lvpnet.entropy.latent import (
    METHOD_ANS,
    METHOD_CONSTANT,
    METHOD_HUFFMAN,
    VALUE_BOUND,
    decode_latent,
    encode_latent,
    limited_code_lengths,
)
from lvpnet.errors import CorruptStreamError

B = VALUE_BOUND


def laplace(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 2.0) -> np.ndarray:
    return np.round(rng.laplace(0.0, scale, shape)).astype(np.int32)


def sparse_latent(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Laplace-like channels, mostly zero after a per-channel offset, with a few far outliers."""
    rng = np.random.default_rng(seed)
    z = laplace(rng, shape, 1.5)
    z[rng.random(shape) < 0.6] = 0
    z += rng.integers(-50, 50, size=(shape[0], 1, 1)).astype(np.int32)
    outliers = rng.random(shape) < 0.002
    z[outliers] = rng.integers(-B, B + 1, size=int(outliers.sum()))
    return z


def latent_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    mixed = sparse_latent(1, (6, 24, 20))
    mixed[1] = 7  # constant channel
    mixed[2] = -B  # constant at the bottom of the range
    extremes = rng.choice(np.array([-B, B, 0, -B + 1, B - 1], dtype=np.int32), size=(3, 9, 11))
    extremes[0, 0, 0], extremes[0, 0, 1] = -B, B
    two_values = np.where(rng.random((2, 16, 16)) < 0.5, -B, B).astype(np.int32)
    return {
        "laplace": laplace(rng, (4, 32, 32)),
        "sparse": sparse_latent(2, (8, 16, 16)),
        "mixed": mixed,
        "constant": np.full((3, 8, 8), 42, dtype=np.int32),
        "all_escape": rng.integers(-B, B + 1, size=(2, 20, 20)).astype(np.int32),
        "wide_uniform": rng.integers(-300, 300, size=(2, 32, 32)).astype(np.int32),
        "extremes": extremes,
        "two_far_values": two_values,
        "single": np.array([[[-17]]], dtype=np.int32),
        "single_extreme": np.array([[[B]], [[-B]]], dtype=np.int32),
        "one_row": laplace(rng, (3, 1, 40)),
        "empty_channels": np.zeros((0, 4, 4), dtype=np.int32),
        "empty_planes": np.zeros((3, 0, 5), dtype=np.int32),
    }


CASES = latent_cases()


def huffman_cost(counts: np.ndarray) -> int:
    """Total bits of an unconstrained Huffman code (sum of the merged weights)."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def record_sizes(payload: bytes, shape: tuple[int, int, int]) -> list[tuple[int, int]]:
    """(method, record size) of each channel record, parsed with the documented layout."""
    out = []
    offset = 0
    for _ in range(shape[0]):
        start = offset
        method = payload[offset]
        offset += 1
        if method == METHOD_CONSTANT:
            _, offset = read_svarint(payload, offset)
        else:
            size, offset = read_uvarint(payload, offset)
            offset += size
        out.append((method, offset - start))
    assert offset == len(payload)
    return out


# ---------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("method", [None, METHOD_HUFFMAN, METHOD_ANS])
def test_round_trip(name: str, method: int | None) -> None:
    z = CASES[name]
    payload = encode_latent(z, method=method)
    out = decode_latent(payload, z.shape)
    assert out.dtype == np.int32
    assert out.shape == z.shape
    np.testing.assert_array_equal(out, z)


def test_round_trip_large() -> None:
    z = sparse_latent(7, (16, 128, 128))
    z[5] = 3
    start = time.perf_counter()
    payload = encode_latent(z)
    mid = time.perf_counter()
    out = decode_latent(payload, z.shape)
    end = time.perf_counter()
    np.testing.assert_array_equal(out, z)
    methods = [m for m, _ in record_sizes(payload, z.shape)]
    print(
        f"\n(16,128,128): {len(payload)} bytes, {8 * len(payload) / z.size:.3f} bit/symbol, "
        f"methods {methods}, encode {1e3 * (mid - start):.1f} ms, decode {1e3 * (end - mid):.1f} ms"
    )


def test_other_integer_dtypes_give_same_bytes() -> None:
    z = CASES["sparse"]
    payload = encode_latent(z)
    assert encode_latent(z.astype(np.int64)) == payload
    assert encode_latent(z.tolist()) == payload


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    z=hnp.arrays(
        dtype=np.int32,
        shape=hnp.array_shapes(min_dims=3, max_dims=3, min_side=0, max_side=9),
        elements=st.one_of(st.integers(-3, 3), st.integers(-B, B)),
    ),
    method=st.sampled_from([None, METHOD_HUFFMAN, METHOD_ANS]),
)
def test_round_trip_property(z: np.ndarray, method: int | None) -> None:
    np.testing.assert_array_equal(decode_latent(encode_latent(z, method=method), z.shape), z)


# ---------------------------------------------------------------------------------------------------------
# Method choice, determinism, sizes


@pytest.mark.parametrize("name", ["laplace", "sparse", "mixed", "all_escape", "wide_uniform", "extremes"])
def test_method_selection_picks_smaller(name: str) -> None:
    z = CASES[name]
    auto = record_sizes(encode_latent(z), z.shape)
    huff = record_sizes(encode_latent(z, method=METHOD_HUFFMAN), z.shape)
    ans = record_sizes(encode_latent(z, method=METHOD_ANS), z.shape)
    assert all(m == METHOD_HUFFMAN for m, _ in huff)
    assert all(m == METHOD_ANS for m, _ in ans)
    for c, ((method, size), (_, h), (_, a)) in enumerate(zip(auto, huff, ans, strict=True)):
        if z[c].min() == z[c].max():
            assert method == METHOD_CONSTANT
            assert size <= min(h, a)
        else:
            assert size == min(h, a)
            assert method == (METHOD_HUFFMAN if h <= a else METHOD_ANS)
    assert len(encode_latent(z)) <= min(len(encode_latent(z, method=m)) for m in (METHOD_HUFFMAN, METHOD_ANS))


def test_both_methods_win_somewhere() -> None:
    # A skewed binary channel favours ANS (Huffman needs >= 1 bit/symbol); a dyadic one favours Huffman.
    rng = np.random.default_rng(5)
    skewed = (rng.random((1, 64, 64)) < 0.02).astype(np.int32)
    dyadic = rng.choice(np.arange(4, dtype=np.int32), p=[0.5, 0.25, 0.125, 0.125], size=(1, 64, 64))
    assert record_sizes(encode_latent(skewed), skewed.shape)[0][0] == METHOD_ANS
    assert record_sizes(encode_latent(dyadic), dyadic.shape)[0][0] == METHOD_HUFFMAN


def test_determinism() -> None:
    for z in CASES.values():
        first = encode_latent(z)
        assert encode_latent(z.copy()) == first
        assert encode_latent(np.ascontiguousarray(z[:, ::-1, :][:, ::-1, :])) == first


def test_laplace_bits_per_symbol() -> None:
    z = laplace(np.random.default_rng(0), (1, 64, 64), 2.0)
    _, counts = np.unique(z, return_counts=True)
    p = counts / counts.sum()
    entropy = float(-(p * np.log2(p)).sum())
    sizes = {m: len(encode_latent(z, method=m)) for m in (METHOD_HUFFMAN, METHOD_ANS)}
    bps = {m: 8 * s / z.size for m, s in sizes.items()}
    print(
        f"\nLaplace(2) 64x64: entropy {entropy:.3f}, Huffman {bps[METHOD_HUFFMAN]:.3f}, "
        f"ANS {bps[METHOD_ANS]:.3f} bit/symbol (headers included)"
    )
    for value in bps.values():
        assert entropy <= value < entropy + 0.2


def test_huffman_decode_speed_print() -> None:
    z = laplace(np.random.default_rng(3), (1, 200, 200), 2.0)
    payload = encode_latent(z, method=METHOD_HUFFMAN)
    start = time.perf_counter()
    out = decode_latent(payload, z.shape)
    print(f"\nHuffman decode of 40k symbols: {1e3 * (time.perf_counter() - start):.1f} ms")
    np.testing.assert_array_equal(out, z)


# ---------------------------------------------------------------------------------------------------------
# Length-limited Huffman and bit helpers


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=257))
def test_limited_code_lengths_property(counts_list: list[int]) -> None:
    counts = np.array(counts_list, dtype=np.int64)
    lengths = limited_code_lengths(counts, 15)
    used = counts > 0
    assert np.all((lengths > 0) == used)
    assert lengths.max(initial=0) <= 15
    if used.sum() >= 2:
        kraft = np.sum(2.0 ** -lengths[used])
        assert kraft == 1.0  # package-merge codes are complete
        cost = int((counts * lengths).sum())
        assert cost >= huffman_cost(counts)
        if lengths.max() < 15:
            assert cost == huffman_cost(counts)


def test_limited_code_lengths_hits_limit() -> None:
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib, dtype=np.int64)  # unconstrained Huffman would need 29-bit codes
    lengths = limited_code_lengths(counts, 15)
    assert lengths.max() == 15
    assert np.sum(2.0**-lengths) == 1.0
    z = np.repeat(np.arange(30, dtype=np.int32), fib).reshape(1, 1, -1)
    np.testing.assert_array_equal(decode_latent(encode_latent(z, method=METHOD_HUFFMAN), z.shape), z)


def test_pack_bits_matches_string_concatenation() -> None:
    rng = np.random.default_rng(9)
    lengths = rng.integers(0, 65, size=500)
    codes = rng.integers(0, 2**63, size=500, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    pairs = zip(codes.tolist(), lengths.tolist(), strict=True)
    text = "".join(format(c & ((1 << n) - 1), f"0{n}b") if n else "" for c, n in pairs)
    text += "0" * (-len(text) % 8)
    expected = bytes(int(text[i : i + 8], 2) for i in range(0, len(text), 8))
    assert pack_bits(codes, lengths) == expected
    assert pack_bits(np.zeros(0, np.uint64), np.zeros(0, np.int64)) == b""


def test_expgolomb_round_trip_and_reader() -> None:
    values = np.array([0, 1, 2, 3, 7, 8, 255, 2**22, 2**31, 2**32 - 2], dtype=np.uint64)
    codes, lengths = expgolomb_encode(values)
    assert lengths.tolist()[:5] == [1, 3, 3, 5, 7]
    reader = BitReader(pack_bits(codes, lengths), int(lengths.sum()))
    np.testing.assert_array_equal(reader.read_expgolomb_array(values.size), values)
    with pytest.raises(CorruptStreamError):
        reader.read_expgolomb()
    with pytest.raises(CorruptStreamError):
        BitReader(bytes(8)).read_expgolomb()  # 64 zero bits: prefix too long
    with pytest.raises(CorruptStreamError):
        BitReader(b"\x01").read_expgolomb_array(9)


def test_bit_length_and_peek() -> None:
    x = np.array([0, 1, 2, 3, 2**52 - 1, 2**53, 2**64 - 1], dtype=np.uint64)
    assert bit_length(x).tolist() == [int(v).bit_length() for v in x.tolist()]
    data = bytes([0b10110011, 0b01011100])
    peeks = peek_windows(data, 16, 5)
    bits = "".join(format(b, "08b") for b in data) + "00000"
    assert peeks.tolist() == [int(bits[p : p + 5], 2) for p in range(16)]


def test_varints() -> None:
    for value in [0, 1, 127, 128, 300, 2**32, 2**63]:
        encoded = write_uvarint(value)
        assert read_uvarint(encoded, 0) == (value, len(encoded))
    for value in [0, -1, 1, -B, B]:
        encoded = write_svarint(value)
        assert read_svarint(encoded, 0, B) == (value, len(encoded))
    with pytest.raises(CorruptStreamError):
        read_uvarint(b"\x80\x80", 0)
    with pytest.raises(CorruptStreamError):
        read_uvarint(b"\xff" * 11, 0)
    with pytest.raises(CorruptStreamError):
        read_svarint(write_svarint(B + 1), 0, B)


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_encoder_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_latent(np.array([[[B + 1]]], dtype=np.int32))
    with pytest.raises(ValueError):
        encode_latent(np.array([[[-B - 1]]], dtype=np.int64))
    with pytest.raises(ValueError):
        encode_latent(np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(ValueError):
        encode_latent(np.zeros((1, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        encode_latent(np.zeros((1, 2, 2), dtype=np.int32), method=METHOD_CONSTANT)


FUZZ_SHAPE = (4, 12, 10)


def fuzz_payloads() -> list[bytes]:
    z = sparse_latent(11, FUZZ_SHAPE)
    z[2] = -9
    return [encode_latent(z), encode_latent(z, method=METHOD_HUFFMAN), encode_latent(z, method=METHOD_ANS)]


FUZZ_PAYLOADS = fuzz_payloads()


def decode_or_corrupt(payload: bytes, shape: tuple[int, int, int] = FUZZ_SHAPE) -> None:
    """Damage may go unnoticed (no checksum here), but the only exception allowed is CorruptStreamError."""
    try:
        out = decode_latent(payload, shape)
    except CorruptStreamError:
        return
    assert out.shape == shape and out.dtype == np.int32
    assert out.min(initial=0) >= -B and out.max(initial=0) <= B


@pytest.mark.parametrize("which", range(len(FUZZ_PAYLOADS)))
def test_every_truncation_and_extension_raises(which: int) -> None:
    payload = FUZZ_PAYLOADS[which]
    for end in range(len(payload)):
        with pytest.raises(CorruptStreamError):
            decode_latent(payload[:end], FUZZ_SHAPE)
    with pytest.raises(CorruptStreamError):
        decode_latent(payload + b"\x00", FUZZ_SHAPE)


@pytest.mark.parametrize("which", range(len(FUZZ_PAYLOADS)))
def test_wrong_shape_raises(which: int) -> None:
    payload = FUZZ_PAYLOADS[which]
    for shape in [(3, 12, 10), (5, 12, 10), (4, 12, 11), (4, 11, 10), (4, 24, 10)]:
        with pytest.raises(CorruptStreamError):
            decode_latent(payload, shape)


@settings(max_examples=400, deadline=None)
@given(
    which=st.integers(0, len(FUZZ_PAYLOADS) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_fuzz_byte_flips(which: int, edits: list[tuple[int, int]], cut: int | None) -> None:
    payload = bytearray(FUZZ_PAYLOADS[which])
    for position, mask in edits:
        payload[position % len(payload)] ^= mask
    if cut is not None:
        payload = payload[: cut % (len(payload) + 1)]
    decode_or_corrupt(bytes(payload))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([(1, 1, 1), (2, 3, 4), (1, 64, 64), (3, 0, 2), (0, 5, 5)]))
def test_fuzz_random_bytes(payload: bytes, shape: tuple[int, int, int]) -> None:
    decode_or_corrupt(payload, shape)


def huffman_record(body: bytes) -> bytes:
    return bytes([METHOD_HUFFMAN]) + write_uvarint(len(body)) + body


def ans_record(body: bytes) -> bytes:
    return bytes([METHOD_ANS]) + write_uvarint(len(body)) + body


@pytest.mark.parametrize(
    ("payload", "shape"),
    [
        (b"", (1, 1, 1)),
        (b"\x07", (1, 1, 1)),  # unknown method
        (bytes([METHOD_CONSTANT]) + write_svarint(B + 1), (1, 2, 2)),  # constant out of range
        (bytes([METHOD_HUFFMAN]) + write_uvarint(2**40), (1, 2, 2)),  # body length past the end
        (huffman_record(write_svarint(0) + b"\x01" + b"\x11\x10" + b"\x00"), (1, 2, 2)),  # Kraft > 1
        (huffman_record(write_svarint(0) + b"\x01" + b"\x00\x00" + b"\x00"), (1, 2, 2)),  # no symbols
        (huffman_record(write_svarint(0) + b"\x01" + b"\x11\x01" + b"\x00"), (1, 2, 2)),  # pad nibble set
        (huffman_record(write_svarint(B) + b"\x01" + b"\x11\x00" + b"\x00"), (1, 2, 2)),  # window > range
        (huffman_record(write_svarint(0) + b"\x00" + b"\x10" + b"\x00"), (1, 100, 100)),  # too few bits
        # ESCAPE (code 1) followed by an exp-Golomb prefix of 40 zero bits.
        (huffman_record(write_svarint(0) + b"\x00" + b"\x11" + b"\x80" + bytes(6)), (1, 1, 1)),
        # ANS histogram claiming far more symbols than the shape holds: refused before any allocation.
        (ans_record(write_svarint(0) + b"\x00" + write_uvarint(2**60) + write_uvarint(0)), (1, 2, 2)),
        (ans_record(write_svarint(0) + b"\x00" + write_uvarint(3) + write_uvarint(0)), (1, 2, 2)),  # sum != n
        # Histogram fine, but 2**30 ANS words announced in a few bytes.
        (
            ans_record(write_svarint(0) + b"\x00" + write_uvarint(4) + write_uvarint(0) + write_uvarint(2**30)),
            (1, 2, 2),
        ),
        # ANS words ending in a zero word are invalid for constriction.
        (
            ans_record(write_svarint(0) + b"\x00" + write_uvarint(2) + write_uvarint(2) + write_uvarint(1) + bytes(4)),
            (1, 2, 2),
        ),
    ],
)
def test_crafted_corrupt_payloads(payload: bytes, shape: tuple[int, int, int]) -> None:
    with pytest.raises(CorruptStreamError):
        decode_latent(payload, shape)


def test_decoder_rejects_bad_shape() -> None:
    with pytest.raises(ValueError):
        decode_latent(b"", (1, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decode_latent(b"", (1, -2, 2))
