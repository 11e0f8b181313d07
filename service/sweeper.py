"""Re-enqueue instances stuck in received/compressing: their message was lost or their worker
died.  Runs at start-up and periodically, so a process killed at any point loses nothing."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from service.catalog import leases
from service.logs import fields
from service.queue import Enqueue

LOGGER = logging.getLogger(__name__)


def sweep(session_factory: sessionmaker[Session], enqueue: Enqueue, lease_seconds: float) -> list[int]:
    with session_factory() as session:
        taken = leases.requeue(session, leases.expired(session), lease_seconds)
    for instance_id in taken:
        enqueue(instance_id)
    if taken:
        LOGGER.info("re-enqueued stuck instances", extra=fields(count=len(taken), first=taken[0]))
    return taken


class Sweeper(threading.Thread):
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        enqueue: Enqueue,
        lease_seconds: float,
        interval_seconds: float,
    ) -> None:
        super().__init__(name="sweeper", daemon=True)
        self.session_factory, self.enqueue = session_factory, enqueue
        self.lease_seconds, self.interval_seconds = lease_seconds, interval_seconds
        self.stopping = threading.Event()

    def run(self) -> None:
        while True:
            try:
                sweep(self.session_factory, self.enqueue, self.lease_seconds)
            except Exception:
                LOGGER.warning("sweep failed", exc_info=True)
            if self.stopping.wait(self.interval_seconds):
                return

    def stop(self) -> None:
        self.stopping.set()
