"""`scripts/bench statements`: one prebuilt statement through SQLAlchemy's Connection.execute
and through ca.storage.prepared.Prepared, on the same database, in one process.

Two rows per statement: an account look-up by primary key on an open connection, and a whole
write transaction that records a used nonce (what every signed ACME request does), each run n
times. The figures are printed; nothing about time is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import secrets
import tempfile
import time
from collections.abc import Callable
from typing import Any

from ca.storage import Storage, acme_store
from ca.storage.prepared import Prepared


def _per_call(n: int, call: Callable[[], Any]) -> float:
    call()  # compiled and cached before the clock starts
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n * 1e6


def bench_statements(n: int, db_url: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="certwright-bench-sql-") as tmp:
        storage = Storage(db_url or f"sqlite:///{tmp}/bench.db")
        try:
            storage.migrate()
            store = acme_store.AcmeStore(storage)
            account, _ = store.create_account(
                thumbprint=secrets.token_hex(16),
                jwk={"kty": "EC", "crv": "P-256", "x": "bench", "y": "bench"},
                contact=(),
                tos_agreed=True,
                eab_key_id=None,
                ip="127.0.0.1",
            )
            print(f"statement benchmark: n={n} per row, database={storage.dialect}")
            read: Prepared = acme_store._ACCOUNT_BY_ID
            with storage.read() as connection:
                core = _per_call(
                    n, lambda: connection.execute(read.statement, {"id": account.id}).first()
                )
                fast = _per_call(n, lambda: read.run(connection, {"id": account.id}).first())
            print(f"  account by id    Connection.execute {core:7.1f} µs  Prepared {fast:7.1f} µs")

            use: Prepared = acme_store._USE_NONCE
            expires = datetime.datetime.now(datetime.UTC)

            def nonce_core() -> None:
                with storage.write(durable=False) as connection:
                    connection.execute(
                        use.statement, {"value": secrets.token_hex(16), "expires_at": expires}
                    )

            def nonce_fast() -> None:
                with storage.write(durable=False) as connection:
                    use.run(connection, {"value": secrets.token_hex(16), "expires_at": expires})

            core, fast = _per_call(n, nonce_core), _per_call(n, nonce_fast)
            print(f"  nonce write txn  Connection.execute {core:7.1f} µs  Prepared {fast:7.1f} µs")
        finally:
            storage.dispose()


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("statements", help="a prebuilt statement: Core vs Prepared")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--db", help="database URL (default: a temporary SQLite file)")


def dispatch(args: argparse.Namespace) -> None:
    if args.bench == "statements":
        bench_statements(200 if args.smoke else args.n, args.db)
