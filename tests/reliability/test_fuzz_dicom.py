"""Mutated DICOM Part 10 files through C-STORE and STOW-RS against one real `serve` (issue #8).

Every input (tests/reliability/dicom_mutations.py; a function of (seed, index)) must get an answer
within 10 s: C-STORE Success only for an instance that can be stored, otherwise a failure status of
PS3.4 (0xA900-0xA9FF "data set does not match SOP class", 0xC000-0xCFFF "cannot understand",
0xA700 only for an object over the size limit; never the handler's own 0xC211 "processing failure");
STOW-RS 200/202/409/413 (or 400/415) with ReferencedSOPSequence/FailedSOPSequence that match, never
a 5xx and never failure reason 0x0110.  `serve` must stay up, its process group's resident memory
may grow by 200 MB at most, and afterwards the catalog holds a row for exactly the accepted inputs,
each archived, its SHA-256 that of the bytes received, WADO-RS giving back exactly those bytes
(all of them, or a seeded sample of DICOM_FUZZ_WADO in long runs), and nothing is left in
`incoming/` or `staging/`.

DICOM_FUZZ_INPUTS (default 300) inputs go through each of C-STORE and STOW-RS; DICOM_FUZZ_SEED sets
the seed (C-STORE uses it, STOW-RS seed + 1); DICOM_FUZZ_REPORT_DIR gets a JSON summary.  A failure
names its channel and index: `DicomMutator(seed).make(index)` rebuilds the input.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from service.catalog.tables import Instance
from tests.archive_support import ArchiveProcess, parse_multipart, start_serve
from tests.reliability.dicom_mutations import (
    OVERSIZE_LIMIT,
    SYNTAXES,
    DicomInput,
    DicomMutator,
    bases,
    cstore_file,
    oracle,
)
from tests.reliability.faults import descendants

INPUTS = int(os.environ.get("DICOM_FUZZ_INPUTS", "300"))
SEED = int(os.environ.get("DICOM_FUZZ_SEED", "20260806"))
REPORT_DIR = os.environ.get("DICOM_FUZZ_REPORT_DIR")
WADO_SAMPLE = int(os.environ.get("DICOM_FUZZ_WADO", "1000"))
PER_INPUT_LIMIT_S = 10.0
RSS_LIMIT_MB = 200
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
BOUNDARY = "dicom-fuzz-5f1c0e9a7b3d4e21a8c6"
STOW_BATCH_EVERY = 20  # every 20th STOW request carries 3 inputs (Referenced and Failed in one answer)

SUCCESS = 0x0000
PROCESSING_FAILURE = 0xC211
STOW_PROCESSING_FAILURE = 0x0110


# ------------------------------------------------------------------------------ records


@dataclass
class Result:
    channel: str  # c-store | stow
    index: int
    kind: str
    detail: str
    base: str
    status: str  # "0xC000", "HTTP 409", ...
    accepted: bool
    seconds: float
    expect: str  # the oracle's verdict
    reason: str
    uid: str  # the SOP Instance UID the archive would catalogue it under
    sha256: str = ""  # of the bytes the archive received (accepted inputs)
    problem: str = ""  # set when the answer breaks the contract


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, result: Result) -> None:
        self.results.append(result)
        if result.problem:
            self.problems.append(f"{result.channel} #{result.index} {result.kind}/{result.detail}: {result.problem}")


def member_rss(pid: int) -> dict[str, int]:
    """VmRSS in bytes of `serve` and each of its descendants, by "pid:command"."""
    out = {}
    for member in [pid, *descendants(pid)]:
        try:
            status = Path(f"/proc/{member}/status").read_text().splitlines()
            command = Path(f"/proc/{member}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = next((c.decode(errors="replace") for c in command[1:] if c and not c.startswith(b"-")), "?")
        for line in status:
            if line.startswith("VmRSS:"):
                out[f"{member}:{name[-40:]}"] = int(line.split()[1]) * 1024
    return out


def group_rss(pid: int) -> int:
    """VmRSS of `serve` and all its descendants, in bytes."""
    return sum(member_rss(pid).values())


def effective_uid(data: bytes) -> str:
    """The SOP Instance UID in a file's data set (what STOW-RS references it by), or ''."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
            return str(ds.get("SOPInstanceUID", "") or "").strip().replace("\x00", "")
    except Exception:
        return ""


# ------------------------------------------------------------------------------ C-STORE


class CStoreSender:
    """One association, reused; a presentation context per (SOP class, transfer syntax), so the
    data set bytes go out as they are, under the syntax the input names.  The C-STORE request is
    built by hand (pynetdicom's send_c_store encodes a Dataset or reads a file's meta group)."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE

        self.port = port
        self.ae = AE(ae_title="FUZZSCU")
        self.ae.acse_timeout = self.ae.network_timeout = 30
        self.ae.dimse_timeout = PER_INPUT_LIMIT_S
        for sop_class in sorted({base.sop_class for base in bases()}):
            for syntax in SYNTAXES:
                self.ae.add_requested_context(sop_class, [syntax])
        self.assoc: Any = None
        self.message_id = 0
        self.associations = 0

    def _association(self) -> Any:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="LVPARCHIVE")
            assert self.assoc.is_established, "association rejected"
            self.associations += 1
        return self.assoc

    def send(self, item: DicomInput) -> int | None:
        """The response status, or None: no answer within the DIMSE timeout, or the association
        gone (the sender then starts a new one)."""
        from pynetdicom.dimse_primitives import C_STORE

        assoc = self._association()
        context = next(
            c
            for c in assoc.accepted_contexts
            if c.abstract_syntax == item.sop_class and c.transfer_syntax[0] == item.syntax
        )
        request = C_STORE()
        self.message_id = self.message_id % 65535 + 1
        request.MessageID = self.message_id
        request.Priority = 2
        request.AffectedSOPClassUID = item.sop_class
        try:
            request.AffectedSOPInstanceUID = item.sop_instance
        except ValueError:  # pynetdicom will not put it in a command: the data set alone is bad
            item.sop_instance = item.study[:-1] + "3"
            request.AffectedSOPInstanceUID = item.sop_instance
        request.DataSet = io.BytesIO(item.dataset)
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(request, context.context_id)
            _, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        if response is None:
            assoc._handle_no_response()
            self.assoc = None
            return None
        status = assoc._check_received_status(response)
        return int(status.Status) if "Status" in status else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def cstore_problem(status: int | None, accepted: bool, expect: str, size: int) -> str:
    if status is None:
        return "no C-STORE response (hang, abort or association lost)"
    if status == PROCESSING_FAILURE:
        return "0xC211: the SCP's handler failed (an exception, not a verdict on the data)"
    if not accepted:
        if 0xA700 <= status <= 0xA7FF and size <= OVERSIZE_LIMIT:
            return f"0x{status:04X} out of resources for an object within the size limit"
        if not (0xA700 <= status <= 0xA7FF or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF) and (
            status not in (0x0117, 0x0122, 0x0124, 0x0211, 0x0212)
        ):
            return f"0x{status:04X} is not a C-STORE failure status"
    if accepted and expect == "invalid":
        return f"Success (0x{status:04X}) for an input that is not a valid instance"
    if not accepted and expect == "valid":
        return f"refused (0x{status:04X}) a valid instance"
    return ""


# ------------------------------------------------------------------------------ STOW-RS


def stow_body(parts: list[bytes]) -> bytes:
    chunks = [b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts]
    return b"".join(chunks) + b"--" + BOUNDARY.encode() + b"--\r\n"


def send_stow(client: httpx.Client, http: str, items: list[DicomInput]) -> tuple[int | None, dict[str, Any], float]:
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}
    started = time.perf_counter()
    try:
        response = client.post(f"{http}/dicomweb/studies", content=stow_body([i.data for i in items]), headers=headers)
    except httpx.HTTPError as exc:
        return None, {"error": type(exc).__name__}, time.perf_counter() - started
    seconds = time.perf_counter() - started
    try:
        body = response.json()
    except ValueError:
        body = {"unparsable": response.text[:200]}
    return response.status_code, body, seconds


def _sequence(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    value = body.get(tag, {})
    return list(value.get("Value", [])) if isinstance(value, dict) else []


def stow_outcomes(
    code: int | None, body: dict[str, Any], items: list[DicomInput], uids: list[str]
) -> tuple[list[bool], list[str], str]:
    """Per part: accepted?, the status shown for it, and a problem with the answer as a whole."""
    if code is None:
        return [False] * len(items), ["no response"] * len(items), f"no STOW-RS response ({body.get('error')})"
    status = f"HTTP {code}"
    if code >= 500:
        return [False] * len(items), [status] * len(items), f"HTTP {code} from STOW-RS"
    if code in (400, 413, 415):
        return [False] * len(items), [status] * len(items), ""
    if code not in (200, 202, 409):
        return [False] * len(items), [status] * len(items), f"unexpected HTTP {code}"
    referenced = [str(r.get("00081155", {}).get("Value", [""])[0]) for r in _sequence(body, "00081199")]
    failed = _sequence(body, "00081198")
    reasons = [int(f.get("00081197", {}).get("Value", [-1])[0]) for f in failed]
    problem = ""
    if len(referenced) + len(failed) != len(items):
        problem = f"{len(referenced)} referenced + {len(failed)} failed for {len(items)} parts"
    elif (code == 200 and failed) or (code == 409 and referenced) or (code == 202 and not (failed and referenced)):
        problem = f"HTTP {code} with {len(referenced)} referenced and {len(failed)} failed"
    elif STOW_PROCESSING_FAILURE in reasons:
        problem = "failure reason 0x0110: the part's ingest failed (an exception, not a verdict on the data)"
    accepted, shown = [], []
    pending = Counter(referenced)
    for uid in uids:
        if pending[uid] > 0:
            pending[uid] -= 1
            accepted.append(True)
            shown.append(f"{status} referenced")
        else:
            accepted.append(False)
            shown.append(f"{status} failed")
    if sum(pending.values()) and not problem:
        problem = f"referenced UIDs that match no part: {sorted(pending.elements())[:3]}"
    failed_reasons = iter(reasons)
    if len(failed) == shown.count(f"{status} failed"):
        shown = [s if s.endswith("referenced") else f"{s} 0x{next(failed_reasons):04X}" for s in shown]
    return accepted, shown, problem


def stow_problem(accepted: bool, shown: str, expect: str, size: int) -> str:
    if accepted and expect == "invalid":
        return f"{shown} for an input that is not a valid instance"
    if not accepted and expect == "valid":
        return f"refused ({shown}) a valid instance"
    if not accepted and (shown.endswith("0xA700") or "413" in shown) and size <= OVERSIZE_LIMIT:
        return f"{shown}: out of resources / too large for an object within the size limit"
    return ""


# ------------------------------------------------------------------------------ the campaign


def _check_alive(archive: ArchiveProcess) -> None:
    assert archive.process is not None
    if archive.process.poll() is not None:
        pytest.fail(f"serve died (exit {archive.process.returncode}):\n{archive.log()[-4000:]}")


def run_campaign(archive: ArchiveProcess, inputs: int, seed: int) -> Run:
    assert archive.process is not None
    run = Run()
    cstore_mutator, stow_mutator = DicomMutator(seed), DicomMutator(seed + 1)
    sender = CStoreSender(archive.dicom_port)
    client = httpx.Client(timeout=PER_INPUT_LIMIT_S)
    pid = archive.process.pid
    started = time.monotonic()
    # Warm-up (not counted): every base file once each way, archived and one retrieved, so the
    # lazily loaded parts (codecs in the worker, the decode process, pydicom's handlers) are in
    # memory before the baseline is taken; the cold figure is kept for the record
    run.notes["rss_cold_mb"] = round(group_rss(pid) / 2**20, 1)
    warm_uids, warm_inputs = [], []
    for n in range(len(bases()) * 3):  # bases are drawn at random: three rounds meet nearly all
        warm, warm_stow = cstore_mutator.make(10**8 + n, kind="control"), stow_mutator.make(10**8 + n, kind="control")
        warm_inputs.append(warm)
        assert sender.send(warm) == SUCCESS, warm.name
        assert send_stow(client, archive.http, [warm_stow])[0] == 200, warm_stow.name
        warm_uids += [warm.sop_instance, warm_stow.sop_instance]
    for uid in warm_uids:
        archive.wait_state(uid, {"archived"}, limit_seconds=120)
    first = warm_inputs[0]
    with httpx.Client(timeout=60) as wado:
        url = f"{archive.http}/dicomweb/studies/{first.study}/series/{first.series}/instances/{first.sop_instance}"
        assert wado.get(url, headers={"Accept": WADO_ACCEPT}).status_code == 200
    run.notes["warmup_uids"] = warm_uids
    run.rss.append((0.0, group_rss(pid)))
    stow_index = stow_requests = 0
    try:
        for index in range(inputs):
            item = cstore_mutator.make(index)
            received = cstore_file(item)  # before send: a bad command UID is replaced in send
            began = time.perf_counter()
            status = sender.send(item)
            seconds = time.perf_counter() - began
            received = cstore_file(item)
            verdict = oracle(received, command_sop_instance=item.sop_instance, command_sop_class=item.sop_class)
            accepted = status is not None and (status == SUCCESS or 0xB000 <= status <= 0xBFFF)
            problem = cstore_problem(status, accepted, verdict.expect, len(received))
            if seconds > PER_INPUT_LIMIT_S and not problem:
                problem = f"answered after {seconds:.1f} s"
            run.add(
                Result(
                    "c-store",
                    index,
                    item.kind,
                    item.detail,
                    item.base,
                    "none" if status is None else f"0x{status:04X}",
                    accepted,
                    seconds,
                    verdict.expect,
                    verdict.reason,
                    item.sop_instance,
                    hashlib.sha256(received).hexdigest() if accepted else "",
                    problem,
                )
            )
            # STOW-RS: one input per request, every STOW_BATCH_EVERY-th request three
            if stow_index <= index:
                stow_requests += 1
                count = 3 if stow_requests % STOW_BATCH_EVERY == 0 else 1
                batch = [stow_mutator.make(i) for i in range(stow_index, min(inputs, stow_index + count))]
                stow_index += len(batch)
                uids = [effective_uid(i.data) or i.sop_instance for i in batch]
                code, body, seconds = send_stow(client, archive.http, batch)
                flags, shown, batch_problem = stow_outcomes(code, body, batch, uids)
                # A part over the size limit makes the whole request 413 (nothing is stored)
                oversize = any(len(one.data) > OVERSIZE_LIMIT for one in batch)
                if code == 413 and not oversize:
                    batch_problem = batch_problem or "HTTP 413 for a request with no part over the size limit"
                for n, (one, ok, text, uid) in enumerate(zip(batch, flags, shown, uids, strict=True)):
                    verdict = oracle(one.data)
                    problem = batch_problem if n == 0 else ""
                    if not (code == 413 and oversize):
                        problem = problem or stow_problem(ok, text, verdict.expect, len(one.data))
                    if seconds > PER_INPUT_LIMIT_S and not problem:
                        problem = f"answered after {seconds:.1f} s"
                    run.add(
                        Result(
                            "stow",
                            one.index,
                            one.kind,
                            one.detail,
                            one.base,
                            text,
                            ok,
                            seconds / len(batch),
                            verdict.expect,
                            verdict.reason,
                            uid,
                            hashlib.sha256(one.data).hexdigest() if ok else "",
                            problem,
                        )
                    )
            if index % 50 == 49:
                _check_alive(archive)
                run.rss.append((time.monotonic() - started, group_rss(pid)))
                if index % 500 == 499:
                    members = {k: round(v / 2**20, 1) for k, v in member_rss(pid).items()}
                    run.notes.setdefault("rss_members_mb", []).append([index + 1, members])
                if len(run.problems) > 200:
                    break
    finally:
        sender.close()
        client.close()
    _check_alive(archive)
    run.rss.append((time.monotonic() - started, group_rss(pid)))
    run.notes["associations"] = sender.associations
    run.notes["send_seconds"] = round(time.monotonic() - started, 1)
    return run


def verify_archive(archive: ArchiveProcess, run: Run, seed: int) -> None:
    """Every accepted input catalogued once, archived, with the SHA-256 of the bytes received and
    exact over WADO-RS; no row for anything else; nothing left behind in incoming/ or staging/."""
    accepted = [r for r in run.results if r.accepted]
    wanted = {r.uid for r in accepted} | set(run.notes["warmup_uids"])
    engine = create_engine(archive.database_url)
    limit = 120 + 0.5 * len(accepted)
    deadline = time.monotonic() + limit
    try:
        while True:
            with Session(engine) as session:
                rows = [r for r in session.scalars(select(Instance)) if r.state != "superseded"]
                series = {r.id: (r.series.study.study_instance_uid, r.series.series_instance_uid) for r in rows}
            busy = [r for r in rows if r.state in ("received", "compressing")]
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(1)
    finally:
        engine.dispose()
    run.notes["archive_wait_seconds"] = round(time.monotonic() - (deadline - limit), 1)
    if busy:
        run.problems.append(f"{len(busy)} rows still received/compressing after {limit:.0f} s")
    by_uid: dict[str, list[Instance]] = defaultdict(list)
    for row in rows:
        by_uid[row.sop_instance_uid].append(row)
    for uid in sorted(set(by_uid) - wanted):
        run.problems.append(f"a catalog row for an input that was refused: {uid}")
    states = Counter(r.state for r in rows)
    run.notes["catalog_states"] = dict(states)
    for state in ("failed", "corrupt"):
        if states.get(state):
            run.problems.append(f"{states[state]} rows {state}")
    first: dict[str, Result] = {}
    for result in accepted:
        mine = by_uid.get(result.uid, [])
        if len(mine) != 1:
            run.problems.append(f"{result.channel} #{result.index}: {len(mine)} catalog rows for an accepted input")
            continue
        if result.uid in first:  # a later input that carried the same UID (a duplicate: first one kept)
            continue
        first[result.uid] = result
        if mine[0].original_sha256 != result.sha256:
            run.problems.append(f"{result.channel} #{result.index}: catalogued SHA-256 is not that of the bytes sent")
    # WADO-RS: exact bytes for every accepted input, or a seeded sample in long runs
    checked = list(first.values())
    if len(checked) > WADO_SAMPLE:
        checked = random.Random(seed).sample(checked, WADO_SAMPLE)
    exact = 0
    views: Counter[str] = Counter()
    with httpx.Client(timeout=60) as client:
        for result in checked:
            row = by_uid[result.uid][0]
            study, series_uid = series[row.id]
            url = f"{archive.http}/dicomweb/studies/{study}/series/{series_uid}/instances/{result.uid}"
            response = client.get(url, headers={"Accept": WADO_ACCEPT})
            if response.status_code != 200:
                run.problems.append(f"{result.channel} #{result.index}: WADO-RS HTTP {response.status_code}")
                continue
            parts = parse_multipart(response)
            if len(parts) == 1 and hashlib.sha256(parts[0][1]).hexdigest() == result.sha256:
                exact += 1
            else:
                run.problems.append(f"{result.channel} #{result.index}: WADO-RS returned other bytes")
            # The other WADO-RS views of an odd but accepted instance: an answer or a 4xx, never a 5xx
            for view, accept in (("metadata", "application/dicom+json"), ("frames/1", "multipart/related")):
                answer = client.get(f"{url}/{view}", headers={"Accept": accept})
                views[f"{view} {answer.status_code}"] += 1
                if answer.status_code >= 500:
                    run.problems.append(f"{result.channel} #{result.index}: WADO-RS {view} HTTP {answer.status_code}")
    run.notes["wado_checked"], run.notes["wado_exact"] = len(checked), exact
    run.notes["wado_views"] = dict(views)
    incoming = [p for p in (archive.data_dir / "incoming").rglob("*") if p.is_file()]
    staging = [p for p in (archive.data_dir / "store" / "staging").rglob("*") if p.is_file()]
    run.notes["incoming_left"], run.notes["staging_left"] = len(incoming), len(staging)
    if incoming:
        run.problems.append(f"{len(incoming)} files left in incoming/")
    if staging and not busy:
        run.problems.append(f"{len(staging)} files left in staging/ with nothing waiting to be archived")


def summarise(run: Run, inputs: int, seed: int, wall: float, rss_after_verify: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"inputs_per_channel": inputs, "seed": seed, "wall_seconds": round(wall, 1)}
    for channel in ("c-store", "stow"):
        mine = [r for r in run.results if r.channel == channel]
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        for r in mine:
            by_kind[r.kind]["accepted" if r.accepted else "refused"] += 1
        summary[channel] = {
            "inputs": len(mine),
            "accepted": sum(r.accepted for r in mine),
            "refused": sum(not r.accepted for r in mine),
            "by_status": dict(Counter(r.status for r in mine).most_common()),
            "by_mutation": {k: dict(v) for k, v in sorted(by_kind.items())},
            "by_oracle": dict(Counter(f"{r.expect}->{'accepted' if r.accepted else 'refused'}" for r in mine)),
            "max_input_seconds": round(max((r.seconds for r in mine), default=0.0), 3),
            "mean_input_seconds": round(sum(r.seconds for r in mine) / max(1, len(mine)), 4),
        }
    rss = [value for _, value in run.rss]
    summary["rss_start_mb"] = round(rss[0] / 2**20, 1)
    summary["rss_peak_mb"] = round(max(rss) / 2**20, 1)
    summary["rss_end_mb"] = round(rss[-1] / 2**20, 1)
    summary["rss_after_verify_mb"] = round(rss_after_verify / 2**20, 1)
    summary["rss_growth_mb"] = round((max(rss) - rss[0]) / 2**20, 1)
    summary["rss_series_mb"] = [[round(t), round(value / 2**20)] for t, value in run.rss]
    summary["problems"] = run.problems[:50]
    summary["problem_count"] = len(run.problems)
    summary.update(run.notes)
    return summary


@pytest.fixture
def quiet_client_logs() -> Any:
    """pydicom and pynetdicom in this process warn about every malformed value they see."""
    loggers = [logging.getLogger(name) for name in ("pydicom", "pynetdicom")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.mark.usefixtures("quiet_client_logs")
def test_mutated_dicom_files_through_cstore_and_stow(tmp_path: Path) -> None:
    started = time.monotonic()
    archive = start_serve(
        tmp_path,
        f"sqlite:///{tmp_path / 'catalog.sqlite3'}",
        compression_effort="fast",
        max_instance_bytes=OVERSIZE_LIMIT,
        min_free_disk_bytes=64 * 1024**2,
        retrieve_cache_bytes=0,
    )
    try:
        run = run_campaign(archive, INPUTS, SEED)
        verify_archive(archive, run, SEED)
        _check_alive(archive)
        assert archive.process is not None
        rss_after = group_rss(archive.process.pid)
        log = archive.log()
    finally:
        archive.stop()
    tracebacks = log.count("Traceback (most recent call last)")
    if tracebacks:
        run.problems.append(f"{tracebacks} tracebacks in the serve log")
    summary = summarise(run, INPUTS, SEED, time.monotonic() - started, rss_after)
    if REPORT_DIR:
        out = Path(REPORT_DIR)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"dicom-fuzz-{SEED}-{INPUTS}.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        with (out / f"dicom-fuzz-{SEED}-{INPUTS}-inputs.jsonl").open("w") as fh:
            for result in run.results:
                fh.write(json.dumps(asdict(result), sort_keys=True) + "\n")
    print(json.dumps(summary, indent=1, sort_keys=True))
    assert len(run.results) == 2 * INPUTS, summary["problems"][:10]
    assert not run.problems, "\n".join(run.problems[:40]) + "\n" + log[-3000:]
    assert summary["rss_growth_mb"] <= RSS_LIMIT_MB, summary
    for channel in ("c-store", "stow"):
        counts = summary[channel]
        # The oracle's clear cases went both ways, and the controls were stored
        assert counts["by_oracle"].get("valid->accepted", 0) > 0, counts
        assert counts["by_oracle"].get("invalid->refused", 0) > 0, counts
        assert counts["max_input_seconds"] <= PER_INPUT_LIMIT_S, counts
