"""Bit-level helpers shared by the entropy coders.

Bit streams are MSB-first: the first bit written is the most significant bit of the first byte, and the
last byte is padded with zero bits. Writing is vectorised with numpy (no Python loop per symbol);
reading is a small cursor (`BitReader`) that decodes one value per call.

Also here: LEB128 unsigned varints and zig-zag mapping of signed integers, used for small headers.
"""

from __future__ import annotations

import numpy as np

from lvpnet.errors import CorruptStreamError

# A code packed by `pack_bits` is held in one uint64.
MAX_CODE_BITS = 64
# Exp-Golomb code of u is 2*bitlen(u+1)-1 bits; u+1 < 2**32 keeps it within 63 bits.
MAX_EXPGOLOMB_VALUE = 2**32 - 2
# Longest zero prefix a reader accepts: the matching value reaches MAX_EXPGOLOMB_VALUE, no further.
_MAX_EG_PREFIX = 31
# Widest window `peek_windows` builds from a 32-bit word at a byte offset (32 - 7 bits of offset).
MAX_PEEK_BITS = 25
# A varint longer than this is corrupt: 10 bytes hold any 64-bit value.
_MAX_VARINT_BYTES = 10


def bit_length(values: np.ndarray) -> np.ndarray:
    """Exact `int.bit_length` of each element of a uint64 array (0 for 0), as int64.

    Binary search on integers instead of log2: float64 rounds 2**k - 1 up to k bits for k > 52.
    """
    x = np.asarray(values, dtype=np.uint64).copy()
    n = np.zeros(x.shape, dtype=np.int64)
    for s in (32, 16, 8, 4, 2, 1):
        big = x >= np.uint64(1 << s)
        n[big] += s
        x[big] >>= np.uint64(s)
    return n + (x > 0)


def pack_bits(codes: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate variable-length codes MSB-first into bytes, zero-padding the last byte.

    `codes[i]` holds its `lengths[i]` (0..64) low bits; higher bits are ignored. Vectorised: every output bit
    is gathered from its code by a repeat and a shift, then `np.packbits` builds the bytes.
    """
    codes = np.asarray(codes, dtype=np.uint64).ravel()
    lengths = np.asarray(lengths, dtype=np.int64).ravel()
    if codes.shape != lengths.shape:
        raise ValueError(f"codes and lengths differ in size: {codes.size} != {lengths.size}")
    if lengths.size and (lengths.min() < 0 or lengths.max() > MAX_CODE_BITS):
        raise ValueError(f"code lengths must lie in [0, {MAX_CODE_BITS}]")
    total = int(lengths.sum())
    if total == 0:
        return b""
    ends = np.cumsum(lengths)
    # Offset of each output bit within its own code, counted from the code's first (most significant) bit.
    within = np.arange(total, dtype=np.int64) - np.repeat(ends - lengths, lengths)
    shifts = (np.repeat(lengths, lengths) - 1 - within).astype(np.uint64)
    bits = (np.repeat(codes, lengths) >> shifts) & np.uint64(1)
    return np.packbits(bits.astype(np.uint8)).tobytes()


def expgolomb_encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order-0 exp-Golomb codes of non-negative integers: (codes as uint64, lengths as int64).

    u is written as bitlen(u+1)-1 zero bits followed by the binary digits of u+1.
    """
    v = np.asarray(values)
    if v.size and (int(v.min()) < 0 or int(v.max()) > MAX_EXPGOLOMB_VALUE):
        raise ValueError(f"exp-Golomb values must lie in [0, {MAX_EXPGOLOMB_VALUE}]")
    codes = v.astype(np.uint64).ravel() + np.uint64(1)
    return codes, 2 * bit_length(codes) - 1


def expgolomb_k_lengths(values: np.ndarray, k: int) -> np.ndarray:
    """Code lengths of the order-k exp-Golomb codes of non-negative integers (see `expgolomb_k_encode`)."""
    high = np.asarray(values, dtype=np.uint64).ravel() >> np.uint64(k)
    return 2 * bit_length(high + np.uint64(1)) - 1 + k


def expgolomb_k_encode(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Order-k exp-Golomb codes: the order-0 code of u >> k, then the k low bits of u.

    Values must keep `u >> k` within `MAX_EXPGOLOMB_VALUE` and the whole code within 64 bits.
    """
    if not 0 <= k <= 31:
        raise ValueError("exp-Golomb order must lie in [0, 31]")
    v = np.asarray(values, dtype=np.uint64).ravel()
    codes, lengths = expgolomb_encode(v >> np.uint64(k))
    if lengths.size and int(lengths.max()) + k > MAX_CODE_BITS:
        raise ValueError("exp-Golomb code longer than 64 bits")
    low = v & np.uint64((1 << k) - 1)
    return (codes << np.uint64(k)) | low, lengths + k


def peek_windows(data: bytes | memoryview, nbits: int, width: int) -> np.ndarray:
    """For every bit position p < nbits, the `width` bits starting at p (zeros past the end), as int64.

    Lets a table-driven decoder look up the code at any position with one list index.
    """
    if not 1 <= width <= MAX_PEEK_BITS:
        raise ValueError(f"peek width must lie in [1, {MAX_PEEK_BITS}]")
    nbytes = (nbits + 7) // 8
    buf = np.zeros(nbytes + 4, dtype=np.uint32)
    buf[:nbytes] = np.frombuffer(data, dtype=np.uint8, count=nbytes)
    # Big-endian 32-bit word starting at each byte: covers 7 bits of offset plus up to 25 peeked bits.
    words = (buf[:-3] << 24) | (buf[1:-2] << 16) | (buf[2:-1] << 8) | buf[3:]
    pos = np.arange(nbits, dtype=np.int64)
    shift = (32 - width - (pos & 7)).astype(np.uint32)
    return ((words[pos >> 3] >> shift) & np.uint32((1 << width) - 1)).astype(np.int64)


class BitReader:
    """MSB-first reader over `nbits` bits of `data`; every overrun raises CorruptStreamError."""

    def __init__(self, data: bytes | memoryview, nbits: int | None = None) -> None:
        raw = bytes(data)
        if nbits is None:
            nbits = 8 * len(raw)
        if not 0 <= nbits <= 8 * len(raw):
            raise ValueError(f"nbits {nbits} outside [0, {8 * len(raw)}]")
        # Zero padding so that a 9-byte window can be sliced at any position without a bounds check.
        self._buf = raw + bytes(9)
        self.nbits = nbits
        self.pos = 0

    def read_bits(self, k: int) -> int:
        """Read k (0..57) bits as an unsigned integer."""
        if not 0 <= k <= 57:
            raise ValueError("read_bits reads 0..57 bits at a time")
        pos = self.pos
        if pos + k > self.nbits:
            raise CorruptStreamError(f"bit stream truncated: need {k} bits at {pos}, have {self.nbits}")
        b = pos >> 3
        window = int.from_bytes(self._buf[b : b + 8], "big")
        self.pos = pos + k
        return (window >> (64 - (pos & 7) - k)) & ((1 << k) - 1)

    def read_expgolomb(self) -> int:
        """Read one order-0 exp-Golomb value."""
        pos = self.pos
        b = pos >> 3
        avail = 72 - (pos & 7)  # bits from pos to the end of the 9-byte window, at least 65
        window = int.from_bytes(self._buf[b : b + 9], "big") & ((1 << avail) - 1)
        zeros = avail - window.bit_length()
        if zeros > _MAX_EG_PREFIX:
            raise CorruptStreamError(f"exp-Golomb prefix longer than {_MAX_EG_PREFIX} bits at bit {pos}")
        n = 2 * zeros + 1
        if pos + n > self.nbits:
            raise CorruptStreamError(f"bit stream truncated inside an exp-Golomb code at bit {pos}")
        self.pos = pos + n
        return (window >> (avail - n)) - 1

    def read_expgolomb_k(self, k: int) -> int:
        """Read one order-k exp-Golomb value (see `expgolomb_k_encode`)."""
        high = self.read_expgolomb()
        return (high << k) | self.read_bits(k)

    def read_expgolomb_array(self, n: int) -> np.ndarray:
        """Read n exp-Golomb values as a uint64 array."""
        if n < 0:
            raise ValueError("n must be non-negative")
        # Each code is at least one bit: refuse before allocating for a count the stream cannot hold.
        if n > self.nbits - self.pos:
            raise CorruptStreamError(f"{n} exp-Golomb values cannot fit in {self.nbits - self.pos} bits")
        read = self.read_expgolomb
        return np.array([read() for _ in range(n)], dtype=np.uint64)

    def bytes_used(self) -> int:
        """Bytes touched so far (the last one possibly partly)."""
        return (self.pos + 7) // 8

    def check_padding(self) -> None:
        """Require the bits after `pos` up to the next byte boundary to be zero, as the writer leaves them."""
        pad = min(-self.pos % 8, self.nbits - self.pos)
        if pad > 0:
            pos = self.pos
            bits = self.read_bits(pad)
            self.pos = pos  # a check only: the cursor stays where the data ended
            if bits:
                raise CorruptStreamError("non-zero padding bits after bit stream")


def zigzag(value: int) -> int:
    """Map a signed integer to unsigned: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    return 2 * value if value >= 0 else -2 * value - 1


def unzigzag(value: int) -> int:
    """Inverse of `zigzag`."""
    return value >> 1 if value % 2 == 0 else -(value >> 1) - 1


def write_uvarint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, least significant group first, high bit = more follows."""
    if value < 0:
        raise ValueError("uvarint value must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_uvarint(data: bytes | memoryview, offset: int, limit: int = 2**64 - 1) -> tuple[int, int]:
    """Read an unsigned LEB128 at `offset`: (value, offset after it). Values above `limit` are corrupt."""
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if offset + i >= len(data):
            raise CorruptStreamError(f"truncated varint at byte {offset}")
        byte = data[offset + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if value > limit:
                raise CorruptStreamError(f"varint {value} at byte {offset} exceeds {limit}")
            return value, offset + i + 1
    raise CorruptStreamError(f"varint longer than {_MAX_VARINT_BYTES} bytes at byte {offset}")


def write_svarint(value: int) -> bytes:
    """Signed integer as zig-zag then unsigned LEB128."""
    return write_uvarint(zigzag(value))


def read_svarint(data: bytes | memoryview, offset: int, bound: int = 2**62) -> tuple[int, int]:
    """Read a zig-zag LEB128 signed integer with |value| <= bound: (value, offset after it)."""
    raw, end = read_uvarint(data, offset, limit=2 * bound)
    value = unzigzag(raw)
    if abs(value) > bound:
        raise CorruptStreamError(f"signed varint {value} at byte {offset} exceeds ±{bound}")
    return value, end
