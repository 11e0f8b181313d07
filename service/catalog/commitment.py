"""Storage Commitment requests in the catalog: recording an N-ACTION, deciding each item's outcome,
leases (which SCP process reports), and what was reported.

An item is committed only when the current version of its SOP instance is archived - its record
was decoded again and matched the received SHA-256 before the state changed - and the object is
still in the store with the recorded size.  PACS delete their own copies on that word.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from service.catalog.tables import CommitmentItem, CommitmentRequest, CommitmentState, Instance, InstanceState
from service.storage.base import ObjectStore

# PS3.4 Table J.3-2 / PS3.7 C: Failure Reason values
PROCESSING_FAILURE = 0x0110  # not archived: failed, or still waiting when the commitment timed out
NO_SUCH_OBJECT_INSTANCE = 0x0112  # never received (or refused)
CLASS_INSTANCE_CONFLICT = 0x0119  # held, but under another SOP class
QUERY_CHUNK = 500
MAX_DELIVERY_ATTEMPTS = 8  # with the reporter's backoff (5 s doubling, 5 min cap): about 20 minutes


@dataclass(frozen=True)
class ItemOutcome:
    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int | None  # None: committed


@dataclass(frozen=True)
class Evaluation:
    transaction_uid: str
    calling_ae_title: str
    outcomes: list[ItemOutcome]
    pending: int  # items still on their way to archived (0 once the deadline has passed)

    @property
    def event_type(self) -> int:
        """1: storage commitment request successful; 2: complete, with failures (PS3.4 J.3.3)."""
        return 1 if all(o.failure_reason is None for o in self.outcomes) else 2


def record_request(
    session: Session,
    *,
    transaction_uid: str,
    calling_ae_title: str,
    peer_host: str | None,
    items: list[tuple[str, str]],
    owner: str,
    lease_seconds: float,
    timeout_seconds: float,
) -> int:
    """Insert the request and its items (caller commits), leased to the receiving process."""
    now = time.time()
    request = CommitmentRequest(
        transaction_uid=transaction_uid,
        calling_ae_title=calling_ae_title,
        peer_host=peer_host,
        state=CommitmentState.PENDING,
        deadline=now + timeout_seconds,
        lease_owner=owner,
        lease_expires_at=now + lease_seconds,
        attempts=0,
    )
    session.add(request)
    session.flush()
    session.add_all(
        CommitmentItem(request_pk=request.id, sop_class_uid=sop_class, sop_instance_uid=sop_instance)
        for sop_class, sop_instance in items
    )
    session.flush()
    return request.id


def _takeable(owner: str, now: float) -> ColumnElement[bool]:
    return or_(
        CommitmentRequest.lease_owner == owner,
        CommitmentRequest.lease_owner.is_(None),
        CommitmentRequest.lease_expires_at.is_(None),
        CommitmentRequest.lease_expires_at < now,
    )


def due_requests(session: Session, owner: str, limit: int = 100) -> list[int]:
    """Pending requests this process holds, or whose holder stopped renewing, and that are due."""
    now = time.time()
    return list(
        session.scalars(
            select(CommitmentRequest.id)
            .where(
                CommitmentRequest.state == CommitmentState.PENDING,
                _takeable(owner, now),
                or_(CommitmentRequest.next_attempt_at.is_(None), CommitmentRequest.next_attempt_at <= now),
            )
            .order_by(CommitmentRequest.id)
            .limit(limit)
        )
    )


def claim(session: Session, request_pk: int, owner: str, lease_seconds: float) -> bool:
    """Take or renew the lease: one guarded UPDATE, so two processes never report the same request."""
    now = time.time()
    result = session.execute(
        update(CommitmentRequest)
        .where(
            CommitmentRequest.id == request_pk,
            CommitmentRequest.state == CommitmentState.PENDING,
            _takeable(owner, now),
        )
        .values(lease_owner=owner, lease_expires_at=now + lease_seconds)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def _current_versions(session: Session, uids: Iterable[str]) -> dict[str, Instance]:
    """The newest version of each SOP instance that is not superseded."""
    found: dict[str, Instance] = {}
    unique = sorted(set(uids))
    for start in range(0, len(unique), QUERY_CHUNK):
        rows = session.scalars(
            select(Instance).where(
                Instance.sop_instance_uid.in_(unique[start : start + QUERY_CHUNK]),
                Instance.state != InstanceState.SUPERSEDED,
            )
        )
        for row in rows:
            held = found.get(row.sop_instance_uid)
            if held is None or row.version > held.version:
                found[row.sop_instance_uid] = row
    return found


def _items(session: Session, request_pk: int) -> list[CommitmentItem]:
    query = select(CommitmentItem).where(CommitmentItem.request_pk == request_pk).order_by(CommitmentItem.id)
    return list(session.scalars(query))


def evaluate(session: Session, store: ObjectStore, request_pk: int, now: float | None = None) -> Evaluation:
    """Each item's outcome as of now.  Items on their way to archived are `pending` until the
    request's deadline, then failures (0x0110)."""
    now = time.time() if now is None else now
    request = session.get(CommitmentRequest, request_pk)
    if request is None:
        raise LookupError(f"no commitment request {request_pk}")
    items = _items(session, request_pk)
    instances = _current_versions(session, (item.sop_instance_uid for item in items))
    timed_out = request.deadline is not None and now >= request.deadline
    outcomes: list[ItemOutcome] = []
    pending = 0
    archived: list[tuple[int, Instance]] = []
    for index, item in enumerate(items):
        instance = instances.get(item.sop_instance_uid)
        reason: int | None
        if instance is None:
            reason = NO_SUCH_OBJECT_INSTANCE
        elif instance.sop_class_uid != item.sop_class_uid:
            reason = CLASS_INSTANCE_CONFLICT
        elif instance.state == InstanceState.ARCHIVED:
            reason = None
            archived.append((index, instance))
        elif instance.state == InstanceState.FAILED or timed_out:
            reason = PROCESSING_FAILURE
        else:
            reason = None
            pending += 1
        outcomes.append(ItemOutcome(item.sop_class_uid, item.sop_instance_uid, reason))
    if pending == 0:
        # Only now, when a report is about to go out: the archived objects must still be there
        for index, instance in archived:
            if instance.object_key is None or store.size(instance.object_key) != instance.stored_bytes:
                held = outcomes[index]
                outcomes[index] = ItemOutcome(held.sop_class_uid, held.sop_instance_uid, PROCESSING_FAILURE)
    return Evaluation(request.transaction_uid, request.calling_ae_title, outcomes, pending)


def mark_reported(session: Session, request_pk: int, evaluation: Evaluation, delivered_via: str) -> None:
    request = session.get(CommitmentRequest, request_pk)
    assert request is not None
    request.state = CommitmentState.REPORTED
    request.reported_at = datetime.now(UTC)
    request.event_type = evaluation.event_type
    request.delivered_via = delivered_via
    request.lease_owner = None
    request.lease_expires_at = None
    request.last_error = None
    for item, outcome in zip(_items(session, request_pk), evaluation.outcomes, strict=True):
        item.failure_reason = outcome.failure_reason
    session.commit()


def mark_delivery_failed(
    session: Session, request_pk: int, error: str, *, retry_in_seconds: float | None
) -> CommitmentState:
    """A delivery that did not go through: retried later, or given up (retry_in_seconds None: no
    route to the peer; or MAX_DELIVERY_ATTEMPTS reached).  Stays leased to this process meanwhile."""
    request = session.get(CommitmentRequest, request_pk)
    assert request is not None
    request.attempts += 1
    request.last_error = error[:500]
    if retry_in_seconds is None or request.attempts >= MAX_DELIVERY_ATTEMPTS:
        request.state = CommitmentState.UNDELIVERABLE
        request.lease_owner = None
        request.lease_expires_at = None
    else:
        request.next_attempt_at = time.time() + retry_in_seconds
    session.commit()
    return CommitmentState(request.state)
