"""The `.lvp` container: header, descriptor, chunk table (see docs/bitstream.md).  No torch here:
the service parses headers (to catalogue, scrub and rebuild) without loading any model.

Every version ever written stays readable: :func:`parse_header` dispatches on the version field,
and a new layout gets a new version number and a new parser next to the old one.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum

from lvpnet.errors import CorruptStreamError, UnsupportedInputError, UnsupportedStreamError

MAGIC = b"\x89LVP\r\n\x1a\n"
# 2: plane records may also be JPEG-LS or JPEG XL codestreams (per-tile classical choice).  A
# stream without such planes is still written as version 1, which every reader takes.
# 3: the header also carries a single-image adaptation (a weight delta for the model, see
# lvpnet/model/adaptation.py); written only for streams that have one.
FORMAT_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
#: largest adaptation payload a reader accepts (the default model's whole delta is a few KB)
MAX_ADAPTATION_BYTES = 1 << 20

#: decompression-bomb guard: refuse streams describing more samples than this before allocating
DEFAULT_MAX_SAMPLES = 1 << 30
MAX_DIMENSION = 1 << 20
MAX_TILE_SIZE = 65528  # the largest multiple of 8 the u16 field holds


class DType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3

    @property
    def numpy_name(self) -> str:
        return {0: "uint8", 1: "int8", 2: "uint16", 3: "int16"}[int(self)]

    @property
    def itemsize(self) -> int:
        return 1 if self in (DType.UINT8, DType.INT8) else 2

    @classmethod
    def from_numpy(cls, name: str) -> DType:
        lookup = {"uint8": cls.UINT8, "int8": cls.INT8, "uint16": cls.UINT16, "int16": cls.INT16}
        if name not in lookup:
            raise UnsupportedInputError(f"dtype {name} is not supported (uint8, int8, uint16, int16)")
        return lookup[name]


class Color(IntEnum):
    PLANES = 0  # samples coded as independent channels
    MONOCHROME = 1
    RGB = 2  # coded after the reversible colour transform of JPEG 2000


class Layout(IntEnum):
    """Which axes the caller's array had, so decompress returns the same shape."""

    ROWS_COLS = 0
    FRAMES_ROWS_COLS = 1
    ROWS_COLS_SAMPLES = 2
    FRAMES_ROWS_COLS_SAMPLES = 3


@dataclass(frozen=True)
class Descriptor:
    rows: int
    cols: int
    frames: int
    samples: int
    dtype: DType
    bits_stored: int
    color: Color
    layout: Layout
    tile_size: int

    @property
    def sample_count(self) -> int:
        return self.rows * self.cols * self.frames * self.samples

    @property
    def raw_nbytes(self) -> int:
        return self.sample_count * self.dtype.itemsize

    @property
    def tiles_down(self) -> int:
        return -(-self.rows // self.tile_size)

    @property
    def tiles_across(self) -> int:
        return -(-self.cols // self.tile_size)

    @property
    def tiles_per_frame(self) -> int:
        return self.tiles_down * self.tiles_across

    def tile_rect(self, index: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of tile `index` within a frame (row-major tile order)."""
        ty, tx = divmod(index, self.tiles_across)
        top, left = ty * self.tile_size, tx * self.tile_size
        return top, left, min(self.tile_size, self.rows - top), min(self.tile_size, self.cols - left)

    def shape(self) -> tuple[int, ...]:
        return {
            Layout.ROWS_COLS: (self.rows, self.cols),
            Layout.FRAMES_ROWS_COLS: (self.frames, self.rows, self.cols),
            Layout.ROWS_COLS_SAMPLES: (self.rows, self.cols, self.samples),
            Layout.FRAMES_ROWS_COLS_SAMPLES: (self.frames, self.rows, self.cols, self.samples),
        }[self.layout]


@dataclass(frozen=True)
class Chunk:
    offset: int  # from the start of the payload (the byte after the header)
    length: int
    crc32: int


@dataclass
class Header:
    codec_id: str
    weights_sha256: bytes
    coder_version: str
    descriptor: Descriptor
    raw_sha256: bytes
    frame_sha256: list[bytes]
    chunks: list[Chunk] = field(default_factory=list)
    header_length: int = 0  # bytes, set by parse/pack
    version: int = FORMAT_VERSION
    adaptation: bytes = b""  # version 3: the model's per-stream weight delta (empty: none)

    def frame_chunks(self, frame: int) -> range:
        per = self.descriptor.tiles_per_frame
        return range(frame * per, (frame + 1) * per)


_FIXED = struct.Struct("<8sHHI")  # magic, version, flags, header length (whole header incl. CRC)
_DESCRIPTOR = struct.Struct("<IIIBBBBBBH")
_CHUNK = struct.Struct("<QII")


def _pack_str(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack("<H", len(data)) + data


def pack_header(header: Header) -> bytes:
    d = header.descriptor
    if len(header.frame_sha256) != d.frames or len(header.chunks) != d.frames * d.tiles_per_frame:
        raise ValueError("header frame/chunk tables do not match the descriptor")
    body = b"".join(
        [
            _pack_str(header.codec_id),
            header.weights_sha256,
            _pack_str(header.coder_version),
            _DESCRIPTOR.pack(
                d.rows, d.cols, d.frames, d.samples, d.dtype, d.bits_stored, d.color, d.layout, 0, d.tile_size
            ),
            header.raw_sha256,
            *header.frame_sha256,
            struct.pack("<I", len(header.chunks)),
            *(_CHUNK.pack(c.offset, c.length, c.crc32) for c in header.chunks),
        ]
    )
    if header.version not in SUPPORTED_VERSIONS:
        raise ValueError(f"cannot write format version {header.version}")
    if header.version >= 3:
        if len(header.adaptation) > MAX_ADAPTATION_BYTES:
            raise ValueError("adaptation payload too large")
        body += struct.pack("<I", len(header.adaptation)) + header.adaptation
    elif header.adaptation:
        raise ValueError(f"format version {header.version} cannot carry an adaptation")
    total = _FIXED.size + len(body) + 4
    head = _FIXED.pack(MAGIC, header.version, 0, total) + body
    return head + struct.pack("<I", zlib.crc32(head))


class _Reader:
    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start, end

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise CorruptStreamError(f"header truncated while reading {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[int, ...]:
        return fmt.unpack(self.take(fmt.size, what))

    def string(self, what: str) -> str:
        (n,) = struct.unpack("<H", self.take(2, what))
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptStreamError(f"{what} is not UTF-8") from exc


def parse_header(data: bytes, *, max_samples: int = DEFAULT_MAX_SAMPLES) -> Header:
    """Parse and validate a stream's header; sizes are checked before anything is allocated."""
    if len(data) < _FIXED.size:
        raise CorruptStreamError("stream too short to be an LVPNet stream")
    magic, version, _flags, total = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise CorruptStreamError("not an LVPNet stream (bad magic)")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedStreamError(
            f"stream format version {version} is not supported by this reader (knows {SUPPORTED_VERSIONS})"
        )
    if total < _FIXED.size + 4 or total > len(data):
        raise CorruptStreamError(f"header length {total} inconsistent with stream length {len(data)}")
    (crc,) = struct.unpack_from("<I", data, total - 4)
    if zlib.crc32(data[: total - 4]) != crc:
        raise CorruptStreamError("header CRC mismatch")
    # Versions 1 and 2 share the header layout (2 only allows more plane modes in the chunks); 3
    # appends the adaptation after the chunk table
    return _parse_v1(data, total, max_samples, version)


def _parse_v1(data: bytes, total: int, max_samples: int, version: int) -> Header:
    r = _Reader(data, _FIXED.size, total - 4)
    codec_id = r.string("codec id")
    weights_sha = r.take(32, "weights SHA-256")
    coder_version = r.string("coder version")
    rows, cols, frames, samples, dtype, bits, color, layout, _reserved, tile = r.unpack(_DESCRIPTOR, "descriptor")
    try:
        descriptor = Descriptor(rows, cols, frames, samples, DType(dtype), bits, Color(color), Layout(layout), tile)
    except ValueError as exc:
        raise CorruptStreamError(f"invalid descriptor field: {exc}") from exc
    _check_descriptor(descriptor, max_samples)
    raw_sha = r.take(32, "raw SHA-256")
    frame_sha = [r.take(32, "frame SHA-256") for _ in range(frames)]
    (n_chunks,) = struct.unpack("<I", r.take(4, "chunk count"))
    if n_chunks != frames * descriptor.tiles_per_frame:
        raise CorruptStreamError(f"{n_chunks} chunks for {frames} frames of {descriptor.tiles_per_frame} tiles")
    payload_length = len(data) - total
    chunks = []
    expected_offset = 0
    for _ in range(n_chunks):
        offset, length, crc = r.unpack(_CHUNK, "chunk table")
        if offset != expected_offset or offset + length > payload_length:
            raise CorruptStreamError("chunk table inconsistent with the payload")
        expected_offset = offset + length
        chunks.append(Chunk(offset, length, crc))
    if expected_offset != payload_length:
        raise CorruptStreamError(f"payload has {payload_length - expected_offset} bytes beyond the last chunk")
    adaptation = b""
    if version >= 3:
        (n,) = struct.unpack("<I", r.take(4, "adaptation length"))
        if n > MAX_ADAPTATION_BYTES:
            raise CorruptStreamError(f"adaptation of {n} bytes (a reader takes at most {MAX_ADAPTATION_BYTES})")
        adaptation = r.take(n, "adaptation")
    if r.pos != r.end:
        raise CorruptStreamError("unexpected bytes at the end of the header")
    return Header(
        codec_id, weights_sha, coder_version, descriptor, raw_sha, frame_sha, chunks, total, version, adaptation
    )


def _check_descriptor(d: Descriptor, max_samples: int) -> None:
    if not (1 <= d.rows <= MAX_DIMENSION and 1 <= d.cols <= MAX_DIMENSION and d.frames >= 1):
        raise CorruptStreamError(f"implausible dimensions {d.rows}x{d.cols}x{d.frames}")
    if d.samples not in (1, 3):
        raise CorruptStreamError(f"unsupported samples per pixel {d.samples}")
    if not 1 <= d.bits_stored <= 8 * d.dtype.itemsize:
        raise CorruptStreamError(f"bits stored {d.bits_stored} does not fit {d.dtype.numpy_name}")
    if d.tile_size < 8 or d.tile_size % 8:
        raise CorruptStreamError(f"invalid tile size {d.tile_size}")
    if d.sample_count > max_samples:
        raise UnsupportedStreamError(
            f"stream describes {d.sample_count} samples, over this reader's limit of {max_samples}"
        )


def check_chunk(data: bytes, header: Header, index: int) -> bytes:
    """The payload bytes of chunk `index`, CRC-checked."""
    chunk = header.chunks[index]
    start = header.header_length + chunk.offset
    body = data[start : start + chunk.length]
    if zlib.crc32(body) != chunk.crc32:
        raise CorruptStreamError(f"chunk {index} CRC mismatch")
    return bytes(body)


def sha256(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()
