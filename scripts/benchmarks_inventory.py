"""Inventory query benchmark behind `scripts/bench inventory`. Prints figures; asserts nothing.

scripts/bench inventory [--certs 1000000] [--runs 7] [--db URL]
    bulk-loads N synthetic certificate rows (one name each, owners spread over 1,000 teams,
    not_after spread over a year) into SQLite and PostgreSQL, then times, through the same
    functions `certwright inventory` uses (median of --runs after one warm-up run):
    "expiring within 30 days" (first page of 100 + total count), "by owner" (the same, and
      every row of one owner as `certwright inventory --owner` lists them) and "by name".
    PostgreSQL is CERTWRIGHT_TEST_POSTGRES_URL's server (a fresh database, dropped after),
    else a throw-away server started here when the PostgreSQL binaries are installed.
    Then a discovery scan (`certwright discover tls` and its import) of --endpoints loopback
    TLS endpoints (scripts/benchmarks_discovery.py; target <= 30 s for 1,000).
scripts/bench --smoke inventory
    the same with 2,000 rows and 20 endpoints, in seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text

from ca.storage import IssuerRecord, Storage
from ca.storage.inventory import InventoryFilter, count_inventory, list_inventory
from ca.storage.models import Certificate, CertificateName
from scripts.pgdb import fresh_database

TARGET_MS = 100.0
OWNERS = 1000
PAGE = 100
_BATCH = 50_000
_COLUMNS = (
    "id",
    "serial",
    "issuer_id",
    "profile",
    "status",
    "common_name",
    "names",
    "key_type",
    "spki_sha256",
    "not_before",
    "not_after",
    "crl_shard",
    "owner",
    "source",
    "created_at",
    "issued_at",
    "tags",
)


def _name(i: int) -> str:
    return f"host{i}.svc{i % 997}.bench.internal"


def _row(i: int, now: datetime.datetime) -> tuple[Any, ...]:
    """Row i of the synthetic inventory (deterministic, so figures are comparable)."""
    # not_after spread evenly over a year from 10 days ago; 2% revoked; 1 in 50 tagged.
    not_after = now + datetime.timedelta(days=-10 + (i * 7919 % 365_000) / 1000)
    issued = not_after - datetime.timedelta(days=90)
    return (
        i + 1,
        f"{i + 1:032x}",
        "bench-issuer",
        "tls-server",
        "revoked" if i % 50 == 7 else "issued",
        _name(i),
        _name(i),
        "ec-p256",
        f"{i:064x}",
        issued,
        not_after,
        i % 16,
        f"team-{i % OWNERS}",
        "acme:bench" if i % 3 else "cli:bench",
        issued,
        issued,
        ",bench," if i % 50 == 0 else "",
    )


def _batches(count: int, now: datetime.datetime) -> Iterator[list[tuple[Any, ...]]]:
    for start in range(0, count, _BATCH):
        yield [_row(i, now) for i in range(start, min(count, start + _BATCH))]


def _load_core(storage: Storage, count: int, now: datetime.datetime) -> None:
    """Core executemany in big batches (SQLite)."""
    certificates, names = insert(Certificate), insert(CertificateName)
    with storage.engine.connect() as connection:
        # A big page cache keeps the index B-trees in memory while they grow; a bench database
        # need not survive a power loss.
        connection.exec_driver_sql("PRAGMA cache_size=-1000000")
        connection.exec_driver_sql("PRAGMA synchronous=OFF")
        connection.commit()
        for rows in _batches(count, now):
            with connection.begin():
                connection.execute(
                    certificates, [dict(zip(_COLUMNS, r, strict=True)) for r in rows]
                )
                connection.execute(
                    names, [{"id": r[0], "certificate_id": r[0], "name": r[6]} for r in rows]
                )
        with connection.begin():
            connection.execute(text("ANALYZE"))
        connection.exec_driver_sql("PRAGMA synchronous=FULL")
        connection.commit()


def _load_copy(storage: Storage, count: int, now: datetime.datetime) -> None:
    """COPY through psycopg (PostgreSQL): timestamps go in as naive UTC, as UTCDateTime does."""
    raw = storage.engine.raw_connection()
    try:
        connection: Any = raw.driver_connection
        with connection.cursor() as cursor:
            for rows in _batches(count, now):
                with cursor.copy(f"COPY certificates ({', '.join(_COLUMNS)}) FROM STDIN") as copy:
                    for r in rows:
                        copy.write_row(
                            tuple(
                                v.astimezone(datetime.UTC).replace(tzinfo=None)
                                if isinstance(v, datetime.datetime)
                                else v
                                for v in r
                            )
                        )
                with cursor.copy(
                    "COPY certificate_names (id, certificate_id, name) FROM STDIN"
                ) as copy:
                    for r in rows:
                        copy.write_row((r[0], r[0], r[6]))
            for table in ("certificates", "certificate_names"):
                cursor.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608
                    f"(SELECT max(id) FROM {table}))"
                )
        connection.commit()
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE certificates")
            cursor.execute("VACUUM ANALYZE certificate_names")
    finally:
        raw.close()


def _median_ms(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    result = fn()  # warm-up: statement caches, first page-in
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def _verdict(ms: float) -> str:
    return "ok" if ms <= TARGET_MS else "MISSED"


def bench_one(url: str, count: int, runs: int) -> None:
    storage = Storage(url)
    storage.migrate()
    now = datetime.datetime.now(datetime.UTC)
    storage.add_issuer(
        IssuerRecord(
            id="bench-issuer",
            kind="intermediate",
            parent_id=None,
            key_label=None,
            key_type="ec-p256",
            subject="CN=bench issuer",
            ski="00",
            spki_sha256="0" * 64,
            cert_der=b"",
            not_before=now - datetime.timedelta(days=1),
            not_after=now + datetime.timedelta(days=800),
            status="active",
        )
    )
    start = time.perf_counter()
    if storage.dialect == "postgresql":
        _load_copy(storage, count, now)
    else:
        _load_core(storage, count, now)
    load = time.perf_counter() - start
    print(
        f"inventory benchmark: {count:,} certificates, database={storage.dialect}, "
        f"load {load:.1f} s ({count / load:,.0f} rows/s), median of {runs} runs, "
        f"target {TARGET_MS:g} ms"
    )
    expiring = InventoryFilter(expiring_within=datetime.timedelta(days=30), limit=PAGE)

    def expiring_page_and_count() -> tuple[int, int]:
        page = list_inventory(storage, expiring)
        return len(page), count_inventory(storage, expiring)

    owner = f"team-{OWNERS // 2 + 7}"
    by_owner = InventoryFilter(owner=owner, limit=PAGE)

    def owner_page_and_count() -> tuple[int, int]:
        page = list_inventory(storage, by_owner)
        return len(page), count_inventory(storage, by_owner)

    name = _name(count // 2 + 3)
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("expiring within 30 days: first page + total", expiring_page_and_count),
        ("  of which the first page", lambda: len(list_inventory(storage, expiring))),
        ("  of which the total count", lambda: count_inventory(storage, expiring)),
        (f"by owner ({owner}): first page + total", owner_page_and_count),
        (
            "  every row of that owner (limit 1000)",
            lambda: len(list_inventory(storage, _owner(owner))),
        ),
        (f"by name ({name})", lambda: len(list_inventory(storage, InventoryFilter(name=name)))),
    ]
    for label, fn in cases:
        ms, result = _median_ms(fn, runs)
        shown = f"{result[0]} rows of {result[1]:,}" if isinstance(result, tuple) else result
        flag = "" if label.startswith("  ") else f"  [{_verdict(ms)}]"
        print(f"  {label:52} {ms:9.2f} ms   -> {shown}{flag}")
    storage.dispose()


def _owner(owner: str) -> InventoryFilter:
    return InventoryFilter(owner=owner, limit=1000)


@contextlib.contextmanager
def _postgres_admin_url() -> Iterator[str | None]:
    """The test server's URL, else a throw-away server (like scripts/lib/postgres.sh)."""
    url = os.environ.get("CERTWRIGHT_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins or os.geteuid() == 0:
        yield None  # as root, initdb needs runuser: scripts/lib/postgres.sh handles that
        return
    directory = Path(tempfile.mkdtemp(prefix="certwright-bench-pg-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = bins[-1]
    data = directory / "data"
    try:
        subprocess.run(
            [bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                bin_dir / "pg_ctl",
                "-D",
                data,
                "-l",
                directory / "server.log",
                "-w",
                "-o",
                f"-p {port} -k {directory} -c listen_addresses=127.0.0.1",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(directory, ignore_errors=True)


def bench_inventory(count: int, runs: int, db_url: str | None) -> None:
    if db_url:
        bench_one(db_url, count, runs)
        return
    with tempfile.TemporaryDirectory(prefix="certwright-bench-inv-") as tmp:
        bench_one(f"sqlite:///{Path(tmp) / 'inventory.db'}", count, runs)
    with _postgres_admin_url() as admin:
        if admin is None:
            print("inventory benchmark: PostgreSQL skipped (set CERTWRIGHT_TEST_POSTGRES_URL)")
            return
        with fresh_database(admin, "cw_bench") as url:
            bench_one(url, count, runs)


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("inventory", help="inventory queries over N certificates")
    parser.add_argument("--certs", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--db", help="only this database URL (default: SQLite and PostgreSQL)")
    parser.add_argument("--endpoints", type=int, default=1000, help="for the discovery scan")


def dispatch(args: Any) -> None:
    if args.bench == "inventory":
        bench_inventory(2000 if args.smoke else args.certs, args.runs, args.db)
        from scripts.benchmarks_discovery import bench_discovery

        bench_discovery(20 if args.smoke else args.endpoints)
