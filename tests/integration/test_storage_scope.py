"""Storage.scope(): within one request, read(), write() and _core() share a connection per
engine, and each write is still its own transaction, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest
from sqlalchemy import bindparam, event, insert, literal_column, select

from ca.errors import CAError, Kind
from ca.storage import Storage
from ca.storage.models import AcmeNonce
from ca.storage.prepared import Prepared

NOW = datetime.datetime(2026, 12, 2, 12, 0, tzinfo=datetime.UTC)
USE = Prepared(insert(AcmeNonce))
USED = Prepared(select(AcmeNonce.value).where(AcmeNonce.value == bindparam("value")))
BROKEN = Prepared(select(literal_column("no_such_column")).select_from(AcmeNonce.__table__))


@pytest.fixture
def db(db_url: str) -> Iterator[Storage]:
    storage = Storage(db_url)
    storage.migrate()
    yield storage
    storage.dispose()


def checkouts(storage: Storage) -> list[object]:
    """Every pool checkout of the storage's engines, as they happen."""
    seen: list[object] = []
    for engine in {storage.engine, storage._relaxed_engine}:
        event.listen(engine, "checkout", lambda dbapi, record, proxy: seen.append(dbapi))
    return seen


def use(connection: object, value: str) -> None:
    USE.run(connection, {"value": value, "expires_at": NOW})  # type: ignore[arg-type]


def used(storage: Storage, value: str) -> bool:
    """Asked on a connection of its own, outside any scope: what others see."""
    fresh = Storage(storage.url)
    try:
        with fresh.read() as connection:
            return USED.run(connection, {"value": value}).first() is not None
    finally:
        fresh.dispose()


def test_a_scope_checks_out_one_connection_per_engine(db: Storage) -> None:
    seen = checkouts(db)
    with db.scope():
        for i in range(3):
            with db.read() as connection:
                USED.run(connection, {"value": "x"})
            with db.write() as connection:
                use(connection, f"durable-{i}")
            with db.write(durable=False) as connection:
                use(connection, f"relaxed-{i}")
            with db._core(flush_log=False) as connection:
                use(connection, f"core-{i}")
    engines = 2 if db._relaxed_engine is not db.engine else 1
    assert len(seen) == engines
    assert db.engine.pool.checkedout() == 0  # given back when the scope ended
    assert db._relaxed_engine.pool.checkedout() == 0


def test_outside_a_scope_each_call_checks_out_its_own(db: Storage) -> None:
    seen = checkouts(db)
    for _ in range(3):
        with db.read() as connection:
            USED.run(connection, {"value": "x"})
    assert len(seen) == 3


def test_each_write_commits_when_it_ends_not_when_the_scope_does(db: Storage) -> None:
    with db.scope():
        with db.write() as connection:
            use(connection, "first")
        assert used(db, "first")
        with db.read() as connection:  # a read begins nothing that would hold the next write
            assert USED.run(connection, {"value": "first"}).first()
            connection.execute(select(AcmeNonce.value))  # SQLAlchemy begins a transaction here
        with db.write(durable=False) as connection:
            use(connection, "second")
        assert used(db, "second")


def test_a_failed_write_rolls_back_and_the_next_one_works(db: Storage) -> None:
    with db.scope():
        with pytest.raises(CAError) as raised, db.write() as connection:
            use(connection, "kept-out")
            use(connection, "twice")
            use(connection, "twice")  # the primary key refuses it
        assert raised.value.kind is Kind.CONFLICT
        with db.write() as connection:
            use(connection, "after")
    assert not used(db, "kept-out")
    assert used(db, "after")


def test_a_call_nested_in_a_write_gets_a_connection_of_its_own(db: Storage) -> None:
    with db.scope():
        with db.write(durable=False) as outer:
            use(outer, "uncommitted")
            with db.read() as inner:
                assert inner is not outer
                # As outside a scope: another connection does not see the open transaction.
                assert not USED.run(inner, {"value": "uncommitted"}).first()
        with db.read() as connection:
            assert USED.run(connection, {"value": "uncommitted"}).first()


def test_scopes_nest_and_the_outermost_gives_the_connection_back(db: Storage) -> None:
    seen = checkouts(db)
    with db.scope():
        with db.scope(), db.read() as connection:
            USED.run(connection, {"value": "x"})
        with db.read() as connection:
            USED.run(connection, {"value": "x"})
        assert db.engine.pool.checkedout() == 1
    assert len(seen) == 1
    assert db.engine.pool.checkedout() == 0


def test_a_connection_invalidated_in_a_scope_is_replaced(db: Storage) -> None:
    with db.scope():
        with db.read() as connection:
            first = connection
            connection.invalidate()
        with db.write() as connection:
            assert connection is not first
            use(connection, "replaced")
    assert used(db, "replaced")


def test_a_failed_read_gives_its_connection_back_and_the_next_call_works(db: Storage) -> None:
    seen = checkouts(db)
    with db.scope():
        with pytest.raises(CAError), db.read() as connection:
            # A statement the database refuses, run as the per-request paths run theirs:
            # PostgreSQL aborts the transaction it began, which SQLAlchemy never saw.
            BROKEN.run(connection, {})
        with db.write() as connection:
            use(connection, "after-a-failed-read")
        with db.read() as connection:
            assert USED.run(connection, {"value": "after-a-failed-read"}).first()
    assert len(seen) == 2  # the failed read's connection was not lent again
    assert used(db, "after-a-failed-read")
