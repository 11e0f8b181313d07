"""Files a crash leaves in the incoming directory are removed once stale, unless they may be the only
copy of an instance that is not archived yet."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from service.config import Settings
from service.db import make_engine, make_session_factory, migrate
from service.ingest import Ingestor
from service.storage.filesystem import FilesystemStore
from service.sweeper import clean_incoming
from tests.archive_support import ct_dataset, part10_bytes, start_serve
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
