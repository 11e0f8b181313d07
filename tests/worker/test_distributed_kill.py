"""Distributed mode: `lvpnet-archive dicom` + Celery `lvpnet-archive worker` on Redis.  The worker
is SIGKILLed mid-compression; a new worker takes the instance over once the lease runs out."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from service.catalog.tables import Instance
from tests.archive_support import c_store, ct_dataset, free_port, rebuild_from_store


def _wait(predicate, limit: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_killed_mid_compression_loses_nothing(tmp_path: Path) -> None:
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable on 127.0.0.1:6379 ({exc})")
    db_number = random.randint(1, 15)
    broker = f"redis://127.0.0.1:6379/{db_number}"
    redis.Redis.from_url(broker).flushdb()
    database_url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    port = free_port()
    env = {
        **os.environ,
        "ARCHIVE_DATA_DIR": str(tmp_path / "var"),
        "ARCHIVE_DATABASE_URL": database_url,
        "ARCHIVE_BROKER_URL": broker,
        "ARCHIVE_DICOM_PORT": str(port),
        "ARCHIVE_LEASE_SECONDS": "6",
        "ARCHIVE_SWEEP_INTERVAL_SECONDS": "1",
    }
    cli = [sys.executable, "-m", "service.cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, cwd=tmp_path)
    logs = (tmp_path / "dicom.log").open("wb")
    dicom = subprocess.Popen([*cli, "dicom"], env=env, cwd=tmp_path, stdout=logs, stderr=logs)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        _wait(lambda: _listening(port), 60, "the SCP")
        ds = ct_dataset(rows=1024, cols=1024, seed=9)
        noise = np.random.default_rng(9).integers(0, 4096, (1024, 1024), dtype=np.uint16)
        ds.PixelData = noise.tobytes()  # incompressible: every candidate takes its time
        workers.append(subprocess.Popen([*cli, "worker"], env=env, cwd=tmp_path, stdout=logs, stderr=logs))
        assert c_store(port, [ds]) == [0]
        engine = create_engine(database_url)

        def state() -> str:
            with Session(engine) as session:
                row = session.query(Instance).one_or_none()
                return row.state if row else ""

        _wait(lambda: state() == "compressing", 120, "compression to start")
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        assert state() == "compressing"
        workers.append(subprocess.Popen([*cli, "worker"], env=env, cwd=tmp_path, stdout=logs, stderr=logs))
        _wait(lambda: state() == "archived", 600, "the instance to be archived by the second worker")
        with Session(engine) as session:
            row = session.query(Instance).one()
            assert row.attempts == 2
            rebuilt = rebuild_from_store(tmp_path / "var", row.object_key or "")
            assert hashlib.sha256(rebuilt).hexdigest() == row.original_sha256
    finally:
        for process in [*workers, dicom]:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        redis.Redis.from_url(broker).flushdb()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
