"""X.509 building blocks shared by the ceremony and issuance: URLs, extensions, fingerprints."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import secrets
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID

from ca.errors import CAError, Kind
from ca.policy import Identifier

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

# 128 bits from the OS CSPRNG: twice BR 7.1's 64-bit minimum. DER-encoded with its sign octet
# that is at most 17 octets, within RFC 5280 §4.1.2.2's 20.
SERIAL_BITS = 128

# RFC 5280 §5.3.1 reason codes by name. certificateHold (6) and removeFromCRL (8) are left out
# on purpose: a private CA that never suspends cannot be talked into a reversible revocation.
REVOCATION_REASONS: dict[str, int] = {
    "unspecified": 0,
    "keyCompromise": 1,
    "cACompromise": 2,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
    "privilegeWithdrawn": 9,
    "aACompromise": 10,
}
REASON_NAMES = {code: name for name, code in REVOCATION_REASONS.items()}


def new_serial() -> int:
    """A fresh positive serial number with SERIAL_BITS of CSPRNG output."""
    while True:
        serial = secrets.randbits(SERIAL_BITS)
        if serial:
            return serial


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def parse_serial(text: str) -> str:
    """Accept `0A:1B..`, `0x0a1b..` or plain hex; return the canonical lowercase hex form."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise CAError(Kind.BAD_REQUEST, f"{text!r} is not a hexadecimal serial number") from None
    if value <= 0:
        raise CAError(Kind.BAD_REQUEST, "a serial number is a positive integer")
    return serial_hex(value)


def spki_sha256(key: PublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def key_type_of(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, key.curve.name)


# -- URLs (DESIGN.md §4): plain HTTP, because they must not depend on the TLS they validate -----


def issuer_cert_url(base: str, issuer_id: str) -> str:
    return f"{base}/certs/{issuer_id}.der"


def crl_url(base: str, issuer_id: str, shard: int | None) -> str:
    """A shard's CRL, or with shard None the issuer's single CRL (the root's ARL)."""
    if shard is None:
        return f"{base}/crl/{issuer_id}.crl"
    return f"{base}/crl/{issuer_id}/{shard}.crl"


def ocsp_url(base: str) -> str:
    return f"{base}/ocsp"


def aia(base: str, issuer_id: str, *, with_ocsp: bool) -> x509.AuthorityInformationAccess:
    descriptions = []
    if with_ocsp:
        descriptions.append(
            x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url(base))
            )
        )
    descriptions.append(
        x509.AccessDescription(
            AuthorityInformationAccessOID.CA_ISSUERS,
            x509.UniformResourceIdentifier(issuer_cert_url(base, issuer_id)),
        )
    )
    return x509.AuthorityInformationAccess(descriptions)


def crl_distribution_points(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )


def subject_alt_name(identifiers: Sequence[Identifier]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for identifier in identifiers:
        if identifier.type == "ip":
            names.append(x509.IPAddress(ipaddress.ip_address(identifier.value)))
        else:
            names.append(x509.DNSName(identifier.value))
    return x509.SubjectAlternativeName(names)


def authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def parse_name(text: str) -> x509.Name:
    """An RFC 4514 distinguished name such as `CN=Example Root CA,O=Example`."""
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        raise CAError(Kind.BAD_REQUEST, f"invalid subject {text!r}: {exc}") from None
    if not list(name):
        raise CAError(Kind.BAD_REQUEST, "a CA certificate needs a non-empty subject")
    return name


def ca_key_usage() -> x509.KeyUsage:
    # keyCertSign and cRLSign for a CA; digitalSignature so the CA may sign OCSP responses
    # itself (RFC 6960 §4.2.2.2) when no delegated responder is configured.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def end_entity_key_usage(*, key_encipherment: bool = False) -> x509.KeyUsage:
    """digitalSignature, plus keyEncipherment for an RSA key used in TLS 1.2 key transport."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def utcnow_floor(now: datetime.datetime) -> datetime.datetime:
    """Certificates carry whole seconds; truncate so what we store equals what we sign."""
    return now.replace(microsecond=0)
