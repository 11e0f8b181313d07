"""The catalog's figures: counts by state, bytes, by modality and by codec chosen."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.catalog.schemas import Breakdown, Stats
from service.catalog.tables import Instance, InstanceState, Series

UNKNOWN = "(none)"


def compute_stats(session: Session) -> Stats:
    by_state = {
        state: count for state, count in session.execute(select(Instance.state, func.count()).group_by(Instance.state))
    }
    held = Instance.state != InstanceState.SUPERSEDED
    instances, original = session.execute(
        select(func.count(), func.coalesce(func.sum(Instance.original_bytes), 0)).where(held)
    ).one()
    archived = Instance.state == InstanceState.ARCHIVED
    archived_original, stored = session.execute(
        select(
            func.coalesce(func.sum(Instance.original_bytes), 0),
            func.coalesce(func.sum(Instance.stored_bytes), 0),
        ).where(archived)
    ).one()
    by_modality: dict[str, Breakdown] = {}
    rows = session.execute(
        select(
            Series.modality,
            func.count(),
            func.coalesce(func.sum(Instance.original_bytes), 0),
            func.coalesce(func.sum(Instance.stored_bytes), 0),
        )
        .join(Series, Instance.series_pk == Series.id)
        .where(held)
        .group_by(Series.modality)
    )
    for modality, count, original_bytes, stored_bytes in rows:
        by_modality[modality or UNKNOWN] = Breakdown(
            instances=count, original_bytes=int(original_bytes), stored_bytes=int(stored_bytes)
        )
    by_codec: dict[str, Breakdown] = {}
    rows = session.execute(
        select(
            Instance.codec,
            func.count(),
            func.coalesce(func.sum(Instance.original_bytes), 0),
            func.coalesce(func.sum(Instance.stored_bytes), 0),
        )
        .where(archived)
        .group_by(Instance.codec)
    )
    for codec, count, original_bytes, stored_bytes in rows:
        by_codec[codec or UNKNOWN] = Breakdown(
            instances=count, original_bytes=int(original_bytes), stored_bytes=int(stored_bytes)
        )
    return Stats(
        instances_by_state={str(k): int(v) for k, v in by_state.items()},
        instances=int(instances),
        original_bytes=int(original),
        archived_original_bytes=int(archived_original),
        stored_bytes=int(stored),
        storage_ratio=round(archived_original / stored, 4) if stored else None,
        by_modality=by_modality,
        by_codec=by_codec,
    )
