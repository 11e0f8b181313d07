"""The catalog lost, rebuilt from the object store alone: every instance retrievable byte for byte
through WADO-RS and found by QIDO-RS as before; staged files become received and get archived."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pydicom
from sqlalchemy import select

from service.catalog.tables import Instance, Patient, Study
from service.db import make_engine, make_session_factory
from service.storage.filesystem import FilesystemStore
from tests.archive_support import (
    REPO,
    ArchiveProcess,
    c_store,
    ct_dataset,
    database,
    parse_multipart,
    part10_bytes,
    start_serve,
    stow,
)
from tests.reliability.support import open_archive, pydicom_file_bytes, sample_files, with_tail
from worker.rebuild_catalog import rebuild_catalog

MULTIPART_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _ids(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _wado(process: ArchiveProcess, ids: tuple[str, str, str]) -> bytes:
    study, series, sop = ids
    url = f"{process.http}/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    response = httpx.get(url, headers={"Accept": MULTIPART_ANY}, timeout=120)
    assert response.status_code == 200, response.text
    parts = parse_multipart(response)
    assert len(parts) == 1
    return parts[0][1]


def _qido(process: ArchiveProcess, studies: list[str]) -> dict[str, Any]:
    def get(path: str) -> Any:
        response = httpx.get(f"{process.http}/dicomweb{path}", params={"includefield": "all"}, timeout=60)
        assert response.status_code == 200, response.text
        entries = response.json()
        for entry in entries:
            entry.pop("00081190", None)  # Retrieve URL: names the server's port
        return entries

    found: dict[str, Any] = {"studies": sorted(get("/studies"), key=json.dumps)}
    for study in studies:
        found[study] = {
            "series": sorted(get(f"/studies/{study}/series"), key=json.dumps),
            "instances": sorted(get(f"/studies/{study}/instances"), key=json.dumps),
        }
    return found


def _cli(process: ArchiveProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=process.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_catalog_rebuilt_from_the_store_serves_everything_byte_exact(tmp_path: Path) -> None:
    study = ct_dataset(seed=500).StudyInstanceUID
    series = [ct_dataset(seed=501).SeriesInstanceUID, ct_dataset(seed=502).SeriesInstanceUID]
    stowed = [
        part10_bytes(with_tail(ct_dataset(64, 48, seed=510 + i, study_uid=study, series_uid=series[i % 2]), seed=i))
        for i in range(3)
    ]
    stowed += [
        pydicom_file_bytes("emri_small.dcm"),  # multi-frame
        pydicom_file_bytes("SC_rgb.dcm"),  # RGB (flat bars: kept whole)
        sample_files()["rgb"],  # RGB with texture: split
        pydicom_file_bytes("SC_rgb_jpeg_dcmtk.dcm"),  # JPEG baseline: kept whole, as received
    ]
    stored_ds = ct_dataset(56, 40, seed=520, patient_id="OTHER-PATIENT")

    with database("sqlite", tmp_path) as url:
        process = start_serve(tmp_path, url, codec_candidates="lvpnet,jpegls,zstd")
        try:
            assert stow(process.http, stowed).status_code == 200
            assert c_store(process.dicom_port, [stored_ds]) == [0]
            ids = [_ids(data) for data in stowed] + [
                (stored_ds.StudyInstanceUID, stored_ds.SeriesInstanceUID, stored_ds.SOPInstanceUID)
            ]
            rows = [process.wait_state(sop, {"archived"}) for _s, _se, sop in ids]
            before = {i[2]: _wado(process, i) for i in ids}
            studies = sorted({i[0] for i in ids})
            qido_before = _qido(process, studies)
        finally:
            process.stop()
        assert {r["codec"] for r in rows} >= {"file-zstd", "lvpnet"}  # split (decoded by the model) and whole
        for data, (_s, _se, sop) in zip(stowed, ids, strict=False):
            assert before[sop] == data

        # A file received but not archived yet, and a staged copy left behind by a crash after archiving
        store = process.data_dir / "store"
        pending = part10_bytes(ct_dataset(32, 32, seed=530, patient_id="PENDING-PATIENT"))
        (store / "staging" / f"{uuid.uuid4().hex}.dcm").write_bytes(pending)
        (store / "staging" / f"{uuid.uuid4().hex}.dcm").write_bytes(stowed[0])

        catalog = Path(url.removeprefix("sqlite:///"))
        for leftover in catalog.parent.glob(catalog.name + "*"):
            leftover.unlink()  # the catalog is lost

        result = _cli(process, "rebuild-catalog", "--json")
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads(result.stdout)
        assert (summary["objects"], summary["archived"], summary["unreadable"]) == (len(ids), len(ids), 0), summary
        assert (summary["received"], summary["staged_already_catalogued"]) == (1, 1), summary
        # Resumable: a second run adds nothing
        engine = make_engine(url)
        again = rebuild_catalog(make_session_factory(engine), FilesystemStore(store))
        engine.dispose()
        assert (again.archived, again.objects_already_catalogued, again.received) == (0, len(ids), 0)
        assert again.staged_already_catalogued == 2

        process = start_serve(tmp_path / "second", url, data_dir=process.data_dir)
        try:
            process.wait_state(_ids(pending)[2], {"archived"})
            for i in ids:
                assert _wado(process, i) == before[i[2]]
                row = process.instance(i[2])
                assert len(row) == 1 and row[0]["state"] == "archived"
            assert _wado(process, _ids(pending)) == pending
            qido_after = _qido(process, studies)
        finally:
            process.stop()
    # QIDO answers as before (the staged instance is a study of its own)
    pending_study = _ids(pending)[0]
    qido_after["studies"] = [x for x in qido_after["studies"] if x["0020000D"]["Value"][0] != pending_study]
    assert _differences(qido_before, qido_after) == []


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for key in before:
        groups = (
            [("", before[key], after[key])]
            if key == "studies"
            else [(name, before[key][name], after[key][name]) for name in ("series", "instances")]
        )
        for name, a, b in groups:
            if len(a) != len(b):
                out.append(f"{key} {name}: {len(a)} entries before, {len(b)} after")
                continue
            for x, y in zip(a, b, strict=True):
                for tag in sorted(set(x) | set(y)):
                    if x.get(tag) != y.get(tag):
                        out.append(f"{key[:12]} {name} {tag}: {x.get(tag)} -> {y.get(tag)}")
    return out


def _instances(session: Any) -> dict[str, tuple[Any, ...]]:
    return {
        r.sop_instance_uid: (r.original_sha256, r.object_key, r.codec, r.rows, r.number_of_frames, r.dataset_sha256)
        for r in session.scalars(select(Instance))
    }


def _studies(session: Any) -> list[tuple[Any, ...]]:
    return sorted((s.study_instance_uid, s.study_date, s.modalities_in_study) for s in session.scalars(select(Study)))


def test_rebuild_without_decoding_and_an_unreadable_record(tmp_path: Path) -> None:
    """In-process on PostgreSQL: --no-decode gives the same rows except the dataset SHA-256 of
    split records; an unreadable record is reported, not catalogued."""
    from service.db import migrate

    with database("postgresql", tmp_path) as url:
        archive = open_archive(tmp_path / "a", url)
        for name, data in sample_files().items():
            archive.archive(archive.ingest(name, data))
        with archive.session_factory() as session:
            expected, studies = _instances(session), _studies(session)
            patients = len(session.scalars(select(Patient)).all())
        archive.close()
    bad_key = "objects/ff/ff/" + "f" * 64 + ".lva"
    archive.store.put_bytes(bad_key, b"\x89LVPARC\nnot a record")

    with database("postgresql", tmp_path) as url:
        migrate(url)
        engine = make_engine(url)
        factory = make_session_factory(engine)
        try:
            report = rebuild_catalog(factory, archive.store, decode=False)
            assert (report.archived, report.unreadable, report.exit_code) == (len(expected), 1, 1)
            assert report.problems[0]["key"] == bad_key
            with factory() as session:
                got = _instances(session)
                assert _studies(session) == studies and len(session.scalars(select(Patient)).all()) == patients
                assert {(r.state, r.source) for r in session.scalars(select(Instance))} == {("archived", "rebuild")}
        finally:
            engine.dispose()
    assert set(got) == set(expected)
    for sop, values in expected.items():
        whole = values[2] in ("file-zstd", "as-received")  # whole records are decoded anyway (zstd is cheap)
        assert got[sop][:5] == values[:5] and got[sop][5] == (values[5] if whole else ""), sop


def test_two_records_of_one_instance_are_both_kept(tmp_path: Path) -> None:
    """Overwrite policy: version 2 archived, version 1's object deleted - and then found again (a
    crash before the delete).  Both are catalogued, one superseded, and the conflict reported."""
    archive = open_archive(tmp_path / "a", f"sqlite:///{tmp_path / 'a.sqlite3'}")
    archive.settings = archive.settings.model_copy(update={"duplicate_policy": "overwrite"})
    archive.ingestor.settings = archive.settings
    ds = ct_dataset(40, 40, seed=600)
    first = archive.archive(archive.ingest("v1", part10_bytes(ds)), "zstd")
    kept = archive.store.get_bytes(first.object_key or "")
    ds.SeriesDescription = "corrected"
    second = archive.archive(archive.ingest("v2", part10_bytes(ds)), "zstd")
    assert second.version == 2 and archive.row(first.id).state == "superseded"
    assert not archive.store.exists(first.object_key or "")
    archive.store.put_bytes(first.object_key or "", kept)
    archive.close()

    rebuilt = open_archive(tmp_path / "b", f"sqlite:///{tmp_path / 'b.sqlite3'}")
    try:
        report = rebuild_catalog(rebuilt.session_factory, archive.store)
        assert (report.archived, report.version_conflicts, report.exit_code) == (2, 1, 0)
        with rebuilt.session_factory() as session:
            versions = sorted((r.version, r.state) for r in session.scalars(select(Instance)))
        assert versions == [(1, "superseded"), (2, "archived")]
        assert report.problems[0]["kind"] == "version-conflict"
    finally:
        rebuilt.close()
