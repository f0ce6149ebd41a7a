"""SQLite write transactions wait for the write lock by trying BEGIN IMMEDIATE again, and give
up with a storage error once the busy timeout is spent."""

from __future__ import annotations

import datetime
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import insert, select

import ca.storage.store
from ca.errors import CAError, Kind
from ca.storage import Storage
from ca.storage.models import AcmeNonce

EXPIRES = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Storage]:
    storage = Storage(f"sqlite:///{tmp_path}/lock.db")
    storage.migrate()
    yield storage
    storage.dispose()


@pytest.fixture
def holder(db: Storage) -> Iterator[sqlite3.Connection]:
    """Another connection, holding the write lock until the test commits it."""
    database = db.engine.url.database
    assert database is not None
    connection = sqlite3.connect(database, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    yield connection
    if connection.in_transaction:
        connection.execute("COMMIT")
    connection.close()


def use_nonce(storage: Storage, value: str) -> None:
    with storage.write(durable=False) as connection:
        connection.execute(insert(AcmeNonce), {"value": value, "expires_at": EXPIRES})


def nonces(storage: Storage) -> list[str]:
    with storage.read() as connection:
        return list(connection.scalars(select(AcmeNonce.value)))


def test_a_write_waits_while_the_lock_is_held_and_commits_once_it_is_free(
    db: Storage, holder: sqlite3.Connection
) -> None:
    done = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            use_nonce(db, "after-the-wait")
        except BaseException as error:  # reported below, on the test's thread
            failures.append(error)
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    assert not done.wait(0.3), "the write went ahead while another connection held the lock"
    holder.execute("COMMIT")
    thread.join(10)
    assert done.is_set() and not failures, failures
    assert nonces(db) == ["after-the-wait"]


def test_a_lock_held_past_the_busy_timeout_is_a_storage_error(
    db: Storage, holder: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ca.storage.store, "_BUSY_TIMEOUT_MS", 200)
    with pytest.raises(CAError) as caught:
        use_nonce(db, "never")
    assert caught.value.kind is Kind.STORAGE
    assert "locked" in caught.value.detail
    holder.execute("COMMIT")
    assert nonces(db) == []
    use_nonce(db, "later")  # the connection went back to the pool usable
    assert nonces(db) == ["later"]
