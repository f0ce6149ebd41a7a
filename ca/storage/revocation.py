"""Storage for revocation publishing: CRL shards, pre-signed OCSP responses, OCSP responders.

Functions, not a second storage class: each takes the one `Storage` and runs in its
transactions, so the rule "all persistent state goes through one storage layer" holds. The
responder's read path uses prebuilt Core statements: building a statement costs more than
running it, and OCSP answers thousands of lookups a second (DESIGN.md §6).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, func, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite

from ca.errors import CAError, Kind
from ca.storage import audit
from ca.storage.models import Certificate, Crl, OcspResponder, OcspResponse
from ca.storage.prepared import Prepared
from ca.storage.store import Storage, _database_errors

_PRESIGNED = Prepared(
    select(OcspResponse.der, OcspResponse.this_update, OcspResponse.next_update).where(
        OcspResponse.issuer_id == bindparam("issuer_id"),
        OcspResponse.serial == bindparam("serial"),
    )
)
_CERTIFICATE_STATUS = Prepared(
    select(
        Certificate.issuer_id,
        Certificate.serial,
        Certificate.status,
        Certificate.not_after,
        Certificate.revoked_at,
        Certificate.revocation_reason,
    ).where(Certificate.serial == bindparam("serial"))
)


@dataclasses.dataclass(frozen=True)
class CrlMeta:
    """The newest CRL of one shard, without its DER."""

    id: int
    number: int
    this_update: datetime.datetime
    next_update: datetime.datetime


@dataclasses.dataclass(frozen=True)
class RevokedEntry:
    id: int
    serial: str
    revoked_at: datetime.datetime
    reason: int | None


@dataclasses.dataclass(frozen=True)
class CertificateStatus:
    """What OCSP needs to know of one certificate (RFC 6960 §2.2)."""

    issuer_id: str
    serial: str
    status: str  # pending | issued | revoked | failed
    not_after: datetime.datetime
    revoked_at: datetime.datetime | None
    revocation_reason: int | None


@dataclasses.dataclass(frozen=True)
class PresignedResponse:
    der: bytes
    this_update: datetime.datetime
    next_update: datetime.datetime


@dataclasses.dataclass(frozen=True)
class OcspRow:
    """A signed response to store: one per (issuer, serial)."""

    issuer_id: str
    serial: str
    cert_status: str  # good | revoked
    der: bytes
    this_update: datetime.datetime
    next_update: datetime.datetime
    produced_at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class ResponderRecord:
    id: int
    issuer_id: str
    key_label: str
    cert_der: bytes
    not_before: datetime.datetime
    not_after: datetime.datetime


@contextmanager
def _reading(storage: Storage) -> Iterator[Connection]:
    """A Core connection for read-only hot paths; failures become CAError(STORAGE)."""
    with storage.read() as connection:
        yield connection


# -- CRLs ---------------------------------------------------------------------------------------


def latest_crls(storage: Storage, issuer_id: str) -> dict[int, CrlMeta]:
    """The newest CRL of every shard of an issuer (shard -1 included when there is one)."""
    newest = (
        select(Crl.shard, func.max(Crl.number).label("number"))
        .where(Crl.issuer_id == issuer_id)
        .group_by(Crl.shard)
        .subquery()
    )
    query = select(Crl.id, Crl.shard, Crl.number, Crl.this_update, Crl.next_update).join(
        newest,
        and_(
            Crl.issuer_id == issuer_id,
            Crl.shard == newest.c.shard,
            Crl.number == newest.c.number,
        ),
    )
    with storage.transaction() as session:
        return {
            row.shard: CrlMeta(row.id, row.number, row.this_update, row.next_update)
            for row in session.execute(query)
        }


def crl_der(storage: Storage, crl_id: int) -> bytes:
    with storage.transaction() as session:
        der = session.scalar(select(Crl.der).where(Crl.id == crl_id))
        if der is None:
            raise CAError(Kind.NOT_FOUND, f"no CRL with id {crl_id}")
        return der


def revoked_fingerprints(
    storage: Storage, issuer_id: str, now: datetime.datetime
) -> dict[int, tuple[int, int]]:
    """Per shard, (count, sum of row ids) of revoked certificates not yet expired.

    A revocation adds a row and an expiry removes one, so either changes this pair: comparing
    it with the pair recorded when a shard was signed tells whether the shard is stale without
    reading its entries.
    """
    query = (
        select(Certificate.crl_shard, func.count(), func.sum(Certificate.id))
        .where(
            Certificate.issuer_id == issuer_id,
            Certificate.status == "revoked",
            Certificate.not_after > now,
        )
        .group_by(Certificate.crl_shard)
    )
    with storage.transaction() as session:
        return {shard: (int(n), int(total or 0)) for shard, n, total in session.execute(query)}


def certificate_shards(storage: Storage, issuer_id: str) -> set[int]:
    """Every shard an issuer's certificates name, whatever `ca.crl_shards` says today."""
    query = select(Certificate.crl_shard).where(Certificate.issuer_id == issuer_id).distinct()
    with storage.transaction() as session:
        return set(session.scalars(query))


def revoked_entries(
    storage: Storage, issuer_id: str, shard: int, now: datetime.datetime
) -> list[RevokedEntry]:
    """The revoked, unexpired certificates of one shard (RFC 5280 §5.1.2.6 keeps an entry at
    least until the certificate expires; after that it may go)."""
    query = select(
        Certificate.id,
        Certificate.serial,
        Certificate.revoked_at,
        Certificate.revocation_reason,
    ).where(
        Certificate.issuer_id == issuer_id,
        Certificate.crl_shard == shard,
        Certificate.status == "revoked",
        Certificate.not_after > now,
    )
    with _reading(storage) as connection:
        return [
            RevokedEntry(row[0], row[1], row[2] or now, row[3]) for row in connection.execute(query)
        ]


def revoked_entries_by_shard(
    storage: Storage, issuer_id: str, now: datetime.datetime
) -> dict[int, list[RevokedEntry]]:
    """`revoked_entries` for every shard of an issuer in one pass: when most shards are due
    (a forced refresh, a first run), one scan beats one index walk per shard."""
    query = select(
        Certificate.crl_shard,
        Certificate.id,
        Certificate.serial,
        Certificate.revoked_at,
        Certificate.revocation_reason,
    ).where(
        Certificate.issuer_id == issuer_id,
        Certificate.status == "revoked",
        Certificate.not_after > now,
    )
    out: dict[int, list[RevokedEntry]] = {}
    with _reading(storage) as connection:
        for row in connection.execute(query.execution_options(yield_per=10000)):
            out.setdefault(row[0], []).append(RevokedEntry(row[1], row[2], row[3] or now, row[4]))
    return out


@contextmanager
def crl_signing_lock(storage: Storage, issuer_id: str, shard: int) -> Iterator[None]:
    """Hold the right to sign one shard's next CRL, across processes sharing the database.

    On PostgreSQL, a transaction-level advisory lock keyed by (issuer, shard): a second signer
    waits, then re-reads the shard and signs only if still needed, so the issuer key never
    signs a CRL whose number another process has taken. SQLite has one writer at a time and
    the UNIQUE (issuer, shard, number) constraint still picks one winner; no lock is taken.
    """
    if storage.dialect != "postgresql":
        yield
        return
    key = _advisory_key(f"crl:{issuer_id}:{shard}")
    with _database_errors(), storage.engine.connect() as connection, connection.begin():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        yield


def _advisory_key(name: str) -> int:
    """A PostgreSQL advisory lock key (a signed 64-bit integer) for a name."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextmanager
def ocsp_refresh_turn(storage: Storage) -> Iterator[bool]:
    """Whether this process refreshes the pre-signed OCSP responses now (True) or another one
    is already at it (False: skip this round; it signs what is due, and the next round of
    this process sees anything it missed).

    Several `certwright serve` job processes can share one PostgreSQL database; without this,
    each would sign every due response at once and all but one signature would be thrown
    away. A transaction-level advisory lock, tried rather than waited for, held for the
    refresh. SQLite serves one host, whose job processes race only harmlessly: always True.
    """
    if storage.dialect != "postgresql":
        yield True
        return
    with _database_errors(), storage.engine.connect() as connection, connection.begin():
        got = connection.execute(
            text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _advisory_key("ocsp-refresh")}
        ).scalar()
        yield bool(got)


def insert_crl(
    storage: Storage,
    issuer_id: str,
    shard: int,
    number: int,
    this_update: datetime.datetime,
    next_update: datetime.datetime,
    der: bytes,
    actor: str,
) -> int:
    """Store a signed CRL. UNIQUE (issuer, shard, number) makes a number single-use: a second
    process publishing the same number gets CAError(CONFLICT) and retries with the next."""
    with storage.transaction() as session:
        row = Crl(
            issuer_id=issuer_id,
            shard=shard,
            number=number,
            this_update=this_update,
            next_update=next_update,
            der=der,
        )
        session.add(row)
        session.flush()
        audit.append(
            session,
            audit.values(
                storage.clock.now(),
                actor,
                "crl.sign",
                f"issuer:{issuer_id}/shard:{shard}",
                "success",
                {"number": number, "bytes": len(der)},
            ),
        )
        return int(row.id)


# -- OCSP ---------------------------------------------------------------------------------------


def presigned_response(storage: Storage, issuer_id: str, serial: str) -> PresignedResponse | None:
    with _reading(storage) as connection:
        row = _PRESIGNED.run(connection, {"issuer_id": issuer_id, "serial": serial}).first()
    return None if row is None else PresignedResponse(row[0], row[1], row[2])


def certificate_status(storage: Storage, serial: str) -> CertificateStatus | None:
    with _reading(storage) as connection:
        row = _CERTIFICATE_STATUS.run(connection, {"serial": serial}).first()
    return None if row is None else CertificateStatus(*row)


def due_for_ocsp(
    storage: Storage,
    now: datetime.datetime,
    stale_before: datetime.datetime,
    after_id: int,
    limit: int,
    issuer_ids: Sequence[str],
) -> list[tuple[int, CertificateStatus]]:
    """Unexpired issued/revoked certificates whose pre-signed response is missing, states the
    wrong status, or was produced before `stale_before` (BR 4.9.10 refresh cadence), in id
    order after `after_id` so a caller pages through without seeing a row twice."""
    query = (
        select(
            Certificate.id,
            Certificate.issuer_id,
            Certificate.serial,
            Certificate.status,
            Certificate.not_after,
            Certificate.revoked_at,
            Certificate.revocation_reason,
        )
        .outerjoin(
            OcspResponse,
            and_(
                OcspResponse.issuer_id == Certificate.issuer_id,
                OcspResponse.serial == Certificate.serial,
            ),
        )
        .where(
            Certificate.id > after_id,
            Certificate.status.in_(("issued", "revoked")),
            Certificate.not_after > now,
            Certificate.issuer_id.in_(list(issuer_ids)),
            or_(
                OcspResponse.id.is_(None),
                OcspResponse.this_update <= stale_before,
                OcspResponse.next_update <= now,
                and_(Certificate.status == "revoked", OcspResponse.cert_status != "revoked"),
            ),
        )
        .order_by(Certificate.id)
        .limit(limit)
    )
    with _reading(storage) as connection:
        return [(row[0], CertificateStatus(*row[1:])) for row in connection.execute(query)]


def store_ocsp_responses(storage: Storage, rows: Iterable[OcspRow]) -> None:
    """Upsert pre-signed responses, one per (issuer, serial).

    A concurrent signer may hold an older view of a certificate: the update never turns a
    `revoked` answer back into `good` (RFC 6960 §2.2: revoked is final) and never replaces a
    response with one produced earlier.
    """
    values = [dataclasses.asdict(r) for r in rows]
    if not values:
        return
    dialect_insert: Any = postgresql.insert if storage.dialect == "postgresql" else sqlite.insert
    statement = dialect_insert(OcspResponse).values(values)
    excluded = statement.excluded
    table = OcspResponse.__table__.c
    statement = statement.on_conflict_do_update(
        index_elements=["issuer_id", "serial"],
        set_={
            "cert_status": excluded.cert_status,
            "der": excluded.der,
            "this_update": excluded.this_update,
            "next_update": excluded.next_update,
            "produced_at": excluded.produced_at,
        },
        where=and_(
            or_(table.cert_status != "revoked", excluded.cert_status == "revoked"),
            or_(
                excluded.produced_at >= table.produced_at,
                and_(excluded.cert_status == "revoked", table.cert_status != "revoked"),
            ),
        ),
    )
    with storage.transaction() as session:
        session.execute(statement)


def prune_ocsp_responses(storage: Storage, expired_before: datetime.datetime) -> int:
    """Forget responses whose certificate expired before `expired_before` (nothing to answer)."""
    gone = select(Certificate.serial).where(Certificate.not_after <= expired_before)
    with storage.transaction() as session:
        result = session.execute(
            delete(OcspResponse).where(
                OcspResponse.next_update <= expired_before, OcspResponse.serial.in_(gone)
            ),
            execution_options={"synchronize_session": False},
        )
        return int(result.rowcount)  # type: ignore[attr-defined]  # CursorResult has rowcount


def ocsp_responses(storage: Storage) -> Iterator[tuple[str, str, bytes]]:
    """Every stored response as (issuer, serial, DER), for publishing to a directory."""
    query = select(OcspResponse.issuer_id, OcspResponse.serial, OcspResponse.der).order_by(
        OcspResponse.id
    )
    with _reading(storage) as connection:
        for row in connection.execute(query.execution_options(yield_per=1000)):
            yield row[0], row[1], row[2]


def current_responder(
    storage: Storage, issuer_id: str, valid_after: datetime.datetime
) -> ResponderRecord | None:
    """The delegated responder of an issuer valid longest, if it is still valid at
    `valid_after`."""
    query = (
        select(OcspResponder)
        .where(OcspResponder.issuer_id == issuer_id, OcspResponder.not_after > valid_after)
        .order_by(OcspResponder.not_after.desc(), OcspResponder.id.desc())
        .limit(1)
    )
    with storage.transaction() as session:
        row = session.scalar(query)
        if row is None:
            return None
        return ResponderRecord(
            row.id, row.issuer_id, row.key_label, row.cert_der, row.not_before, row.not_after
        )


def add_responder(
    storage: Storage,
    issuer_id: str,
    key_label: str,
    cert_der: bytes,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    actor: str,
) -> None:
    with storage.transaction() as session:
        session.add(
            OcspResponder(
                issuer_id=issuer_id,
                key_label=key_label,
                cert_der=cert_der,
                not_before=not_before,
                not_after=not_after,
                created_at=storage.clock.now(),
            )
        )
    storage.audit(
        actor,
        "ocsp.responder",
        f"issuer:{issuer_id}",
        "success",
        {"key_label": key_label, "not_after": not_after.isoformat()},
    )
