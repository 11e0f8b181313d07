"""Fault campaign (issue 8): real `serve` process trees, senders that retry, faults injected while
instances arrive, and one invariant checked after recovery.

The invariant: every instance whose C-STORE or STOW-RS got Success is archived exactly once (one
non-superseded catalog row per SOP Instance UID, state `archived`), its stored object rebuilds the
original SHA-256 and the bytes that were sent, and WADO-RS (`transfer-syntax=*`) answers with exactly
those bytes or with an error, never with other bytes, during the faults and after them.

Each scenario is a function of (seed, tmp_path) and returns an `Outcome`; all randomness (image
sizes, the moment of a kill, the length of a pause) comes from the seed, so a failing run can be
replayed with the same seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from service.catalog.tables import Instance
from service.record import parse_record
from tests.archive_support import ArchiveProcess, ct_dataset, database, free_port, parse_multipart, part10_bytes, stow
from worker.pipeline import rebuild_file

WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
LEASE_SECONDS = 4
SWEEP_SECONDS = 1
BUCKET = "faults"
PREFIX = "archive"


# ----------------------------------------------------------------------------- what is sent


@dataclass
class Item:
    """One instance a sender owns: the bytes the archive must give back, and what it was told."""

    uid: str
    study: str
    series: str
    expected: bytes  # the Part 10 file the archive keeps (what WADO-RS transfer-syntax=* returns)
    via: str  # c-store | stow
    dataset: Dataset
    acked: bool = False
    attempts: int = 0
    statuses: list[str] = field(default_factory=list)


def cstore_file(ds: Dataset) -> bytes:
    """The Part 10 file pynetdicom's chunked receive writes for `ds` sent in Explicit VR LE: the
    preamble, DICM, pynetdicom's file meta group, the data set as encoded on the wire."""
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta, encode

    meta = io.BytesIO()
    write_file_meta_info(
        meta,
        create_file_meta(
            sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=ExplicitVRLittleEndian
        ),
    )
    encoded = encode(ds, False, True)
    assert encoded is not None
    return b"\0" * 128 + b"DICM" + meta.getvalue() + encoded


def make_items(
    rng: random.Random, count: int, *, via: str, noisy: int = 0, noisy_size: int = 192, study: str | None = None
) -> list[Item]:
    """`count` small CT images (32..64 square, compress in a moment); the first `noisy` of them are
    incompressible 12-bit noise of `noisy_size`, so a worker stays a while in `compressing`."""
    study = study or generate_uid()
    series = generate_uid()
    items = []
    for i in range(count):
        seed = rng.randrange(1 << 30)
        size = rng.choice([32, 48, 64])
        ds = ct_dataset(size, size, seed=seed, study_uid=study, series_uid=series)
        if i < noisy:
            noise = np.random.default_rng(seed).integers(0, 4096, (noisy_size, noisy_size), dtype=np.uint16)
            ds.Rows = ds.Columns = noisy_size
            ds.PixelData = noise.tobytes()
        ds.InstanceNumber = i + 1
        expected = cstore_file(ds) if via == "c-store" else part10_bytes(ds)
        items.append(Item(ds.SOPInstanceUID, study, series, expected, via, ds))
    return items


def send_cstore(port: int, items: list[Item], timeout: float = 10) -> None:
    """One association; each item's status is recorded, a broken association fails the rest.  The
    timeout is short: pynetdicom notices a peer killed mid-association only when it runs out."""
    from pynetdicom import AE

    ae = AE(ae_title="FAULTSCU")
    for sop_class in sorted({str(item.dataset.SOPClassUID) for item in items}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    pending = list(items)
    for item in pending:
        item.attempts += 1
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="LVPARCHIVE")
    except Exception as exc:
        for item in pending:
            item.statuses.append(f"associate: {type(exc).__name__}")
        return
    if not assoc.is_established:
        for item in pending:
            item.statuses.append("association not established")
        return
    try:
        for item in pending:
            if not assoc.is_established:
                item.statuses.append("association gone")
                continue
            try:
                status = assoc.send_c_store(item.dataset)
            except Exception as exc:
                item.statuses.append(f"send: {type(exc).__name__}")
                continue
            code = int(status.Status) if "Status" in status else -1
            item.statuses.append(f"0x{code:04X}" if code >= 0 else "no response")
            if code == SUCCESS:
                item.acked = True
    finally:
        with contextlib.suppress(Exception):
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()


def send_stow(http: str, items: list[Item]) -> None:
    """One STOW-RS request; the items named in ReferencedSOPSequence (200 or 202) got Success."""
    for item in items:
        item.attempts += 1
    try:
        response = stow(http, [item.expected for item in items])
    except Exception as exc:
        for item in items:
            item.statuses.append(f"stow: {type(exc).__name__}")
        return
    stored: set[str] = set()
    if response.status_code in (200, 202):
        body = response.json()
        stored = {ref["00081155"]["Value"][0] for ref in body.get("00081199", {}).get("Value", [])}
    for item in items:
        item.statuses.append(f"stow {response.status_code}" + (" stored" if item.uid in stored else ""))
        if item.uid in stored:
            item.acked = True


def resend(archive: ArchiveProcess, items: list[Item], rounds: int = 4, timeout: float = 10) -> None:
    """The senders retry what did not get Success (a few rounds, as a PACS would)."""
    for _ in range(rounds):
        left = [item for item in items if not item.acked]
        if not left:
            return
        cstore = [item for item in left if item.via == "c-store"]
        stowed = [item for item in left if item.via == "stow"]
        if cstore:
            send_cstore(archive.dicom_port, cstore, timeout)
        if stowed:
            send_stow(archive.http, stowed)
        if any(not item.acked for item in left):
            time.sleep(1)


def send_concurrently(archive: ArchiveProcess, batches: list[list[Item]], timeout: float = 10) -> list[Any]:
    """Start one sender per batch (C-STORE association or STOW-RS request); returns the futures."""
    pool = ThreadPoolExecutor(len(batches))
    futures = []
    for batch in batches:
        if batch[0].via == "c-store":
            futures.append(pool.submit(send_cstore, archive.dicom_port, batch, timeout))
        else:
            futures.append(pool.submit(send_stow, archive.http, batch))
    pool.shutdown(wait=False)
    return futures


# ----------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, pgid, state) of a live process, None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), fields[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for other in _all_pids():
        stat = _proc_stat(other)
        if stat is not None and stat[2] != "Z":
            children.setdefault(stat[0], []).append(other)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def embedded_workers(archive: ArchiveProcess) -> list[int]:
    assert archive.process is not None
    return [pid for pid in descendants(archive.process.pid) if "worker.embedded" in _cmdline(pid)]


def group_members(pgid: int) -> list[int]:
    members = []
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is not None and stat[1] == pgid and stat[2] != "Z":
            members.append(pid)
    return members


def kill_group(process: subprocess.Popen[bytes]) -> int:
    """SIGKILL a whole process group (the process was started in its own session); waits until
    no member is left.  Returns how many processes were killed."""
    pgid = process.pid
    members = group_members(pgid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_members(pgid), f"process group {pgid} survived SIGKILL"
    return len(members)


def stop_group(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGINT) -> None:
    """A clean stop of the leader, then SIGKILL for whatever is left in its group."""
    if process is None:
        return
    if process.poll() is None:
        process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        if group_members(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def archive_env(data_dir: Path, database_url: str, http_port: int, dicom_port: int, **settings: Any) -> dict[str, str]:
    """The environment tests.archive_support.start_serve gives `serve`, with a short lease."""
    env = {
        **os.environ,
        "ARCHIVE_DATA_DIR": str(data_dir),
        "ARCHIVE_DATABASE_URL": database_url,
        "ARCHIVE_HTTP_PORT": str(http_port),
        "ARCHIVE_DICOM_PORT": str(dicom_port),
        "ARCHIVE_LEASE_SECONDS": str(LEASE_SECONDS),
        "ARCHIVE_SWEEP_INTERVAL_SECONDS": str(SWEEP_SECONDS),
        "ARCHIVE_COMPRESSION_EFFORT": "fast",
        "TCP_NODELAY": "1",
        "ARCHIVE_REQUIRE_AUTH": "false",
    }
    env.update({f"ARCHIVE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def launch_serve(tmp_path: Path, database_url: str, *, wait: bool = True, **settings: Any) -> ArchiveProcess:
    """`python -m service.cli serve` in its own session (process group), so that the whole tree
    (SCP, API, decode processes, embedded workers) can be SIGKILLed at once.  New ports each time;
    the data directory and the catalog are those of tmp_path.  Its log is appended to serve.log."""
    data_dir = tmp_path / "var"
    archive = ArchiveProcess(data_dir, database_url, free_port(), free_port(), {})
    archive.env = archive_env(data_dir, database_url, archive.http_port, archive.dicom_port, **settings)
    archive.log_path = tmp_path / "serve.log"
    with archive.log_path.open("ab") as log:
        log.write(f"\n===== serve started {time.strftime('%H:%M:%S')} {settings}\n".encode())
        log.flush()
        archive.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            cwd=tmp_path,
            env=archive.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    if wait:
        wait_up(archive)
    return archive


def wait_up(archive: ArchiveProcess, limit: float = 120) -> None:
    assert archive.process is not None
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if archive.process.poll() is not None:
            raise AssertionError(f"serve exited: {archive.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{archive.http}/healthz", timeout=2).status_code == 200 and listening(archive.dicom_port):
                return
        time.sleep(0.2)
    stop_group(archive.process)
    raise AssertionError(f"serve did not come up: {archive.log()[-4000:]}")


def launch(command: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=log, start_new_session=True)


# ----------------------------------------------------------------------------- retrieval probe


class Prober(threading.Thread):
    """Retrieves acknowledged instances over WADO-RS while the faults happen: each answer is the
    exact bytes sent (`exact`), an error (`errors`: refused, 5xx, timeout) or other bytes (`wrong`)."""

    def __init__(self, items: list[Item], seed: int) -> None:
        super().__init__(name="wado-prober", daemon=True)
        self.items, self.rng = items, random.Random(seed)
        self.http = ""
        self.stopping = threading.Event()
        self.exact = self.errors = 0
        self.wrong: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            acked = [item for item in self.items if item.acked]
            if not acked or not self.http:
                self.stopping.wait(0.1)
                continue
            item = self.rng.choice(acked)
            verdict = retrieve(self.http, item, timeout=10)
            if verdict == "exact":
                self.exact += 1
            elif verdict == "wrong":
                self.wrong.append(item.uid)
            else:
                self.errors += 1
            self.stopping.wait(0.05)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)


def retrieve(http: str, item: Item, timeout: float = 60) -> str:
    """'exact', 'wrong' (a 200 carrying other bytes) or 'error: ...'."""
    url = f"{http}/dicomweb/studies/{item.study}/series/{item.series}/instances/{item.uid}"
    try:
        response = httpx.get(url, headers={"Accept": WADO_ACCEPT}, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"error: {type(exc).__name__}"
    if response.status_code != 200:
        return f"error: HTTP {response.status_code}"
    try:
        parts = parse_multipart(response)
    except (AssertionError, KeyError, StopIteration, UnicodeDecodeError):
        return "wrong"  # a 200 whose body is not even a well-formed answer
    if len(parts) != 1 or parts[0][1] != item.expected:
        return "wrong"
    return "exact"


# ----------------------------------------------------------------------------- the invariant


@dataclass
class Outcome:
    scenario: str
    seed: int
    sent: int = 0
    acked_first: int = 0  # Success on the first attempt, before recovery
    refused_first: int = 0  # no Success on the first attempt (the senders retry these)
    resent: int = 0
    archived: int = 0
    losses: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    wrong_bytes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    probe_exact: int = 0
    probe_errors: int = 0
    staging_left: int = 0
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def failures(self) -> list[str]:
        return (
            [f"lost: {uid}" for uid in self.losses]
            + [f"archived more than once: {uid}" for uid in self.duplicates]
            + [f"wrong bytes served: {uid}" for uid in self.wrong_bytes]
            + self.problems
        )

    def summary(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def verify(
    outcome: Outcome,
    items: list[Item],
    database_url: str,
    http: str,
    read_object: Callable[[str], bytes],
    staging_keys: Callable[[], list[str]],
    limit: float = 120,
) -> None:
    """Wait for the archive to settle, then check the invariant for every acknowledged item."""
    by_uid = {item.uid: item for item in items}
    unacked = [item.uid for item in items if not item.acked]
    if unacked:
        outcome.problems.append(f"{len(unacked)} instances never got Success, even resent: {unacked[:3]}")
    engine = create_engine(database_url)
    try:

        def rows() -> list[Instance]:
            with Session(engine) as session:
                return list(session.scalars(select(Instance).order_by(Instance.id)))

        deadline = time.monotonic() + limit
        while True:
            current = [r for r in rows() if r.state != "superseded"]
            archived = {r.sop_instance_uid for r in current if r.state == "archived"}
            busy = [r for r in current if r.state in ("received", "compressing")]
            if (all(item.uid in archived for item in items if item.acked) and not busy) or (
                time.monotonic() > deadline
            ):
                break
            time.sleep(0.3)
        if busy:
            outcome.problems.append(f"{len(busy)} rows still {sorted({r.state for r in busy})} after {limit:.0f} s")
        for row in current:
            if row.sop_instance_uid not in by_uid:
                outcome.problems.append(f"a row for an instance never sent: {row.sop_instance_uid}")
            if row.state in ("failed", "corrupt"):
                outcome.problems.append(f"{row.sop_instance_uid} {row.state}: {row.failure_reason}")
        outcome.archived = len(archived)
        for item in items:
            if not item.acked:
                continue
            mine = [r for r in current if r.sop_instance_uid == item.uid]
            if len(mine) > 1:
                outcome.duplicates.append(item.uid)
            done = [r for r in mine if r.state == "archived"]
            if not done:
                outcome.losses.append(item.uid)
                continue
            row = done[0]
            try:
                rebuilt = rebuild_file(parse_record(read_object(row.object_key or "")))
            except Exception as exc:
                outcome.losses.append(item.uid)
                outcome.problems.append(f"{item.uid}: object {row.object_key} unreadable: {exc!r}")
                continue
            if hashlib.sha256(rebuilt).hexdigest() != row.original_sha256:
                outcome.losses.append(item.uid)
                outcome.problems.append(f"{item.uid}: rebuilt object does not match original_sha256")
            elif rebuilt != item.expected:
                outcome.wrong_bytes.append(item.uid)
                outcome.problems.append(f"{item.uid}: archived bytes differ from the bytes sent ({item.via})")
            verdict = retrieve(http, item)
            if verdict == "wrong":
                outcome.wrong_bytes.append(item.uid)
            elif verdict != "exact":
                outcome.problems.append(f"{item.uid}: WADO-RS after recovery: {verdict}")
    finally:
        engine.dispose()
    # Not part of the invariant: staged originals a crash may leave behind (recorded only), and
    # whether any catalog row still names them
    with contextlib.suppress(Exception):
        left = staging_keys()
        outcome.staging_left = len(left)
        if left:
            named = {Path(r.staging_key or "").name for r in current if r.staging_key}
            outcome.notes["staging_left_unreferenced"] = sum(Path(key).name not in named for key in left)


def filesystem_store(data_dir: Path) -> tuple[Callable[[str], bytes], Callable[[], list[str]]]:
    root = data_dir / "store"

    def read(key: str) -> bytes:
        return (root / key).read_bytes()

    def staging() -> list[str]:
        folder = root / "staging"
        return [p.name for p in folder.rglob("*") if p.is_file()] if folder.exists() else []

    return read, staging


# ----------------------------------------------------------------------------- a scenario's frame


@contextlib.contextmanager
def campaign(name: str, seed: int) -> Iterator[Outcome]:
    outcome = Outcome(name, seed)
    started = time.monotonic()
    try:
        yield outcome
    finally:
        outcome.seconds = round(time.monotonic() - started, 1)
        report_dir = os.environ.get("FAULT_REPORT_DIR") or os.environ.get("FUZZ_REPORT_DIR")
        if report_dir:
            Path(report_dir).mkdir(parents=True, exist_ok=True)
            with (Path(report_dir) / "faults.jsonl").open("a") as fh:
                fh.write(outcome.summary() + "\n")


def first_pass(outcome: Outcome, items: list[Item]) -> None:
    outcome.sent = len(items)
    outcome.acked_first = sum(item.acked for item in items)
    outcome.refused_first = outcome.sent - outcome.acked_first
    failures: dict[str, int] = {}
    for item in items:
        if not item.acked and item.statuses:
            failures[item.statuses[-1]] = failures.get(item.statuses[-1], 0) + 1
    if failures:
        outcome.notes["first_failures"] = failures


def finish(outcome: Outcome, archive: ArchiveProcess, items: list[Item], prober: Prober | None) -> None:
    """Resend what got no Success, stop the probe, check the invariant (filesystem store)."""
    outcome.resent = sum(not item.acked for item in items)
    resend(archive, items)
    if prober is not None:
        prober.http = archive.http
        prober.stop()
        outcome.probe_exact, outcome.probe_errors = prober.exact, prober.errors
        outcome.wrong_bytes.extend(prober.wrong)
    read, staging = filesystem_store(archive.data_dir)
    verify(outcome, items, archive.database_url, archive.http, read, staging)


# ----------------------------------------------------------------------------- (a) the whole tree


def scenario_kill_serve(seed: int, tmp_path: Path) -> Outcome:
    """(a) SIGKILL the whole `serve` process group (SCP, API, decode processes, embedded workers) at
    a random moment while two associations and a STOW-RS request send; restart on the same data
    directory and catalog; the senders resend what got no Success."""
    rng = random.Random(seed)
    with campaign("kill-serve", seed) as outcome, database("sqlite", tmp_path) as url:
        study = generate_uid()
        batches = [
            make_items(rng, 10, via="c-store", noisy=2, study=study),
            make_items(rng, 10, via="c-store", noisy=2, study=study),
            make_items(rng, 4, via="stow", noisy=1, study=study),
        ]
        items = [item for batch in batches for item in batch]
        archive = launch_serve(tmp_path, url)
        prober = Prober(items, seed)
        prober.http = archive.http
        prober.start()
        try:
            # A short DIMSE timeout: the association cut by the kill is noticed only when it runs out
            futures = send_concurrently(archive, batches, timeout=5)
            # A random moment inside the sending: after `target` acknowledgements, plus a little
            target = rng.randint(1, len(items) - 6)
            deadline = time.monotonic() + 60
            while sum(item.acked for item in items) < target and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.15))
            assert archive.process is not None
            outcome.notes["kill_after_acks"] = sum(item.acked for item in items)
            outcome.notes["killed_processes"] = kill_group(archive.process)
            t0 = time.monotonic()
            for future in futures:
                future.result(timeout=120)
            outcome.notes["senders_done_s"] = round(time.monotonic() - t0, 1)
            first_pass(outcome, items)
            archive = launch_serve(tmp_path, url)
            outcome.notes["restarted_s"] = round(time.monotonic() - t0, 1)
            finish(outcome, archive, items, prober)
            outcome.notes["verified_s"] = round(time.monotonic() - t0, 1)
        finally:
            prober.stop()
            stop_group(archive.process)
    return outcome


# ----------------------------------------------------------------------------- (b) one worker


def scenario_kill_worker(seed: int, tmp_path: Path) -> Outcome:
    """(b) SIGKILL the embedded worker (a child of `serve`) while it holds an instance in
    `compressing`; `serve` starts a replacement, which takes the instance over when the lease
    (4 s) runs out.  One worker: the replacement is the only way anything gets archived."""
    rng = random.Random(seed)
    with campaign("kill-worker", seed) as outcome, database("sqlite", tmp_path) as url:
        study = generate_uid()
        batches = [
            make_items(rng, 6, via="c-store", noisy=3, noisy_size=256, study=study),
            make_items(rng, 6, via="c-store", noisy=3, noisy_size=256, study=study),
        ]
        items = [item for batch in batches for item in batch]
        archive = launch_serve(tmp_path, url, embedded_workers=1, compression_effort="best")
        prober = Prober(items, seed)
        prober.http = archive.http
        prober.start()
        engine = create_engine(url)
        try:
            workers = embedded_workers(archive)
            outcome.notes["workers"] = len(workers)
            futures = send_concurrently(archive, batches)
            victim: tuple[int, str] | None = None
            deadline = time.monotonic() + 90
            while victim is None and time.monotonic() < deadline:
                with Session(engine) as session:
                    held = session.execute(
                        select(Instance.sop_instance_uid, Instance.lease_owner).where(Instance.state == "compressing")
                    ).all()
                for uid, owner in held:
                    parts = (owner or "").split(":")
                    pid = int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else -1
                    if pid in workers:
                        time.sleep(rng.uniform(0.0, 0.4))  # somewhere inside the compression
                        with Session(engine) as session:
                            still = session.execute(
                                select(Instance.state, Instance.lease_owner).where(Instance.sop_instance_uid == uid)
                            ).first()
                        os.kill(pid, signal.SIGKILL)
                        victim = (pid, uid)
                        outcome.notes["held_at_kill"] = bool(still and still[0] == "compressing" and still[1] == owner)
                        break
                else:
                    time.sleep(0.05)
            for future in futures:
                future.result(timeout=120)
            first_pass(outcome, items)
            if victim is None:
                outcome.problems.append("no worker was ever seen holding an instance: nothing was killed")
            finish(outcome, archive, items, prober)
            if victim is not None:
                with Session(engine) as session:
                    row = session.scalars(select(Instance).where(Instance.sop_instance_uid == victim[1])).first()
                outcome.notes["victim_attempts"] = row.attempts if row else None
                if outcome.notes["held_at_kill"] and row is not None and row.attempts < 2:
                    outcome.problems.append("the killed worker's instance was not taken over (attempts < 2)")
                alive = embedded_workers(archive)
                outcome.notes["workers_after"] = len(alive)
                if victim[0] in alive or len(alive) != 1:
                    outcome.problems.append(f"the dead worker was not replaced (workers now {alive})")
        finally:
            engine.dispose()
            prober.stop()
            stop_group(archive.process)
    return outcome


# ----------------------------------------------------------------------------- (c) Redis


@contextlib.contextmanager
def redis_server(port: int, log_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """A private redis-server (no persistence); yields a function that (re)starts it."""
    current: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = launch(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            dict(os.environ),
            log_path,
            log_path.parent,
        )
        current.append(process)
        deadline = time.monotonic() + 30
        while not listening(port):
            assert time.monotonic() < deadline, "redis-server did not start"
            assert process.poll() is None, log_path.read_text(errors="replace")[-2000:]
            time.sleep(0.05)
        return process

    try:
        yield start
    finally:
        for process in current:
            stop_group(process, signal.SIGTERM)


def scenario_redis_restart(seed: int, tmp_path: Path) -> Outcome:
    """(c) Distributed mode: `serve` with ARCHIVE_BROKER_URL on a private Redis plus one Celery
    `lvpnet-archive worker`; Redis is SIGKILLed while instances arrive and started again, empty,
    a moment later.  Lost messages come back through the sweeper (lease 4 s)."""
    import shutil

    rng = random.Random(seed)
    if shutil.which("redis-server") is None:
        import pytest

        pytest.skip("redis-server not installed")
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    with (
        campaign("redis-restart", seed) as outcome,
        database("sqlite", tmp_path) as url,
        redis_server(port, tmp_path / "redis.log") as start_redis,
    ):
        redis_process = start_redis()
        study = generate_uid()
        batches = [
            make_items(rng, 8, via="c-store", noisy=1, study=study),
            make_items(rng, 8, via="c-store", noisy=1, study=study),
            make_items(rng, 3, via="stow", study=study),
        ]
        items = [item for batch in batches for item in batch]
        archive = launch_serve(tmp_path, url, broker_url=broker)
        # The same data directory: the store is file://<data_dir>/store, shared as on one host
        worker = launch(
            [sys.executable, "-m", "service.cli", "worker", "--queues", "archive,retrieve"],
            archive.env,
            tmp_path / "worker.log",
            tmp_path,
        )
        prober = Prober(items, seed)
        prober.http = archive.http
        prober.start()
        try:
            futures = send_concurrently(archive, batches)
            time.sleep(rng.uniform(0.2, 1.0))
            outcome.notes["acked_at_kill"] = sum(item.acked for item in items)
            kill_group(redis_process)
            down = rng.uniform(1.0, 3.0)
            outcome.notes["redis_down_s"] = round(down, 2)
            time.sleep(down)
            start_redis()
            for future in futures:
                future.result(timeout=120)
            first_pass(outcome, items)
            assert worker.poll() is None, (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
            finish(outcome, archive, items, prober)
            outcome.notes["worker_alive"] = worker.poll() is None
        finally:
            prober.stop()
            stop_group(archive.process)
            stop_group(worker, signal.SIGTERM)
    return outcome


# ----------------------------------------------------------------------------- (d) PostgreSQL


def terminate_backends(database_url: str) -> int:
    import psycopg

    from tests.archive_support import POSTGRES_ADMIN

    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return len(rows)


def scenario_postgres_drops(seed: int, tmp_path: Path) -> Outcome:
    """(d) The catalog on PostgreSQL; every connection to its database is terminated a few times
    while instances arrive and compress.  A C-STORE may fail then (not Success: it is resent)."""
    rng = random.Random(seed)
    with campaign("postgres-drops", seed) as outcome, database("postgresql", tmp_path) as url:
        study = generate_uid()
        batches = [
            make_items(rng, 10, via="c-store", noisy=2, study=study),
            make_items(rng, 10, via="c-store", noisy=2, study=study),
            make_items(rng, 3, via="stow", study=study),
        ]
        items = [item for batch in batches for item in batch]
        archive = launch_serve(tmp_path, url)
        prober = Prober(items, seed)
        prober.http = archive.http
        prober.start()
        try:
            futures = send_concurrently(archive, batches)
            terminated = []
            for _ in range(rng.randint(2, 4)):
                time.sleep(rng.uniform(0.1, 0.8))
                terminated.append(terminate_backends(url))
            outcome.notes["terminated"] = terminated
            for future in futures:
                future.result(timeout=120)
            first_pass(outcome, items)
            finish(outcome, archive, items, prober)
        finally:
            prober.stop()
            stop_group(archive.process)
    return outcome


# ----------------------------------------------------------------------------- (e) object store


@contextlib.contextmanager
def moto_server(log_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = launch(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        dict(os.environ),
        log_path,
        log_path.parent,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        yield endpoint, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        stop_group(process, signal.SIGTERM)


def scenario_s3_pause(seed: int, tmp_path: Path) -> Outcome:
    """(e) Objects on an S3 server (moto); the server is frozen (SIGSTOP) for a few seconds while
    instances arrive and compress, then thawed (SIGCONT).  moto keeps objects in memory, so it is
    paused rather than restarted.  The S3 client has botocore's default 60 s timeouts: a request
    to the frozen server waits and then completes."""
    import boto3

    rng = random.Random(seed)
    with (
        campaign("s3-pause", seed) as outcome,
        database("sqlite", tmp_path) as url,
        moto_server(tmp_path / "moto.log") as (endpoint, moto),
    ):
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )
        s3.create_bucket(Bucket=BUCKET)
        study = generate_uid()
        batches = [
            make_items(rng, 8, via="c-store", noisy=1, study=study),
            make_items(rng, 8, via="c-store", noisy=1, study=study),
            make_items(rng, 3, via="stow", study=study),
        ]
        items = [item for batch in batches for item in batch]
        archive = launch_serve(
            tmp_path,
            url,
            storage_url=f"s3://{BUCKET}/{PREFIX}",
            s3_endpoint_url=endpoint,
            s3_access_key_id="test",
            s3_secret_access_key="test",
            retrieve_cache_bytes=0,
        )
        prober = Prober(items, seed)
        prober.http = archive.http
        prober.start()
        try:
            futures = send_concurrently(archive, batches, timeout=60)
            time.sleep(rng.uniform(0.1, 1.0))
            pause = rng.uniform(2.0, 5.0)
            outcome.notes["paused_s"] = round(pause, 2)
            os.kill(moto.pid, signal.SIGSTOP)
            outcome.notes["acked_at_pause"] = sum(item.acked for item in items)
            time.sleep(pause)
            outcome.notes["acked_at_resume"] = sum(item.acked for item in items)
            os.kill(moto.pid, signal.SIGCONT)
            for future in futures:
                future.result(timeout=180)
            first_pass(outcome, items)
            outcome.resent = sum(not item.acked for item in items)
            resend(archive, items, timeout=60)
            prober.stop()
            outcome.probe_exact, outcome.probe_errors = prober.exact, prober.errors
            outcome.wrong_bytes.extend(prober.wrong)

            def read(key: str) -> bytes:
                return bytes(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read())

            def staging() -> list[str]:
                listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/staging/")
                return [entry["Key"] for entry in listing.get("Contents", [])]

            verify(outcome, items, url, archive.http, read, staging)
        finally:
            prober.stop()
            stop_group(archive.process)
    return outcome


# ----------------------------------------------------------------------------- (f) disk full


def scenario_disk_full(seed: int, tmp_path: Path) -> Outcome:
    """(f) The data disk "nearly full": serve starts with ARCHIVE_MIN_FREE_DISK_BYTES above the free
    space, so every C-STORE is refused with 0xA700 (and STOW-RS with 503) and nothing is kept.
    Then serve restarts with the normal threshold and everything resent is archived."""
    import shutil

    rng = random.Random(seed)
    with campaign("disk-full", seed) as outcome, database("sqlite", tmp_path) as url:
        study = generate_uid()
        batches = [
            make_items(rng, 6, via="c-store", study=study),
            make_items(rng, 6, via="c-store", study=study),
            make_items(rng, 2, via="stow", study=study),
        ]
        items = [item for batch in batches for item in batch]
        (tmp_path / "var").mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(tmp_path / "var").free
        archive = launch_serve(tmp_path, url, min_free_disk_bytes=free + rng.randint(1, 1 << 30))
        try:
            for future in send_concurrently(archive, batches):
                future.result(timeout=120)
            first_pass(outcome, items)
            statuses = sorted({item.statuses[-1] for item in items})
            outcome.notes["refusals"] = statuses
            if outcome.acked_first or statuses != ["0xA700", "stow 503"]:
                outcome.problems.append(f"a nearly full disk did not refuse every instance: {statuses}")
            engine = create_engine(url)
            with Session(engine) as session:
                kept = session.scalars(select(Instance.sop_instance_uid)).all()
            engine.dispose()
            if kept:
                outcome.problems.append(f"{len(kept)} refused instances were catalogued anyway")
            stored = [p for p in (tmp_path / "var" / "store").rglob("*") if p.is_file()]
            incoming = [p for p in (tmp_path / "var" / "incoming").rglob("*") if p.is_file()]
            if stored or incoming:
                outcome.problems.append(f"refused instances left files: {len(stored)} stored, {len(incoming)} incoming")
        finally:
            stop_group(archive.process)
        archive = launch_serve(tmp_path, url)
        try:
            finish(outcome, archive, items, None)
        finally:
            stop_group(archive.process)
    return outcome


SCENARIOS: dict[str, Callable[[int, Path], Outcome]] = {
    "kill-serve": scenario_kill_serve,
    "kill-worker": scenario_kill_worker,
    "redis-restart": scenario_redis_restart,
    "postgres-drops": scenario_postgres_drops,
    "s3-pause": scenario_s3_pause,
    "disk-full": scenario_disk_full,
}
