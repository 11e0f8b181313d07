"""The objects one service process shares: settings, catalog, store, ingestor."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.audit import Auditor
from service.config import Settings
from service.db import make_engine, make_session_factory
from service.ingest import Ingestor
from service.queue import make_enqueue
from service.retrieve import Retriever, make_rebuilder
from service.security import session_secret
from service.storage import ObjectStore, open_store


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    store: ObjectStore
    ingestor: Ingestor
    retriever: Retriever
    auditor: Auditor
    session_secret: bytes

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        settings.incoming_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.resolved_database_url())
        session_factory = make_session_factory(engine)
        store = open_store(settings.resolved_storage_url(), settings)
        ingestor = Ingestor(settings, session_factory, store, make_enqueue(settings.broker_url))
        retriever = Retriever(settings, session_factory, store, lambda: make_rebuilder(settings))
        secret = session_secret(settings.session_secret, settings.data_dir)
        return cls(settings, engine, session_factory, store, ingestor, retriever, Auditor(session_factory), secret)

    def close(self) -> None:
        self.retriever.close()
        self.engine.dispose()
