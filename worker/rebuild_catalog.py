"""Rebuild the catalog from the object store alone (the catalog database was lost).

Every record under `objects/` describes itself (service/record.py): the original's SHA-256 and
size, and the bytes of the original file - for a split record, the non-pixel elements in the head
section.  Each record becomes patient/study/series/instance rows exactly as ingest writes them
(`inspect_file` on the file, `add_received_instance`), then state `archived` with the object key,
stored size and codec.  Every staged file under `staging/` becomes a `received` row with its
staging key, so the workers archive it.

By default every record is decoded to the original file and checked against the SHA-256 in its
header before it is catalogued: nothing unverified becomes `archived`, and the rows are the ones
ingest would write, dataset SHA-256 (what duplicate detection compares) included.  `decode=False`
skips the pixel decode (LVPNet is slow on a CPU): attributes come from the non-pixel bytes, the
bytes are checked only against their content address, and the dataset SHA-256 is left empty - an
identical re-send of such an instance is then treated as a different one by the duplicate policy.

Idempotent and resumable: objects and staged files that already have a row are skipped, so a run
that stopped can simply be started again.  Run it with the archive stopped.

What a record does not hold, and so the rebuilt rows lack: who sent the instance (calling AE / API
key; `source` becomes "rebuild"), when it was received and archived, the classical-codec size, how
many attempts it took, failed and superseded versions, deletions (a deleted instance whose object
survived a crash comes back), audit events, tombstones, API keys, storage-commitment requests,
attribute conflicts recorded at ingest (those between rebuilt instances are recorded again), and
which of two versions of one SOP instance was the newer (both are catalogued, one superseded, and
reported as a version conflict).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.audit import Actor, event
from service.catalog.ingest import Decision, DuplicateOutcome, add_received_instance, current_version
from service.catalog.tables import Instance, InstanceState
from service.dicomfile import Digests, InstanceFacts, InvalidInstance, inspect_file
from service.logs import fields
from service.record import Record, RecordError, decode_bytes_section, parse_record
from service.storage.base import OBJECTS_PREFIX, STAGING_PREFIX, ObjectStore
from worker import weights
from worker.scrub import ScrubFailure, check_address, load_codec_runtime, pixel_nbytes

LOGGER = logging.getLogger(__name__)
SOURCE = "rebuild"
REPORTED_PROBLEMS = 1000


@dataclass
class RebuildReport:
    decode: bool
    objects: int = 0  # keys seen under objects/
    archived: int = 0  # archived rows written
    objects_already_catalogued: int = 0
    duplicate_records: int = 0  # a record of an original already catalogued from another object
    version_conflicts: int = 0  # two records of one SOP instance with different contents
    unreadable: int = 0  # records that do not parse, rebuild or match (not catalogued)
    staged: int = 0  # keys seen under staging/
    received: int = 0  # received rows written
    staged_already_catalogued: int = 0  # a row names the key, or the same file is archived
    staged_invalid: int = 0
    seconds: float = 0.0
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.unreadable or self.staged_invalid else 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exit_code"] = self.exit_code
        return out

    def problem(self, kind: str, key: str, reason: str, **extra: Any) -> None:
        if len(self.problems) < REPORTED_PROBLEMS:
            self.problems.append({"kind": kind, "key": key, "reason": reason[:500], **extra})


class Unreadable(Exception):
    pass


# ------------------------------------------------------------------------------ facts


def _inspect_bytes(data: bytes, workdir: Path) -> InstanceFacts:
    path = workdir / "instance.dcm"
    path.write_bytes(data)
    try:
        return inspect_file(path)
    finally:
        path.unlink(missing_ok=True)


def facts_from_record(record: Record, workdir: Path, *, decode: bool) -> InstanceFacts:
    """The catalog facts of a record's original.  Raises Unreadable."""
    from worker.pipeline import rebuild_file

    limit = record.original_bytes
    try:
        if decode:
            load_codec_runtime(record)
        if record.kind == "whole" or decode:
            original = rebuild_file(record)  # a whole record is a zstd decode: cheap, done even without `decode`
            if len(original) != limit or hashlib.sha256(original).hexdigest() != record.original_sha256:
                raise Unreadable("rebuilt file differs from the SHA-256 in the record header")
            return _inspect_bytes(original, workdir)
        if record.kind != "split":
            raise Unreadable(f"unknown record kind {record.kind!r}")
        head = decode_bytes_section(record.section("head"), limit)
        tail = decode_bytes_section(record.section("tail"), limit)
        nbytes = pixel_nbytes(record.pixels)
        if len(head) + nbytes + len(tail) != limit:
            raise Unreadable("head + pixel + tail sizes do not add up to the original's")
        # The original's layout with zero pixel values: every attribute the catalog takes is there
        path = workdir / "instance.dcm"
        with path.open("wb") as fh:
            fh.write(head)
            fh.seek(nbytes, 1)
            fh.write(tail)
            fh.truncate(limit)
        try:
            facts = inspect_file(path)
        finally:
            path.unlink(missing_ok=True)
    except Unreadable:
        raise
    except InvalidInstance as exc:
        raise Unreadable(f"not a valid instance: {exc.reason}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # codec and parser errors have many types; all mean "this record is damaged"
        raise Unreadable(f"{type(exc).__name__}: {exc}") from exc
    # Not decoded: the file SHA-256 is the header's, the dataset SHA-256 is unknown
    facts.digests = Digests(record.original_sha256, "", limit)
    facts.instance.update(original_sha256=record.original_sha256, original_bytes=limit, dataset_sha256="")
    return facts


def _same_original(existing: Instance, facts: InstanceFacts) -> bool:
    if existing.original_sha256 == facts.digests.file_sha256:
        return True
    dataset = facts.digests.dataset_sha256
    return bool(dataset) and existing.dataset_sha256 == dataset


def _decision(session: Session, facts: InstanceFacts) -> tuple[Decision, Instance | None]:
    uid = facts.instance["sop_instance_uid"]
    existing = current_version(session, uid)
    if existing is not None and _same_original(existing, facts):
        return Decision(DuplicateOutcome.IDENTICAL, existing_pk=existing.id), existing
    top = session.scalar(select(func.max(Instance.version)).where(Instance.sop_instance_uid == uid)) or 0
    if existing is None:
        return Decision(DuplicateOutcome.NEW, version=top + 1), None
    return Decision(DuplicateOutcome.NEW_VERSION, top + 1, existing.id, existing.id), existing


# ------------------------------------------------------------------------------ the run


def _catalogue_object(
    session_factory: sessionmaker[Session], store: ObjectStore, key: str, workdir: Path, report: RebuildReport
) -> None:
    with session_factory() as session:
        if session.scalar(select(Instance.id).where(Instance.object_key == key).limit(1)) is not None:
            report.objects_already_catalogued += 1
            return
    data = store.get_bytes(key)
    try:
        try:
            check_address(key, data)
        except ScrubFailure as exc:
            raise Unreadable(exc.reason) from exc
        try:
            record = parse_record(data)
        except (RecordError, KeyError, TypeError, ValueError) as exc:
            raise Unreadable(f"record does not parse ({exc})") from exc
        facts = facts_from_record(record, workdir, decode=report.decode)
    except Unreadable as exc:
        report.unreadable += 1
        report.problem("unreadable-record", key, str(exc))
        LOGGER.error("record not catalogued", extra=fields(object_key=key, reason=str(exc)[:200]))
        return
    with session_factory() as session:
        decision, existing = _decision(session, facts)
        if decision.outcome == DuplicateOutcome.IDENTICAL:
            report.duplicate_records += 1
            return
        instance = add_received_instance(
            session,
            facts,
            decision=decision,
            staging_key=None,  # type: ignore[arg-type]
            source=SOURCE,
            lease_seconds=0,
        )
        instance.state = InstanceState.ARCHIVED
        instance.object_key = key
        instance.codec = record.codec
        instance.stored_bytes = len(data)
        instance.lease_expires_at = None
        instance.archived_at = None  # unknown: records carry no time
        if existing is not None:
            # Which version was the newer is not in the records: the later key wins, both are kept
            existing.state = InstanceState.SUPERSEDED
            report.version_conflicts += 1
        session.commit()
        if existing is not None:
            report.problem(
                "version-conflict",
                key,
                "another record of this SOP instance is catalogued as superseded",
                instance=instance.id,
                superseded=existing.id,
            )
        report.archived += 1


def _catalogue_staged(
    session_factory: sessionmaker[Session], store: ObjectStore, key: str, workdir: Path, report: RebuildReport
) -> None:
    with session_factory() as session:
        if session.scalar(select(Instance.id).where(Instance.staging_key == key).limit(1)) is not None:
            report.staged_already_catalogued += 1
            return
    data = store.get_bytes(key)
    try:
        facts = _inspect_bytes(data, workdir)
    except InvalidInstance as exc:
        report.staged_invalid += 1
        report.problem("invalid-staged-file", key, exc.reason)
        return
    with session_factory() as session:
        decision, _existing = _decision(session, facts)
        if decision.outcome == DuplicateOutcome.IDENTICAL:
            # Left over from a crash after archiving (the staged copy is deleted last): archived already
            report.staged_already_catalogued += 1
            return
        # lease_seconds=0: claimable at once; the sweeper hands it to a worker
        add_received_instance(session, facts, decision=decision, staging_key=key, source=SOURCE, lease_seconds=0)
        session.commit()
        report.received += 1


def rebuild_catalog(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    *,
    decode: bool = True,
    progress: Callable[[str], Any] | None = None,
) -> RebuildReport:
    """Catalogue every record under objects/, then every staged file under staging/.  The
    database must be migrated.  `progress(description)` may return a tqdm-like object."""
    report = RebuildReport(decode=decode)
    if decode:
        weights.use_store(store)
    started = time.monotonic()
    LOGGER.info("catalog rebuild started", extra=fields(decode=decode))
    with tempfile.TemporaryDirectory(prefix="rebuild-catalog-") as tmp:
        workdir = Path(tmp)
        for prefix, handler in ((OBJECTS_PREFIX, _catalogue_object), (STAGING_PREFIX, _catalogue_staged)):
            bar = progress(prefix.rstrip("/")) if progress is not None else None
            try:
                for key in store.iter_keys(prefix):
                    if prefix == OBJECTS_PREFIX:
                        report.objects += 1
                    else:
                        report.staged += 1
                    handler(session_factory, store, key, workdir, report)
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
    report.seconds = round(time.monotonic() - started, 3)
    summary = {k: v for k, v in report.to_dict().items() if k != "problems"}
    with session_factory() as session:
        session.add(
            event(
                Actor("system", "system"),
                "admin",
                "cli",
                "ok" if not report.exit_code else "failed",
                detail=f"rebuild-catalog {summary}",
            )
        )
        session.commit()
    LOGGER.info("catalog rebuild finished", extra=fields(**summary))
    return report
