"""SIGTERM stops `serve` cleanly: an open association may finish its C-STOREs, the instance being
compressed is finished (or, past `ARCHIVE_SHUTDOWN_GRACE_SECONDS`, given back at once), no process
is left behind, and the next start archives whatever was left."""

from __future__ import annotations

import hashlib
import signal
import time
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode
from sqlalchemy import select

from service.catalog.tables import Instance
from service.db import make_engine, make_session_factory
from tests.archive_support import ArchiveProcess, c_store, ct_dataset, dataset_part, parse_multipart, start_serve

WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _noise(size: int, seed: int) -> Dataset:
    """Incompressible 12-bit pixels: the learned codec needs seconds for these on a CPU."""
    ds = ct_dataset(size, size, seed=seed)
    ds.PixelData = np.random.default_rng(seed).integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def _rows(database_url: str) -> dict[str, Instance]:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            return {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
    finally:
        engine.dispose()


def _terminate(archive: ArchiveProcess, limit: float) -> float:
    """SIGTERM, as Kubernetes and `docker stop` send it; returns the seconds until exit (rc 0)."""
    assert archive.process is not None
    started = time.monotonic()
    archive.process.send_signal(signal.SIGTERM)
    rc = archive.process.wait(timeout=limit)
    assert rc == 0, archive.log()[-4000:]
    return time.monotonic() - started


def _assert_exact(archive: ArchiveProcess, ds: Dataset, original_sha256: str) -> None:
    url = f"{archive.http}/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    response = httpx.get(f"{url}/instances/{ds.SOPInstanceUID}", headers={"Accept": WADO_ACCEPT}, timeout=120)
    assert response.status_code == 200
    [(_, body)] = parse_multipart(response)
    assert hashlib.sha256(body).hexdigest() == original_sha256  # the file as received...
    assert dataset_part(body) == encode(ds, False, True)  # ...holding the data set as it went over the wire


def test_sigterm_lets_the_open_association_and_the_compression_finish(tmp_path: Path, sqlite_url: str) -> None:
    archive = start_serve(
        tmp_path / "a", sqlite_url, codec_candidates="lvpnet", embedded_workers=1, shutdown_grace_seconds=120
    )
    slow, late = _noise(160, seed=1), ct_dataset(seed=2)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(slow.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title="LVPARCHIVE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(slow).Status == 0x0000
        archive.wait_state(str(slow.SOPInstanceUID), {"compressing"}, limit_seconds=60)
        assert archive.process is not None
        archive.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # The association opened before SIGTERM is still served: its next C-STORE is answered
        assert assoc.send_c_store(late).Status == 0x0000
    finally:
        assoc.release()
    rc = archive.process.wait(timeout=180)
    assert rc == 0, archive.log()[-4000:]
    log = archive.log()
    assert '"DICOM SCP stopped"' in log and '"aborted": 0' in log
    assert '"archive stopped"' in log
    rows = _rows(sqlite_url)
    assert rows[str(slow.SOPInstanceUID)].state == "archived"  # finished, not cut off
    assert rows[str(late.SOPInstanceUID)].state in {"received", "archived"}  # acknowledged, so catalogued
    # No process of the stopped archive is left (the embedded worker and decode processes exit too)
    assert archive.process.poll() is not None
    assert "embedded worker stopped" in log

    archive = start_serve(tmp_path / "b", sqlite_url, data_dir=tmp_path / "a" / "var", codec_candidates="zstd")
    try:
        archive.wait_state(str(late.SOPInstanceUID), {"archived"}, limit_seconds=120)
        rows = _rows(sqlite_url)
        _assert_exact(archive, slow, rows[str(slow.SOPInstanceUID)].original_sha256)
        _assert_exact(archive, late, rows[str(late.SOPInstanceUID)].original_sha256)
    finally:
        archive.stop()


def test_compression_past_the_grace_period_is_given_back_and_done_after_restart(
    tmp_path: Path, sqlite_url: str
) -> None:
    archive = start_serve(
        tmp_path / "a", sqlite_url, codec_candidates="lvpnet", embedded_workers=1, shutdown_grace_seconds=1
    )
    ds = _noise(1024, seed=3)  # several seconds of compression, well past the 1 s grace period
    assert c_store(archive.dicom_port, [ds]) == [0x0000]
    archive.wait_state(str(ds.SOPInstanceUID), {"compressing"}, limit_seconds=60)
    seconds = _terminate(archive, limit=60)
    row = _rows(sqlite_url)[str(ds.SOPInstanceUID)]
    log = archive.log()
    # Given back at the deadline: claimable at once by the next start, not after its 20 s lease
    assert row.state == "received" and row.lease_owner is None, log[-4000:]
    assert "compression cut off, instance given back" in log
    assert seconds < 20, f"stopping took {seconds:.1f} s"

    archive = start_serve(tmp_path / "b", sqlite_url, data_dir=tmp_path / "a" / "var", codec_candidates="zstd")
    try:
        archive.wait_state(str(ds.SOPInstanceUID), {"archived"}, limit_seconds=120)
        assert _rows(sqlite_url)[str(ds.SOPInstanceUID)].attempts == 2  # the cut-off one, then this one
        _assert_exact(archive, ds, row.original_sha256)
    finally:
        archive.stop()
