"""The database schema, as typed SQLAlchemy 2 models. Changes go through Alembic migrations."""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
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
    spki_sha256: Mapped[str] = mapped_column(String(64), index=True)
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
    """An append-only record of something that happened: who did what to what, and how it went."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[datetime.datetime] = mapped_column(UTCDateTime(), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(16))  # "success" | "refused" | "failed"
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON


def as_dict(row: Any) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in row.__table__.columns}
