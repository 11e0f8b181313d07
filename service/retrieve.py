"""Retrieval: the original file of an instance, rebuilt and SHA-256 checked before a byte leaves.

Instances still in staging are read from staging.  Archived ones are rebuilt from their record by
a decode worker - a local process pool in the embedded mode, a Celery task on the worker fleet
when a broker is configured - so that this process never imports the codec.  Every result is
compared with the catalog's SHA-256 here, where the bytes are sent; a mismatch or an unreadable
record marks the instance corrupt and is an error, never a response.  A size-bounded LRU cache
keeps recently rebuilt files.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import importlib
import json
import logging
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import metrics
from service.catalog.query import visible
from service.catalog.tables import Instance, InstanceState, Series, Study
from service.config import Settings
from service.logs import fields
from service.storage.base import ObjectNotFoundError, ObjectStore

LOGGER = logging.getLogger(__name__)
REBUILD_TASK = "lvpnet_archive.rebuild_object"


class RetrieveError(Exception):
    """Base: a reason without patient data."""


class RetrieveTimeout(RetrieveError):
    pass


class RetrieveUnavailable(RetrieveError):
    """Transient: the store or the decode workers cannot be reached."""


class CorruptInstance(RetrieveError):
    """The stored bytes do not give the original back: the instance is marked corrupt."""


class CorruptRecord(Exception):
    """Raised by a rebuilder when the record cannot be parsed or decoded (not transient)."""


@dataclass(frozen=True)
class InstanceRef:
    """What retrieval needs of one catalogued instance (read once, used outside the session)."""

    id: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    original_sha256: str
    original_bytes: int
    state: str
    staging_key: str | None
    object_key: str | None
    number_of_frames: int | None


def visible_instances() -> Any:
    """The current version of each SOP instance whose bytes the archive holds (as queries see it)."""
    return (
        select(Instance, Series.series_instance_uid, Study.study_instance_uid)
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .where(visible(Instance))
    )


def _ref(row: Any) -> InstanceRef:
    instance, series_uid, study_uid = row
    return InstanceRef(
        instance.id,
        study_uid,
        series_uid,
        instance.sop_instance_uid,
        instance.sop_class_uid,
        instance.transfer_syntax_uid,
        instance.original_sha256,
        instance.original_bytes,
        instance.state,
        instance.staging_key,
        instance.object_key,
        instance.number_of_frames,
    )


def find_refs(
    session: Session, study: str, series: str | None = None, sop_instance: str | None = None
) -> list[InstanceRef]:
    """The instances of a study, series or single instance, in series/instance order."""
    query = visible_instances().where(Study.study_instance_uid == study)
    if series is not None:
        query = query.where(Series.series_instance_uid == series)
    if sop_instance is not None:
        query = query.where(Instance.sop_instance_uid == sop_instance)
    query = query.order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
    return [_ref(row) for row in session.execute(query).all()]


def refs_by_id(session: Session, instance_ids: list[int]) -> list[InstanceRef]:
    if not instance_ids:
        return []
    rows = session.execute(visible_instances().where(Instance.id.in_(instance_ids))).all()
    by_id = {ref.id: ref for ref in map(_ref, rows)}
    return [by_id[i] for i in instance_ids if i in by_id]


# ------------------------------------------------------------------------------ cache


class RebuiltCache:
    """LRU of verified original files, bounded in bytes.  Keyed by the original's SHA-256."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, sha256: str) -> bytes | None:
        with self._lock:
            data = self._items.get(sha256)
            if data is not None:
                self._items.move_to_end(sha256)
            return data

    def put(self, sha256: str, data: bytes) -> None:
        if len(data) > self.max_bytes // 4:  # one huge file must not flush everything else
            return
        with self._lock:
            if sha256 in self._items:
                self._items.move_to_end(sha256)
                return
            self._items[sha256] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def discard(self, sha256: str) -> None:
        with self._lock:
            data = self._items.pop(sha256, None)
            if data is not None:
                self._bytes -= len(data)

    @property
    def size_bytes(self) -> int:
        return self._bytes


# ------------------------------------------------------------------------------ decode workers


class Rebuilder(Protocol):
    def rebuild(self, object_key: str, timeout: float) -> bytes:
        """The original file of a record.  Raises CorruptRecord, TimeoutError, or others (transient)."""

    def close(self) -> None: ...


def call_by_name(module: str, name: str, *args: Any) -> Any:
    """Pool entry point: the function is imported in the child, so this process never imports it."""
    return getattr(importlib.import_module(module), name)(*args)


def _init_decode_process(settings_json: str, threads: int) -> None:
    os.environ["ARCHIVE_WORKER_THREADS"] = str(threads)
    call_by_name("worker.retrieval", "init_process", settings_json)


class LocalRebuilder:
    """Decode processes beside the service (embedded mode): torch loads there, not here."""

    def __init__(self, settings: Settings, processes: int, threads: int) -> None:
        self._settings_json = settings.model_dump_json()
        self._processes, self._threads = processes, threads
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self._processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_decode_process,
            initargs=(self._settings_json, self._threads),
        )
        for _ in range(self._processes):  # start the processes (and load the model) now, not on first use
            pool.submit(call_by_name, "worker.retrieval", "warm_up")
        return pool

    def rebuild(self, object_key: str, timeout: float) -> bytes:
        with self._lock:
            pool = self._pool
        try:
            future = pool.submit(call_by_name, "worker.retrieval", "rebuild_object", object_key)
        except concurrent.futures.process.BrokenProcessPool as exc:
            self._replace(pool)
            raise RetrieveUnavailable("decode worker pool broken; restarted") from exc
        try:
            status, payload = future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise
        except concurrent.futures.process.BrokenProcessPool as exc:
            self._replace(pool)
            raise RetrieveUnavailable("a decode worker died; restarted") from exc
        if status == "corrupt":
            raise CorruptRecord(payload)
        if status == "missing":
            raise CorruptRecord("archived object missing from the store")
        return payload  # type: ignore[no-any-return]

    def _replace(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = self._new_pool()
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class CeleryRebuilder:
    """Decode on the worker fleet (distributed mode); the result travels through the Redis backend."""

    def __init__(self, broker_url: str) -> None:
        from celery import Celery

        self._app = Celery("lvpnet_archive_client", broker=broker_url, backend=broker_url)
        self._app.conf.broker_connection_retry_on_startup = True
        self._app.conf.result_expires = 600

    def rebuild(self, object_key: str, timeout: float) -> bytes:
        try:
            result = self._app.send_task(REBUILD_TASK, args=[object_key], queue="retrieve")
        except Exception as exc:
            raise RetrieveUnavailable(f"broker unreachable ({type(exc).__name__})") from exc
        try:
            status, payload = result.get(timeout=timeout, propagate=True, disable_sync_subtasks=False)
        except Exception as exc:
            if type(exc).__name__ == "TimeoutError":
                result.revoke()
                raise TimeoutError from exc
            raise RetrieveUnavailable(f"decode task failed ({type(exc).__name__})") from exc
        finally:
            result.forget() if result.ready() else None
        if status == "corrupt":
            raise CorruptRecord(payload)
        if status == "missing":
            raise CorruptRecord("archived object missing from the store")
        return base64.b64decode(payload)

    def close(self) -> None:
        self._app.close()


def make_rebuilder(settings: Settings) -> Rebuilder:
    if settings.broker_url:
        return CeleryRebuilder(settings.broker_url)
    return LocalRebuilder(settings, settings.retrieve_workers, settings.retrieve_threads)


# ------------------------------------------------------------------------------ the retriever


class Retriever:
    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        store: ObjectStore,
        rebuilder_factory: Callable[[], Rebuilder],
    ) -> None:
        self.settings, self.session_factory, self.store = settings, session_factory, store
        self.cache = RebuiltCache(settings.retrieve_cache_bytes)
        self._rebuilder_factory = rebuilder_factory
        self._rebuilder: Rebuilder | None = None
        self._lock = threading.Lock()

    @property
    def rebuilder(self) -> Rebuilder:
        with self._lock:
            if self._rebuilder is None:
                self._rebuilder = self._rebuilder_factory()
            return self._rebuilder

    def start(self) -> None:
        """Start the decode workers now (they take seconds to load the codec)."""
        self.rebuilder  # noqa: B018

    def close(self) -> None:
        with self._lock:
            if self._rebuilder is not None:
                self._rebuilder.close()
                self._rebuilder = None

    def fetch(self, ref: InstanceRef) -> bytes:
        """The original file, byte for byte, SHA-256 checked.  Raises RetrieveError."""
        started = time.perf_counter()
        source = "cache"
        data = self.cache.get(ref.original_sha256)
        if data is None or not self._matches(data, ref):
            data, source = self._load(ref)
            if not self._matches(data, ref):
                self._mark_corrupt(ref, f"{source} bytes differ from the catalogued SHA-256")
                raise CorruptInstance("stored bytes failed SHA-256 verification; instance marked corrupt")
            self.cache.put(ref.original_sha256, data)
        metrics.RETRIEVE_SECONDS.labels(source=source).observe(time.perf_counter() - started)
        return data

    @staticmethod
    def _matches(data: bytes, ref: InstanceRef) -> bool:
        return len(data) == ref.original_bytes and hashlib.sha256(data).hexdigest() == ref.original_sha256

    def _load(self, ref: InstanceRef) -> tuple[bytes, str]:
        if ref.staging_key is not None:
            try:
                return self.store.get_bytes(ref.staging_key), "staging"
            except ObjectNotFoundError:
                # Archived since the row was read: the staged file is deleted last
                ref = self._reread(ref)
            except Exception as exc:
                raise RetrieveUnavailable(f"object store error ({type(exc).__name__})") from exc
        if ref.state == InstanceState.CORRUPT:
            raise CorruptInstance("instance is marked corrupt")
        if ref.object_key is None:
            raise CorruptInstance("instance has neither a staged nor an archived object")
        try:
            return self.rebuilder.rebuild(ref.object_key, self.settings.retrieve_timeout_s), "archive"
        except TimeoutError as exc:
            raise RetrieveTimeout(f"decode took longer than {self.settings.retrieve_timeout_s:g} s") from exc
        except CorruptRecord as exc:
            self._mark_corrupt(ref, str(exc))
            raise CorruptInstance(f"stored record unreadable ({exc}); instance marked corrupt") from exc
        except RetrieveError:
            raise
        except Exception as exc:
            raise RetrieveUnavailable(f"decode failed ({type(exc).__name__})") from exc

    def _reread(self, ref: InstanceRef) -> InstanceRef:
        with self.session_factory() as session:
            instance = session.get(Instance, ref.id)
            if instance is None:
                raise CorruptInstance("instance vanished from the catalog")
            return InstanceRef(
                **{
                    **ref.__dict__,
                    "state": instance.state,
                    "staging_key": None,
                    "object_key": instance.object_key,
                }
            )

    def _mark_corrupt(self, ref: InstanceRef, reason: str) -> None:
        metrics.VERIFICATION_FAILURES.labels(stage="retrieve").inc()
        LOGGER.error("retrieval verification failed", extra=fields(instance=ref.id, reason=reason))
        self.cache.discard(ref.original_sha256)
        with self.session_factory() as session:
            instance = session.get(Instance, ref.id)
            if instance is not None and instance.state in (InstanceState.ARCHIVED, InstanceState.FAILED):
                instance.state = InstanceState.CORRUPT
                instance.failure_reason = reason[:1000]
                session.commit()


def settings_from_json(settings_json: str) -> Settings:
    return Settings(**json.loads(settings_json))
