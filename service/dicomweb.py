"""WADO-RS views of one verified original file: metadata (DICOM JSON with BulkDataURIs), frames
and bulk data values.  Pure functions of the file's bytes (pydicom; no torch)."""

from __future__ import annotations

import base64
import io
import re
import warnings
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian

from lvpnet.imageio import pixel_layout

PIXEL_DATA = 0x7FE00010
BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
BULK_THRESHOLD = 1024
WORD_BYTES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
FRAME_LIST = re.compile(r"^[1-9][0-9]{0,8}(,[1-9][0-9]{0,8})*$")


class ResourceError(Exception):
    """`status` is the HTTP status the request gets (400 malformed, 404 absent, 406 not offered)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _read(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data))


def metadata(data: bytes, instance_url: str, transfer_syntax_uid: str) -> dict[str, Any]:
    """The instance as DICOM JSON: top-level binary values over 1 KiB and the pixel data become
    BulkDataURIs (`{instance_url}/bulkdata/{tag}`); smaller and nested ones are inline."""
    ds = _read(data)
    inline = Dataset()
    bulk: dict[int, str] = {}
    for element in ds:
        tag = int(element.tag)
        if tag == PIXEL_DATA or (element.VR in BULK_VRS and _length(element) > BULK_THRESHOLD):
            bulk[tag] = element.VR if element.VR != "UN" else "UN"
        else:
            inline.add(element)
    inline.set_original_encoding(ds.is_implicit_VR, ds.is_little_endian, ds.original_character_set)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out: dict[str, Any] = inline.to_json_dict(bulk_data_threshold=1 << 40)
        except Exception:
            # A value its VR cannot represent in DICOM JSON (a DS "0.3125|0.3125", an IS "1.5"): the
            # archive keeps such instances as sent, so their metadata is given element by element
            out = _json_dataset(inline)
    for tag, vr in bulk.items():
        out[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{instance_url}/bulkdata/{tag:08X}"}
    # What the instance is stored as: asked for with transfer-syntax=*, it comes back unchanged
    out["00083002"] = {"vr": "UI", "Value": [transfer_syntax_uid]}
    return dict(sorted(out.items()))


def _json_dataset(ds: Dataset) -> dict[str, Any]:
    return {f"{int(element.tag):08X}": _json_element(element) for element in ds}


def _json_element(element: Any) -> dict[str, Any]:
    """One element as DICOM JSON; a value that does not fit its VR becomes UN with its bytes inline
    (PS3.18 F.2: UN values are InlineBinary), so nothing is dropped and nothing is made up."""
    if element.VR == "SQ":
        return {"vr": "SQ", "Value": [_json_dataset(item) for item in element.value or []]}
    try:
        return dict(element.to_json_dict(None, 1 << 40))
    except Exception:
        return {"vr": "UN", "InlineBinary": base64.b64encode(_value_bytes(element.value)).decode("ascii")}


def _value_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).encode("utf-8", "replace")
    return str(value if value is not None else "").encode("utf-8", "replace")


def _length(element: Any) -> int:
    value = element.value
    return len(value) if isinstance(value, bytes | bytearray) else 0


def parse_frame_list(text: str) -> list[int]:
    if not FRAME_LIST.match(text):
        raise ResourceError(400, "frame list must be comma-separated frame numbers starting at 1")
    return [int(n) for n in text.split(",")]


def frames(data: bytes, numbers: list[int]) -> list[bytes]:
    """The requested frames as uncompressed little-endian pixel values (Explicit VR LE layout)."""
    ds = _read(data)
    if "PixelData" not in ds:
        raise ResourceError(404, "instance has no pixel data")
    try:
        count = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError) as exc:  # stored before the archive checked it
        raise ResourceError(406, "the instance's NumberOfFrames is not a number: retrieve the instance") from exc
    missing = [n for n in numbers if n > count]
    if missing:
        raise ResourceError(404, f"frame {missing[0]} does not exist (the instance has {count})")
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        layout = pixel_layout(ds)
        if int(ds.BitsAllocated) == 1:
            raise ResourceError(406, "frames of 1-bit pixel data are not offered; retrieve the instance")
        size = int(layout["expected_nbytes"]) // count
        raw = ds.PixelData
        width = 1 if int(ds.BitsAllocated) <= 8 else int(ds.BitsAllocated) // 8
        out = []
        for n in numbers:
            value = raw[(n - 1) * size : n * size]
            if syntax == ExplicitVRBigEndian and width > 1:
                value = np.frombuffer(value, f">u{width}").astype(f"<u{width}").tobytes()
            out.append(bytes(value))
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = np.asarray(ds.pixel_array)
    except Exception as exc:
        raise ResourceError(406, f"no decoder for this instance's pixel data ({type(exc).__name__})") from exc
    if count == 1:
        array = array[np.newaxis]
    return [np.ascontiguousarray(array[n - 1]).astype(array.dtype.newbyteorder("<")).tobytes() for n in numbers]


def bulkdata(data: bytes, tag_text: str) -> bytes:
    """A top-level binary value, little endian."""
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag_text):
        raise ResourceError(400, "bulk data tag must be 8 hexadecimal digits")
    ds = _read(data)
    tag = int(tag_text, 16)
    if tag not in ds:
        raise ResourceError(404, f"instance has no element {tag_text.upper()}")
    element = ds[tag]
    if tag == PIXEL_DATA and ds.file_meta.TransferSyntaxUID.is_compressed:
        raise ResourceError(406, "compressed pixel data: retrieve frames or the instance instead")
    value = element.value
    if not isinstance(value, bytes | bytearray):
        raise ResourceError(404, f"element {tag_text.upper()} holds no bulk data")
    width = WORD_BYTES.get(element.VR)
    if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian and width:
        return np.frombuffer(value, f">u{width}").astype(f"<u{width}").tobytes()
    return bytes(value)
