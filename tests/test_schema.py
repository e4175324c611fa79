"""The Alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from kms.models import Base
from kms.schema import upgrade


def _diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        upgrade(engine)
        upgrade(engine)  # idempotent
        with engine.connect() as conn:
            return list(compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata))
    finally:
        engine.dispose()


def test_migrations_match_the_models_on_sqlite(tmp_path: Path) -> None:
    assert _diff(f"sqlite:///{tmp_path / 'schema.sqlite3'}") == []


def test_migrations_match_the_models_on_postgresql(postgres_url) -> None:  # type: ignore[no-untyped-def]
    assert _diff(postgres_url) == []
