"""Dashboard figures and admin operations, as SQL (aggregates in the database, not Python loops)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, delete, func, or_, select
from sqlalchemy.orm import Session

from service.catalog.tables import (
    AuditEvent,
    Instance,
    InstanceState,
    Patient,
    ScrubRun,
    Series,
    Study,
    Tombstone,
)

LOGGER = logging.getLogger(__name__)
UNKNOWN = "(none)"
ARCHIVED = Instance.state == InstanceState.ARCHIVED


def _breakdown(session: Session, key: Any, *, join_series: bool = False) -> list[dict[str, Any]]:
    query: Select[Any] = select(
        key,
        func.count(),
        func.coalesce(func.sum(Instance.original_bytes), 0),
        func.coalesce(func.sum(Instance.stored_bytes), 0),
        func.coalesce(func.sum(Instance.classical_bytes), 0),
    ).where(ARCHIVED)
    if join_series:
        query = query.join(Series, Instance.series_pk == Series.id)
    rows = session.execute(query.group_by(key)).all()
    out = []
    for name, count, original, stored, classical in rows:
        out.append(
            {
                "name": str(name) if name is not None else UNKNOWN,
                "instances": int(count),
                "original_bytes": int(original),
                "stored_bytes": int(stored),
                "classical_bytes": int(classical),
                "ratio": round(int(original) / int(stored), 3) if stored else None,
            }
        )
    return sorted(out, key=lambda r: -r["original_bytes"])


def savings(session: Session, days: int = 60) -> dict[str, Any]:
    total = _breakdown(session, func.coalesce(Instance.state, ""))  # one row: every archived instance
    totals = total[0] if total else {"instances": 0, "original_bytes": 0, "stored_bytes": 0, "classical_bytes": 0}
    since = datetime.now(UTC) - timedelta(days=days)
    day = func.date(Instance.archived_at)
    by_day = [
        r
        for r in _breakdown_since(session, day, since)
        if r["name"] != UNKNOWN  # archived before archived_at was recorded
    ]
    return {
        "instances": totals["instances"],
        "original_bytes": totals["original_bytes"],
        "stored_bytes": totals["stored_bytes"],
        # What JPEG-LS / JPEG XL / zstd alone would have stored: the learned codec's contribution
        "classical_bytes": totals["classical_bytes"],
        "ratio": round(totals["original_bytes"] / totals["stored_bytes"], 3) if totals["stored_bytes"] else None,
        "by_modality": _breakdown(session, Series.modality, join_series=True),
        "by_codec": _breakdown(session, Instance.codec),
        "by_calling_ae": _breakdown(session, Instance.calling_ae),
        "by_day": sorted(by_day, key=lambda r: r["name"]),
    }


def _breakdown_since(session: Session, key: Any, since: datetime) -> list[dict[str, Any]]:
    rows = session.execute(
        select(
            key,
            func.count(),
            func.coalesce(func.sum(Instance.original_bytes), 0),
            func.coalesce(func.sum(Instance.stored_bytes), 0),
        )
        .where(ARCHIVED, Instance.archived_at >= since)
        .group_by(key)
    ).all()
    return [
        {"name": str(name) if name else UNKNOWN, "instances": int(c), "original_bytes": int(o), "stored_bytes": int(s)}
        for name, c, o, s in rows
    ]


def health(session: Session, lease_seconds: float) -> dict[str, Any]:
    states = {str(s): int(c) for s, c in session.execute(select(Instance.state, func.count()).group_by(Instance.state))}
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    archived_last_hour, bytes_last_hour = session.execute(
        select(func.count(), func.coalesce(func.sum(Instance.original_bytes), 0)).where(
            ARCHIVED, Instance.archived_at >= hour_ago
        )
    ).one()
    # Workers holding a live lease now (an idle worker holds none: this counts busy workers)
    busy_workers = session.scalar(
        select(func.count(func.distinct(Instance.lease_owner))).where(
            Instance.state == InstanceState.COMPRESSING, Instance.lease_expires_at > time.time()
        )
    )
    last_scrub = session.scalars(select(ScrubRun).order_by(ScrubRun.id.desc()).limit(1)).first()
    return {
        "states": states,
        "queue_depth": states.get(InstanceState.RECEIVED, 0),
        "compressing": states.get(InstanceState.COMPRESSING, 0),
        "failed": states.get(InstanceState.FAILED, 0),
        "corrupt": states.get(InstanceState.CORRUPT, 0),
        "busy_workers": int(busy_workers or 0),
        "archived_last_hour": int(archived_last_hour),
        "archived_bytes_last_hour": int(bytes_last_hour),
        "last_scrub": None
        if last_scrub is None
        else {
            "started_at": last_scrub.started_at.isoformat(),
            "finished_at": last_scrub.finished_at.isoformat() if last_scrub.finished_at else None,
            "mode": last_scrub.mode,
            "checked": last_scrub.checked,
            "corrupt": last_scrub.corrupt,
        },
    }


def search_studies(session: Session, text: str, limit: int = 50) -> list[dict[str, Any]]:
    """By accession number, patient ID or study UID (prefix match; LIKE metacharacters literal).
    The page of studies is chosen first; sizes are summed for that page only."""
    pattern = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    query = (
        select(Study, Patient.patient_id)
        .join(Patient, Study.patient_pk == Patient.id)
        .order_by(Study.id.desc())
        .limit(limit)
    )
    if text:
        query = query.where(
            or_(
                Study.accession_number.like(pattern, escape="\\"),
                Patient.patient_id.like(pattern, escape="\\"),
                Study.study_instance_uid.like(pattern, escape="\\"),
            )
        )
    page = session.execute(query).all()
    pks = [study.id for study, _ in page]
    sizes = {
        study_pk: (int(count), int(original), int(stored))
        for study_pk, count, original, stored in session.execute(
            select(
                Series.study_pk,
                func.count(Instance.id),
                func.coalesce(func.sum(Instance.original_bytes), 0),
                func.coalesce(func.sum(Instance.stored_bytes), 0),
            )
            .join(Instance, Instance.series_pk == Series.id)
            .where(Series.study_pk.in_(pks), Instance.state != InstanceState.SUPERSEDED)
            .group_by(Series.study_pk)
        )
    }
    return [
        {
            "study_instance_uid": study.study_instance_uid,
            "accession_number": study.accession_number,
            "patient_id": patient_id,
            "study_date": study.study_date,
            "description": study.study_description,
            "modalities": study.modalities_in_study,
            "instances": sizes.get(study.id, (0, 0, 0))[0],
            "original_bytes": sizes.get(study.id, (0, 0, 0))[1],
            "stored_bytes": sizes.get(study.id, (0, 0, 0))[2],
        }
        for study, patient_id in page
    ]


def study_detail(session: Session, study_uid: str) -> dict[str, Any] | None:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        return None
    rows = session.execute(
        select(Series, Instance)
        .join(Instance, Instance.series_pk == Series.id)
        .where(Series.study_pk == study.id, Instance.state != InstanceState.SUPERSEDED)
        .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
    ).all()
    series: dict[str, dict[str, Any]] = {}
    for s, i in rows:
        entry = series.setdefault(
            s.series_instance_uid,
            {
                "series_instance_uid": s.series_instance_uid,
                "modality": s.modality,
                "series_number": s.series_number,
                "description": s.series_description,
                "instances": [],
            },
        )
        entry["instances"].append(
            {
                "sop_instance_uid": i.sop_instance_uid,
                "instance_number": i.instance_number,
                "state": i.state,
                "codec": i.codec,
                "original_bytes": i.original_bytes,
                "stored_bytes": i.stored_bytes,
                "classical_bytes": i.classical_bytes,
                "transfer_syntax_uid": i.transfer_syntax_uid,
                "frames": i.number_of_frames,
                "rows": i.rows,
                "columns": i.columns,
            }
        )
    patient = session.get(Patient, study.patient_pk)
    return {
        "study_instance_uid": study.study_instance_uid,
        "accession_number": study.accession_number,
        "patient_id": patient.patient_id if patient else None,
        "study_date": study.study_date,
        "description": study.study_description,
        "series": list(series.values()),
    }


def tombstones(session: Session, limit: int = 100) -> list[dict[str, Any]]:
    rows = session.scalars(select(Tombstone).order_by(Tombstone.id.desc()).limit(limit))
    return [
        {
            "level": t.level,
            "uid": t.uid,
            "deleted_at": t.deleted_at.isoformat(),
            "actor": t.actor,
            "reason": t.reason,
            "instances": t.instances,
        }
        for t in rows
    ]


def audit_events(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    study: str | None = None,
    limit: int = 200,
    offset: int = 0,
) -> list[dict[str, Any]]:
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if action:
        query = query.where(AuditEvent.action == action)
    if study:
        query = query.where(AuditEvent.study_instance_uid == study)
    return [
        {
            "at": e.at.isoformat(),
            "actor": e.actor,
            "actor_kind": e.actor_kind,
            "action": e.action,
            "interface": e.interface,
            "remote": e.remote,
            "study_instance_uid": e.study_instance_uid,
            "series_instance_uid": e.series_instance_uid,
            "sop_instance_uid": e.sop_instance_uid,
            "outcome": e.outcome,
            "detail": e.detail,
        }
        for e in session.scalars(query)
    ]


def delete_entity(session: Session, level: str, uid: str, actor: str, reason: str | None) -> tuple[int, list[str]]:
    """Remove a study, series or instance (every version) from the catalog and leave a tombstone.
    Returns (instances removed, object/staging keys nothing refers to any more) - the caller deletes
    those objects after this commits, so a crash in between leaves orphans, never dangling rows."""
    if level == "study":
        study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
        series_pks = (
            [] if study is None else list(session.scalars(select(Series.id).where(Series.study_pk == study.id)))
        )
        instances = list(session.scalars(select(Instance).where(Instance.series_pk.in_(series_pks)))) if study else []
    elif level == "series":
        series = session.scalar(select(Series).where(Series.series_instance_uid == uid))
        instances = (
            [] if series is None else list(session.scalars(select(Instance).where(Instance.series_pk == series.id)))
        )
    else:
        instances = list(session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)))
    if not instances:
        return 0, []
    keys = {i.object_key for i in instances if i.object_key} | {i.staging_key for i in instances if i.staging_key}
    ids = [i.id for i in instances]
    series_touched = {i.series_pk for i in instances}
    session.execute(
        # versions point at the versions they replaced
        Instance.__table__.update().where(Instance.id.in_(ids)).values(replaces_pk=None)
    )
    session.execute(delete(Instance).where(Instance.id.in_(ids)))
    session.flush()
    for series_pk in series_touched:
        if not session.scalar(select(func.count()).select_from(Instance).where(Instance.series_pk == series_pk)):
            series_row = session.get(Series, series_pk)
            if series_row is not None:
                study_pk = series_row.study_pk
                session.delete(series_row)
                session.flush()
                if not session.scalar(select(func.count()).select_from(Series).where(Series.study_pk == study_pk)):
                    study_row = session.get(Study, study_pk)
                    if study_row is not None:
                        session.delete(study_row)
    session.add(Tombstone(level=level, uid=uid, actor=actor, reason=reason, instances=len(ids)))
    session.flush()
    # Content-addressed objects may be shared by identical instances elsewhere: keep those
    still_used = set(session.scalars(select(Instance.object_key).where(Instance.object_key.in_(keys))))
    still_used |= set(session.scalars(select(Instance.staging_key).where(Instance.staging_key.in_(keys))))
    return len(ids), sorted(keys - still_used)


class CachedFigures:
    """Whole-catalog aggregates, recomputed in the background (stale-while-revalidate).

    With 10^6 instances a savings or health aggregate takes seconds of database time; the dashboard
    polls every 10 s.  So each figure is served from the last computation, which is refreshed in
    a background thread once it is older than max(min_age, 10 x the time it took): a small catalog
    is always fresh, a large one a few tens of seconds behind.  The answer says how old it is."""

    def __init__(self, min_age_seconds: float = 5.0) -> None:
        self.min_age = min_age_seconds
        self._values: dict[str, tuple[Any, float, float]] = {}
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()

    def get(self, key: str, compute: Callable[[], Any]) -> tuple[Any, float]:
        """(value, age in seconds)."""
        with self._lock:
            entry = self._values.get(key)
        if entry is None:
            return self._compute(key, compute), 0.0
        value, computed_at, took = entry
        age = time.monotonic() - computed_at
        if age > max(self.min_age, 10 * took):
            with self._lock:
                start = key not in self._refreshing
                self._refreshing.add(key)
            if start:
                threading.Thread(target=self._refresh, args=(key, compute), daemon=True).start()
        return value, age

    def _compute(self, key: str, compute: Callable[[], Any]) -> Any:
        started = time.monotonic()
        value = compute()
        with self._lock:
            self._values[key] = (value, time.monotonic(), time.monotonic() - started)
        return value

    def _refresh(self, key: str, compute: Callable[[], Any]) -> None:
        try:
            self._compute(key, compute)
        except Exception as exc:  # the previous value stays; the next request tries again
            LOGGER.warning("dashboard figure refresh failed", extra={"figure": key, "error": type(exc).__name__})
        finally:
            with self._lock:
                self._refreshing.discard(key)
