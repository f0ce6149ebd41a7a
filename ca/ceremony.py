"""The key ceremony: the only code that touches the offline root's key.

- `create_root`: a key pair generated on the root's own token and a self-signed certificate.
- `create_intermediate`: a key pair generated on the online token, certified by the root, and
  registered as an issuer in the database (the online server only ever sees the certificate).
- `cross_sign`: another root certifies an existing intermediate's subject and key (a
  cross-certificate, e.g. for a root rotation); ACME offers the chain through it as an
  alternate.
- `sign_root_crl`: the root's CRL (an ARL, RFC 5280 §5.2.5 onlyContainsCACerts) listing
  revoked intermediates and the cross-certificates it signed for them; stored for the
  revocation service to publish.

Every step is linted with pkilint before it is returned or recorded, and audited.
"""

from __future__ import annotations

import dataclasses
import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from ca import certs, lint
from ca.clock import Clock, SystemClock
from ca.errors import CAError, Kind
from ca.hsm import HsmPrivateKey, KeySpec, Token, signature_hash
from ca.storage import IssuerRecord, Storage


@dataclasses.dataclass(frozen=True)
class RootKey:
    """The root's signing key on its token, plus its certificate."""

    key: HsmPrivateKey
    certificate: x509.Certificate


def _ski_hex(cert: x509.Certificate) -> str:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def create_root(
    root_token: Token,
    *,
    key_label: str,
    spec: KeySpec,
    subject: x509.Name,
    validity: datetime.timedelta,
    path_length: int | None,
    clock: Clock | None = None,
) -> RootKey:
    """Generate the root key on its token and self-sign the root certificate."""
    clock = clock or SystemClock()
    if path_length is not None and path_length < 0:
        raise CAError(Kind.BAD_REQUEST, "path length must be 0 or more")
    key = root_token.generate_key(key_label, spec)
    now = certs.utcnow_floor(clock.now())
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(certs.new_serial())
        .not_valid_before(now)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(certs.ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, signature_hash(key))
    )
    lint.require_clean(
        lint.lint_certificate(certificate.public_bytes(serialization.Encoding.DER)),
        "root certificate",
    )
    return RootKey(key, certificate)


def load_root(root_token: Token, key_label: str, certificate: x509.Certificate) -> RootKey:
    """The root's key from its token, checked to be the key of `certificate`."""
    key = root_token.key(key_label)
    if certs.spki_sha256(key.public_key()) != certs.spki_sha256(certificate.public_key()):  # type: ignore[arg-type]
        raise CAError(
            Kind.BAD_REQUEST,
            f"key {key_label!r} on token {root_token.label!r} does not match the root certificate",
        )
    return RootKey(key, certificate)


def register_root(
    storage: Storage, root_id: str, certificate: x509.Certificate, actor: str
) -> None:
    """Record the root certificate (never its key's whereabouts) if it is not known yet."""
    spki = certs.spki_sha256(certificate.public_key())  # type: ignore[arg-type]
    for existing in storage.list_issuers():
        if existing.kind == "root" and existing.spki_sha256 == spki:
            if existing.id != root_id:
                raise CAError(Kind.CONFLICT, f"this root is already registered as {existing.id!r}")
            return
    storage.add_issuer(
        IssuerRecord(
            id=root_id,
            kind="root",
            parent_id=None,
            key_label=None,
            key_type=certs.key_type_of(certificate.public_key()),  # type: ignore[arg-type]
            subject=certificate.subject.rfc4514_string(),
            ski=_ski_hex(certificate),
            spki_sha256=spki,
            cert_der=certificate.public_bytes(serialization.Encoding.DER),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            status="active",
        )
    )
    storage.audit(
        actor,
        "ceremony.root",
        f"issuer:{root_id}",
        "success",
        {"subject": certificate.subject.rfc4514_string()},
    )


def root_id_of(storage: Storage, certificate: x509.Certificate) -> str:
    spki = certs.spki_sha256(certificate.public_key())  # type: ignore[arg-type]
    for existing in storage.list_issuers():
        if existing.kind == "root" and existing.spki_sha256 == spki:
            return existing.id
    raise CAError(Kind.NOT_FOUND, "this root certificate is not registered; register it first")


def _certify_intermediate(
    root: RootKey,
    root_id: str,
    subject: x509.Name,
    public: CertificatePublicKeyTypes,
    validity: datetime.timedelta,
    base: str,
    clock: Clock,
    what: str,
) -> x509.Certificate:
    """An intermediate's CA certificate signed by `root` (never outliving it), linted alone
    and as a root/intermediate pair; both an intermediate's own certificate and its
    cross-certificates are made here, so they differ only in issuer, serial and validity."""
    now = certs.utcnow_floor(clock.now())
    not_after = min(now + validity, root.certificate.not_valid_after_utc)
    if not_after <= now:
        raise CAError(Kind.BAD_REQUEST, f"root {root_id!r} has expired")
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root.certificate.subject)
        .public_key(public)
        .serial_number(certs.new_serial())
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(certs.ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(certs.authority_key_identifier(root.certificate), critical=False)
        .add_extension(certs.aia(base, root_id, with_ocsp=False), critical=False)
        .add_extension(
            certs.crl_distribution_points(certs.crl_url(base, root_id, None)), critical=False
        )
    )
    certificate = builder.sign(root.key, signature_hash(root.key))
    der = certificate.public_bytes(serialization.Encoding.DER)
    lint.require_clean(lint.lint_certificate(der), what)
    lint.require_clean(
        lint.lint_chain(root.certificate.public_bytes(serialization.Encoding.DER), der),
        "root/intermediate chain",
    )
    return certificate


def create_intermediate(
    storage: Storage,
    root: RootKey,
    online_token: Token,
    *,
    issuer_id: str,
    key_label: str,
    spec: KeySpec,
    subject: x509.Name,
    validity: datetime.timedelta,
    public_base_url: str,
    actor: str,
    clock: Clock | None = None,
) -> x509.Certificate:
    """Generate an intermediate's key on the online token and certify it with the root."""
    clock = clock or SystemClock()
    base = public_base_url.rstrip("/")
    root_id = root_id_of(storage, root.certificate)
    existing = {i.id for i in storage.list_issuers()}
    if issuer_id in existing:
        raise CAError(Kind.CONFLICT, f"an issuer named {issuer_id!r} already exists")
    key = online_token.generate_key(key_label, spec)
    public = key.public_key()
    certificate = _certify_intermediate(
        root, root_id, subject, public, validity, base, clock, "intermediate certificate"
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    storage.add_issuer(
        IssuerRecord(
            id=issuer_id,
            kind="intermediate",
            parent_id=root_id,
            key_label=key_label,
            key_type=spec.name,
            subject=subject.rfc4514_string(),
            ski=_ski_hex(certificate),
            spki_sha256=certs.spki_sha256(public),
            cert_der=der,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            status="active",
        )
    )
    storage.audit(
        actor,
        "ceremony.intermediate",
        f"issuer:{issuer_id}",
        "success",
        {"subject": subject.rfc4514_string(), "key_type": spec.name, "root": root_id},
    )
    return certificate


def cross_sign(
    storage: Storage,
    root: RootKey,
    *,
    issuer_id: str,
    validity: datetime.timedelta,
    public_base_url: str,
    actor: str,
    clock: Clock | None = None,
) -> x509.Certificate:
    """Certify an existing intermediate's subject and key with another root (cross-signing,
    e.g. during a root rotation), so relying parties that trust either root accept what it
    issues. The intermediate's key stays where it is: only its public key is certified."""
    clock = clock or SystemClock()
    root_id = root_id_of(storage, root.certificate)
    issuer = storage.get_issuer(issuer_id)
    if issuer.kind != "intermediate" or issuer.status != "active":
        raise CAError(
            Kind.BAD_REQUEST,
            f"issuer {issuer_id!r} is not an active intermediate ({issuer.kind}, {issuer.status})",
        )
    if issuer.parent_id == root_id:
        raise CAError(
            Kind.CONFLICT,
            f"root {root_id!r} is already the parent of {issuer_id!r}; use another root",
        )
    own = x509.load_der_x509_certificate(issuer.cert_der)
    certificate = _certify_intermediate(
        root,
        root_id,
        own.subject,
        own.public_key(),
        validity,
        public_base_url.rstrip("/"),
        clock,
        "cross-certificate",
    )
    if _ski_hex(certificate) != issuer.ski:  # the same key must be found by the same SKI
        raise CAError(Kind.INTERNAL, f"cross-certificate of {issuer_id!r} has another SKI")
    storage.add_cross_certificate(
        issuer_id,
        root_id,
        certificate.serial_number,
        certificate.public_bytes(serialization.Encoding.DER),
        certificate.not_valid_before_utc,
        certificate.not_valid_after_utc,
        actor,
    )
    return certificate


def _revoked_entry(
    serial: int, issuer: IssuerRecord, now: datetime.datetime
) -> x509.RevokedCertificate:
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(issuer.revoked_at or now)
    )
    if issuer.revocation_reason:  # RFC 5280 §5.3.1: omit reasonCode for unspecified
        entry = entry.add_extension(
            x509.CRLReason(x509.ReasonFlags(certs.REASON_NAMES[issuer.revocation_reason])),
            critical=False,
        )
    return entry.build()


def sign_root_crl(
    storage: Storage,
    root: RootKey,
    *,
    validity: datetime.timedelta,
    public_base_url: str,
    actor: str,
    clock: Clock | None = None,
) -> x509.CertificateRevocationList:
    """Sign the root's ARL listing every revoked intermediate, and store it."""
    clock = clock or SystemClock()
    root_id = root_id_of(storage, root.certificate)
    now = certs.utcnow_floor(clock.now())
    previous = storage.latest_crl(root_id, -1)
    # RFC 5280 §5.2.3: CRL numbers strictly increase, even when the clock has stepped back.
    number = (previous.number + 1) if previous else 1
    this_update = (
        max(now, previous.this_update + datetime.timedelta(seconds=1)) if previous else now
    )
    revoked = []
    issuers = {issuer.id: issuer for issuer in storage.list_issuers()}
    for issuer in issuers.values():
        if issuer.parent_id == root_id and issuer.status == "revoked":
            cert = x509.load_der_x509_certificate(issuer.cert_der)
            revoked.append(_revoked_entry(cert.serial_number, issuer, now))
    # A revoked intermediate is revoked on every path: the cross-certificates this root
    # signed for it are listed too, with the intermediate's own date and reason.
    for cross in storage.list_cross_certificates(parent_id=root_id):
        issuer = issuers[cross.issuer_id]
        if issuer.status == "revoked":
            revoked.append(_revoked_entry(int(cross.serial, 16), issuer, now))
    url = certs.crl_url(public_base_url.rstrip("/"), root_id, None)
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=root.certificate.subject,
        last_update=this_update,
        next_update=this_update + validity,
        revoked_certificates=revoked,
        extensions=[
            x509.Extension(
                x509.AuthorityKeyIdentifier.oid,
                False,
                certs.authority_key_identifier(root.certificate),
            ),
            x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
            x509.Extension(
                x509.IssuingDistributionPoint.oid,
                True,
                x509.IssuingDistributionPoint(
                    full_name=[x509.UniformResourceIdentifier(url)],
                    relative_name=None,
                    only_contains_user_certs=False,
                    only_contains_ca_certs=True,
                    only_some_reasons=None,
                    indirect_crl=False,
                    only_contains_attribute_certs=False,
                ),
            ),
        ],
    )
    crl = builder.sign(root.key, signature_hash(root.key))
    der = crl.public_bytes(serialization.Encoding.DER)
    lint.require_clean(lint.lint_crl(der, arl=True), "root CRL")
    storage.record_crl(root_id, -1, number, this_update, this_update + validity, der, actor)
    return crl
