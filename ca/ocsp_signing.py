"""OCSP responses (RFC 6960, RFC 5019 profile): signing, pre-signing and responder certificates.

The responder (`ocsp/`) answers from the `ocsp_responses` table, so it keeps answering while the
HSM is down; this module fills that table ahead of time and signs on demand what cannot be
pre-signed (a nonce, a SHA-256 CertID, a response not yet made).

- Every unexpired issued or revoked certificate has a pre-signed response with a SHA-1 CertID
  (RFC 5019 §2.1.1: the hash clients use), valid `validity` (BR 4.9.10: at most ten days),
  re-signed at half-life; a revocation re-signs at once through a revocation listener.
- Signer, by configuration (`ocsp.signer`): a delegated responder per issuer (RFC 6960
  §4.2.2.2: EKU id-kp-OCSPSigning, id-pkix-ocsp-nocheck, short validity, key generated on the
  online token, renewed automatically well before it expires) or the issuer's own key.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import threading
import uuid
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca import certs, crl, lint
from ca.clock import Clock, SystemClock
from ca.crl import BR_LEAF_REASONS
from ca.errors import CAError, Kind
from ca.hsm import HsmPrivateKey, KeySpec, Token, signature_hash
from ca.storage import CertificateRecord, IssuerRecord, Storage
from ca.storage import revocation as store

log = logging.getLogger(__name__)

# BR 4.9.10: a response for a subscriber certificate is valid 8 hours to 10 days.
MIN_VALIDITY = datetime.timedelta(hours=8)
MAX_VALIDITY = datetime.timedelta(days=10)
# Responder certificates start a little in the past for relying parties with slow clocks.
BACKDATE = datetime.timedelta(minutes=5)
SIGNERS = ("delegated", "issuer")


@dataclasses.dataclass(frozen=True)
class OcspSettings:
    signer: str = "delegated"
    validity: datetime.timedelta = datetime.timedelta(days=4)
    responder_validity: datetime.timedelta = datetime.timedelta(days=30)

    def __post_init__(self) -> None:
        if self.signer not in SIGNERS:
            raise CAError(Kind.CONFIG, f"ocsp.signer must be one of {', '.join(SIGNERS)}")
        if not MIN_VALIDITY <= self.validity <= MAX_VALIDITY:
            raise CAError(Kind.CONFIG, "OCSP validity must be 8 hours to 10 days (BR 4.9.10)")
        if self.responder_validity < 3 * self.validity:
            raise CAError(
                Kind.CONFIG, "an OCSP responder certificate must live at least 3 response lives"
            )

    @property
    def refresh_after(self) -> datetime.timedelta:
        """BR 4.9.10: re-signed at half-life, which is also within four days of thisUpdate
        and more than eight hours before nextUpdate for any validity allowed here."""
        return self.validity / 2

    @property
    def responder_renew_before(self) -> datetime.timedelta:
        """A responder certificate is replaced once a third of its life is left, so every
        response signed by it expires before it does (responses live < 1/3 of it)."""
        return self.responder_validity / 3


def settings_from_config(config: Any) -> OcspSettings:
    """Read `[ocsp] signer`, `validity_hours`, `responder_validity_days` if present."""
    section: Mapping[str, Any] = config.values.get("ocsp", {})
    defaults = OcspSettings()
    return OcspSettings(
        signer=str(section.get("signer", defaults.signer)),
        validity=datetime.timedelta(
            hours=float(
                section.get("validity_hours", defaults.validity / datetime.timedelta(hours=1))
            )
        ),
        responder_validity=datetime.timedelta(
            days=float(
                section.get(
                    "responder_validity_days",
                    defaults.responder_validity / datetime.timedelta(days=1),
                )
            )
        ),
    )


@dataclasses.dataclass(frozen=True)
class CertIdKeys:
    """An issuer's CertID hashes (RFC 6960 §4.1.1) for SHA-1 and SHA-256."""

    issuer_id: str
    name_hash: Mapping[str, bytes]
    key_hash: Mapping[str, bytes]


def cert_id_keys(issuer_id: str, certificate: x509.Certificate) -> CertIdKeys:
    """issuerNameHash is the hash of the DER issuer name; issuerKeyHash the hash of the
    subjectPublicKey BIT STRING's value, without tag, length or unused-bits octet (§4.1.1)."""
    name = certificate.subject.public_bytes()
    key_bits = _subject_public_key_bits(certificate)
    return CertIdKeys(
        issuer_id,
        {a: hashlib.new(a, name).digest() for a in ("sha1", "sha256")},
        {a: hashlib.new(a, key_bits).digest() for a in ("sha1", "sha256")},
    )


def _subject_public_key_bits(certificate: x509.Certificate) -> bytes:
    public = certificate.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        return public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    if isinstance(public, rsa.RSAPublicKey):
        return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    raise CAError(Kind.INTERNAL, "issuer key type has no OCSP CertID support")


def canonical_request(ids: CertIdKeys, serial: int) -> bytes:
    """The request RFC 5019 clients send for a certificate (§2.1.1: one SHA-1 CertID, no
    extensions), as DER: what a GET URL carries, so a published response can be found by it."""
    return (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(
            ids.name_hash["sha1"],
            ids.key_hash["sha1"],
            serial,
            hashes.SHA1(),  # noqa: S303 - RFC 5019 §2.1.1 CertIDs use SHA-1
        )
        .build()
        .public_bytes(serialization.Encoding.DER)
    )


def revocation_reason(code: int | None) -> x509.ReasonFlags | None:
    """RFC 6960 §4.2.1 revocationReason is optional; as in CRLs (RFC 5280 §5.3.1, BR 7.2.2)
    unspecified is said by omission and only the BR's subscriber reasons are written."""
    if code is None or code not in BR_LEAF_REASONS:
        return None
    return x509.ReasonFlags(certs.REASON_NAMES[code])


@dataclasses.dataclass(frozen=True)
class SignedResponse:
    der: bytes
    cert_status: str  # good | revoked
    this_update: datetime.datetime
    next_update: datetime.datetime


@dataclasses.dataclass
class _Signer:
    key: HsmPrivateKey
    certificate: x509.Certificate  # the responder's, or the issuer's own
    delegated: bool
    not_after: datetime.datetime


@dataclasses.dataclass
class _Issuer:
    record: IssuerRecord
    certificate: x509.Certificate
    ids: CertIdKeys


class OcspSigner:
    """Signs OCSP responses for every online intermediate. One per process: it keeps the
    issuers and signing keys it loaded (the PKCS#11 session is per process, DESIGN.md §6)."""

    def __init__(
        self,
        storage: Storage,
        token: Token | Callable[[], Token],
        settings: OcspSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.storage = storage
        self._token_source = token
        self.settings = settings or OcspSettings()
        self.clock = clock or SystemClock()
        self._issuers: dict[str, _Issuer] = {}
        self._signers: dict[str, _Signer] = {}
        self._lock = threading.RLock()

    @property
    def token(self) -> Token:
        source = self._token_source
        return source if isinstance(source, Token) else source()

    # -- issuers and signers ----------------------------------------------------------------

    def issuer(self, issuer_id: str) -> _Issuer:
        with self._lock:
            loaded = self._issuers.get(issuer_id)
            if loaded is None:
                record = self.storage.get_issuer(issuer_id)
                certificate = x509.load_der_x509_certificate(record.cert_der)
                loaded = _Issuer(record, certificate, cert_id_keys(issuer_id, certificate))
                self._issuers[issuer_id] = loaded
            return loaded

    def signer(self, issuer_id: str) -> _Signer:
        """The key that signs for `issuer_id`, renewing a delegated responder when due."""
        now = self.clock.now()
        with self._lock:
            current = self._signers.get(issuer_id)
            if current is not None and (
                not current.delegated
                or current.not_after - now > self.settings.responder_renew_before
            ):
                return current
            issuer = self.issuer(issuer_id)
            if issuer.record.key_label is None:
                raise CAError(Kind.CONFIG, f"issuer {issuer_id!r} has no online key")
            if self.settings.signer == "issuer":
                signer = _Signer(
                    self.token.key(issuer.record.key_label),
                    issuer.certificate,
                    False,
                    issuer.certificate.not_valid_after_utc,
                )
            else:
                signer = self._delegated(issuer, now)
            self._signers[issuer_id] = signer
            return signer

    def _delegated(self, issuer: _Issuer, now: datetime.datetime) -> _Signer:
        record = store.current_responder(
            self.storage, issuer.record.id, now + self.settings.responder_renew_before
        )
        if record is None:
            record = self._new_responder(issuer, now)
        certificate = x509.load_der_x509_certificate(record.cert_der)
        return _Signer(self.token.key(record.key_label), certificate, True, record.not_after)

    def _new_responder(self, issuer: _Issuer, now: datetime.datetime) -> store.ResponderRecord:
        """RFC 6960 §4.2.2.2: a certificate from the issuer itself, with id-kp-OCSPSigning;
        §4.2.2.2.1: id-pkix-ocsp-nocheck, so clients do not ask about the responder, which is
        why its life is short. Its key is generated on the online token and never leaves it."""
        assert issuer.record.key_label is not None
        label = f"ocsp-{issuer.record.id}-{uuid.uuid4().hex[:12]}"
        key = self.token.generate_key(label, KeySpec.parse(issuer.record.key_type))
        issuer_key = self.token.key(issuer.record.key_label)
        not_before = certs.utcnow_floor(now) - BACKDATE
        not_after = min(
            not_before + self.settings.responder_validity,
            issuer.certificate.not_valid_after_utc,
        )
        certificate = responder_builder(
            issuer.certificate, key.public_key(), not_before, not_after, issuer.record.id
        ).sign(issuer_key, signature_hash(issuer_key))
        der = certificate.public_bytes(serialization.Encoding.DER)
        lint.require_clean(lint.lint_certificate(der), "OCSP responder certificate")
        store.add_responder(
            self.storage, issuer.record.id, label, der, not_before, not_after, "ocsp-responder"
        )
        log.info("new OCSP responder certificate for %s, key %s", issuer.record.id, label)
        return store.ResponderRecord(0, issuer.record.id, label, der, not_before, not_after)

    def forget_keys(self) -> None:
        """Drop cached key handles (after an HSM failure the session is reopened)."""
        with self._lock:
            self._signers.clear()

    # -- signing ----------------------------------------------------------------------------

    def sign(
        self,
        status: store.CertificateStatus | CertificateRecord,
        *,
        algorithm: hashes.HashAlgorithm | None = None,
        nonce: bytes | None = None,
    ) -> SignedResponse:
        """A successful response for one certificate of ours (RFC 6960 §4.2.1)."""
        if status.status not in ("issued", "revoked"):
            raise CAError(Kind.NOT_FOUND, f"certificate {status.serial} was never issued")
        algorithm = algorithm or hashes.SHA1()  # noqa: S303 - RFC 5019 §2.1.1 CertIDs use SHA-1
        issuer = self.issuer(status.issuer_id)
        signer = self.signer(status.issuer_id)
        this_update = certs.utcnow_floor(self.clock.now())
        next_update = min(this_update + self.settings.validity, signer.not_after)
        revoked = status.status == "revoked"
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=issuer.ids.name_hash[algorithm.name],
            issuer_key_hash=issuer.ids.key_hash[algorithm.name],
            serial_number=int(status.serial, 16),
            algorithm=algorithm,
            cert_status=ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD,
            this_update=this_update,
            next_update=next_update,
            revocation_time=(
                (status.revoked_at or this_update).replace(microsecond=0) if revoked else None
            ),
            revocation_reason=revocation_reason(status.revocation_reason) if revoked else None,
        )
        # RFC 5019 §2.2.3 / RFC 6960 §4.2.2.3: byKey is the compact ResponderID.
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer.certificate)
        if signer.delegated:
            builder = builder.certificates([signer.certificate])
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        try:
            response = builder.sign(signer.key, signature_hash(signer.key))
        except CAError:
            self.forget_keys()
            raise
        return SignedResponse(
            response.public_bytes(serialization.Encoding.DER),
            "revoked" if revoked else "good",
            this_update,
            next_update,
        )

    def row(self, status: store.CertificateStatus | CertificateRecord) -> store.OcspRow:
        """Sign the pre-signed (SHA-1 CertID, no nonce) response of one certificate."""
        signed = self.sign(status)
        return store.OcspRow(
            issuer_id=status.issuer_id,
            serial=status.serial,
            cert_status=signed.cert_status,
            der=signed.der,
            this_update=signed.this_update,
            next_update=signed.next_update,
            produced_at=self.clock.now(),
        )

    def resign(self, record: CertificateRecord) -> None:
        """Re-sign and store one certificate's response now (after a revocation)."""
        store.store_ocsp_responses(self.storage, [self.row(record)])


def responder_builder(
    issuer: x509.Certificate,
    public_key: Any,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    issuer_id: str,
) -> x509.CertificateBuilder:
    """The delegated responder certificate (RFC 6960 §4.2.2.2, §4.2.2.2.1)."""
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"{issuer_id} OCSP responder")])
        )
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(certs.new_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(certs.end_entity_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(certs.authority_key_identifier(issuer), critical=False)
    )


def ocsp_issuers(storage: Storage, now: datetime.datetime) -> list[IssuerRecord]:
    """Intermediates whose status we answer for: active or retired, key online, unexpired."""
    return [
        i
        for i in storage.list_issuers()
        if i.kind == "intermediate"
        and i.status in ("active", "retired")
        and i.key_label
        and i.not_after > now
    ]


@dataclasses.dataclass(frozen=True)
class OcspRefresh:
    signed: int
    pruned: int


def refresh_ocsp(signer: OcspSigner, *, batch: int = 500, lint_sample: bool = True) -> OcspRefresh:
    """Pre-sign every response that is missing, stale (past half-life) or states an old
    status; renew delegated responders that are due. Idempotent; with nothing due it is one
    query. Pages by certificate id, so a certificate that cannot be signed is not retried in
    the same call and the loop always ends."""
    storage, clock = signer.storage, signer.clock
    with store.ocsp_refresh_turn(storage) as ours:
        if not ours:
            return OcspRefresh(0, 0)  # another job process is refreshing right now
        now = clock.now()
        issuers = [i.id for i in ocsp_issuers(storage, now)]
        for issuer_id in issuers:
            signer.signer(issuer_id)  # renews a delegated responder that is due
        signed, after_id, linted = 0, 0, not lint_sample
        while issuers:
            due = store.due_for_ocsp(
                storage, now, now - signer.settings.refresh_after, after_id, batch, issuers
            )
            if not due:
                break
            rows = [signer.row(status) for _, status in due]
            if not linted:
                # One response per call through pkilint: the responses differ only in
                # serial, status and times, so one checks the shape of all.
                lint.require_clean(lint.lint_ocsp_response(rows[0].der), "OCSP response")
                linted = True
            store.store_ocsp_responses(storage, rows)
            signed += len(rows)
            after_id = due[-1][0]
        pruned = store.prune_ocsp_responses(storage, now - datetime.timedelta(days=1))
        return OcspRefresh(signed, pruned)


def revocation_listener(signer: OcspSigner) -> Callable[[CertificateRecord], None]:
    """Re-sign a revoked certificate's response at once (the revocation is already committed;
    if this fails, e.g. the HSM is down, the next `refresh_ocsp` catches up)."""

    def listener(record: CertificateRecord) -> None:
        try:
            signer.resign(record)
        except CAError:
            raise
        except Exception as exc:  # revoke() only absorbs CAError; nothing else may escape
            log.exception("re-signing the OCSP response of %s failed", record.serial)
            raise CAError(Kind.INTERNAL, "re-signing the OCSP response failed") from exc

    return listener


def install(runtime: Any) -> OcspSigner:
    """Give a runtime an OCSP signer and re-sign responses on each revocation it makes."""
    signer = OcspSigner(
        runtime.storage, lambda: runtime.token, settings_from_config(runtime.config), runtime.clock
    )
    runtime.authority.revocation_listeners.append(revocation_listener(signer))
    return signer


_job_signers: weakref.WeakKeyDictionary[Any, OcspSigner] = weakref.WeakKeyDictionary()


def refresh_revocation(runtime: Any) -> None:
    """The periodic revocation job (entry point `certwright.jobs`: `revocation`): sign the CRL
    shards and OCSP responses that are due. Both are idempotent and cheap when nothing is due,
    and safe with several job processes. The signer is kept per runtime, so its key handles
    and responder certificates are loaded once."""
    crl.refresh_crls(
        runtime.storage,
        runtime.token,
        public_base_url=runtime.config.public_base_url,
        crl_shards=runtime.config.crl_shards,
        settings=crl.settings_from_config(runtime.config),
        clock=runtime.clock,
    )
    signer = _job_signers.get(runtime)
    if signer is None:
        signer = OcspSigner(
            runtime.storage,
            lambda: runtime.token,
            settings_from_config(runtime.config),
            runtime.clock,
        )
        _job_signers[runtime] = signer
    refresh_ocsp(signer)
