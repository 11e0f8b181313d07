"""Rebuilding originals for retrieval, in a decode process (embedded pool or Celery worker).

Returns (status, payload): ("ok", file bytes) | ("corrupt", reason) | ("missing", key).  Transient
store errors raise.  The caller checks the SHA-256 where the bytes are sent.
"""

from __future__ import annotations

import logging

from service.config import Settings
from service.logs import configure_logging, fields
from service.record import parse_record
from service.storage import ObjectStore, open_store
from service.storage.base import ObjectNotFoundError
from worker import weights

LOGGER = logging.getLogger(__name__)
_store: ObjectStore | None = None


def init_process(settings_json: str) -> None:
    global _store
    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings.log_level)
    _store = open_store(settings.resolved_storage_url(), settings)
    weights.use_store(_store)


def warm_up() -> None:
    """Import the pipeline and load the default model, so the first retrieval is not slow."""
    from worker import pipeline, runtime  # noqa: F401

    runtime.load()


def _the_store() -> ObjectStore:
    global _store
    if _store is None:
        settings = Settings()
        _store = open_store(settings.resolved_storage_url(), settings)
        weights.use_store(_store)
    return _store


def rebuild_object(object_key: str) -> tuple[str, bytes | str]:
    from worker.pipeline import rebuild_file

    try:
        data = _the_store().get_bytes(object_key)
    except ObjectNotFoundError:
        return "missing", object_key
    try:
        return "ok", rebuild_file(parse_record(data))
    except MemoryError:
        raise
    except Exception as exc:  # after the read, every failure is the record's (codec errors have many types)
        LOGGER.error("record does not rebuild", extra=fields(object_key=object_key, error=type(exc).__name__))
        return "corrupt", f"{type(exc).__name__}: {exc}"[:500]
