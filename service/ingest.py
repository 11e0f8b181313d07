"""One received object, from a file on local disk to a durable staged copy and catalog rows.

Shared by the C-STORE SCP, STOW-RS and `import`.  The order is the durability rule: staged
object durable (fsync + rename, or a completed PUT) -> catalog rows committed -> Success.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service import metrics
from service.audit import Actor, Auditor
from service.audit import event as audit_event
from service.catalog.ingest import Decision, DuplicateOutcome, add_received_instance, decide_duplicate
from service.catalog.tables import Instance, InstanceState
from service.config import Settings
from service.dicomfile import InstanceFacts, InvalidInstance, SopClassMismatch, UnsupportedTransferSyntax, inspect_file
from service.logs import fields
from service.queue import Enqueue
from service.storage.base import STAGING_PREFIX, ObjectStore

LOGGER = logging.getLogger(__name__)


STUDY_MISMATCH_REASON = "StudyInstanceUID differs from the request's"
TOO_LARGE_REASON = "object larger than the size limit"
BACKPRESSURE_REASON = "archive busy: compression queue or disk full, retry later"


class IngestStatus(StrEnum):
    STORED = "stored"
    DUPLICATE_IDENTICAL = "duplicate-identical"
    DUPLICATE_DISCARDED = "duplicate-discarded"
    NEW_VERSION = "new-version"
    DUPLICATE_REJECTED = "duplicate-rejected"
    TOO_LARGE = "too-large"
    INVALID = "invalid"
    UNSUPPORTED_SYNTAX = "unsupported-transfer-syntax"
    SOP_CLASS_MISMATCH = "sop-class-mismatch"
    OUT_OF_RESOURCES = "out-of-resources"

    @property
    def accepted(self) -> bool:
        return self in _ACCEPTED


_ACCEPTED = {
    IngestStatus.STORED,
    IngestStatus.DUPLICATE_IDENTICAL,
    IngestStatus.DUPLICATE_DISCARDED,
    IngestStatus.NEW_VERSION,
}


@dataclass(frozen=True)
class IngestResult:
    status: IngestStatus
    reason: str = ""
    instance_id: int | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None


class Ingestor:
    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        store: ObjectStore,
        enqueue: Enqueue,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.store = store
        self.enqueue = enqueue

    def ingest_file(
        self,
        path: Path,
        *,
        source: str,
        move: bool = False,
        expected_sop_instance_uid: str | None = None,
        expected_study_instance_uid: str | None = None,
        actor: Actor | None = None,
    ) -> IngestResult:
        """Validate, stage and catalogue the Part 10 file at `path`.  With move=True the file may
        be consumed (renamed into the staging area).  `actor` (who sent it) is audited: in the
        catalog transaction when the instance is stored, on its own otherwise."""
        size = path.stat().st_size
        actor = actor or Actor("system", "system")
        result = self._ingest_file(
            path,
            size,
            source=source,
            move=move,
            expected_sop_instance_uid=expected_sop_instance_uid,
            expected_study_instance_uid=expected_study_instance_uid,
            actor=actor,
        )
        metrics.INGESTED.labels(source=source, status=str(result.status)).inc()
        if result.status.accepted:
            metrics.INGESTED_BYTES.labels(source=source).inc(size)
        if result.status not in (IngestStatus.STORED, IngestStatus.NEW_VERSION):
            outcome = "ok" if result.status.accepted else "refused"
            detail = f"{result.status}" + (f": {result.reason}" if result.reason else "")
            Auditor(self.session_factory).record(
                actor, "store", source, outcome, sop=result.sop_instance_uid or None, detail=detail
            )
        return result

    def _ingest_file(
        self,
        path: Path,
        size: int,
        *,
        source: str,
        move: bool,
        expected_sop_instance_uid: str | None,
        expected_study_instance_uid: str | None,
        actor: Actor,
    ) -> IngestResult:
        if size > self.settings.max_instance_bytes:
            return self._refuse(IngestStatus.TOO_LARGE, TOO_LARGE_REASON, source, size)
        if self._overloaded(size):
            return self._refuse(IngestStatus.OUT_OF_RESOURCES, BACKPRESSURE_REASON, source, size)
        try:
            facts = inspect_file(path, expected_sop_instance_uid=expected_sop_instance_uid)
        except UnsupportedTransferSyntax as exc:
            return self._refuse(IngestStatus.UNSUPPORTED_SYNTAX, exc.reason, source, size)
        except SopClassMismatch as exc:
            return self._refuse(IngestStatus.SOP_CLASS_MISMATCH, exc.reason, source, size)
        except InvalidInstance as exc:
            return self._refuse(IngestStatus.INVALID, exc.reason, source, size)
        except OSError:
            LOGGER.exception("cannot read received object", extra=fields(source=source))
            return IngestResult(IngestStatus.OUT_OF_RESOURCES, "cannot read the received object")

        uid = facts.instance["sop_instance_uid"]
        sop_class = facts.instance["sop_class_uid"]
        if expected_study_instance_uid and facts.study["study_instance_uid"] != expected_study_instance_uid:
            return self._refuse(IngestStatus.INVALID, STUDY_MISMATCH_REASON, source, size, uid, sop_class)
        # Two tries: a concurrent association may insert the same SOP instance between our
        # duplicate check and our insert; the unique constraint catches it, the retry sees it.
        # The staged copy (the received file may have been moved into it) is kept for the retry.
        staging_key: str | None = None
        for _attempt in range(2):
            try:
                with self.session_factory() as session:
                    decision = decide_duplicate(session, facts, self.settings.duplicate_policy)
                    if decision.outcome != DuplicateOutcome.NEW and decision.outcome != DuplicateOutcome.NEW_VERSION:
                        self._discard_staged(staging_key)
                        return self._duplicate(decision, facts, source, size)
                    if staging_key is None:
                        session.rollback()  # end the read transaction before the slow durable write
                        staging_key = f"{STAGING_PREFIX}{uuid.uuid4().hex}.dcm"
                        self.store.put_file(staging_key, path, move=move)
                    instance = add_received_instance(
                        session,
                        facts,
                        decision=decision,
                        staging_key=staging_key,
                        source=source,
                        lease_seconds=self.settings.lease_seconds,
                    )
                    instance.calling_ae = actor.name[:64]
                    session.add(
                        audit_event(
                            actor,
                            "store",
                            source,
                            study=facts.study["study_instance_uid"],
                            series=facts.series["series_instance_uid"],
                            sop=uid,
                            detail="new version" if decision.outcome == DuplicateOutcome.NEW_VERSION else None,
                        )
                    )
                    session.commit()
                    instance_id = instance.id
            except IntegrityError:
                continue
            except (OperationalError, OSError):
                self._discard_staged(staging_key)
                LOGGER.exception("catalog or staging failure", extra=fields(source=source))
                return IngestResult(
                    IngestStatus.OUT_OF_RESOURCES, "catalog or staging unavailable", None, uid, sop_class
                )
            status = (
                IngestStatus.NEW_VERSION if decision.outcome == DuplicateOutcome.NEW_VERSION else IngestStatus.STORED
            )
            LOGGER.info(
                "instance received",
                extra=fields(instance=instance_id, source=source, bytes=size, status=str(status)),
            )
            self.enqueue(instance_id)
            if facts.rejection is not None:
                self._apply_rejection(facts.rejection, actor, uid)
            return IngestResult(status, "", instance_id, uid, sop_class)
        self._discard_staged(staging_key)
        return IngestResult(IngestStatus.OUT_OF_RESOURCES, "concurrent catalog update", None, uid, sop_class)

    def _apply_rejection(self, rejection: tuple[str, list[tuple[str, str, str]]], actor: Actor, note_uid: str) -> None:
        """IOCM: withdraw the instances a rejection note names (the note itself is kept, as IOCM
        asks, so the rejection stays on record).  Objects nothing else refers to are deleted."""
        from service.catalog.admin import delete_entity
        from service.dicomfile import REJECTION_TITLES

        code, references = rejection
        orphans: list[str] = []
        for study, series, sop in references:
            try:
                with self.session_factory() as session:
                    removed, keys = delete_entity(session, "instance", sop, actor.name, REJECTION_TITLES[code])
                    if removed:
                        detail = f"IOCM rejection note {note_uid}: {REJECTION_TITLES[code]}"
                        session.add(
                            audit_event(actor, "delete", "iocm", study=study, series=series, sop=sop, detail=detail)
                        )
                    session.commit()
                orphans.extend(keys)
            except Exception:
                LOGGER.exception("IOCM rejection not applied", extra=fields(code=code))
        for key in orphans:
            self._discard_staged(key)
        LOGGER.info("IOCM rejection applied", extra=fields(code=code, references=len(references)))

    def _overloaded(self, size: int) -> bool:
        """Back-pressure: what the archive cannot keep it does not accept.  The queue depth is a
        catalog count (indexed by state); the free space is that of the data disk (staging and
        incoming live there in the embedded mode)."""
        settings = self.settings
        try:
            free = shutil.disk_usage(settings.data_dir).free
        except OSError:
            free = None
        if free is not None and free - size < settings.min_free_disk_bytes:
            LOGGER.warning("refusing: data disk nearly full", extra=fields(free_bytes=free))
            return True
        if settings.max_queue_depth:
            with self.session_factory() as session:
                waiting = session.scalar(
                    select(func.count()).select_from(Instance).where(Instance.state == InstanceState.RECEIVED)
                )
            if (waiting or 0) >= settings.max_queue_depth:
                LOGGER.warning("refusing: compression queue full", extra=fields(waiting=waiting))
                return True
        return False

    def refuse_too_large(self, source: str, size: int, *, spooled: int) -> IngestResult:
        """An object refused while it was arriving: `spooled` bytes reached the disk (then deleted)."""
        LOGGER.warning(
            "instance refused",
            extra=fields(
                source=source, bytes=size, spooled=spooled, status=str(IngestStatus.TOO_LARGE), reason=TOO_LARGE_REASON
            ),
        )
        return IngestResult(IngestStatus.TOO_LARGE, TOO_LARGE_REASON)

    def _duplicate(self, decision: Decision, facts: InstanceFacts, source: str, size: int) -> IngestResult:
        uid = facts.instance["sop_instance_uid"]
        sop_class = facts.instance["sop_class_uid"]
        if decision.outcome == DuplicateOutcome.REJECTED:
            return self._refuse(
                IngestStatus.DUPLICATE_REJECTED,
                "SOP instance already held with different content",
                source,
                size,
                uid,
                sop_class,
            )
        status = (
            IngestStatus.DUPLICATE_IDENTICAL
            if decision.outcome == DuplicateOutcome.IDENTICAL
            else IngestStatus.DUPLICATE_DISCARDED
        )
        LOGGER.info(
            "duplicate instance", extra=fields(instance=decision.existing_pk, source=source, status=str(status))
        )
        return IngestResult(status, "", decision.existing_pk, uid, sop_class)

    def _discard_staged(self, staging_key: str | None) -> None:
        if staging_key is None:
            return
        try:
            self.store.delete(staging_key)
        except Exception:
            LOGGER.warning("could not delete orphan staged object", exc_info=True)

    def _refuse(
        self,
        status: IngestStatus,
        reason: str,
        source: str,
        size: int,
        uid: str | None = None,
        sop_class: str | None = None,
    ) -> IngestResult:
        LOGGER.warning("instance refused", extra=fields(source=source, bytes=size, status=str(status), reason=reason))
        return IngestResult(status, reason, None, uid, sop_class)
