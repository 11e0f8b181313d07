"""Files a crash leaves in the incoming directory are removed once stale, unless they may be the only
copy of an instance that is not archived yet."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pydicom
from sqlalchemy import select

from service.catalog.tables import Instance
from service.config import Settings
from service.db import make_engine, make_session_factory, migrate
from service.ingest import Ingestor
from service.storage.filesystem import FilesystemStore
from service.sweeper import clean_incoming, clean_staging
from tests.archive_support import ct_dataset, part10_bytes, start_serve, stow
from worker.pipeline import WorkerContext, archive_instance

HOUR = 3600.0


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_stale_files_go_unless_an_instance_still_needs_them(tmp_path: Path, database_url: str) -> None:
    migrate(database_url)
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    factory = make_session_factory(make_engine(database_url))
    store = FilesystemStore(tmp_path / "store")
    ingestor = Ingestor(settings, factory, store, lambda _id: None)
    incoming = tmp_path / "incoming"
    incoming.mkdir()

    partial = incoming / "tmpcut.dcm"  # a receive cut short: never catalogued
    partial.write_bytes(part10_bytes(ct_dataset(seed=90))[:500])
    _age(partial, 2 * HOUR)
    fresh = incoming / "tmpbusy.dcm"  # being written right now
    fresh.write_bytes(b"\x00" * 100)
    (incoming / "subdir").mkdir()  # not ours: left alone

    source = tmp_path / "received.dcm"
    source.write_bytes(part10_bytes(ct_dataset(seed=91)))
    result = ingestor.ingest_file(source, source="import")  # catalogued, waiting for a worker
    assert result.instance_id is not None
    copy = incoming / "tmpcopy.dcm"
    shutil.copyfile(source, copy)
    _age(copy, 2 * HOUR)

    assert clean_incoming(incoming, factory, HOUR) == ["tmpcut.dcm"]
    assert sorted(p.name for p in incoming.iterdir()) == ["subdir", "tmpbusy.dcm", "tmpcopy.dcm"]

    # Once its instance is archived, the copy goes too
    assert archive_instance(WorkerContext(settings, factory, store, "worker"), result.instance_id) == "archived"
    assert clean_incoming(incoming, factory, HOUR) == ["tmpcopy.dcm"]
    assert clean_incoming(incoming, factory, HOUR, now=time.time() + 2 * HOUR) == ["tmpbusy.dcm"]


def test_serve_cleans_incoming_at_start_up(tmp_path: Path, sqlite_url: str) -> None:
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True)
    leftover = incoming / "tmpcrash.dcm"
    leftover.write_bytes(b"half a C-STORE")
    _age(leftover, 2 * HOUR)
    archive = start_serve(tmp_path, sqlite_url, embedded_workers=0)
    try:
        deadline = time.monotonic() + 60
        while leftover.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not leftover.exists()
        assert '"removed stale incoming files"' in archive.log()
    finally:
        archive.stop()


def test_staged_copies_no_row_names_are_removed_when_safe(tmp_path: Path, database_url: str) -> None:
    """A crash between the staging PUT and the catalog commit leaves a staged copy no row names.
    A copy of bytes archived under another row (the sender resent) goes after an hour; a copy
    nothing else holds is kept for days, since a lost catalog looks the same until
    `rebuild-catalog` has run."""
    migrate(database_url)
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    factory = make_session_factory(make_engine(database_url))
    store = FilesystemStore(tmp_path / "store")
    ingestor = Ingestor(settings, factory, store, lambda _id: None)

    archived_bytes = part10_bytes(ct_dataset(seed=92))
    source = tmp_path / "archived.dcm"
    source.write_bytes(archived_bytes)
    archived = ingestor.ingest_file(source, source="import")
    assert archived.instance_id is not None
    assert archive_instance(WorkerContext(settings, factory, store, "worker"), archived.instance_id) == "archived"
    waiting_source = tmp_path / "waiting.dcm"
    waiting_source.write_bytes(part10_bytes(ct_dataset(seed=93)))
    waiting = ingestor.ingest_file(waiting_source, source="import")  # staged, catalogued, not archived
    assert waiting.instance_id is not None

    # A crash between the worker's archived commit and its delete of the staged copy
    with factory() as session:
        row = session.get(Instance, archived.instance_id)
        assert row is not None
        row.staging_key = "staging/after-archival.dcm"
        session.commit()
    store.put_bytes("staging/after-archival.dcm", archived_bytes)
    store.put_bytes("staging/resent.dcm", archived_bytes)  # the crashed first attempt of a resent instance
    store.put_bytes("staging/never-resent.dcm", part10_bytes(ct_dataset(seed=94)))
    staged_before = sorted(store.iter_keys("staging/"))
    assert len(staged_before) == 4

    day = 24 * HOUR
    nothing: dict[str, list[str]] = {"archived": [], "redundant": [], "unclaimed": []}
    assert clean_staging(store, factory, HOUR, 7 * day) == nothing  # all fresh
    digests: dict[str, str] = {}
    removed = clean_staging(store, factory, HOUR, 7 * day, now=time.time() + 2 * HOUR, digests=digests)
    assert removed == {**nothing, "archived": ["staging/after-archival.dcm"], "redundant": ["staging/resent.dcm"]}
    with factory() as session:
        assert session.get(Instance, archived.instance_id).staging_key is None  # type: ignore[union-attr]
    assert "staging/never-resent.dcm" in digests  # hashed once, not re-read next sweep
    removed = clean_staging(store, factory, HOUR, 7 * day, now=time.time() + 8 * day, digests=digests)
    assert removed == {**nothing, "unclaimed": ["staging/never-resent.dcm"]}
    assert digests == {}
    # The staged copy of the instance still waiting for a worker is never touched
    with factory() as session:
        waiting_key = session.get(Instance, waiting.instance_id).staging_key  # type: ignore[union-attr]
    assert list(store.iter_keys("staging/")) == [waiting_key]
    assert archive_instance(WorkerContext(settings, factory, store, "worker"), waiting.instance_id) == "archived"


def test_embedded_serve_does_not_rewrite_waiting_rows(tmp_path: Path, sqlite_url: str) -> None:
    """Embedded workers take waiting rows by polling; the sweeper must not "re-enqueue" them (with
    no broker that only rewrote every waiting row each sweep: bench/load.md, finding 1)."""
    archive = start_serve(tmp_path, sqlite_url, embedded_workers=0, lease_seconds=1, sweep_interval_seconds=0.5)
    try:
        source = part10_bytes(ct_dataset(seed=95))
        ds_uid = pydicom.dcmread(io.BytesIO(source)).SOPInstanceUID
        assert stow(archive.http, [source]).status_code == 200
        engine = make_engine(sqlite_url)
        try:
            with make_session_factory(engine)() as session:
                first = session.scalars(select(Instance.lease_expires_at)).all()
            time.sleep(4)  # 8 sweeps, the lease long expired
            with make_session_factory(engine)() as session:
                row = session.scalars(select(Instance).where(Instance.sop_instance_uid == str(ds_uid))).one()
                assert row.state == "received"
                assert [row.lease_expires_at] == list(first)
        finally:
            engine.dispose()
        assert "re-enqueued stuck instances" not in archive.log()
    finally:
        archive.stop()
