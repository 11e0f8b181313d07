"""Re-enqueue instances stuck in received/compressing (their message was lost or their worker
died), and remove files a crash left in the incoming directory and staged copies no catalog row
names.  Runs at start-up and periodically, so a process killed at any point loses nothing and
leaks nothing."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service import metrics
from service.catalog import leases
from service.catalog.tables import Instance, InstanceState
from service.logs import fields
from service.queue import Enqueue
from service.storage.base import STAGING_PREFIX, ObjectNotFoundError, ObjectStore

LOGGER = logging.getLogger(__name__)
HASH_CHUNK = 1 << 20


def sweep(session_factory: sessionmaker[Session], enqueue: Enqueue, lease_seconds: float) -> list[int]:
    with session_factory() as session:
        taken = leases.requeue(session, leases.expired(session), lease_seconds)
    for instance_id in taken:
        enqueue(instance_id)
    if taken:
        LOGGER.info("re-enqueued stuck instances", extra=fields(count=len(taken), first=taken[0]))
    return taken


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def clean_incoming(
    incoming_dir: Path, session_factory: sessionmaker[Session], stale_seconds: float, now: float | None = None
) -> list[str]:
    """Delete the files in `incoming_dir` untouched for `stale_seconds` (C-STORE and STOW temporary
    files whose receive or ingest was cut short by a crash) unless an instance still waiting for
    archival has the same SHA-256: then the file may be the only copy of an acknowledged object
    and is kept until that instance is archived.  Any other stale file was either never
    acknowledged (no Success without a durable staged copy and catalog rows; the sender resends)
    or is a leftover of an ingest that completed.  Returns the names removed."""
    cutoff = (time.time() if now is None else now) - stale_seconds
    try:
        entries = list(os.scandir(incoming_dir))
    except FileNotFoundError:
        return []
    removed: list[str] = []
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime > cutoff:
                continue
            digest = _sha256(entry.path)
        except FileNotFoundError:  # finished (renamed into staging) or removed meanwhile
            continue
        with session_factory() as session:
            waiting = session.scalars(
                select(Instance.id)
                .where(
                    Instance.state.in_([InstanceState.RECEIVED, InstanceState.COMPRESSING]),
                    Instance.original_sha256 == digest,
                )
                .limit(1)
            ).first()
        if waiting is not None:
            LOGGER.warning("stale incoming file kept: instance not archived yet", extra=fields(instance=waiting))
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(entry.name)
    if removed:
        LOGGER.info("removed stale incoming files", extra=fields(count=len(removed)))
    return removed


def clean_staging(
    store: ObjectStore,
    session_factory: sessionmaker[Session],
    redundant_after_seconds: float,
    orphan_after_seconds: float,
    now: float | None = None,
    digests: dict[str, str] | None = None,
) -> dict[str, list[str]]:
    """Delete staged copies nothing needs any more.

    * `archived`: the row is archived but still names its staged copy (a crash between the
      worker's archived commit and its delete of the copy).  Removed after `redundant_after_seconds`.

    The others no catalog row names.  They are left by a crash between the staging PUT and the
    catalog commit (`Ingestor`): the sender got no Success for them.

    * `redundant`: an instance with the same SHA-256 is archived (the sender resent it).  Removed
      once older than `redundant_after_seconds`.
    * `unclaimed`: nothing else holds these bytes.  Kept for `orphan_after_seconds` (days), not
      removed at once, because a staged copy with no row is also what a lost or restored-from-backup
      catalog looks like: `rebuild-catalog` turns such copies back into instances.

    `digests` caches SHA-256s between runs (an unclaimed copy would otherwise be re-read every
    sweep).  Returns the keys removed by reason."""
    now = time.time() if now is None else now
    removed: dict[str, list[str]] = {"archived": [], "redundant": [], "unclaimed": []}
    digests = {} if digests is None else digests
    listed: dict[str, float] = dict(store.iter_modified(STAGING_PREFIX))
    for key in set(digests) - set(listed):
        digests.pop(key, None)
    old_enough = now - min(redundant_after_seconds, orphan_after_seconds)
    candidates = sorted(key for key, modified in listed.items() if modified <= old_enough)
    for start in range(0, len(candidates), 500):
        chunk = candidates[start : start + 500]
        with session_factory() as session:
            rows = session.execute(
                select(Instance.id, Instance.staging_key, Instance.state).where(Instance.staging_key.in_(chunk))
            ).all()
        named = {row.staging_key for row in rows}
        for row in rows:
            # The worker deletes the staged copy after the archived commit, then clears the key: a
            # crash in between leaves both.  The archived record was verified: the copy may go.
            if row.state == InstanceState.ARCHIVED and listed[row.staging_key] <= now - redundant_after_seconds:
                store.delete(row.staging_key)
                with session_factory() as session:
                    session.execute(
                        update(Instance)
                        .where(Instance.id == row.id, Instance.state == InstanceState.ARCHIVED)
                        .values(staging_key=None)
                        .execution_options(synchronize_session=False)
                    )
                    session.commit()
                removed["archived"].append(row.staging_key)
                metrics.STAGING_ORPHANS_REMOVED.labels(reason="archived").inc()
        for key in chunk:
            if key not in named:
                reason = _orphan_reason(
                    store,
                    session_factory,
                    key,
                    listed[key],
                    now,
                    digests,
                    redundant_after_seconds,
                    orphan_after_seconds,
                )
                if reason is not None:
                    store.delete(key)
                    digests.pop(key, None)
                    removed[reason].append(key)
                    metrics.STAGING_ORPHANS_REMOVED.labels(reason=reason).inc()
    if any(removed.values()):
        LOGGER.info(
            "removed orphaned staged copies",
            extra=fields(**{reason: len(keys) for reason, keys in removed.items()}),
        )
    return removed


def _orphan_reason(
    store: ObjectStore,
    session_factory: sessionmaker[Session],
    key: str,
    modified: float,
    now: float,
    digests: dict[str, str],
    redundant_after_seconds: float,
    orphan_after_seconds: float,
) -> str | None:
    """'redundant', 'unclaimed' or None (keep) for a staged copy that no row named when listed."""
    if key not in digests:
        try:
            digests[key] = hashlib.sha256(store.get_bytes(key)).hexdigest()
        except ObjectNotFoundError:
            return None
    with session_factory() as session:
        # Re-checked after the read: the row may have been committed meanwhile
        if session.scalar(select(Instance.id).where(Instance.staging_key == key).limit(1)) is not None:
            return None
        archived = session.scalar(
            select(Instance.id)
            .where(Instance.original_sha256 == digests[key], Instance.state == InstanceState.ARCHIVED)
            .limit(1)
        )
    if archived is not None and modified <= now - redundant_after_seconds:
        return "redundant"
    if archived is None and modified <= now - orphan_after_seconds:
        return "unclaimed"
    return None


class Sweeper(threading.Thread):
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        enqueue: Enqueue,
        lease_seconds: float,
        interval_seconds: float,
        *,
        requeue: bool = True,
        incoming_dir: Path | None = None,
        incoming_stale_seconds: float = 3600.0,
        store: ObjectStore | None = None,
        staging_orphan_seconds: float = 7 * 86400.0,
    ) -> None:
        super().__init__(name="sweeper", daemon=True)
        self.session_factory, self.enqueue = session_factory, enqueue
        self.lease_seconds, self.interval_seconds = lease_seconds, interval_seconds
        self.requeue = requeue
        self.incoming_dir, self.incoming_stale_seconds = incoming_dir, incoming_stale_seconds
        self.store, self.staging_orphan_seconds = store, staging_orphan_seconds
        self._staged_digests: dict[str, str] = {}
        self._next_staging_sweep = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        while True:
            try:
                if self.requeue:
                    sweep(self.session_factory, self.enqueue, self.lease_seconds)
                if self.incoming_dir is not None:
                    clean_incoming(self.incoming_dir, self.session_factory, self.incoming_stale_seconds)
                # Listing staging/ costs a LIST on S3: at most every 10 sweeps (and at start-up)
                if self.store is not None and time.monotonic() >= self._next_staging_sweep:
                    self._next_staging_sweep = time.monotonic() + 10 * self.interval_seconds
                    clean_staging(
                        self.store,
                        self.session_factory,
                        self.incoming_stale_seconds,
                        self.staging_orphan_seconds,
                        digests=self._staged_digests,
                    )
            except Exception:
                LOGGER.warning("sweep failed", exc_info=True)
            if self.stopping.wait(self.interval_seconds):
                return

    def stop(self) -> None:
        self.stopping.set()
