"""The Celery application (tasks live in worker.tasks)."""

from __future__ import annotations

from celery import Celery

from service.config import Settings


def make_celery(settings: Settings) -> Celery:
    broker = settings.broker_url or "redis://127.0.0.1:6379/0"
    # The backend carries rebuilt files back to a waiting retrieval; archive tasks store no result
    app = Celery("lvpnet_archive", broker=broker, backend=broker, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,  # a task whose worker dies is delivered again
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # compression is long: don't hoard messages
        task_ignore_result=True,
        result_expires=600,
        task_default_queue="archive",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Redis redelivers unacked messages only after this; the catalog lease (much shorter)
        # is what brings a dead worker's instance back quickly.
        broker_transport_options={"visibility_timeout": 3600},
    )
    return app


app = make_celery(Settings())
