"""The one issuance path: ACME finalize and `certwright issue` both end in `issue()` here.

The steps, in order (DESIGN.md §3); each is marked `# Step N` below:
1. Policy: the profile checks the subject key, the names and the lifetime; a refusal names its
   rule and is audited.
2. Reserve: a 128-bit CSPRNG serial is recorded as `pending` (UNIQUE in the database) before
   anything is signed; a collision draws again.
3. Lint: the to-be-signed certificate is signed with a throw-away key of the issuer's type and
   linted with pkilint; an ERROR marks the serial `failed` and refuses issuance.
4. Sign: the same builder is signed by the issuer's key in the HSM.
5. Record: DER, status `issued` and an audit event are written in one transaction; only then is
   the certificate returned. A crash between 2 and 5 leaves a `pending` row and releases nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca import certs, lint, metrics, policy
from ca.clock import Clock, SystemClock
from ca.errors import CAError, Kind
from ca.hsm import HsmPrivateKey, Token, signature_hash
from ca.policy import Identifier, PublicKey
from ca.profiles import EKU_OIDS, Profile
from ca.storage import CertificateRecord, IssuerRecord, OnRecord, Reservation, Storage
from ca.storage.inventory import validate_tags

# Leaf certificates start this far in the past so a relying party whose clock is slightly
# behind does not reject a certificate that was just issued.
BACKDATE = datetime.timedelta(minutes=5)
_RESERVE_ATTEMPTS = 5


@dataclasses.dataclass(frozen=True)
class IssuanceRequest:
    """What a caller asks for; validated against the profile in step 1."""

    public_key: PublicKey
    identifiers: tuple[Identifier, ...]
    profile: str
    validity: datetime.timedelta | None = None
    issuer: str | None = None
    owner: str | None = None
    source: str = "cli"  # who asked: "cli:<user>", "acme:<account URL>", ...
    acme_account_id: int | None = None
    replaces: str | None = None  # serial of the certificate this one renews (lineage)
    tags: tuple[str, ...] = ()  # inventory labels (ca.storage.inventory.validate_tag)


@dataclasses.dataclass(frozen=True)
class IssuedCertificate:
    record: CertificateRecord
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # issuing intermediate(s), leaf's issuer first; no root

    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def chain_pem(self) -> str:
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in self.chain)

    def fullchain_pem(self) -> str:
        return self.pem() + self.chain_pem()


@dataclasses.dataclass
class _LoadedIssuer:
    record: IssuerRecord
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: HsmPrivateKey | None = None


class _ThrowawayKeys:
    """Software keys of each issuer key type, made once per process, used only to lint."""

    def __init__(self) -> None:
        self._keys: dict[str, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey] = {}
        self._lock = threading.Lock()

    def like(self, public: PublicKey) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
        name = certs.key_type_of(public)
        with self._lock:
            key = self._keys.get(name)
            if key is None:
                if isinstance(public, ec.EllipticCurvePublicKey):
                    key = ec.generate_private_key(public.curve)
                else:
                    key = rsa.generate_private_key(65537, public.key_size)
                self._keys[name] = key
            return key


_THROWAWAY = _ThrowawayKeys()


class CertificateAuthority:
    """Issues and revokes leaf certificates for the online intermediates."""

    def __init__(
        self,
        storage: Storage,
        token: Token | Callable[[], Token],
        profiles: Mapping[str, Profile],
        *,
        public_base_url: str,
        crl_shards: int = 16,
        default_issuer: str | None = None,
        clock: Clock | None = None,
        lint_enabled: bool = True,
    ) -> None:
        self.storage = storage
        self._token_source = token
        self._token: Token | None = token if isinstance(token, Token) else None
        self.profiles = dict(profiles)
        self.public_base_url = public_base_url.rstrip("/")
        self.crl_shards = crl_shards
        self.default_issuer = default_issuer or None
        self.clock = clock or SystemClock()
        self.lint_enabled = lint_enabled
        self._issuers: dict[str, _LoadedIssuer] = {}
        self._lock = threading.Lock()
        # Called with the record after each revocation; see revoke().
        self.revocation_listeners: list[Callable[[CertificateRecord], None]] = []

    # -- issuers ----------------------------------------------------------------------------

    @property
    def token(self) -> Token:
        if self._token is None:
            assert callable(self._token_source)
            self._token = self._token_source()
        return self._token

    def _loaded(self, issuer_id: str) -> _LoadedIssuer:
        with self._lock:
            loaded = self._issuers.get(issuer_id)
            if loaded is None:
                record = self.storage.get_issuer(issuer_id)
                chain: list[x509.Certificate] = []
                parent = record.parent_id
                while parent is not None:
                    parent_record = self.storage.get_issuer(parent)
                    if parent_record.kind == "root":
                        break
                    chain.append(x509.load_der_x509_certificate(parent_record.cert_der))
                    parent = parent_record.parent_id
                loaded = _LoadedIssuer(
                    record, x509.load_der_x509_certificate(record.cert_der), tuple(chain)
                )
                self._issuers[issuer_id] = loaded
            return loaded

    def _issuer_key(self, loaded: _LoadedIssuer) -> HsmPrivateKey:
        if loaded.key is None:
            assert loaded.record.key_label is not None
            loaded.key = self.token.key(loaded.record.key_label)
        return loaded.key

    def warm_up(self) -> None:
        """Do once what every issuance would otherwise pay for first: load the active issuers'
        certificates and keys, make the throw-away lint keys, build pkilint's validators.

        Then freeze what exists into the collector's permanent generation: the validator tree
        and the loaded issuers live as long as the process, and walking them in every full
        collection cost a quarter of the lint time (measured with scripts/bench issuance).
        """
        for record in self.storage.list_issuers():
            if record.kind == "intermediate" and record.status == "active":
                loaded = self._loaded(record.id)
                self._issuer_key(loaded)
                if self.lint_enabled:
                    # Lint one certificate signed by the throw-away key: it walks every lazy
                    # corner of pkilint and pyasn1 once. Nothing is reserved, signed or stored.
                    throwaway = _THROWAWAY.like(loaded.certificate.public_key())  # type: ignore[arg-type]
                    profile = next(iter(self.profiles.values()))
                    builder = self._builder(
                        throwaway.public_key(),
                        loaded,
                        profile,
                        (Identifier("dns", "warm-up.invalid"),),
                        "warm-up.invalid",
                        1,
                        loaded.certificate.not_valid_before_utc,
                        loaded.certificate.not_valid_after_utc,
                    )
                    algorithm = signature_hash(throwaway)
                    der = builder.sign(throwaway, algorithm).public_bytes(
                        serialization.Encoding.DER
                    )
                    lint.lint_certificate(der)
                self.storage.warm_up(
                    Reservation(
                        serial="0",
                        issuer_id=record.id,
                        profile="warm-up",
                        common_name=None,
                        names=("warm-up.invalid",),
                        key_type="none",
                        spki_sha256="",
                        not_before=record.not_before,
                        not_after=record.not_after,
                        crl_shard=0,
                        owner=None,
                        source="warm-up",
                    )
                )
        gc.collect()
        gc.freeze()

    def forget_issuers(self) -> None:
        """Drop cached issuer state (after a ceremony added or retired one)."""
        with self._lock:
            self._issuers.clear()

    def select_issuer(self, requested: str | None, profile: Profile) -> _LoadedIssuer:
        issuer_id = requested or profile.issuer or self.default_issuer
        if issuer_id is None:
            active = [
                i
                for i in self.storage.list_issuers()
                if i.kind == "intermediate" and i.status == "active"
            ]
            if not active:
                raise CAError(
                    Kind.CONFIG,
                    "no active intermediate: run `certwright ceremony intermediate` first",
                )
            if len(active) > 1:
                raise CAError(
                    Kind.CONFIG,
                    "several active intermediates: set ca.default_issuer or name --issuer "
                    f"({', '.join(i.id for i in active)})",
                )
            issuer_id = active[0].id
        loaded = self._loaded(issuer_id)
        if loaded.record.kind != "intermediate":
            raise CAError(
                Kind.POLICY,
                f"issuer {issuer_id!r} is not an online intermediate",
                rule="issuer.kind",
            )
        if loaded.record.status != "active":
            raise CAError(
                Kind.POLICY, f"issuer {issuer_id!r} is {loaded.record.status}", rule="issuer.status"
            )
        return loaded

    # -- issuance ---------------------------------------------------------------------------

    def issue_from_csr(
        self,
        csr_data: bytes | x509.CertificateSigningRequest,
        profile: str,
        *,
        validity: datetime.timedelta | None = None,
        issuer: str | None = None,
        owner: str | None = None,
        source: str = "cli",
        tags: tuple[str, ...] = (),
    ) -> IssuedCertificate:
        """Parse and check a PKCS#10 request, then issue through `issue`."""
        try:
            csr = (
                csr_data
                if isinstance(csr_data, x509.CertificateSigningRequest)
                else policy.parse_csr(csr_data)
            )
            policy.check_csr_signature(csr)
            key = policy.csr_public_key(csr)
            identifiers = policy.csr_identifiers(csr)
        except CAError as exc:
            self._refused(source, "csr", exc)
            raise
        return self.issue(
            IssuanceRequest(
                public_key=key,
                identifiers=identifiers,
                profile=profile,
                validity=validity,
                issuer=issuer,
                owner=owner,
                source=source,
                tags=tags,
            )
        )

    def check(
        self, request: IssuanceRequest
    ) -> tuple[Profile, tuple[Identifier, ...], datetime.timedelta]:
        """Step 1 on its own: the profile's verdict on a request, without issuing."""
        profile = self.profiles.get(request.profile)
        if profile is None:
            raise CAError(
                Kind.POLICY,
                f"unknown profile {request.profile!r} (known: {', '.join(sorted(self.profiles))})",
                rule="profile.unknown",
            )
        policy.check_public_key(request.public_key, profile)
        if self.storage.key_compromised(certs.spki_sha256(request.public_key)):
            # RFC 8555 §7.6 / BR 4.9.1.1: a key once revoked for keyCompromise is never
            # certified again.
            raise CAError(
                Kind.BAD_CSR,
                "this public key was revoked for keyCompromise and cannot be certified again",
                rule="key.compromised",
            )
        identifiers = policy.check_identifiers(request.identifiers, profile)
        validity = policy.check_validity(request.validity, profile)
        validate_tags(request.tags)
        return profile, identifiers, validity

    def issue(
        self, request: IssuanceRequest, *, on_record: OnRecord | None = None
    ) -> IssuedCertificate:
        """Policy, serial, lint, HSM signature, record. `on_record(connection, record)` runs in
        the transaction that records the certificate, so what the caller notes there (ACME: the
        order now valid) commits with it or not at all."""
        # Step 1: policy.
        try:
            profile, identifiers, validity = self.check(request)
            issuer = self.select_issuer(request.issuer, profile)
        except CAError as exc:
            self._refused(request.source, ",".join(map(str, request.identifiers))[:200], exc)
            raise

        now = certs.utcnow_floor(self.clock.now())
        not_before = now - BACKDATE
        # RFC 5280 §4.1.2.5: validity is inclusive of notAfter, hence the second less.
        not_after = min(
            not_before + validity - datetime.timedelta(seconds=1),
            issuer.certificate.not_valid_after_utc,
        )
        common_name = policy.common_name_for(identifiers)

        # Step 2: reserve a serial, on record as pending before anything is signed.
        serial, certificate_id = self._reserve(
            request, issuer, profile, identifiers, common_name, not_before, not_after
        )
        builder = self._builder(
            request.public_key,
            issuer,
            profile,
            identifiers,
            common_name,
            serial,
            not_before,
            not_after,
        )
        algorithm = signature_hash(issuer.certificate.public_key())  # type: ignore[arg-type]

        # Step 3: lint the to-be-signed certificate before the issuer's key touches it.
        if self.lint_enabled:
            try:
                throwaway = _THROWAWAY.like(issuer.certificate.public_key())  # type: ignore[arg-type]
                lint.require_clean(
                    lint.lint_certificate(
                        builder.sign(throwaway, algorithm).public_bytes(serialization.Encoding.DER)
                    ),
                    "certificate",
                )
            except CAError as exc:
                metrics.LINT_REFUSED.labels(profile.name).inc()
                self._mark_failed_quietly(certificate_id, str(exc), request.source)
                raise

        # Step 4: sign in the HSM.
        try:
            started = time.perf_counter()
            certificate = self._sign(builder, issuer, algorithm)
            metrics.HSM_SIGN_SECONDS.labels(issuer.record.id).observe(time.perf_counter() - started)
        except CAError as exc:
            self._mark_failed_quietly(certificate_id, str(exc), request.source)
            raise

        # Step 5: record, then release.
        record = self.storage.record_certificate(
            certificate_id,
            certificate.public_bytes(serialization.Encoding.DER),
            request.source,
            on_record=on_record,
        )
        metrics.ISSUED.labels(issuer.record.id, profile.name).inc()
        return IssuedCertificate(record, certificate, (issuer.certificate, *issuer.chain))

    def _sign(
        self, builder: x509.CertificateBuilder, issuer: _LoadedIssuer, algorithm: Any
    ) -> x509.Certificate:
        """Sign with the issuer's key; on an HSM error, once more on a fresh session.

        Another process writing to a SoftHSM token (a new OCSP responder key, say) makes it
        reload its object store, and key handles of sessions opened before may stop working;
        a token that was away and is back needs a new session too. One retry covers both
        without a restart; a token still missing fails the second time too.
        """
        try:
            return builder.sign(self._issuer_key(issuer), algorithm)
        except CAError:
            issuer.key = None
            self.token.reset()
        try:
            return builder.sign(self._issuer_key(issuer), algorithm)
        except CAError:
            issuer.key = None  # reload the key handle once the token is back
            raise

    def _reserve(
        self,
        request: IssuanceRequest,
        issuer: _LoadedIssuer,
        profile: Profile,
        identifiers: Sequence[Identifier],
        common_name: str | None,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
    ) -> tuple[int, int]:
        for _ in range(_RESERVE_ATTEMPTS):
            serial = certs.new_serial()
            try:
                certificate_id = self.storage.reserve_serial(
                    Reservation(
                        serial=certs.serial_hex(serial),
                        issuer_id=issuer.record.id,
                        profile=profile.name,
                        common_name=common_name,
                        names=tuple(i.value for i in identifiers),
                        key_type=certs.key_type_of(request.public_key),
                        spki_sha256=certs.spki_sha256(request.public_key),
                        not_before=not_before,
                        not_after=not_after,
                        crl_shard=serial % self.crl_shards,
                        owner=request.owner,
                        source=request.source,
                        acme_account_id=request.acme_account_id,
                        replaces=request.replaces,
                        tags=tuple(sorted(set(request.tags))),  # validated by check()
                    )
                )
            except CAError as exc:
                if exc.kind is Kind.CONFLICT:
                    continue  # a serial collision: draw again (astronomically rare at 128 bits)
                raise
            return serial, certificate_id
        raise CAError(Kind.INTERNAL, "could not reserve a unique serial number")

    def _builder(
        self,
        public_key: PublicKey,
        issuer: _LoadedIssuer,
        profile: Profile,
        identifiers: Sequence[Identifier],
        common_name: str | None,
        serial: int,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
    ) -> x509.CertificateBuilder:
        subject = (
            x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
            if common_name
            else x509.Name([])
        )
        # RSA subject keys may be used for TLS 1.2 key transport; EC keys only sign (RFC 5480).
        key_encipherment = isinstance(public_key, rsa.RSAPublicKey)
        issuer_id = issuer.record.id
        base = self.public_base_url
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.certificate.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                certs.end_entity_key_usage(key_encipherment=key_encipherment), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([EKU_OIDS[e] for e in profile.ekus]), critical=False
            )
            # RFC 5280 §4.2.1.6: the SAN is critical when the subject is empty.
            .add_extension(certs.subject_alt_name(identifiers), critical=common_name is None)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(certs.authority_key_identifier(issuer.certificate), critical=False)
            .add_extension(certs.aia(base, issuer_id, with_ocsp=True), critical=False)
            .add_extension(
                certs.crl_distribution_points(
                    certs.crl_url(base, issuer_id, serial % self.crl_shards)
                ),
                critical=False,
            )
        )

    def _refused(self, actor: str, subject: str, exc: CAError) -> None:
        metrics.REFUSED.labels(exc.rule or exc.kind.value).inc()
        # The refusal stands even when the database cannot note it.
        with contextlib.suppress(CAError):
            self.storage.audit(
                actor,
                "certificate.issue",
                subject,
                "refused",
                {"rule": exc.rule, "kind": exc.kind.value, "detail": exc.detail},
            )

    def _mark_failed_quietly(self, certificate_id: int, reason: str, actor: str) -> None:
        # If even this fails the row stays pending, which is as safe: nothing was released.
        with contextlib.suppress(CAError):
            self.storage.mark_failed(certificate_id, reason, actor)

    # -- revocation -------------------------------------------------------------------------

    def revoke(self, serial: str, reason: int | str, actor: str = "cli") -> CertificateRecord:
        """Revoke, then tell every listener (OCSP re-signing, CRL scheduling) at once.

        The revocation is committed before any listener runs, so a listener that fails (an HSM
        outage while re-signing OCSP) never loses it: the periodic refresh catches up.
        """
        code = revocation_reason_code(reason)
        record = self.storage.revoke(certs.parse_serial(serial), code, actor)
        for listener in self.revocation_listeners:
            with contextlib.suppress(CAError):
                listener(record)
        return record


def revocation_reason_code(reason: int | str, *, leaf: bool = True) -> int:
    """An RFC 5280 §5.3.1 reason code we accept, from its name or number.

    certificateHold (6) and removeFromCRL (8) are never used, 7 is unassigned, and for a leaf
    certificate cACompromise (2) and aACompromise (10) make no sense (BR 7.2.2).
    """
    code: int
    if isinstance(reason, str) and not reason.isdigit():
        matches = [c for n, c in certs.REVOCATION_REASONS.items() if n.lower() == reason.lower()]
        if not matches:
            raise CAError(
                Kind.BAD_REVOCATION_REASON,
                f"unknown revocation reason {reason!r}; use one of "
                f"{', '.join(certs.REVOCATION_REASONS)}",
            )
        code = matches[0]
    else:
        code = int(reason)
    if code not in certs.REASON_NAMES:
        raise CAError(
            Kind.BAD_REVOCATION_REASON,
            f"revocation reason {code} is not accepted (certificateHold and removeFromCRL are "
            "never used; 7 is unassigned)",
        )
    if leaf and code in (2, 10):
        raise CAError(
            Kind.BAD_REVOCATION_REASON,
            f"{certs.REASON_NAMES[code]} is for CA certificates, not a leaf certificate",
        )
    return code
