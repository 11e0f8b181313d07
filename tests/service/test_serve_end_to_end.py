"""`lvpnet-archive serve` as a real process: C-ECHO, C-STORE over real associations, STOW-RS over
real HTTP, background archival, and every archived object rebuilding the received bytes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import httpx
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.archive_support import (
    c_store,
    ct_dataset,
    dataset_part,
    part10_bytes,
    rebuild_from_store,
    start_serve,
    stow,
)


def test_echo_store_archive_and_rebuild(tmp_path: Path, database_url: str) -> None:
    archive = start_serve(tmp_path, database_url)
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title="LVPARCHIVE")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()

        study = ct_dataset(seed=1).StudyInstanceUID
        datasets = [ct_dataset(seed=s, study_uid=study) for s in range(3)]
        assert c_store(archive.dicom_port, datasets) == [0, 0, 0]
        for ds in datasets:
            row = archive.wait_state(ds.SOPInstanceUID, {"archived"})
            assert row["stored_bytes"] < row["original_bytes"]
            rebuilt = rebuild_from_store(archive.data_dir, row["object_key"])
            assert hashlib.sha256(rebuilt).hexdigest() == row["original_sha256"]
            # The received bytes are the dataset as pynetdicom encoded it (Explicit VR LE accepted)
            assert dataset_part(rebuilt) == dataset_part(part10_bytes(ds))
        # Staged originals are deleted once archived
        assert not any((archive.data_dir / "store" / "staging").glob("*.dcm"))

        stats = httpx.get(f"{archive.http}/stats", timeout=30).json()
        assert stats["instances_by_state"] == {"archived": 3}
        assert stats["by_modality"]["CT"]["instances"] == 3
        assert stats["stored_bytes"] == sum(stats["by_codec"][c]["stored_bytes"] for c in stats["by_codec"])
    finally:
        archive.stop()
    completed = subprocess.run(
        [sys.executable, "-m", "service.cli", "stats", "--json"],
        env=archive.env,
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )
    figures = json.loads(completed.stdout)
    assert figures["instances"] == 3 and figures["storage_ratio"] > 1
    # Structured logs, without patient data
    log = archive.log()
    for line in log.splitlines():
        if line.startswith("{"):
            json.loads(line)
    assert "Doe" not in log and "TEST-PATIENT" not in log and "20240102" not in log


def test_stow_rs_stores_and_reports_per_instance(tmp_path: Path, database_url: str) -> None:
    archive = start_serve(tmp_path, database_url)
    try:
        good = [ct_dataset(seed=10), ct_dataset(seed=11)]
        response = stow(archive.http, [part10_bytes(ds) for ds in good])
        assert response.status_code == 200, response.text
        body = response.json()
        referenced = body["00081199"]["Value"]
        assert {item["00081155"]["Value"][0] for item in referenced} == {ds.SOPInstanceUID for ds in good}
        for ds in good:
            row = archive.wait_state(ds.SOPInstanceUID, {"archived"})
            rebuilt = rebuild_from_store(archive.data_dir, row["object_key"])
            assert rebuilt == part10_bytes(ds)  # STOW stores the uploaded file byte for byte

        # One good, one truncated: 202 with both sequences
        another = ct_dataset(seed=12)
        truncated = part10_bytes(ct_dataset(seed=13))[:600]
        response = stow(archive.http, [part10_bytes(another), truncated])
        assert response.status_code == 202
        body = response.json()
        assert len(body["00081199"]["Value"]) == 1
        assert body["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]

        # Study-scoped STOW refuses instances of another study
        response = stow(archive.http, [part10_bytes(ct_dataset(seed=14))], study=another.StudyInstanceUID)
        assert response.status_code == 409
        assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]

        # Not multipart/related application/dicom
        response = httpx.post(f"{archive.http}/dicomweb/studies", content=b"x", headers={"Content-Type": "text/plain"})
        assert response.status_code == 415
    finally:
        archive.stop()
