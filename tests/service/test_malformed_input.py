"""Regressions from fuzzing DICOM files through C-STORE and STOW-RS (tests/reliability/test_fuzz_dicom.py):
service.dicomfile.inspect_file on malformed objects, without a server."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.dicomfile import InvalidInstance, inspect_file
from tests.archive_support import ct_dataset, part10_bytes


def _pixel_header(data: bytes) -> int:
    """Offset of the top-level (7FE0,0010) OW header in an Explicit VR LE file."""
    return data.rindex(b"\xe0\x7f\x10\x00OW\x00\x00")


def test_encapsulated_pixel_data_under_a_native_syntax_is_refused(tmp_path: Path) -> None:
    # Found by the fuzzer (mutation "encapsulated/native-as-fragments"): the undefined-length check
    # never fired, because walking the dataset had already converted the raw element
    data = part10_bytes(ct_dataset(16, 16))
    offset = _pixel_header(data)
    (length,) = struct.unpack_from("<I", data, offset + 8)
    pixels = data[offset + 12 : offset + 12 + length]
    item = b"\xfe\xff\x00\xe0"
    fragments = item + struct.pack("<I", 0) + item + struct.pack("<I", len(pixels)) + pixels
    encapsulated = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + fragments + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    path = tmp_path / "x.dcm"
    path.write_bytes(data[:offset] + encapsulated + data[offset + 12 + length :])
    with pytest.raises(InvalidInstance, match="encapsulated pixel data"):
        inspect_file(path)


def _large_file(tmp_path: Path, rows: int = 2048, cols: int = 2048) -> Path:
    ds = ct_dataset(8, 8)
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = np.full((rows, cols), 1000, dtype=np.uint16).tobytes()
    path = tmp_path / "large.dcm"
    path.write_bytes(part10_bytes(ds))
    return path


def test_pixel_data_is_not_loaded_into_memory(tmp_path: Path) -> None:
    # Walking the dataset used to read every deferred value (and `get_item` the pixel data again),
    # so a 4 GB instance cost 4 GB of the SCP's memory while it was checked
    path = _large_file(tmp_path)  # 8 MiB of pixel data
    tracemalloc.start()
    try:
        facts = inspect_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert facts.instance["rows"] == 2048
    assert peak < 4 * 1024 * 1024, f"inspect_file allocated {peak} bytes for an 8 MiB pixel data"


def test_a_value_left_on_disk_that_runs_past_the_end_is_refused(tmp_path: Path) -> None:
    path = _large_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])  # pixel data cut short; its length field unchanged
    with pytest.raises(InvalidInstance, match="truncated"):
        inspect_file(path)


def test_a_value_left_on_disk_before_the_pixel_data_is_checked_too(tmp_path: Path) -> None:
    # A large value of another element (left on disk like the pixel data) whose length runs past the end
    ds = ct_dataset(8, 8)
    del ds.PixelData
    element = b"\x29\x00\x01\x10OB\x00\x00" + struct.pack("<I", 1 << 20) + b"\0" * 1024  # (0029,1001) OB
    path = tmp_path / "x.dcm"
    path.write_bytes(part10_bytes(ds) + element)
    with pytest.raises(InvalidInstance):
        inspect_file(path)


def test_a_small_value_cut_short_by_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    # pydicom reads a value that the end of the file cuts short without complaint (fuzz mutation
    # "truncate" on a file whose last element is not the pixel data): it used to be stored
    ds = ct_dataset(8, 8)
    del ds.PixelData
    data = part10_bytes(ds) + b"\x29\x00\x01\x10LO\x20\x00" + b"0123456789"  # (0029,1001) LO, 32 bytes declared
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    with pytest.raises(InvalidInstance, match="truncated"):
        inspect_file(path)


def test_native_pixel_data_under_an_encapsulated_syntax_is_refused(tmp_path: Path) -> None:
    # Fuzz mutation "encapsulated/native-under-encapsulated-syntax" (and C-STORE of a native data
    # set on a JPEG or RLE presentation context): PS3.5 A.4 wants undefined-length fragments
    ds = ct_dataset(16, 16)
    data = part10_bytes(ds)
    explicit, rle = b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.5\x00"
    assert data.count(explicit) == 1 and len(explicit) == len(rle)
    path = tmp_path / "x.dcm"
    path.write_bytes(data.replace(explicit, rle))
    with pytest.raises(InvalidInstance, match=r"native \(defined-length\) pixel data"):
        inspect_file(path)


def test_a_sop_class_other_than_the_requests_is_refused_with_0xa900(tmp_path: Path) -> None:
    from service.dicom.handlers import DATASET_DOES_NOT_MATCH_SOP_CLASS, status_dataset
    from service.dicomfile import SopClassMismatch
    from service.ingest import IngestResult, IngestStatus

    data = part10_bytes(ct_dataset(8, 8))
    ct, mr = b"1.2.840.10008.5.1.4.1.1.2\x00", b"1.2.840.10008.5.1.4.1.1.4\x00"
    path = tmp_path / "x.dcm"
    path.write_bytes(data.replace(ct, mr, 1))  # the file meta's (for C-STORE: the request's) class
    with pytest.raises(SopClassMismatch):
        inspect_file(path)
    result = IngestResult(IngestStatus.SOP_CLASS_MISMATCH, "x")
    assert status_dataset(result).Status == DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900


def test_a_stale_media_storage_sop_instance_uid_is_tolerated(tmp_path: Path) -> None:
    # Seen in real files (pydicom's rtplan.dcm, rtdose.dcm): the data set's UID is catalogued
    ds = ct_dataset(8, 8)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    path = tmp_path / "x.dcm"
    path.write_bytes(part10_bytes(ds))
    assert inspect_file(path).instance["sop_instance_uid"] == ds.SOPInstanceUID


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("Rows", 0, "Rows must be at least 1"),
        ("Columns", 0, "Columns must be at least 1"),
        ("SamplesPerPixel", 0, "SamplesPerPixel must be at least 1"),
        ("BitsAllocated", 0, "BitsAllocated must be 1 or a multiple of 8"),
        ("BitsAllocated", 12, "BitsAllocated must be 1 or a multiple of 8"),
        ("BitsStored", 17, "BitsStored must be between 1 and BitsAllocated"),
        ("NumberOfFrames", -1, "NumberOfFrames is not a non-negative integer"),
    ],
)
def test_an_image_description_that_describes_no_image_is_refused(
    tmp_path: Path, keyword: str, value: int, reason: str
) -> None:
    # Fuzz mutation "dimensions": with 0 rows (or samples, or bits) the image needs 0 bytes, so the
    # pixel data length check passed whatever the pixel data held, and the instance was stored
    ds = ct_dataset(8, 8)
    setattr(ds, keyword, value)
    path = tmp_path / "x.dcm"
    path.write_bytes(part10_bytes(ds))
    with pytest.raises(InvalidInstance, match=reason):
        inspect_file(path)


def test_a_value_that_runs_past_its_sequence_is_refused(tmp_path: Path) -> None:
    # pydicom parses a defined-length sequence from a copy of its value and reads an element that
    # runs past it cut short; the file goes on (pixel data follows), so only the sequence bounds it
    from pydicom.dataset import Dataset

    ds = ct_dataset(8, 8)
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    ds.ReferencedImageSequence = [item]
    data = bytearray(part10_bytes(ds))
    at = data.index(b"\x08\x00\x55\x11UI")  # (0008,1155) UI inside the item
    struct.pack_into("<H", data, at + 6, 200)  # 200 bytes: past the item and the sequence
    path = tmp_path / "x.dcm"
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidInstance, match="truncated"):
        inspect_file(path)


def _nested(depth: int) -> Any:
    from pydicom.dataset import Dataset

    ds = ct_dataset(8, 8)
    inner: Any = ds
    for _ in range(depth):
        item = Dataset()
        item.ValueType = "TEXT"
        inner.ContentSequence = [item]
        inner = item
    return ds


def test_sequences_nested_deeper_than_the_limit_are_refused(tmp_path: Path) -> None:
    # Fuzz mutation "deep-sequence": 300 defined-length levels were stored, then WADO-RS metadata
    # of the instance failed with a RecursionError (HTTP 500)
    from service.dicomfile import MAX_SEQUENCE_DEPTH

    path = tmp_path / "x.dcm"
    path.write_bytes(part10_bytes(_nested(MAX_SEQUENCE_DEPTH)))
    assert inspect_file(path).instance["rows"] == 8
    path.write_bytes(part10_bytes(_nested(MAX_SEQUENCE_DEPTH + 1)))
    with pytest.raises(InvalidInstance, match="nested deeper"):
        inspect_file(path)


def test_metadata_of_a_value_its_vr_cannot_hold_is_given_as_un() -> None:
    # Fuzz mutation "flip": a DS "0.3125\\0.3125" with the backslash flipped to "|" is stored as
    # sent (such values are common in real files); its WADO-RS metadata was an HTTP 500
    import base64

    from service.dicomweb import metadata

    ds = ct_dataset(8, 8)
    ds.PixelSpacing = [0.3125, 0.3125]
    ds.SliceThickness = "1.0"
    data = part10_bytes(ds)
    assert data.count(b"0.3125\\0.3125") == 1
    out = metadata(data.replace(b"0.3125\\0.3125", b"0.3125|0.3125"), "http://archive/i", "1.2.840.10008.1.2.1")
    assert out["00280030"] == {"vr": "UN", "InlineBinary": base64.b64encode(b"0.3125|0.3125").decode()}
    assert out["00180050"] == {"vr": "DS", "Value": [1.0]}
    assert out["00280010"] == {"vr": "US", "Value": [8]}


def test_a_number_of_frames_that_is_no_number_is_refused_for_encapsulated_data_too(tmp_path: Path) -> None:
    # Fuzz mutation "dimensions/frames" on JPEG and RLE files: "abc" was stored (the fragments are
    # not decoded at ingest), then WADO-RS frames of the instance failed with HTTP 500
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    ds = dcmread(str(get_testdata_file("SC_rgb_rle_2frame.dcm")))
    data = part10_bytes(ds)
    assert data.count(b"(\x00\x08\x00IS\x02\x002 ") == 1  # (0028,0008) IS "2 "
    path = tmp_path / "x.dcm"
    path.write_bytes(data.replace(b"(\x00\x08\x00IS\x02\x002 ", b"(\x00\x08\x00IS\x04\x00abc "))
    with pytest.raises(InvalidInstance, match="NumberOfFrames"):
        inspect_file(path)


def test_frames_of_a_stored_instance_whose_number_of_frames_is_no_number_are_406() -> None:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from service.dicomweb import ResourceError, frames

    data = part10_bytes(dcmread(str(get_testdata_file("SC_rgb_rle_2frame.dcm"))))
    bad = data.replace(b"(\x00\x08\x00IS\x02\x002 ", b"(\x00\x08\x00IS\x04\x00abc ")
    with pytest.raises(ResourceError) as raised:
        frames(bad, [1])
    assert raised.value.status == 406


def test_a_uid_with_a_nul_inside_is_refused_not_catalogued_without_it(tmp_path: Path) -> None:
    # Fuzz mutation "bad-uid": SOP Instance UID "1.2\0" "3" was catalogued as "1.23", a UID the file
    # does not hold (and four different inputs became duplicates of each other); a trailing NUL is padding
    ds = ct_dataset(8, 8, sop_uid="1.2.3.4")
    data = part10_bytes(ds)
    path = tmp_path / "x.dcm"
    path.write_bytes(
        data.replace(b"\x08\x00\x18\x00UI\x08\x001.2.3.4\x00", b"\x08\x00\x18\x00UI\x08\x001.2\x003.4\x00")
    )
    with pytest.raises(InvalidInstance, match="malformed SOPInstanceUID"):
        inspect_file(path)
    path.write_bytes(data)
    assert inspect_file(path).instance["sop_instance_uid"] == "1.2.3.4"
