"""The audit log: append-only records chained by SHA-256.

Each record's `hash` covers its sequence number, the previous record's hash and every field, so
`verify()` finds any edited, deleted, inserted or reordered record, and comparing the chain's
head row with the last record finds records cut off the end. Whoever can rewrite the whole
table can also rewrite the whole chain; `verify(anchor=...)` checks a head printed earlier and
kept elsewhere (a ticket, a log server), which closes that gap for everything before it.

Appending is two statements around the insert: bump the head row (which takes the write lock on
SQLite and the row lock on PostgreSQL, so every process chains in commit order), insert, then
store the new head hash. It runs inside the caller's transaction, so a record and the change it
describes commit together or not at all.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, text, update
from sqlalchemy.orm import Session

from ca.errors import CAError, Kind
from ca.storage.models import AuditChainHead, AuditEvent
from ca.storage.prepared import Prepared

GENESIS = "0" * 64

_BUMP = Prepared(
    update(AuditChainHead)
    .where(AuditChainHead.id == 1)
    .values(seq=AuditChainHead.seq + 1)
    .returning(AuditChainHead.seq, AuditChainHead.hash)
)
_SET_HEAD = Prepared(
    update(AuditChainHead).where(AuditChainHead.id == 1).values(hash=bindparam("h"))
)
_INSERT = Prepared(insert(AuditEvent))
_BATCH = 5000


def record_hash(
    seq: int,
    prev_hash: str,
    time: datetime.datetime,
    actor: str,
    action: str,
    subject: str,
    outcome: str,
    detail: str,
) -> str:
    """SHA-256 over one record's canonical JSON form (time as UTC ISO 8601, microseconds)."""
    canonical = json.dumps(
        [
            seq,
            prev_hash,
            time.astimezone(datetime.UTC).isoformat(timespec="microseconds"),
            actor,
            action,
            subject,
            outcome,
            detail,
        ],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def values(
    time: datetime.datetime,
    actor: str,
    action: str,
    subject: str,
    outcome: str,
    detail: dict[str, Any],
) -> dict[str, Any]:
    """One record's fields, truncated to the columns' sizes (the chain covers what is stored).
    Time is kept to the microsecond, which both databases store exactly."""
    return {
        "time": time.astimezone(datetime.UTC),
        "actor": actor[:128],
        "action": action[:64],
        "subject": subject[:256],
        "outcome": outcome[:16],
        "detail": json.dumps(detail, sort_keys=True, default=str),
    }


def append(executor: Connection | Session, record: dict[str, Any]) -> int:
    """Chain and insert one record (from `values()`) in the caller's transaction; its seq."""
    seq, prev_hash = _BUMP.run(executor).one()
    digest = record_hash(
        seq,
        prev_hash,
        record["time"],
        record["actor"],
        record["action"],
        record["subject"],
        record["outcome"],
        record["detail"],
    )
    _INSERT.run(executor, record | {"seq": seq, "prev_hash": prev_hash, "hash": digest})
    _SET_HEAD.run(executor, {"h": digest})
    return int(seq)


# -- reading and verifying ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Record:
    seq: int
    time: datetime.datetime
    actor: str
    action: str
    subject: str
    outcome: str
    detail: str
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time.isoformat(timespec="microseconds"),
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "outcome": self.outcome,
            "detail": json.loads(self.detail),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


_COLUMNS = (
    AuditEvent.seq,
    AuditEvent.time,
    AuditEvent.actor,
    AuditEvent.action,
    AuditEvent.subject,
    AuditEvent.outcome,
    AuditEvent.detail,
    AuditEvent.prev_hash,
    AuditEvent.hash,
)


def records(connection: Connection, *, after_seq: int = 0) -> Iterator[Record]:
    """Every record after `after_seq`, oldest first, read in batches by seq."""
    last = after_seq
    while True:
        rows = connection.execute(
            select(*_COLUMNS).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(_BATCH)
        ).all()
        for row in rows:
            yield Record(*row)
        if len(rows) < _BATCH:
            return
        last = rows[-1][0]


def newest(connection: Connection, limit: int) -> list[Record]:
    rows = connection.execute(select(*_COLUMNS).order_by(AuditEvent.seq.desc()).limit(limit))
    return [Record(*row) for row in rows]


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    head_seq: int
    head_hash: str
    problem: str | None = None
    seq: int | None = None  # the first record found wrong

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verify(connection: Connection, *, anchor: tuple[int, str] | None = None) -> Verdict:
    """Walk the whole chain. `anchor` is a (seq, hash) pair recorded earlier, outside the
    database: the record with that seq must still carry that hash."""
    head = connection.execute(select(AuditChainHead.seq, AuditChainHead.hash)).one_or_none()
    if head is None:
        return Verdict(False, 0, 0, "", "the chain's head row is missing")
    expected_seq, prev_hash, count = 1, GENESIS, 0
    anchor_seen = anchor is None
    for r in records(connection):
        count += 1

        def broken(problem: str, r: Record = r, n: int = count) -> Verdict:
            return Verdict(False, n - 1, head.seq, head.hash, problem, r.seq)

        if r.seq != expected_seq:
            what = "missing (deleted?)" if r.seq > expected_seq else "out of order"
            return broken(f"record {expected_seq} is {what}; found {r.seq} instead")
        if r.prev_hash != prev_hash:
            return broken(f"record {r.seq} does not link to record {r.seq - 1}")
        fields = (r.time, r.actor, r.action, r.subject, r.outcome, r.detail)
        if record_hash(r.seq, r.prev_hash, *fields) != r.hash:
            return broken(f"record {r.seq} was altered (its hash does not match its content)")
        if anchor is not None and r.seq == anchor[0]:
            if r.hash != anchor[1]:
                return broken(f"record {r.seq} does not match the anchor's hash")
            anchor_seen = True
        prev_hash = r.hash
        expected_seq += 1
    last_seq = expected_seq - 1
    if head.seq != last_seq or head.hash != prev_hash:
        return Verdict(
            False,
            count,
            head.seq,
            head.hash,
            f"the chain's head is at record {head.seq} but the log ends at record {last_seq} "
            "(records removed from the end?)",
            last_seq + 1,
        )
    if not anchor_seen:
        return Verdict(False, count, head.seq, head.hash, "the anchor's record is not in the log")
    return Verdict(True, count, head.seq, head.hash)


def parse_anchor(value: str) -> tuple[int, str]:
    """`SEQ:HASH` as printed by `certwright audit-log verify`."""
    seq, _, digest = value.partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise CAError(Kind.BAD_REQUEST, "an anchor is SEQ:HASH as printed by `audit-log verify`")
    return int(seq), digest.lower()


def rechain(connection: Connection) -> None:
    """Chain every record in id order and set the head (the migration that introduced the
    chain runs this once over the records made before it)."""
    prev, seq = GENESIS, 0
    rows = connection.execute(
        text(
            "SELECT id, time, actor, action, subject, outcome, detail FROM audit_events ORDER BY id"
        )
    ).all()
    for row in rows:
        seq += 1
        time = row.time
        if isinstance(time, str):  # SQLite through a plain text() query
            time = datetime.datetime.fromisoformat(time)
        if time.tzinfo is None:
            time = time.replace(tzinfo=datetime.UTC)
        digest = record_hash(
            seq, prev, time, row.actor, row.action, row.subject, row.outcome, row.detail
        )
        connection.execute(
            text("UPDATE audit_events SET seq = :s, prev_hash = :p, hash = :h WHERE id = :i"),
            {"s": seq, "p": prev, "h": digest, "i": row.id},
        )
        prev = digest
    connection.execute(
        text("INSERT INTO audit_chain (id, seq, hash) VALUES (1, :s, :h)"), {"s": seq, "h": prev}
    )
