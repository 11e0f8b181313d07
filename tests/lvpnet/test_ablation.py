"""lvpnet.eval.ablation: `lvpnet ablate` trains, measures and reports, on a tiny synthetic corpus."""

from __future__ import annotations

import json
from pathlib import Path

import imagecodecs
import numpy as np
import pytest

from lvpnet.cli import main
from lvpnet.eval.ablation import default_ablations
from lvpnet.eval.bench import SPLIT_PARTS


def _smooth(rng: np.random.Generator, shape: tuple[int, int], hi: int) -> np.ndarray:
    field = rng.normal(size=shape).cumsum(axis=0).cumsum(axis=1)
    field = (field - field.min()) / max(np.ptp(field), 1e-9)
    return np.round(field * hi).astype(np.uint16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two training PNGs and one held-out PNG, 12-bit grey; the held-out list names the last."""
    root = tmp_path_factory.mktemp("ablation-corpus")
    rng = np.random.default_rng(3)
    for name in ("train-a.png", "train-b.png", "held.png"):
        (root / name).write_bytes(imagecodecs.png_encode(_smooth(rng, (48, 64), 4095)))
    heldout = root.parent / "heldout.txt"
    heldout.write_text("# the series measured\nheld.png\n")
    return root, heldout


def _ablate(corpus: tuple[Path, Path], out: Path, only: str) -> int:
    root, heldout = corpus
    argv = ["-q", "ablate", str(root), "--out", str(out), "--faithful-steps", "2", "--context-steps", "2"]
    argv += ["--threads", "1", "--only", only, "--heldout", str(heldout), "--checkpoints", str(out.parent / "ck")]
    return main(argv)


def test_ablate_trains_measures_and_resumes(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "abl"
    assert _ablate(corpus, out, "abl-gmsm-qcm") == 0
    first = json.loads(out.with_suffix(".json").read_text())
    (run,) = first["runs"]
    overall = run["groups"]["overall"]
    assert overall["frames"] == 1 and overall["samples"] == 48 * 64 and run["failures"] == []
    # every byte of the stream is in the split, and bpp is computed from the whole stream
    assert sum(overall["split"][p] for p in SPLIT_PARTS) == overall["bytes"]
    assert overall["bpp"] == pytest.approx(8 * overall["bytes"] / overall["samples"])
    assert overall["split"]["z"] > 0 and overall["split"]["pixels"] > 0  # the model coded the plane
    assert run["train_frames"] == 2 and run["ablation"]["steps"] == 2
    assert set(first["references"]["overall"]) >= {"jpegls-bs", "jxl-e7"}

    # A second invocation keeps the measured run (same weights) and adds the new one.
    assert _ablate(corpus, out, "abl-gmsm-qcm,abl-r0.05,abl-ctx-nolatent") == 0
    second = json.loads(out.with_suffix(".json").read_text())
    names = [r["ablation"]["name"] for r in second["runs"]]
    assert names == ["abl-gmsm-qcm", "abl-r0.05", "abl-ctx-nolatent"]
    assert second["runs"][0] == run
    ctx = second["runs"][2]
    assert ctx["groups"]["overall"]["split"]["z"] == 0  # no latent: nothing coded for z
    assert ctx["ablation"]["config"]["latent_channels"] == 0 and ctx["failures"] == []

    report = out.with_suffix(".md").read_text()
    assert "lvpnet ablate" in report and "`abl-gmsm-qcm`" in report and "`abl-ctx-nolatent`" in report
    assert "## Table 4" in report and "## Context vs no context" in report
    sweep = report.split("## Figure 4", 1)[1].split("##", 1)[0]  # r ascending, the Table 4 row at 0.15
    assert sweep.index("`abl-r0.05`") < sweep.index("r = 0.15 (the Table 4 row) (`abl-gmsm-qcm`)")
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablate_rejects_unknown_names_and_empty_splits(
    corpus: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _ablate(corpus, tmp_path / "x", "abl-nonsense") == 2
    assert "unknown ablations: abl-nonsense" in capsys.readouterr().err
    root, _ = corpus
    empty = tmp_path / "none.txt"
    empty.write_text("no-such-series\n")
    argv = ["-q", "ablate", str(root), "--out", str(tmp_path / "y"), "--only", "abl-gmsm-qcm"]
    assert main([*argv, "--heldout", str(empty), "--faithful-steps", "1", "--checkpoints", str(tmp_path)]) == 2
    assert "0 held-out frames" in capsys.readouterr().err
    assert not (tmp_path / "y.json").exists()


def test_study_covers_the_papers_ablations() -> None:
    by_name = {a.name: a for a in default_ablations()}
    table4 = {(a.config["sampler"], a.config["use_qcm"]) for a in by_name.values() if a.study.startswith("Table 4")}
    assert table4 == {("gmsm", True), ("cnn", True), ("gmsm", False), ("cnn", False)}
    ratios = {a.config["sampling_ratio"] for a in by_name.values() if "sampling_ratio" in a.config}
    assert {0.05, 0.15, 0.30} <= ratios
    assert by_name["abl-ctx-nolatent"].config["latent_channels"] == 0
    # one recipe per family, so rows differ only in what the study varies
    faithful = [a for a in by_name.values() if a.config.get("kind") != "context"]
    assert len({(a.steps, a.learning_rate, a.batch, a.crop, a.seed) for a in faithful}) == 1
