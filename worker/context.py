"""The per-process worker context (catalog, store, lease owner name), built once."""

from __future__ import annotations

import os
import socket
import threading
import uuid

from service.config import Settings
from service.db import make_engine, make_session_factory
from service.storage import open_store
from worker import weights
from worker.pipeline import WorkerContext

_lock = threading.Lock()
_context: WorkerContext | None = None


def make_context(settings: Settings) -> WorkerContext:
    engine = make_engine(settings.resolved_database_url())
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    store = open_store(settings.resolved_storage_url(), settings)
    weights.use_store(store)
    return WorkerContext(settings, make_session_factory(engine), store, owner)


def process_context() -> WorkerContext:
    global _context
    with _lock:
        if _context is None or _context.owner.split(":")[1] != str(os.getpid()):  # forked: rebuild
            _context = make_context(Settings())
        return _context
