"""Bit-exact round trips of every in-scope frame of the dev corpus and of pydicom's test files,
with the zoo's default model (the shipped weights)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_files

from lvpnet import compress, decompress
from lvpnet.codec import decompress_frames
from lvpnet.errors import UnsupportedInputError
from lvpnet.imageio import read_image

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "dev"
logging.getLogger("pydicom").setLevel(logging.ERROR)


def corpus_files() -> list[str]:
    manifest = CORPUS / "MANIFEST.tsv"
    if not manifest.exists():
        return []
    with manifest.open() as fh:
        return [row["file"] for row in csv.DictReader(fh, delimiter="\t")]


def pydicom_files_not_in_corpus() -> list[str]:
    """pydicom's test files, less those the dev corpus already carries (same name and size)."""
    in_corpus = set()
    for name in corpus_files():
        path = CORPUS / name
        in_corpus.add((path.name, path.stat().st_size))
    return [p for p in get_testdata_files("*.dcm") if (Path(p).name, Path(p).stat().st_size) not in in_corpus]


MAX_FRAMES = 16


def round_trip(path: Path) -> None:
    try:
        array, info = read_image(path)
    except UnsupportedInputError as exc:
        # 1-bit, 32-bit and float data are out of the codec's scope: refused clearly, by name.
        assert str(exc)
        return
    if info.get("frames", 1) > MAX_FRAMES:
        # A long cine (pydicom's color3d_jpeg_baseline: 120 RGB frames, 8 minutes here) adds time,
        # not coverage: the first, a middle and the last frame keep the multi-frame paths exercised
        array = array[[0, array.shape[0] // 2, array.shape[0] - 1]]
        info = {**info, "frames": 3}
    data = compress(array, bits_stored=info.get("bits_stored"), color=info.get("color"))
    out = decompress(data)
    assert out.dtype == array.dtype and out.shape == array.shape
    assert np.array_equal(out, array), path
    if info.get("frames", 1) > 1:
        last = array.shape[0] - 1
        assert np.array_equal(decompress_frames(data, [last])[0], array[last])


@pytest.mark.skipif(not CORPUS.exists(), reason="../shared/corpus/dev is not beside the repository")
@pytest.mark.parametrize("name", corpus_files())
def test_dev_corpus_round_trip(name: str) -> None:
    round_trip(CORPUS / name)


@pytest.mark.parametrize("path", pydicom_files_not_in_corpus(), ids=lambda p: Path(p).name)
def test_pydicom_testfiles_round_trip(path: str) -> None:
    round_trip(Path(path))
