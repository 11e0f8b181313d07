"""Reading images for the codec: DICOM pixel data (raw stored words or decoded), PNG and TIFF.

Two views of DICOM pixel data exist here and must not be confused:

* `native_pixel_array` / `write_native_pixel_bytes`: the exact stored words of uncompressed
  (native) pixel data, bits above BitsStored included, so that the archive can rebuild the
  PixelData value byte for byte.  This is what the service compresses.
* `decoded_pixel_array`: what pydicom's decoders make of any transfer syntax (masked to
  BitsStored, sign-extended), minus the colour conversion.  Used for training and benchmarks.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from lvpnet.errors import UnsupportedInputError

__all__ = [
    "decoded_pixel_array",
    "iter_corpus_frames",
    "native_pixel_array",
    "pixel_layout",
    "read_image",
    "write_native_pixel_bytes",
]

LOGGER = logging.getLogger(__name__)

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
# Every other transfer syntax encapsulates its pixel data (compressed, or fragments of raw bytes).
# Deflate is native here because pydicom inflates the whole dataset while reading it.
NATIVE_TRANSFER_SYNTAXES = frozenset({IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE})

# Photometric interpretations whose native encoding shares chroma between pixels: the stored
# samples are not one per pixel, so they do not fit the (rows, cols, 3) array the codec takes.
SUBSAMPLED_PHOTOMETRICS = frozenset({"YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420"})

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})
CODEC_DTYPES = frozenset({np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.uint16), np.dtype(np.int16)})


class _OutOfScopeError(UnsupportedInputError):
    """A readable image the codec does not take (1-bit, 32-bit, float, alpha...).

    Private so that `iter_corpus_frames` can skip these quietly while still warning about
    files that could not be read at all; callers only ever need `UnsupportedInputError`.
    """


# --------------------------------------------------------------------------------------------
# DICOM: layout and native (uncompressed) pixel data


def _int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    """An integer attribute; missing or empty values give `default` (e.g. NumberOfFrames)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    return int(value)


def _transfer_syntax(ds: pydicom.Dataset) -> str:
    """The dataset's transfer syntax UID, inferred from how it was read when file meta is missing."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return str(uid)
    # Files without a meta header (read with force=True) can only hold native pixel data;
    # pydicom remembers the encoding it decoded them with.
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little is None:
        raise ValueError("dataset has no (0002,0010) Transfer Syntax UID and no known encoding")
    if not little:
        return EXPLICIT_VR_BE
    return IMPLICIT_VR_LE if implicit else EXPLICIT_VR_LE


def _pixel_keyword(ds: pydicom.Dataset) -> str | None:
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            return keyword
    return None


def pixel_layout(ds: pydicom.Dataset) -> dict[str, Any]:
    """The facts about a dataset's pixel data needed to read or rebuild it.

    Keys: rows, cols, frames, samples, bits_allocated, bits_stored, signed, photometric,
    planar_configuration, big_endian, expected_nbytes (size of the native encoding, pad byte
    excluded), plus transfer_syntax, native (uncompressed transfer syntax), pixel_keyword and
    swap_8bit_words (8-bit data in a big endian OW element: bytes swapped in pairs).
    Raises ValueError when Rows, Columns or BitsAllocated is missing.
    """
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if missing:
        raise ValueError(f"incomplete Image Pixel module: missing {', '.join(missing)}")
    transfer_syntax = _transfer_syntax(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = max(1, _int(ds, "NumberOfFrames", 1))  # 0 or missing means one frame, as pydicom reads it
    samples = _int(ds, "SamplesPerPixel", 1)
    bits_allocated = int(ds.BitsAllocated)
    bits_stored = _int(ds, "BitsStored", bits_allocated)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    planar = _int(ds, "PlanarConfiguration", 0) if samples > 1 else 0
    big_endian = transfer_syntax == EXPLICIT_VR_BE
    keyword = _pixel_keyword(ds)

    n_values = rows * cols * frames * samples
    if bits_allocated == 1:
        expected = (n_values + 7) // 8  # bit-packed across frame boundaries
    elif photometric in SUBSAMPLED_PHOTOMETRICS and samples == 3:
        # 4:2:2 stores Y Y Cb Cr for each pair of pixels; 4:2:0 (retired) half as much chroma again
        per_pixel = 2 if photometric.endswith("422") else 1.5
        expected = int(rows * cols * frames * per_pixel) * (bits_allocated // 8)
    else:
        expected = n_values * ((bits_allocated + 7) // 8)

    # Big endian 8-bit data in an OW element is stored as 16-bit words: each byte pair is swapped.
    swap_8bit_words = False
    if big_endian and bits_allocated == 8 and keyword == "PixelData":
        swap_8bit_words = ds["PixelData"].VR == "OW"

    return {
        "rows": rows,
        "cols": cols,
        "frames": frames,
        "samples": samples,
        "bits_allocated": bits_allocated,
        "bits_stored": bits_stored,
        "signed": _int(ds, "PixelRepresentation", 0) == 1,
        "photometric": photometric,
        "planar_configuration": planar,
        "big_endian": big_endian,
        "expected_nbytes": expected,
        "transfer_syntax": transfer_syntax,
        "native": transfer_syntax in NATIVE_TRANSFER_SYNTAXES,
        "pixel_keyword": keyword,
        "swap_8bit_words": swap_8bit_words,
    }


def _out_of_scope_reason(layout: dict[str, Any]) -> str | None:
    """Why the codec does not take this layout as native words, or None if it does."""
    if layout["pixel_keyword"] is None:
        return "no pixel data"
    if layout["pixel_keyword"] != "PixelData":
        return f"floating point pixel data ({layout['pixel_keyword']})"
    if layout["bits_allocated"] not in (8, 16):
        return f"BitsAllocated {layout['bits_allocated']} (8 or 16 supported)"
    if layout["samples"] not in (1, 3):
        return f"SamplesPerPixel {layout['samples']} (1 or 3 supported)"
    if layout["samples"] == 3 and layout["photometric"] in SUBSAMPLED_PHOTOMETRICS:
        return f"chroma-subsampled photometric interpretation {layout['photometric']}"
    return None


def native_pixel_array(ds: pydicom.Dataset) -> np.ndarray | None:
    """The stored words of native (uncompressed) pixel data, exactly as in the PixelData bytes.

    Unlike `ds.pixel_array`, nothing is masked to BitsStored, sign-extended or colour-converted.
    Shape (rows, cols), (frames, rows, cols) when NumberOfFrames > 1, with a trailing samples
    axis of 3 for colour (planar configuration 1 is interleaved on reading); dtype uint8/int8/
    uint16/int16 from BitsAllocated and PixelRepresentation, native byte order.  Bytes past the
    expected length (pad byte, trailing junk) are ignored.

    Returns None for data the codec does not take as words: encapsulated transfer syntaxes, no
    PixelData, float pixel data, BitsAllocated other than 8/16 (1-bit, 32-bit), SamplesPerPixel
    other than 1/3, chroma-subsampled YBR_*_422/420, and big endian 8-bit OW data of odd length
    (its pad byte sits inside the last word, so the words cannot be rebuilt from the values).
    Raises ValueError for malformed data: PixelData shorter than the layout needs (a damaged
    file is not a layout choice: returning None would pass it off as merely out of scope),
    BitsStored outside 1..BitsAllocated, or PlanarConfiguration other than 0/1.
    """
    layout = pixel_layout(ds)
    if not layout["native"] or _out_of_scope_reason(layout) is not None:
        return None
    rows, cols, frames, samples = layout["rows"], layout["cols"], layout["frames"], layout["samples"]
    bits_allocated, nbytes = layout["bits_allocated"], layout["expected_nbytes"]
    if layout["swap_8bit_words"] and nbytes % 2:
        return None
    if not 1 <= layout["bits_stored"] <= bits_allocated:
        raise ValueError(f"BitsStored {layout['bits_stored']} outside 1..BitsAllocated {bits_allocated}")
    if layout["planar_configuration"] not in (0, 1):
        raise ValueError(f"PlanarConfiguration {layout['planar_configuration']} is neither 0 nor 1")
    buffer = ds.PixelData or b""
    if len(buffer) < nbytes:
        raise ValueError(
            f"PixelData holds {len(buffer)} bytes, fewer than the {nbytes} that {frames} frame(s) of "
            f"{rows}x{cols}x{samples} samples at {bits_allocated} bits need"
        )

    itemsize = bits_allocated // 8
    kind = "i" if layout["signed"] else "u"
    if layout["swap_8bit_words"]:
        words = np.frombuffer(buffer, dtype=">u2", count=nbytes // 2)
        stored = words.astype("<u2").view(f"{kind}1")
    else:
        order = ">" if layout["big_endian"] and itemsize == 2 else "<"
        stored = np.frombuffer(buffer, dtype=f"{order}{kind}{itemsize}", count=nbytes // itemsize)
    # Always copy into native byte order: the result must not alias (or pin) the dataset's buffer.
    values = stored.astype(np.dtype(f"{kind}{itemsize}"))

    if samples > 1 and layout["planar_configuration"] == 1:
        # Each frame holds a full plane per sample: R..., G..., B...
        array = values.reshape(frames, samples, rows, cols).transpose(0, 2, 3, 1)
        array = np.ascontiguousarray(array)
    else:
        array = values.reshape(frames, rows, cols, samples)
    if samples == 1:
        array = array[..., 0]
    return array[0] if frames == 1 else array


def write_native_pixel_bytes(
    arr: np.ndarray,
    *,
    planar_configuration: int = 0,
    big_endian: bool = False,
    swap_8bit_words: bool = False,
) -> bytes:
    """The native PixelData bytes of `arr`: the exact inverse of `native_pixel_array`.

    `write_native_pixel_bytes(native_pixel_array(ds), planar_configuration=..., big_endian=...,
    swap_8bit_words=...)` (values from `pixel_layout`) equals `ds.PixelData[:expected_nbytes]`.
    With planar_configuration=1 the last axis must be the 3 samples.  No pad byte is added.
    """
    array = np.asarray(arr)
    if array.dtype.kind not in "ui" or array.dtype.itemsize not in (1, 2):
        raise ValueError(f"dtype {array.dtype} is not uint8/int8/uint16/int16")
    if planar_configuration == 1:
        if array.ndim not in (3, 4) or array.shape[-1] != 3:
            raise ValueError(f"planar configuration 1 needs a trailing axis of 3 samples, got {array.shape}")
        array = np.moveaxis(array, -1, -3)  # (..., rows, cols, 3) -> (..., 3, rows, cols)
    elif planar_configuration != 0:
        raise ValueError(f"planar configuration {planar_configuration} is neither 0 nor 1")
    target = array.dtype.newbyteorder(">" if big_endian else "<")  # a no-op for 8-bit types
    data = np.ascontiguousarray(array, dtype=target).tobytes()
    if swap_8bit_words:
        if array.dtype.itemsize != 1 or len(data) % 2:
            raise ValueError("swap_8bit_words needs 8-bit samples of even total length")
        data = np.frombuffer(data, dtype="<u2").astype(">u2").tobytes()
    return data


# --------------------------------------------------------------------------------------------
# DICOM: decoded pixel data (any transfer syntax)


def decoded_pixel_array(ds: pydicom.Dataset) -> np.ndarray:
    """Decoded stored values for any transfer syntax, as pydicom 3 gives them without colour conversion.

    Same shape conventions as `native_pixel_array`; signed data stays int8/int16; values are masked
    to BitsStored and sign-extended (pydicom's processing), so high-bit garbage is gone: use
    `native_pixel_array` for archival.  YBR_FULL(_422) stays YBR (pydicom's YBR->RGB conversion is
    not invertible in integers); YBR_RCT/ICT come out as the JPEG 2000 decoder's inverse MCT makes
    them.  Big endian arrays are returned in native byte order.  Decoder errors propagate.
    """
    from pydicom.pixels import as_pixel_options, get_decoder

    # Equivalent to pydicom.pixels.pixel_array(ds, as_rgb=False), but that requires file meta;
    # going through the decoder directly also serves files read without a meta header.
    # as_rgb=False is pydicom 3.0's decoding option that skips the YBR_FULL -> RGB conversion
    # while keeping the other processing (sign correction, unused-bit masking).
    decoder = get_decoder(_transfer_syntax(ds))
    array, _ = decoder.as_array(ds, validate=True, **as_pixel_options(ds, as_rgb=False))
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))  # pydicom keeps '>i2' for big endian data
    return np.ascontiguousarray(array)


# --------------------------------------------------------------------------------------------
# Files


def _sniff(path: Path) -> str | None:
    """'dicom', 'png', 'tiff' or None, from the file's first bytes (the suffix only for DICOM)."""
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return None
    # DICOM first: a preamble may itself hold a TIFF header (dual-format files, pydicom's tests).
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head[:4] in TIFF_SIGNATURES:
        return "tiff"
    # DICOM files without the 128-byte preamble exist; trust the suffix for those.
    if path.suffix.lower() in DICOM_SUFFIXES and len(head) >= 8:
        return "dicom"
    return None


def _read_dicom(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        ds = pydicom.dcmread(path, force=True)
        if _pixel_keyword(ds) is None:
            # Checked before the layout: structured reports, plans etc. are not broken images.
            raise _OutOfScopeError(f"{path}: DICOM file without pixel data")
        layout = pixel_layout(ds)
    except (InvalidDicomError, ValueError, OSError, EOFError, KeyError, TypeError) as exc:
        raise UnsupportedInputError(f"{path}: not a readable DICOM file ({exc})") from exc

    reason = _out_of_scope_reason(layout)
    array: np.ndarray | None = None
    source = "native"
    if layout["native"]:
        try:
            array = native_pixel_array(ds)
        except ValueError as exc:
            raise UnsupportedInputError(f"{path}: malformed pixel data ({exc})") from exc
    if array is None:
        # Native layouts the codec cannot take word for word but whose decoded values it can
        # (4:2:2 chroma, odd-length swapped 8-bit), and every compressed transfer syntax.
        subsampled = layout["samples"] == 3 and layout["photometric"] in SUBSAMPLED_PHOTOMETRICS
        if reason is not None and not subsampled:
            raise _OutOfScopeError(f"{path}: {reason} is outside the codec's scope")
        source = "decoded"
        try:
            array = decoded_pixel_array(ds)
        except Exception as exc:  # decoders raise anything from RuntimeError to struct.error
            raise UnsupportedInputError(
                f"{path}: cannot decode {layout['transfer_syntax']} pixel data ({type(exc).__name__}: {exc})"
            ) from exc
        if array.dtype not in CODEC_DTYPES:
            raise _OutOfScopeError(f"{path}: decoded dtype {array.dtype} is outside the codec's scope")

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value) if value not in (None, "") else None

    info: dict[str, Any] = {
        "format": "DICOM",
        "source": source,
        "bits_stored": layout["bits_stored"],
        "bits_allocated": layout["bits_allocated"],
        "signed": layout["signed"],
        "color": "RGB" if layout["samples"] == 3 else "MONOCHROME",
        "photometric": layout["photometric"],
        "planar_configuration": layout["planar_configuration"],
        "rows": layout["rows"],
        "cols": layout["cols"],
        "frames": layout["frames"],
        "samples": layout["samples"],
        "transfer_syntax": layout["transfer_syntax"],
        "big_endian": layout["big_endian"],
        "modality": text("Modality"),
        "sop_instance_uid": text("SOPInstanceUID"),
        "series_instance_uid": text("SeriesInstanceUID"),
        "study_instance_uid": text("StudyInstanceUID"),
    }
    return array, info


def _plain_info(fmt: str, array: np.ndarray, bits: int, photometric: str, frames: int) -> dict[str, Any]:
    samples = 3 if photometric == "RGB" else 1
    return {
        "format": fmt,
        "source": "decoded",
        "bits_stored": bits,
        "bits_allocated": 8 * array.dtype.itemsize,
        "signed": array.dtype.kind == "i",
        "color": "RGB" if samples == 3 else "MONOCHROME",
        "photometric": photometric,
        "planar_configuration": 0,
        "rows": array.shape[-3] if samples == 3 else array.shape[-2],
        "cols": array.shape[-2] if samples == 3 else array.shape[-1],
        "frames": frames,
        "samples": samples,
        "modality": None,
        "sop_instance_uid": None,
        "series_instance_uid": None,
        "study_instance_uid": None,
    }


PNG_COLOR_TYPES = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}


def _read_png(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    data = path.read_bytes()
    # IHDR is always first: signature(8) length(4) "IHDR"(4) width(4) height(4) depth(1) colour(1)
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise UnsupportedInputError(f"{path}: truncated PNG header")
    depth, color_type = data[24], data[25]
    if color_type not in (0, 2):
        name = PNG_COLOR_TYPES.get(color_type, str(color_type))
        raise _OutOfScopeError(f"{path}: PNG colour type {name} is outside the codec's scope (grey or RGB)")
    if depth not in (8, 16):
        raise _OutOfScopeError(f"{path}: PNG bit depth {depth} is outside the codec's scope (8 or 16)")
    try:
        if color_type == 2 and depth == 16:
            # Pillow reduces 16-bit RGB to 8 bits on reading: use libpng through imagecodecs.
            import imagecodecs

            array = np.asarray(imagecodecs.png_decode(data))
        else:
            from PIL import Image

            with Image.open(path) as image:
                image.load()
                array = np.asarray(image)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError
        raise UnsupportedInputError(f"{path}: cannot read PNG ({type(exc).__name__}: {exc})") from exc
    if depth == 16:
        # Pillow gives mode "I;16" (uint16) or, in some versions, "I" (int32 holding 0..65535).
        if array.size and (array.min() < 0 or array.max() > 0xFFFF):
            raise UnsupportedInputError(f"{path}: 16-bit PNG decoded to values outside 0..65535")
        array = array.astype(np.uint16)
    else:
        array = array.astype(np.uint8, copy=False)
    expected_ndim = 3 if color_type == 2 else 2
    if array.ndim != expected_ndim or (color_type == 2 and array.shape[-1] != 3):
        raise UnsupportedInputError(f"{path}: PNG decoded to unexpected shape {array.shape}")
    photometric = "RGB" if color_type == 2 else "MONOCHROME2"
    return np.ascontiguousarray(array), _plain_info("PNG", array, depth, photometric, 1)


TIFF_PHOTOMETRICS = {
    "MINISBLACK": "MONOCHROME2",
    "MINISWHITE": "MONOCHROME1",
    "RGB": "RGB",
    "PALETTE": "PALETTE COLOR",
}


def _read_tiff(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise UnsupportedInputError(f"{path}: TIFF without images")
            series = tif.series[0]
            page = series.keyframe
            photometric_name = getattr(page.photometric, "name", str(page.photometric))
            bits = int(page.bitspersample)
            extrasamples = tuple(page.extrasamples or ())
            axes = series.axes
            array = series.asarray()
    except UnsupportedInputError:
        raise
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, KeyError, codec errors
        raise UnsupportedInputError(f"{path}: cannot read TIFF ({type(exc).__name__}: {exc})") from exc

    if array.dtype not in CODEC_DTYPES:
        raise _OutOfScopeError(f"{path}: TIFF dtype {array.dtype} is outside the codec's scope")
    photometric = TIFF_PHOTOMETRICS.get(photometric_name)
    if photometric is None:
        raise _OutOfScopeError(f"{path}: TIFF photometric {photometric_name} is outside the codec's scope")
    if any(int(extra) in (1, 2) for extra in extrasamples):  # associated / unassociated alpha
        raise _OutOfScopeError(f"{path}: TIFF with an alpha channel is outside the codec's scope")
    # Put a samples axis last ("SYX" is planar configuration 2), then fold leading axes into frames.
    if "S" in axes:
        if axes.endswith("SYX"):
            array = np.moveaxis(array, axes.index("S"), -1)
        elif not axes.endswith("YXS"):
            raise UnsupportedInputError(f"{path}: TIFF axes {axes} not understood")
        axes = axes.replace("S", "") + "S"
    if not axes.rstrip("S").endswith("YX"):
        raise UnsupportedInputError(f"{path}: TIFF axes {axes} not understood")
    has_samples = axes.endswith("S")
    if has_samples and photometric != "RGB":
        # Grey samples without alpha are independent planes (e.g. a stack written as one page).
        array, has_samples = np.moveaxis(array, -1, -3), False
    if (photometric == "RGB") != (has_samples and array.shape[-1] == 3):
        raise _OutOfScopeError(
            f"{path}: TIFF with {array.shape[-1] if has_samples else 1} samples and photometric "
            f"{photometric_name} is outside the codec's scope (grey, or RGB with 3 samples)"
        )
    plane_shape = array.shape[-3:] if has_samples else array.shape[-2:]
    array = array.reshape((-1, *plane_shape))
    frames = array.shape[0]
    if frames == 1:
        array = array[0]
    bits = bits if 1 <= bits <= 8 * array.dtype.itemsize else 8 * array.dtype.itemsize
    return np.ascontiguousarray(array), _plain_info("TIFF", array, bits, photometric, frames)


def read_image(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM, PNG or TIFF file as the array the codec compresses, plus facts about it.

    DICOM: `native_pixel_array` when the layout allows (raw stored words), else
    `decoded_pixel_array`.  PNG: 8/16-bit grey or RGB (16-bit stays uint16).  TIFF: 8/16-bit
    grey or RGB, pages folded into frames.  Shapes as for `native_pixel_array`.  The dict holds
    bits_stored, signed, color ("MONOCHROME" or "RGB"), modality, sop_instance_uid,
    series_instance_uid (None where the format has none), frames, samples, photometric and more.
    Raises UnsupportedInputError for unreadable files and images outside the codec's scope.
    """
    path = Path(path)
    if not path.is_file():
        raise UnsupportedInputError(f"{path}: no such file")
    kind = _sniff(path)
    if kind == "dicom":
        return _read_dicom(path)
    if kind == "png":
        return _read_png(path)
    if kind == "tiff":
        return _read_tiff(path)
    raise UnsupportedInputError(f"{path}: not a DICOM, PNG or TIFF file")


def _frame_digest(frame: np.ndarray) -> bytes:
    digest = hashlib.sha1(frame.tobytes())
    digest.update(repr(frame.shape).encode())
    digest.update(frame.dtype.str.encode())
    return digest.digest()


def iter_corpus_frames(root: Path) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """Yield ("relative/path#frame", frame, info) for every distinct frame under `root`.

    Walks `root` recursively in sorted order (hidden files skipped).  Frames are (rows, cols) or
    (rows, cols, 3) as `read_image` gives them; a frame whose bytes, shape and dtype were already
    yielded is skipped (the same image in several transfer syntaxes).  Non-image files and images
    outside the codec's scope (1-bit, 32-bit, float, alpha) are skipped quietly; image files that
    cannot be read are skipped with a warning.  `info` is `read_image`'s plus file, frame.
    """
    root = Path(root)
    seen: set[bytes] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            if _sniff(path) is None:
                continue
            relative = path.relative_to(root).as_posix()
            try:
                array, info = read_image(path)
            except _OutOfScopeError as exc:
                LOGGER.debug("skipping %s", exc)
                continue
            except UnsupportedInputError as exc:
                LOGGER.warning("skipping unreadable image: %s", exc)
                continue
            frames = [array] if info["frames"] == 1 else list(array)
            for index, frame in enumerate(frames):
                frame = np.ascontiguousarray(frame)
                digest = _frame_digest(frame)
                if digest in seen:
                    continue
                seen.add(digest)
                yield f"{relative}#{index}", frame, {**info, "file": relative, "frame": index}
