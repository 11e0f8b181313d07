"""lvpnet.eval.bench / classical: the benchmark on a tiny folder of synthetic images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from lvpnet.eval.bench import (
    GROUPS,
    SPLIT_PARTS,
    add_bench_parser,
    modality_group,
    run_bench,
    write_chart,
    write_markdown,
)
from lvpnet.eval.classical import CLASSICAL_CODECS
from lvpnet.zoo import ZOO


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], lo: int, hi: int, dtype: str) -> np.ndarray:
    field = rng.normal(size=shape).cumsum(axis=0).cumsum(axis=1)
    field = (field - field.min()) / max(np.ptp(field), 1e-9)
    return np.clip(np.round(lo + field * (hi - lo)), lo, hi).astype(dtype)


def _write_dicom(path: Path, pixels: np.ndarray, *, modality: str, bits_stored: int) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small frames: signed 12-bit CT (DICOM), 8-bit RGB US (DICOM), 16-bit grey PNG."""
    root = tmp_path_factory.mktemp("bench-corpus")
    rng = np.random.default_rng(7)
    _write_dicom(root / "ct.dcm", _smooth(rng, (40, 48), -1024, 2047, "int16"), modality="CT", bits_stored=12)
    rgb = np.stack([_smooth(rng, (32, 40), 0, 255, "uint8") for _ in range(3)], axis=-1)
    _write_dicom(root / "us.dcm", rgb, modality="US", bits_stored=8)
    (root / "grey.png").write_bytes(imagecodecs.png_encode(_smooth(rng, (24, 36), 100, 9000, "uint16")))
    return root


@pytest.fixture(scope="module")
def result(corpus: Path) -> dict:
    return run_bench([corpus], models=None, split="all", threads=1, repeat=1, limit=None, progress=False)


def test_modality_groups() -> None:
    assert [modality_group(m) for m in ("CT", "mr", "DX", "CR", "RG", "US", "MG")] == [
        "CT",
        "MR",
        "CR/DX",
        "CR/DX",
        "CR/DX",
        "US",
        "MG",
    ]
    assert {modality_group(m) for m in ("OT", "SC", "NM", "PT", "XA", None, "")} == {"other"}


def test_classical_codecs_round_trip_signed_and_rgb() -> None:
    rng = np.random.default_rng(0)
    cases: list[tuple[np.ndarray, int]] = [
        (rng.integers(-2048, 2048, (20, 24)).astype(np.int16), 12),
        (rng.integers(0, 256, (16, 20, 3)).astype(np.uint8), 8),
        (rng.integers(0, 200, (16, 20)).astype(np.uint16), 8),  # 8 stored bits in a 16-bit container
    ]
    for array, bits in cases:
        for name, codec in CLASSICAL_CODECS.items():
            decoded = codec.decode(codec.encode(array, bits))
            assert decoded.dtype == array.dtype and np.array_equal(decoded, array), name


def test_result_structure_and_byte_accounting(result: dict) -> None:
    model = ZOO.default_name()
    assert list(result["models"]) == [model]
    assert result["groups"] == list(GROUPS)
    assert set(result["codecs"]) == set(CLASSICAL_CODECS)
    assert {"cpu", "logical_cores", "lvpnet_threads"} <= set(result["machine"])
    assert result["failures"]["count"] == 0
    frames = result["frames"]
    assert len(frames) == 3
    assert sorted(f["group"] for f in frames) == ["CT", "US", "other"]
    json.dumps(result)  # JSON-ready as it is

    for row in frames:
        samples = row["samples"]
        assert samples == int(np.prod(row["shape"]))
        for entry in (row["lvpnet"][model], row["lvpnet"][model]["model_only"]):
            assert entry["exact"] and entry["error"] is None
            assert entry["bpp"] == pytest.approx(8 * entry["bytes"] / samples)
            assert sum(entry["split"][p] for p in SPLIT_PARTS) == entry["bytes"]
            assert sum(entry["split_bpp"].values()) == pytest.approx(entry["bpp"])
        assert row["lvpnet"][model]["model_only"]["model_plane_fraction"] == 1.0
        for name, entry in row["classical"].items():
            assert entry["covered"], (name, entry)
            assert entry["bpp"] == pytest.approx(8 * entry["bytes"] / samples)

    overall = result["aggregates"]["overall"]
    assert overall["frames"] == 3 and overall["raw_bytes"] == sum(f["raw_bytes"] for f in frames)
    assert result["aggregates"]["MG"]["frames"] == 0
    total = sum(f["lvpnet"][model]["bytes"] for f in frames)
    assert overall["lvpnet"][model]["bpp"] == pytest.approx(8 * total / overall["samples"])
    deltas = overall["deltas"][model]
    assert "vs_jxl-e7" in deltas and deltas["vs_jxl-e7"]["pct"] is not None


def test_markdown_and_chart(result: dict, tmp_path: Path) -> None:
    md, png = tmp_path / "bench.md", tmp_path / "bench.png"
    write_markdown(result, md)
    write_chart(result, png)
    text = md.read_text()
    assert "run_bench(" in text and "| frames |" in text and "jxl-e7" in text and "No frames: " in text
    assert png.read_bytes().startswith(b"\x89PNG")


def test_cli_heldout_split_of_unknown_series_is_empty(corpus: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    argv = ["bench", str(corpus), "--json", str(out / "b.json"), "--md", str(out / "b.md")]
    args = parser.parse_args([*argv, "--chart", str(out / "b.png"), "--repeat", "1", "--no-model-only"])
    assert args.func(args) == 0
    saved = json.loads((out / "b.json").read_text())
    # The synthetic series are not in the committed held-out list: the default split is empty.
    assert saved["settings"]["split"] == "heldout" and saved["frames"] == []
    assert saved["command"].startswith("lvpnet bench ")
    assert (out / "b.md").exists() and (out / "b.png").exists()


def test_single_image_mode_is_a_bench_model(corpus: Path, tmp_path: Path) -> None:
    model = ZOO.default_name()
    adapted = f"{model}+adapt3"
    result = run_bench(
        [corpus], models=[model, adapted], split="all", threads=1, repeat=1, limit=1, codecs=[], progress=False
    )
    assert result["failures"]["count"] == 0
    assert result["models"][adapted]["adapt_steps"] == 3
    entry = result["frames"][0]["lvpnet"][adapted]
    assert entry["exact"] and "model_only" not in entry  # no model-only rerun of the fine-tuning
    assert sum(entry["split"][p] for p in SPLIT_PARTS) == entry["bytes"]
    # never larger than without the delta: it is stored only when the stream comes out smaller
    assert entry["bytes"] <= result["frames"][0]["lvpnet"][model]["bytes"]
    write_markdown(result, tmp_path / "bench.md")
    assert f"**{adapted}**" in (tmp_path / "bench.md").read_text()
    with pytest.raises(ValueError, match="adapt"):
        run_bench([corpus], models=[f"{model}+adaptx"], split="all", limit=1, codecs=[], progress=False)
