"""A seeded mutator of DICOM Part 10 files, for fuzzing the C-STORE SCP and STOW-RS.

Every input is a function of (seed, index): `DicomMutator(seed).make(index)` rebuilds it, so a
failure is replayed from its index alone.  Each input gets its own Study/Series/SOP Instance UIDs
(same length as the base's placeholders, so no length field moves), then one mutation:

* generic damage: bit flips (anywhere, or in element headers), truncations, splices;
* element structure: length fields changed (0, odd, off by a few, past the end, 0xFFFFFFFF where
  undefined lengths are not allowed), VR bytes replaced by other VRs or junk;
* image description: huge or zero Rows, Columns, NumberOfFrames, BitsAllocated, SamplesPerPixel;
  PixelData shorter or longer than the description says;
* file meta: a bad, unknown or mismatched Transfer Syntax UID (over C-STORE: the data set sent
  under a presentation context of another transfer syntax), a damaged meta group;
* identity: SOP Instance/Class, Study, Series UIDs removed, emptied or malformed; a SOP class or
  instance that differs between the command (or file meta) and the data set;
* deep nested sequences (defined and undefined lengths, delimiters missing);
* encapsulated pixel data with broken fragments, offset tables, delimiters; native pixel data
  wrapped as encapsulated and the reverse;
* objects over the size limit; and untouched controls (must be stored).

`oracle()` says, independently of the archive's code, whether what the archive received is a valid
storable instance ("valid"), clearly not ("invalid"), or a matter of policy ("either").
"""

from __future__ import annotations

import io
import random
import re
import struct
import warnings
from dataclasses import dataclass, field
from functools import cache

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from tests.reliability.fuzzing import flip_bits, splice, truncate

UID_ROOT = "1.2.826.0.1.3680043.8.498.77"
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF
# Tags
SOP_CLASS, SOP_INSTANCE, STUDY, SERIES = 0x00080016, 0x00080018, 0x0020000D, 0x0020000E
ROWS, COLUMNS, FRAMES, SAMPLES = 0x00280010, 0x00280011, 0x00280008, 0x00280002
BITS_ALLOCATED, BITS_STORED, HIGH_BIT, PIXEL_REPRESENTATION = 0x00280100, 0x00280101, 0x00280102, 0x00280103
CONTENT_SEQUENCE = 0x0040A730
META_SOP_CLASS, META_SOP_INSTANCE, META_SYNTAX = 0x00020002, 0x00020003, 0x00020010
# The transfer syntaxes the fuzzer negotiates per SOP class (one presentation context each)
SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEG2000Lossless,
)
# pydicom's bundled test files used as bases (small; JPEG, RLE, JPEG 2000, big endian, RGB, multi-frame)
PYDICOM_FILES = (
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "SC_rgb_small_odd.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm",
    "MR_small_jp2klossless.dcm",
    "emri_small.dcm",
    "rtplan.dcm",
)
# The archive's documented limit on sequence nesting (service.dicomfile.MAX_SEQUENCE_DEPTH)
MAX_DEPTH = 64
UID_PATTERN = re.compile(r"^[0-9A-Za-z]+([. ][0-9A-Za-z]+)*$")

KINDS: dict[str, float] = {
    "control": 3,
    "flip": 10,
    "flip-header": 8,
    "truncate": 6,
    "truncate-element": 4,
    "splice": 4,
    "length": 10,
    "undefined-length": 5,
    "vr": 9,
    "dimensions": 10,
    "pixel-length": 6,
    "transfer-syntax": 6,
    "meta": 3,
    "missing-uid": 5,
    "bad-uid": 4,
    "uid-mismatch": 2,
    "deep-sequence": 4,
    "encapsulated": 7,
    "oversize": 0.5,
}


# ------------------------------------------------------------------------------ element walking


@dataclass(frozen=True)
class Element:
    tag: int
    vr: bytes  # b"" for items/delimiters and implicit VR
    offset: int  # of the header, in the data set bytes
    length_offset: int
    length_size: int  # 2 or 4
    value_offset: int
    length: int  # as encoded (may be UNDEFINED)
    end: int  # offset just past the element (past the delimiter for undefined lengths)
    depth: int
    fragment: bool = False  # an item of encapsulated pixel data


def walk(data: bytes, implicit: bool, little: bool) -> list[Element]:
    """Every element header in an (undamaged) encoded data set, nested ones and fragments too."""
    out: list[Element] = []
    _walk(data, 0, len(data), implicit, little, 0, out)
    return out


def _unpack(fmt: str, data: bytes, offset: int, little: bool) -> tuple[int, ...]:
    return struct.unpack_from(("<" if little else ">") + fmt, data, offset)


def _walk(data: bytes, start: int, stop: int, implicit: bool, little: bool, depth: int, out: list[Element]) -> int:
    """Elements from `start` to `stop` (or to the item delimiter); returns the offset reached."""
    offset = start
    while offset + 8 <= stop:
        group, element = _unpack("HH", data, offset, little)
        tag = group << 16 | element
        if tag in (ITEM_END, SEQ_END):
            return offset
        if implicit:
            (length,) = _unpack("I", data, offset + 4, little)
            vr = b""
            length_offset, length_size, value = offset + 4, 4, offset + 8
        else:
            vr = data[offset + 4 : offset + 6]
            if vr in LONG_VRS:
                (length,) = _unpack("I", data, offset + 8, little)
                length_offset, length_size, value = offset + 8, 4, offset + 12
            else:
                (length,) = _unpack("H", data, offset + 6, little)
                length_offset, length_size, value = offset + 6, 2, offset + 8
        is_sequence = vr == b"SQ" or (implicit and _dictionary_vr(tag) == "SQ")
        index = len(out)
        out.append(Element(tag, vr, offset, length_offset, length_size, value, length, 0, depth))
        if tag == PIXEL_DATA and length == UNDEFINED:
            end = _walk_fragments(data, value, little, depth + 1, out)
        elif is_sequence:
            end = _walk_items(data, value, length, implicit, little, depth + 1, out)
        elif length == UNDEFINED:
            raise ValueError("undefined length on a value")
        else:
            end = value + length
        if end > stop:
            raise ValueError("element runs past its container")
        out[index] = Element(tag, vr, offset, length_offset, length_size, value, length, end, depth)
        offset = end
    return offset


def _walk_items(
    data: bytes, start: int, length: int, implicit: bool, little: bool, depth: int, out: list[Element]
) -> int:
    stop = len(data) if length == UNDEFINED else start + length
    offset = start
    while offset + 8 <= stop:
        group, element = _unpack("HH", data, offset, little)
        (item_length,) = _unpack("I", data, offset + 4, little)
        tag = group << 16 | element
        if tag == SEQ_END:
            out.append(Element(tag, b"", offset, offset + 4, 4, offset + 8, 0, offset + 8, depth))
            return offset + 8
        if tag != ITEM:
            raise ValueError("not an item")
        index = len(out)
        out.append(Element(tag, b"", offset, offset + 4, 4, offset + 8, item_length, 0, depth))
        if item_length == UNDEFINED:
            inner = _walk(data, offset + 8, len(data), implicit, little, depth + 1, out)
            if _unpack("HH", data, inner, little) != (0xFFFE, 0xE00D) if inner + 8 <= len(data) else True:
                raise ValueError("item without its delimiter")
            out.append(Element(ITEM_END, b"", inner, inner + 4, 4, inner + 8, 0, inner + 8, depth))
            end = inner + 8
        else:
            _walk(data, offset + 8, offset + 8 + item_length, implicit, little, depth + 1, out)
            end = offset + 8 + item_length
        out[index] = Element(tag, b"", offset, offset + 4, 4, offset + 8, item_length, end, depth)
        offset = end
    if length == UNDEFINED or offset != stop:
        raise ValueError("sequence without its delimiter, or items that do not fill it")
    return offset


def _walk_fragments(data: bytes, start: int, little: bool, depth: int, out: list[Element]) -> int:
    offset = start
    while offset + 8 <= len(data):
        group, element = _unpack("HH", data, offset, little)
        (length,) = _unpack("I", data, offset + 4, little)
        tag = group << 16 | element
        if tag == SEQ_END:
            out.append(Element(tag, b"", offset, offset + 4, 4, offset + 8, 0, offset + 8, depth, True))
            return offset + 8
        if tag != ITEM or length == UNDEFINED or offset + 8 + length > len(data):
            raise ValueError("malformed fragment")
        out.append(Element(tag, b"", offset, offset + 4, 4, offset + 8, length, offset + 8 + length, depth, True))
        offset += 8 + length
    raise ValueError("encapsulated pixel data without its delimiter")


def well_formed(dataset: bytes, syntax: str) -> bool | None:
    """Whether the encoded data set parses strictly (every length consistent, every delimiter
    present, nothing left over); None when this walker cannot tell (deflated, too deep)."""
    if syntax == DeflatedExplicitVRLittleEndian:
        return None
    try:
        elements = walk(dataset, syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian)
    except RecursionError:
        return None
    except (ValueError, struct.error):
        return False
    end = max((e.end for e in elements if e.depth == 0), default=0)
    return end == len(dataset)


@cache
def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def encode_element(tag: int, vr: str, value: bytes, implicit: bool, little: bool) -> bytes:
    """One element, its value padded to an even length (an undefined length if value is None-like)."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB", "UN") else b" "
    e = "<" if little else ">"
    head = struct.pack(e + "HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack(e + "I", len(value)) + value
    if vr.encode() in LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack(e + "I", len(value)) + value
    return head + vr.encode() + struct.pack(e + "H", len(value)) + value


def _us(value: int, little: bool) -> bytes:
    return struct.pack("<H" if little else ">H", value & 0xFFFF)


# ------------------------------------------------------------------------------ bases


@dataclass(frozen=True)
class Base:
    name: str
    preamble_meta: bytes  # preamble, DICM and the file meta group (placeholder UIDs)
    dataset: bytes  # the data set as encoded (placeholder UIDs)
    syntax: str
    sop_class: str
    elements: tuple[Element, ...]
    meta_elements: tuple[Element, ...]  # offsets relative to preamble_meta[132:]

    @property
    def implicit(self) -> bool:
        return self.syntax == ImplicitVRLittleEndian

    @property
    def little(self) -> bool:
        return self.syntax != ExplicitVRBigEndian

    @property
    def encapsulated(self) -> bool:
        return UID(self.syntax).is_encapsulated

    def top(self, tag: int) -> Element | None:
        return next((e for e in self.elements if e.depth == 0 and e.tag == tag), None)


def _placeholder(role: int) -> str:
    # Same length as every per-input UID: <root>.<9-digit seed>.<10-digit index>.<role>
    return f"{UID_ROOT}.100000000.1000000000.{role}"


def input_uid(seed: int, index: int, role: int) -> str:
    return f"{UID_ROOT}.{100_000_000 + seed % 900_000_000}.{1_000_000_000 + index}.{role}"


def _synthetic(implicit: bool) -> Dataset:
    from tests.archive_support import ct_dataset

    ds = ct_dataset(40, 36, seed=3)
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        # A nested sequence and a private block, so the structure mutations find something
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.77.9"
        inner = Dataset()
        inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "113001", "DCM", "x"
        item.PurposeOfReferenceCodeSequence = [inner]
        ds.ReferencedImageSequence = [item, item]
        block = ds.private_block(0x0011, "FUZZ TEST", create=True)
        block.add_new(0x01, "LO", "private")
        block.add_new(0x02, "OB", bytes(range(40)))
    return ds


def _pydicom_file(name: str) -> Dataset:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None, name
    return dcmread(path)


@cache
def bases() -> tuple[Base, ...]:
    datasets = [("synthetic-ct", _synthetic(False)), ("synthetic-ct-implicit", _synthetic(True))]
    datasets += [(name.removesuffix(".dcm"), _pydicom_file(name)) for name in PYDICOM_FILES]
    out = []
    for name, ds in datasets:
        ds.StudyInstanceUID = _placeholder(1)
        ds.SeriesInstanceUID = _placeholder(2)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _placeholder(3)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        meta_end = _meta_end(data)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        dataset = data[meta_end:]
        implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
        out.append(
            Base(
                name,
                data[:meta_end],
                dataset,
                syntax,
                str(ds.SOPClassUID),
                tuple(walk(dataset, implicit, little)),
                tuple(walk(data[132:meta_end], False, True)),
            )
        )
    return tuple(out)


def _meta_end(data: bytes) -> int:
    (length,) = struct.unpack_from("<I", data, 140)  # (0002,0000) UL group length
    return 144 + length


# ------------------------------------------------------------------------------ inputs


@dataclass
class DicomInput:
    """One fuzz input: the Part 10 file (STOW-RS sends it as the part) and, for C-STORE, the
    command's SOP class/instance, the transfer syntax of the context and the data set bytes."""

    index: int
    kind: str
    detail: str
    base: str
    data: bytes
    dataset: bytes
    sop_class: str
    sop_instance: str
    syntax: str
    study: str
    series: str
    labels: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.index}:{self.kind}:{self.detail}:{self.base}"


class DicomMutator:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.bases = bases()
        self.kinds = list(KINDS)
        self.weights = [KINDS[k] for k in self.kinds]

    def make(self, index: int, kind: str | None = None) -> DicomInput:
        rng = random.Random(f"dicom:{self.seed}:{index}")
        base = self.bases[rng.randrange(len(self.bases))]
        kind = kind or rng.choices(self.kinds, self.weights)[0]
        uids = {role: input_uid(self.seed, index, role) for role in (1, 2, 3)}
        meta, dataset = base.preamble_meta, base.dataset
        for role, uid in uids.items():
            meta = meta.replace(_placeholder(role).encode(), uid.encode())
            dataset = dataset.replace(_placeholder(role).encode(), uid.encode())
        item = DicomInput(
            index, kind, "", base.name, meta + dataset, dataset, base.sop_class, uids[3], base.syntax, uids[1], uids[2]
        )
        MUTATIONS[kind](item, base, meta, dataset, rng)
        if not item.dataset:
            item.dataset = b"\x08"  # a C-STORE carries at least one byte of data set
        return item


def _set(item: DicomInput, meta: bytes, dataset: bytes, detail: str) -> None:
    item.data, item.dataset, item.detail = meta + dataset, dataset, detail


def _m_control(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    _set(item, meta, dataset, "unchanged")


def _m_flip(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    if rng.random() < 0.15:  # anywhere in the file, the meta group included
        damaged = flip_bits(meta + dataset, rng, rng.randint(1, 8))
        item.data, item.dataset, item.detail = damaged, damaged[len(meta) :], "whole-file"
        return
    count = rng.choice([1, 1, 2, 4, 16])
    _set(item, meta, flip_bits(dataset, rng, count), f"{count}-bits")


def _m_flip_header(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    element = rng.choice(base.elements)
    position = element.offset + rng.randrange(max(1, element.value_offset - element.offset))
    damaged = bytearray(dataset)
    damaged[position] ^= 1 << rng.randrange(8)
    part = "tag" if position < element.offset + 4 else "vr/length"
    _set(item, meta, bytes(damaged), part)


def _m_truncate(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    if rng.random() < 0.1:
        whole = truncate(meta + dataset, rng)
        item.data, item.dataset, item.detail = whole, whole[len(meta) :], "in-meta-or-anywhere"
        return
    _set(item, meta, truncate(dataset, rng), "data-set")


def _m_truncate_element(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    element = rng.choice(base.elements)
    cut = rng.choice(
        [element.offset, element.offset + rng.randrange(1, 8), element.value_offset, element.end - 1, element.end]
    )
    _set(item, meta, dataset[: max(0, min(cut, len(dataset) - 1))], "at-element")


def _m_splice(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    _set(item, meta, splice(dataset, rng), "splice")


def _write_length(data: bytearray, element: Element, value: int, little: bool) -> None:
    fmt = ("<" if little else ">") + ("I" if element.length_size == 4 else "H")
    struct.pack_into(fmt, data, element.length_offset, value & (0xFFFFFFFF if element.length_size == 4 else 0xFFFF))


def _m_length(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    element = rng.choice([e for e in base.elements if e.tag not in (ITEM_END, SEQ_END)])
    current = 0 if element.length == UNDEFINED else element.length
    remaining = len(dataset) - element.value_offset
    how = rng.choice(["zero", "odd", "minus", "plus", "past-end", "huge", "max"])
    value = {
        "zero": 0,
        "odd": current | 1,
        "minus": max(0, current - rng.choice([1, 2, 4, 8])),
        "plus": current + rng.choice([1, 2, 4, 8]),
        "past-end": remaining + rng.choice([1, 2, 100, 4096]),
        "huge": 0x7FFFFFF0,
        "max": 0xFFFE if element.length_size == 2 else 0xFFFFFFFE,
    }[how]
    damaged = bytearray(dataset)
    _write_length(damaged, element, value, base.little)
    where = "fragment" if element.fragment else ("item" if element.tag == ITEM else f"depth{min(element.depth, 2)}")
    _set(item, meta, bytes(damaged), f"{how}:{where}")


def _m_undefined_length(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    """0xFFFFFFFF (undefined) on elements that may not have it, 0xFFFF on short lengths."""
    candidates = [e for e in base.elements if e.length != UNDEFINED and e.tag not in (ITEM_END, SEQ_END)]
    element = rng.choice(candidates)
    damaged = bytearray(dataset)
    _write_length(damaged, element, UNDEFINED, base.little)
    what = "short-vr" if element.length_size == 2 else ("pixel" if element.tag == PIXEL_DATA else "long")
    _set(item, meta, bytes(damaged), what)


OTHER_VRS = [b"SQ", b"OB", b"OW", b"UN", b"UT", b"US", b"UL", b"FD", b"AT", b"DA", b"LO", b"UI", b"XX", b"  ", b"\0\0"]


def _m_vr(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    explicit = [e for e in base.elements if e.vr]
    if not explicit:  # implicit VR: the same damage is a wrong VR in the dictionary's eyes: a tag change
        element = rng.choice([e for e in base.elements if e.tag not in (ITEM, ITEM_END, SEQ_END)])
        damaged = bytearray(dataset)
        new_tag = rng.choice([0x00280010, 0x7FE00010, 0x0040A730, 0x00080018, 0xFFFEE000, 0x00100010])
        fmt = "<HH" if base.little else ">HH"
        struct.pack_into(fmt, damaged, element.offset, new_tag >> 16, new_tag & 0xFFFF)
        _set(item, meta, bytes(damaged), "implicit-retag")
        return
    element = rng.choice(explicit)
    vr = rng.choice(OTHER_VRS) if rng.random() < 0.8 else bytes(rng.randrange(256) for _ in range(2))
    damaged = bytearray(dataset)
    damaged[element.offset + 4 : element.offset + 6] = vr
    change = "long->short" if (element.vr in LONG_VRS) > (vr in LONG_VRS) else "other"
    if (element.vr in LONG_VRS) < (vr in LONG_VRS):
        change = "short->long"
    _set(item, meta, bytes(damaged), change)


def _replace_top(dataset: bytes, base: Base, tag: int, encoded: bytes | None) -> bytes:
    """Replace (or insert, or with None remove) a top-level element."""
    element = base.top(tag)
    if element is not None:
        return dataset[: element.offset] + (encoded or b"") + dataset[element.end :]
    if encoded is None:
        return dataset
    after = next((e for e in base.elements if e.depth == 0 and e.tag > tag), None)
    at = after.offset if after is not None else len(dataset)
    return dataset[:at] + encoded + dataset[at:]


def _encode(base: Base, tag: int, vr: str, value: bytes) -> bytes:
    return encode_element(tag, vr, value, base.implicit, base.little)


def _m_dimensions(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    changes = rng.randint(1, 3)
    details = []
    for _ in range(changes):
        tag, name = rng.choice(
            [
                (ROWS, "rows"),
                (COLUMNS, "columns"),
                (FRAMES, "frames"),
                (SAMPLES, "samples"),
                (BITS_ALLOCATED, "bits-allocated"),
                (BITS_STORED, "bits-stored"),
                (HIGH_BIT, "high-bit"),
                (PIXEL_REPRESENTATION, "pixel-representation"),
            ]
        )
        if tag == FRAMES:
            text = rng.choice(["999999999", "2147483647", "0", "-1", "abc", "1e9", "65536", "2", "", "9" * 20])
            encoded = _encode(base, FRAMES, "IS", text.encode())
        else:
            value = rng.choice([0, 1, 2, 3, 7, 8, 12, 24, 32, 33, 64, 255, 0x8000, 0xFFFF])
            encoded = _encode(base, tag, "US", _us(value, base.little))
        # Each change is made on the base's layout: one element changed per pass, re-walked
        dataset = _replace_top(dataset, base, tag, encoded)
        base = _rewalk(base, dataset)
        details.append(name)
    _set(item, meta, dataset, "+".join(sorted(set(details))))


def _rewalk(base: Base, dataset: bytes) -> Base:
    return Base(
        base.name,
        base.preamble_meta,
        dataset,
        base.syntax,
        base.sop_class,
        tuple(walk(dataset, base.implicit, base.little)),
        base.meta_elements,
    )


def _m_pixel_length(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    element = base.top(PIXEL_DATA)
    if element is None or element.length == UNDEFINED:
        # No native pixel data: add one that contradicts the description (or stands alone)
        value = bytes(rng.randrange(256) for _ in range(rng.choice([2, 100, 4096])))
        vr = "OW" if rng.random() < 0.5 else "OB"
        _set(item, meta, _replace_top(dataset, base, PIXEL_DATA, _encode(base, PIXEL_DATA, vr, value)), "replaced")
        return
    pixels = dataset[element.value_offset : element.end]
    how = rng.choice(["short", "half", "empty", "one-byte", "long", "double"])
    value = {
        "short": pixels[: max(0, len(pixels) - rng.choice([2, 4, 64]))],
        "half": pixels[: len(pixels) // 2],
        "empty": b"",
        "one-byte": pixels[:1],
        "long": pixels + bytes(rng.choice([2, 64, 1000])),
        "double": pixels + pixels,
    }[how]
    vr = element.vr.decode() if element.vr else "OW"
    encoded = _encode(base, PIXEL_DATA, vr, value)
    _set(item, meta, dataset[: element.offset] + encoded + dataset[element.end :], how)


BAD_SYNTAXES = [
    "1.2.3.4",
    "",
    "1.2.840.10008.1.2.4.999",
    "1.2.840.10008.1.2.1.99",  # deflated, over data that is not
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.5.1.4.1.1.2",  # a SOP class, not a transfer syntax
    "x" * 80,
    "1.2.840.10008.1.2\u00e9",
]


def _meta_with(base: Base, meta: bytes, tag: int, value: bytes | None) -> bytes:
    """The preamble + meta group with one element replaced/removed, group length recomputed."""
    group = meta[132:]
    elements = [e for e in base.meta_elements if e.depth == 0]
    out = b""
    for e in elements:
        if e.tag == 0x00020000:
            continue
        raw = group[e.offset : e.end]
        if e.tag == tag:
            raw = b"" if value is None else encode_element(tag, e.vr.decode(), value, False, True)
        out += raw
    if tag not in {e.tag for e in elements} and value is not None:
        out += encode_element(tag, "UI", value, False, True)
    return meta[:132] + encode_element(0x00020000, "UL", struct.pack("<I", len(out)), False, True) + out


def _m_transfer_syntax(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    syntax = rng.choice(BAD_SYNTAXES + [str(s) for s in SYNTAXES if s != base.syntax])
    item.data = _meta_with(base, meta, META_SYNTAX, syntax.encode("utf-8")) + dataset
    item.dataset, item.detail = dataset, syntax if len(syntax) < 40 else "overlong"
    # Over C-STORE the meta group is not sent: the same lie is a context of another syntax
    negotiable = [str(s) for s in SYNTAXES]
    item.syntax = (
        syntax
        if syntax in negotiable and syntax != base.syntax
        else rng.choice([s for s in negotiable if s != base.syntax])
    )


def _m_meta(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    how = rng.choice(["no-dicm", "no-meta", "group-length", "meta-undefined", "no-syntax", "meta-uid-mismatch"])
    if how == "no-dicm":
        new_meta = meta[:128] + b"DICX" + meta[132:]
    elif how == "no-meta":
        new_meta = meta[:132]
    elif how == "group-length":
        new_meta = meta[:140] + struct.pack("<I", rng.choice([0, 2, len(meta) + 1000, UNDEFINED])) + meta[144:]
    elif how == "meta-undefined":
        element = rng.choice([e for e in base.meta_elements if e.length_size == 4] or list(base.meta_elements))
        damaged = bytearray(meta)
        struct.pack_into(
            "<I" if element.length_size == 4 else "<H",
            damaged,
            132 + element.length_offset,
            UNDEFINED if element.length_size == 4 else 0xFFFF,
        )
        new_meta = bytes(damaged)
    elif how == "no-syntax":
        new_meta = _meta_with(base, meta, META_SYNTAX, None)
    else:
        new_meta = _meta_with(base, meta, META_SOP_INSTANCE, f"{UID_ROOT}.5.{item.index}".encode())
    item.data, item.dataset, item.detail = new_meta + dataset, dataset, how


def _m_missing_uid(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    tag, name = rng.choice(
        [(SOP_INSTANCE, "sop-instance"), (SOP_CLASS, "sop-class"), (STUDY, "study"), (SERIES, "series")]
    )
    how = rng.choice(["removed", "empty"])
    encoded = None if how == "removed" else _encode(base, tag, "UI", b"")
    _set(item, meta, _replace_top(dataset, base, tag, encoded), f"{name}-{how}")


BAD_UIDS = [
    "../../../etc/passwd",
    "1..2",
    "1.2.",
    ".1.2",
    "1.2.3;DROP TABLE instance",
    "1.2.3\\1.2.4",
    "1" * 65,
    "1." + "2" * 80,
    "1.2 .3",
    "1.2\x003",
    "\u00e9.1",
    "*",
    "1.2.3%",
]


def _m_bad_uid(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    tag, name = rng.choice(
        [(SOP_INSTANCE, "sop-instance"), (SOP_CLASS, "sop-class"), (STUDY, "study"), (SERIES, "series")]
    )
    value = rng.choice(BAD_UIDS).encode("utf-8")
    _set(item, meta, _replace_top(dataset, base, tag, _encode(base, tag, "UI", value)), name)
    if tag == SOP_INSTANCE and rng.random() < 0.5:  # the command says the same
        item.sop_instance = value.decode("utf-8", "replace")[:64]


def _m_uid_mismatch(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    """Command (C-STORE) / file meta (STOW) disagree with the data set about the SOP instance or class."""
    if rng.random() < 0.5:
        other = f"{UID_ROOT}.6.{item.index}"
        item.sop_instance = other
        _set(item, _meta_with(base, meta, META_SOP_INSTANCE, other.encode()), dataset, "sop-instance")
    else:
        other_class = (
            "1.2.840.10008.5.1.4.1.1.7"
            if base.sop_class != "1.2.840.10008.5.1.4.1.1.7"
            else ("1.2.840.10008.5.1.4.1.1.2")
        )
        _set(
            item,
            meta,
            _replace_top(dataset, base, SOP_CLASS, _encode(base, SOP_CLASS, "UI", other_class.encode())),
            "sop-class",
        )


def _nested(depth: int, implicit: bool, little: bool, undefined: bool, rng: random.Random, broken: str) -> bytes:
    """ContentSequence within ContentSequence, `depth` deep; `broken` names the damage."""
    e = "<" if little else ">"
    leaf = encode_element(0x0040A040, "CS", b"TEXT", implicit, little)
    body = leaf
    damage_at = rng.randrange(depth)
    for level in range(depth):
        if undefined:
            item = struct.pack(e + "HHI", 0xFFFE, 0xE000, UNDEFINED) + body
            if not (broken == "missing-delimiter" and level == damage_at):
                item += struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0)
            sequence_value = item + struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0)
            head = struct.pack(e + "HH", 0x0040, 0xA730)
            head += struct.pack(e + "I", UNDEFINED) if implicit else b"SQ\0\0" + struct.pack(e + "I", UNDEFINED)
            body = head + sequence_value
        else:
            item_length = len(body) + (
                rng.choice([-2, 2, 1000]) if broken == "wrong-length" and level == damage_at else 0
            )
            item = struct.pack(e + "HHI", 0xFFFE, 0xE000, max(0, item_length)) + body
            body = encode_element(0x0040A730, "SQ", item, implicit, little)
        if level < depth - 1:
            body = leaf + body  # each item holds a value and the next level
    return body


def _m_deep_sequence(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    depth = rng.choice([8, 64, 200, 500, 1000, 3000])
    undefined = rng.random() < 0.6
    broken = rng.choice(["none", "none", "missing-delimiter" if undefined else "wrong-length"])
    nested = _nested(depth, base.implicit, base.little, undefined, rng, broken)
    _set(
        item,
        meta,
        _replace_top(dataset, base, CONTENT_SEQUENCE, nested),
        f"{depth}-{'undefined' if undefined else 'defined'}-{broken}",
    )


def _m_encapsulated(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    e = "<" if base.little else ">"
    pixel = base.top(PIXEL_DATA)
    if pixel is None:
        _m_pixel_length(item, base, meta, dataset, rng)
        return
    if pixel.length != UNDEFINED:
        # Native pixel data wrapped as fragments under a native syntax, or the native value under an
        # encapsulated syntax
        if rng.random() < 0.5:
            value = dataset[pixel.value_offset : pixel.end]
            fragments = struct.pack(e + "HHI", 0xFFFE, 0xE000, 0) + struct.pack(e + "HHI", 0xFFFE, 0xE000, len(value))
            fragments += value + struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0)
            head = struct.pack(e + "HH", 0x7FE0, 0x0010) + (
                struct.pack(e + "I", UNDEFINED) if base.implicit else b"OB\0\0" + struct.pack(e + "I", UNDEFINED)
            )
            _set(item, meta, dataset[: pixel.offset] + head + fragments + dataset[pixel.end :], "native-as-fragments")
        else:
            syntax = rng.choice([str(RLELossless), str(JPEGBaseline8Bit), str(JPEG2000Lossless)])
            _set(
                item, _meta_with(base, meta, META_SYNTAX, syntax.encode()), dataset, "native-under-encapsulated-syntax"
            )
            item.syntax = syntax if base.syntax == ExplicitVRLittleEndian else item.syntax
            if base.syntax != ExplicitVRLittleEndian:
                item.detail += "-meta-only"
        return
    fragments = [x for x in base.elements if x.fragment and x.tag == ITEM]
    delimiter = next((x for x in base.elements if x.fragment and x.tag == SEQ_END), None)
    damaged = bytearray(dataset)
    how = rng.choice(["bot", "fragment-length", "fragment-tag", "no-delimiter", "no-fragments", "extended-offsets"])
    if how == "bot":
        bot = fragments[0]
        entries = rng.choice([[0, 0xFFFFFFF0], [0xFFFFFFFF], [7], [100, 50], list(range(0, 4000, 4))])
        value = struct.pack(e + f"{len(entries)}I", *entries)
        new = struct.pack(e + "HHI", 0xFFFE, 0xE000, len(value)) + value
        damaged[bot.offset : bot.end] = new
    elif how == "fragment-length":
        fragment = rng.choice(fragments)
        value = rng.choice([0, 1, fragment.length + 1, fragment.length - 2, UNDEFINED, len(dataset), 0x7FFFFFFF])
        struct.pack_into(e + "I", damaged, fragment.length_offset, max(0, value))
    elif how == "fragment-tag":
        fragment = rng.choice(fragments)
        tag = rng.choice([0xFFFEE00D, 0xFFFEE0DD, 0x00080018, 0x7FE00010, 0x0000_0000])
        struct.pack_into(e + "HH", damaged, fragment.offset, tag >> 16, tag & 0xFFFF)
    elif how == "no-delimiter" and delimiter is not None:
        del damaged[delimiter.offset : delimiter.end]
    elif how == "no-fragments" and delimiter is not None:
        damaged[fragments[0].offset : delimiter.offset] = struct.pack(e + "HHI", 0xFFFE, 0xE000, 0)
    else:
        how = "extended-offsets"
        count = rng.choice([1, 2, 1000])
        table = _encode(base, 0x7FE00001, "OV", struct.pack(e + f"{count}Q", *range(count)))
        lengths = _encode(base, 0x7FE00002, "OV", struct.pack(e + "Q", 2**40))
        damaged[pixel.offset : pixel.offset] = table + lengths
    _set(item, meta, bytes(damaged), how)


def _m_oversize(item: DicomInput, base: Base, meta: bytes, dataset: bytes, rng: random.Random) -> None:
    """Past the archive's size limit (the fuzz run sets it to OVERSIZE_LIMIT): trailing padding."""
    padding = _encode(base, 0xFFFCFFFC, "OB", bytes(OVERSIZE_LIMIT + rng.randrange(1 << 16)))
    _set(item, meta, dataset + padding, "padding")


OVERSIZE_LIMIT = 2 * 1024 * 1024

MUTATIONS = {
    "control": _m_control,
    "flip": _m_flip,
    "flip-header": _m_flip_header,
    "truncate": _m_truncate,
    "truncate-element": _m_truncate_element,
    "splice": _m_splice,
    "length": _m_length,
    "undefined-length": _m_undefined_length,
    "vr": _m_vr,
    "dimensions": _m_dimensions,
    "pixel-length": _m_pixel_length,
    "transfer-syntax": _m_transfer_syntax,
    "meta": _m_meta,
    "missing-uid": _m_missing_uid,
    "bad-uid": _m_bad_uid,
    "uid-mismatch": _m_uid_mismatch,
    "deep-sequence": _m_deep_sequence,
    "encapsulated": _m_encapsulated,
    "oversize": _m_oversize,
}
assert set(MUTATIONS) == set(KINDS)


# ------------------------------------------------------------------------------ C-STORE's view


def cstore_file(item: DicomInput) -> bytes:
    """The Part 10 file pynetdicom's chunked receive writes for this input: preamble, DICM, a meta
    group built from the command and the context, the data set bytes as sent."""
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    buffer = io.BytesIO()
    write_file_meta_info(
        buffer,
        create_file_meta(
            sop_class_uid=UID(item.sop_class), sop_instance_uid=UID(item.sop_instance), transfer_syntax=UID(item.syntax)
        ),
    )
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + item.dataset


# ------------------------------------------------------------------------------ the oracle


@dataclass(frozen=True)
class Verdict:
    expect: str  # valid | invalid | either
    reason: str


NATIVE = {
    str(ExplicitVRLittleEndian),
    str(ImplicitVRLittleEndian),
    str(ExplicitVRBigEndian),
    str(DeflatedExplicitVRLittleEndian),
}


def oracle(
    received: bytes,
    *,
    command_sop_instance: str | None = None,
    command_sop_class: str | None = None,
    limit: int = OVERSIZE_LIMIT,
) -> Verdict:
    """What a conformant archive should make of `received` (the Part 10 file as it arrives at the
    archive): judged with pydicom alone, strictly, never with the archive's own code."""
    if len(received) > limit:
        return Verdict("invalid", "too-large")
    if len(received) < 132 or received[128:132] != b"DICM":
        return Verdict("invalid", "no-dicm")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = dcmread(io.BytesIO(received), force=False)
            syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
            if not syntax:
                return Verdict("invalid", "no-transfer-syntax")
            uid = UID(syntax)
            if not uid.is_transfer_syntax:
                return Verdict("invalid", "unknown-transfer-syntax")
            depth = _touch(ds, 0)
            if depth > MAX_DEPTH:
                return Verdict("invalid", "nested-too-deep")
            if _runs_past(dcmread(io.BytesIO(received)), len(received)):
                return Verdict("invalid", "value-runs-past-its-container")
    except RecursionError:
        return Verdict("either", "too-deep-for-pydicom")
    except Exception as exc:
        return Verdict("invalid", f"unparsable:{type(exc).__name__}")
    identities = {}
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = str(ds.get(keyword, "") or "").rstrip("\x00 ").lstrip(" ")  # NUL pads only at the end
        if not value:
            return Verdict("invalid", f"missing-{keyword}")
        if len(value) > 64 or not UID_PATTERN.match(value):
            return Verdict("invalid", f"malformed-{keyword}")
        identities[keyword] = value
    if command_sop_instance is not None and identities["SOPInstanceUID"] != command_sop_instance:
        return Verdict("invalid", "sop-instance-differs-from-command")
    policy: list[str] = []
    # PS3.4 B.2.3 0xA900: the data set is not of the SOP class it was sent as (for C-STORE the
    # request's, which is what the archive's file meta then says; for STOW-RS the file meta's)
    meta_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").rstrip("\0 ")
    if command_sop_class is not None and identities["SOPClassUID"] != command_sop_class:
        return Verdict("invalid", "sop-class-differs-from-command")
    if meta_class and identities["SOPClassUID"] != meta_class:
        return Verdict("invalid", "sop-class-differs-from-file-meta")
    meta_instance = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    if command_sop_instance is None and meta_instance and meta_instance != identities["SOPInstanceUID"]:
        policy.append("meta-sop-instance-differs")
    pixel = _pixel_verdict(ds, syntax)
    if pixel is not None and pixel.expect == "invalid":
        return pixel
    if pixel is not None:
        policy.append(pixel.reason)
    if caught:
        policy.append("pydicom-warnings")
    offset = 144 + struct.unpack_from("<I", received, 140)[0] if received[132:136] == b"\x02\x00\x00\x00" else None
    strict = well_formed(received[offset:], syntax) if offset is not None else False
    if strict is not True:
        policy.append("not-well-formed" if strict is False else "not-checked")
    if not uid.is_encapsulated and syntax not in NATIVE:
        return Verdict("invalid", "unsupported-transfer-syntax")
    return Verdict("either", ",".join(policy)) if policy else Verdict("valid", "")


def _runs_past(ds: Dataset, bound: int) -> bool:
    """Whether a value runs past the end of the file or of its defined-length sequence (pydicom
    reads such a value cut short without complaint).  Raw offsets count from the file at the top
    level and from the sequence value inside a defined-length sequence."""
    from pydicom.dataelem import RawDataElement

    raws = {tag: ds.get_item(tag, keep_deferred=True) for tag in list(ds.keys())}
    for raw in raws.values():
        if isinstance(raw, RawDataElement) and raw.length != UNDEFINED and raw.value_tell + raw.length > bound:
            return True
    for tag, raw in raws.items():
        element = ds[tag]
        if element.VR == "SQ":
            inner = raw.length if isinstance(raw, RawDataElement) and raw.length != UNDEFINED else bound
            if any(_runs_past(item, inner) for item in element.value):
                return True
    return False


def _touch(ds: Dataset, depth: int) -> int:
    """Convert every value; the deepest item level reached."""
    deepest = depth
    for element in ds:
        if element.VR == "SQ":
            for child in element.value:
                deepest = max(deepest, _touch(child, depth + 1))
        else:
            _ = element.value
    return deepest


def _pixel_verdict(ds: Dataset, syntax: str) -> Verdict | None:
    if "PixelData" not in ds:
        return None
    try:  # pydicom's IS reading ("1e9" is read as 1000000000, though PS3.5 wants digits only)
        if int(ds.get("NumberOfFrames", "") or 0) < 0:
            raise ValueError
    except Exception:
        return Verdict("invalid", "number-of-frames-not-a-number")
    element = ds["PixelData"]
    value = element.value
    if syntax in NATIVE:
        if element.is_undefined_length or (isinstance(value, bytes) and value[:4] == b"\xfe\xff\x00\xe0"):
            return Verdict("invalid", "encapsulated-under-native-syntax")
        try:
            rows, columns, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
            samples = int(ds.get("SamplesPerPixel", 1))
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            stored = int(ds.get("BitsStored", "") or bits)
            for keyword in ("PixelRepresentation", "PlanarConfiguration"):  # what a reader needs
                int(ds.get(keyword, "") or 0)
        except Exception:
            return Verdict("invalid", "image-description-incomplete")
        if min(rows, columns, samples) < 1 or frames < 0 or not 1 <= stored <= bits:
            return Verdict("invalid", "image-description-impossible")
        if bits == 0 or bits > 64 or (bits != 1 and bits % 8):
            return Verdict("invalid", "bits-allocated-impossible")
        frames = max(frames, 1)
        if bits not in (1, 8, 16, 32, 64) or not ds.get("SamplesPerPixel") or not ds.get("BitsStored"):
            return Verdict("either", "image-description-odd")
        needed = (rows * columns * samples * frames * bits + 7) // 8
        if len(value or b"") < needed:
            return Verdict("invalid", "pixel-data-short")
        if len(value or b"") > needed + 1:
            return Verdict("either", "pixel-data-long")
        if "BitsStored" not in ds or "PhotometricInterpretation" not in ds:
            return Verdict("either", "image-description-odd")
        return None
    if not element.is_undefined_length:  # PS3.5 A.4: encapsulated means undefined-length fragments
        return Verdict("invalid", "native-pixel-data-under-encapsulated-syntax")
    # A storage SCP does not decode the fragments; their framing it can check
    try:
        from pydicom.encaps import generate_fragments, parse_basic_offsets

        buffer = io.BytesIO(value)
        parse_basic_offsets(buffer, endianness="<" if ds.is_little_endian else ">")
        count = sum(1 for _ in generate_fragments(buffer, endianness="<" if ds.is_little_endian else ">"))
    except Exception:
        return Verdict("either", "fragments-malformed")
    return None if count else Verdict("either", "no-fragments")
