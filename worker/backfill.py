"""Re-compress archived instances with the current codec candidates (a newer LVPNet model, or
effort `best` after ingesting with `fast`).

For each archived instance whose `encoder_set` differs from the current one: rebuild its original
from the stored record (SHA-256 checked), build a new record (every candidate, verified by a
rebuild inside `build_record`), and keep it only if it is smaller.  The switch is one catalog
update conditioned on the row still pointing at the old object; the old object is deleted only
after that commit, and only if no other archived row uses it.  So the old object stays until the
new one is stored, read back and verified, and an interrupted run leaves every row pointing at a
complete, verified record.

Resumable: a row that has been tried gets the current `encoder_set`, whether its record changed
or not, so a second run takes only what is left.  Old streams stay readable: weights are never
removed from the zoo and are kept in the store (`worker/weights.py`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.catalog.tables import Instance, InstanceState
from service.config import Settings
from service.logs import fields
from service.record import parse_record
from service.storage.base import ObjectNotFoundError, ObjectStore
from worker import weights
from worker.pipeline import (
    build_record,
    configured_adapt_steps,
    configured_candidates,
    encoder_set,
    put_record,
    rebuild_file,
)

LOGGER = logging.getLogger(__name__)


@dataclass
class BackfillReport:
    encoder_set: str
    targets: int = 0  # rows with another encoder set when the run started (after --codec / --limit)
    tried: int = 0
    improved: int = 0
    unchanged: int = 0  # the stored record was already the smallest
    changed_meanwhile: int = 0  # deleted, superseded or re-archived while being tried: left alone
    failed: list[dict[str, Any]] = field(default_factory=list)
    bytes_before: int = 0  # stored bytes of the rows tried
    bytes_after: int = 0
    seconds: float = 0.0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _targets(session: Session, current: str, codec: str | None) -> Any:
    query = select(Instance.id).where(
        Instance.state == InstanceState.ARCHIVED,
        or_(Instance.encoder_set.is_(None), Instance.encoder_set != current),
    )
    if codec is not None:
        query = query.where(Instance.codec == codec)
    return query


def backfill(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    *,
    codec: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    progress: Callable[[int], Any] | None = None,
) -> BackfillReport:
    candidates, zstd_level = configured_candidates(settings)
    adapt_steps = configured_adapt_steps(settings)
    weights.use_store(store)
    current = encoder_set(candidates, zstd_level, adapt_steps)
    report = BackfillReport(encoder_set=current, dry_run=dry_run)
    started = time.monotonic()
    with session_factory() as session:
        total = session.scalar(select(func.count()).select_from(_targets(session, current, codec).subquery())) or 0
    report.targets = min(total, limit) if limit is not None else total
    LOGGER.info("backfill started", extra=fields(targets=report.targets, encoder_set=current, dry_run=dry_run))
    if dry_run:
        report.seconds = round(time.monotonic() - started, 3)
        return report
    bar = progress(report.targets) if progress else None
    after_id = 0
    try:
        while report.tried < report.targets:
            with session_factory() as session:
                batch = list(
                    session.scalars(
                        _targets(session, current, codec)
                        .where(Instance.id > after_id)
                        .order_by(Instance.id)
                        .limit(min(100, report.targets - report.tried))
                    )
                )
            if not batch:
                break
            for instance_id in batch:
                after_id = instance_id
                _backfill_one(
                    session_factory, store, instance_id, (candidates, zstd_level, adapt_steps), current, report
                )
                report.tried += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(saved_mb=f"{(report.bytes_before - report.bytes_after) / 1e6:.1f}")
    finally:
        if bar is not None:
            bar.close()
    report.seconds = round(time.monotonic() - started, 3)
    LOGGER.info(
        "backfill finished",
        extra=fields(
            tried=report.tried,
            improved=report.improved,
            unchanged=report.unchanged,
            failed=len(report.failed),
            saved_bytes=report.bytes_before - report.bytes_after,
        ),
    )
    return report


def _backfill_one(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    instance_id: int,
    encoder: tuple[tuple[str, ...], int, int],  # candidates, zstd level, single-image mode steps
    current: str,
    report: BackfillReport,
) -> None:
    with session_factory() as session:
        row = session.get(Instance, instance_id)
        if row is None or row.state != InstanceState.ARCHIVED or row.object_key is None:
            report.changed_meanwhile += 1
            return
        old_key, original_sha256, old_size = row.object_key, row.original_sha256, row.stored_bytes or 0
    try:
        original = rebuild_file(parse_record(store.get_bytes(old_key)))
        if hashlib.sha256(original).hexdigest() != original_sha256:
            raise ValueError("stored record does not rebuild the original (run scrub)")
        built = build_record(original, original_sha256, *encoder)
        new_key = put_record(store, built) if len(built.data) < old_size else None
    except ObjectNotFoundError:
        report.failed.append({"instance": instance_id, "error": "archived object missing (run scrub)"})
        return
    except Exception as exc:  # one bad record must not stop the run; it is reported and left as it is
        LOGGER.warning("backfill failed for an instance", extra=fields(instance=instance_id), exc_info=True)
        report.failed.append({"instance": instance_id, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    values: dict[str, Any] = {"encoder_set": current}
    if new_key is not None:
        values.update(
            object_key=new_key,
            codec=built.record.codec,
            stored_bytes=len(built.data),
            classical_bytes=built.classical_bytes,
        )
    with session_factory() as session:
        result = session.execute(
            update(Instance)
            .where(
                Instance.id == instance_id,
                Instance.state == InstanceState.ARCHIVED,
                Instance.object_key == old_key,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if result.rowcount != 1:  # type: ignore[attr-defined]
            report.changed_meanwhile += 1
            if new_key is not None:
                _delete_if_unused(session, store, new_key)
            return
        report.bytes_before += old_size
        if new_key is None:
            report.unchanged += 1
            report.bytes_after += old_size
            return
        report.improved += 1
        report.bytes_after += len(built.data)
        if new_key != old_key:
            _delete_if_unused(session, store, old_key)
    LOGGER.info(
        "instance re-compressed",
        extra=fields(instance=instance_id, codec=built.record.codec, before=old_size, after=len(built.data)),
    )


def _delete_if_unused(session: Session, store: ObjectStore, key: str) -> None:
    """Records are content-addressed: identical originals share one object."""
    in_use = session.scalar(
        select(func.count())
        .select_from(Instance)
        .where(Instance.object_key == key, Instance.state.in_([InstanceState.ARCHIVED, InstanceState.CORRUPT]))
    )
    if not in_use:
        store.delete(key)
