"""Back-pressure through a real `serve`: while the compression queue is full (or the data disk
nearly so), C-STORE answers 0xA700 and STOW-RS 503 with Retry-After; nothing is half-kept, and
ingest resumes once the queue drains."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.archive_support import c_store, ct_dataset, database, part10_bytes, start_serve, stow


def test_queue_full_refuses_then_recovers(tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url:
        # No workers: what is received stays queued
        archive = start_serve(tmp_path, url, embedded_workers=0, max_queue_depth=2)
        try:
            first = [ct_dataset(rows=16, cols=16, seed=i) for i in range(2)]
            assert c_store(archive.dicom_port, first) == [0, 0]
            refused = ct_dataset(rows=16, cols=16, seed=9)
            assert c_store(archive.dicom_port, [refused]) == [0xA700]
            response = stow(archive.http, [part10_bytes(ct_dataset(rows=16, cols=16, seed=10))])
            assert response.status_code == 503 and response.headers["retry-after"]
            assert archive.instance(refused.SOPInstanceUID) == []
            assert "Doe^Jane" not in archive.log()
        finally:
            archive.stop()
        # The same catalog with a worker: the queue drains and the refused instance is accepted
        archive = start_serve(tmp_path / "again", url, data_dir=tmp_path / "var", max_queue_depth=2)
        try:
            for ds in first:
                archive.wait_state(ds.SOPInstanceUID, {"archived"})
            assert c_store(archive.dicom_port, [refused]) == [0]
        finally:
            archive.stop()


def test_disk_nearly_full_refuses(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    with database("sqlite", tmp_path) as url:
        # Demand more free space than the disk has: every object is refused, none half-stored
        archive = start_serve(tmp_path, url, embedded_workers=0, min_free_disk_bytes=free * 2)
        try:
            ds = ct_dataset(rows=16, cols=16, seed=3)
            assert c_store(archive.dicom_port, [ds]) == [0xA700]
            assert stow(archive.http, [part10_bytes(ct_dataset(rows=16, cols=16, seed=4))]).status_code == 503
            assert archive.instance(ds.SOPInstanceUID) == []
            assert not any((tmp_path / "var" / "store").rglob("*.dcm"))
        finally:
            archive.stop()
