"""Entropy coding of the quantised latent z: an int32 array (C, H, W) with values in [-2**20, 2**20].

Each channel is coded on its own with whichever of two methods gives fewer bytes (constant channels take a
third, trivial one). The shape is not stored: the caller passes it to `decode_latent`.

Payload layout (all multi-byte integers little-endian; "uvarint" = unsigned LEB128, "svarint" = zig-zag
then uvarint; bit streams are MSB-first, zero-padded to a byte):

    payload  = record[0] .. record[C-1], nothing after
    record   = u8 method, then
      method 0 (constant): svarint value                   (every element equals value; any value if H*W == 0)
      method 1 (Huffman) : uvarint body_len, body
      method 2 (ANS)     : uvarint body_len, body
    window   = svarint lo, u8 K-1                         (alphabet lo .. lo+K-1, K <= 256; symbol K = ESCAPE)
    Huffman body = window, ceil((K+1)/2) bytes of 4-bit code lengths (symbol 0 in the high nibble of the
                   first byte; 0 = symbol unused; 1..15 otherwise; odd pad nibble 0), then H*W canonical
                   Huffman codes in raster order; each ESCAPE code is followed at once by expgolomb0(e).
    ANS body     = window, K+1 uvarint counts (histogram of symbols, ESCAPE last, summing to H*W),
                   uvarint W, W uint32 words of constriction AnsCoder.get_compressed() for the H*W symbols
                   with Categorical(counts / counts.sum(), perfect=False), then expgolomb0(e) of each escaped
                   value in raster order as one bit stream.
    e (escape offset of value v outside the window) = 2*(v - (lo+K)) if v >= lo+K else 2*(lo-1-v) + 1.

Canonical Huffman codes are assigned in order of (length, symbol), starting from all zeros.
"""

from __future__ import annotations

import constriction
import numpy as np

from lvpnet.entropy.bits import (
    BitReader,
    expgolomb_encode,
    pack_bits,
    peek_windows,
    read_svarint,
    read_uvarint,
    write_svarint,
    write_uvarint,
)
from lvpnet.errors import CorruptStreamError

__all__ = [
    "MAX_ALPHABET",
    "MAX_CODE_LENGTH",
    "METHOD_ANS",
    "METHOD_CONSTANT",
    "METHOD_HUFFMAN",
    "VALUE_BOUND",
    "decode_latent",
    "encode_latent",
    "limited_code_lengths",
]

METHOD_CONSTANT = 0
METHOD_HUFFMAN = 1
METHOD_ANS = 2

VALUE_BOUND = 2**20  # latent values lie in [-VALUE_BOUND, VALUE_BOUND]
MAX_ALPHABET = 256  # largest window K; the escape symbol comes on top
MAX_CODE_LENGTH = 15  # fits a 4-bit length field and a 2**15-entry decoding table
# Guard on the decoder's output size, far above any real latent.
_MAX_ELEMENTS = 2**31


# ---------------------------------------------------------------------------------------------------------
# Shared pieces


def _choose_window(values: np.ndarray) -> tuple[int, int]:
    """Window [lo, lo+K) of width K <= 256 covering the most elements, trimmed to the values present.

    Sliding the window start over the distinct values is enough: a best window can always start at one.
    """
    distinct, counts = np.unique(values, return_counts=True)
    cum = np.concatenate(([0], np.cumsum(counts)))
    ends = np.searchsorted(distinct, distinct + MAX_ALPHABET, side="left")
    start = int(np.argmax(cum[ends] - cum[:-1]))  # first of the best: deterministic
    lo = int(distinct[start])
    return lo, int(distinct[ends[start] - 1]) - lo + 1


def _symbols(values: np.ndarray, lo: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Symbol of each value (index in the window, or K = ESCAPE) and the mask of escaped elements."""
    idx = values - lo
    escaped = (idx < 0) | (idx >= k)
    return np.where(escaped, k, idx), escaped


def _escape_offsets(values: np.ndarray, lo: int, k: int) -> np.ndarray:
    """Map escaped values (outside [lo, lo+K)) to non-negative offsets: even above, odd below."""
    above = values >= lo + k
    return np.where(above, 2 * (values - (lo + k)), 2 * (lo - 1 - values) + 1)


def _unescape(offsets: np.ndarray, lo: int, k: int) -> np.ndarray:
    """Inverse of `_escape_offsets`; rejects values outside the latent range."""
    e = offsets.astype(np.int64)
    values = np.where(e % 2 == 0, lo + k + (e >> 1), lo - 1 - (e >> 1))
    if values.size and (values.min() < -VALUE_BOUND or values.max() > VALUE_BOUND):
        raise CorruptStreamError(f"escaped latent value outside ±{VALUE_BOUND}")
    return values


def _write_window(lo: int, k: int) -> bytes:
    return write_svarint(lo) + bytes([k - 1])


def _read_window(body: bytes, offset: int) -> tuple[int, int, int]:
    """(lo, K, offset after), checked so that every window value is a legal latent value."""
    lo, offset = read_svarint(body, offset, VALUE_BOUND)
    if offset >= len(body):
        raise CorruptStreamError("truncated window header")
    k = body[offset] + 1
    if lo + k - 1 > VALUE_BOUND:
        raise CorruptStreamError(f"alphabet window [{lo}, {lo + k}) exceeds the latent range")
    return lo, k, offset + 1


# ---------------------------------------------------------------------------------------------------------
# Huffman


def limited_code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Optimal prefix-code lengths with every length <= max_length (package-merge), 0 for zero counts.

    Vectorised: each list item carries a row counting how often it holds each symbol, so packaging is a
    sum of row pairs; the stable sort keeps original items before packages of equal weight (deterministic).
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.size, dtype=np.int64)
    used = np.flatnonzero(counts > 0)
    m = used.size
    if m == 0:
        return lengths
    if m == 1:
        lengths[used] = 1  # a lone symbol still needs one bit so that the decoder advances
        return lengths
    if m > 2**max_length:
        raise ValueError(f"{m} symbols cannot have codes of at most {max_length} bits")
    order = used[np.argsort(counts[used], kind="stable")]
    item_weights = counts[order]
    item_rows = np.eye(m, dtype=np.int32)
    weights, rows = item_weights, item_rows
    for _ in range(max_length - 1):
        pairs = weights.size // 2
        packaged_w = weights[0 : 2 * pairs : 2] + weights[1 : 2 * pairs : 2]
        packaged_r = rows[0 : 2 * pairs : 2] + rows[1 : 2 * pairs : 2]
        weights = np.concatenate((item_weights, packaged_w))
        rows = np.concatenate((item_rows, packaged_r))
        ranks = np.argsort(weights, kind="stable")
        weights, rows = weights[ranks], rows[ranks]
    lengths[order] = rows[: 2 * m - 2].sum(axis=0)
    return lengths


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes (ordered by length, then symbol) for lengths that satisfy Kraft's inequality."""
    codes = np.zeros(lengths.size, dtype=np.uint64)
    code = 0
    for length in range(1, MAX_CODE_LENGTH + 1):
        syms = np.flatnonzero(lengths == length)
        codes[syms] = code + np.arange(syms.size, dtype=np.uint64)
        code = (code + syms.size) << 1
    return codes


def _encode_huffman(values: np.ndarray) -> bytes:
    lo, k = _choose_window(values)
    syms, escaped = _symbols(values, lo, k)
    lengths = limited_code_lengths(np.bincount(syms, minlength=k + 1))
    codes = _canonical_codes(lengths)
    sym_codes = codes[syms]
    sym_lengths = lengths[syms]
    if escaped.any():
        # The exp-Golomb offset rides in the same code word as its ESCAPE: <= 15 + 45 bits fits a uint64.
        eg_codes, eg_lengths = expgolomb_encode(_escape_offsets(values[escaped], lo, k))
        sym_codes[escaped] = (sym_codes[escaped] << eg_lengths.astype(np.uint64)) | eg_codes
        sym_lengths[escaped] += eg_lengths
    nibbles = np.zeros(2 * ((k + 2) // 2), dtype=np.uint8)
    nibbles[: k + 1] = lengths
    table = (nibbles[0::2] << 4) | nibbles[1::2]
    return _write_window(lo, k) + table.tobytes() + pack_bits(sym_codes, sym_lengths)


def _decoding_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tables indexed by the next 15 bits: the symbol and its code length (0 = no code starts so)."""
    used = np.flatnonzero(lengths > 0)
    if used.size == 0:
        raise CorruptStreamError("Huffman table has no symbols")
    spans = np.left_shift(1, MAX_CODE_LENGTH - lengths[used])
    filled = int(spans.sum())
    if filled > 1 << MAX_CODE_LENGTH:
        raise CorruptStreamError("Huffman code lengths violate Kraft's inequality")
    # Canonical codes are consecutive in (length, symbol) order, so their table ranges tile from 0 up.
    order = used[np.lexsort((used, lengths[used]))]
    spans = np.left_shift(1, MAX_CODE_LENGTH - lengths[order])
    table_sym = np.zeros(1 << MAX_CODE_LENGTH, dtype=np.int64)
    table_len = np.zeros(1 << MAX_CODE_LENGTH, dtype=np.int64)
    table_sym[:filled] = np.repeat(order, spans)
    table_len[:filled] = np.repeat(lengths[order], spans)
    return table_sym, table_len


def _decode_huffman(body: bytes, n: int) -> np.ndarray:
    lo, k, offset = _read_window(body, 0)
    table_bytes = (k + 2) // 2
    if offset + table_bytes > len(body):
        raise CorruptStreamError("truncated Huffman code-length table")
    packed = np.frombuffer(body, dtype=np.uint8, count=table_bytes, offset=offset)
    lengths = np.empty(2 * table_bytes, dtype=np.int64)
    lengths[0::2] = packed >> 4
    lengths[1::2] = packed & 15
    if lengths[k + 1 :].any():
        raise CorruptStreamError("non-zero padding nibble in Huffman code-length table")
    lengths = lengths[: k + 1]
    table_sym, table_len = _decoding_table(lengths)

    data = body[offset + table_bytes :]
    nbits = 8 * len(data)
    if nbits < n:  # every code is at least one bit
        raise CorruptStreamError(f"Huffman stream of {nbits} bits cannot hold {n} symbols")
    peeks = peek_windows(data, nbits, MAX_CODE_LENGTH)
    # One lookup per bit position, done in numpy; the loop below then only indexes Python lists.
    sym_at = table_sym[peeks].tolist()
    len_at = table_len[peeks].tolist()
    reader = BitReader(data, nbits)
    read_escape = reader.read_expgolomb
    out: list[int] = []
    append = out.append
    escape_offsets: list[int] = []
    pos = 0
    try:
        for _ in range(n):
            length = len_at[pos]
            if length == 0:
                raise CorruptStreamError(f"invalid Huffman code at bit {pos}")
            sym = sym_at[pos]
            pos += length
            if sym == k:
                reader.pos = pos
                escape_offsets.append(read_escape())
                pos = reader.pos
            append(sym)
    except IndexError:
        raise CorruptStreamError("Huffman stream truncated") from None
    if pos > nbits:
        raise CorruptStreamError("Huffman stream truncated")
    reader.pos = pos
    reader.check_padding()
    if reader.bytes_used() != len(data):
        raise CorruptStreamError("trailing bytes after Huffman stream")

    syms = np.array(out, dtype=np.int64)
    values = lo + syms
    if escape_offsets:
        values[syms == k] = _unescape(np.array(escape_offsets, dtype=np.uint64), lo, k)
    return values


# ---------------------------------------------------------------------------------------------------------
# ANS


def _ans_model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    # The one conversion from counts to probabilities, shared by encoder and decoder: any other rounding
    # would make the two disagree.
    probabilities = counts.astype(np.float64) / counts.sum()
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def _encode_ans(values: np.ndarray) -> bytes:
    lo, k = _choose_window(values)
    syms, escaped = _symbols(values, lo, k)
    counts = np.bincount(syms, minlength=k + 1)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(syms.astype(np.int32), _ans_model(counts))
    words = coder.get_compressed().astype("<u4")
    parts = [_write_window(lo, k)]
    parts += [write_uvarint(int(c)) for c in counts]
    parts += [write_uvarint(words.size), words.tobytes()]
    if escaped.any():
        parts.append(pack_bits(*expgolomb_encode(_escape_offsets(values[escaped], lo, k))))
    return b"".join(parts)


def _decode_ans(body: bytes, n: int) -> np.ndarray:
    lo, k, offset = _read_window(body, 0)
    counts = np.empty(k + 1, dtype=np.int64)
    for i in range(k + 1):
        counts[i], offset = read_uvarint(body, offset, limit=n)
    if int(counts.sum()) != n:
        raise CorruptStreamError(f"ANS histogram sums to {int(counts.sum())}, expected {n}")
    nwords, offset = read_uvarint(body, offset, limit=(len(body) - offset) // 4)
    words = np.frombuffer(body, dtype="<u4", count=nwords, offset=offset).astype(np.uint32)
    offset += 4 * nwords
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        syms = np.asarray(coder.decode(_ans_model(counts), n), dtype=np.int64)
        drained = coder.is_empty()
    except Exception as exc:  # constriction documents no error types; any failure here means bad data
        raise CorruptStreamError(f"ANS decoding failed: {exc}") from exc
    # An intact stream ends exactly empty and reproduces the transmitted histogram; damage rarely does.
    if not drained:
        raise CorruptStreamError("ANS stream has data left after the last symbol")
    if syms.size != n or not np.array_equal(np.bincount(syms, minlength=k + 1), counts):
        raise CorruptStreamError("decoded ANS symbols do not match the transmitted histogram")

    data = body[offset:]
    reader = BitReader(data)
    escape_offsets = reader.read_expgolomb_array(int(counts[k]))
    reader.check_padding()
    if reader.bytes_used() != len(data):
        raise CorruptStreamError("trailing bytes after ANS escape stream")
    values = lo + syms
    if escape_offsets.size:
        values[syms == k] = _unescape(escape_offsets, lo, k)
    return values


# ---------------------------------------------------------------------------------------------------------
# Public API

_ENCODERS = {METHOD_HUFFMAN: _encode_huffman, METHOD_ANS: _encode_ans}
_DECODERS = {METHOD_HUFFMAN: _decode_huffman, METHOD_ANS: _decode_ans}


def _channel_record(values: np.ndarray, method: int | None) -> bytes:
    if method is None and (values.size == 0 or values.min() == values.max()):
        return bytes([METHOD_CONSTANT]) + write_svarint(int(values[0]) if values.size else 0)
    if values.size == 0:
        # Forced methods have nothing to code; the constant record is the only valid one.
        return bytes([METHOD_CONSTANT]) + write_svarint(0)
    methods = (METHOD_HUFFMAN, METHOD_ANS) if method is None else (method,)
    best = b""
    for m in methods:
        body = _ENCODERS[m](values)
        record = bytes([m]) + write_uvarint(len(body)) + body
        if not best or len(record) < len(best):  # ties keep the lower method number
            best = record
    return best


def encode_latent(z: np.ndarray, *, method: int | None = None) -> bytes:
    """Entropy-code a latent of shape (C, H, W) with integer values in [-2**20, 2**20].

    `method` forces METHOD_HUFFMAN or METHOD_ANS on every non-empty channel (for tests and measurements);
    by default each channel takes the smallest of constant, Huffman and ANS.
    """
    z = np.asarray(z)
    if z.ndim != 3:
        raise ValueError(f"latent must be 3-D (C, H, W), got shape {z.shape}")
    if not np.issubdtype(z.dtype, np.integer):
        raise ValueError(f"latent must have an integer dtype, got {z.dtype}")
    if method is not None and method not in _ENCODERS:
        raise ValueError(f"method must be None, {METHOD_HUFFMAN} or {METHOD_ANS}, got {method}")
    # Range check before the cast to int64, which would wrap huge unsigned values.
    if z.size and (int(z.min()) < -VALUE_BOUND or int(z.max()) > VALUE_BOUND):
        raise ValueError(f"latent values must lie in [-{VALUE_BOUND}, {VALUE_BOUND}]")
    flat = z.reshape(z.shape[0], z.shape[1] * z.shape[2]).astype(np.int64)
    return b"".join(_channel_record(channel, method) for channel in flat)


def decode_latent(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """Decode a payload of `encode_latent` into an int32 array of `shape`.

    Raises CorruptStreamError for any payload that is damaged or does not match the shape.
    """
    if len(shape) != 3 or any(int(s) < 0 for s in shape):
        raise ValueError(f"shape must be three non-negative sizes, got {shape}")
    channels, height, width = (int(s) for s in shape)
    n = height * width
    if channels * n > _MAX_ELEMENTS:
        raise ValueError(f"latent shape {shape} is too large")
    data = bytes(data)
    out = np.empty((channels, n), dtype=np.int32)
    offset = 0
    for c in range(channels):
        if offset >= len(data):
            raise CorruptStreamError(f"latent payload truncated before channel {c}")
        method = data[offset]
        offset += 1
        if method == METHOD_CONSTANT:
            value, offset = read_svarint(data, offset, VALUE_BOUND)
            out[c] = value
            continue
        if method not in _DECODERS:
            raise CorruptStreamError(f"unknown latent coding method {method} in channel {c}")
        if n == 0:
            raise CorruptStreamError(f"channel {c} is empty but coded with method {method}")
        size, offset = read_uvarint(data, offset, limit=len(data))
        if offset + size > len(data):
            raise CorruptStreamError(f"channel {c} body of {size} bytes runs past the payload end")
        out[c] = _DECODERS[method](data[offset : offset + size], n)
        offset += size
    if offset != len(data):
        raise CorruptStreamError(f"{len(data) - offset} trailing bytes after the last latent channel")
    return out.reshape(channels, height, width)
