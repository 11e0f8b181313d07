"""Thin Celery tasks: stable names, instance ids as arguments, idempotent, acks_late."""

from __future__ import annotations

import base64
import logging
from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from service.config import Settings
from service.logs import fields
from service.queue import ARCHIVE_TASK, make_enqueue
from service.retrieve import REBUILD_TASK
from service.sweeper import Sweeper
from worker import runtime
from worker.celery_app import app
from worker.context import process_context
from worker.pipeline import archive_instance
from worker.retrieval import rebuild_object

LOGGER = logging.getLogger(__name__)
_sweeper: Sweeper | None = None


@app.task(name=ARCHIVE_TASK, bind=True, acks_late=True, max_retries=Settings().task_max_retries)
def archive_instance_task(self: Any, instance_id: int) -> str:
    try:
        return archive_instance(process_context(), int(instance_id))
    except Exception as exc:
        countdown = min(300, 5 * 2**self.request.retries)
        LOGGER.warning("archive task failed; retrying", extra=fields(instance=instance_id, countdown=countdown))
        raise self.retry(exc=exc, countdown=countdown) from exc


@worker_process_init.connect
def _load_codec(**_: Any) -> None:
    runtime.load()


@worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    global _sweeper
    runtime.load()  # solo pool: the worker process is the task process
    settings = Settings()
    ctx = process_context()
    _sweeper = Sweeper(
        ctx.session_factory,
        make_enqueue(settings.broker_url),
        settings.lease_seconds,
        settings.sweep_interval_seconds,
        incoming_stale_seconds=settings.incoming_stale_seconds,
        store=ctx.store,
        staging_orphan_seconds=settings.staging_orphan_seconds,
    )
    _sweeper.start()


@worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()


@app.task(name=REBUILD_TASK, acks_late=True, ignore_result=False)
def rebuild_object_task(object_key: str) -> tuple[str, str]:
    """Rebuild an original for a retrieval waiting in the API/SCP; bytes travel base64 in the result."""
    status, payload = rebuild_object(object_key)
    if isinstance(payload, bytes):
        return status, base64.b64encode(payload).decode("ascii")
    return status, payload
