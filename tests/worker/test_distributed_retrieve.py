"""Distributed retrieval: `serve` with a Redis broker (no embedded workers, no local decode pool)
and one Celery `lvpnet-archive worker`.  Compression and the decode for WADO-RS both run on the
worker; the API checks the rebuilt bytes against the catalog's SHA-256."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from tests.archive_support import ct_dataset, database, parse_multipart, part10_bytes, start_serve, stow


def test_wado_decodes_on_the_celery_worker(tmp_path: Path) -> None:
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable on 127.0.0.1:6379 ({exc})")
    broker = f"redis://127.0.0.1:6379/{random.randint(1, 15)}"
    redis.Redis.from_url(broker).flushdb()
    with database("sqlite", tmp_path) as url:
        archive = start_serve(tmp_path, url, broker_url=broker)
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"], env=archive.env, cwd=tmp_path, stdout=log, stderr=log
        )
        try:
            ds = ct_dataset(rows=96, cols=96, seed=5)
            data = part10_bytes(ds)
            assert stow(archive.http, [data]).status_code == 200
            row = archive.wait_state(ds.SOPInstanceUID, {"archived"})
            url_path = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            response = httpx.get(
                f"{archive.http}{url_path}/instances/{ds.SOPInstanceUID}",
                headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                timeout=120,
            )
            assert response.status_code == 200, response.text
            [(headers, body)] = parse_multipart(response)
            assert body == data and headers["x-content-sha256"] == hashlib.sha256(data).hexdigest()
            assert headers["x-content-sha256"] == row["original_sha256"]
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
            archive.stop()
            redis.Redis.from_url(broker).flushdb()
