"""Alembic environment: migrations run on the connection Storage.migrate() hands in."""

from alembic import context

from ca.storage.models import Base

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only via Storage.migrate()
    raise RuntimeError("run migrations through `certwright db upgrade`")
context.configure(
    connection=connection,
    target_metadata=target_metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
