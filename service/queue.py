"""Handing instance ids to the workers.

Embedded mode (no broker URL): the workers poll the catalog for received instances, so there is
nothing to send.  Distributed mode: a Celery message by task name (the service never imports the
worker's task code, which loads the codec).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from service.logs import fields

ARCHIVE_TASK = "lvpnet_archive.archive_instance"
LOGGER = logging.getLogger(__name__)

Enqueue = Callable[[int], None]


def embedded_enqueue(instance_id: int) -> None:
    """The catalog row is the message: embedded workers find it by polling."""


def make_celery_client(broker_url: str) -> Any:
    from celery import Celery

    app = Celery("lvpnet_archive_client", broker=broker_url)
    app.conf.broker_connection_retry_on_startup = True
    return app


def make_enqueue(broker_url: str) -> Enqueue:
    if not broker_url:
        return embedded_enqueue
    client = make_celery_client(broker_url)

    def enqueue(instance_id: int) -> None:
        try:
            client.send_task(ARCHIVE_TASK, args=[instance_id], queue="archive")
        except Exception:
            # The instance is durable and catalogued; the sweeper re-sends when its lease expires.
            LOGGER.warning("enqueue failed", extra=fields(instance=instance_id), exc_info=True)

    return enqueue
