"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from ca.storage import Storage
from ca.storage.models import Base

pytestmark = pytest.mark.integration


def test_migrations_match_the_models(db_url: str) -> None:
    storage = Storage(db_url)
    storage.migrate()
    with storage.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        differences = compare_metadata(context, Base.metadata)
    storage.dispose()
    assert differences == []
