"""ca.storage.prepared: a prebuilt statement run on the driver's cursor gives what
Connection.execute gives, inside the caller's transaction, with SQLAlchemy's errors."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest
from sqlalchemy import Insert, bindparam, insert, select, update
from sqlalchemy.exc import ArgumentError, IntegrityError

import ca.storage.acme_store
import ca.storage.audit
import ca.storage.revocation
import ca.storage.store
from ca.errors import CAError, Kind
from ca.storage import Storage
from ca.storage.models import AcmeAccount, AcmeAuthorization, AcmeNonce
from ca.storage.prepared import Prepared

NOW = datetime.datetime(2026, 12, 1, 12, 30, 15, 123456, tzinfo=datetime.UTC)


@pytest.fixture
def db(db_url: str) -> Iterator[Storage]:
    storage = Storage(db_url)
    storage.migrate()
    with storage.write() as connection:
        connection.execute(
            insert(AcmeAccount),
            {
                "id": 7,
                "key_thumbprint": "thumb",
                "jwk": '{"kty": "EC"}',
                "status": "valid",
                "contact": "[]",
                "tos_agreed": True,
                "created_ip": "127.0.0.1",
                "created_at": NOW,
            },
        )
    yield storage
    storage.dispose()


def authz(id_: str, **overrides: object) -> dict[str, object]:
    return {
        "id": id_,
        "account_id": 7,
        "identifier_type": "dns",
        "identifier_value": f"{id_}.test",
        "status": "pending",
        "expires": NOW + datetime.timedelta(days=7),
        "validated_at": None,
        "created_at": NOW,
    } | overrides


INSERT_AUTHZ = Prepared(insert(AcmeAuthorization))
AUTHZ = Prepared(select(AcmeAuthorization.__table__).where(AcmeAuthorization.id == bindparam("id")))


def test_rows_equal_what_connection_execute_returns(db: Storage) -> None:
    with db.write() as connection:
        INSERT_AUTHZ.run(connection, authz("a1", wildcard=True, validated_at=NOW))
    with db.read() as connection:
        fast = AUTHZ.run(connection, {"id": "a1"}).one()
        core = connection.execute(AUTHZ.statement, {"id": "a1"}).one()
    assert tuple(fast) == tuple(core)
    assert fast._fields == tuple(core._fields)
    assert fast.validated_at == NOW and fast.validated_at.tzinfo is datetime.UTC
    assert fast.wildcard is True  # SQLite's 1 converted as the Boolean column says


def test_a_constant_column_default_is_applied_when_a_value_is_left_out(db: Storage) -> None:
    with db.write() as connection:
        INSERT_AUTHZ.run(connection, authz("a2"))  # no "wildcard": its default is False
    with db.read() as connection:
        assert AUTHZ.run(connection, {"id": "a2"}).one().wildcard is False


def test_several_parameter_sets_insert_every_row(db: Storage) -> None:
    with db.write() as connection:
        INSERT_AUTHZ.run(connection, [authz(f"m{i}") for i in range(5)])
    with db.read() as connection:
        ids = Prepared(select(AcmeAuthorization.id)).run(connection).scalars()
    assert sorted(ids) == [f"m{i}" for i in range(5)]


def test_rowcount_and_returning(db: Storage) -> None:
    bump = Prepared(
        update(AcmeAuthorization)
        .where(AcmeAuthorization.id == bindparam("b_id"), AcmeAuthorization.status == "pending")
        .values(status="valid", validated_at=bindparam("b_now"))
        .returning(AcmeAuthorization.validated_at)
    )
    with db.write() as connection:
        INSERT_AUTHZ.run(connection, authz("r1"))
        first = bump.run(connection, {"b_id": "r1", "b_now": NOW})
        again = bump.run(connection, {"b_id": "r1", "b_now": NOW})
    assert first.scalar() == NOW and first.rowcount == 1
    assert again.first() is None and again.rowcount == 0


def test_a_bind_parameters_default_applies_unless_the_caller_gives_one(db: Storage) -> None:
    by_status = Prepared(
        select(AcmeAuthorization.id).where(
            AcmeAuthorization.status == bindparam("status", value="pending")
        )
    )
    with db.write() as connection:
        INSERT_AUTHZ.run(connection, authz("d1"))
    with db.read() as connection:
        assert by_status.run(connection).scalars() == ["d1"]
        assert by_status.run(connection, {"status": "valid"}).scalars() == []


def test_it_runs_inside_the_callers_transaction(db: Storage) -> None:
    with pytest.raises(RuntimeError), db.write() as connection:
        INSERT_AUTHZ.run(connection, authz("gone"))
        raise RuntimeError("rolled back")
    with db.read() as connection:
        assert AUTHZ.run(connection, {"id": "gone"}).first() is None


def test_a_constraint_violation_is_sqlalchemys_integrity_error(db: Storage) -> None:
    use = Prepared(insert(AcmeNonce))
    values = {"value": "n1", "expires_at": NOW}
    with db.write() as connection:
        use.run(connection, values)
    with pytest.raises(IntegrityError), db.engine.begin() as connection:
        use.run(connection, values)
    # ... which Storage turns into a conflict, as a used nonce needs.
    with pytest.raises(CAError) as caught, db.write() as connection:
        use.run(connection, values)
    assert caught.value.kind is Kind.CONFLICT


def test_a_missing_parameter_is_refused(db: Storage) -> None:
    with pytest.raises(ArgumentError, match="'id'"), db.engine.connect() as connection:
        AUTHZ.run(connection, {})


def test_what_it_cannot_run_as_sqlalchemy_would_is_refused_at_first_use(db: Storage) -> None:
    in_list = Prepared(
        select(AcmeAuthorization.id).where(
            AcmeAuthorization.id.in_(bindparam("ids", expanding=True))
        )
    )
    with pytest.raises(ValueError, match="plain values"), db.read() as connection:
        in_list.run(connection, {"ids": ["a"]})


@pytest.mark.parametrize(
    "module", [ca.storage.acme_store, ca.storage.store, ca.storage.revocation, ca.storage.audit]
)
def test_every_prebuilt_statement_compiles_for_this_database(db: Storage, module: object) -> None:
    """Each module's Prepared statements compile (an INSERT with the table's every column)."""
    found = [value for value in vars(module).values() if isinstance(value, Prepared)]
    assert found
    for prepared in found:
        statement = prepared.statement
        keys = frozenset(statement.table.columns.keys()) if isinstance(statement, Insert) else None
        prepared._compile(db.engine.dialect, keys)
