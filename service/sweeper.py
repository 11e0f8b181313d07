"""Re-enqueue instances stuck in received/compressing (their message was lost or their worker
died), and remove files a crash left in the incoming directory.  Runs at start-up and
periodically, so a process killed at any point loses nothing and leaks nothing."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.catalog import leases
from service.catalog.tables import Instance, InstanceState
from service.logs import fields
from service.queue import Enqueue

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
    ) -> None:
        super().__init__(name="sweeper", daemon=True)
        self.session_factory, self.enqueue = session_factory, enqueue
        self.lease_seconds, self.interval_seconds = lease_seconds, interval_seconds
        self.requeue = requeue
        self.incoming_dir, self.incoming_stale_seconds = incoming_dir, incoming_stale_seconds
        self.stopping = threading.Event()

    def run(self) -> None:
        while True:
            try:
                if self.requeue:
                    sweep(self.session_factory, self.enqueue, self.lease_seconds)
                if self.incoming_dir is not None:
                    clean_incoming(self.incoming_dir, self.session_factory, self.incoming_stale_seconds)
            except Exception:
                LOGGER.warning("sweep failed", exc_info=True)
            if self.stopping.wait(self.interval_seconds):
                return

    def stop(self) -> None:
        self.stopping.set()
