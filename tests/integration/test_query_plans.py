"""The per-request statements of the ACME store and the issuance path find their rows through
an index on what they match, on SQLite with no table statistics (a fresh database).

A plan that walks a table, or searches on a status alone, costs more with every certificate
ever issued: found once for the CAA recheck at finalize, which walked every valid challenge.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Delete, Insert, Select, Update
from sqlalchemy.sql import ClauseElement

import ca.storage.acme_store
import ca.storage.revocation
import ca.storage.store
from ca.storage import Storage
from ca.storage.prepared import Prepared

MODULES = (ca.storage.acme_store, ca.storage.store, ca.storage.revocation)


def prebuilt_statements() -> list[tuple[str, ClauseElement]]:
    found = []
    for module in MODULES:
        for name, value in vars(module).items():
            statement = value.statement if isinstance(value, Prepared) else value
            if name.startswith("_") and isinstance(statement, (Select, Update, Delete, Insert)):
                found.append((f"{module.__name__}.{name}", statement))
    return found


STATEMENTS = prebuilt_statements()


def test_the_hot_statements_are_found() -> None:
    names = {name.rsplit(".", 1)[1] for name, _ in STATEMENTS}
    assert {"_ORDER_VALIDATIONS", "_COMPROMISED", "_AUTHZ_CHALLENGES"} <= names


@pytest.mark.parametrize(("name", "statement"), STATEMENTS, ids=[n for n, _ in STATEMENTS])
def test_statement_uses_an_index_on_what_it_matches(
    tmp_path: Path, name: str, statement: ClauseElement
) -> None:
    storage = Storage(f"sqlite:///{tmp_path}/plans.db")
    try:
        storage.migrate()
        sql = str(statement.compile(storage.engine))
        with storage.engine.connect() as connection:
            plan = [
                row[3]
                for row in connection.exec_driver_sql(
                    "EXPLAIN QUERY PLAN " + sql, ("x",) * sql.count("?")
                )
            ]
    finally:
        storage.dispose()
    walks = [step for step in plan if step.startswith("SCAN ")]
    by_status_alone = [step for step in plan if "(status=?)" in step]
    assert not walks and not by_status_alone, f"{name}: {plan}"
