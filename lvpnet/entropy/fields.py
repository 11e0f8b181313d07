"""Vectorised packing of fixed-length bit fields whose lengths both sides know in advance.

Used for the raw low bits of wide pixel distributions and for escaped residuals (a 5-bit
length prefix per value, then the value bits), so neither side loops per sample in Python.
Bits are written MSB-first within each field, fields back to back, the last byte zero-padded.
"""

from __future__ import annotations

import numpy as np

from lvpnet.entropy.bits import bit_length, pack_bits
from lvpnet.errors import CorruptStreamError

MAX_FIELD_BITS = 32


def pack_fields(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate `values[i]` written in `lengths[i]` bits (0 <= values < 2**lengths)."""
    return pack_bits(values, lengths)


def unpack_fields(data: bytes, lengths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_fields`; raises CorruptStreamError if `data` is too short."""
    lengths = np.asarray(lengths, dtype=np.int64).ravel()
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(len(lengths), dtype=np.uint64)
    if len(data) * 8 < total:
        raise CorruptStreamError(f"raw bit field needs {total} bits, stream has {len(data) * 8}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=total).astype(np.uint64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    position_in_field = np.arange(total) - starts[owner]
    shift = (lengths[owner] - 1 - position_in_field).astype(np.uint64)
    values = np.zeros(len(lengths), dtype=np.uint64)
    np.add.at(values, owner, bits << shift)
    return values


def pack_escapes(values: np.ndarray) -> bytes:
    """Non-negative integers < 2**32: 5-bit bit-length prefixes for all, then all value bits."""
    values = np.asarray(values, dtype=np.uint64).ravel()
    if len(values) == 0:
        return b""
    nbits = bit_length(values)
    prefix = pack_fields(nbits, np.full(len(values), 6))
    return prefix + pack_fields(values, nbits)


def unpack_escapes(data: bytes, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    prefix_bytes = (count * 6 + 7) // 8
    nbits = unpack_fields(data[:prefix_bytes], np.full(count, 6)).astype(np.int64)
    if nbits.max(initial=0) > MAX_FIELD_BITS:
        raise CorruptStreamError("escape value wider than 32 bits")
    return unpack_fields(data[prefix_bytes:], nbits)
