"""The `lvpnet` command line, called as `main(argv)` on real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from lvpnet.cli import main
from lvpnet.imageio import read_image
from tests.lvpnet.synthetic import smooth_image


def test_encode_info_decode_dicom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = Path(get_testdata_file("CT_small.dcm"))
    stream = tmp_path / "ct.lvp"
    assert main(["encode", str(source), "-o", str(stream)]) == 0
    assert main(["info", str(stream)]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["shape"] == [128, 128] and info["dtype"] == "int16"
    assert info["stream_bytes"] == stream.stat().st_size
    out = tmp_path / "ct.npy"
    assert main(["decode", str(stream), "-o", str(out)]) == 0
    array, _ = read_image(source)
    assert np.array_equal(np.load(out), array)


def test_folders_of_png(tmp_path: Path) -> None:
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    originals = {}
    for i in range(2):
        image = smooth_image(rng, (40 + i, 33), "uint16", 12)
        Image.fromarray(image).save(images / f"img{i}.png")
        originals[f"img{i}"] = image
    (images / "notes.txt").write_text("not an image")
    assert main(["-q", "encode", str(images), "-o", str(tmp_path / "lvp")]) == 0
    assert main(["-q", "decode", str(tmp_path / "lvp"), "-o", str(tmp_path / "out"), "--format", "png"]) == 0
    for name, image in originals.items():
        decoded = np.array(Image.open(tmp_path / "out" / f"{name}.png"))
        assert decoded.dtype == np.uint16 and np.array_equal(decoded, image)


def test_corrupt_stream_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.lvp"
    bad.write_bytes(b"\x89LVP\r\n\x1a\nnot really")
    assert main(["decode", str(bad), "-o", str(tmp_path / "x.npy")]) == 1
    assert "bad.lvp" in capsys.readouterr().err


def test_train_exports_weights(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(smooth_image(rng, (64, 64), "uint16", 10)).save(data / f"t{i}.png")
    argv = ["-q", "train", "--data", str(data), "--config", "lvpnet-ctx-nolatent", "--steps", "2",
            "--batch", "2", "--crop", "32", "--threads", "1", "--checkpoints", str(tmp_path / "ck")]  # fmt: skip
    assert main(argv) == 0
    weights = list((tmp_path / "ck" / "lvpnet-ctx-nolatent").glob("*.npz"))
    assert len(weights) == 1
    # Resuming a finished run does not train again and exports the same configuration.
    assert main(argv) == 0


def test_encode_in_single_image_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A public 1024 x 256 signed CT-like frame on which 40 fine-tuning steps pay for their delta
    # (about -3%, measured) even against the classical planes
    source = Path(get_testdata_file("JPEG2000.dcm"))
    plain, adapted = tmp_path / "plain.lvp", tmp_path / "adapted.lvp"
    assert main(["-q", "encode", str(source), "-o", str(plain)]) == 0
    assert main(["-q", "encode", str(source), "-o", str(adapted), "--adapt-steps", "40"]) == 0
    assert main(["info", str(adapted)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == 3 and info["adaptation_bytes"] > 0
    assert adapted.stat().st_size < plain.stat().st_size
    assert main(["-q", "decode", str(adapted), "-o", str(tmp_path / "out.npy")]) == 0
    array, _ = read_image(source)
    assert np.array_equal(np.load(tmp_path / "out.npy"), array)
