"""Storage of ACME objects (RFC 8555 §7.1): nonces, accounts, orders, authorizations,
challenges and EAB keys. Shared by every server process: nothing ACME needs lives in memory.

State changes are conditional UPDATEs whose row counts are checked, so two processes racing on
one order (two finalize requests at once) cannot both win.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)

from ca.errors import CAError, Kind
from ca.policy import normalize_name_restriction
from ca.storage.models import (
    AcmeAccount,
    AcmeAuthorization,
    AcmeChallenge,
    AcmeEabKey,
    AcmeNonce,
    AcmeOrder,
    AcmeOrderAuthorization,
    Certificate,
    CertificateName,
    Secret,
)
from ca.storage.prepared import Prepared
from ca.storage.store import Storage, rowcount


def new_id() -> str:
    """A random, unguessable object id for URLs (as Pebble does: no enumerable counters)."""
    return secrets.token_urlsafe(16)


@dataclasses.dataclass(frozen=True)
class Account:
    id: int
    key_thumbprint: str
    jwk: dict[str, Any]
    status: str
    contact: list[str]
    tos_agreed: bool
    eab_key_id: str | None
    created_at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class Challenge:
    id: str
    authorization_id: str
    type: str
    token: str
    status: str
    validated_at: datetime.datetime | None
    error: dict[str, Any] | None
    validation_record: list[dict[str, Any]] | None


@dataclasses.dataclass(frozen=True)
class Authorization:
    id: str
    account_id: int
    identifier_type: str
    identifier_value: str
    wildcard: bool
    status: str
    expires: datetime.datetime
    validated_at: datetime.datetime | None
    challenges: tuple[Challenge, ...]


@dataclasses.dataclass(frozen=True)
class Validation:
    """How one authorization of an order was validated (for the CAA recheck at finalize)."""

    identifier_type: str
    identifier_value: str
    wildcard: bool
    validated_at: datetime.datetime | None
    method: str | None  # the type of the challenge that validated it


@dataclasses.dataclass(frozen=True)
class Order:
    id: str
    account_id: int
    status: str
    expires: datetime.datetime
    identifiers: list[dict[str, str]]
    not_before: datetime.datetime | None
    not_after: datetime.datetime | None
    profile: str
    replaces: str | None
    error: dict[str, Any] | None
    certificate_serial: str | None
    authorization_ids: tuple[str, ...]
    created_at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class NewAuthorization:
    identifier_type: str
    identifier_value: str
    wildcard: bool
    challenge_types: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class EabKey:
    key_id: str
    hmac_key: bytes
    allowed_names: tuple[str, ...]
    owner: str | None
    account_id: int | None


# The per-request reads, built once (see Storage's issuance statements for why).
_ACCOUNT_BY_ID = Prepared(select(AcmeAccount.__table__).where(AcmeAccount.id == bindparam("id")))
_ORDER_BY_ID = Prepared(select(AcmeOrder.__table__).where(AcmeOrder.id == bindparam("id")))
# Sorted in Python, not by the database: PostgreSQL's collation orders ids its own way, and
# `create_order` must list them as `order` does.
_ORDER_AUTHZ_IDS = Prepared(
    select(AcmeOrderAuthorization.authorization_id).where(
        AcmeOrderAuthorization.order_id == bindparam("id")
    )
)
_AUTHZ_BY_ID = Prepared(
    select(AcmeAuthorization.__table__).where(AcmeAuthorization.id == bindparam("id"))
)
_AUTHZ_CHALLENGES = Prepared(
    select(AcmeChallenge.__table__)
    .where(AcmeChallenge.authorization_id == bindparam("id"))
    .order_by(AcmeChallenge.type)
)
_USE_NONCE = Prepared(insert(AcmeNonce))
_CHALLENGE_BY_ID = Prepared(
    select(AcmeChallenge.__table__).where(AcmeChallenge.id == bindparam("id"))
)
_ORDER_VALIDATIONS = Prepared(
    select(
        AcmeAuthorization.identifier_type,
        AcmeAuthorization.identifier_value,
        AcmeAuthorization.wildcard,
        AcmeAuthorization.validated_at,
        AcmeChallenge.type,
    )
    .join(AcmeOrderAuthorization, AcmeOrderAuthorization.authorization_id == AcmeAuthorization.id)
    .outerjoin(
        AcmeChallenge,
        and_(
            AcmeChallenge.authorization_id == AcmeAuthorization.id,
            AcmeChallenge.status == "valid",
        ),
    )
    .where(AcmeOrderAuthorization.order_id == bindparam("b_id"))
    .order_by(AcmeAuthorization.id)
)
_REUSABLE_AUTHZ = Prepared(
    select(AcmeAuthorization.id, AcmeAuthorization.expires)
    .where(
        AcmeAuthorization.account_id == bindparam("b_account"),
        AcmeAuthorization.identifier_type == bindparam("b_type"),
        AcmeAuthorization.identifier_value == bindparam("b_value"),
        AcmeAuthorization.wildcard == bindparam("b_wildcard"),
        AcmeAuthorization.status == "valid",
        AcmeAuthorization.expires > bindparam("b_expires_after"),
        AcmeAuthorization.validated_at >= bindparam("b_validated_after"),
    )
    .order_by(AcmeAuthorization.expires.desc())
    .limit(1)
)

# The per-request state changes, built once too and run on Core connections (bind parameter
# names start with b_: UPDATE reserves the columns' own names).
_INSERT_AUTHZ = Prepared(insert(AcmeAuthorization))
_INSERT_CHALLENGE = Prepared(insert(AcmeChallenge))
_INSERT_ORDER = Prepared(insert(AcmeOrder))
_INSERT_ORDER_AUTHZ = Prepared(insert(AcmeOrderAuthorization))
_START_CHALLENGE = Prepared(
    update(AcmeChallenge)
    .where(AcmeChallenge.id == bindparam("b_id"), AcmeChallenge.status == "pending")
    .values(status="processing", updated_at=bindparam("b_now"))
)
_FINISH_CHALLENGE = Prepared(
    update(AcmeChallenge)
    .where(AcmeChallenge.id == bindparam("b_id"), AcmeChallenge.status == "processing")
    .values(
        status=bindparam("b_status"),
        validated_at=bindparam("b_validated"),
        error=bindparam("b_error"),
        validation_record=bindparam("b_record"),
        updated_at=bindparam("b_now"),
    )
    .returning(AcmeChallenge.authorization_id)
)
_SETTLE_AUTHZ = Prepared(
    update(AcmeAuthorization)
    .where(AcmeAuthorization.id == bindparam("b_id"), AcmeAuthorization.status == "pending")
    .values(
        status=bindparam("b_status"),
        validated_at=bindparam("b_validated"),
        # A new expiry when one is given (a valid authorization's), else the one it has.
        expires=func.coalesce(
            bindparam("b_expires", type_=AcmeAuthorization.expires.type),
            AcmeAuthorization.expires,
        ),
    )
)
_AUTHZ_ORDER_IDS = Prepared(
    select(AcmeOrderAuthorization.order_id).where(
        AcmeOrderAuthorization.authorization_id == bindparam("b_id")
    )
)
_ORDER_AUTHZ_STATUSES = Prepared(
    select(AcmeAuthorization.status)
    .join(AcmeOrderAuthorization, AcmeOrderAuthorization.authorization_id == AcmeAuthorization.id)
    .where(AcmeOrderAuthorization.order_id == bindparam("b_id"))
)
_PENDING_ORDER_TO = Prepared(
    update(AcmeOrder)
    .where(AcmeOrder.id == bindparam("b_id"), AcmeOrder.status == "pending")
    .values(status=bindparam("b_status"), error=bindparam("b_error"))
)
# Pending or ready (Prepared takes no IN lists).
_LIVE = or_(AcmeOrder.status == "pending", AcmeOrder.status == "ready")
# §7.1.6: an authorization gone invalid (or deactivated, §7.5.2) takes a ready order with it.
_LIVE_ORDER_TO_INVALID = Prepared(
    update(AcmeOrder)
    .where(AcmeOrder.id == bindparam("b_id"), _LIVE)
    .values(status="invalid", error=bindparam("b_error"))
)
# Expired orders that still name `replaces` (expiry is worked out when an order is read), so
# that they no longer hold RFC 9773's one-live-order-per-certificate index.
_EXPIRED_REPLACING_TO_INVALID = Prepared(
    update(AcmeOrder)
    .where(
        AcmeOrder.replaces == bindparam("b_replaces"),
        # Implied by _LIVE; written as the partial index's own literal term so SQLite uses it.
        AcmeOrder.status != literal_column("'invalid'"),
        _LIVE,
        AcmeOrder.expires <= bindparam("b_now"),
    )
    .values(status="invalid")
)
# ready → processing only while every authorization of the order is valid and unexpired: one
# deactivated or expired since the order became ready (or in a race with it) stops issuance.
_BEGIN_FINALIZE = Prepared(
    update(AcmeOrder)
    .where(
        AcmeOrder.id == bindparam("b_id"),
        AcmeOrder.status == "ready",
        AcmeOrder.expires > bindparam("b_now"),
        ~select(AcmeOrderAuthorization.authorization_id)
        .join(AcmeAuthorization, AcmeAuthorization.id == AcmeOrderAuthorization.authorization_id)
        .where(
            AcmeOrderAuthorization.order_id == AcmeOrder.id,
            or_(
                AcmeAuthorization.status != "valid",
                AcmeAuthorization.expires <= bindparam("b_now"),
            ),
        )
        .exists(),
    )
    .values(status="processing", processing_since=bindparam("b_now"))
)
_PROCESSING_ORDER_TO = Prepared(
    update(AcmeOrder)
    .where(AcmeOrder.id == bindparam("b_id"), AcmeOrder.status == "processing")
    .values(
        status=bindparam("b_status"),
        error=bindparam("b_error"),
        certificate_serial=bindparam("b_serial"),
    )
)


def _account(row: Any) -> Account:
    return Account(
        id=row.id,
        key_thumbprint=row.key_thumbprint,
        jwk=json.loads(row.jwk),
        status=row.status,
        contact=json.loads(row.contact),
        tos_agreed=row.tos_agreed,
        eab_key_id=row.eab_key_id,
        created_at=row.created_at,
    )


def _challenge(row: Any) -> Challenge:
    return Challenge(
        id=row.id,
        authorization_id=row.authorization_id,
        type=row.type,
        token=row.token,
        status=row.status,
        validated_at=row.validated_at,
        error=json.loads(row.error) if row.error else None,
        validation_record=json.loads(row.validation_record) if row.validation_record else None,
    )


class AcmeStore:
    """The ACME side of the one storage layer."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.clock = storage.clock
        self._key: bytes | None = None

    # -- nonces (§6.5) ----------------------------------------------------------------------
    #
    # A nonce is base64url(time || 12 random octets || MAC(time || random)): issuing one writes
    # nothing; redeeming one checks MAC and age, then records it as used (a primary key, so a
    # nonce is good once across every process). That is one database write per request.

    _NONCE_TIME = 8
    _NONCE_RANDOM = 12
    _NONCE_MAC = 16

    def _nonce_key(self) -> bytes:
        if self._key is None:
            self._key = self.secret("acme-nonce-mac")
        return self._key

    def secret(self, name: str) -> bytes:
        """A 32-byte secret shared by every process, created by whichever asks first."""
        with self.storage.transaction() as session:
            row = session.get(Secret, name)
            if row is not None:
                return row.value
        try:
            with self.storage.transaction() as session:
                session.add(
                    Secret(name=name, value=secrets.token_bytes(32), created_at=self.clock.now())
                )
        except CAError as exc:
            if exc.kind is not Kind.CONFLICT:
                raise  # a CONFLICT means another process made it first: read theirs
        with self.storage.transaction() as session:
            return session.get_one(Secret, name).value

    def new_nonce(self) -> str:
        stamp = int(self.clock.now().timestamp()).to_bytes(self._NONCE_TIME, "big")
        body = stamp + secrets.token_bytes(self._NONCE_RANDOM)
        mac = hmac.new(self._nonce_key(), body, hashlib.sha256).digest()[: self._NONCE_MAC]
        return base64.urlsafe_b64encode(body + mac).decode().rstrip("=")

    def consume_nonce(self, value: str, lifetime: datetime.timedelta) -> bool:
        """True exactly once for a nonce this CA issued within `lifetime`."""
        size = self._NONCE_TIME + self._NONCE_RANDOM + self._NONCE_MAC
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (ValueError, binascii.Error):
            return False
        if len(raw) != size:
            return False
        body, mac = raw[: -self._NONCE_MAC], raw[-self._NONCE_MAC :]
        expected = hmac.new(self._nonce_key(), body, hashlib.sha256).digest()[: self._NONCE_MAC]
        if not hmac.compare_digest(mac, expected):
            return False
        issued = datetime.datetime.fromtimestamp(
            int.from_bytes(body[: self._NONCE_TIME], "big"), datetime.UTC
        )
        now = self.clock.now()
        if not now - lifetime <= issued <= now + datetime.timedelta(minutes=1):
            return False
        try:
            with self.storage._core(flush_log=False) as connection:
                _USE_NONCE.run(connection, {"value": value, "expires_at": issued + lifetime})
        except CAError as exc:
            if exc.kind is Kind.CONFLICT:
                return False  # already used
            raise
        return True

    def purge_nonces(self) -> int:
        """Forget used nonces that would be refused as expired anyway."""
        with self.storage.transaction(durable=False) as session:
            result = session.execute(
                delete(AcmeNonce).where(AcmeNonce.expires_at <= self.clock.now())
            )
            return rowcount(result)

    # -- accounts (§7.3) --------------------------------------------------------------------

    def create_account(
        self,
        *,
        thumbprint: str,
        jwk: dict[str, Any],
        contact: Sequence[str],
        tos_agreed: bool,
        eab_key_id: str | None,
        ip: str,
    ) -> tuple[Account, bool]:
        """The account for this key, created if new; returns (account, created).

        When EAB binds the account, the EAB key is bound in the same transaction so one key
        can never bind two accounts.
        """
        with self.storage.transaction() as session:
            existing = session.scalar(
                select(AcmeAccount).where(AcmeAccount.key_thumbprint == thumbprint)
            )
            if existing is not None:
                return _account(existing), False
            row = AcmeAccount(
                key_thumbprint=thumbprint,
                jwk=json.dumps(jwk, sort_keys=True),
                status="valid",
                contact=json.dumps(list(contact)),
                tos_agreed=tos_agreed,
                eab_key_id=eab_key_id,
                created_at=self.clock.now(),
                created_ip=ip,
            )
            session.add(row)
            session.flush()
            if eab_key_id is not None:
                bound = session.execute(
                    update(AcmeEabKey)
                    .where(AcmeEabKey.key_id == eab_key_id, AcmeEabKey.account_id.is_(None))
                    .values(account_id=row.id)
                )
                if rowcount(bound) != 1:
                    raise CAError(Kind.CONFLICT, "this external account key is already bound")
            self.storage._audit(
                session,
                f"acme:account/{row.id}",
                "acme.account.create",
                f"account:{row.id}",
                "success",
                {"contact": list(contact), "eab": eab_key_id},
            )
            return _account(row), True

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A Core connection for the hot reads of every request (no ORM identity map)."""
        with self.storage.read() as connection:
            yield connection

    def account(self, account_id: int) -> Account | None:
        with self._read() as connection:
            row = _ACCOUNT_BY_ID.run(connection, {"id": account_id}).first()
            return _account(row) if row else None

    def account_by_thumbprint(self, thumbprint: str) -> Account | None:
        with self.storage.transaction() as session:
            row = session.scalar(
                select(AcmeAccount).where(AcmeAccount.key_thumbprint == thumbprint)
            )
            return _account(row) if row else None

    def update_account(
        self, account_id: int, *, contact: Sequence[str] | None = None, status: str | None = None
    ) -> Account:
        values: dict[str, Any] = {}
        if contact is not None:
            values["contact"] = json.dumps(list(contact))
        if status is not None:
            values["status"] = status
        with self.storage.transaction() as session:
            if values:
                session.execute(
                    update(AcmeAccount)
                    .where(AcmeAccount.id == account_id, AcmeAccount.status == "valid")
                    .values(**values)
                )
                self.storage._audit(
                    session,
                    f"acme:account/{account_id}",
                    "acme.account.update",
                    f"account:{account_id}",
                    "success",
                    {k: v for k, v in values.items()},
                )
            return _account(session.get_one(AcmeAccount, account_id))

    def change_key(self, account_id: int, thumbprint: str, jwk: dict[str, Any]) -> None:
        """Roll the account's key (§7.3.5); CONFLICT when another account has the new key."""
        with self.storage.transaction() as session:
            session.execute(
                update(AcmeAccount)
                .where(AcmeAccount.id == account_id)
                .values(key_thumbprint=thumbprint, jwk=json.dumps(jwk, sort_keys=True))
            )
            self.storage._audit(
                session,
                f"acme:account/{account_id}",
                "acme.account.key_change",
                f"account:{account_id}",
                "success",
                {"thumbprint": thumbprint},
            )

    # -- EAB (§7.3.4) -----------------------------------------------------------------------

    def create_eab_key(self, owner: str | None, allowed_names: Sequence[str], actor: str) -> EabKey:
        """A new key; `allowed_names` (DNS suffixes, IP networks) restrict what its account may
        request, and are refused here, before anything is stored, unless well formed."""
        allowed_names = tuple(dict.fromkeys(map(normalize_name_restriction, allowed_names)))
        key = EabKey(
            key_id=f"kid-{secrets.token_urlsafe(12)}",
            hmac_key=secrets.token_bytes(32),
            allowed_names=allowed_names,
            owner=owner,
            account_id=None,
        )
        with self.storage.transaction() as session:
            session.add(
                AcmeEabKey(
                    key_id=key.key_id,
                    hmac_key=key.hmac_key,
                    allowed_names=" ".join(allowed_names),
                    owner=owner,
                    account_id=None,
                    created_at=self.clock.now(),
                )
            )
            self.storage._audit(
                session,
                actor,
                "acme.eab.create",
                f"eab:{key.key_id}",
                "success",
                {"owner": owner, "allowed_names": list(allowed_names)},
            )
        return key

    def eab_key(self, key_id: str) -> EabKey | None:
        with self.storage.transaction() as session:
            row = session.get(AcmeEabKey, key_id)
            if row is None:
                return None
            return EabKey(
                key_id=row.key_id,
                hmac_key=row.hmac_key,
                allowed_names=tuple(row.allowed_names.split()),
                owner=row.owner,
                account_id=row.account_id,
            )

    # -- orders and authorizations (§7.4, §7.5) ----------------------------------------------

    def reusable_authorization(
        self,
        account_id: int,
        identifier_type: str,
        value: str,
        wildcard: bool,
        validated_after: datetime.datetime,
    ) -> tuple[str, datetime.datetime] | None:
        """A valid, unexpired authorization of this account for this identifier (§7.1.4 allows
        the server to reuse one), validated no earlier than `validated_after`: (id, expires)."""
        params = {
            "b_account": account_id,
            "b_type": identifier_type,
            "b_value": value,
            "b_wildcard": wildcard,
            "b_expires_after": self.clock.now() + datetime.timedelta(hours=1),
            "b_validated_after": validated_after,
        }
        with self._read() as connection:
            found = _REUSABLE_AUTHZ.run(connection, params).first()
            return (str(found.id), found.expires) if found is not None else None

    def create_order(
        self,
        *,
        account_id: int,
        identifiers: Sequence[dict[str, str]],
        reused: Sequence[str],
        new: Sequence[NewAuthorization],
        profile: str,
        expires: datetime.datetime,
        authz_expires: datetime.datetime,
        not_before: datetime.datetime | None,
        not_after: datetime.datetime | None,
        replaces: str | None,
    ) -> Order:
        """An order with its authorizations (reused ones plus new pending ones), atomically."""
        now = self.clock.now()
        order = Order(
            id=new_id(),
            account_id=account_id,
            status="ready" if not new else "pending",
            expires=expires,
            identifiers=[dict(i) for i in identifiers],
            not_before=not_before,
            not_after=not_after,
            profile=profile,
            replaces=replaces,
            error=None,
            certificate_serial=None,
            authorization_ids=(),
            created_at=now,
        )
        authz_rows: list[dict[str, Any]] = []
        challenge_rows: list[dict[str, Any]] = []
        for spec in new:
            authz_id = new_id()
            authz_rows.append(
                {
                    "id": authz_id,
                    "account_id": account_id,
                    "identifier_type": spec.identifier_type,
                    "identifier_value": spec.identifier_value,
                    "wildcard": spec.wildcard,
                    "status": "pending",
                    "expires": authz_expires,
                    "validated_at": None,
                    "created_at": now,
                }
            )
            challenge_rows.extend(
                {
                    "id": new_id(),
                    "authorization_id": authz_id,
                    "type": challenge_type,
                    # §8.1: at least 128 bits of entropy, base64url.
                    "token": secrets.token_urlsafe(32),
                    "status": "pending",
                    "validated_at": None,
                    "error": None,
                    "validation_record": None,
                    "updated_at": now,
                }
                for challenge_type in spec.challenge_types
            )
        # As `order()` lists them.
        authz_ids = tuple(sorted([*reused, *(row["id"] for row in authz_rows)]))
        with self.storage.write(durable=False) as connection:
            if replaces is not None:
                _EXPIRED_REPLACING_TO_INVALID.run(
                    connection, {"b_replaces": replaces, "b_now": now}
                )
            if authz_rows:
                _INSERT_AUTHZ.run(connection, authz_rows)
                _INSERT_CHALLENGE.run(connection, challenge_rows)
            _INSERT_ORDER.run(
                connection,
                {
                    "id": order.id,
                    "account_id": account_id,
                    "status": order.status,
                    "expires": expires,
                    "identifiers": json.dumps(order.identifiers),
                    "not_before": not_before,
                    "not_after": not_after,
                    "profile": profile,
                    "replaces": replaces,
                    "error": None,
                    "certificate_serial": None,
                    "created_at": now,
                    "processing_since": None,
                },
            )
            _INSERT_ORDER_AUTHZ.run(
                connection,
                [{"order_id": order.id, "authorization_id": a} for a in authz_ids],
            )
        return dataclasses.replace(order, authorization_ids=authz_ids)

    def order(self, order_id: str) -> Order | None:
        with self._read() as connection:
            row = _ORDER_BY_ID.run(connection, {"id": order_id}).first()
            if row is None:
                return None
            authz_ids = tuple(sorted(_ORDER_AUTHZ_IDS.run(connection, {"id": order_id}).scalars()))
            return self._order(row, authz_ids)

    def _order(self, row: Any, authz_ids: tuple[str, ...]) -> Order:
        status = row.status
        if status in ("pending", "ready") and row.expires <= self.clock.now():
            status = "invalid"  # §7.1.6: an expired order is invalid
        return Order(
            id=row.id,
            account_id=row.account_id,
            status=status,
            expires=row.expires,
            identifiers=json.loads(row.identifiers),
            not_before=row.not_before,
            not_after=row.not_after,
            profile=row.profile,
            replaces=row.replaces,
            error=json.loads(row.error) if row.error else None,
            certificate_serial=row.certificate_serial,
            authorization_ids=authz_ids,
            created_at=row.created_at,
        )

    def authorization(self, authz_id: str) -> Authorization | None:
        with self._read() as connection:
            row = _AUTHZ_BY_ID.run(connection, {"id": authz_id}).first()
            if row is None:
                return None
            challenges = tuple(
                _challenge(c) for c in _AUTHZ_CHALLENGES.run(connection, {"id": authz_id})
            )
            status = row.status
            if status in ("pending", "valid") and row.expires <= self.clock.now():
                status = "expired"
            return Authorization(
                id=row.id,
                account_id=row.account_id,
                identifier_type=row.identifier_type,
                identifier_value=row.identifier_value,
                wildcard=row.wildcard,
                status=status,
                expires=row.expires,
                validated_at=row.validated_at,
                challenges=challenges,
            )

    def order_validations(self, order_id: str) -> list[Validation]:
        """One row per authorization of the order, with the challenge type that validated it."""
        with self._read() as connection:
            return [
                Validation(row[0], row[1], row[2], row[3], row[4])
                for row in _ORDER_VALIDATIONS.run(connection, {"b_id": order_id})
            ]

    def challenge(self, challenge_id: str) -> Challenge | None:
        with self._read() as connection:
            row = _CHALLENGE_BY_ID.run(connection, {"id": challenge_id}).first()
            return _challenge(row) if row else None

    def start_challenge(self, challenge_id: str) -> bool:
        """pending → processing, once (§7.5.1: a repeated POST changes nothing)."""
        with self.storage.write(durable=False) as connection:
            result = _START_CHALLENGE.run(
                connection, {"b_id": challenge_id, "b_now": self.clock.now()}
            )
            return rowcount(result) == 1

    def finish_challenge(
        self,
        challenge_id: str,
        *,
        valid: bool,
        error: dict[str, Any] | None,
        record: list[dict[str, Any]],
        now: datetime.datetime,
        valid_until: datetime.datetime | None = None,
    ) -> bool:
        """Record a validation's outcome and carry it to the authorization and its orders.

        §7.1.6: a valid challenge makes its authorization valid, until `valid_until` (its
        expiry as a pending one, if not given); an invalid one makes it invalid, and an order
        with an invalid authorization is invalid. An order whose every authorization is valid
        becomes ready. False when the challenge was not processing (another process finished
        it): nothing is recorded then.
        """
        with self.storage.write(durable=False) as connection:
            authz_id = _FINISH_CHALLENGE.run(
                connection,
                {
                    "b_id": challenge_id,
                    "b_status": "valid" if valid else "invalid",
                    "b_validated": now if valid else None,
                    "b_error": json.dumps(error) if error else None,
                    "b_record": json.dumps(record),
                    "b_now": now,
                },
            ).scalar()
            if authz_id is None:
                return False  # someone else finished it
            _SETTLE_AUTHZ.run(
                connection,
                {
                    "b_id": authz_id,
                    "b_status": "valid" if valid else "invalid",
                    "b_validated": now if valid else None,
                    "b_expires": valid_until if valid else None,
                },
            )
            for order_id in list(_AUTHZ_ORDER_IDS.run(connection, {"b_id": authz_id}).scalars()):
                self._settle_order(connection, order_id, error)
            return True

    def _settle_order(
        self, connection: Connection, order_id: str, error: dict[str, Any] | None
    ) -> None:
        statuses = list(_ORDER_AUTHZ_STATUSES.run(connection, {"b_id": order_id}).scalars())
        if any(s in ("invalid", "deactivated", "revoked", "expired") for s in statuses):
            _LIVE_ORDER_TO_INVALID.run(
                connection, {"b_id": order_id, "b_error": json.dumps(error) if error else None}
            )
        elif statuses and all(s == "valid" for s in statuses):
            _PENDING_ORDER_TO.run(
                connection, {"b_id": order_id, "b_status": "ready", "b_error": None}
            )

    def deactivate_authorization(self, authz_id: str) -> bool:
        """§7.5.2: a pending or valid authorization may be deactivated by its account."""
        with self.storage.write(durable=False) as connection:
            result = connection.execute(
                update(AcmeAuthorization)
                .where(
                    AcmeAuthorization.id == authz_id,
                    AcmeAuthorization.status.in_(("pending", "valid")),
                )
                .values(status="deactivated")
            )
            if rowcount(result) != 1:
                return False
            for order_id in list(_AUTHZ_ORDER_IDS.run(connection, {"b_id": authz_id}).scalars()):
                self._settle_order(connection, order_id, None)
            return True

    def invalidate_order(self, order_id: str, error: dict[str, Any]) -> None:
        """pending or ready → invalid, with its error (§7.1.6)."""
        with self.storage.write(durable=False) as connection:
            _LIVE_ORDER_TO_INVALID.run(connection, {"b_id": order_id, "b_error": json.dumps(error)})

    def begin_finalize(self, order_id: str) -> bool:
        """ready → processing, exactly once (of two finalize requests only one proceeds), and
        only while every authorization of the order is still valid and unexpired."""
        with self.storage.write(durable=False) as connection:
            result = _BEGIN_FINALIZE.run(connection, {"b_id": order_id, "b_now": self.clock.now()})
            return rowcount(result) == 1

    def complete_order(self, order_id: str, serial: str, connection: Connection) -> None:
        """processing → valid with its certificate, in the caller's transaction (the one that
        records the certificate, see CertificateAuthority.issue)."""
        _PROCESSING_ORDER_TO.run(
            connection, {"b_id": order_id, "b_status": "valid", "b_error": None, "b_serial": serial}
        )

    def fail_order(self, order_id: str, error: dict[str, Any], *, back_to_ready: bool) -> None:
        """A finalize that failed: invalid with its error, or (for a transient failure such
        as the HSM or database being down) ready again so the client may retry."""
        with self.storage.write(durable=False) as connection:
            _PROCESSING_ORDER_TO.run(
                connection,
                {
                    "b_id": order_id,
                    "b_status": "ready" if back_to_ready else "invalid",
                    "b_error": None if back_to_ready else json.dumps(error),
                    "b_serial": None,
                },
            )

    def order_replacing(self, replaces: str) -> str | None:
        """The live order (not invalid, not expired) that already names this ARI certificate
        id (RFC 9773 §5)."""
        with self.storage.transaction() as session:
            return session.scalar(
                select(AcmeOrder.id)
                .where(
                    AcmeOrder.replaces == replaces,
                    AcmeOrder.status != "invalid",
                    or_(
                        AcmeOrder.status.in_(("processing", "valid")),
                        AcmeOrder.expires > self.clock.now(),
                    ),
                )
                .limit(1)
            )

    def account_orders(self, account_id: int, limit: int = 1000) -> list[str]:
        """§7.1.2.1: the account's orders; pending and newest first."""
        with self.storage.transaction() as session:
            return list(
                session.scalars(
                    select(AcmeOrder.id)
                    .where(AcmeOrder.account_id == account_id)
                    .order_by(AcmeOrder.created_at.desc())
                    .limit(limit)
                )
            )

    # -- rate-limit counts (shared by every process because they are counts of rows) --------

    def count_orders_since(self, account_id: int, since: datetime.datetime) -> int:
        with self.storage.transaction() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(AcmeOrder)
                    .where(AcmeOrder.account_id == account_id, AcmeOrder.created_at >= since)
                )
                or 0
            )

    def count_accounts_from_ip_since(self, ip: str, since: datetime.datetime) -> int:
        with self.storage.transaction() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(AcmeAccount)
                    .where(AcmeAccount.created_ip == ip, AcmeAccount.created_at >= since)
                )
                or 0
            )

    def count_failed_validations_since(
        self, account_id: int, value: str, since: datetime.datetime
    ) -> int:
        with self.storage.transaction() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(AcmeChallenge)
                    .join(
                        AcmeAuthorization,
                        AcmeAuthorization.id == AcmeChallenge.authorization_id,
                    )
                    .where(
                        AcmeAuthorization.account_id == account_id,
                        AcmeAuthorization.identifier_value == value,
                        AcmeChallenge.status == "invalid",
                        AcmeChallenge.updated_at >= since,
                    )
                )
                or 0
            )

    def count_certificates_for_domain_since(
        self, registered_domain: str, since: datetime.datetime
    ) -> int:
        """Certificates issued since `since` carrying the domain or a name under it."""
        with self.storage.transaction() as session:
            return int(
                session.scalar(
                    select(func.count(func.distinct(Certificate.id)))
                    .select_from(Certificate)
                    .join(CertificateName, CertificateName.certificate_id == Certificate.id)
                    .where(
                        (CertificateName.name == registered_domain)
                        | CertificateName.name.like(f"%.{registered_domain}"),
                        Certificate.created_at >= since,
                        Certificate.status.in_(("issued", "revoked")),
                    )
                )
                or 0
            )

    def valid_authorization_values(self, account_id: int, now: datetime.datetime) -> set[str]:
        """Identifier values this account holds valid, unexpired authorizations for (§7.6)."""
        with self.storage.transaction() as session:
            return set(
                session.scalars(
                    select(AcmeAuthorization.identifier_value).where(
                        AcmeAuthorization.account_id == account_id,
                        AcmeAuthorization.status == "valid",
                        AcmeAuthorization.expires > now,
                    )
                )
            )

    def recover_stale_orders(self, older_than: datetime.datetime) -> int:
        """Orders a finalize left `processing` since before `older_than` without a certificate
        (its process died, or the database went away before the failure was written back)
        are `ready` again, so the client can finalize once more. Their reserved serial stays
        `pending` on record; a retry draws a new one."""
        with self.storage.transaction(durable=False) as session:
            result = session.execute(
                update(AcmeOrder)
                .where(
                    AcmeOrder.status == "processing",
                    AcmeOrder.certificate_serial.is_(None),
                    AcmeOrder.processing_since < older_than,
                )
                .values(status="ready", processing_since=None)
            )
            return rowcount(result)

    def stale_processing_challenges(self, older_than: datetime.datetime) -> list[str]:
        """Challenges left `processing` by a process that died mid-validation."""
        with self.storage.transaction() as session:
            return list(
                session.scalars(
                    select(AcmeChallenge.id).where(
                        AcmeChallenge.status == "processing",
                        AcmeChallenge.updated_at < older_than,
                    )
                )
            )
