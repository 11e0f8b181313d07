"""Transfer syntax negotiation and lossless transcoding for retrieval (pydicom and imagecodecs; no torch).

What the archive serves (PS3.18 8.7.3, PS3.4 C-MOVE/C-GET sub-operations):
- the original bytes, for `transfer-syntax=*` or the syntax the instance was received in;
- Explicit VR Little Endian (1.2.840.10008.1.2.1, the DICOMweb default) and Implicit VR Little
  Endian (1.2.840.10008.1.2, for DIMSE peers), decompressing encapsulated originals where pydicom
  has a decoder;
- JPEG-LS lossless (1.2.840.10008.1.2.4.80) and HTJ2K lossless (1.2.840.10008.1.2.4.201).

A transcoded instance is decoded again and its pixels compared with the original's before it
leaves: a lossless transcode that is not lossless is an error, never a response.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)

from service.dicomfile import read_file_meta

ORIGINAL = "*"
TRANSCODE_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless, HTJ2KLossless)
WORD_BYTES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


class TranscodeError(Exception):
    """The instance cannot be given in the requested transfer syntax (no decoder or encoder for
    its pixel data, or a pixel mismatch after transcoding)."""


@dataclass(frozen=True)
class Transcoded:
    data: bytes
    transfer_syntax_uid: str


def transcode(data: bytes, target: str) -> Transcoded:
    """`data` (a verified Part 10 file) in `target` syntax.  The original bytes when they already are."""
    original_syntax = read_file_meta(data[: 64 * 1024]).transfer_syntax_uid
    if target in (ORIGINAL, original_syntax):
        return Transcoded(data, original_syntax)
    if target not in TRANSCODE_TARGETS:
        raise TranscodeError(f"transfer syntax {target} is not offered")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            reference = _pixels(ds)
            _to_native(ds)
            if target in (JPEGLSLossless, HTJ2KLossless) and "PixelData" in ds:
                _compress(ds, UID(target))
            ds.file_meta.TransferSyntaxUID = UID(target)
            buffer = io.BytesIO()
            ds.save_as(
                buffer,
                implicit_vr=target == ImplicitVRLittleEndian,
                little_endian=True,
                enforce_file_format=True,
            )
            out = buffer.getvalue()
            if reference is not None:
                again = _pixels(pydicom.dcmread(io.BytesIO(out)))
                if again is None or not _same_values(again, reference):
                    raise TranscodeError("transcoded pixels differ from the original's")
        except TranscodeError:
            raise
        except Exception as exc:  # no plugin for the pixel data, or data the plugin refuses
            raise TranscodeError(f"cannot transcode to {target} ({type(exc).__name__}: {exc})") from exc
    return Transcoded(out, target)


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values in the same kind and width of integer (byte order aside)."""
    return (a.dtype.kind, a.dtype.itemsize, a.shape) == (b.dtype.kind, b.dtype.itemsize, b.shape) and bool(
        np.array_equal(a, b)
    )


def _pixels(ds: Dataset) -> np.ndarray | None:
    if "PixelData" not in ds:
        return None
    return np.asarray(ds.pixel_array)


def _to_native(ds: Dataset) -> None:
    """Decompress encapsulated pixel data; byte-swap big-endian words to little endian."""
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed:
        # as_rgb=False: keep the photometric interpretation the decoder gives, do not convert
        ds.decompress(as_rgb=False, generate_instance_uid=False)
    elif syntax == ExplicitVRBigEndian:
        # pydicom writes decoded values in any byte order, but keeps other-word values (OW, OF...)
        # as the bytes read: swap those, then declare the data set little endian
        for element in ds.iterall():
            width = WORD_BYTES.get(element.VR)
            if width and element.value:
                element.value = np.frombuffer(element.value, f">u{width}").astype(f"<u{width}").tobytes()
        ds.set_original_encoding(False, True)


def _compress(ds: Dataset, target: UID) -> None:
    if target == JPEGLSLossless:
        ds.compress(target, generate_instance_uid=False)  # pyjpegls
        return
    # HTJ2K: pydicom has no encoder; imagecodecs (OpenJPH) codes one frame per fragment
    import imagecodecs

    array = np.asarray(ds.pixel_array)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.SamplesPerPixel)
    if frames == 1:
        array = array[np.newaxis]
    if samples != 1:
        # A colour codestream would need the YBR_RCT photometric interpretation: not offered
        raise TranscodeError("HTJ2K transcoding is offered for single-sample images only")
    fragments = [imagecodecs.htj2k_encode(np.ascontiguousarray(frame), reversible=True) for frame in array]
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
