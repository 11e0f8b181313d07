"""Reading what a received DICOM Part 10 file says about itself, without trusting any of it.

Everything the catalog needs comes from here, validated: UIDs (they end up in queries and must
never be used as paths), the pixel data length against Rows x Columns x ..., the transfer syntax.
Pixel values are never loaded: large values stay deferred on disk.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID

from lvpnet.imageio import DEFLATED_EXPLICIT_VR_LE, NATIVE_TRANSFER_SYNTAXES, pixel_layout

# Real equipment writes UIDs with leading zeros, hex digits, even words and spaces (a GDCM sample
# has SeriesInstanceUID "REM SAMPLES 1").  A PACS admin forwarding a study expects the archive to
# take what the PACS holds: a refusal leaves the study incomplete here and the PACS retrying an
# instance nobody can fix.  So such UIDs are accepted and catalogued exactly as sent; nothing is
# derived from them (object keys are content hashes and staging names are random) and queries
# bind them as parameters.  What is still refused is anything that could act on a path or split a
# value: only letters and digits, with single dots or single spaces between them.
UID_PATTERN = re.compile(r"^[0-9A-Za-z]+([. ][0-9A-Za-z]+)*$")

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNDEFINED_LENGTH = 0xFFFFFFFF
HASH_CHUNK = 1 << 20


class InvalidInstance(Exception):
    """The object cannot be understood or violates a rule; `reason` is safe to log (no patient data)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsupportedTransferSyntax(InvalidInstance):
    pass


class SopClassMismatch(InvalidInstance):
    """The data set's SOP Class UID is not the one the object was sent as (C-STORE's Affected SOP
    Class UID, which is the file meta's Media Storage SOP Class UID): PS3.4 status 0xA900."""


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_PATTERN.match(value) is not None


@dataclass(frozen=True)
class FileMeta:
    dataset_offset: int  # byte offset of the first dataset element
    transfer_syntax_uid: str
    media_storage_sop_instance_uid: str | None
    media_storage_sop_class_uid: str | None = None


def read_file_meta(head: bytes) -> FileMeta:
    """Parse the preamble and group 0002 by hand: we need the exact byte offset where it ends."""
    if len(head) < 132 or head[128:132] != b"DICM":
        raise InvalidInstance("not a DICOM Part 10 file (no DICM prefix)")
    offset, values = 132, {}
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            break
        vr = head[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            if offset + 12 > len(head):
                raise InvalidInstance("truncated file meta information")
            (length,) = struct.unpack_from("<I", head, offset + 8)
            value_start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", head, offset + 6)
            value_start = offset + 8
        if length == UNDEFINED_LENGTH or value_start + length > len(head):
            raise InvalidInstance("malformed file meta information")
        values[element] = head[value_start : value_start + length]
        offset = value_start + length
    syntax = values.get(0x0010, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    if not syntax:
        raise InvalidInstance("file meta information has no Transfer Syntax UID")
    media_uid = values.get(0x0003, b"").rstrip(b"\x00 ").decode("ascii", "replace") or None
    media_class = values.get(0x0002, b"").rstrip(b"\x00 ").decode("ascii", "replace") or None
    return FileMeta(offset, syntax, media_uid, media_class)


@dataclass(frozen=True)
class Digests:
    file_sha256: str
    dataset_sha256: str  # everything after the file meta group
    size: int


def digest_file(path: Path, dataset_offset: int) -> Digests:
    whole, dataset = hashlib.sha256(), hashlib.sha256()
    position = 0
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            whole.update(chunk)
            if position + len(chunk) > dataset_offset:
                dataset.update(chunk[max(0, dataset_offset - position) :])
            position += len(chunk)
    return Digests(whole.hexdigest(), dataset.hexdigest(), position)


@dataclass
class InstanceFacts:
    """What the catalog records about one received object, validated."""

    meta: FileMeta
    digests: Digests
    patient: dict[str, Any] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    instance: dict[str, Any] = field(default_factory=dict)
    # IOCM (PS3.17 / IHE IOCM): a Key Object Selection with a rejection title names instances
    # to withdraw: (title code, [(study, series, sop), ...])
    rejection: tuple[str, list[tuple[str, str, str]]] | None = None


KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
# DCM codes of the KOS document titles that reject instances (PS3.16 CID 7011)
REJECTION_TITLES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}


def rejection_note(ds: pydicom.Dataset) -> tuple[str, list[tuple[str, str, str]]] | None:
    """The instances a rejection note withdraws, from its Current Requested Procedure Evidence."""
    if str(ds.get("SOPClassUID", "")) != KEY_OBJECT_SELECTION:
        return None
    titles = ds.get("ConceptNameCodeSequence") or []
    code = next((str(t.get("CodeValue", "")) for t in titles if str(t.get("CodingSchemeDesignator", "")) == "DCM"), "")
    if code not in REJECTION_TITLES:
        return None
    references = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            for item in series.get("ReferencedSOPSequence") or []:
                uids = (
                    study.get("StudyInstanceUID"),
                    series.get("SeriesInstanceUID"),
                    item.get("ReferencedSOPInstanceUID"),
                )
                if all(is_valid_uid(str(u)) for u in uids if u is not None) and all(uids):
                    references.append(tuple(str(u) for u in uids))
    return code, references  # type: ignore[return-value]


def _text(ds: pydicom.Dataset, keyword: str, limit: int) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a value that cannot be decoded is treated as absent, never as fatal
        return None
    if value is None:
        return None
    text = str(value).strip().replace("\x00", "")
    return text[:limit] if text else None


def _integer(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if -(2**31) <= number < 2**31 else None


def known_transfer_syntax(uid: str) -> bool:
    syntax = UID(uid)
    return syntax.is_transfer_syntax and (syntax in NATIVE_TRANSFER_SYNTAXES or syntax.is_encapsulated)


def inspect_file(path: Path, *, expected_sop_instance_uid: str | None = None) -> InstanceFacts:
    """Validate a received Part 10 file and extract the catalog attributes.

    Raises InvalidInstance (reason without patient data) for malformed or truncated datasets,
    missing or malformed UIDs, unknown transfer syntaxes and pixel data whose length does not
    match the image description.
    """
    with path.open("rb") as fh:
        head = fh.read(64 * 1024)
    meta = read_file_meta(head)
    if not known_transfer_syntax(meta.transfer_syntax_uid):
        raise UnsupportedTransferSyntax("unknown transfer syntax")
    try:
        ds = _read_dataset(path, deflated=meta.transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LE)
    except InvalidInstance:
        raise
    except Exception as exc:  # pydicom raises a zoo of exception types on damaged input
        raise InvalidInstance(f"malformed dataset ({type(exc).__name__})") from exc

    sop_instance_uid = _text(ds, "SOPInstanceUID", 200)
    if sop_instance_uid is None:
        raise InvalidInstance("missing SOP Instance UID")
    for keyword, value in (
        ("SOPInstanceUID", sop_instance_uid),
        ("SOPClassUID", _text(ds, "SOPClassUID", 200)),
        ("StudyInstanceUID", _text(ds, "StudyInstanceUID", 200)),
        ("SeriesInstanceUID", _text(ds, "SeriesInstanceUID", 200)),
    ):
        if value is None:
            raise InvalidInstance(f"missing {keyword}")
        # _text drops NULs anywhere; a UID may only be padded with one at the end ("1.2\x003" is not "1.23")
        if not is_valid_uid(value) or "\x00" in str(ds.get(keyword, "")).rstrip("\x00 "):
            raise InvalidInstance(f"malformed {keyword} (letters and digits between single dots or spaces; 64 at most)")
    if expected_sop_instance_uid is not None and sop_instance_uid != expected_sop_instance_uid:
        raise InvalidInstance("SOP Instance UID in the dataset differs from the request's")
    # The file meta names the SOP class too (for C-STORE it is the request's Affected SOP Class UID).
    # (A stale Media Storage SOP Instance UID is seen in real files and tolerated: the data set's
    # UID is the one catalogued.)
    if meta.media_storage_sop_class_uid is not None and meta.media_storage_sop_class_uid != _text(
        ds, "SOPClassUID", 200
    ):
        raise SopClassMismatch("SOP Class UID in the dataset differs from the request's (file meta's)")

    _check_pixel_data(ds, meta)
    digests = digest_file(path, meta.dataset_offset)
    facts = InstanceFacts(meta=meta, digests=digests)
    facts.patient = {
        "patient_id": _text(ds, "PatientID", 64) or "",
        "issuer_of_patient_id": _text(ds, "IssuerOfPatientID", 64) or "",
        "patient_name": _text(ds, "PatientName", 324),
        "patient_birth_date": _text(ds, "PatientBirthDate", 8),
        "patient_sex": _text(ds, "PatientSex", 16),
    }
    facts.study = {
        "study_instance_uid": _text(ds, "StudyInstanceUID", 64),
        "study_date": _text(ds, "StudyDate", 8),
        "study_time": _text(ds, "StudyTime", 16),
        "accession_number": _text(ds, "AccessionNumber", 16),
        "study_id": _text(ds, "StudyID", 16),
        "study_description": _text(ds, "StudyDescription", 64),
        "referring_physician_name": _text(ds, "ReferringPhysicianName", 324),
    }
    facts.series = {
        "series_instance_uid": _text(ds, "SeriesInstanceUID", 64),
        "modality": _text(ds, "Modality", 16),
        "series_number": _integer(ds, "SeriesNumber"),
        "series_description": _text(ds, "SeriesDescription", 64),
        "body_part_examined": _text(ds, "BodyPartExamined", 16),
    }
    facts.instance = {
        "sop_instance_uid": sop_instance_uid,
        "sop_class_uid": _text(ds, "SOPClassUID", 64),
        "instance_number": _integer(ds, "InstanceNumber"),
        "number_of_frames": _integer(ds, "NumberOfFrames"),
        "rows": _integer(ds, "Rows"),
        "columns": _integer(ds, "Columns"),
        "bits_allocated": _integer(ds, "BitsAllocated"),
        "bits_stored": _integer(ds, "BitsStored"),
        "samples_per_pixel": _integer(ds, "SamplesPerPixel"),
        "photometric_interpretation": _text(ds, "PhotometricInterpretation", 16),
        "transfer_syntax_uid": meta.transfer_syntax_uid,
        "original_bytes": digests.size,
        "original_sha256": digests.file_sha256,
        "dataset_sha256": digests.dataset_sha256,
    }
    facts.rejection = rejection_note(ds)
    return facts


def _read_dataset(path: Path, *, deflated: bool = False) -> pydicom.Dataset:
    # defer_size keeps large values (the pixel data) on disk; every other element is still
    # converted, nested sequences too, so a damaged dataset fails here rather than in the worker.
    # (A deflated data set is inflated in memory by pydicom: its offsets are not file offsets.)
    ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
    _walk(ds, None if deflated else path.stat().st_size)
    return ds


DEFER_BYTES = 256 * 1024


def _deferred(raw: object) -> bool:
    """A value pydicom skipped over (left on disk): reading it would load it whole into memory."""
    return isinstance(raw, RawDataElement) and raw.value is None and raw.length not in (0, UNDEFINED_LENGTH)


def _is_sequence(raw: RawDataElement) -> bool:
    if raw.VR is not None:
        return raw.VR == "SQ"
    try:
        return bool(dictionary_VR(raw.tag) == "SQ")
    except KeyError:
        return False


# Deeper nesting is refused: everything that reads an instance later (WADO-RS metadata, the worker)
# recurses once per level, and real objects (SR content trees included) stay far below this
MAX_SEQUENCE_DEPTH = 64


def _walk(ds: pydicom.Dataset, bound: int | None, depth: int = 0) -> None:
    """Convert every element (nested sequences too), so damage anywhere raises now; values left
    on disk are not read (a 4 GB pixel data stays there).  pydicom reads a value that is cut short
    (by the end of the file, or of its sequence) without a word, so every value must also lie
    within `bound`: the size of what the raw elements' offsets count from (the file at the top
    level; the sequence value for the items of a defined-length sequence, which pydicom parses
    from a copy of that value)."""
    if depth > MAX_SEQUENCE_DEPTH:
        raise InvalidInstance(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
    tags = list(ds.keys())
    # Bounds first: converting one element can convert others (an ambiguous VR reads
    # PixelRepresentation), and a converted element no longer tells where its value lay
    raws = {tag: ds.get_item(tag, keep_deferred=True) for tag in tags}
    for raw in raws.values():
        if (
            bound is not None
            and isinstance(raw, RawDataElement)
            and raw.length != UNDEFINED_LENGTH
            and raw.value_tell + raw.length > bound
        ):
            raise InvalidInstance("truncated dataset (a value runs past the end of the object or its sequence)")
    for tag, raw in raws.items():
        if _deferred(raw) and not _is_sequence(raw):
            continue
        element = ds[tag]
        if element.VR == "SQ":
            inner = raw.length if isinstance(raw, RawDataElement) and raw.length != UNDEFINED_LENGTH else bound
            for item in element.value:
                _walk(item, inner, depth + 1)


def _raw_pixel_length(ds: pydicom.Dataset) -> int | None:
    """The pixel data's encoded length (UNDEFINED_LENGTH for encapsulated), without loading it."""
    if "PixelData" not in ds:
        return None
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    if isinstance(raw, RawDataElement):
        return int(raw.length)
    if raw.is_undefined_length:
        return UNDEFINED_LENGTH
    return len(raw.value or b"")


def _check_image_description(ds: pydicom.Dataset, layout: dict[str, Any]) -> None:
    """A description that describes no image (0 rows, 0 samples, 0 or 12 bits allocated...) makes the
    pixel data length check vacuous: any bytes would do.  PS3.3 C.7.6.3, PS3.5 8.1.1."""
    for key, name in (("rows", "Rows"), ("cols", "Columns"), ("samples", "SamplesPerPixel")):
        if int(layout[key]) < 1:
            raise InvalidInstance(f"image pixel module: {name} must be at least 1")
    bits_allocated, bits_stored = int(layout["bits_allocated"]), int(layout["bits_stored"])
    if not (bits_allocated == 1 or (bits_allocated % 8 == 0 and 8 <= bits_allocated <= 64)):
        raise InvalidInstance("image pixel module: BitsAllocated must be 1 or a multiple of 8 up to 64")
    if not 1 <= bits_stored <= bits_allocated:
        raise InvalidInstance("image pixel module: BitsStored must be between 1 and BitsAllocated")


def _check_pixel_data(ds: pydicom.Dataset, meta: FileMeta) -> None:
    length = _raw_pixel_length(ds)
    if length is None:
        return
    # Frames are counted by it whatever the encoding (WADO-RS frames, the worker): it must be a number
    frames = ds.get("NumberOfFrames") if "NumberOfFrames" in ds else None
    if frames not in (None, "") and (_integer(ds, "NumberOfFrames") is None or int(frames) < 0):
        raise InvalidInstance("image pixel module: NumberOfFrames is not a non-negative integer")
    if meta.transfer_syntax_uid not in NATIVE_TRANSFER_SYNTAXES:
        # Encapsulated: the fragments are kept as received (decoding them is the viewer's business),
        # but native values under a compressed syntax are not what the object says it is (PS3.5 A.4)
        if length != UNDEFINED_LENGTH:
            raise InvalidInstance("encapsulated transfer syntax with native (defined-length) pixel data")
        return
    if length == UNDEFINED_LENGTH:
        raise InvalidInstance("native transfer syntax with encapsulated pixel data")
    try:
        layout = pixel_layout(ds)
    except (ValueError, TypeError) as exc:
        raise InvalidInstance(f"incomplete image pixel module ({exc})") from exc
    _check_image_description(ds, layout)
    expected = int(layout["expected_nbytes"])
    # Shorter means a damaged object or a lying description (e.g. an absurd NumberOfFrames).  Longer
    # is seen in real files (a pad byte, trailing junk): those bytes are kept as non-pixel data.
    if length < expected:
        raise InvalidInstance(f"pixel data holds {length} bytes where the image description needs {expected}")
