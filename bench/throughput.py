"""Distributed archive throughput: from receipt to verified-archived, with 1 and 2 Celery workers.

    .venv/bin/python bench/throughput.py [--instances 40] [--workers 1,2] [--out bench/throughput]

The set-up of docker-compose.yml / deploy/k8s on this machine, as separate processes:
`lvpnet-archive dicom` (one SCP) and N `lvpnet-archive worker --queues archive,retrieve` Celery
processes (solo pool, one instance at a time each) on Redis (127.0.0.1:6379, its own database
number), the catalog in a fresh PostgreSQL database, objects on moto's S3 server on loopback.
ARCHIVE_COMPRESSION_EFFORT=best: every candidate (LVPNet, JPEG-LS, JPEG XL, zstd), each record
decoded and SHA-256-checked before it is stored.

Instances: 512x512 16-bit single-frame CT/MR images of the dev corpus (Explicit VR LE), as
bench/retrieve.py picks them (the corpus has few distinct such images: they are repeated under new
UIDs, so each is its own file, compression and record).  They are sent over 2 concurrent C-STORE
associations once every worker answers a Celery ping (codec loaded).  Time: from the first
C-STORE request to the moment the catalog shows every instance archived (the record is in the store,
read back and verified).  Worker CPU seconds over the same span from /proc.

Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pydicom
import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from retrieve import pick_images  # noqa: E402

from tests.archive_support import c_store, database, free_port, moto_s3, part10_bytes  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
CORPUS = Path("/work/shared/corpus/dev")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine (every process, anyone's) has been busy since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def cli() -> list[str]:
    script = Path(sys.executable).parent / "lvpnet-archive"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]






def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(predicate: Any, limit: float, what: str) -> Any:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def catalog(database_url: str) -> list[dict[str, Any]]:
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as connection:
        cursor = connection.execute(
            "SELECT state, original_bytes, stored_bytes, codec, received_at, archived_at FROM instance"
        )
        names = [c.name for c in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def run(workers: int, datasets: list[pydicom.Dataset], work: Path) -> dict[str, Any]:
    broker = f"redis://127.0.0.1:6379/{random.randint(1, 15)}"
    broker_client = redis.Redis.from_url(broker)
    broker_client.flushdb()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with database("postgresql", REPO / "var") as database_url, moto_s3() as endpoint:
            boto3.client(
                "s3", endpoint_url=endpoint, aws_access_key_id="b", aws_secret_access_key="b", region_name="us-east-1"
            ).create_bucket(Bucket="archive")
            dicom_port = free_port()
            env = {
                **os.environ,
                "ARCHIVE_DATABASE_URL": database_url,
                "ARCHIVE_BROKER_URL": broker,
                "ARCHIVE_STORAGE_URL": "s3://archive/bench",
                "ARCHIVE_S3_ENDPOINT_URL": endpoint,
                "ARCHIVE_S3_ACCESS_KEY_ID": "b",
                "ARCHIVE_S3_SECRET_ACCESS_KEY": "b",
                "ARCHIVE_DICOM_PORT": str(dicom_port),
                "ARCHIVE_COMPRESSION_EFFORT": "best",
                "ARCHIVE_WORKER_THREADS": "1",
                "ARCHIVE_LOG_LEVEL": "WARNING",
                "TCP_NODELAY": "1",
            }
            subprocess.run([*cli(), "migrate"], env={**env, "ARCHIVE_DATA_DIR": str(work / "migrate")}, check=True)
            log = (work / f"processes-{workers}.log").open("wb")
            processes.append(
                subprocess.Popen(
                    [*cli(), "dicom"], env={**env, "ARCHIVE_DATA_DIR": str(work / "dicom")}, stdout=log, stderr=log
                )
            )
            worker_processes = [
                subprocess.Popen(
                    [*cli(), "worker", "--queues", "archive,retrieve"],
                    env={**env, "ARCHIVE_DATA_DIR": str(work / f"worker{i}")},
                    stdout=log,
                    stderr=log,
                )
                for i in range(workers)
            ]
            processes += worker_processes
            from celery import Celery

            control = Celery("bench", broker=broker)
            wait_for(lambda: len(control.control.ping(timeout=1.0) or []) >= workers, 180, "the workers")
            control.close()

            import socket

            def listening() -> bool:
                with socket.socket() as sock:
                    return sock.connect_ex(("127.0.0.1", dicom_port)) == 0

            wait_for(listening, 120, "the SCP")
            cpu_before = sum(cpu_seconds(w.pid) for w in worker_processes)
            busy_before, load_before = machine_busy_seconds(), load_average()
            batches = [datasets[i::2] for i in range(2)]
            started = time.monotonic()
            with ThreadPoolExecutor(2) as pool:
                statuses = list(pool.map(lambda batch: c_store(dicom_port, batch), batches))
            received = time.monotonic() - started
            assert all(s == 0 for batch in statuses for s in batch), statuses

            def done() -> list[dict[str, Any]] | None:
                rows = catalog(database_url)
                if len(rows) == len(datasets) and all(r["state"] in ("archived", "failed") for r in rows):
                    return rows
                return None

            rows = wait_for(done, 1800, "every instance archived")
            seconds = time.monotonic() - started
            cpu = sum(cpu_seconds(w.pid) for w in worker_processes) - cpu_before
            busy = machine_busy_seconds() - busy_before
            assert all(r["state"] == "archived" for r in rows), Counter(r["state"] for r in rows)
            original = sum(r["original_bytes"] for r in rows)
            stored = sum(r["stored_bytes"] for r in rows)
            latencies = sorted((r["archived_at"] - r["received_at"]).total_seconds() for r in rows)
            return {
                "workers": workers,
                "instances": len(rows),
                "original_mb": round(original / 1e6, 3),
                "stored_mb": round(stored / 1e6, 3),
                "ratio": round(original / stored, 3),
                "receive_seconds": round(received, 2),
                "seconds": round(seconds, 2),
                "instances_per_s": round(len(rows) / seconds, 3),
                "mb_per_s": round(original / 1e6 / seconds, 3),
                "worker_cpu_seconds": round(cpu, 1),
                "cpu_use": round(cpu / (seconds * workers), 2),
                "cpu_seconds_per_instance": round(cpu / len(rows), 2),
                # Everything else on the machine over the same span: the SCP, PostgreSQL, Redis, the
                # S3 server, and whatever other users of this (shared) machine were running
                "other_cpu_seconds": round(busy - cpu, 1),
                "machine_cores_busy": round(busy / seconds, 2),
                "load_average_1min": [load_before, load_average()],
                "latency_p50_s": round(statistics.median(latencies), 2),
                "latency_max_s": round(latencies[-1], 2),
                "codecs": dict(sorted(Counter(r["codec"] for r in rows).items())),
            }
    finally:
        for process in processes:
            stop(process)
        broker_client.flushdb()


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "kernel": platform.release(),
    }


def write_report(
    out: Path,
    results: list[dict[str, Any]],
    args: argparse.Namespace,
    mach: dict[str, Any],
    command: str | None = None,
    date: str | None = None,
) -> None:
    command = command or f".venv/bin/python bench/throughput.py --instances {args.instances} --workers {args.workers}"
    date = date or datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out.with_suffix(".json").write_text(
        json.dumps({"command": command, "date": date, "machine": mach, "results": results}, indent=2) + "\n"
    )
    first = results[0]
    lines = [
        "# Distributed archive throughput",
        "",
        f"Command: `{command}`  ",
        f"Date: {date}  ",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, no GPU (torch {mach['torch']}, CUDA available: "
        f"{mach['cuda']}), python {mach['python']}, kernel {mach['kernel']}",
        "",
        f"{first['instances']} single-frame 512x512 16-bit CT/MR instances of the dev corpus "
        f"({first['original_mb']} MB), sent over 2 concurrent C-STORE associations to one `lvpnet-archive dicom`; "
        "N `lvpnet-archive worker` Celery processes (solo pool) on Redis; catalog on PostgreSQL; objects on "
        "moto's S3 server; all on this machine. ARCHIVE_COMPRESSION_EFFORT=best, ARCHIVE_WORKER_THREADS=1. "
        "Time: first C-STORE request to the last instance verified-archived (record stored, read back, "
        "SHA-256 of the rebuilt original checked). One run per row.",
        "",
        "| workers | instances | original MB | stored MB | ratio | receive s | receipt to archived s | "
        "instances/s | MB/s | worker CPU s | CPU s / instance | CPU use | other CPU s | machine cores busy | "
        "load avg (start, end) | latency p50 / max s | codec chosen |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        codecs = ", ".join(f"{k} {v}" for k, v in r["codecs"].items())
        lines.append(
            f"| {r['workers']} | {r['instances']} | {r['original_mb']} | {r['stored_mb']} | {r['ratio']} | "
            f"{r['receive_seconds']} | {r['seconds']} | {r['instances_per_s']} | {r['mb_per_s']} | "
            f"{r['worker_cpu_seconds']} | {r['cpu_seconds_per_instance']} | {r['cpu_use']} | "
            f"{r['other_cpu_seconds']} | {r['machine_cores_busy']} | "
            f"{r['load_average_1min'][0]}, {r['load_average_1min'][1]} | "
            f"{r['latency_p50_s']} / {r['latency_max_s']} | {codecs} |"
        )
    lines += [
        "",
        "CPU use = worker CPU seconds / (wall seconds x workers). Other CPU s = CPU seconds of every other "
        "process on the machine over the same span (/proc/stat): the SCP, PostgreSQL, Redis, the S3 server, and "
        "anything else running on this shared machine; machine cores busy = all CPU seconds / wall seconds "
        "(2.0 = both cores saturated). MB = 10^6 bytes of the received files.",
        "",
    ]
    lines += conditions(results, mach)
    lines += SCALING_TEXT
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def conditions(results: list[dict[str, Any]], mach: dict[str, Any]) -> list[str]:
    """What the figures mean given how busy the machine was while they were taken."""
    cores = mach["cores"]
    saturated = [r for r in results if r["machine_cores_busy"] >= 0.95 * cores]
    lines = ["## Conditions", ""]
    if not saturated:
        lines.append(f"The machine's {cores} cores were not saturated during the runs: the rows compare worker counts.")
        return [*lines, ""]
    worst = max(results, key=lambda r: r["other_cpu_seconds"] / r["seconds"])
    lines.append(
        f"**The machine was saturated** during {len(saturated)} of {len(results)} runs ({cores} of {cores} cores "
        f"busy), and processes other than the workers took up to {worst['other_cpu_seconds'] / worst['seconds']:.2f} "
        "cores on average (load average in the table): the SCP, PostgreSQL, Redis and the S3 server, but mostly "
        "other users' jobs on this shared machine. The workers got what was left: compare the CPU use column. "
        "Where two workers are no faster than one, the second worker had no core to run on; the figures are a "
        "floor for this machine, and the CPU seconds per instance (which contention changes little) are the "
        "figure to size with."
    )
    return [*lines, ""]


SCALING_TEXT = [
    "## Reading, and how it scales",
    "",
    "* A worker is one process doing one instance at a time, so archive throughput is workers x the rate of one "
    "worker, until something shared saturates. Here the two workers share 2 cores with the SCP, PostgreSQL, "
    "Redis and the S3 server, so the second worker adds what the cores have left, not a full worker.",
    "* On CPU, `best` costs the CPU seconds per instance in the table (every candidate is encoded, the smallest "
    "verified record wins). A deployment needs about (arrival rate x CPU s per instance) cores of workers; "
    "`fast` (JPEG-LS + zstd) costs about a thirtieth of that (bench/ingest.md) at a few per cent more storage.",
    "* GPUs: the LVPNet candidate's networks can run on CUDA (`CodecOptions(device='cuda')`, tests/lvpnet/"
    "test_gpu.py), but the archive worker builds its codec options with the default device, the CPU "
    "(worker/runtime.py `codec_options()`), so a GPU worker as deployed today compresses at CPU speed: no GPU "
    "figure exists, and none was measured (no GPU was lent to the session that wrote this). Once the worker "
    "uses the device, a GPU takes the network part of the LVPNet candidate off the CPU; the classical "
    "candidates (JPEG-LS, JPEG XL, zstd), the entropy coder (constriction, CPU), DICOM parsing, the decode "
    "check and the SHA-256s stay on the worker's CPU cores, so a GPU worker still needs several cores, and "
    "one worker process per GPU gains only what the network share of its CPU time was.",
    "* What limits it beyond the workers: the SCP's receive rate (bench/ingest.md: about 20-27 instances/s of "
    "dev-corpus files for 1-4 SCP processes on 2 cores, with PostgreSQL), the object store's PUT + GET "
    "read-back per instance, and the catalog's row updates (a few per instance: claim, lease renewals every "
    "ARCHIVE_LEASE_SECONDS/3, archived). None of these is near its limit at these rates; compression is.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=40)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "throughput")
    parser.add_argument("--report-only", action="store_true", help="rewrite <out>.md from <out>.json")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        write_report(args.out, saved["results"], args, saved["machine"], saved["command"], saved["date"])
        return 0
    datasets = pick_images(args.corpus, args.instances)
    if len(datasets) < args.instances:
        raise SystemExit(f"only {len(datasets)} instances could be made from {args.corpus}")
    sizes = {len(part10_bytes(ds)) for ds in datasets}
    print(f"{len(datasets)} instances, {min(sizes)}-{max(sizes)} bytes", file=sys.stderr)
    results = []
    for workers in (int(w) for w in args.workers.split(",")):
        with tempfile.TemporaryDirectory(prefix="throughput-") as work:
            result = run(workers, datasets, Path(work))
        print(json.dumps(result), file=sys.stderr)
        results.append(result)
    write_report(args.out, results, args, machine())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
