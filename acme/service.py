"""The ACME registration authority: what each RFC 8555 request does, behind the web edge.

The web edge (acme/web.py) authenticates the JWS and maps errors to problem documents; this
module decides. All state is in the database (ca.storage.acme_store), so any server process
can serve any request of a flow. Challenge validation runs in a thread pool of the process that
received the challenge POST, off the request path; a process that dies mid-validation leaves a
`processing` challenge that `recover_stale_challenges` re-runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import ipaddress
import logging
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from acme import jws, problems
from acme.caa import check_caa
from acme.problems import AcmeProblem
from acme.validation import (
    ValidationConfig,
    ValidationError,
    ValidationRecord,
    validate_dns01,
    validate_http01,
    validate_tls_alpn01,
)
from ca import certs, policy
from ca.errors import CAError, Kind
from ca.policy import Identifier
from ca.runtime import Runtime
from ca.storage import CertificateRecord, IssuerRecord
from ca.storage.acme_store import (
    Account,
    AcmeStore,
    Authorization,
    Challenge,
    NewAuthorization,
    Order,
)
from ca.storage.inventory import mark_ari_checked

log = logging.getLogger(__name__)

# RFC 8555 §7.6 lets the server choose; subscribers may state these (Let's Encrypt's set).
SUBSCRIBER_REASONS = frozenset({0, 1, 3, 4, 5})
# CAA must be rechecked at issuance when the validation is older than this (CA/B BR 3.2.2.8).
CAA_RECHECK_AFTER = datetime.timedelta(hours=8)
STALE_CHALLENGE_AFTER = datetime.timedelta(minutes=2)
# A finalize takes well under a second (a CAA recheck at most the DNS timeout); one still
# `processing` after this is gone.
STALE_ORDER_AFTER = datetime.timedelta(minutes=5)


def _object_id_ok(value: str) -> bool:
    """Order, authorization and challenge ids are `secrets.token_urlsafe` strings. Anything
    else is refused before the database sees it: PostgreSQL rejects a NUL in text, which
    would otherwise surface as a storage outage (503) for a hostile URL."""
    return (
        0 < len(value) <= 64
        and value.isascii()
        and value.replace("-", "").replace("_", "").isalnum()
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    """The [acme] configuration, read once."""

    validation: ValidationConfig
    challenge_wait: float
    terms_of_service: str
    website: str
    caa_identities: tuple[str, ...]
    external_account_required: bool
    order_lifetime: datetime.timedelta
    authorization_lifetime: datetime.timedelta
    authorization_reuse: datetime.timedelta
    default_profile: str
    orders_per_account_per_hour: int
    certificates_per_domain_per_week: int
    failed_validations_per_account_per_hour: int
    accounts_per_ip_per_hour: int

    @staticmethod
    def from_runtime(runtime: Runtime) -> Settings:
        def get(key: str) -> Any:
            return runtime.config.get("acme", key)

        return Settings(
            validation=ValidationConfig(
                http01_port=int(get("http01_port")),
                http01_https_port=int(get("http01_https_port")),
                tlsalpn01_port=int(get("tlsalpn01_port")),
                dns_resolver=str(get("dns_resolver")) or None,
                timeout=float(get("validation_timeout_seconds")),
            ),
            challenge_wait=float(get("challenge_wait_seconds")),
            terms_of_service=str(get("terms_of_service")),
            website=str(get("website")),
            caa_identities=tuple(get("caa_identities")),
            external_account_required=bool(get("external_account_required")),
            order_lifetime=datetime.timedelta(hours=float(get("order_lifetime_hours"))),
            authorization_lifetime=datetime.timedelta(
                hours=float(get("authorization_lifetime_hours"))
            ),
            authorization_reuse=datetime.timedelta(hours=float(get("authorization_reuse_hours"))),
            default_profile=str(get("default_profile")),
            orders_per_account_per_hour=int(get("orders_per_account_per_hour")),
            certificates_per_domain_per_week=int(get("certificates_per_domain_per_week")),
            failed_validations_per_account_per_hour=int(
                get("failed_validations_per_account_per_hour")
            ),
            accounts_per_ip_per_hour=int(get("accounts_per_ip_per_hour")),
        )


def identifier_json(identifier: Identifier) -> dict[str, str]:
    return {"type": identifier.type, "value": identifier.value}


def registered_domain(name: str) -> str:
    """The last two labels: the unit the per-domain rate limit counts (no PSL in a private PKI)."""
    labels = name.removeprefix("*.").split(".")
    return ".".join(labels[-2:])


def _serial_octets(serial: int) -> bytes:
    """The content octets of a positive serial's DER INTEGER: minimal, a leading zero octet
    only when the high bit is set."""
    return serial.to_bytes((serial.bit_length() + 8) // 8, "big")


def _ari_id(aki: bytes, serial: int) -> str:
    """RFC 9773 §4.1: base64url(AKI keyIdentifier) "." base64url(serial DER content octets)."""
    return f"{jws.b64url_encode(aki)}.{jws.b64url_encode(_serial_octets(serial))}"


def ari_cert_id(certificate: x509.Certificate) -> str:
    aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    return _ari_id(aki.key_identifier or b"", certificate.serial_number)


def parse_ari_cert_id(cert_id: str) -> tuple[bytes, int]:
    """(AKI key identifier, serial) from an RFC 9773 certificate identifier, which must be the
    one spelling `_ari_id` gives: another (padding, a non-minimal serial) would let one
    certificate go by several names, and `replaces` count it once per name."""
    malformed = problems.malformed("the ARI certificate identifier is malformed")
    try:
        aki_b64, serial_b64 = cert_id.split(".")
        aki = jws.b64url_decode(aki_b64)
        serial = int.from_bytes(jws.b64url_decode(serial_b64), "big")
    except (ValueError, AcmeProblem):
        raise malformed from None
    # RFC 5280 §4.1.2.2: at most 20 octets; no key identifier method gives more than 64.
    if not 0 < len(aki) <= 64 or not 0 < serial < 1 << 159 or _ari_id(aki, serial) != cert_id:
        raise malformed
    return aki, serial


class AcmeService:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = AcmeStore(runtime.storage)
        self.settings = Settings.from_runtime(runtime)
        self.clock = runtime.clock
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._chains: dict[str, list[x509.Certificate]] = {}

    @property
    def authority(self) -> Any:
        return self.runtime.authority

    # -- accounts (§7.3) --------------------------------------------------------------------

    def check_contact(self, contact: Any) -> list[str]:
        """§7.3: contact is a list of URLs; we accept mailto: with one plain address each."""
        if contact is None:
            return []
        if not isinstance(contact, list) or not all(isinstance(c, str) for c in contact):
            raise problems.malformed("contact must be an array of strings")
        for url in contact:
            if not url.startswith("mailto:"):
                raise problems.unsupported_contact(f"only mailto: contacts are supported: {url}")
            address = url[len("mailto:") :]
            local, _, domain = address.partition("@")
            if (
                not local
                or not domain
                or "," in address
                or "?" in address
                or any(c.isspace() or not c.isprintable() for c in address)
                or "." not in domain
            ):
                raise problems.invalid_contact(f"invalid contact address {url!r}")
        return list(contact)

    def new_account(
        self,
        jwk: dict[str, Any],
        payload: Mapping[str, Any],
        url: str,
        ip: str,
    ) -> tuple[Account, bool]:
        thumbprint = jws.jwk_thumbprint(jwk)
        existing = self.store.account_by_thumbprint(thumbprint)
        if payload.get("onlyReturnExisting") is True and existing is None:
            raise problems.account_does_not_exist("no account exists with this key")
        if existing is not None:
            if existing.status != "valid":
                raise problems.account_deactivated(f"the account of this key is {existing.status}")
            return existing, False  # §7.3.1: the same key twice returns the existing account
        contact = self.check_contact(payload.get("contact"))
        if self.settings.terms_of_service and payload.get("termsOfServiceAgreed") is not True:
            # §7.3: a server with terms of service refuses accounts that did not agree.
            raise problems.malformed("you must agree to the terms of service")
        eab_key_id = None
        binding = payload.get("externalAccountBinding")
        if binding is not None:

            def lookup(key_id: str) -> bytes | None:
                key = self.store.eab_key(key_id)
                if key is None or key.account_id is not None:
                    return None  # unknown, or already bound to another account
                return key.hmac_key

            try:
                eab_key_id = jws.verify_eab(jwk, binding, url, lookup)
            except AcmeProblem as problem:
                # A bad binding is a failed authentication: recorded, best effort.
                with contextlib.suppress(CAError):
                    self.runtime.storage.audit(
                        f"acme:{ip}",
                        "acme.authenticate",
                        "externalAccountBinding",
                        "refused",
                        {"type": problem.type, "detail": problem.detail},
                    )
                raise
        elif self.settings.external_account_required:
            raise problems.external_account_required(
                "this server requires an external account binding (certwright eab create)"
            )
        self._rate_limit(
            lambda: self.store.count_accounts_from_ip_since(
                ip, self.clock.now() - datetime.timedelta(hours=1)
            ),
            self.settings.accounts_per_ip_per_hour,
            "new accounts from this IP address per hour",
            3600,
        )
        try:
            return self.store.create_account(
                thumbprint=thumbprint,
                jwk=jwk,
                contact=contact,
                tos_agreed=payload.get("termsOfServiceAgreed") is True,
                eab_key_id=eab_key_id,
                ip=ip,
            )
        except CAError as exc:
            if exc.kind is Kind.CONFLICT:
                raise problems.unauthorized(
                    "external account binding key is already in use"
                ) from None
            raise

    def update_account(self, account: Account, payload: Mapping[str, Any]) -> Account:
        """§7.3.2 update (contact) and §7.3.6 deactivation."""
        status = payload.get("status")
        if status is not None and status != "deactivated":
            raise problems.malformed("an account's status can only be changed to deactivated")
        contact = self.check_contact(payload.get("contact")) if "contact" in payload else None
        return self.store.update_account(account.id, contact=contact, status=status)

    def change_key(self, account: Account, new_jwk: dict[str, Any]) -> None:
        """§7.3.5: a key in use by another account is a 409 naming that account."""
        thumbprint = jws.jwk_thumbprint(new_jwk)
        other = self.store.account_by_thumbprint(thumbprint)
        if other is not None:
            raise KeyInUse(other.id)
        try:
            self.store.change_key(account.id, thumbprint, new_jwk)
        except CAError as exc:
            if exc.kind is Kind.CONFLICT:
                other = self.store.account_by_thumbprint(thumbprint)
                raise KeyInUse(other.id if other else 0) from None
            raise

    # -- orders (§7.4) ----------------------------------------------------------------------

    def _rate_limit(
        self, count: Callable[[], int], limit: int, what: str, retry_after: int
    ) -> None:
        """Refuse with rateLimited when `count()` reached `limit`; a limit of 0 is off and
        costs no query."""
        if limit > 0 and count() >= limit:
            raise problems.rate_limited(
                f"too many {what} (limit {limit})", retry_after_seconds=retry_after
            )

    def _parse_identifiers(self, raw: Any) -> list[Identifier]:
        if not isinstance(raw, list) or not raw:
            raise problems.malformed("identifiers must be a non-empty array")
        if len(raw) > 100:
            raise problems.rejected_identifier("an order may name at most 100 identifiers")
        out = []
        for item in raw:
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("type"), str)
                or not isinstance(item.get("value"), str)
            ):
                raise problems.malformed("each identifier needs a string type and value")
            if item["type"] not in ("dns", "ip"):
                raise problems.unsupported_identifier(
                    f"identifier type {item['type']!r} is not supported", identifier=item
                )
            out.append(Identifier(item["type"], item["value"]))
        return out

    def _check_identifiers(
        self, account: Account, identifiers: Sequence[Identifier], profile_name: str
    ) -> list[Identifier]:
        """Each identifier against the profile (syntax, allowed names) and the EAB binding's
        restrictions; refusals come back as one rejectedIdentifier with subproblems."""
        profile = self.authority.profiles[profile_name]
        allowed_by_eab: tuple[str, ...] = ()
        if account.eab_key_id:
            key = self.store.eab_key(account.eab_key_id)
            allowed_by_eab = key.allowed_names if key else ()
        checked: list[Identifier] = []
        failures: list[AcmeProblem] = []
        for identifier in identifiers:
            try:
                canonical = policy.check_identifier(identifier, profile)
                if allowed_by_eab and not _eab_allows(canonical, allowed_by_eab):
                    raise CAError(
                        Kind.POLICY, f"{canonical.value} is outside this account's binding"
                    )
                checked.append(canonical)
            except CAError as exc:
                failures.append(
                    problems.rejected_identifier(exc.detail, identifier=identifier_json(identifier))
                )
        if failures:
            if len(failures) == 1:
                raise failures[0]
            raise AcmeProblem(
                "rejectedIdentifier",
                f"{len(failures)} identifiers were refused",
                400,
                subproblems=failures,
            )
        return sorted(set(checked))

    def new_order(self, account: Account, payload: Mapping[str, Any]) -> Order:
        identifiers = self._parse_identifiers(payload.get("identifiers"))
        if payload.get("notBefore") is not None or payload.get("notAfter") is not None:
            raise problems.malformed("this server does not support notBefore/notAfter in orders")
        profile_name = payload.get("profile", self.settings.default_profile)
        if not isinstance(profile_name, str) or profile_name not in self.authority.profiles:
            raise AcmeProblem(
                "invalidProfile",
                f"unknown profile {profile_name!r}; see the directory's meta.profiles",
                400,
            )
        checked = self._check_identifiers(account, identifiers, profile_name)
        replaces = payload.get("replaces")
        if replaces is not None:
            self._check_replaces(account, replaces, checked)
        now = self.clock.now()
        self._rate_limit(
            lambda: self.store.count_orders_since(account.id, now - datetime.timedelta(hours=1)),
            self.settings.orders_per_account_per_hour,
            "new orders for this account per hour",
            3600,
        )
        self._limit_certificates_per_domain(checked, now)
        reused: list[str] = []
        # §7.1.3: an order cannot outlive its authorizations (a reused one may expire first).
        expires = now + self.settings.order_lifetime
        new: list[NewAuthorization] = []
        for identifier in checked:
            wildcard = identifier.value.startswith("*.")
            value = identifier.value.removeprefix("*.")
            existing = self.store.reusable_authorization(
                account.id,
                identifier.type,
                value,
                wildcard,
                now - self.settings.authorization_reuse,
            )
            if existing is not None:
                reused.append(existing[0])
                expires = min(expires, existing[1])
                continue
            if wildcard:
                types: tuple[str, ...] = ("dns-01",)  # §7.1.3: wildcards only by dns-01
            elif identifier.type == "ip":
                types = ("http-01", "tls-alpn-01")  # RFC 8738 §7: no dns-01 for IPs
            else:
                types = ("http-01", "dns-01", "tls-alpn-01")
            new.append(NewAuthorization(identifier.type, value, wildcard, types))
        authz_expires = now + self.settings.authorization_lifetime
        if new:
            expires = min(expires, authz_expires)
        try:
            return self.store.create_order(
                account_id=account.id,
                identifiers=[identifier_json(i) for i in checked],
                reused=reused,
                new=new,
                profile=profile_name,
                expires=expires,
                authz_expires=authz_expires,
                not_before=None,
                not_after=None,
                replaces=replaces,
            )
        except CAError as exc:
            # The partial unique index on live `replaces` lost a race: RFC 9773 §5.
            if exc.kind is Kind.CONFLICT and replaces is not None:
                raise problems.already_replaced(
                    "another order already replaces that certificate"
                ) from None
            raise

    def _limit_certificates_per_domain(
        self, identifiers: Iterable[Identifier], now: datetime.datetime
    ) -> None:
        """At newOrder, and again at finalize: orders opened before the limit was reached
        must not take it past."""
        for domain in {registered_domain(i.value) for i in identifiers if i.type == "dns"}:
            self._rate_limit(
                lambda domain=domain: self.store.count_certificates_for_domain_since(  # type: ignore[misc]
                    domain, now - datetime.timedelta(days=7)
                ),
                self.settings.certificates_per_domain_per_week,
                f"certificates for {domain} per week",
                3600,
            )

    def _check_replaces(
        self, account: Account, replaces: Any, identifiers: Sequence[Identifier]
    ) -> None:
        """RFC 9773 §5: `replaces` names a certificate of ours that this account may replace."""
        if not isinstance(replaces, str):
            raise problems.malformed("replaces must be a string")
        found = self._ari_certificate(replaces)
        if found is None:
            raise problems.malformed("replaces names an unknown certificate")
        record = found[0]
        names = {n.removeprefix("*.") for n in record.names}
        if record.acme_account_id != account.id:
            held = self.store.valid_authorization_values(account.id, self.clock.now())
            if not names <= held:
                raise problems.unauthorized("this account may not replace that certificate")
        if not names & {i.value.removeprefix("*.") for i in identifiers}:
            raise problems.malformed("an order must share an identifier with what it replaces")
        if self.store.order_replacing(replaces) is not None:
            raise problems.already_replaced("another order already replaces that certificate")

    def order_for(self, account: Account, order_id: str) -> Order:
        order = self.store.order(order_id) if _object_id_ok(order_id) else None
        if order is None or order.account_id != account.id:
            raise problems.not_found("no such order for this account")
        return order

    # -- authorizations and challenges (§7.5) ------------------------------------------------

    def authorization_for(self, account: Account, authz_id: str) -> Authorization:
        authz = self.store.authorization(authz_id) if _object_id_ok(authz_id) else None
        if authz is None or authz.account_id != account.id:
            raise problems.not_found("no such authorization for this account")
        return authz

    def deactivate_authorization(self, account: Account, authz_id: str) -> Authorization:
        self.authorization_for(account, authz_id)
        if not self.store.deactivate_authorization(authz_id):
            raise problems.malformed("only a pending or valid authorization can be deactivated")
        return self.authorization_for(account, authz_id)

    def challenge_for(self, account: Account, challenge_id: str) -> tuple[Challenge, Authorization]:
        challenge = self.store.challenge(challenge_id) if _object_id_ok(challenge_id) else None
        if challenge is None:
            raise problems.not_found("no such challenge")
        authz = self.authorization_for(account, challenge.authorization_id)
        return challenge, authz

    def respond_to_challenge(
        self, account: Account, challenge_id: str, account_uri: str | None = None
    ) -> tuple[Challenge, Authorization]:
        """§7.5.1: start validating (once), wait a little for it, return the current state."""
        started = self.start_validation(account, challenge_id, account_uri)
        if isinstance(started, concurrent.futures.Future):
            wait = self.settings.challenge_wait
            return self.validation_outcome(account, challenge_id, started, wait)
        return started

    def validation_outcome(
        self,
        account: Account,
        challenge_id: str,
        started: concurrent.futures.Future[tuple[Challenge, Authorization] | None],
        wait: float,
    ) -> tuple[Challenge, Authorization]:
        """The challenge and authorization as the validation `started` left them when it ends
        within `wait` seconds (0: no wait), else as stored (processing: the client polls, told
        Retry-After)."""
        with contextlib.suppress(concurrent.futures.TimeoutError):
            outcome = started.result(timeout=wait)
            if outcome is not None:
                return outcome
        return self.challenge_for(account, challenge_id)

    def start_validation(
        self, account: Account, challenge_id: str, account_uri: str | None = None
    ) -> (
        tuple[Challenge, Authorization]
        | concurrent.futures.Future[tuple[Challenge, Authorization] | None]
    ):
        """§7.5.1: start validating the challenge, once; the running validation, or the
        challenge and authorization as they stand when there is nothing to start."""
        challenge, authz = self.challenge_for(account, challenge_id)
        if authz.status != "pending" or challenge.status != "pending":
            return challenge, authz
        if any(
            c.status in ("processing", "valid") for c in authz.challenges if c.id != challenge.id
        ):
            raise problems.malformed("another challenge of this authorization is being validated")
        since = self.clock.now() - datetime.timedelta(hours=1)
        self._rate_limit(
            lambda: self.store.count_failed_validations_since(
                account.id, authz.identifier_value, since
            ),
            self.settings.failed_validations_per_account_per_hour,
            f"failed validations for {authz.identifier_value} per hour",
            3600,
        )
        if self.store.start_challenge(challenge.id):
            known = (dataclasses.replace(challenge, status="processing"), authz, account)
            return self._pool().submit(self.validate, challenge.id, account_uri, known)
        return self.challenge_for(account, challenge_id)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=16, thread_name_prefix="acme-validate"
                )
            return self._executor

    def validate(
        self,
        challenge_id: str,
        account_uri: str | None = None,
        known: tuple[Challenge, Authorization, Account] | None = None,
    ) -> tuple[Challenge, Authorization] | None:
        """Validate one challenge for real and record the outcome; never raises.

        `account_uri` is the account's URL, for CAA `accounturi` (RFC 8657 §3); without it a
        CAA record that restricts accounts refuses. `known` is the challenge (processing), its
        authorization and account as the caller just read them, or None to read them here.
        Returns the challenge and authorization as this validation left them, or None when
        it recorded nothing (another process finished the challenge first)."""
        try:
            subjects = known or self._validation_subjects(challenge_id)
            if subjects is None:
                return None
            challenge, authz, account = subjects
            error: dict[str, Any] | None = None
            try:
                records = self._run_validation(challenge, authz, account, account_uri)
            except ValidationError as exc:
                error = AcmeProblem(
                    exc.problem_type,
                    exc.detail,
                    400 if exc.problem_type != "caa" else 403,
                    identifier={"type": authz.identifier_type, "value": authz.identifier_value},
                ).to_json()
                records = exc.records
            return self._record_outcome(challenge, authz, error, [r.to_json() for r in records])
        except Exception:  # a validator bug must not leave the challenge processing forever
            log.exception("validation of challenge %s failed unexpectedly", challenge_id)
            with contextlib.suppress(CAError):
                self.store.finish_challenge(
                    challenge_id,
                    valid=False,
                    error=problems.server_internal("validation failed unexpectedly").to_json(),
                    record=[],
                    now=self.clock.now(),
                )
            return None

    def _run_validation(
        self, challenge: Challenge, authz: Authorization, account: Account, account_uri: str | None
    ) -> Sequence[ValidationRecord]:
        """The challenge's own check, then CAA for a DNS name; ValidationError if either fails."""
        key_authorization = jws.key_authorization(challenge.token, account.jwk)
        cfg = self.settings.validation
        if challenge.type == "http-01":
            records = validate_http01(
                authz.identifier_type,  # type: ignore[arg-type]
                authz.identifier_value,
                challenge.token,
                key_authorization,
                cfg,
            )
        elif challenge.type == "dns-01":
            records = validate_dns01(authz.identifier_value, key_authorization, cfg)
        else:
            records = validate_tls_alpn01(
                authz.identifier_type,  # type: ignore[arg-type]
                authz.identifier_value,
                key_authorization,
                cfg,
            )
        if authz.identifier_type == "dns":
            check_caa(
                ("*." if authz.wildcard else "") + authz.identifier_value,
                issuer_domains=self.settings.caa_identities,
                account_uri=account_uri,
                method=challenge.type,
                cfg=cfg,
            )
        return records

    def _record_outcome(
        self,
        challenge: Challenge,
        authz: Authorization,
        error: dict[str, Any] | None,
        record: list[dict[str, Any]],
    ) -> tuple[Challenge, Authorization] | None:
        now = self.clock.now()
        valid = error is None
        # A valid authorization lives as long as it may be reused (§7.1.4), at least as long
        # as a pending one.
        valid_until = now + max(
            self.settings.authorization_reuse, self.settings.authorization_lifetime
        )
        if not self.store.finish_challenge(
            challenge.id, valid=valid, error=error, record=record, now=now, valid_until=valid_until
        ):
            return None
        # What the database now holds, without reading it back (§7.1.6: a challenge's outcome
        # is its pending authorization's).
        status = "valid" if valid else "invalid"
        validated_at = now if valid else None
        done = dataclasses.replace(
            challenge,
            status=status,
            validated_at=validated_at,
            error=error,
            validation_record=record,
        )
        if authz.status == "pending":
            authz = dataclasses.replace(
                authz,
                status=status,
                validated_at=validated_at,
                expires=valid_until if valid else authz.expires,
            )
        challenges = tuple(done if c.id == done.id else c for c in authz.challenges)
        return done, dataclasses.replace(authz, challenges=challenges)

    def _validation_subjects(
        self, challenge_id: str
    ) -> tuple[Challenge, Authorization, Account] | None:
        challenge = self.store.challenge(challenge_id)
        if challenge is None or challenge.status != "processing":
            return None
        authz = self.store.authorization(challenge.authorization_id)
        account = self.store.account(authz.account_id) if authz else None
        if authz is None or account is None:
            return None
        return challenge, authz, account

    def recover_stale_challenges(self) -> int:
        """Re-run validations a dead process left `processing`."""
        stale = self.store.stale_processing_challenges(self.clock.now() - STALE_CHALLENGE_AFTER)
        for challenge_id in stale:
            self.validate(challenge_id)
        return len(stale)

    def recover_stale_orders(self) -> int:
        """Orders left `processing` by a finalize that never finished are `ready` again."""
        return self.store.recover_stale_orders(self.clock.now() - STALE_ORDER_AFTER)

    # -- finalize (§7.4) --------------------------------------------------------------------

    def finalize(
        self,
        account: Account,
        order_id: str,
        payload: Mapping[str, Any],
        account_uri: str | None = None,
    ) -> Order:
        order = self.order_for(account, order_id)
        if order.status != "ready":  # §7.4: processing and valid orders too
            raise problems.order_not_ready(f"order is {order.status}, not ready")
        csr_b64 = payload.get("csr")
        if not isinstance(csr_b64, str):
            raise problems.malformed("finalize needs a csr")
        try:
            csr = x509.load_der_x509_csr(jws.b64url_decode(csr_b64))
        except (ValueError, x509.InvalidVersion, AcmeProblem):  # InvalidVersion: not ValueError
            raise problems.bad_csr("the CSR is not a DER PKCS#10 request") from None
        try:
            policy.check_csr_signature(csr)
            csr_key = policy.csr_public_key(csr)
            requested = {policy.normalize(i) for i in policy.csr_identifiers(csr)}
        except CAError as exc:
            raise problems.bad_csr(exc.detail) from None
        ordered = {Identifier(i["type"], i["value"]) for i in order.identifiers}
        if requested != ordered:
            raise problems.bad_csr("the CSR must name exactly the order's identifiers")
        try:
            # The key policy before the order moves: a refused CSR leaves the order ready.
            policy.check_public_key(csr_key, self.authority.profiles[order.profile])
        except CAError as exc:
            raise problems.bad_csr(exc.detail) from None
        # The account's key as authentication parsed it (kept per process, jws.stored_account_key).
        if csr_key == jws.stored_account_key(account.jwk):
            raise problems.bad_csr("the certificate key must not be the account key")
        # CAA recheck before the serial is touched (BR 3.2.2.8: validation older than 8 hours).
        stale = [
            v
            for v in self.store.order_validations(order.id)
            if v.identifier_type == "dns"
            and (v.validated_at is None or v.validated_at < self.clock.now() - CAA_RECHECK_AFTER)
        ]
        for validation in stale:
            try:
                check_caa(
                    ("*." if validation.wildcard else "") + validation.identifier_value,
                    issuer_domains=self.settings.caa_identities,
                    account_uri=account_uri,
                    method=validation.method or "dns-01",
                    cfg=self.settings.validation,
                )
            except ValidationError as exc:
                raise AcmeProblem(
                    exc.problem_type,
                    exc.detail,
                    403,
                    identifier={"type": "dns", "value": validation.identifier_value},
                ) from None
        self._limit_certificates_per_domain(ordered, self.clock.now())
        if not self.store.begin_finalize(order.id):
            current = self.order_for(account, order_id)
            if current.status != "ready":  # another finalize took it, or it expired
                raise problems.order_not_ready(f"order is {current.status}, not ready")
            # Still ready, so an authorization was deactivated or expired meanwhile (§7.1.6).
            problem = problems.order_not_ready("an authorization of this order is no longer valid")
            self.store.invalidate_order(order.id, problem.to_json())
            raise problem
        replaces = None
        if order.replaces:
            replaces = certs.serial_hex(parse_ari_cert_id(order.replaces)[1])
        try:
            issued = self.authority.issue(
                _issuance_request(csr_key, ordered, order.profile, account.id, replaces),
                # The order is valid in the very transaction that records its certificate.
                on_record=lambda connection, record: self.store.complete_order(
                    order.id, record.serial, connection
                ),
            )
        except CAError as exc:
            # Transient failures and refusals of the request leave the order ready for another
            # finalize; anything else (a lint refusal: our own fault) makes it invalid.
            if exc.kind in (Kind.HSM, Kind.STORAGE, Kind.INTERNAL):
                log.error(
                    "finalize of order %s failed: %s (%s)", order.id, exc.detail, exc.kind.value
                )
            transient = exc.kind in (
                Kind.HSM,
                Kind.STORAGE,
                Kind.INTERNAL,
                Kind.BAD_CSR,
                Kind.POLICY,
                Kind.CONFLICT,
            )
            problem = problem_for(exc)
            # If even this fails (the database is down) the order stays processing, nothing
            # released, until the jobs' upkeep makes it ready again (recover_stale_orders).
            with contextlib.suppress(CAError):
                self.store.fail_order(order.id, problem.to_json(), back_to_ready=transient)
            raise problem from None
        return dataclasses.replace(order, status="valid", certificate_serial=issued.record.serial)

    # -- certificates and revocation (§7.4.2, §7.6) -------------------------------------------

    def certificate_chain(self, account: Account, serial: str, alternate: int) -> tuple[str, int]:
        """§7.4.2: the PEM chain number `alternate`, and how many chains there are.

        Chain 0 is the leaf and the issuer's own chain up to (not including) its root; each
        further chain goes through one unexpired cross-certificate of the issuer (another
        root certified the same subject and key), in the order they were made."""
        try:
            record = self.runtime.storage.get_certificate(serial)
        except CAError:
            raise problems.not_found("no such certificate") from None
        if record.acme_account_id != account.id or record.der is None:
            raise problems.not_found("no such certificate for this account")
        chains = [self._chain(record.issuer_id), *self._cross_chains(record.issuer_id)]
        if not 0 <= alternate < len(chains):
            raise problems.not_found("no such alternate chain")
        pem = ssl.DER_cert_to_PEM_cert(record.der) + "".join(
            c.public_bytes(serialization.Encoding.PEM).decode() for c in chains[alternate]
        )
        return pem, len(chains)

    def _chain(self, issuer_id: str) -> list[x509.Certificate]:
        """The issuing chain up to (not including) the root. An issuer's certificate and
        parent never change once recorded, so each process reads a chain once."""
        chain = self._chains.get(issuer_id)
        if chain is None:
            chain = []
            issuer = self.runtime.storage.get_issuer(issuer_id)
            while issuer.kind != "root":
                chain.append(x509.load_der_x509_certificate(issuer.cert_der))
                if issuer.parent_id is None:
                    break
                issuer = self.runtime.storage.get_issuer(issuer.parent_id)
            self._chains[issuer_id] = chain
        return chain

    def _cross_chains(self, issuer_id: str) -> list[list[x509.Certificate]]:
        """One chain per unexpired cross-certificate of the issuer: it, then the chain above
        its signer when that is not a root. Read on every download, not cached: the ceremony
        adds cross-certificates from another process, and this is one small indexed query."""
        crosses = self.runtime.storage.cross_certificates_of(issuer_id, self.clock.now())
        return [
            [x509.load_der_x509_certificate(c.cert_der), *self._chain(c.parent_id)] for c in crosses
        ]

    def revoke(
        self,
        payload: Mapping[str, Any],
        account: Account | None,
        signer_jwk: dict[str, Any] | None,
    ) -> None:
        cert_b64 = payload.get("certificate")
        if not isinstance(cert_b64, str):
            raise problems.malformed("revokeCert needs a certificate")
        try:
            der = jws.b64url_decode(cert_b64)
            certificate = x509.load_der_x509_certificate(der)
        except (ValueError, x509.InvalidVersion, AcmeProblem):  # InvalidVersion: not ValueError
            raise problems.malformed("the certificate is not DER") from None
        reason = payload.get("reason", 0)
        if (
            not isinstance(reason, int)
            or isinstance(reason, bool)
            or reason not in SUBSCRIBER_REASONS
        ):
            raise problems.bad_revocation_reason(
                f"reason must be one of {sorted(SUBSCRIBER_REASONS)} (RFC 5280 §5.3.1)"
            )
        serial = certs.serial_hex(certificate.serial_number)
        try:
            record = self.runtime.storage.get_certificate(serial)
        except CAError:
            raise problems.not_found("this certificate was not issued here") from None
        if record.der != der:
            raise problems.not_found("this certificate was not issued here")
        if account is not None:
            held = self.store.valid_authorization_values(account.id, self.clock.now())
            names = {n.removeprefix("*.") for n in record.names}
            if record.acme_account_id != account.id and not names <= held:
                raise problems.unauthorized(
                    "this account neither ordered this certificate nor holds authorizations "
                    "for all its names"
                )
            actor = f"acme:account/{account.id}"
        else:
            assert signer_jwk is not None
            if _jwk_spki_sha256(signer_jwk) != record.spki_sha256:
                raise problems.unauthorized("the request is not signed by the certificate's key")
            actor = "acme:certificate-key"
        try:
            self.authority.revoke(serial, reason, actor)
        except CAError as exc:
            raise problem_for(exc) from None

    # -- ARI (RFC 9773) ---------------------------------------------------------------------

    def _ari_certificate(self, cert_id: str) -> tuple[CertificateRecord, IssuerRecord] | None:
        """The certificate an RFC 9773 identifier names, with its issuer: None when no
        certificate of ours has that serial under that issuer key (malformed ids raise)."""
        aki, serial = parse_ari_cert_id(cert_id)
        try:
            record = self.runtime.storage.get_certificate(certs.serial_hex(serial))
            issuer = self.runtime.storage.get_issuer(record.issuer_id)
        except CAError:
            return None
        return (record, issuer) if bytes.fromhex(issuer.ski) == aki else None

    def renewal_info(self, cert_id: str) -> tuple[dict[str, Any], int]:
        found = self._ari_certificate(cert_id)
        if found is None or found[0].der is None:
            raise problems.not_found("no such certificate")
        record, issuer = found
        now = self.clock.now()
        try:  # inventory: the last time a client asked; never fails the request
            mark_ari_checked(self.runtime.storage, record.serial, now)
        except CAError:
            log.warning(
                "could not record the renewalInfo check of %s", record.serial, exc_info=True
            )
        lifetime = record.not_after - record.not_before
        if record.status == "revoked" or issuer.status == "revoked":
            # §4.2: a window in the past asks for renewal now.
            start, end = now - datetime.timedelta(hours=2), now - datetime.timedelta(hours=1)
        elif issuer.status != "active":
            start, end = now, now + min(lifetime / 10, datetime.timedelta(days=2))
        else:
            start = record.not_before + lifetime * 2 / 3
            end = record.not_before + lifetime * 5 / 6
        window = {
            "suggestedWindow": {
                "start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "end": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        }
        return window, 21600  # Retry-After: six hours (§4.3 suggests a few hours)


class KeyInUse(Exception):
    def __init__(self, account_id: int) -> None:
        super().__init__(account_id)
        self.account_id = account_id


def _eab_allows(identifier: Identifier, allowed: Sequence[str]) -> bool:
    for entry in allowed:
        if identifier.type == "ip":
            try:
                if ipaddress.ip_address(identifier.value) in ipaddress.ip_network(entry):
                    return True
            except ValueError:
                continue
        else:
            base = identifier.value.removeprefix("*.")
            suffix = entry.strip(".").lower()
            if base == suffix or base.endswith("." + suffix):
                return True
    return False


def _jwk_spki_sha256(jwk: Mapping[str, Any]) -> str:
    """SHA-256 of the SubjectPublicKeyInfo of a JWK, to compare with a certificate's key."""
    public = jws.account_key_from_jwk(jwk).key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _issuance_request(
    key: Any, identifiers: set[Identifier], profile: str, account_id: int, replaces: str | None
) -> Any:
    from ca.issuance import IssuanceRequest

    return IssuanceRequest(
        public_key=key,
        identifiers=tuple(sorted(identifiers)),
        profile=profile,
        source=f"acme:account/{account_id}",
        acme_account_id=account_id,
        replaces=replaces,
    )


def problem_for(exc: CAError) -> AcmeProblem:
    """The one mapping of the CA core's error kinds to RFC 8555 §6.7 problems."""
    if exc.kind is Kind.BAD_CSR:
        return problems.bad_csr(exc.detail)
    if exc.kind is Kind.POLICY:
        if exc.rule and exc.rule.startswith("names."):
            return problems.rejected_identifier(exc.detail)
        return problems.bad_csr(exc.detail)
    if exc.kind is Kind.ALREADY_REVOKED:
        return problems.already_revoked(exc.detail)
    if exc.kind is Kind.BAD_REVOCATION_REASON:
        return problems.bad_revocation_reason(exc.detail)
    if exc.kind is Kind.NOT_FOUND:
        return problems.not_found(exc.detail)
    if exc.kind in (Kind.HSM, Kind.STORAGE):
        # Transient: 503 tells the client to come back; the detail stays generic.
        return AcmeProblem(
            "serverInternal",
            "the CA is temporarily unavailable; retry later",
            503,
            headers={"Retry-After": "30"},
        )
    return problems.server_internal()
