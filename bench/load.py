"""Load test (issue #8): concurrent C-STORE ingest while QIDO-RS / WADO-RS clients read; memory over time.

    .venv/bin/python bench/load.py [--associations 8] [--per-association 1000] [--readers 2]
                                   [--catalog postgresql|sqlite] [--out bench/load]

One real `lvpnet-archive serve` (tests.archive_support.start_serve: REST + DICOM SCP in one process,
its embedded compression worker and its decode process as children), catalog in a fresh PostgreSQL
database (127.0.0.1:5432) or SQLite, objects on the filesystem, all on loopback.  Settings:
ARCHIVE_COMPRESSION_EFFORT=fast (JPEG-LS + zstd, so one embedded worker can keep up on this machine),
ARCHIVE_EMBEDDED_WORKERS=1, ARCHIVE_RETRIEVE_WORKERS=1, ARCHIVE_LOG_LEVEL=WARNING, authentication off
(loopback), and start_serve's ARCHIVE_LEASE_SECONDS=20, ARCHIVE_SWEEP_INTERVAL_SECONDS=2.

Senders: one spawned process per association (pynetdicom, TCP_NODELAY set on its socket), each sending
--per-association distinct 64x64 12-bit CT instances (tests.archive_support.ct_dataset, Explicit VR LE,
about 8.7 kB), 100 instances per study and 50 per series, synthetic patients LOAD-<n>.  All senders
start together once every one has built its data sets.  Per C-STORE: status and latency.

Readers: --readers spawned processes, each looping (with --reader-pause between rounds) over an instance
its sender has already had acknowledged: QIDO-RS studies of that patient, series of the study, instances
of the series (includefield=all; the acknowledged UIDs must be found), then WADO-RS of the instance
(multipart application/dicom, transfer-syntax=*), whose body must be byte for byte the file the archive
keeps for a pynetdicom C-STORE (preamble, pynetdicom's file meta, the data set as sent).  They run while
the senders send.

Every second: RSS (VmRSS) of the serve process and of each child, catalog rows by state (SQL), CPU
seconds.  After ingest: wait until nothing is left to archive, check that every acknowledged instance is
archived exactly once, retrieve a random sample of them again (now through the decode process), idle,
read memory again.  Writes <out>.json, <out>.md, <out>.png.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import re
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tests.archive_support import ArchiveProcess, ct_dataset, database, parse_multipart, start_serve  # noqa: E402
from tests.reliability.faults import cstore_file  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
PER_STUDY = 100
PER_SERIES = 50
SIZE = 64
SETTINGS = {
    "compression_effort": "fast",
    "embedded_workers": 1,
    "retrieve_workers": 1,
    "log_level": "WARNING",
}
READ_KINDS = ("qido_studies", "qido_series", "qido_instances", "wado")


# ----------------------------------------------------------------------------- the instances


def uids(root: str, sender: int, index: int) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs of instance `index` of `sender`: deterministic, so that a
    reader can rebuild the data set the sender sent."""
    study = f"{root}.{sender + 1}.{index // PER_STUDY + 1}"
    series = f"{study}.{index % PER_STUDY // PER_SERIES + 1}"
    return study, series, f"{series}.{index + 1}"


def make_dataset(root: str, sender: int, index: int) -> Any:
    study, series, sop = uids(root, sender, index)
    ds = ct_dataset(
        SIZE,
        SIZE,
        seed=sender * 1_000_003 + index,
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        patient_id=f"LOAD-{sender + 1}",
        description="load test",
    )
    ds.PatientName = f"LOAD^SENDER{sender + 1}"
    ds.InstanceNumber = index % PER_SERIES + 1
    return ds


# ----------------------------------------------------------------------------- senders


def nodelay_sockets() -> None:
    """pynetdicom leaves Nagle's algorithm on; a PACS-like sender would not.  Set TCP_NODELAY on every
    socket pynetdicom creates in this process."""
    from pynetdicom.transport import AssociationSocket

    original = AssociationSocket._create_socket

    def create(self: Any, address: Any) -> socket.socket:
        sock = original(self, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    AssociationSocket._create_socket = create  # type: ignore[method-assign]


def sender(
    sender_index: int,
    root: str,
    per: int,
    port: int,
    acked: Any,
    progress: Any,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    """One association sending `per` C-STOREs; each outcome goes into `acked` (1 Success, 2 other)."""
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    nodelay_sockets()
    datasets = [make_dataset(root, sender_index, i) for i in range(per)]
    ae = AE(ae_title=f"LOADSCU{sender_index + 1}")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ready.put(sender_index)
    go.wait()
    records: list[tuple[int, str, float, float]] = []  # index, outcome, latency s, wall time when answered
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="LVPARCHIVE")
    associate_s = time.perf_counter() - started
    try:
        for i, ds in enumerate(datasets):
            base = sender_index * per + i
            if not assoc.is_established:
                outcome, latency = "association gone", 0.0
            else:
                t = time.perf_counter()
                try:
                    status = assoc.send_c_store(ds)
                    code = int(status.Status) if "Status" in status else -1
                    outcome = f"0x{code:04X}" if code >= 0 else "no response"
                except Exception as exc:  # counted, never raised: the run goes on
                    outcome = f"send: {type(exc).__name__}"
                latency = time.perf_counter() - t
            acked[base] = 1 if outcome == "0x0000" else 2
            progress[sender_index] = i + 1
            records.append((i, outcome, latency, time.time()))
    finally:
        with contextlib.suppress(Exception):
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()
    results.put(("sender", sender_index, {"records": records, "associate_s": associate_s}))


# ----------------------------------------------------------------------------- readers


def reader(
    reader_index: int,
    root: str,
    per: int,
    senders: int,
    http: str,
    pause: float,
    acked: Any,
    progress: Any,
    reads: Any,
    stop: Any,
    results: Any,
) -> None:
    """QIDO-RS (studies, series, instances) and WADO-RS of acknowledged instances until `stop`."""
    import httpx

    rng = random.Random(1000 + reader_index)
    records: list[tuple[str, float, float, str]] = []  # kind, wall time, latency s, outcome
    wrong: list[str] = []
    client = httpx.Client(base_url=http, timeout=60)

    def timed(kind: str, url: str, headers: dict[str, str]) -> httpx.Response | None:
        t = time.perf_counter()
        try:
            response = client.get(url, headers=headers)
        except httpx.HTTPError as exc:
            records.append((kind, time.time(), time.perf_counter() - t, f"exception {type(exc).__name__}"))
            return None
        latency = time.perf_counter() - t
        if response.status_code != 200:
            records.append((kind, time.time(), latency, f"HTTP {response.status_code}"))
            return None
        records.append((kind, time.time(), latency, "ok"))
        return response

    def found(response: httpx.Response | None, tag: str, uid: str) -> None:
        """Marks the last record 'missing' when an acknowledged UID is not in a 200 search result."""
        if response is None:
            return
        try:
            values = {item.get(tag, {}).get("Value", [None])[0] for item in response.json()}
        except (ValueError, AttributeError, IndexError, TypeError):
            values = set()
        if uid not in values:
            kind, wall, latency, _ = records[-1]
            records[-1] = (kind, wall, latency, "acknowledged UID missing")

    json_accept = {"Accept": "application/dicom+json"}
    while not stop.is_set():
        candidates = [s for s in range(senders) if progress[s] > 0]
        if not candidates:
            stop.wait(0.05)
            continue
        s = rng.choice(candidates)
        i = rng.randrange(progress[s])
        if acked[s * per + i] != 1:
            continue
        study, series, sop = uids(root, s, i)
        response = timed("qido_studies", f"/dicomweb/studies?PatientID=LOAD-{s + 1}&includefield=all", json_accept)
        found(response, "0020000D", study)
        response = timed("qido_series", f"/dicomweb/studies/{study}/series?includefield=all", json_accept)
        found(response, "0020000E", series)
        response = timed(
            "qido_instances", f"/dicomweb/studies/{study}/series/{series}/instances?includefield=all", json_accept
        )
        found(response, "00080018", sop)
        response = timed("wado", f"/dicomweb/studies/{study}/series/{series}/instances/{sop}", {"Accept": WADO_ACCEPT})
        if response is not None:
            try:
                parts = parse_multipart(response)
                same = len(parts) == 1 and parts[0][1] == cstore_file(make_dataset(root, s, i))
            except (AssertionError, KeyError, StopIteration, UnicodeDecodeError):
                same = False
            if not same:
                kind, wall, latency, _ = records[-1]
                records[-1] = (kind, wall, latency, "wrong bytes")
                wrong.append(sop)
        reads[reader_index] += 1
        if pause:
            stop.wait(pause)
    client.close()
    results.put(("reader", reader_index, {"records": records, "wrong": wrong}))


# ----------------------------------------------------------------------------- /proc


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def load_average() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def children(pid: int) -> list[int]:
    """Every live descendant of pid."""
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                tree.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def role(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if "worker.embedded" in cmdline:
        return "embedded worker"
    if "resource_tracker" in cmdline:
        return "resource tracker"
    if "spawn_main" in cmdline or "multiprocessing" in cmdline:
        return "decode process"
    return "other child"


# ----------------------------------------------------------------------------- sampling


def postgres_backends(database: str) -> list[int]:
    """PostgreSQL backend processes connected to `database` (their title names it)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(f"/proc/{name}/comm").read_text().strip() != "postgres":
                continue
            if f" {database} ".encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                found.append(int(name))
    return found


class Sampler(threading.Thread):
    """Once a second: RSS of serve and its children, CPU by role, catalog rows by state, acknowledgements."""

    def __init__(
        self,
        archive: ArchiveProcess,
        database_url: str,
        acked: Any,
        reads: Any,
        clients: Callable[[], list[tuple[int, str]]],
    ) -> None:
        super().__init__(name="sampler", daemon=True)
        from sqlalchemy import create_engine

        assert archive.process is not None
        self.serve_pid = archive.process.pid
        self.engine = create_engine(database_url)
        self.database = database_url.rsplit("/", 1)[1] if database_url.startswith("postgresql") else ""
        self.acked, self.reads, self.clients = acked, reads, clients
        self.t0 = time.time()
        self.samples: list[dict[str, Any]] = []
        self.stopping = threading.Event()
        # pid -> (role, last CPU seconds seen): processes that ended keep their last reading
        self.cpu_seen: dict[int, tuple[str, float]] = {}
        self.labels: dict[int, str] = {self.serve_pid: "serve"}
        self.lock = threading.Lock()

    def states(self) -> dict[str, int]:
        from sqlalchemy import text

        with self.engine.connect() as connection:
            rows = connection.execute(text("SELECT state, count(*) FROM instance GROUP BY state")).all()
            states = {str(state): int(count) for state, count in rows}
            if self.database:
                # Row UPDATEs of the instance table so far (PostgreSQL's statistics, flushed within a second or so)
                updated = connection.execute(
                    text("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'instance'")
                ).scalar()
                states["row_updates"] = int(updated or 0)
        return states

    def sample(self) -> dict[str, Any]:
        with self.lock:
            return self._sample()

    def _sample(self) -> dict[str, Any]:
        rss: dict[str, float] = {}
        for pid in [self.serve_pid, *children(self.serve_pid)]:
            if pid not in self.labels:
                self.labels[pid] = role(pid)
            value = rss_mb(pid)
            if value is not None:
                rss[f"{self.labels[pid]} ({pid})"] = value
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self.cpu_seen[pid] = (self.labels[pid], cpu)
        others = list(self.clients())
        if self.database:
            others += [(pid, "PostgreSQL backends") for pid in postgres_backends(self.database)]
        for pid, name in others:
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self.cpu_seen[pid] = (name, cpu)
        self.cpu_seen[os.getpid()] = ("bench script", self_cpu())
        by_role: dict[str, float] = {}
        for name, cpu in self.cpu_seen.values():
            by_role[name] = by_role.get(name, 0.0) + cpu
        flags = np.frombuffer(self.acked, dtype=np.int8)
        try:
            states = self.states()
        except Exception as exc:  # a slow or locked catalog must not end the run
            states = {"error": type(exc).__name__}
        return {
            "t": round(time.time() - self.t0, 2),
            "acked": int((flags == 1).sum()),
            "refused": int((flags == 2).sum()),
            "reads": int(sum(self.reads)),
            "states": states,
            "rss_mb": {k: round(v, 1) for k, v in rss.items()},
            "cpu_s": {k: round(v, 2) for k, v in sorted(by_role.items())},
            "machine_busy_s": round(machine_busy_seconds(), 2),
            "load": load_average()[0],
        }

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            self.samples.append(self.sample())
            self.stopping.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def last(self) -> dict[str, Any]:
        return self.samples[-1] if self.samples else self.sample()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        self.engine.dispose()


def self_cpu() -> float:
    times = os.times()
    return times.user + times.system


def backlog(states: dict[str, int]) -> int:
    return states.get("received", 0) + states.get("compressing", 0)


def memory_at(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, float]:
    """Mean RSS per process (role label, pid dropped) over samples with start <= t <= end."""
    window = [s for s in samples if start <= s["t"] <= end]
    sums: dict[str, list[float]] = {}
    for s in window:
        for name, value in s["rss_mb"].items():
            sums.setdefault(name, []).append(value)
    return {name: round(float(np.mean(values)), 1) for name, values in sums.items()}


# ----------------------------------------------------------------------------- statistics


def latency_stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    ms = np.array(values) * 1000
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }


def slope_mb_per_1000(samples: list[dict[str, Any]], name: str, start: float, end: float) -> float | None:
    """Least-squares slope of a process's RSS against acknowledged instances between two times."""
    points = [(s["acked"], s["rss_mb"][name]) for s in samples if start <= s["t"] <= end and name in s["rss_mb"]]
    if len(points) < 5 or points[-1][0] - points[0][0] < 100:
        return None
    x, y = np.array(points, dtype=float).T
    return round(float(np.polyfit(x, y, 1)[0] * 1000), 2)


def metrics_snapshot(http: str) -> dict[str, float]:
    """The /metrics series this report uses (retrievals by source, ingest by status, archived)."""
    import httpx

    wanted = (
        "archive_retrieve_seconds_count",
        "archive_retrievals_total",
        "archive_ingested_total",
        "archive_archived_total",
        "archive_archive_failures_total",
        "archive_verification_failures_total",
    )
    values: dict[str, float] = {}
    with contextlib.suppress(httpx.HTTPError):
        for line in httpx.get(f"{http}/metrics", timeout=30).text.splitlines():
            if line.startswith(wanted):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
    return values


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    memory = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    import pynetdicom
    import sqlalchemy

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(int(memory) / 1024**2, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "pynetdicom": pynetdicom.__version__,
        "sqlalchemy": sqlalchemy.__version__,
    }


def other_load() -> list[str]:
    """Command names (no arguments: they may carry paths) of processes using CPU that are not ours."""
    mine = {os.getpid(), *children(os.getpid())}
    busy = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in mine:
            with contextlib.suppress(OSError, IndexError):
                stat = Path(f"/proc/{name}/stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                if fields[0] == "R":
                    busy.append(stat[stat.index("(") + 1 : stat.rindex(")")])
    return sorted(busy)


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from pydicom.uid import generate_uid

    total = args.associations * args.per_association
    root = generate_uid(prefix=None)  # 2.25.<uuid>, at most 44 characters; the instance UIDs stay under 64
    ctx = mp.get_context("spawn")
    acked = ctx.RawArray(ctypes.c_int8, total)
    progress = ctx.RawArray(ctypes.c_int, args.associations)
    reads = ctx.RawArray(ctypes.c_int, max(1, args.readers))
    ready, results, go, stop_readers = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    result: dict[str, Any] = {
        "instances": total,
        "settings": SETTINGS,
        "catalog": args.catalog,
        "instance_bytes": len(cstore_file(make_dataset(root, args.associations - 1, args.per_association - 1))),
    }
    with database(args.catalog, work) as database_url:
        started = time.monotonic()
        archive = start_serve(work, database_url, **SETTINGS)
        result["serve_start_s"] = round(time.monotonic() - started, 1)
        clients: list[Any] = []
        sampler = Sampler(
            archive,
            database_url,
            acked,
            reads,
            lambda: [(p.pid, p.name.split("-")[0] + "s") for p in clients if p.pid],
        )
        sampler.start()
        marks: dict[str, float] = {}

        def mark(name: str) -> float:
            marks[name] = round(time.time() - sampler.t0, 2)
            return marks[name]

        try:
            metrics_before = metrics_snapshot(archive.http)
            time.sleep(args.settle)  # the embedded worker and the decode process load; an idle reading
            mark("idle_before")
            senders = [
                ctx.Process(
                    target=sender,
                    args=(a, root, args.per_association, archive.dicom_port, acked, progress, ready, go, results),
                    name=f"sender-{a}",
                )
                for a in range(args.associations)
            ]
            readers = [
                ctx.Process(
                    target=reader,
                    args=(
                        r,
                        root,
                        args.per_association,
                        args.associations,
                        archive.http,
                        args.reader_pause,
                        acked,
                        progress,
                        reads,
                        stop_readers,
                        results,
                    ),
                    name=f"reader-{r}",
                )
                for r in range(args.readers)
            ]
            clients.extend(senders + readers)
            for process in clients:
                process.start()
            for _ in senders:
                ready.get(timeout=600)
            busy_before = machine_busy_seconds()
            load_before = load_average()
            others_before = other_load()
            go.set()
            t_go = mark("ingest_start")
            collected: dict[tuple[str, int], dict[str, Any]] = {}
            warm = min(1000, total // 8)
            last_print = 0.0
            while sum(kind == "sender" for kind, _ in collected) < len(senders):
                with contextlib.suppress(queue.Empty):
                    kind, index, payload = results.get(timeout=0.5)
                    collected[(kind, index)] = payload
                    continue
                latest = sampler.last()
                if "warm" not in marks and latest["acked"] >= warm:
                    mark("warm")
                if time.monotonic() - last_print > 5:
                    last_print = time.monotonic()
                    print(progress_line("ingest", latest), file=sys.stderr, flush=True)
                if all(p.exitcode is not None for p in senders) and results.empty():
                    break  # a sender died without reporting: its instances count as never answered
            mark("ingest_end")
            last_answer = max(
                (r[3] for (kind, _), p in collected.items() if kind == "sender" for r in p["records"]),
                default=time.time(),
            )
            marks["ingest_end"] = t_ingest = round(last_answer - sampler.t0, 2)
            busy_ingest = machine_busy_seconds() - busy_before
            load_ingest = load_average()
            ingest_snapshot = sampler.sample()
            stop_readers.set()
            while len(collected) < len(senders) + len(readers):
                kind, index, payload = results.get(timeout=120)
                collected[(kind, index)] = payload
            for process in clients:
                process.join(timeout=60)
            metrics_ingest = metrics_snapshot(archive.http)

            # Drain: nothing left in received/compressing
            deadline = time.monotonic() + args.drain_limit
            while time.monotonic() < deadline:
                latest = sampler.last()
                if "error" not in latest["states"] and backlog(latest["states"]) == 0:
                    break
                if time.monotonic() - last_print > 5:
                    last_print = time.monotonic()
                    print(progress_line("drain", latest), file=sys.stderr, flush=True)
                time.sleep(1)
            t_drained = mark("drained")
            busy_drain = machine_busy_seconds() - busy_before - busy_ingest
            drained_snapshot = sampler.sample()

            catalog_check = check_catalog(database_url, root, args.associations, args.per_association, acked)
            verify = verify_sample(archive.http, root, args.per_association, acked, args.verify_sample)
            mark("verified")
            time.sleep(args.idle)
            mark("idle_end")
            metrics_after = metrics_snapshot(archive.http)
            others_after = other_load()
        finally:
            sampler.stop()
            for process in clients:
                if process.is_alive():
                    process.terminate()
            archive.stop()
        log = archive.log()
        result["serve_exit_code"] = archive.process.returncode if archive.process else None
    result["serve_log"] = {
        "lines": log.count("\n"),
        "error_lines": len(re.findall(r"\bERROR\b|\"level\": \"error\"", log)),
        "warning_lines": len(re.findall(r"\bWARNING\b|\"level\": \"warning\"", log)),
        "tracebacks": log.count("Traceback"),
        # the first few, shortened: the archive's log lines carry no patient data (and these patients are synthetic)
        "first_warning_or_error_lines": [
            line[:300] for line in log.splitlines() if re.search(r"WARNING|ERROR|\"level\": \"(warning|error)\"", line)
        ][:5],
        "first_tracebacks": [log[i : i + 2500] for i in [m.start() for m in re.finditer("Traceback", log)][:3]],
    }
    samples = sampler.samples
    sender_records = [payload for (kind, _), payload in sorted(collected.items()) if kind == "sender"]
    reader_records = [payload for (kind, _), payload in sorted(collected.items()) if kind == "reader"]
    stores = [r for payload in sender_records for r in payload["records"]]
    outcomes = Counter(r[1] for r in stores)
    ok_latencies = [r[2] for r in stores if r[1] == "0x0000"]
    ingest_s = t_ingest - t_go
    drained_s = t_drained - t_go
    acked_total = outcomes.get("0x0000", 0)
    result.update(
        {
            "root_uid_length": len(root),
            "ingest_seconds": round(ingest_s, 2),
            "receipt_to_all_archived_seconds": round(drained_s, 2),
            "drain_after_ingest_seconds": round(t_drained - t_ingest, 2),
            "acknowledged": acked_total,
            "accepted_per_s": round(acked_total / ingest_s, 1),
            "archived_per_s_overall": round(catalog_check["archived"] / drained_s, 1),
            "archived_during_ingest": backlog_free(ingest_snapshot["states"]),
            "archived_per_s_during_ingest": round(backlog_free(ingest_snapshot["states"]) / ingest_s, 1),
            "backlog_at_ingest_end": backlog(ingest_snapshot["states"]),
            "backlog_max": max((backlog(s["states"]) for s in samples if "error" not in s["states"]), default=0),
            "cstore_outcomes": dict(sorted(outcomes.items())),
            "cstore_latency": latency_stats(ok_latencies),
            "cstore_latency_per_association_p50_ms": [
                latency_stats([r[2] for r in p["records"] if r[1] == "0x0000"]).get("p50_ms") for p in sender_records
            ],
            "associate_ms": [round(p["associate_s"] * 1000, 1) for p in sender_records],
            "reads": read_summary(reader_records),
            "wrong_bytes_during_ingest": sum(len(p["wrong"]) for p in reader_records),
            "wrong_bytes_examples": [uid for p in reader_records for uid in p["wrong"]][:5],
            "catalog_check": catalog_check,
            "instance_row_updates": drained_snapshot["states"].get("row_updates"),
            "verify_after_drain": verify,
            "metrics_before": metrics_before,
            "metrics_after_ingest": metrics_ingest,
            "metrics_end": metrics_after,
            "marks": marks,
            "cpu": {
                "machine_cores_busy_ingest": round(busy_ingest / ingest_s, 2),
                "machine_cores_busy_drain": round(busy_drain / max(t_drained - t_ingest, 1e-9), 2),
                "by_role_ingest": cpu_between(first_at(samples, t_go), ingest_snapshot),
                "by_role_drain": cpu_between(ingest_snapshot, drained_snapshot),
                "by_role_idle_before": cpu_between(
                    first_at(samples, marks["idle_before"] - args.settle / 2),
                    last_before(samples, marks["idle_before"]),
                ),
                "by_role_idle_end": cpu_between(
                    first_at(samples, marks["idle_end"] - args.idle / 2), last_before(samples, marks["idle_end"])
                ),
                "load_average_before": load_before,
                "load_average_end_of_ingest": load_ingest,
                "running_other_processes_before": dict(Counter(others_before)),
                "running_other_processes_end": dict(Counter(others_after)),
            },
            "memory": memory_summary(samples, marks, total),
            "samples": samples,
        }
    )
    return result


def backlog_free(states: dict[str, int]) -> int:
    return states.get("archived", 0)


def first_at(samples: list[dict[str, Any]], t: float) -> dict[str, Any]:
    return next((s for s in samples if s["t"] >= t), samples[-1])


def last_before(samples: list[dict[str, Any]], t: float) -> dict[str, Any]:
    return next((s for s in reversed(samples) if s["t"] <= t), samples[0])


def cpu_between(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float]]:
    """CPU seconds by role between two samples, and the cores that is on average."""
    span = max(b["t"] - a["t"], 1e-9)
    result = {}
    for name in sorted(set(a["cpu_s"]) | set(b["cpu_s"])):
        seconds = b["cpu_s"].get(name, 0.0) - a["cpu_s"].get(name, 0.0)
        result[name] = {"cpu_s": round(seconds, 1), "cores": round(seconds / span, 2)}
    return result


def progress_line(phase: str, s: dict[str, Any]) -> str:
    rss = ", ".join(f"{k.split(' (')[0]} {v:.0f}" for k, v in s["rss_mb"].items())
    return (
        f"[{phase} {s['t']:7.1f} s] acknowledged {s['acked']} (refused {s['refused']}), states {s['states']}, "
        f"reads {s['reads']}, RSS MB: {rss}, load {s['load']}"
    )


def read_summary(reader_records: list[dict[str, Any]]) -> dict[str, Any]:
    records = [r for p in reader_records for r in p["records"]]
    summary = {}
    for kind in READ_KINDS:
        mine = [r for r in records if r[0] == kind]
        summary[kind] = {
            "latency_all": latency_stats([r[2] for r in mine]),
            "latency_ok": latency_stats([r[2] for r in mine if r[3] == "ok"]),
            "outcomes": dict(sorted(Counter(r[3] for r in mine).items())),
        }
    return summary


def check_catalog(database_url: str, root: str, senders: int, per: int, acked: Any) -> dict[str, Any]:
    """Every acknowledged instance archived exactly once; nothing else in the catalog."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT sop_instance_uid, state FROM instance")).all()
    finally:
        engine.dispose()
    flags = np.frombuffer(acked, dtype=np.int8)
    expected = {uids(root, s, i)[2] for s in range(senders) for i in range(per) if flags[s * per + i] == 1}
    per_uid = Counter(str(uid) for uid, _ in rows)
    archived = Counter(str(uid) for uid, state in rows if state == "archived")
    return {
        "rows": len(rows),
        "states": dict(sorted(Counter(str(state) for _, state in rows).items())),
        "distinct_sop_uids": len(per_uid),
        "archived": sum(archived.values()),
        "acknowledged_not_archived": sum(1 for uid in expected if archived[uid] == 0),
        "archived_more_than_once": sum(1 for n in archived.values() if n > 1),
        "rows_more_than_one_per_uid": sum(1 for n in per_uid.values() if n > 1),
        "rows_not_sent": sum(1 for uid in per_uid if uid not in expected),
    }


def verify_sample(http: str, root: str, per: int, acked: Any, count: int) -> dict[str, Any]:
    """WADO-RS of a random sample of acknowledged instances after the drain (archived: rebuilt by the
    decode process unless the API's cache holds them), each compared byte for byte."""
    import httpx

    flags = np.frombuffer(acked, dtype=np.int8)
    indices = [int(i) for i in np.flatnonzero(flags == 1)]
    sample = random.Random(7).sample(indices, min(count, len(indices)))
    latencies, outcomes = [], Counter()
    with httpx.Client(base_url=http, timeout=60) as client:
        for flat in sample:
            s, i = divmod(flat, per)
            study, series, sop = uids(root, s, i)
            t = time.perf_counter()
            try:
                response = client.get(
                    f"/dicomweb/studies/{study}/series/{series}/instances/{sop}", headers={"Accept": WADO_ACCEPT}
                )
            except httpx.HTTPError as exc:
                outcomes[f"exception {type(exc).__name__}"] += 1
                continue
            latencies.append(time.perf_counter() - t)
            if response.status_code != 200:
                outcomes[f"HTTP {response.status_code}"] += 1
                continue
            parts = parse_multipart(response)
            same = len(parts) == 1 and parts[0][1] == cstore_file(make_dataset(root, s, i))
            outcomes["ok" if same else "wrong bytes"] += 1
    return {"requests": len(sample), "outcomes": dict(outcomes), "latency": latency_stats(latencies)}


def memory_summary(samples: list[dict[str, Any]], marks: dict[str, float], total: int) -> dict[str, Any]:
    names = sorted({name for s in samples for name in s["rss_mb"]})
    peak = {name: max(s["rss_mb"].get(name, 0.0) for s in samples) for name in names}
    idle_before = memory_at(samples, marks["idle_before"] - 3, marks["idle_before"])
    warm_t = marks.get("warm", marks["ingest_start"])
    warm = memory_at(samples, warm_t - 1, warm_t + 1)
    ingest_end = memory_at(samples, marks["ingest_end"] - 2, marks["ingest_end"])
    drained = memory_at(samples, marks["drained"] - 2, marks["drained"] + 1)
    idle_end = memory_at(samples, marks["idle_end"] - 5, marks["idle_end"])
    warm_acked = next((s["acked"] for s in samples if s["t"] >= marks.get("warm", marks["ingest_start"])), 0)
    end_acked = next((s["acked"] for s in reversed(samples) if s["t"] <= marks["ingest_end"]), total)
    per_process = {}
    for name in names:
        growth = None
        if name in warm and name in ingest_end and end_acked > warm_acked:
            growth = round((ingest_end[name] - warm[name]) / ((end_acked - warm_acked) / 1000), 2)
        per_process[name] = {
            "idle_before_mb": idle_before.get(name),
            "warm_mb": warm.get(name),
            "end_of_ingest_mb": ingest_end.get(name),
            "drained_mb": drained.get(name),
            "idle_end_mb": idle_end.get(name),
            "peak_mb": peak[name],
            "growth_warm_to_end_of_ingest_mb_per_1000": growth,
            "slope_during_ingest_mb_per_1000": slope_mb_per_1000(
                samples, name, marks.get("warm", marks["ingest_start"]), marks["ingest_end"]
            ),
        }
    return {"warm_acknowledged": warm_acked, "end_acknowledged": end_acked, "per_process": per_process}


# ----------------------------------------------------------------------------- report


def write_report(out: Path, result: dict[str, Any], command: str, mach: dict[str, Any], date: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"command": command, "date": date, "machine": mach, "result": result}, indent=1) + "\n"
    )
    plot(out.with_suffix(".png"), result)
    out.with_suffix(".md").write_text("\n".join(markdown(result, command, mach, date, out)) + "\n")


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    names = sorted({name for s in samples for name in s["rss_mb"]})
    for name in names:
        top.plot(t, [s["rss_mb"].get(name, np.nan) for s in samples], label=name)
    top.set_ylabel("RSS (MB)")
    top.set_title("Memory (VmRSS) of serve and its children")
    top.legend(fontsize=8, loc="upper left")
    bottom.plot(t, [s["acked"] for s in samples], label="acknowledged (C-STORE Success)")
    bottom.plot(t, [s["states"].get("archived", np.nan) for s in samples], label="archived (catalog)")
    bottom.plot(
        t,
        [backlog(s["states"]) if "error" not in s["states"] else np.nan for s in samples],
        label="backlog (received + compressing)",
    )
    bottom.set_ylabel("instances")
    bottom.set_xlabel("seconds since serve was up")
    bottom.legend(fontsize=8, loc="upper left")
    for axis in (top, bottom):
        for name, x in result["marks"].items():
            if name in ("ingest_start", "ingest_end", "drained"):
                axis.axvline(x, color="grey", linestyle=":", linewidth=1)
        axis.grid(alpha=0.3)
    bottom.text(result["marks"]["ingest_start"], 0, " ingest", fontsize=8, color="grey")
    bottom.text(result["marks"]["ingest_end"], 0, " ingest end", fontsize=8, color="grey")
    bottom.text(result["marks"]["drained"], 0, " drained", fontsize=8, color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(stats: dict[str, Any]) -> str:
    if not stats.get("count"):
        return "- | - | - | - | 0"
    return f"{stats['p50_ms']} | {stats['p95_ms']} | {stats['p99_ms']} | {stats['max_ms']} | {stats['count']}"


def markdown(result: dict[str, Any], command: str, mach: dict[str, Any], date: str, out: Path) -> list[str]:
    r = result
    cpu = r["cpu"]
    check = r["catalog_check"]
    errors_store = {k: v for k, v in r["cstore_outcomes"].items() if k != "0x0000"}
    read_errors = {kind: {k: v for k, v in r["reads"][kind]["outcomes"].items() if k != "ok"} for kind in READ_KINDS}
    n_assoc = r["associations"]
    catalog = "a fresh PostgreSQL database (127.0.0.1)" if r["catalog"] == "postgresql" else "SQLite (WAL)"
    lines = [
        f"# Load: {n_assoc} associations x {r['per_association']:,} instances with QIDO/WADO readers",
        "",
        f"Command: `{command}`  ",
        f"Date: {date}  ",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gb']} GB, python {mach['python']}, "
        f"kernel {mach['kernel']}, pynetdicom {mach['pynetdicom']}, SQLAlchemy {mach['sqlalchemy']}  ",
        f"Load average (1, 5, 15 min) before ingest: {cpu['load_average_before']}, at the end of ingest: "
        f"{cpu['load_average_end_of_ingest']}; machine cores busy (all processes, /proc/stat): "
        f"{cpu['machine_cores_busy_ingest']} of {mach['cores']} during ingest, {cpu['machine_cores_busy_drain']} "
        "during the drain.",
        "",
        "One `lvpnet-archive serve` (REST + DICOM SCP in one process; one embedded compression worker and one "
        f"decode process as children), catalog on {catalog}"
        ", objects and staging on the local filesystem, everything on loopback. Settings: "
        + ", ".join(f"ARCHIVE_{k.upper()}={v}" for k, v in r["settings"].items())
        + ", ARCHIVE_LEASE_SECONDS=20, ARCHIVE_SWEEP_INTERVAL_SECONDS=2, authentication off (loopback). "
        f"{r['instances']:,} distinct instances: 64x64 12-bit synthetic CT (`tests.archive_support.ct_dataset`, "
        f"Explicit VR LE, {r['instance_bytes']:,} bytes each as stored), {PER_STUDY} per study, {PER_SERIES} "
        f"per series, synthetic patients LOAD-1..{n_assoc}. {n_assoc} sender processes, one association "
        f"each (pynetdicom, TCP_NODELAY), all released at once; {r['readers']} reader processes "
        f"(httpx, keep-alive) looping over already-acknowledged instances while the senders send, "
        f"{r['reader_pause']} s pause between rounds; one round = QIDO-RS studies of the patient, series of the "
        "study, instances of the series (each `includefield=all`, the acknowledged UID must be in the answer), "
        "then WADO-RS of the instance (`transfer-syntax=*`) compared byte for byte with the file the archive "
        "keeps for that C-STORE. One run.",
        "",
        "## Throughput",
        "",
        "| | value |",
        "|---|---:|",
        f"| C-STORE acknowledged (Success) | {r['acknowledged']:,} of {r['instances']:,} |",
        f"| ingest wall time (first request to last response) | {r['ingest_seconds']} s |",
        f"| **accepted instances/s** (acknowledged / ingest time, {n_assoc} associations together) | "
        f"**{r['accepted_per_s']}** |",
        f"| archived during ingest | {r['archived_during_ingest']:,} ({r['archived_per_s_during_ingest']}/s) |",
        f"| backlog (received + compressing) at end of ingest / max | {r['backlog_at_ingest_end']:,} / "
        f"{r['backlog_max']:,} |",
        f"| drain after ingest (until nothing received/compressing) | {r['drain_after_ingest_seconds']} s |",
        f"| **archived instances/s** (all archived / first request to drained) | **{r['archived_per_s_overall']}** |",
        "",
        "CPU by process (seconds from /proc, and the average cores it kept busy), during the ingest and during "
        "the drain after it:",
        "",
        "| process | ingest CPU s | ingest cores | drain CPU s | drain cores |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {name} | {cpu['by_role_ingest'].get(name, {}).get('cpu_s', 0)} | "
            f"{cpu['by_role_ingest'].get(name, {}).get('cores', 0)} | "
            f"{cpu['by_role_drain'].get(name, {}).get('cpu_s', 0)} | "
            f"{cpu['by_role_drain'].get(name, {}).get('cores', 0)} |"
            for name in sorted(set(cpu["by_role_ingest"]) | set(cpu["by_role_drain"]))
        ],
        "",
        "With no request at all (cores): before the ingest "
        + ", ".join(f"{k} {v['cores']}" for k, v in cpu["by_role_idle_before"].items())
        + "; after the drain and checks "
        + ", ".join(f"{k} {v['cores']}" for k, v in cpu["by_role_idle_end"].items())
        + ".",
        "",
        "## Latency",
        "",
        "| request | p50 ms | p95 ms | p99 ms | max ms | count |",
        "|---|---:|---:|---:|---:|---:|",
        f"| C-STORE (Success, request to response, per instance) | {fmt(r['cstore_latency'])} |",
    ]
    for kind, label in zip(
        READ_KINDS,
        (
            "QIDO-RS studies (PatientID, includefield=all)",
            "QIDO-RS series of a study",
            "QIDO-RS instances of a series (50)",
            "WADO-RS instance (multipart, transfer-syntax=*)",
        ),
        strict=True,
    ):
        lines.append(f"| {label}, during ingest | {fmt(r['reads'][kind]['latency_all'])} |")
    v = r["verify_after_drain"]
    lines += [
        f"| WADO-RS after the drain (random sample of archived instances) | {fmt(v['latency'])} |",
        "",
        "Per-association C-STORE p50 (ms): "
        + ", ".join(str(x) for x in r["cstore_latency_per_association_p50_ms"])
        + "; association set-up (ms): "
        + ", ".join(str(x) for x in r["associate_ms"])
        + ".",
        "",
        "## Errors and correctness",
        "",
        "| check | count |",
        "|---|---:|",
        f"| C-STORE not Success | {sum(errors_store.values())} {json.dumps(errors_store) if errors_store else ''} |",
    ]
    for kind in READ_KINDS:
        errs = read_errors[kind]
        lines.append(
            f"| {kind.replace('_', ' ')} errors during ingest | {sum(errs.values())} "
            f"{json.dumps(errs) if errs else ''} |"
        )
    verify_errors = {k: n for k, n in v["outcomes"].items() if k != "ok"}
    lines += [
        f"| **wrong bytes** (WADO-RS 200 with other bytes), during ingest | **{r['wrong_bytes_during_ingest']}** |",
        f"| WADO-RS after the drain: not ok of {v['requests']} | {sum(verify_errors.values())} "
        f"{json.dumps(verify_errors) if verify_errors else ''} |",
        f"| catalog rows / distinct SOP Instance UIDs / archived | {check['rows']:,} / "
        f"{check['distinct_sop_uids']:,} / {check['archived']:,} |",
        f"| acknowledged but not archived | {check['acknowledged_not_archived']} |",
        f"| archived more than once / UIDs with more than one row | {check['archived_more_than_once']} / "
        f"{check['rows_more_than_one_per_uid']} |",
        f"| rows for instances never acknowledged | {check['rows_not_sent']} |",
        f"| serve log: ERROR lines / WARNING lines / tracebacks | {r['serve_log']['error_lines']} / "
        f"{r['serve_log']['warning_lines']} / {r['serve_log']['tracebacks']} |",
        f"| serve exit code after SIGINT | {r['serve_exit_code']} |",
        "",
        "Catalog states at the end: "
        + json.dumps(check["states"])
        + (
            f"; row UPDATEs of the instance table (PostgreSQL statistics) from the start to the drained point: "
            f"{r['instance_row_updates']:,} ({r['instance_row_updates'] / r['instances']:.1f} per instance)"
            if r.get("instance_row_updates")
            else ""
        )
        + ". WADO-RS answers by source "
        "(`archive_retrieve_seconds_count` on /metrics, whole run): "
        + json.dumps(
            {
                k.split('source="')[1].rstrip('"}'): int(n)
                for k, n in r["metrics_end"].items()
                if k.startswith("archive_retrieve_seconds_count")
            }
        )
        + ".",
        "",
        "## Memory (VmRSS, MB)",
        "",
        f"Means over a few 1 s samples at each point. Warm = when {r['memory']['warm_acknowledged']:,} instances "
        "were acknowledged; growth = (end of ingest - warm) per 1,000 instances acknowledged in between; slope = "
        "least-squares RSS against acknowledged instances over the same span.",
        "",
        "| process | idle before | warm | end of ingest | drained | idle at end | peak | growth MB/1,000 | "
        "slope MB/1,000 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in r["memory"]["per_process"].items():
        lines.append(
            f"| {name} | {m['idle_before_mb']} | {m['warm_mb']} | {m['end_of_ingest_mb']} | {m['drained_mb']} | "
            f"{m['idle_end_mb']} | {m['peak_mb']} | {m['growth_warm_to_end_of_ingest_mb_per_1000']} | "
            f"{m['slope_during_ingest_mb_per_1000']} |"
        )
    lines += [
        "",
        f"![RSS per process and instances over time]({out.with_suffix('.png').name})",
        "",
        "## Conditions",
        "",
    ]
    lines += result.get("conditions", [])
    if result.get("findings"):
        lines += ["", "## Findings", "", *result["findings"]]
    lines += [
        "",
        "## What the figures show and do not show",
        "",
    ]
    lines += result.get("reading", [])
    return lines


def conditions_text(result: dict[str, Any], mach: dict[str, Any]) -> list[str]:
    cpu = result["cpu"]
    others = cpu["running_other_processes_before"]
    return [
        f"The machine has {mach['cores']} cores, shared with the database server and with other people's jobs "
        f"(test runs) during this measurement: load average {cpu['load_average_before'][0]} before the ingest, "
        f"{cpu['load_average_end_of_ingest'][0]} at its end; processes running (state R) that were not part of "
        f"this benchmark when the ingest started: {json.dumps(others) if others else 'none'}. The archive, "
        f"PostgreSQL, the {result['associations']} senders and {result['readers']} readers all compete for the "
        "same cores, so every figure here is a floor for this machine and includes client-side time "
        "(pynetdicom encoding the data set; httpx and JSON parsing) in the latencies.",
    ]


def reading_text(result: dict[str, Any]) -> list[str]:
    r = result
    check = r["catalog_check"]
    refused = sum(n for k, n in r["cstore_outcomes"].items() if k != "0x0000")
    read_errors = sum(n for kind in READ_KINDS for k, n in r["reads"][kind]["outcomes"].items() if k != "ok")
    exact = (
        check["acknowledged_not_archived"] == 0
        and check["archived_more_than_once"] == 0
        and check["rows_more_than_one_per_uid"] == 0
        and check["rows_not_sent"] == 0
    )
    return [
        f"* Shows: over {r['associations']} concurrent associations, {refused} of {r['instances']:,} C-STOREs "
        f"were answered with anything but Success; {'every' if exact else 'NOT every'} acknowledged instance "
        f"ended archived exactly once (catalog check above); the readers had {read_errors} failed requests and "
        f"{r['wrong_bytes_during_ingest']} wrong-byte answers while the ingest ran. The catalog check and the "
        "byte comparison cover every instance and every WADO-RS answer, except the after-drain WADO-RS, which is "
        "a random sample. QIDO-RS answers were checked to contain the acknowledged UID, not compared attribute "
        "by attribute.",
        "* Latencies are end to end from the client's side on a saturated 2-core machine: each C-STORE "
        "includes pynetdicom's encoding in the sender process, the archive's fsync of the staged file and "
        "the catalog commit (Success is sent only after both). They are not service times on an idle server.",
        "* The instances are small (64x64) so that the load is on the per-instance path (association "
        "handling, staging, catalog, queue) rather than on compression; large images would shift the "
        "bottleneck to compression and disk (bench/ingest.md, bench/throughput.md). compression_effort=fast: "
        "with `best` the single embedded worker would fall far behind on 2 cores and the drain would dominate.",
        "* Memory: one run of this size is evidence about leaks of the order of the growth figures, not a "
        "proof of their absence for smaller ones. RSS includes memory Python's allocator keeps after freeing "
        "and shared library pages; the serve process also holds the LRU cache of verified files "
        "(ARCHIVE_RETRIEVE_CACHE_BYTES, default 256 MB) which fills with what the readers retrieve (at most "
        "distinct retrieved instances x file size), so some growth of serve during reads is bounded and expected.",
        "* Not covered: STOW-RS ingest, TLS, authentication, S3 or Redis/Celery deployments, larger images, "
        "runs longer than this one, several SCP processes.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=8)
    parser.add_argument("--per-association", type=int, default=1000)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--reader-pause", type=float, default=0.1, help="seconds between a reader's rounds")
    parser.add_argument("--catalog", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--verify-sample", type=int, default=400, help="WADO-RS checks after the drain")
    parser.add_argument("--settle", type=float, default=10, help="seconds idle after start, before ingest")
    parser.add_argument("--idle", type=float, default=20, help="seconds idle after the drain and checks")
    parser.add_argument("--drain-limit", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "load")
    parser.add_argument("--report-only", action="store_true", help="rewrite <out>.md and .png from <out>.json")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        saved["result"]["conditions"] = conditions_text(saved["result"], saved["machine"])
        saved["result"]["reading"] = reading_text(saved["result"])
        write_report(args.out, saved["result"], saved["command"], saved["machine"], saved["date"])
        return 0
    defaults = {"associations": 8, "per_association": 1000, "readers": 2, "catalog": "postgresql"}
    command = ".venv/bin/python bench/load.py" + "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}" for k in defaults if getattr(args, k) != defaults[k]
    )
    mach = machine()
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="load-") as work:
        result = run(args, Path(work))
    result.update(
        associations=args.associations,
        per_association=args.per_association,
        readers=args.readers,
        reader_pause=args.reader_pause,
    )
    result["conditions"] = conditions_text(result, mach)
    result["reading"] = reading_text(result)
    write_report(args.out, result, command, mach, date)
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("samples", "reading", "conditions")}, indent=1),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
