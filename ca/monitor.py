"""The expiry monitor: notify owners before certificates expire, once per threshold.

One pass (`run_once`) has two steps.

1. Queue. Every live certificate of ours (status `issued`, not yet expired) and, with
   `monitor.include_discovered`, every discovered leaf that is not ours, whose time left has
   crossed a threshold of `monitor.thresholds_days` (default 30/14/7/1) gets one
   `expiry_notifications` row per channel for the *smallest* threshold crossed: a certificate
   first seen with 5 days left is told about 7 days, never 30 and 14 as well. The UNIQUE
   (subject, threshold_days, channel) constraint is what makes this once per certificate per
   threshold across processes and restarts: rows are inserted with ON CONFLICT DO NOTHING.
   A certificate that a live successor renewed (another of ours with `replaces` = its serial,
   or the same exact name set issued later) gets `silenced` rows instead, and its pending rows
   are silenced too.

2. Deliver. Due pending rows are claimed (a conditional UPDATE moves their next_attempt_at, so
   two monitors never send the same row), grouped per channel and owner, and sent as one
   message per group: a JSON POST to each `monitor.webhook_urls` entry, signed with
   `X-Certwright-Signature: sha256=<hex HMAC-SHA256(secret, body)>`, and a mail over SMTP to
   each `monitor.email_to` address and to owners that are email addresses. A failed delivery
   keeps its rows pending with attempts + 1 and next_attempt_at = now + 1 min x 2^attempts
   (capped at 6 h); after `monitor.max_attempts` they become `failed`. One bad receiver only
   costs its own timeout: the others are delivered all the same. Each delivery is one audit
   record (`monitor.notify`).

Channels: "webhook:<url>" and "email:<address>". Subjects: "serial:<hex>" for ours,
"sha256:<fingerprint>" for discovered certificates.

A webhook receives (and a mail carries as a JSON attachment)::

    {"event": "certificates.expiring", "owner": "team-a", "sent_at": "<ISO 8601>",
     "certificates": [{"subject": "serial:<hex>", "threshold_days": 7, "days_left": 5.9,
                       "names": ["svc.internal"], "not_after": "<ISO 8601>",
                       "serial": "<hex>", "issuer": "issuing-ec", "profile": "tls-server",
                       "source": "ours"}, ...]}

The receiver checks the signature over the exact body bytes, e.g. in Python
`hmac.compare_digest(header, "sha256=" + hmac.new(secret, body, "sha256").hexdigest())`.

Not done here: lineage between discovered certificates (a discovered certificate is never
silenced), and expired certificates (the monitor warns before expiry; `certwright audit`
reports what has expired).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import os
import smtplib
import ssl
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections import defaultdict
from collections.abc import Iterable, Sequence
from email.message import EmailMessage
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ca.config import Config
from ca.errors import CAError, Kind
from ca.findings import CertRow, successors
from ca.storage import Storage, audit
from ca.storage.models import (
    Certificate,
    CertificateSighting,
    DiscoveredCertificate,
    ExpiryNotification,
)

log = logging.getLogger(__name__)

SECRET_ENV = "CERTWRIGHT_MONITOR_WEBHOOK_SECRET"  # noqa: S105 - a variable's name
SMTP_PASSWORD_ENV = "CERTWRIGHT_MONITOR_SMTP_PASSWORD"  # noqa: S105 - a variable's name
SIGNATURE_HEADER = "X-Certwright-Signature"
BACKOFF_BASE = datetime.timedelta(minutes=1)
BACKOFF_CAP = datetime.timedelta(hours=6)
CLAIM_LEASE = datetime.timedelta(minutes=5)  # a claimed row is someone's for this long
ACTOR = "monitor"
_CHUNK = 500


@dataclasses.dataclass(frozen=True)
class Due:
    """One certificate that crossed a threshold."""

    subject: str
    threshold_days: int
    owner: str | None
    names: tuple[str, ...]
    not_after: datetime.datetime
    silenced_by: str | None = None

    def to_json(self, now: datetime.datetime) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "threshold_days": self.threshold_days,
            "owner": self.owner,
            "names": list(self.names),
            "not_after": self.not_after.isoformat(),
            "days_left": round((self.not_after - now).total_seconds() / 86400, 2),
            "silenced_by": self.silenced_by,
        }


@dataclasses.dataclass
class Delivery:
    channel: str
    owner: str | None
    subjects: list[str]
    outcome: str  # "sent" | "retry" | "failed" | "would-send"
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    queued: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    silenced: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    deliveries: list[Delivery] = dataclasses.field(default_factory=list)
    dry_run: bool = False

    def count(self, outcome: str) -> int:
        return sum(1 for d in self.deliveries if d.outcome == outcome)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "queued": self.queued,
            "silenced": self.silenced,
            "deliveries": [d.to_json() for d in self.deliveries],
            "sent": self.count("sent"),
            "retrying": self.count("retry"),
            "failed": self.count("failed"),
        }


# -- settings --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    thresholds: tuple[int, ...]
    include_discovered: bool
    webhook_urls: tuple[str, ...]
    webhook_secret: bytes | None
    webhook_timeout: float
    max_attempts: int
    smtp_host: str
    smtp_port: int
    smtp_starttls: bool
    smtp_username: str
    smtp_password: str
    smtp_from: str
    email_to: tuple[str, ...]
    missing_after: int

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        get = config.get
        try:
            thresholds = tuple(sorted({int(t) for t in get("monitor", "thresholds_days")}))
        except (TypeError, ValueError):
            raise CAError(
                Kind.CONFIG, "monitor.thresholds_days must be a list of whole days"
            ) from None
        if not thresholds or thresholds[0] < 0:
            raise CAError(Kind.CONFIG, "monitor.thresholds_days must be non-negative days")
        urls = tuple(str(u) for u in get("monitor", "webhook_urls"))
        for url in urls:
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise CAError(Kind.CONFIG, f"monitor.webhook_urls: {url!r} is not an http(s) URL")
        secret = os.environ.get(SECRET_ENV)
        secret_file = str(get("monitor", "webhook_secret_file"))
        if secret is None and secret_file:
            try:
                secret = config.resolve_path(secret_file).read_text().strip()
            except OSError as exc:
                raise CAError(
                    Kind.CONFIG, f"cannot read monitor.webhook_secret_file: {exc.strerror}"
                ) from None
        if urls and not secret:
            raise CAError(
                Kind.CONFIG,
                f"webhooks need a signing secret: set {SECRET_ENV} or monitor.webhook_secret_file",
            )
        password = os.environ.get(SMTP_PASSWORD_ENV, "")
        password_file = str(get("monitor", "smtp_password_file"))
        if not password and password_file:
            try:
                password = config.resolve_path(password_file).read_text().strip()
            except OSError as exc:
                raise CAError(
                    Kind.CONFIG, f"cannot read monitor.smtp_password_file: {exc.strerror}"
                ) from None
        return cls(
            thresholds=thresholds,
            include_discovered=bool(get("monitor", "include_discovered")),
            webhook_urls=urls,
            webhook_secret=secret.encode() if secret else None,
            webhook_timeout=float(get("monitor", "webhook_timeout_seconds")),
            max_attempts=max(1, int(get("monitor", "max_attempts"))),
            smtp_host=str(get("monitor", "smtp_host")),
            smtp_port=int(get("monitor", "smtp_port")),
            smtp_starttls=bool(get("monitor", "smtp_starttls")),
            smtp_username=str(get("monitor", "smtp_username")),
            smtp_password=password,
            smtp_from=str(get("monitor", "smtp_from")),
            email_to=tuple(str(a) for a in get("monitor", "email_to")),
            missing_after=int(get("discovery", "missing_after_scans")),
        )

    def channels(self, owner: str | None) -> list[str]:
        channels = [f"webhook:{u}" for u in self.webhook_urls]
        if self.smtp_host:
            channels += [f"email:{a}" for a in self.email_to]
            if owner and _is_email(owner) and owner not in self.email_to:
                channels.append(f"email:{owner}")
        return channels


def _is_email(value: str) -> bool:
    local, at, domain = value.partition("@")
    return bool(at and local and "." in domain and " " not in value)


def backoff(attempts: int) -> datetime.timedelta:
    """The wait after the `attempts`-th failure: 1 min, 2 min, 4 min, ... capped at 6 h."""
    wait: datetime.timedelta = BACKOFF_BASE * (2 ** max(0, attempts - 1))
    return min(wait, BACKOFF_CAP)


# -- step 1: what is due ---------------------------------------------------------------------


def _threshold(settings: Settings, left: datetime.timedelta) -> int | None:
    crossed = [t for t in settings.thresholds if left <= datetime.timedelta(days=t)]
    return min(crossed) if crossed else None


def due_certificates(session: Session, settings: Settings, now: datetime.datetime) -> list[Due]:
    """Every certificate whose time left crossed a threshold, with its smallest one."""
    horizon = now + datetime.timedelta(days=max(settings.thresholds))
    due: list[Due] = []
    ours = CertRow.load(
        session,
        Certificate.status == "issued",
        Certificate.not_after > now,
        Certificate.not_after <= horizon,
    )
    renewed = successors(session, list(ours), now)
    for row in ours:
        threshold = _threshold(settings, row.not_after - now)
        if threshold is None:
            continue
        due.append(
            Due(
                f"serial:{row.serial}",
                threshold,
                row.owner,
                tuple(row.names.split()),
                row.not_after,
                renewed.get(row.id),
            )
        )
    if settings.include_discovered:
        # Leaves not ours, still seen somewhere (or never tied to a location).
        seen = select(CertificateSighting.discovered_id).where(
            CertificateSighting.missed_scans < settings.missing_after
        )
        unseen = select(CertificateSighting.discovered_id)
        rows = session.scalars(
            select(DiscoveredCertificate).where(
                DiscoveredCertificate.certificate_id.is_(None),
                DiscoveredCertificate.is_ca.is_(False),
                DiscoveredCertificate.not_after > now,
                DiscoveredCertificate.not_after <= horizon,
                DiscoveredCertificate.id.in_(seen) | DiscoveredCertificate.id.not_in(unseen),
            )
        ).all()
        for d in rows:
            threshold = _threshold(settings, d.not_after - now)
            if threshold is not None:
                due.append(
                    Due(
                        f"sha256:{d.fingerprint_sha256}",
                        threshold,
                        d.owner,
                        tuple(d.names.split()),
                        d.not_after,
                    )
                )
    return due


def _insert_ignoring_duplicates(
    session: Session, rows: list[dict[str, Any]]
) -> set[tuple[str, int, str]]:
    """Insert notification rows; a row whose (subject, threshold, channel) exists already,
    whoever inserted it, is skipped. Returns the keys of the rows this call inserted."""
    added: set[tuple[str, int, str]] = set()
    dialect = session.get_bind().dialect.name
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        if dialect == "postgresql":
            stmt: Any = postgresql.insert(ExpiryNotification).on_conflict_do_nothing(
                index_elements=["subject", "threshold_days", "channel"]
            )
        elif dialect == "sqlite":
            stmt = sqlite.insert(ExpiryNotification).on_conflict_do_nothing(
                index_elements=["subject", "threshold_days", "channel"]
            )
        else:  # pragma: no cover - only SQLite and PostgreSQL are supported
            stmt = insert(ExpiryNotification)
        result = session.execute(
            stmt.returning(
                ExpiryNotification.subject,
                ExpiryNotification.threshold_days,
                ExpiryNotification.channel,
            ),
            chunk,
        )
        added.update((s, t, c) for s, t, c in result.all())
    return added


def queue(
    storage: Storage, settings: Settings, now: datetime.datetime, report: Report, *, dry_run: bool
) -> None:
    # Read in one transaction, write in another that starts with its first write: on SQLite a
    # transaction that read first cannot take the write lock once another process committed.
    with storage.transaction() as session:
        due = due_certificates(session, settings, now)
        subjects = [d.subject for d in due]
        existing: set[tuple[str, int, str]] = set()
        for start in range(0, len(subjects), _CHUNK):
            chunk = subjects[start : start + _CHUNK]
            existing.update(
                (s, t, c)
                for s, t, c in session.execute(
                    select(
                        ExpiryNotification.subject,
                        ExpiryNotification.threshold_days,
                        ExpiryNotification.channel,
                    ).where(ExpiryNotification.subject.in_(chunk))
                )
            )
    rows: list[dict[str, Any]] = []
    candidates: list[tuple[Due, list[str]]] = []
    for d in due:
        new = [
            c
            for c in settings.channels(d.owner)
            if (d.subject, d.threshold_days, c) not in existing
        ]
        if new:
            candidates.append((d, new))
        rows += [
            {
                "subject": d.subject,
                "threshold_days": d.threshold_days,
                "channel": c,
                "owner": d.owner,
                "status": "silenced" if d.silenced_by else "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for c in new
        ]
    silenced_subjects = sorted({d.subject for d in due if d.silenced_by})
    inserted: set[tuple[str, int, str]] | None = None
    if not dry_run and (rows or silenced_subjects):
        with storage.transaction() as session:
            inserted = _insert_ignoring_duplicates(session, rows) if rows else set()
            # A renewal silences what is still pending for its predecessor.
            for start in range(0, len(silenced_subjects), _CHUNK):
                session.execute(
                    update(ExpiryNotification)
                    .where(
                        ExpiryNotification.subject.in_(silenced_subjects[start : start + _CHUNK]),
                        ExpiryNotification.status == "pending",
                    )
                    .values(status="silenced")
                )
    for d, channels in candidates:
        if inserted is not None:
            channels = [c for c in channels if (d.subject, d.threshold_days, c) in inserted]
        if channels:
            (report.silenced if d.silenced_by else report.queued).append(
                d.to_json(now) | {"channels": channels}
            )


# -- step 2: delivery ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Row:
    id: int
    subject: str
    threshold_days: int
    channel: str
    owner: str | None
    attempts: int


def _claim(storage: Storage, now: datetime.datetime, *, dry_run: bool) -> list[_Row]:
    """Due pending rows, each claimed by a conditional UPDATE so no other monitor sends it."""
    with storage.transaction() as session:
        due = [
            _Row(*r)
            for r in session.execute(
                select(
                    ExpiryNotification.id,
                    ExpiryNotification.subject,
                    ExpiryNotification.threshold_days,
                    ExpiryNotification.channel,
                    ExpiryNotification.owner,
                    ExpiryNotification.attempts,
                )
                .where(
                    ExpiryNotification.status == "pending",
                    ExpiryNotification.next_attempt_at <= now,
                )
                .order_by(ExpiryNotification.id)
            )
        ]
    if dry_run or not due:
        return due
    claimed: list[_Row] = []
    with storage.transaction() as session:
        for r in due:
            result = session.execute(
                update(ExpiryNotification)
                .where(
                    ExpiryNotification.id == r.id,
                    ExpiryNotification.status == "pending",
                    ExpiryNotification.next_attempt_at <= now,
                    ExpiryNotification.attempts == r.attempts,
                )
                .values(next_attempt_at=now + CLAIM_LEASE)
            )
            if int(getattr(result, "rowcount", 0)) == 1:
                claimed.append(r)
    return claimed


def _details(storage: Storage, subjects: Iterable[str]) -> dict[str, dict[str, Any]]:
    """What a message says about each certificate, by subject."""
    serials: list[str] = []
    fingerprints: list[str] = []
    for s in set(subjects):
        kind, _, value = s.partition(":")
        (serials if kind == "serial" else fingerprints).append(value)
    out: dict[str, dict[str, Any]] = {}
    with storage.transaction() as session:
        for start in range(0, len(serials), _CHUNK):
            for c in session.scalars(
                select(Certificate).where(Certificate.serial.in_(serials[start : start + _CHUNK]))
            ):
                out[f"serial:{c.serial}"] = {
                    "serial": c.serial,
                    "names": c.names.split(),
                    "not_after": c.not_after.isoformat(),
                    "issuer": c.issuer_id,
                    "profile": c.profile,
                    "source": "ours",
                }
        for start in range(0, len(fingerprints), _CHUNK):
            for d in session.scalars(
                select(DiscoveredCertificate).where(
                    DiscoveredCertificate.fingerprint_sha256.in_(
                        fingerprints[start : start + _CHUNK]
                    )
                )
            ):
                out[f"sha256:{d.fingerprint_sha256}"] = {
                    "fingerprint_sha256": d.fingerprint_sha256,
                    "serial": d.serial,
                    "names": d.names.split(),
                    "not_after": d.not_after.isoformat(),
                    "issuer": d.issuer,
                    "source": "discovered",
                }
    return out


def message_body(
    owner: str | None,
    rows: Sequence[_Row],
    details: dict[str, dict[str, Any]],
    now: datetime.datetime,
) -> dict[str, Any]:
    certificates = []
    for r in rows:
        info = details.get(r.subject, {})
        not_after = info.get("not_after")
        days_left = (
            round((datetime.datetime.fromisoformat(not_after) - now).total_seconds() / 86400, 2)
            if not_after
            else None
        )
        certificates.append(
            {"subject": r.subject, "threshold_days": r.threshold_days, "days_left": days_left}
            | info
        )
    return {
        "event": "certificates.expiring",
        "owner": owner,
        "sent_at": now.isoformat(),
        "certificates": certificates,
    }


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _post_webhook(settings: Settings, url: str, payload: dict[str, Any]) -> None:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    assert settings.webhook_secret is not None  # Settings refuses webhooks without one
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked in Settings
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "certwright-monitor",
            SIGNATURE_HEADER: sign(settings.webhook_secret, body),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=settings.webhook_timeout) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        raise _DeliveryError(f"HTTP {exc.code} from {url}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _DeliveryError(f"cannot reach {url}: {reason}") from None
    if not 200 <= status < 300:
        raise _DeliveryError(f"HTTP {status} from {url}")


def _send_mail(settings: Settings, to: str, payload: dict[str, Any]) -> None:
    certificates = payload["certificates"]
    message = EmailMessage()
    message["From"] = settings.smtp_from
    message["To"] = to
    owner = payload["owner"] or "no owner"
    message["Subject"] = f"[certwright] {len(certificates)} certificate(s) expiring ({owner})"
    lines = [f"Certificates of {owner} reaching an expiry threshold:", ""]
    for c in certificates:
        names = ", ".join(c.get("names", [])) or "(no names)"
        lines.append(
            f"- {c['subject']}  {names}  expires {c.get('not_after', '?')} "
            f"({c.get('days_left')} days left; {c['threshold_days']}-day notice)"
        )
    message.set_content("\n".join(lines) + "\n")
    message.add_attachment(
        json.dumps(payload, indent=2, sort_keys=True),
        subtype="json",
        filename="certificates.json",
    )
    try:
        with smtplib.SMTP(
            settings.smtp_host, settings.smtp_port, timeout=settings.webhook_timeout
        ) as smtp:
            if settings.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if settings.smtp_username:
                smtp.login(settings.smtp_username, settings.smtp_password)
            smtp.send_message(message)
    except (smtplib.SMTPException, OSError) as exc:
        raise _DeliveryError(
            f"SMTP {settings.smtp_host}:{settings.smtp_port}: {str(exc)[:200]}"
        ) from None


class _DeliveryError(Exception):
    pass


def deliver(
    storage: Storage, settings: Settings, now: datetime.datetime, report: Report, *, dry_run: bool
) -> None:
    rows = _claim(storage, now, dry_run=dry_run)
    groups: dict[tuple[str, str | None], list[_Row]] = defaultdict(list)
    for r in rows:
        groups[(r.channel, r.owner)].append(r)
    details = _details(storage, (r.subject for r in rows)) if groups else {}
    for (channel, owner), members in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] or "")):
        subjects = [r.subject for r in members]
        if dry_run:
            report.deliveries.append(Delivery(channel, owner, subjects, "would-send"))
            continue
        payload = message_body(owner, members, details, now)
        kind, _, target = channel.partition(":")
        error: str | None = None
        try:
            if kind == "webhook":
                _post_webhook(settings, target, payload)
            elif kind == "email":
                if not settings.smtp_host:
                    raise _DeliveryError("email is off (monitor.smtp_host is empty)")
                _send_mail(settings, target, payload)
            else:
                raise _DeliveryError(f"unknown channel {channel!r}")
        except _DeliveryError as exc:
            error = str(exc)[:500]
        except Exception as exc:  # a receiver must never stop the loop
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        report.deliveries.append(_record(storage, members, channel, owner, now, error, settings))


def _record(
    storage: Storage,
    members: Sequence[_Row],
    channel: str,
    owner: str | None,
    now: datetime.datetime,
    error: str | None,
    settings: Settings,
) -> Delivery:
    subjects = [r.subject for r in members]
    with storage.transaction() as session:
        if error is None:
            outcome = "sent"
            session.execute(
                update(ExpiryNotification)
                .where(ExpiryNotification.id.in_([r.id for r in members]))
                .values(
                    status="sent",
                    sent_at=now,
                    attempts=ExpiryNotification.attempts + 1,
                    last_error=None,
                )
            )
        else:
            attempts = max(r.attempts for r in members) + 1
            outcome = "failed" if attempts >= settings.max_attempts else "retry"
            for r in members:
                tries = r.attempts + 1
                gave_up = tries >= settings.max_attempts
                session.execute(
                    update(ExpiryNotification)
                    .where(ExpiryNotification.id == r.id)
                    .values(
                        status="failed" if gave_up else "pending",
                        attempts=tries,
                        next_attempt_at=now + backoff(tries),
                        last_error=error,
                    )
                )
        audit.append(
            session,
            audit.values(
                now,
                ACTOR,
                "monitor.notify",
                channel[:256],
                "success" if error is None else "failed",
                {
                    "owner": owner,
                    "certificates": subjects[:100],
                    "count": len(subjects),
                    "error": error,
                    "outcome": outcome,
                },
            ),
        )
    if error:
        log.warning("expiry notification to %s failed (%s): %s", channel, outcome, error)
    return Delivery(channel, owner, subjects, outcome, error)


# -- entry points ----------------------------------------------------------------------------


def run_once(
    storage: Storage,
    config: Config,
    now: datetime.datetime | None = None,
    *,
    dry_run: bool = False,
) -> Report:
    """One monitor pass: queue what crossed a threshold, then deliver what is due."""
    settings = Settings.from_config(config)
    now = now or storage.clock.now()
    report = Report(dry_run=dry_run)
    queue(storage, settings, now, report, dry_run=dry_run)
    deliver(storage, settings, now, report, dry_run=dry_run)
    return report


_last_run: weakref.WeakKeyDictionary[Any, datetime.datetime] = weakref.WeakKeyDictionary()


def run_job(runtime: Any) -> None:
    """The `certwright.jobs` entry point: a pass at most every `monitor.interval_seconds`.

    The last run time is kept in the jobs process's memory; a restart runs at once, which is
    harmless because queueing is idempotent and delivery only takes due rows.
    """
    config: Config = runtime.config
    if not config.get("monitor", "enabled"):
        return
    now = runtime.clock.now()
    interval = datetime.timedelta(seconds=float(config.get("monitor", "interval_seconds")))
    last = _last_run.get(runtime)
    if last is not None and now - last < interval:
        return
    _last_run[runtime] = now
    report = run_once(runtime.storage, config, now)
    if report.queued or report.deliveries:
        log.info(
            "expiry monitor: %d queued, %d sent, %d retrying, %d failed",
            len(report.queued),
            report.count("sent"),
            report.count("retry"),
            report.count("failed"),
        )
