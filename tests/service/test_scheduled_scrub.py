"""`serve` scrubs on a schedule (ARCHIVE_SCRUB_INTERVAL_SECONDS): a record damaged in the store is
found and marked corrupt without anyone running the command, and the run is in the catalog."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import select

from service.catalog.tables import ScrubRun
from service.db import make_engine, make_session_factory
from tests.archive_support import ct_dataset, part10_bytes, start_serve, stow


def test_serve_scrubs_on_its_schedule_and_marks_damage(tmp_path: Path, sqlite_url: str) -> None:
    archive = start_serve(tmp_path, sqlite_url, scrub_interval_seconds=3, scrub_sample=1.0, codec_candidates="zstd")
    try:
        datasets = [ct_dataset(seed=s) for s in (81, 82)]
        assert stow(archive.http, [part10_bytes(ds) for ds in datasets]).status_code == 200
        rows = [archive.wait_state(str(ds.SOPInstanceUID), {"archived"}, limit_seconds=120) for ds in datasets]
        damaged = archive.data_dir / "store" / rows[0]["object_key"]
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0x10
        damaged.write_bytes(bytes(data))

        found = archive.wait_state(str(datasets[0].SOPInstanceUID), {"corrupt"}, limit_seconds=180)
        assert found["failure_reason"].startswith("scrub:")
        assert archive.instance(str(datasets[1].SOPInstanceUID))[0]["state"] == "archived"
        deadline = time.monotonic() + 60
        while '"scheduled scrub finished"' not in archive.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert '"scheduled scrub finished"' in archive.log()
    finally:
        archive.stop()
    engine = make_engine(sqlite_url)
    try:
        with make_session_factory(engine)() as session:
            runs = list(session.scalars(select(ScrubRun).order_by(ScrubRun.id)))
    finally:
        engine.dispose()
    assert runs and {run.mode for run in runs} == {"sample"}
    assert sum(run.corrupt for run in runs) == 1
