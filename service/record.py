"""The archive record: one content-addressed object per archived instance.

    MAGIC (8) | header length (u32 LE) | header (UTF-8 JSON) | section bytes, in header order

kind "split": sections head (bytes before the pixel values, zstd), pixels (the codec chosen),
tail (everything after the pixel values: pad byte, trailing elements, zstd); the header holds the
array description `write_native_pixel_bytes` needs to turn decoded values back into bytes.
kind "whole": one section, the file itself (zstd or as received).

Self-describing on purpose: the objects alone, without the catalog, give every file back.
Parsing needs no torch; decoding an "lvpnet" section does (the worker's business).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import zstandard

MAGIC = b"\x89LVPARC\n"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
ZSTD_LEVEL = 19


class RecordError(ValueError):
    pass


@dataclass
class Section:
    name: str
    codec: str
    data: bytes


@dataclass
class Record:
    kind: str  # split | whole
    original_sha256: str
    original_bytes: int
    sections: list[Section]
    pixels: dict[str, Any] = field(default_factory=dict)  # split only

    def section(self, name: str) -> Section:
        for section in self.sections:
            if section.name == name:
                return section
        raise RecordError(f"record has no {name} section")

    @property
    def codec(self) -> str:
        """The label the catalog shows: the pixel codec, or how the whole file is kept."""
        if self.kind == "split":
            return self.section("pixels").codec
        return "as-received" if self.sections[0].codec == "identity" else "file-zstd"


def pack_record(record: Record) -> bytes:
    header = {
        "format": FORMAT_VERSION,
        "kind": record.kind,
        "original_sha256": record.original_sha256,
        "original_bytes": record.original_bytes,
        "pixels": record.pixels,
        "sections": [{"name": s.name, "codec": s.codec, "length": len(s.data)} for s in record.sections],
    }
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(encoded)), encoded, *(s.data for s in record.sections)])


def parse_record(data: bytes) -> Record:
    if len(data) < 12 or data[:8] != MAGIC:
        raise RecordError("not an archive record")
    (length,) = struct.unpack_from("<I", data, 8)
    if length > MAX_HEADER_BYTES or 12 + length > len(data):
        raise RecordError("truncated record header")
    try:
        header = json.loads(data[12 : 12 + length])
    except ValueError as exc:
        raise RecordError("corrupt record header") from exc
    if header.get("format") != FORMAT_VERSION:
        raise RecordError(f"unsupported record format {header.get('format')!r}")
    offset, sections = 12 + length, []
    for entry in header["sections"]:
        end = offset + int(entry["length"])
        if end > len(data):
            raise RecordError("truncated record section")
        sections.append(Section(entry["name"], entry["codec"], data[offset:end]))
        offset = end
    if offset != len(data):
        raise RecordError("trailing bytes after the record's sections")
    return Record(header["kind"], header["original_sha256"], int(header["original_bytes"]), sections, header["pixels"])


def zstd_compress(data: bytes, level: int = ZSTD_LEVEL) -> bytes:
    # The frame checksum makes a damaged section fail in zstd, before the SHA-256 check of the whole
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True).compress(data)


def zstd_decompress(data: bytes, limit: int) -> bytes:
    out = zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
    if len(out) > limit:
        raise RecordError("section larger than announced")
    return out


def decode_bytes_section(section: Section, limit: int) -> bytes:
    """Sections holding bytes (head, tail, whole file)."""
    if section.codec == "identity":
        return section.data
    if section.codec == "zstd":
        return zstd_decompress(section.data, limit)
    raise RecordError(f"unknown byte codec {section.codec!r}")


def smallest_bytes_section(name: str, data: bytes, level: int = ZSTD_LEVEL) -> Section:
    compressed = zstd_compress(data, level)
    if len(compressed) < len(data):
        return Section(name, "zstd", compressed)
    return Section(name, "identity", data)


def object_key(record_bytes_sha256: str) -> str:
    """Content-addressed: the same record is stored once, and a key never names two contents."""
    h = record_bytes_sha256
    return f"objects/{h[:2]}/{h[2:4]}/{h}.lva"
