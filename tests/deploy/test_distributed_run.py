"""The distributed set-up of docker-compose.yml and deploy/k8s/, as separate processes on this machine:
`lvpnet-archive api`, `lvpnet-archive dicom` and two Celery `lvpnet-archive worker` processes on Redis,
the catalog in a fresh PostgreSQL database, objects on an S3 server (moto's, on loopback).

Instances arrive over three concurrent C-STORE associations and a STOW-RS request; one worker is
SIGKILLed while it holds an instance in `compressing`.  Every instance must end archived exactly
once, every object must rebuild its original byte for byte, nothing may stay under staging/, and a
WADO-RS retrieval (decoded on a worker through the `retrieve` queue) must return the bytes sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import boto3
import httpx
import numpy as np
import pytest
import redis
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from service.catalog.tables import Instance
from service.record import parse_record
from tests.archive_support import (
    c_store,
    ct_dataset,
    database,
    free_port,
    moto_s3,
    parse_multipart,
    part10_bytes,
    stow,
)
from worker.pipeline import rebuild_file

BUCKET = "archive"
PREFIX = "prefix"
CELERY_ARCHIVE_QUEUE = "archive"  # the Redis list KEDA scales on (deploy/k8s/base/keda.yaml)
T = TypeVar("T")


def _wait(predicate: Callable[[], T], limit: float, what: str, logs: Callable[[], str] = lambda: "") -> T:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{logs()[-6000:]}")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _cli() -> list[str]:
    """The installed console script, as a container runs it; the module where it is not installed."""
    script = Path(sys.executable).parent / "lvpnet-archive"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def _moto_s3(log_path: Path) -> contextlib.AbstractContextManager[str]:
    return moto_s3(log_path)


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _noisy(ds: Dataset, size: int, seed: int) -> Dataset:
    """Incompressible 12-bit noise: every codec candidate takes measurable time (about a second)."""
    ds.PixelData = np.random.default_rng(seed).integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def _datasets() -> tuple[list[list[Dataset]], list[Dataset]]:
    """Three associations' worth of C-STORE instances and one STOW-RS request's, 20 in all, in two
    studies; each batch holds noisy images that keep a worker in `compressing` for a while."""
    studies = [generate_uid(), generate_uid()]
    associations: list[list[Dataset]] = []
    seed = 100
    for a in range(3):
        series = generate_uid()
        batch = []
        for i in range(5):
            seed += 1
            if i < 2:
                ds = _noisy(ct_dataset(384, 384, seed=seed, study_uid=studies[0], series_uid=series), 384, seed)
            else:
                ds = ct_dataset(128, 128, seed=seed, study_uid=studies[0], series_uid=series)
            ds.InstanceNumber = a * 5 + i + 1
            batch.append(ds)
        associations.append(batch)
    stow_series = generate_uid()
    stowed = []
    for i in range(5):
        seed += 1
        ds = ct_dataset(128, 128, seed=seed, study_uid=studies[1], series_uid=stow_series, description="stow")
        if i == 0:
            ds = _noisy(ds, 128, seed)
        ds.InstanceNumber = i + 1
        stowed.append(ds)
    return associations, stowed


def _rows(engine: Engine) -> list[Instance]:
    with Session(engine) as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


def test_distributed_run_survives_a_killed_worker(tmp_path: Path) -> None:
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable on 127.0.0.1:6379 ({exc})")
    broker = f"redis://127.0.0.1:6379/{random.randint(1, 15)}"
    broker_client = redis.Redis.from_url(broker)
    broker_client.flushdb()
    processes: dict[str, subprocess.Popen[bytes]] = {}
    log_dir = tmp_path / "logs"
    log_dir.mkdir()

    def logs() -> str:
        return "\n".join(f"===== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(log_dir.iterdir()))

    try:
        with database("postgresql", tmp_path) as database_url, _moto_s3(log_dir / "moto.log") as endpoint:
            s3 = boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id="test",
                aws_secret_access_key="test",
                region_name="us-east-1",
            )
            s3.create_bucket(Bucket=BUCKET)
            http_port, dicom_port = free_port(), free_port()
            env = {
                **os.environ,
                "ARCHIVE_DATABASE_URL": database_url,
                "ARCHIVE_BROKER_URL": broker,
                "ARCHIVE_STORAGE_URL": f"s3://{BUCKET}/{PREFIX}",
                "ARCHIVE_S3_ENDPOINT_URL": endpoint,
                "ARCHIVE_S3_ACCESS_KEY_ID": "test",
                "ARCHIVE_S3_SECRET_ACCESS_KEY": "test",
                "ARCHIVE_S3_REGION": "us-east-1",
                "ARCHIVE_HTTP_PORT": str(http_port),
                "ARCHIVE_DICOM_PORT": str(dicom_port),
                "ARCHIVE_COMPRESSION_EFFORT": "best",
                "ARCHIVE_LEASE_SECONDS": "6",
                "ARCHIVE_SWEEP_INTERVAL_SECONDS": "1",
                # Loopback only: authentication has its own tests (tests/service/test_security.py)
                "ARCHIVE_REQUIRE_AUTH": "false",
                "TCP_NODELAY": "1",
            }

            def start(name: str, *args: str) -> subprocess.Popen[bytes]:
                # Each process has its own data directory, as each container has
                process_env = {**env, "ARCHIVE_DATA_DIR": str(tmp_path / name)}
                with (log_dir / f"{name}.log").open("wb") as log:
                    processes[name] = subprocess.Popen(
                        [*_cli(), *args], env=process_env, cwd=tmp_path, stdout=log, stderr=log
                    )
                return processes[name]

            migrate = subprocess.run(
                [*_cli(), "migrate"],
                env={**env, "ARCHIVE_DATA_DIR": str(tmp_path / "migrate")},
                cwd=tmp_path,
                capture_output=True,
                timeout=120,
            )
            assert migrate.returncode == 0, migrate.stderr.decode(errors="replace")[-4000:]
            start("api", "api")
            start("dicom", "dicom")
            workers = [start(f"worker{i}", "worker", "--queues", "archive,retrieve") for i in range(2)]
            api = f"http://127.0.0.1:{http_port}"

            def ready() -> bool:
                for name, process in processes.items():
                    assert process.poll() is None, f"{name} exited\n{logs()}"
                with contextlib.suppress(httpx.HTTPError):
                    return httpx.get(f"{api}/readyz", timeout=2).status_code == 200 and _listening(dicom_port)
                return False

            _wait(ready, 120, "api /readyz and the SCP", logs)

            associations, stowed = _datasets()
            stow_bytes = [part10_bytes(ds) for ds in stowed]
            all_uids = {ds.SOPInstanceUID for batch in associations for ds in batch} | {
                ds.SOPInstanceUID for ds in stowed
            }
            assert len(all_uids) == 20
            engine = create_engine(database_url)
            pids = {str(w.pid): w for w in workers}
            killed: tuple[subprocess.Popen[bytes], str] | None = None
            longest_queue = 0
            with ThreadPoolExecutor(4) as pool:
                sent = [pool.submit(c_store, dicom_port, batch) for batch in associations]
                stowing = pool.submit(stow, api, stow_bytes)
                deadline = time.monotonic() + 120
                # Watch the catalog: the first instance in `compressing` held by a worker process dies with it
                while killed is None and time.monotonic() < deadline:
                    longest_queue = max(longest_queue, int(broker_client.llen(CELERY_ARCHIVE_QUEUE)))
                    with Session(engine) as session:
                        held = session.execute(
                            select(Instance.sop_instance_uid, Instance.lease_owner).where(
                                Instance.state == "compressing"
                            )
                        ).all()
                    for uid, owner in held:
                        pid = (owner or "").split(":")[1] if (owner or "").count(":") >= 2 else ""
                        if pid in pids:
                            pids[pid].send_signal(signal.SIGKILL)
                            pids[pid].wait()
                            killed = (pids[pid], uid)
                            break
                    else:
                        time.sleep(0.05)
                assert [f.result(timeout=120) for f in sent] == [[0] * 5] * 3
                stowed_response = stowing.result(timeout=120)
            assert stowed_response.status_code == 200, stowed_response.text
            assert killed is not None, f"no worker was ever seen holding an instance\n{logs()}"
            victim, victim_uid = killed
            survivor = next(w for w in workers if w is not victim)
            assert victim.returncode == -signal.SIGKILL and survivor.poll() is None

            def all_archived() -> bool:
                longest = int(broker_client.llen(CELERY_ARCHIVE_QUEUE))
                nonlocal longest_queue
                longest_queue = max(longest_queue, longest)
                rows = _rows(engine)
                return {r.sop_instance_uid for r in rows if r.state == "archived"} == all_uids

            _wait(all_archived, 180, "every instance to be archived", logs)

            # Exactly once: one row per SOP Instance UID (keep-first: no versions), archived, one object
            rows = _rows(engine)
            assert sorted(r.sop_instance_uid for r in rows if r.state != "superseded") == sorted(all_uids)
            assert all(r.state == "archived" and r.object_key and r.lease_owner is None for r in rows)
            [victim_row] = [r for r in rows if r.sop_instance_uid == victim_uid]
            assert victim_row.attempts >= 2, "the killed worker's instance was not taken over"
            # The queue KEDA watches is the Redis list named after the Celery queue
            assert longest_queue >= 1

            def object_bytes(key: str) -> bytes:
                return bytes(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read())

            for row in rows:
                record = parse_record(object_bytes(row.object_key or ""))
                rebuilt = rebuild_file(record)
                assert hashlib.sha256(rebuilt).hexdigest() == row.original_sha256 == record.original_sha256
                assert len(rebuilt) == row.original_bytes
            sent_sha = {
                ds.SOPInstanceUID: hashlib.sha256(b).hexdigest() for ds, b in zip(stowed, stow_bytes, strict=True)
            }
            assert all(
                r.original_sha256 == sent_sha[r.sop_instance_uid] for r in rows if r.sop_instance_uid in sent_sha
            )

            def staging_left() -> list[str]:
                listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/staging/")
                return [item["Key"] for item in listing.get("Contents", [])]

            # The staged original goes last, just after the row is marked archived
            _wait(lambda: not staging_left(), 30, f"staging/ to empty (left: {staging_left()})", logs)

            # WADO-RS through the api: the decode runs on the surviving worker (queue `retrieve`)
            target, target_bytes = stowed[0], stow_bytes[0]
            path = (
                f"/dicomweb/studies/{target.StudyInstanceUID}/series/{target.SeriesInstanceUID}"
                f"/instances/{target.SOPInstanceUID}"
            )
            response = httpx.get(
                f"{api}{path}",
                headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                timeout=120,
            )
            assert response.status_code == 200, response.text
            [(headers, body)] = parse_multipart(response)
            assert body == target_bytes
            assert headers["x-content-sha256"] == hashlib.sha256(target_bytes).hexdigest()
            engine.dispose()
            for name in ("api", "dicom"):
                _stop(processes[name], signal.SIGINT if name == "api" else signal.SIGTERM)
                assert processes[name].returncode == 0, f"{name} did not stop cleanly\n{logs()}"
    finally:
        for process in processes.values():
            _stop(process)
        broker_client.flushdb()
