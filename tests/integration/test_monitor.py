"""The expiry monitor against real receivers: HTTP servers on loopback that check the HMAC
signature (one answering 500 first, one down), and a small real SMTP server, on SQLite and
PostgreSQL. Time moves by passing `now`, never by sleeping."""

from __future__ import annotations

import datetime
import email
import email.policy
import hashlib
import hmac
import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from ca import monitor
from ca.clock import FakeClock
from ca.config import load_config
from ca.errors import CAError
from ca.issuance import CertificateAuthority
from ca.runtime import Runtime
from ca.storage import Storage
from ca.storage.models import AuditEvent, ExpiryNotification
from tests.conftest import run_cli
from tests.integration.test_findings import add_discovered, build_cert, config, issue

pytestmark = pytest.mark.integration

SECRET = "webhook-secret-for-tests"
MINUTE = datetime.timedelta(minutes=1)
DAY = datetime.timedelta(days=1)


# -- receivers --------------------------------------------------------------------------------


class Receiver:
    """A real HTTP server on 127.0.0.1 that records POSTs and answers scripted statuses."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.received: list[dict[str, Any]] = []
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                signature = self.headers.get("X-Certwright-Signature", "")
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if not hmac.compare_digest(signature, expected):
                    receiver.bad_signatures += 1
                    status = 401
                elif status == 200:
                    receiver.received.append(json.loads(body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SmtpSink:
    """A minimal real SMTP server (RFC 5321 subset) on 127.0.0.1 that keeps what it receives."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], email.message.EmailMessage]] = []
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, line: str) -> None:
                self.wfile.write(line.encode() + b"\r\n")

            def handle(self) -> None:
                self.reply("220 sink ESMTP")
                sender, recipients = "", list[str]()
                while True:
                    line = self.rfile.readline().decode().rstrip("\r\n")
                    verb = line[:4].upper()
                    if not line or verb == "QUIT":
                        self.reply("221 bye")
                        return
                    if verb in ("EHLO", "HELO"):
                        self.reply("250 sink")
                    elif verb == "MAIL":
                        sender, recipients = line.split(":", 1)[1].strip(" <>"), []
                        self.reply("250 ok")
                    elif verb == "RCPT":
                        recipients.append(line.split(":", 1)[1].strip(" <>"))
                        self.reply("250 ok")
                    elif verb == "DATA":
                        self.reply("354 go ahead")
                        data = b""
                        while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                            data += chunk[1:] if chunk.startswith(b"..") else chunk
                        parsed = email.message_from_bytes(data, policy=email.policy.default)
                        assert isinstance(parsed, email.message.EmailMessage)
                        sink.messages.append((sender, recipients, parsed))
                        self.reply("250 queued")
                    elif verb == "RSET":
                        self.reply("250 ok")
                    else:
                        self.reply("502 not implemented")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def to(self, address: str) -> list[email.message.EmailMessage]:
        return [m for _, rcpts, m in self.messages if address in rcpts]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def good() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def flaky() -> Iterator[Receiver]:
    r = Receiver([500, 500])  # the first pass (two owners) fails, then it works
    yield r
    r.close()


@pytest.fixture
def down_url() -> str:
    """A loopback port nobody listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    yield sink
    sink.close()


@pytest.fixture(autouse=True)
def webhook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(monitor.SECRET_ENV, SECRET)


def monitor_config(urls: list[str], smtp: SmtpSink | None = None, **extra: str) -> Any:
    env = {
        "CERTWRIGHT_MONITOR__WEBHOOK_URLS": json.dumps(urls),
        "CERTWRIGHT_MONITOR__MAX_ATTEMPTS": "3",
    }
    if smtp:
        env |= {
            "CERTWRIGHT_MONITOR__SMTP_HOST": '"127.0.0.1"',
            "CERTWRIGHT_MONITOR__SMTP_PORT": str(smtp.port),
            "CERTWRIGHT_MONITOR__EMAIL_TO": '["ops@example.test"]',
        }
    env |= {f"CERTWRIGHT_MONITOR__{k.upper()}": v for k, v in extra.items()}
    return config(env)


def rows(storage: Storage) -> list[ExpiryNotification]:
    with storage.transaction() as session:
        return list(session.scalars(select(ExpiryNotification).order_by(ExpiryNotification.id)))


def notify_audits(storage: Storage) -> int:
    with storage.transaction() as session:
        return int(
            session.scalar(select(func.count()).where(AuditEvent.action == "monitor.notify")) or 0
        )


# -- tests ------------------------------------------------------------------------------------


def test_notifies_once_per_threshold_grouped_per_owner_and_retries(
    storage: Storage,
    authority: CertificateAuthority,
    good: Receiver,
    flaky: Receiver,
    down_url: str,
    smtp: SmtpSink,
) -> None:
    a = issue(authority, "a.internal", days=10, owner="team-a")  # 14-day notice
    b = issue(authority, "b.internal", days=3, owner="team-a")  # 7-day notice (not 30 or 14)
    c = issue(authority, "c.internal", days=20, owner="bob@example.test")  # 30-day notice
    issue(authority, "d.internal", days=90, owner="team-b")  # nothing yet
    cfg = monitor_config([good.url, flaky.url, down_url], smtp)
    now = datetime.datetime.now(datetime.UTC)

    report = monitor.run_once(storage, cfg, now)
    queued = {q["subject"]: q["threshold_days"] for q in report.queued}
    assert queued == {
        f"serial:{a.record.serial}": 14,
        f"serial:{b.record.serial}": 7,
        f"serial:{c.record.serial}": 30,
    }
    # The good receiver got one signed message per owner; the others are retried later.
    assert good.bad_signatures == 0
    by_owner = {m["owner"]: m for m in good.received}
    assert set(by_owner) == {"team-a", "bob@example.test"}
    team_a = {c["subject"]: c for c in by_owner["team-a"]["certificates"]}
    assert set(team_a) == {f"serial:{a.record.serial}", f"serial:{b.record.serial}"}
    assert team_a[f"serial:{b.record.serial}"]["threshold_days"] == 7
    assert team_a[f"serial:{b.record.serial}"]["names"] == ["b.internal"]
    assert flaky.received == []
    outcomes = {(d.channel, d.owner): d.outcome for d in report.deliveries}
    assert outcomes[(f"webhook:{flaky.url}", "team-a")] == "retry"
    assert outcomes[(f"webhook:{down_url}", "team-a")] == "retry"
    assert outcomes[(f"webhook:{good.url}", "team-a")] == "sent"
    # Email: ops gets one mail per owner, bob (an address) gets his own.
    assert len(smtp.to("ops@example.test")) == 2
    (bobs,) = smtp.to("bob@example.test")
    assert "c.internal" in bobs.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "bob@example.test" in bobs["Subject"]

    # A second pass at the same time sends nothing again and queues nothing new.
    again = monitor.run_once(storage, cfg, now)
    assert again.queued == [] and again.deliveries == []
    assert len(good.received) == 2 and len(smtp.messages) == 3

    # After the backoff the flaky receiver answers 200; the down one keeps failing.
    later = monitor.run_once(storage, cfg, now + 2 * MINUTE)
    assert len(flaky.received) == 2
    outcomes = {(d.channel, d.owner): d.outcome for d in later.deliveries}
    assert set(outcomes.values()) == {"sent", "retry"}
    assert all(o == "retry" for (ch, _), o in outcomes.items() if ch == f"webhook:{down_url}")
    down_rows = [r for r in rows(storage) if r.channel == f"webhook:{down_url}"]
    assert {r.attempts for r in down_rows} == {2}
    assert all(r.status == "pending" and r.last_error for r in down_rows)
    assert all(r.next_attempt_at == now + 2 * MINUTE + 2 * MINUTE for r in down_rows)

    # Third failure = monitor.max_attempts: given up, the others untouched.
    final = monitor.run_once(storage, cfg, now + 10 * MINUTE)
    assert {d.outcome for d in final.deliveries} == {"failed"}
    states = {(r.channel.split(":")[0], r.status) for r in rows(storage)}
    assert states == {("webhook", "sent"), ("email", "sent"), ("webhook", "failed")}
    assert not [r for r in rows(storage) if r.channel == f"webhook:{good.url}" and r.attempts != 1]
    assert notify_audits(storage) == 9 + 4 + 2  # one record per delivery attempt

    # Time passes: `a` crosses the 7-day threshold and is told once more, once.
    week = now + 4 * DAY
    crossed = monitor.run_once(storage, cfg, week)
    assert [(q["subject"], q["threshold_days"]) for q in crossed.queued] == [
        (f"serial:{a.record.serial}", 7)
    ]
    assert monitor.run_once(storage, cfg, week).queued == []
    assert len([m for m in good.received if m["owner"] == "team-a"]) == 2


def test_renewal_silences_its_predecessor(
    storage: Storage, authority: CertificateAuthority, good: Receiver, down_url: str
) -> None:
    old = issue(authority, "svc.internal", days=10, owner="team-a")
    issue(authority, "svc.internal", days=90, owner="team-a", replaces=old.record.serial)
    same_names_old = issue(authority, "x.internal", "y.internal", days=5, owner="team-a")
    issue(authority, "y.internal", "x.internal", days=90, owner="team-a")  # same set, later
    different = issue(authority, "x.internal", days=6, owner="team-a")  # not the same set
    # A certificate queued before its renewal existed: its pending rows are silenced too.
    pending = issue(authority, "late.internal", days=4, owner="team-a")
    now = datetime.datetime.now(datetime.UTC)
    monitor.run_once(storage, monitor_config([down_url]), now)
    issue(authority, "late.internal", days=90, owner="team-a", replaces=pending.record.serial)

    report = monitor.run_once(storage, monitor_config([good.url]), now + MINUTE)
    silenced = {s["subject"] for s in report.silenced}
    assert silenced == {
        f"serial:{old.record.serial}",
        f"serial:{same_names_old.record.serial}",
        f"serial:{pending.record.serial}",
    }
    [message] = good.received
    assert [c["subject"] for c in message["certificates"]] == [f"serial:{different.record.serial}"]
    state = {(r.subject, r.channel.split(":", 1)[1]): r.status for r in rows(storage)}
    assert state[(f"serial:{old.record.serial}", good.url)] == "silenced"
    assert state[(f"serial:{pending.record.serial}", down_url)] == "silenced"


def test_discovered_certificates_are_monitored_when_asked(storage: Storage, good: Receiver) -> None:
    now = datetime.datetime.now(datetime.UTC)
    foreign_ca = ec.generate_private_key(ec.SECP256R1())
    subject = add_discovered(
        storage,
        build_cert(
            cn="shadow.internal",
            key=ec.generate_private_key(ec.SECP256R1()),
            issuer_cn="Other CA",
            issuer_key=foreign_ca,
            not_before=now - 80 * DAY,
            not_after=now + 5 * DAY,
        ),
        seen=now,
        owner="team-s",
    )
    off = monitor.run_once(storage, monitor_config([good.url], include_discovered="false"), now)
    assert off.queued == []
    on = monitor.run_once(storage, monitor_config([good.url]), now)
    assert [(q["subject"], q["threshold_days"]) for q in on.queued] == [(subject, 7)]
    [message] = good.received
    assert message["owner"] == "team-s"
    assert message["certificates"][0]["source"] == "discovered"
    assert message["certificates"][0]["names"] == ["shadow.internal"]


def test_dry_run_changes_nothing_and_bad_config_is_refused(
    storage: Storage,
    authority: CertificateAuthority,
    good: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issue(authority, "dry.internal", days=3)
    now = datetime.datetime.now(datetime.UTC)
    report = monitor.run_once(storage, monitor_config([good.url]), now, dry_run=True)
    assert len(report.queued) == 1 and rows(storage) == [] and good.received == []
    monkeypatch.delenv(monitor.SECRET_ENV)
    with pytest.raises(CAError, match="signing secret"):
        monitor.run_once(storage, monitor_config([good.url]), now)
    with pytest.raises(CAError, match="not an http"):
        monitor.run_once(storage, monitor_config(["file:///etc/passwd"]), now)


def test_serve_job_runs_at_most_every_interval(
    db_url: str, storage: Storage, authority: CertificateAuthority, good: Receiver, down_url: str
) -> None:
    issue(authority, "job.internal", days=3, owner="team-j")
    clock = FakeClock(datetime.datetime.now(datetime.UTC))
    cfg = load_config(
        None,
        environ={
            "CERTWRIGHT_DATABASE__URL": db_url,
            "CERTWRIGHT_MONITOR__WEBHOOK_URLS": json.dumps([down_url, good.url]),
            "CERTWRIGHT_MONITOR__INTERVAL_SECONDS": "300",
        },
    )
    runtime = Runtime(cfg, clock=clock)
    try:
        monitor.run_job(runtime)  # a receiver down does not make the job raise
        assert len(good.received) == 1
        clock.advance(datetime.timedelta(seconds=200))
        monitor.run_job(runtime)  # too soon: skipped, though the down one's retry is due
        assert [r.attempts for r in rows(storage) if down_url in r.channel] == [1]
        clock.advance(datetime.timedelta(seconds=100))
        monitor.run_job(runtime)
        assert [r.attempts for r in rows(storage) if down_url in r.channel] == [2]
    finally:
        runtime.close()


def test_monitor_command(
    storage: Storage, authority: CertificateAuthority, db_url: str, good: Receiver, down_url: str
) -> None:
    issue(authority, "cli.internal", days=3, owner="team-c")
    env = {
        "CERTWRIGHT_DATABASE__URL": db_url,
        "CERTWRIGHT_MONITOR__WEBHOOK_URLS": json.dumps([good.url, down_url]),
        monitor.SECRET_ENV: SECRET,
    }
    dry = run_cli("monitor", "--once", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "would queue" in dry.stdout and good.received == []
    result = run_cli("monitor", "--once", "--json", env=env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["sent"], out["retrying"], out["failed"]) == (1, 1, 0)
    assert len(good.received) == 1
    text = run_cli("monitor", "--once", env=env)
    assert text.returncode == 0 and "0 queued" in text.stdout
    no_secret = run_cli(
        "monitor", "--once", env={k: v for k, v in env.items() if k != monitor.SECRET_ENV}
    )
    assert no_secret.returncode == 1
    assert no_secret.stderr.strip().splitlines() == [
        f"certwright: error: webhooks need a signing secret: set {monitor.SECRET_ENV} or "
        "monitor.webhook_secret_file"
    ]


def test_secret_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(monitor.SECRET_ENV)
    (tmp_path / "hook.secret").write_text("from-a-file\n")
    settings = monitor.Settings.from_config(
        config(
            {
                "CERTWRIGHT_MONITOR__WEBHOOK_URLS": '["https://hooks.example.test/x"]',
                "CERTWRIGHT_MONITOR__WEBHOOK_SECRET_FILE": json.dumps(
                    str(tmp_path / "hook.secret")
                ),
            }
        )
    )
    assert settings.webhook_secret == b"from-a-file"
    assert monitor.backoff(1) == MINUTE and monitor.backoff(3) == 4 * MINUTE
    assert monitor.backoff(30) == monitor.BACKOFF_CAP


def test_two_monitors_racing_notify_once(
    db_url: str, storage: Storage, authority: CertificateAuthority, good: Receiver
) -> None:
    """Two monitor processes (separate engines) on one database, at the same moment: every
    certificate is queued by one of them and delivered once."""
    issued = [
        issue(authority, f"race{i}.internal", days=3, owner=f"team-{i % 3}") for i in range(6)
    ]
    cfg = monitor_config([good.url])
    now = datetime.datetime.now(datetime.UTC)
    barrier = threading.Barrier(2)
    reports: list[monitor.Report] = []
    errors: list[BaseException] = []

    def one() -> None:
        other = Storage(db_url)
        try:
            barrier.wait()
            reports.append(monitor.run_once(other, cfg, now))
        except BaseException as exc:
            errors.append(exc)
        finally:
            other.dispose()

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    queued = [q["subject"] for r in reports for q in r.queued]
    assert sorted(queued) == sorted(f"serial:{i.record.serial}" for i in issued)
    delivered = [c["subject"] for m in good.received for c in m["certificates"]]
    assert sorted(delivered) == sorted(queued)
    assert {r.status for r in rows(storage)} == {"sent"} and len(rows(storage)) == 6
