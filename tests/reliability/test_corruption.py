"""Stored objects damaged under a running archive: bit flips in the head, pixel, tail and whole-file
sections, truncation, two objects' bytes swapped.  WADO-RS answers 500 and never the wrong bytes
(no cache), the instance is marked corrupt; `lvpnet-archive scrub` (headers only, and full) finds
every one of them too, marks them, exits 1 and records the run."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import create_engine, text

from tests.archive_support import REPO, ArchiveProcess, database, parse_multipart, start_serve, stow
from tests.reliability.support import flip, sample_files, section_spans

MULTIPART_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# victim -> what is done to its object
DAMAGE = {
    "head": "flip in the head section (zstd, elements before the pixels)",
    "pixels": "flip in the LVPNet pixel section",
    "tail": "flip in the tail section (elements after the pixels)",
    "file": "flip in a whole-file record (JPEG original kept whole)",
    "truncated": "last 64 bytes cut off",
    "swap-a": "bytes exchanged with swap-b's object",
    "swap-b": "bytes exchanged with swap-a's object",
}


def _ids(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _files() -> dict[str, bytes]:
    from tests.archive_support import ct_dataset, part10_bytes
    from tests.reliability.support import with_tail

    files = {name: part10_bytes(with_tail(ct_dataset(48, 40, seed=300 + n), seed=n)) for n, name in enumerate(DAMAGE)}
    files["file"] = sample_files()["jpeg"]
    files["intact"] = sample_files()["rgb"]
    return files


class Running:
    def __init__(self, process: ArchiveProcess, files: dict[str, bytes]) -> None:
        self.process, self.files = process, files
        self.ids = {name: _ids(data) for name, data in files.items()}

    def wado(self, name: str) -> httpx.Response:
        study, series, sop = self.ids[name]
        url = f"{self.process.http}/dicomweb/studies/{study}/series/{series}/instances/{sop}"
        return httpx.get(url, headers={"Accept": MULTIPART_ANY}, timeout=120)

    def row(self, name: str) -> dict[str, object]:
        return self.process.instance(self.ids[name][2])[0]

    def object_path(self, name: str) -> Path:
        return self.process.data_dir / "store" / str(self.row(name)["object_key"])

    def set_archived(self, names: list[str]) -> None:
        engine = create_engine(self.process.database_url)
        with engine.begin() as connection:
            for name in names:
                connection.execute(
                    text("UPDATE instance SET state='archived', failure_reason=NULL WHERE sop_instance_uid=:u"),
                    {"u": self.ids[name][2]},
                )
        engine.dispose()

    def scrub(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**self.process.env}
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "scrub", "--json", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("corruption")
    with database("sqlite", tmp) as url:
        process = start_serve(tmp, url, retrieve_cache_bytes=0, codec_candidates="lvpnet,zstd")
        try:
            archive = Running(process, _files())
            response = stow(process.http, list(archive.files.values()))
            assert response.status_code == 200, response.text
            for name in archive.files:
                process.wait_state(archive.ids[name][2], {"archived"})
            yield archive
        finally:
            process.stop()


def _damage(archive: Running) -> None:
    for name in ("head", "pixels", "tail", "file"):
        path = archive.object_path(name)
        data = path.read_bytes()
        start, end = section_spans(data)[name]
        assert end > start, name
        path.write_bytes(flip(data, (start + end) // 2, bit=2))
    path = archive.object_path("truncated")
    path.write_bytes(path.read_bytes()[:-64])
    a, b = archive.object_path("swap-a"), archive.object_path("swap-b")
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


def test_damaged_objects_are_never_served_and_scrub_finds_each(running: Running) -> None:
    # Before: every instance comes back byte for byte (and the pixel sections are LVPNet's)
    for name, data in running.files.items():
        response = running.wado(name)
        assert response.status_code == 200 and parse_multipart(response)[0][1] == data, name
    for name in ("head", "pixels", "tail"):
        assert running.row(name)["codec"] == "lvpnet"
    assert running.row("file")["codec"] in ("file-zstd", "as-received")

    _damage(running)
    for name in DAMAGE:
        response = running.wado(name)
        assert response.status_code == 500, (name, response.status_code)
        assert "corrupt" in response.json()["error"] and running.files[name] not in response.content
        row = running.row(name)
        assert row["state"] == "corrupt" and row["failure_reason"], name
    intact = running.wado("intact")
    assert intact.status_code == 200 and parse_multipart(intact)[0][1] == running.files["intact"]
    metrics = httpx.get(f"{running.process.http}/metrics", timeout=30).text
    assert f'archive_verification_failures_total{{stage="retrieve"}} {float(len(DAMAGE))}' in metrics

    # The same damage found by scrub, without a retrieval having seen it first
    victims = sorted(running.row(name)["id"] for name in DAMAGE)  # type: ignore[type-var]
    for args in (["--headers-only"], ["--all"]):
        running.set_archived(list(DAMAGE))
        result = running.scrub(*args)
        assert result.returncode == 1, result.stderr[-3000:]
        summary = json.loads(result.stdout)
        assert sorted(f["instance_id"] for f in summary["findings"]) == victims, summary
        assert summary["corrupt"] == len(DAMAGE) and summary["checked"] == len(running.files)
        assert all(running.row(name)["state"] == "corrupt" for name in DAMAGE)
        assert running.row("intact")["state"] == "archived"
        assert "Doe^Jane" not in result.stderr and "TEST-PATIENT" not in result.stderr
    # The scrubs' counts reach the running archive's /metrics (same host: prometheus multiprocess files)
    metrics = httpx.get(f"{running.process.http}/metrics", timeout=30).text
    assert f'archive_verification_failures_total{{stage="scrub"}} {float(2 * len(DAMAGE))}' in metrics
    # Marked corrupt by the scrub: retrieval refuses at once
    for name in DAMAGE:
        assert running.wado(name).status_code == 500
