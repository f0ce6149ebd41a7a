"""The audit log's hash chain: every change is recorded, and any edit, deletion, reordering or
truncation of the records is found by `verify` (in the core and through the CLI)."""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import DateTime, bindparam, text

from ca.issuance import CertificateAuthority, Identifier, IssuanceRequest
from ca.storage import CertificateFilter, Storage, audit
from tests.conftest import run_cli

pytestmark = pytest.mark.integration


def _verify(storage: Storage, anchor: tuple[int, str] | None = None) -> audit.Verdict:
    with storage.engine.connect() as connection:
        return audit.verify(connection, anchor=anchor)


def _issue(authority: CertificateAuthority, name: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    authority.issue(IssuanceRequest(key.public_key(), (Identifier("dns", name),), "tls-server"))


@pytest.fixture
def chained(authority: CertificateAuthority) -> Iterator[Storage]:
    """A log with issuances, a refusal and a revocation in it."""
    for i in range(3):
        _issue(authority, f"host{i}.web.internal")
    with pytest.raises(Exception, match="name"):
        _issue(authority, "bad..name")
    serial = authority.storage.list_certificates(CertificateFilter())[0].serial
    authority.revoke(serial, "superseded", actor="tests")
    yield authority.storage


def _execute(storage: Storage, sql: str, **params: object) -> None:
    with storage.engine.begin() as connection:
        connection.execute(text(sql), params)


def test_every_change_is_chained_and_verifies(chained: Storage) -> None:
    verdict = _verify(chained)
    assert verdict.ok, verdict.problem
    outcomes = [(e["action"], e["outcome"]) for e in reversed(chained.audit_events(100))]
    assert outcomes.count(("certificate.issue", "success")) == 3
    assert ("certificate.issue", "refused") in outcomes
    assert ("certificate.revoke", "success") in outcomes
    seqs = [e["seq"] for e in reversed(chained.audit_events(100))]
    assert seqs == list(range(1, verdict.records + 1))
    # An anchor taken now still holds after more records are appended.
    anchor = (verdict.head_seq, verdict.head_hash)
    chained.audit("tests", "admin.note", "x", "success", {"k": "v"})
    assert _verify(chained, anchor).ok
    assert not _verify(chained, (anchor[0], "f" * 64)).ok


def test_an_edited_record_is_found(chained: Storage) -> None:
    _execute(chained, "UPDATE audit_events SET outcome = 'refused' WHERE seq = 2")
    verdict = _verify(chained)
    assert not verdict.ok and verdict.seq == 2
    assert "altered" in str(verdict.problem)


def test_an_edited_record_with_a_recomputed_hash_breaks_the_next_link(chained: Storage) -> None:
    with chained.engine.begin() as connection:
        row = connection.execute(
            text(
                "SELECT seq, prev_hash, time, actor, action, subject, detail FROM audit_events "
                "WHERE seq = 2"
            )
        ).one()
    forged = audit.record_hash(
        2,
        row.prev_hash,
        _aware(row.time),
        "mallory",
        row.action,
        row.subject,
        "success",
        row.detail,
    )
    _execute(
        chained, "UPDATE audit_events SET actor = 'mallory', hash = :h WHERE seq = 2", h=forged
    )
    verdict = _verify(chained)
    assert not verdict.ok and verdict.seq == 3
    assert "does not link" in str(verdict.problem)


def test_a_deleted_record_is_found(chained: Storage) -> None:
    _execute(chained, "DELETE FROM audit_events WHERE seq = 3")
    verdict = _verify(chained)
    assert not verdict.ok and verdict.seq == 4
    assert "missing" in str(verdict.problem)


def test_reordered_records_are_found(chained: Storage) -> None:
    # Swap the contents of records 2 and 3 (keeping each row's seq).
    with chained.engine.begin() as connection:
        rows = {
            r.seq: r
            for r in connection.execute(
                text(
                    "SELECT seq, actor, action, subject, outcome, detail FROM audit_events "
                    "WHERE seq IN (2, 3)"
                )
            )
        }
        for seq, other in ((2, 3), (3, 2)):
            o = rows[other]
            connection.execute(
                text(
                    "UPDATE audit_events SET actor = :a, action = :ac, subject = :s, "
                    "outcome = :o, detail = :d WHERE seq = :seq"
                ),
                {
                    "a": o.actor,
                    "ac": o.action,
                    "s": o.subject,
                    "o": o.outcome,
                    "d": o.detail,
                    "seq": seq,
                },
            )
    verdict = _verify(chained)
    assert not verdict.ok and verdict.seq == 2


def test_records_cut_off_the_end_are_found(chained: Storage) -> None:
    last = _verify(chained).head_seq
    _execute(chained, "DELETE FROM audit_events WHERE seq = :s", s=last)
    verdict = _verify(chained)
    assert not verdict.ok
    assert "head" in str(verdict.problem)


def test_concurrent_writers_chain_in_commit_order(storage: Storage) -> None:
    """Threads with their own connections append at once: seq has no gaps, the chain holds."""
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for i in range(25):
                storage.audit(f"worker-{worker}", "admin.note", f"n{i}", "success", {})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    verdict = _verify(storage)
    assert verdict.ok, verdict.problem
    assert verdict.records == 150


def _aware(value: object) -> datetime.datetime:
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    assert isinstance(value, datetime.datetime)
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


# -- through the CLI ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    data = tmp_path_factory.mktemp("audit-demo") / "data"
    result = run_cli("init", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    yield {"CERTWRIGHT_CONFIG": str(data / "certwright.toml")}


def _database(demo: dict[str, str]) -> Path:
    return Path(demo["CERTWRIGHT_CONFIG"]).parent / "certwright.db"


def test_cli_verify_export_and_tamper(demo: dict[str, str], tmp_path: Path) -> None:
    issued = run_cli(
        "issue",
        "--profile",
        "tls-server",
        "--name",
        "audit.web.internal",
        "--out-dir",
        str(tmp_path),
        env=demo,
    )
    assert issued.returncode == 0, issued.stderr

    ok = run_cli("audit-log", "verify", env=demo)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: ")
    head = ok.stdout.split("head ")[1].strip()

    listed = run_cli("audit-log", "--limit", "3", "--json", env=demo)
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 3

    exported = run_cli("audit-log", "export", "-o", str(tmp_path / "log.jsonl"), env=demo)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in lines] == list(range(1, len(lines) + 1))
    assert all(lines[i]["prev_hash"] == lines[i - 1]["hash"] for i in range(1, len(lines)))
    assert f"{lines[-1]['seq']}:{lines[-1]['hash']}" == head
    assert any(r["action"] == "certificate.issue" for r in lines)

    anchored = run_cli("audit-log", "verify", "--anchor", head, env=demo)
    assert anchored.returncode == 0, anchored.stderr
    bad_anchor = run_cli("audit-log", "verify", "--anchor", "nonsense", env=demo)
    assert bad_anchor.returncode != 0 and "Traceback" not in bad_anchor.stderr

    # sqlite3's own context manager commits but does not close (Python 3.13 warns of that).
    with contextlib.closing(sqlite3.connect(_database(demo))) as db, db:
        db.execute("UPDATE audit_events SET subject = 'serial:00' WHERE seq = 1")
    broken = run_cli("audit-log", "verify", env=demo)
    assert broken.returncode == 4
    assert broken.stderr.strip().splitlines() == [
        "certwright: audit log broken: record 1 was altered (its hash does not match its content)"
    ]
    as_json = json.loads(run_cli("audit-log", "verify", "--json", env=demo).stdout)
    assert as_json["ok"] is False and as_json["seq"] == 1


def test_the_migration_chains_records_made_before_the_chain(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig

    from ca.storage.store import MIGRATIONS

    storage = Storage(db_url)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # The time goes through SQLAlchemy's DateTime, as the ORM writes it: the sqlite3 module's
    # own datetime adapter is deprecated from Python 3.12 on.
    insert = text(
        "INSERT INTO audit_events (time, actor, action, subject, outcome, detail) "
        "VALUES (:t, 'old', 'admin.note', :s, 'success', '{}')"
    ).bindparams(bindparam("t", type_=DateTime()))
    try:
        with storage.engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "0004")
        with storage.engine.begin() as connection:
            for i in range(5):
                connection.execute(
                    insert, {"t": datetime.datetime(2026, 1, 1, 0, 0, i, 123456), "s": f"n{i}"}
                )
        storage.migrate()
        verdict = _verify(storage)
        assert verdict.ok, verdict.problem
        assert verdict.records == 5
        storage.audit("tests", "admin.note", "after", "success", {})
        assert _verify(storage).records == 6
    finally:
        storage.dispose()


def test_a_configuration_or_profile_change_is_recorded_once(tmp_path: Path) -> None:
    from ca.config import load_config
    from ca.runtime import Runtime

    path = tmp_path / "certwright.toml"
    base = f'[database]\nurl = "sqlite:///{tmp_path / "ca.db"}"\n'
    path.write_text(base)
    runtime = Runtime(load_config(str(path)))
    assert runtime.record_config("tests") is True
    assert runtime.record_config("tests") is False  # nothing changed
    runtime.close()

    path.write_text(
        base + "[profiles.tls-server]\nmax_validity_days = 120\n[acme]\nwebsite = 'x'\n"
    )
    runtime = Runtime(load_config(str(path)))
    assert runtime.record_config("tests") is True
    record = runtime.storage.audit_events(1)[0]
    assert record["action"] == "config.change"
    assert record["detail"]["changed"] == [
        "acme.website",
        "profiles.tls-server",
    ]
    with runtime.storage.engine.connect() as connection:
        assert audit.verify(connection).ok
    runtime.close()


def test_recorded_settings_hide_the_database_password(tmp_path: Path) -> None:
    from ca.config import load_config
    from ca.runtime import Runtime

    path = tmp_path / "certwright.toml"
    path.write_text('[database]\nurl = "postgresql://ca:s3cret@db.internal/ca"\n')
    settings = Runtime(load_config(str(path))).effective_settings()
    assert "s3cret" not in json.dumps(settings, default=str)
    assert settings["database"]["url"] == "postgresql://ca:***@db.internal/ca"
