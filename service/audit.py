"""The audit trail: who stored, queried, retrieved or deleted what, when and from where.

Rows in the catalog's `audit_event` table (UIDs, key names, AE titles, addresses); log lines and
metrics never carry them.  A failed audit write is logged and counted; it does not fail the
request it describes (availability of images comes first; the counter alerts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from sqlalchemy.orm import Session, sessionmaker

from service.catalog.tables import AuditEvent

LOGGER = logging.getLogger(__name__)
AUDIT_FAILURES = Counter("archive_audit_write_failures_total", "Audit events that could not be written")


@dataclass(frozen=True)
class Actor:
    name: str  # API key name, "admin" (dashboard password), calling AE title, "system"
    kind: str  # api-key | session | dicom-ae | anonymous | system
    remote: str | None = None  # client address

    @classmethod
    def dicom(cls, assoc: Any) -> Actor:
        requestor = assoc.requestor
        address = getattr(requestor, "address", None)
        return cls(str(requestor.ae_title).strip(), "dicom-ae", str(address) if address else None)


def event(
    actor: Actor,
    action: str,
    interface: str,
    outcome: str = "ok",
    *,
    study: str | None = None,
    series: str | None = None,
    sop: str | None = None,
    detail: str | None = None,
) -> AuditEvent:
    return AuditEvent(
        actor=actor.name[:128],
        actor_kind=actor.kind,
        remote=(actor.remote or "")[:64] or None,
        action=action,
        interface=interface,
        outcome=outcome,
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        detail=detail[:2000] if detail else None,
    )


class Auditor:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def record(self, actor: Actor, action: str, interface: str, outcome: str = "ok", **what: Any) -> None:
        self.record_many([event(actor, action, interface, outcome, **what)])

    def record_many(self, events: list[AuditEvent]) -> None:
        if not events:
            return
        try:
            with self.session_factory() as session:
                session.add_all(events)
                session.commit()
        except Exception as exc:
            AUDIT_FAILURES.inc(len(events))
            LOGGER.error("audit write failed", extra={"error": type(exc).__name__, "events": len(events)})
