"""lvpnet.imageio: raw stored words of native DICOM pixel data, decoded arrays, PNG/TIFF, corpus walking."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from lvpnet.errors import UnsupportedInputError
from lvpnet.imageio import (
    decoded_pixel_array,
    iter_corpus_frames,
    native_pixel_array,
    pixel_layout,
    read_image,
    write_native_pixel_bytes,
)

CORPUS = Path(__file__).resolve().parents[3] / "shared/corpus/dev"
MANIFEST = CORPUS / "MANIFEST.tsv"
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
}
needs_corpus = pytest.mark.skipif(not MANIFEST.exists(), reason=f"development corpus not found at {CORPUS}")


def data_path(name: str) -> str:
    path = get_testdata_file(name)  # pydicom's own test files, or pydicom-data's
    assert path is not None, name
    return str(path)


def load(name: str) -> Dataset:
    return pydicom.dcmread(data_path(name))


def rewrite(ds: Dataset) -> bytes:
    """write_native_pixel_bytes(native_pixel_array(ds)) with the layout's own options."""
    layout = pixel_layout(ds)
    array = native_pixel_array(ds)
    assert array is not None
    return write_native_pixel_bytes(
        array,
        planar_configuration=layout["planar_configuration"],
        big_endian=layout["big_endian"],
        swap_8bit_words=layout["swap_8bit_words"],
    )


def assert_round_trip(ds: Dataset) -> None:
    assert rewrite(ds) == ds.PixelData[: pixel_layout(ds)["expected_nbytes"]]


# ---------------------------------------------------------------------------------------------
# native_pixel_array on pydicom's test files


def test_big_endian_matches_little_endian_copy() -> None:
    big, little = load("MR_small_bigendian.dcm"), load("MR_small.dcm")
    assert pixel_layout(big)["big_endian"] and not pixel_layout(little)["big_endian"]
    a, b = native_pixel_array(big), native_pixel_array(little)
    assert a is not None and b is not None
    assert a.dtype == np.int16 and a.dtype.isnative
    assert a.shape == (64, 64)
    np.testing.assert_array_equal(a, b)
    assert_round_trip(big)
    assert_round_trip(little)
    assert big.PixelData != little.PixelData  # the words really are swapped in the file


def test_signed_16_bit() -> None:
    ds = load("CT_small.dcm")
    array = native_pixel_array(ds)
    assert array is not None
    assert array.dtype == np.int16 and array.shape == (128, 128)
    np.testing.assert_array_equal(array, ds.pixel_array)
    assert_round_trip(ds)


def test_multi_frame_12_bit() -> None:
    ds = load("emri_small.dcm")
    array = native_pixel_array(ds)
    assert array is not None
    assert array.dtype == np.uint16 and array.shape == (10, 64, 64)
    np.testing.assert_array_equal(array, ds.pixel_array)
    np.testing.assert_array_equal(array, native_pixel_array(load("emri_small_big_endian.dcm")))
    assert_round_trip(ds)
    assert_round_trip(load("emri_small_big_endian.dcm"))


@pytest.mark.parametrize(
    ("name", "shape", "dtype"),
    [
        ("SC_rgb.dcm", (100, 100, 3), np.uint8),
        ("SC_rgb_2frame.dcm", (2, 100, 100, 3), np.uint8),
        ("SC_rgb_expb.dcm", (100, 100, 3), np.uint8),
        ("SC_rgb_16bit.dcm", (100, 100, 3), np.uint16),
        ("SC_rgb_expb_16bit_2frame.dcm", (2, 100, 100, 3), np.uint16),
        ("US1_UNCR.dcm", (480, 640, 3), np.uint8),
    ],
)
def test_rgb_planar_0(name: str, shape: tuple[int, ...], dtype: type) -> None:
    ds = load(name)
    assert pixel_layout(ds)["planar_configuration"] == 0
    array = native_pixel_array(ds)
    assert array is not None
    assert array.shape == shape and array.dtype == dtype
    np.testing.assert_array_equal(array, ds.pixel_array)
    assert_round_trip(ds)


@pytest.mark.parametrize("name", ["color-pl.dcm", "ExplVR_BigEnd.dcm"])
def test_rgb_planar_1_comes_back_interleaved(name: str) -> None:
    ds = load(name)
    layout = pixel_layout(ds)
    assert layout["planar_configuration"] == 1 and layout["samples"] == 3
    array = native_pixel_array(ds)
    assert array is not None
    assert array.shape == (layout["rows"], layout["cols"], 3)
    np.testing.assert_array_equal(array, ds.pixel_array)  # pydicom also returns planar 0
    assert_round_trip(ds)
    # Planar 1 bytes are R plane, G plane, B plane.
    rows, cols = layout["rows"], layout["cols"]
    red_plane = np.frombuffer(ds.PixelData, np.uint8, count=rows * cols).reshape(rows, cols)
    np.testing.assert_array_equal(array[..., 0], red_plane)


def test_planar_1_and_planar_0_copies_agree() -> None:
    np.testing.assert_array_equal(native_pixel_array(load("color-pl.dcm")), native_pixel_array(load("color-px.dcm")))


def test_8_bit_mono() -> None:
    ds = load("vlut_04.dcm")
    array = native_pixel_array(ds)
    assert array is not None
    assert array.dtype == np.uint8 and array.shape == (512, 512)
    np.testing.assert_array_equal(array, ds.pixel_array)
    assert_round_trip(ds)


@pytest.mark.parametrize(("big", "little"), [("OBXXXX1A_expb.dcm", "OBXXXX1A.dcm")])
def test_8_bit_big_endian_ow_is_word_swapped(big: str, little: str) -> None:
    ds = load(big)
    layout = pixel_layout(ds)
    assert layout["swap_8bit_words"] and layout["bits_allocated"] == 8
    array = native_pixel_array(ds)
    np.testing.assert_array_equal(array, native_pixel_array(load(little)))
    np.testing.assert_array_equal(array, ds.pixel_array)
    assert_round_trip(ds)
    assert_round_trip(load("OBXXXX1A_expb_2frame.dcm"))


def test_high_bits_above_bits_stored_are_kept() -> None:
    ds = load("CT_small.dcm")
    words = np.frombuffer(ds.PixelData, dtype="<u2").copy()
    ds.BitsStored, ds.HighBit = 12, 11
    words &= 0x0FFF
    words[::7] |= 0xA000  # garbage in bits 13 and 15: neither zero nor a sign extension
    words[3::7] |= 0x5000
    ds.PixelData = words.tobytes()

    array = native_pixel_array(ds)
    assert array is not None and array.dtype == np.int16
    np.testing.assert_array_equal(array.view(np.uint16).ravel(), words)
    assert ds.PixelData == write_native_pixel_bytes(array)
    # pydicom masks to BitsStored and sign-extends: the garbage is lost in decoded_pixel_array.
    decoded = decoded_pixel_array(ds)
    np.testing.assert_array_equal(decoded, (array << 4) >> 4)
    assert not np.array_equal(decoded, array)


def test_high_bits_unsigned_multi_frame() -> None:
    ds = load("emri_small.dcm")
    words = np.frombuffer(ds.PixelData, dtype="<u2").copy()
    words[1::5] |= 0xF000
    ds.PixelData = words.tobytes()
    array = native_pixel_array(ds)
    assert array is not None
    assert int(array.max()) >= 0xF000
    np.testing.assert_array_equal(array.ravel(), words)
    assert_round_trip(ds)


def test_trailing_bytes_are_ignored() -> None:
    padded, plain = load("MR_small_padded.dcm"), load("MR_small.dcm")
    assert len(padded.PixelData) > pixel_layout(padded)["expected_nbytes"]
    np.testing.assert_array_equal(native_pixel_array(padded), native_pixel_array(plain))
    assert_round_trip(padded)

    odd = load("SC_rgb_small_odd.dcm")  # 3x3x3 bytes + pad byte
    assert len(odd.PixelData) == pixel_layout(odd)["expected_nbytes"] + 1
    np.testing.assert_array_equal(native_pixel_array(odd), odd.pixel_array)
    assert_round_trip(odd)


def test_odd_length_8_bit_big_endian_ow_is_not_taken_natively() -> None:
    ds = load("SC_rgb_small_odd_big_endian.dcm")  # pad byte inside the last swapped word
    assert pixel_layout(ds)["swap_8bit_words"]
    assert native_pixel_array(ds) is None
    array, info = read_image(data_path("SC_rgb_small_odd_big_endian.dcm"))
    assert info["source"] == "decoded"
    np.testing.assert_array_equal(array, native_pixel_array(load("SC_rgb_small_odd.dcm")))


@pytest.mark.parametrize("name", ["MR_truncated.dcm"])
def test_pixel_data_too_short_raises(name: str) -> None:
    with pytest.raises(ValueError, match="fewer than"):
        native_pixel_array(load(name))
    ds = load("CT_small.dcm")
    ds.PixelData = ds.PixelData[:-2]
    with pytest.raises(ValueError, match="fewer than"):
        native_pixel_array(ds)
    with pytest.raises(UnsupportedInputError, match="malformed"):
        read_image(data_path(name))


@pytest.mark.parametrize(
    "name",
    [
        "liver_1frame.dcm",  # 1-bit
        "SC_rgb_32bit.dcm",  # 32-bit
        "rtdose.dcm",  # 32-bit
        "SC_ybr_full_422_uncompressed.dcm",  # subsampled chroma
        "JPEG2000.dcm",  # compressed: not native words
        "MR_small_RLE.dcm",
    ],
)
def test_layouts_not_taken_return_none(name: str) -> None:
    assert native_pixel_array(load(name)) is None


def _dataset(transfer_syntax: str, **attrs: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_float_pixel_data_returns_none() -> None:
    ds = _dataset(
        "1.2.840.10008.1.2.1",
        Rows=2,
        Columns=2,
        SamplesPerPixel=1,
        BitsAllocated=32,
        PhotometricInterpretation="MONOCHROME2",
    )
    ds.FloatPixelData = np.zeros(4, np.float32).tobytes()
    assert native_pixel_array(ds) is None


# ---------------------------------------------------------------------------------------------
# write_native_pixel_bytes is the inverse of native_pixel_array


BOUNDS = {"uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767)}


@st.composite
def native_images(draw: st.DrawFn) -> tuple[np.ndarray, int, int, bool, bool]:
    name = draw(st.sampled_from(sorted(BOUNDS)))
    dtype, (low, high) = np.dtype(name), BOUNDS[name]
    frames = draw(st.integers(1, 3))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    samples = draw(st.sampled_from([1, 3]))
    planar = draw(st.sampled_from([0, 1])) if samples == 3 else 0
    big_endian = draw(st.booleans())
    shape = (frames, rows, cols, samples)
    swap = big_endian and dtype.itemsize == 1 and draw(st.booleans()) and np.prod(shape) % 2 == 0
    seed = draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).integers(low, high, size=shape, endpoint=True, dtype=dtype)
    if samples == 1:
        values = values[..., 0]
    if frames == 1:
        values = values[0]
    return values, samples, planar, big_endian, swap


@settings(max_examples=150, deadline=None)
@given(native_images())
def test_write_then_read_is_identity(case: tuple[np.ndarray, int, int, bool, bool]) -> None:
    array, samples, planar, big_endian, swap = case
    frames = array.shape[0] if array.ndim == (4 if samples == 3 else 3) else 1
    rows, cols = array.shape[-3:-1] if samples == 3 else array.shape[-2:]
    data = write_native_pixel_bytes(array, planar_configuration=planar, big_endian=big_endian, swap_8bit_words=swap)
    assert len(data) == array.size * array.dtype.itemsize
    ds = _dataset(
        "1.2.840.10008.1.2.2" if big_endian else "1.2.840.10008.1.2.1",
        Rows=rows,
        Columns=cols,
        NumberOfFrames=frames,
        SamplesPerPixel=samples,
        BitsAllocated=8 * array.dtype.itemsize,
        BitsStored=8 * array.dtype.itemsize,
        HighBit=8 * array.dtype.itemsize - 1,
        PixelRepresentation=int(array.dtype.kind == "i"),
        PhotometricInterpretation="RGB" if samples == 3 else "MONOCHROME2",
    )
    if samples == 3:
        ds.PlanarConfiguration = planar
    ds.add_new("PixelData", "OW" if swap or array.dtype.itemsize == 2 else "OB", data + b"\x00" * (len(data) % 2))
    back = native_pixel_array(ds)
    assert back is not None
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert_round_trip(ds)


def test_write_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        write_native_pixel_bytes(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError):
        write_native_pixel_bytes(np.zeros((2, 2), np.uint8), planar_configuration=1)
    with pytest.raises(ValueError):
        write_native_pixel_bytes(np.zeros((3, 3), np.uint8), swap_8bit_words=True)


def test_write_byte_orders() -> None:
    array = np.array([[0x0102, 0x0304]], np.uint16)
    assert write_native_pixel_bytes(array) == b"\x02\x01\x04\x03"
    assert write_native_pixel_bytes(array, big_endian=True) == b"\x01\x02\x03\x04"
    rgb = np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)
    assert write_native_pixel_bytes(rgb) == bytes([1, 2, 3, 4, 5, 6])
    assert write_native_pixel_bytes(rgb, planar_configuration=1) == bytes([1, 4, 2, 5, 3, 6])
    assert write_native_pixel_bytes(np.array([1, 2, 3, 4], np.uint8), swap_8bit_words=True) == bytes([2, 1, 4, 3])


# ---------------------------------------------------------------------------------------------
# decoded_pixel_array


def test_decoded_keeps_ybr() -> None:
    ds = load("SC_ybr_full_uncompressed.dcm")
    decoded = decoded_pixel_array(ds)
    np.testing.assert_array_equal(decoded, native_pixel_array(ds))
    assert not np.array_equal(decoded, ds.pixel_array)  # pydicom's default converts to RGB


def test_decoded_compressed_ybr_is_not_converted() -> None:
    ds = load("SC_rgb_jpeg_dcmtk.dcm")  # JPEG baseline, YBR_FULL
    decoded = decoded_pixel_array(ds)
    assert decoded.shape == (100, 100, 3)
    np.testing.assert_array_equal(decoded, pydicom.pixels.pixel_array(ds, raw=True))
    assert not np.array_equal(decoded, ds.pixel_array)


@pytest.mark.parametrize(
    ("compressed", "native"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("emri_small_RLE.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        ("SC_rgb_rle_16bit_2frame.dcm", "SC_rgb_16bit_2frame.dcm"),
    ],
)
def test_decoded_lossless_matches_native(compressed: str, native: str) -> None:
    decoded = decoded_pixel_array(load(compressed))
    expected = native_pixel_array(load(native))
    assert expected is not None
    assert decoded.dtype == expected.dtype and decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, expected)


def test_decoded_big_endian_is_native_byte_order() -> None:
    decoded = decoded_pixel_array(load("MR_small_bigendian.dcm"))
    assert decoded.dtype == np.int16 and decoded.dtype.isnative


# ---------------------------------------------------------------------------------------------
# read_image


def test_read_image_dicom_native() -> None:
    array, info = read_image(data_path("CT_small.dcm"))
    assert array.dtype == np.int16 and array.shape == (128, 128)
    assert info["source"] == "native" and info["format"] == "DICOM"
    assert info["bits_stored"] == 16 and info["signed"] is True
    assert info["color"] == "MONOCHROME" and info["modality"] == "CT"
    assert info["sop_instance_uid"] and info["series_instance_uid"]

    rgb, info = read_image(Path(data_path("SC_rgb_2frame.dcm")))
    assert rgb.shape == (2, 100, 100, 3) and info["color"] == "RGB" and info["frames"] == 2


def test_read_image_dicom_compressed() -> None:
    array, info = read_image(data_path("MR_small_RLE.dcm"))
    assert info["source"] == "decoded"
    np.testing.assert_array_equal(array, native_pixel_array(load("MR_small.dcm")))


@pytest.mark.parametrize("name", ["liver_1frame.dcm", "SC_rgb_32bit.dcm", "rtplan.dcm", "SC_rgb_rle_32bit.dcm"])
def test_read_image_dicom_out_of_scope(name: str) -> None:
    with pytest.raises(UnsupportedInputError):
        read_image(data_path(name))


def test_read_image_rejects_other_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(UnsupportedInputError, match="not a DICOM, PNG or TIFF"):
        read_image(text)
    with pytest.raises(UnsupportedInputError):
        read_image(tmp_path / "missing.png")
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\x00" * 50)
    with pytest.raises(UnsupportedInputError):
        read_image(fake)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(UnsupportedInputError):
        read_image(broken)


def test_png_round_trips(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65535, size=(17, 23), endpoint=True, dtype=np.uint16)
    grey16[0, 0], grey16[0, 1] = 65535, 40000  # above int16 range
    grey8 = rng.integers(0, 255, size=(9, 11), endpoint=True, dtype=np.uint8)
    rgb8 = rng.integers(0, 255, size=(9, 11, 3), endpoint=True, dtype=np.uint8)
    cases: dict[str, np.ndarray] = {"grey16.png": grey16, "grey8.png": grey8, "rgb8.png": rgb8}
    for name, array in cases.items():
        Image.fromarray(array).save(tmp_path / name)
        back, info = read_image(tmp_path / name)
        assert back.dtype == array.dtype, name
        np.testing.assert_array_equal(back, array)
        assert info["format"] == "PNG" and info["bits_stored"] == 8 * array.dtype.itemsize
        assert info["color"] == ("RGB" if array.ndim == 3 else "MONOCHROME")


def test_png_16_bit_rgb_and_alpha(tmp_path: Path) -> None:
    import imagecodecs
    from PIL import Image

    rgb16 = np.random.default_rng(2).integers(0, 65535, size=(5, 7, 3), endpoint=True, dtype=np.uint16)
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(rgb16))
    back, info = read_image(tmp_path / "rgb16.png")
    assert back.dtype == np.uint16 and info["color"] == "RGB"
    np.testing.assert_array_equal(back, rgb16)

    Image.fromarray(np.zeros((4, 4, 4), np.uint8), mode="RGBA").save(tmp_path / "rgba.png")
    with pytest.raises(UnsupportedInputError, match="RGBA"):
        read_image(tmp_path / "rgba.png")


def test_tiff_round_trips(tmp_path: Path) -> None:
    import tifffile

    rng = np.random.default_rng(3)
    grey16 = rng.integers(0, 65535, size=(13, 9), endpoint=True, dtype=np.uint16)
    signed = rng.integers(-32768, 32767, size=(6, 5), endpoint=True, dtype=np.int16)
    rgb = rng.integers(0, 255, size=(6, 5, 3), endpoint=True, dtype=np.uint8)
    stack = rng.integers(0, 4095, size=(4, 6, 5), endpoint=True, dtype=np.uint16)

    tifffile.imwrite(tmp_path / "grey16.tif", grey16)
    tifffile.imwrite(tmp_path / "signed.tif", signed)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    expected: dict[str, tuple[np.ndarray, int, str]] = {
        "grey16.tif": (grey16, 1, "MONOCHROME"),
        "signed.tif": (signed, 1, "MONOCHROME"),
        "rgb.tif": (rgb, 1, "RGB"),
        "planar.tif": (rgb, 1, "RGB"),
        "stack.tif": (stack, 4, "MONOCHROME"),
    }
    for name, (array, frames, color) in expected.items():
        back, info = read_image(tmp_path / name)
        assert back.dtype == array.dtype, name
        np.testing.assert_array_equal(back, array)
        assert info["frames"] == frames and info["color"] == color and info["format"] == "TIFF"
        assert info["signed"] == (array.dtype.kind == "i")

    tifffile.imwrite(tmp_path / "float.tif", np.zeros((4, 4), np.float32))
    with pytest.raises(UnsupportedInputError, match="float32"):
        read_image(tmp_path / "float.tif")


# ---------------------------------------------------------------------------------------------
# iter_corpus_frames


def test_iter_corpus_frames(tmp_path: Path) -> None:
    import tifffile
    from PIL import Image

    shutil.copy(data_path("emri_small.dcm"), tmp_path / "emri.dcm")
    (tmp_path / "copies").mkdir()
    # Same pixels in other transfer syntaxes: every frame is a duplicate.
    shutil.copy(data_path("emri_small_big_endian.dcm"), tmp_path / "copies" / "emri_be.dcm")
    shutil.copy(data_path("emri_small_RLE.dcm"), tmp_path / "copies" / "emri_rle.dcm")
    shutil.copy(data_path("MR_small.dcm"), tmp_path / "copies" / "IM0001")  # no suffix, has a preamble
    shutil.copy(data_path("liver_1frame.dcm"), tmp_path / "liver.dcm")  # 1-bit: skipped
    shutil.copy(data_path("rtplan.dcm"), tmp_path / "plan.dcm")  # no pixel data: skipped
    (tmp_path / "README.md").write_text("# not an image\n")
    (tmp_path / "junk.dcm").write_bytes(b"\x01\x02" * 10)  # unreadable: skipped with a warning
    emri = native_pixel_array(load("emri_small.dcm"))
    assert emri is not None
    tifffile.imwrite(tmp_path / "emri0.tif", emri[0])  # duplicate of emri.dcm#0
    grey = np.random.default_rng(4).integers(0, 65535, size=(8, 8), endpoint=True, dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "z.png")

    items = list(iter_corpus_frames(tmp_path))
    names = [name for name, _, _ in items]
    assert names == [*(f"emri.dcm#{i}" for i in range(10)), "z.png#0", "copies/IM0001#0"]
    for name, frame, info in items:
        assert frame.ndim == 2 and frame.flags.c_contiguous
        assert info["file"] == name.split("#")[0] and info["frame"] == int(name.split("#")[1])
    np.testing.assert_array_equal(items[3][1], emri[3])
    np.testing.assert_array_equal(items[10][1], grey)
    assert items[0][2]["modality"] == "MR" and items[0][2]["series_instance_uid"]


# ---------------------------------------------------------------------------------------------
# The development corpus


def _manifest() -> list[dict[str, str]]:
    with MANIFEST.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@needs_corpus
def test_corpus_native_round_trip() -> None:
    checked = 0
    for row in _manifest():
        if row["transfer_syntax"] not in NATIVE_SYNTAXES:
            continue
        ds = pydicom.dcmread(CORPUS / row["file"])
        layout = pixel_layout(ds)
        array = native_pixel_array(ds)
        if array is None:
            # Only 1-bit and 32-bit layouts are out of scope in this corpus.
            assert layout["bits_allocated"] in (1, 32), row["file"]
            continue
        frames, samples = int(row["frames"]), int(row["samples_per_pixel"])
        shape = ((frames,) if frames > 1 else ()) + (int(row["rows"]), int(row["cols"]))
        assert array.shape == shape + ((samples,) if samples > 1 else ()), row["file"]
        assert rewrite(ds) == ds.PixelData[: layout["expected_nbytes"]], row["file"]
        checked += 1
    assert checked > 400


def _md5_16(array: np.ndarray) -> str:
    # The manifest's convention (found by trial): md5 of the little endian bytes of pydicom's
    # pixel_array followed by str(shape); pydicom keeps big endian dtypes for Explicit VR BE.
    little = array.astype(array.dtype.newbyteorder("<"))
    return hashlib.md5(little.tobytes() + str(array.shape).encode()).hexdigest()[:16]


@needs_corpus
def test_corpus_decoded_md5_matches_manifest() -> None:
    rows = _manifest()
    chosen: dict[str, dict[str, str]] = {}
    for row in rows:  # one file per transfer syntax, plus colour, multi-frame and signed picks
        for key in (row["transfer_syntax"], row["photometric"], f"frames>1:{int(row['frames']) > 1}"):
            if key not in chosen and int(row["bits_allocated"]) in (8, 16):
                chosen[key] = row
    assert len(chosen) >= 8
    for row in chosen.values():
        decoded = decoded_pixel_array(pydicom.dcmread(CORPUS / row["file"]))
        assert _md5_16(decoded) == row["pixel_md5_16"], row["file"]
