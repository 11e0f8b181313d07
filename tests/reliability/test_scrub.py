"""`scrub` on a real catalog and store: every kind of damage is found and marked, nothing else is."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from service import metrics
from service.catalog.tables import Instance, ScrubRun
from service.record import object_key
from tests.archive_support import REPO, ct_dataset, database, part10_bytes
from tests.reliability.support import Archive, flip, open_archive, sample_files, section_spans, with_tail
from worker.scrub import check_record, scrub

# damage -> (the instance's file, pixel codecs to archive it with)
DAMAGE = {
    "flip-header": ("ct-tail", "lvpnet"),
    "flip-head": ("ct-tail", "lvpnet"),
    "flip-pixels": ("ct-tail", "lvpnet"),
    "flip-tail": ("ct-tail", "lvpnet"),
    "flip-file": ("jpeg", "lvpnet"),
    "truncate": ("multiframe", "lvpnet"),
    "swap": ("rgb", "lvpnet"),  # swapped with the "swap-partner" instance's object
    "missing": ("ct-tail", "zstd"),
    # Damage that keeps the content address consistent (a record written wrong, not decayed):
    # stored under the SHA-256 of the damaged bytes, catalog pointing there
    "readdressed-lvpnet-pixels": ("ct-tail", "lvpnet"),
    "readdressed-zstd-pixels": ("ct-tail", "zstd"),
    "readdressed-jpegls-pixels": ("ct-tail", "jpegls"),
    "readdressed-head": ("multiframe", "zstd"),
    "readdressed-original-size": ("ct-tail", "zstd"),
}
# What only a rebuild can show: these codecs carry no checksum of their own
HEADERS_MAY_MISS = {"readdressed-zstd-pixels", "readdressed-jpegls-pixels", "readdressed-head"}


def _file(kind: str, seed: int) -> bytes:
    if kind == "ct-tail":
        return part10_bytes(with_tail(ct_dataset(48, 40, seed=seed), seed=seed))
    return sample_files()[kind]


def _replace_object(archive: Archive, instance_id: int, data: bytes) -> None:
    """Store damaged bytes under their own content address and point the catalog there."""
    key = object_key(hashlib.sha256(data).hexdigest())
    archive.store.put_bytes(key, data)
    with archive.session_factory() as session:
        row = session.get(Instance, instance_id)
        assert row is not None
        row.object_key = key
        session.commit()


def damage(archive: Archive, kind: str, instance_id: int, partner_id: int) -> None:
    row = archive.row(instance_id)
    key = row.object_key or ""
    data = archive.store.get_bytes(key)
    spans = section_spans(data)
    middle = {name: (a + b) // 2 for name, (a, b) in spans.items()}
    if kind.startswith("flip-"):
        section = kind.removeprefix("flip-")
        assert spans[section][1] > spans[section][0], f"{section} section empty"
        archive.store.put_bytes(key, flip(data, middle[section], bit=3))
    elif kind == "truncate":
        archive.store.put_bytes(key, data[: len(data) - 100])
    elif kind == "swap":
        other_key = archive.row(partner_id).object_key or ""
        other = archive.store.get_bytes(other_key)
        archive.store.put_bytes(key, other)
        archive.store.put_bytes(other_key, data)
    elif kind == "missing":
        archive.store.delete(key)
    elif kind.endswith("-pixels"):
        _replace_object(archive, instance_id, flip(data, middle["pixels"], bit=5))
    elif kind == "readdressed-head":
        _replace_object(archive, instance_id, flip(data, middle["head"], bit=1))
    elif kind == "readdressed-original-size":
        header = data[spans["header"][0] : spans["header"][1]]
        size = f'"original_bytes":{row.original_bytes}'.encode()
        assert size in header
        forged = header.replace(size, f'"original_bytes":{row.original_bytes + 1}'.encode())
        _replace_object(
            archive, instance_id, data[:8] + len(forged).to_bytes(4, "little") + forged + data[12 + len(header) :]
        )
    else:
        raise AssertionError(kind)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, int]]]:
    """One archive with an instance per damage kind (and a partner for the swap), archived once;
    each test works on a copy."""
    root = tmp_path_factory.mktemp("pristine")
    archive = open_archive(root, f"sqlite:///{root / 'catalog.sqlite3'}")
    ids = {}
    for seed, (kind, (file_kind, codecs)) in enumerate(sorted(DAMAGE.items()), start=100):
        ids[kind] = archive.ingest(kind, _file(file_kind, seed))
        row = archive.archive(ids[kind], codecs)
        if "readdressed" in kind and kind != "readdressed-original-size":
            assert row.codec == codecs, (kind, row.codec)
    ids["swap-partner"] = archive.ingest("partner", _file("ct-tail", 99))
    archive.archive(ids["swap-partner"])
    archive.close()
    yield root, ids


@pytest.fixture
def archive(pristine: tuple[Path, dict[str, int]], tmp_path: Path) -> Iterator[Archive]:
    root = tmp_path / "archive"
    shutil.copytree(pristine[0], root)
    opened = open_archive(root, f"sqlite:///{root / 'catalog.sqlite3'}")
    yield opened
    opened.close()


def _states(archive: Archive) -> dict[int, str]:
    with archive.session_factory() as session:
        return {row.id: row.state for row in session.scalars(select(Instance))}


def test_clean_archive_scrubs_clean_in_every_mode(archive: Archive, pristine: tuple[Path, dict[str, int]]) -> None:
    total = len(pristine[1])
    for mode, sample, rebuilt in (("headers", 0.0, 0), ("sample", 0.0, 0), ("full", 1.0, total)):
        report = scrub(archive.session_factory, archive.store, mode=mode, sample=sample)
        assert (report.checked, report.rebuilt, report.corrupt, report.errors) == (total, rebuilt, 0, 0), mode
        assert report.unreferenced_objects == 0 and report.exit_code == 0
    report = scrub(archive.session_factory, archive.store, mode="sample", sample=0.5, seed=7)
    assert 0 < report.rebuilt < total and report.corrupt == 0
    assert set(_states(archive).values()) == {"archived"}
    with archive.session_factory() as session:
        runs = list(session.scalars(select(ScrubRun).order_by(ScrubRun.id)))
    assert [r.mode for r in runs] == ["headers", "sample", "full", "sample"]
    assert all(r.finished_at is not None and r.checked == total and r.corrupt == 0 for r in runs)
    assert json.loads(runs[-1].detail or "{}")["rebuilt"] == report.rebuilt


@pytest.mark.parametrize("mode", ["full", "headers"])
def test_every_damage_is_found_and_marked(archive: Archive, pristine: tuple[Path, dict[str, int]], mode: str) -> None:
    ids = pristine[1]
    for kind in DAMAGE:
        damage(archive, kind, ids[kind], ids["swap-partner"])
    failures_before = metrics.VERIFICATION_FAILURES.labels(stage="scrub")._value.get()
    report = scrub(archive.session_factory, archive.store, mode=mode)

    expected = {ids[k] for k in DAMAGE if mode == "full" or k not in HEADERS_MAY_MISS} | {ids["swap-partner"]}
    found = {f.instance_id: f for f in report.findings}
    assert expected <= set(found), {k: ids[k] for k in DAMAGE if ids[k] not in found}
    states = _states(archive)
    assert {i for i, s in states.items() if s == "corrupt"} == set(found)
    assert report.corrupt == len(found) and report.exit_code == 1
    assert report.missing == 1 and found[ids["missing"]].check == "missing"
    assert found[ids["swap"]].check == "address" and found[ids["flip-pixels"]].check == "address"
    assert found[ids["readdressed-lvpnet-pixels"]].check == "structure"  # chunk CRC, no decode
    assert found[ids["readdressed-original-size"]].check == "record"
    if mode == "full":
        assert found[ids["readdressed-zstd-pixels"]].check in ("rebuild", "sha256", "structure")
        assert found[ids["readdressed-jpegls-pixels"]].check in ("rebuild", "sha256", "structure")
    assert metrics.VERIFICATION_FAILURES.labels(stage="scrub")._value.get() - failures_before == report.corrupt
    for instance_id in found:
        assert (archive.row(instance_id).failure_reason or "").startswith("scrub: ")
    # Damaged objects are kept (evidence); the damaged originals' new keys are now unreferenced
    assert report.unreferenced_objects == 5
    with archive.session_factory() as session:
        run = session.scalars(select(ScrubRun)).one()
    assert (run.checked, run.corrupt, run.mode) == (len(ids), report.corrupt, mode)
    # A second pass has nothing left to mark: corrupt instances are not archived any more
    again = scrub(archive.session_factory, archive.store, mode=mode)
    assert again.corrupt == 0 and again.checked == len(ids) - report.corrupt


def test_instance_that_changed_meanwhile_is_not_marked(archive: Archive, pristine: tuple[Path, dict[str, int]]) -> None:
    """A failure on an object the row no longer names (superseded or re-archived meanwhile)."""
    from worker.scrub import _mark_corrupt

    instance_id = pristine[1]["missing"]
    assert not _mark_corrupt(archive.session_factory, instance_id, "objects/00/00/" + "0" * 64 + ".lva", "x")
    assert archive.row(instance_id).state == "archived"


def test_store_errors_are_not_corruption(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(key: str) -> bytes:
        raise OSError("store unreachable")

    monkeypatch.setattr(archive.store, "get_bytes", unavailable)
    report = scrub(archive.session_factory, archive.store, mode="headers")
    assert report.corrupt == 0 and report.errors == report.checked > 0 and report.exit_code == 3
    assert set(_states(archive).values()) == {"archived"}


def test_record_checks_without_decoding_catch_size_and_codec_lies() -> None:
    from service.record import Record, Section, pack_record

    whole = Record("whole", "a" * 64, 10, [Section("file", "identity", b"0123456789")])
    assert check_record(pack_record(whole), "a" * 64, 10).kind == "whole"
    for bad in (
        Record("whole", "a" * 64, 10, [Section("file", "identity", b"012345678")]),
        Record("whole", "a" * 64, 10, [Section("file", "rot13", b"0123456789")]),
        Record("whole", "a" * 64, 10, [Section("head", "identity", b"0123456789")]),
        Record("mystery", "a" * 64, 10, []),
    ):
        with pytest.raises(Exception, match=r"size|codec|sections|kind"):
            check_record(pack_record(bad), "a" * 64, 10)


def test_cli_scrub_exit_codes_and_json(archive: Archive, pristine: tuple[Path, dict[str, int]]) -> None:
    env = {
        **os.environ,
        "ARCHIVE_DATA_DIR": str(archive.root),
        "ARCHIVE_DATABASE_URL": archive.url,
        "ARCHIVE_STORAGE_URL": f"file://{archive.root / 'store'}",
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "service.cli", "scrub", *args]
        return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    clean = run("--headers-only", "--json")
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert json.loads(clean.stdout)["checked"] == len(pristine[1])
    victim = pristine[1]["flip-pixels"]
    damage(archive, "flip-pixels", victim, 0)
    found = run("--sample", "0.25", "--seed", "1", "--json")
    assert found.returncode == 1, found.stderr[-2000:]
    summary = json.loads(found.stdout)
    assert summary["mode"] == "sample" and [f["instance_id"] for f in summary["findings"]] == [victim]
    # Logs carry catalog ids and checks, never dataset values
    assert "Doe" not in found.stderr and "TEST-PATIENT" not in found.stderr
    assert f'"instance": {victim}' in found.stderr
    assert run("--sample", "2").returncode == 2


def test_scrub_on_postgresql(tmp_path: Path) -> None:
    with database("postgresql", tmp_path) as url:
        archive = open_archive(tmp_path / "pg", url)
        try:
            ids = [archive.ingest(f"i{n}", _file("ct-tail", 200 + n)) for n in range(2)]
            for instance_id in ids:
                archive.archive(instance_id, "zstd")
            archive.store.delete(archive.row(ids[0]).object_key or "")
            report = scrub(archive.session_factory, archive.store, mode="full")
            assert [f.instance_id for f in report.findings] == [ids[0]] and report.missing == 1
            assert archive.row(ids[0]).state == "corrupt" and archive.row(ids[1]).state == "archived"
        finally:
            archive.close()
