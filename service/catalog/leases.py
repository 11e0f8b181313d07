"""Leases: which worker holds which instance, until when.  Claims are single guarded UPDATEs, so
two workers (or a re-delivered task) never compress the same instance at once, and a worker that
died stops holding its instances when the lease runs out."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from service.catalog.tables import Instance, InstanceState


def _claimable(now: float):  # type: ignore[no-untyped-def]
    return or_(
        Instance.state == InstanceState.RECEIVED,
        and_(
            Instance.state == InstanceState.COMPRESSING,
            or_(Instance.lease_expires_at.is_(None), Instance.lease_expires_at < now),
        ),
    )


def claim(session: Session, instance_id: int, owner: str, lease_seconds: float) -> bool:
    now = time.time()
    result = session.execute(
        update(Instance)
        .where(Instance.id == instance_id, _claimable(now))
        .values(
            state=InstanceState.COMPRESSING,
            lease_owner=owner,
            lease_expires_at=now + lease_seconds,
            attempts=Instance.attempts + 1,
            updated_at=datetime.now(UTC),
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def renew(session: Session, instance_id: int, owner: str, lease_seconds: float) -> bool:
    result = session.execute(
        update(Instance)
        .where(
            Instance.id == instance_id,
            Instance.lease_owner == owner,
            Instance.state == InstanceState.COMPRESSING,
        )
        .values(lease_expires_at=time.time() + lease_seconds)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def release(session: Session, instance_id: int, owner: str) -> None:
    """Give the instance back for an immediate retry (a transient failure)."""
    session.execute(
        update(Instance)
        .where(Instance.id == instance_id, Instance.lease_owner == owner)
        .values(state=InstanceState.RECEIVED, lease_owner=None, lease_expires_at=time.time())
        .execution_options(synchronize_session=False)
    )
    session.commit()


def next_claimable(session: Session, limit: int = 1) -> list[int]:
    """Oldest instances waiting for a worker (embedded mode's queue)."""
    now = time.time()
    return list(session.scalars(select(Instance.id).where(_claimable(now)).order_by(Instance.id).limit(limit)))


def expired(session: Session, limit: int = 1000) -> list[int]:
    """Instances in received/compressing whose lease (or enqueue grace period) ran out: their task
    was lost or their worker died.  The sweeper re-enqueues these."""
    now = time.time()
    return list(
        session.scalars(
            select(Instance.id)
            .where(
                Instance.state.in_([InstanceState.RECEIVED, InstanceState.COMPRESSING]),
                or_(Instance.lease_expires_at.is_(None), Instance.lease_expires_at < now),
            )
            .order_by(Instance.id)
            .limit(limit)
        )
    )


def requeue(session: Session, instance_ids: list[int], lease_seconds: float) -> list[int]:
    """Take expired instances back from whoever held them (state received, no owner) and give
    them a new grace period, so the sweeper does not re-send them again before it runs out.
    Returns the ids actually taken back (a worker may have finished one meanwhile)."""
    if not instance_ids:
        return []
    now = time.time()
    taken = []
    for instance_id in instance_ids:
        result = session.execute(
            update(Instance)
            .where(
                Instance.id == instance_id,
                Instance.state.in_([InstanceState.RECEIVED, InstanceState.COMPRESSING]),
                or_(Instance.lease_expires_at.is_(None), Instance.lease_expires_at < now),
            )
            .values(state=InstanceState.RECEIVED, lease_owner=None, lease_expires_at=now + lease_seconds)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            taken.append(instance_id)
    session.commit()
    return taken
