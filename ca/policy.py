"""Policy: what a request may get. Each function enforces one rule and names it when it refuses.

Rule names (the `rule` of a refusal, also the metric label) are stable:
`csr.parse`, `csr.signature`, `csr.signature_hash`, `key.type`, `key.rsa_size`, `key.curve`,
`names.empty`, `names.syntax`, `names.allowed`, `names.denied`, `names.ip_range`,
`names.common_name`, `validity.max`, `validity.positive`, `profile.unknown`.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import re
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ca.errors import CAError, Kind
from ca.profiles import RSA_MAX_BITS, RSA_MIN_BITS, Profile

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_CURVES = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}
# Signature hashes a CSR may use; SHA-1 and MD5 are refused (collisions are practical).
_CSR_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


@dataclasses.dataclass(frozen=True, order=True)
class Identifier:
    """A name a certificate is for, in RFC 8555 §9.7.7 terms: type `dns` or `ip`."""

    type: str
    value: str

    def __str__(self) -> str:
        return self.value


def refuse(rule: str, detail: str, kind: Kind = Kind.POLICY) -> CAError:
    return CAError(kind, detail, rule=rule)


# -- CSR ------------------------------------------------------------------------------------


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A CSR from PEM or DER bytes; anything else is `csr.parse`."""
    if not data or not data.strip():
        raise refuse("csr.parse", "the CSR is empty", Kind.BAD_CSR)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError
        raise refuse(
            "csr.parse", "the CSR is neither a PEM nor a DER PKCS#10 request", Kind.BAD_CSR
        ) from None


def check_csr_signature(csr: x509.CertificateSigningRequest) -> None:
    """The CSR proves possession of its key (RFC 2986 §3) with an approved hash."""
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    if not isinstance(algorithm, _CSR_HASHES):
        name = algorithm.name if algorithm is not None else "an unsupported algorithm"
        raise refuse(
            "csr.signature_hash",
            f"the CSR is signed with {name.upper()}; "
            "only SHA-256, SHA-384 and SHA-512 are accepted",
            Kind.BAD_CSR,
        )
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError):
        # ValueError: a public key cryptography cannot load (a point off its curve).
        valid = False
    if not valid:
        raise refuse("csr.signature", "the CSR's signature does not verify", Kind.BAD_CSR)


def csr_public_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise refuse(
            "key.type", "the CSR's public key type is not supported", Kind.BAD_CSR
        ) from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise refuse(
            "key.type",
            f"{type(key).__name__.removeprefix('_')} keys are not accepted; use RSA >= 2048 "
            "bits, P-256 or P-384",
            Kind.BAD_CSR,
        )
    return key


def key_type_name(key: PublicKey) -> str:
    """`rsa` or `ec-p256` / `ec-p384`; an unapproved curve is `ec-<curve name>`."""
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    return _CURVES.get(key.curve.name, f"ec-{key.curve.name}")


def check_public_key(key: PublicKey, profile: Profile) -> None:
    """RSA >= 2048 bits (BR 6.1.5) or an approved curve, and a type the profile allows."""
    if isinstance(key, rsa.RSAPublicKey):
        if not RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS or key.key_size % 8:
            raise refuse(
                "key.rsa_size",
                f"RSA key of {key.key_size} bits refused: the modulus must be a multiple of 8 "
                f"between {RSA_MIN_BITS} and {RSA_MAX_BITS} bits",
                Kind.BAD_CSR,
            )
    elif key.curve.name not in _CURVES:
        raise refuse(
            "key.curve",
            f"EC curve {key.curve.name} refused: only P-256 and P-384 are approved",
            Kind.BAD_CSR,
        )
    name = key_type_name(key)
    if name not in profile.key_types:
        raise refuse(
            "key.type",
            f"profile {profile.name} does not allow {name} keys (allowed: "
            f"{', '.join(profile.key_types)})",
            Kind.BAD_CSR,
        )


def csr_identifiers(csr: x509.CertificateSigningRequest) -> tuple[Identifier, ...]:
    """The names a CSR asks for: its SAN entries, plus its CN (which must be one of them)."""
    dns: list[str] = []
    ips: list[str] = []
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        others = [n for n in san if not isinstance(n, x509.DNSName | x509.IPAddress)]
        if others:
            raise refuse(
                "names.syntax",
                "the CSR's subjectAltName may hold only DNS names and IP addresses",
                Kind.BAD_CSR,
            )
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        raise refuse("csr.parse", "the CSR's extensions cannot be parsed", Kind.BAD_CSR) from None
    identifiers = [Identifier("dns", d) for d in dns] + [Identifier("ip", i) for i in ips]
    try:
        common_names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:  # e.g. a UTF8String that is not UTF-8
        raise refuse("csr.parse", "the CSR's subject cannot be parsed", Kind.BAD_CSR) from None
    for attribute in common_names:
        cn = str(attribute.value)
        if not any(normalize(i) == normalize(_guess_identifier(cn)) for i in identifiers):
            identifiers.append(_guess_identifier(cn))
    return tuple(identifiers)


def _guess_identifier(value: str) -> Identifier:
    try:
        ipaddress.ip_address(value)
        return Identifier("ip", value)
    except ValueError:
        return Identifier("dns", value)


# -- names ----------------------------------------------------------------------------------


def normalize(identifier: Identifier) -> Identifier:
    """Validate one name's syntax and return its canonical form (`names.syntax`)."""
    if identifier.type == "ip":
        try:
            return Identifier("ip", str(ipaddress.ip_address(identifier.value)))
        except ValueError:
            raise refuse("names.syntax", f"{identifier.value!r} is not an IP address") from None
    if identifier.type != "dns":
        raise refuse("names.syntax", f"identifier type {identifier.type!r} is not supported")
    return Identifier("dns", normalize_dns_name(identifier.value))


def normalize_dns_name(name: str) -> str:
    """LDH labels (RFC 1035 §2.3.1, RFC 5890 A-labels), at most 253 octets, wildcard leftmost."""
    value = name.lower()
    if not value or len(value) > 253 or not value.isascii():
        raise refuse("names.syntax", f"{name!r} is not a valid DNS name")
    labels = value.split(".")
    if len(labels) < 2:
        # A single label ("localhost", "db") is no fully-qualified name: it means different
        # hosts to different resolvers, and RFC 5280 §4.2.1.6 wants a domain name.
        raise refuse("names.syntax", f"{name!r} is a single label; use a fully-qualified name")
    if labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            raise refuse(
                "names.syntax", f"wildcard {name!r} must cover a name of two labels or more"
            )
    for label in labels:
        if not _LABEL.match(label):
            raise refuse("names.syntax", f"{name!r} is not a valid DNS name")
        if label[2:4] == "--" and not label.startswith("xn--"):
            # RFC 5891 §4.2.3.1: hyphens in positions 3 and 4 are reserved for A-labels.
            raise refuse("names.syntax", f"{name!r} has a reserved label {label!r}")
        if label.startswith("xn--"):
            try:
                decoded = label.encode("ascii").decode("idna")
                if decoded.encode("idna").decode("ascii") != label:
                    raise UnicodeError
            except UnicodeError:
                raise refuse(
                    "names.syntax", f"{name!r} has an invalid punycode label {label!r}"
                ) from None
    if labels[-1].isdigit():
        raise refuse("names.syntax", f"{name!r} looks like an IP address, not a DNS name")
    return value


def normalize_name_restriction(entry: str) -> str:
    """One entry of a name restriction (an EAB key's `--allow`), in its canonical form: an IP
    network ("10.0.0.0/8"; an address alone is its /32 or /128) or a DNS suffix covering itself
    and its subdomains ("example.test", or one label such as "internal")."""
    value = entry.strip()
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        if "/" in value or ":" in value:  # meant as a network: say what is wrong with it
            raise refuse("names.syntax", f"{entry!r} is not an IP network: {exc}") from None
    suffix = value.strip(".").lower()
    if suffix.startswith("*."):
        raise refuse(
            "names.syntax", f"{entry!r}: a DNS suffix already covers its subdomains; drop the '*.'"
        )
    if "." in suffix:
        return normalize_dns_name(suffix)
    if suffix.isascii() and _LABEL.match(suffix) and not suffix.isdigit():
        return suffix
    raise refuse("names.syntax", f"{entry!r} is neither a DNS suffix nor an IP network")


def _under(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix) or suffix == ""


def check_identifier(identifier: Identifier, profile: Profile) -> Identifier:
    """One name against the profile's allowed/denied suffixes and IP ranges."""
    canonical = normalize(identifier)
    if canonical.type == "ip":
        address = ipaddress.ip_address(canonical.value)
        if not any(address in network for network in profile.allowed_ip_ranges):
            raise refuse(
                "names.ip_range",
                f"IP address {canonical.value} is outside profile {profile.name}'s allowed ranges",
            )
        return canonical
    base = canonical.value.removeprefix("*.")
    for suffix in profile.denied_dns_suffixes:
        if _under(base, suffix):
            raise refuse("names.denied", f"{canonical.value} is denied by profile {profile.name}")
    if not any(_under(base, suffix) for suffix in profile.allowed_dns_suffixes):
        raise refuse(
            "names.allowed",
            f"{canonical.value} is not under any of profile {profile.name}'s allowed domains",
        )
    return canonical


def check_identifiers(
    identifiers: Iterable[Identifier], profile: Profile
) -> tuple[Identifier, ...]:
    """All names, checked and de-duplicated, in a stable order; at least one, at most 100."""
    checked = sorted({check_identifier(i, profile) for i in identifiers})
    if not checked:
        raise refuse("names.empty", "the request names no DNS name or IP address")
    if len(checked) > 100:
        raise refuse("names.syntax", "a certificate may carry at most 100 names")
    return tuple(checked)


def check_validity(requested: datetime.timedelta | None, profile: Profile) -> datetime.timedelta:
    """The lifetime to issue with: the request's, if within the profile's maximum."""
    if requested is None:
        return profile.default_validity
    if requested <= datetime.timedelta(0):
        raise refuse("validity.positive", "the requested validity must be positive")
    if requested > profile.max_validity:
        raise refuse(
            "validity.max",
            f"requested validity of {_days(requested)} exceeds profile {profile.name}'s maximum "
            f"of {_days(profile.max_validity)}",
        )
    return requested


def _days(delta: datetime.timedelta) -> str:
    days = delta / datetime.timedelta(days=1)
    return f"{days:g} days"


def common_name_for(identifiers: Sequence[Identifier]) -> str | None:
    """The subject CN: the first DNS name that fits in 64 characters (RFC 5280 ub-common-name)."""
    for identifier in identifiers:
        if identifier.type == "dns" and len(identifier.value) <= 64:
            return identifier.value
    return None
