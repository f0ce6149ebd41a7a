"""The database schema, as typed SQLAlchemy 2 models. Changes go through Alembic migrations."""

from __future__ import annotations

import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime.datetime]):
    """Timezone-aware UTC in Python, naive UTC in the database (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(
        self, value: datetime.datetime | None, dialect: Dialect
    ) -> datetime.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(datetime.UTC).replace(tzinfo=None)

    def process_result_value(
        self, value: datetime.datetime | None, dialect: Dialect
    ) -> datetime.datetime | None:
        return None if value is None else value.replace(tzinfo=datetime.UTC)


class Base(DeclarativeBase):
    pass


class Issuer(Base):
    """A CA certificate of ours: the offline root or an online intermediate.

    For the root only the certificate is stored: its key's token is never named here, so the
    online server's database and config cannot lead to it.
    """

    __tablename__ = "issuers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "root" | "intermediate"
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("issuers.id"))
    key_label: Mapped[str | None] = mapped_column(String(128))
    key_type: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(512))
    ski: Mapped[str] = mapped_column(String(128))
    spki_sha256: Mapped[str] = mapped_column(String(64), index=True)
    cert_der: Mapped[bytes] = mapped_column(LargeBinary)
    not_before: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16), default="active")  # active|retired|revoked
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime())
    revocation_reason: Mapped[int | None] = mapped_column(Integer)


class CrossCertificate(Base):
    """A second CA certificate for an intermediate, signed by another root (cross-signing):
    same subject and key as the intermediate's own, so either certifies what it issues.

    Revoking the intermediate revokes these too: the signing root's ARL lists them.
    """

    __tablename__ = "cross_certificates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    issuer_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"), index=True)
    parent_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"), index=True)
    # Lowercase hex without leading zeros, as in `certificates`.
    serial: Mapped[str] = mapped_column(String(48), unique=True)
    cert_der: Mapped[bytes] = mapped_column(LargeBinary)
    not_before: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())


class Certificate(Base):
    """Every leaf certificate, from the moment its serial is reserved.

    status: `pending` (serial reserved, nothing released yet), `issued`, `revoked`, or
    `failed` (signing was refused or failed; the serial stays reserved forever).
    """

    __tablename__ = "certificates"
    __table_args__ = (
        Index("ix_certificates_status_not_after", "status", "not_after"),
        Index("ix_certificates_owner_not_after", "owner", "not_after"),
        Index("ix_certificates_issuer_shard_status", "issuer_id", "crl_shard", "status"),
        # Equality on both columns (is this key compromised?): with an index on spki_sha256
        # alone, SQLite's planner may pick the status one and walk every revoked certificate.
        Index("ix_certificates_spki_status", "spki_sha256", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Lowercase hex without leading zeros; UNIQUE so a serial can never be used twice.
    serial: Mapped[str] = mapped_column(String(48), unique=True)
    issuer_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"))
    profile: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16))
    common_name: Mapped[str | None] = mapped_column(String(256))
    names: Mapped[str] = mapped_column(Text)  # space-separated, for display; search uses names
    key_type: Mapped[str] = mapped_column(String(16))
    spki_sha256: Mapped[str] = mapped_column(String(64))
    not_before: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    crl_shard: Mapped[int] = mapped_column(Integer)
    der: Mapped[bytes | None] = mapped_column(LargeBinary)
    owner: Mapped[str | None] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    issued_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime())
    revocation_reason: Mapped[int | None] = mapped_column(Integer)
    failure: Mapped[str | None] = mapped_column(String(512))
    # The ACME account that ordered it, if any (RFC 8555 §7.6: it may revoke it).
    acme_account_id: Mapped[int | None] = mapped_column(Integer, index=True)
    # Lineage: the serial this certificate replaced (ACME `replaces`, RFC 9773 §5).
    replaces: Mapped[str | None] = mapped_column(String(48), index=True)
    # Free-form labels, stored as ",a,b," so one tag is a LIKE '%,a,%' match.
    tags: Mapped[str] = mapped_column(Text, default="", server_default="")
    # The last time an ACME client asked for this certificate's renewalInfo (RFC 9773).
    ari_checked_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime())


class CertificateName(Base):
    """One name of one certificate, so "which certificates carry this name" is an index seek."""

    __tablename__ = "certificate_names"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    certificate_id: Mapped[int] = mapped_column(
        ForeignKey("certificates.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(256), index=True)


class Crl(Base):
    """A signed CRL. `shard` is -1 for an issuer's whole-scope CRL such as the root's ARL."""

    __tablename__ = "crls"
    __table_args__ = (UniqueConstraint("issuer_id", "shard", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    issuer_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"))
    shard: Mapped[int] = mapped_column(Integer)
    number: Mapped[int] = mapped_column(Integer)
    this_update: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    next_update: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    der: Mapped[bytes] = mapped_column(LargeBinary)


class AuditEvent(Base):
    """An append-only record of something that happened: who did what to what, and how it went.

    Records are chained: `seq` counts 1, 2, 3, ... without gaps and `hash` is SHA-256 over the
    previous record's hash and this record's fields (ca/storage/audit.py), so an edited,
    deleted or reordered record breaks the chain that `certwright audit-log verify` walks.
    """

    __tablename__ = "audit_events"
    __table_args__ = (UniqueConstraint("seq", name="uq_audit_events_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    time: Mapped[datetime.datetime] = mapped_column(UTCDateTime(), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(16))  # "success" | "refused" | "failed"
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON


class AuditChainHead(Base):
    """The chain's newest link (one row, id 1). Appending locks it, so records are chained in
    commit order by every process; verify compares it with the last record, so cutting records
    off the end is detected too."""

    __tablename__ = "audit_chain"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


# -- Lifecycle: discovery and alerts ----------------------------------------------------------


class DiscoveredCertificate(Base):
    """A certificate found by a discovery scan (a TLS endpoint or a file), ours or not.

    `certificate_id` links it to our own record when we issued it; inventory listings show
    every certificate of ours plus the discovered ones that are not ours.
    """

    __tablename__ = "discovered_certificates"
    __table_args__ = (Index("ix_discovered_owner_not_after", "owner", "not_after"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fingerprint_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    der: Mapped[bytes] = mapped_column(LargeBinary)
    subject: Mapped[str] = mapped_column(String(1024))
    issuer: Mapped[str] = mapped_column(String(1024))
    serial: Mapped[str] = mapped_column(String(48), index=True)
    common_name: Mapped[str | None] = mapped_column(String(256))
    names: Mapped[str] = mapped_column(Text)  # space-separated
    key_type: Mapped[str] = mapped_column(String(32))
    signature_algorithm: Mapped[str] = mapped_column(String(64))
    not_before: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[datetime.datetime] = mapped_column(UTCDateTime(), index=True)
    self_signed: Mapped[bool] = mapped_column(Boolean)
    is_ca: Mapped[bool] = mapped_column(Boolean, default=False)
    certificate_id: Mapped[int | None] = mapped_column(ForeignKey("certificates.id"), index=True)
    owner: Mapped[str | None] = mapped_column(String(128))
    tags: Mapped[str] = mapped_column(Text, default="", server_default="")
    first_seen: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime.datetime] = mapped_column(UTCDateTime())


class DiscoveryScan(Base):
    """One run of `certwright discover`: what it looked at and what it found."""

    __tablename__ = "discovery_scans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # "tls" | "files"
    actor: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime())
    targets: Mapped[int] = mapped_column(Integer, default=0)
    found: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON


class CertificateSighting(Base):
    """Where a discovered certificate was deployed: a TLS endpoint (host:port, with SNI) or a
    file path. Re-scans move last_seen; a location scanned without the certificate counts a
    miss, and `missed_scans` at or above the configured N flags it."""

    __tablename__ = "certificate_sightings"
    __table_args__ = (UniqueConstraint("discovered_id", "location_kind", "location"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    discovered_id: Mapped[int] = mapped_column(
        ForeignKey("discovered_certificates.id", ondelete="CASCADE"), index=True
    )
    location_kind: Mapped[str] = mapped_column(String(8))  # "tls" | "file"
    location: Mapped[str] = mapped_column(String(1024), index=True)
    first_seen: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    last_scan_id: Mapped[int | None] = mapped_column(Integer)
    missed_scans: Mapped[int] = mapped_column(Integer, default=0)


class ExpiryNotification(Base):
    """One expiry alert: one certificate, one threshold, one channel. The UNIQUE constraint is
    what makes "once per certificate per threshold" hold across processes and restarts."""

    __tablename__ = "expiry_notifications"
    __table_args__ = (
        UniqueConstraint("subject", "threshold_days", "channel"),
        Index("ix_expiry_notifications_status_next", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(128))  # "serial:<hex>" | "sha256:<hex>"
    threshold_days: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(512))  # "webhook:<url>" | "email:<address>"
    owner: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))  # pending | sent | failed | silenced
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(String(512))


# -- ACME (RFC 8555) ---------------------------------------------------------------------------


class AcmeNonce(Base):
    """A Replay-Nonce (§6.5) that has been used. Nonces are issued without touching the
    database (they carry their own MAC and time); redeeming one inserts it here, and the
    primary key makes a second redemption fail in every server process. Rows go once the
    nonce would have expired anyway."""

    __tablename__ = "acme_nonces"

    value: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime(), index=True)


class Secret(Base):
    """A server-side secret shared by every process, made on first use (the nonce MAC key)."""

    __tablename__ = "secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())


class AcmeAccount(Base):
    __tablename__ = "acme_accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # RFC 7638 thumbprint of the account key: one account per key (§7.3.1).
    key_thumbprint: Mapped[str] = mapped_column(String(64), unique=True)
    jwk: Mapped[str] = mapped_column(Text)  # JSON
    status: Mapped[str] = mapped_column(String(16))  # valid | deactivated | revoked
    contact: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of URLs
    tos_agreed: Mapped[bool] = mapped_column(default=False)
    eab_key_id: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    created_ip: Mapped[str] = mapped_column(String(64), default="")

    __table_args__ = (Index("ix_acme_accounts_ip_created", "created_ip", "created_at"),)


class AcmeOrder(Base):
    __tablename__ = "acme_orders"
    __table_args__ = (
        Index("ix_acme_orders_account_created", "account_id", "created_at"),
        # RFC 9773 §5: one live order per replaced certificate, even under a race.
        Index(
            "uq_acme_orders_live_replaces",
            "replaces",
            unique=True,
            sqlite_where=text("replaces IS NOT NULL AND status != 'invalid'"),
            postgresql_where=text("replaces IS NOT NULL AND status != 'invalid'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # random, URL-safe
    account_id: Mapped[int] = mapped_column(ForeignKey("acme_accounts.id"))
    status: Mapped[str] = mapped_column(String(16))  # pending|ready|processing|valid|invalid
    expires: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    identifiers: Mapped[str] = mapped_column(Text)  # JSON list of {"type","value"}
    not_before: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime())
    not_after: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime())
    profile: Mapped[str] = mapped_column(String(64))
    replaces: Mapped[str | None] = mapped_column(String(200))  # ARI certificate id
    error: Mapped[str | None] = mapped_column(Text)  # JSON problem document
    certificate_serial: Mapped[str | None] = mapped_column(String(48))
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    # When finalize took it to `processing`: an order left there by a process that died (or
    # lost its database) mid-finalize goes back to `ready` after a while (acme/jobs.py).
    processing_since: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime())


class AcmeAuthorization(Base):
    __tablename__ = "acme_authorizations"
    __table_args__ = (
        Index("ix_acme_authz_reuse", "account_id", "identifier_type", "identifier_value", "status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("acme_accounts.id"))
    identifier_type: Mapped[str] = mapped_column(String(8))
    identifier_value: Mapped[str] = mapped_column(String(256))
    wildcard: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(
        String(16)
    )  # pending|valid|invalid|deactivated|expired|revoked
    expires: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    validated_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())


class AcmeOrderAuthorization(Base):
    """Orders and authorizations, many to many: a valid authorization serves later orders."""

    __tablename__ = "acme_order_authorizations"

    order_id: Mapped[str] = mapped_column(ForeignKey("acme_orders.id"), primary_key=True)
    authorization_id: Mapped[str] = mapped_column(
        ForeignKey("acme_authorizations.id"), primary_key=True, index=True
    )


class AcmeChallenge(Base):
    __tablename__ = "acme_challenges"
    __table_args__ = (
        Index("ix_acme_challenges_status_updated", "status", "updated_at"),
        # An authorization's valid challenge: both columns, or SQLite's planner may pick the
        # status index and walk every valid challenge ever recorded.
        Index("ix_acme_challenges_authorization_status", "authorization_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    authorization_id: Mapped[str] = mapped_column(ForeignKey("acme_authorizations.id"))
    type: Mapped[str] = mapped_column(String(16))  # http-01 | dns-01 | tls-alpn-01
    token: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # pending|processing|valid|invalid
    validated_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)  # JSON problem document
    validation_record: Mapped[str | None] = mapped_column(Text)  # JSON list
    updated_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())


class AcmeEabKey(Base):
    """An External Account Binding key (§7.3.4), made by `certwright eab create`."""

    __tablename__ = "acme_eab_keys"

    key_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hmac_key: Mapped[bytes] = mapped_column(LargeBinary)
    # Space-separated DNS suffixes / IP ranges its accounts may request; empty: no limit.
    allowed_names: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str | None] = mapped_column(String(128))
    account_id: Mapped[int | None] = mapped_column(Integer)  # bound once, to one account
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())


# -- OCSP (RFC 6960) ----------------------------------------------------------------------------


class OcspResponse(Base):
    """A pre-signed OCSP response, served from here so answers survive an HSM outage."""

    __tablename__ = "ocsp_responses"
    __table_args__ = (
        UniqueConstraint("issuer_id", "serial"),
        Index("ix_ocsp_responses_next_update", "next_update"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    issuer_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"))
    serial: Mapped[str] = mapped_column(String(48))
    cert_status: Mapped[str] = mapped_column(String(16))  # good | revoked
    der: Mapped[bytes] = mapped_column(LargeBinary)
    this_update: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    next_update: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    produced_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())


class OcspResponder(Base):
    """A delegated OCSP responder certificate (RFC 6960 §4.2.2.2) whose key is in the HSM."""

    __tablename__ = "ocsp_responders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    issuer_id: Mapped[str] = mapped_column(ForeignKey("issuers.id"), index=True)
    key_label: Mapped[str] = mapped_column(String(128))
    cert_der: Mapped[bytes] = mapped_column(LargeBinary)
    not_before: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime())
