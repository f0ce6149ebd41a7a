"""Certificate profiles: immutable, validated on construction.

A profile says what a leaf certificate may be: its EKUs, lifetime, subject key types and the
names it may carry. Built-in profiles are `tls-server`, `tls-client` and `tls-server-client`;
the configuration's `[profiles.NAME]` tables override their fields or define new ones.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from collections.abc import Mapping
from typing import Any

from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from ca.errors import CAError, Kind

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

EKU_OIDS: dict[str, ObjectIdentifier] = {
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
}
# Subject key types a profile may allow. Nothing weaker exists here to be allowed by mistake:
# RSA means >= 2048 bits (BR 6.1.5), EC means the NIST curves P-256 and P-384 only.
SUBJECT_KEY_TYPES = ("rsa", "ec-p256", "ec-p384")
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192

# Names a private CA's machines typically live under; the example config shows how to narrow
# or widen this. RFC 6761/8375 reserve these for local use, so no public name is matched.
DEFAULT_DNS_SUFFIXES = ("internal", "local", "localhost", "test", "home.arpa", "lan", "corp")
DEFAULT_IP_RANGES = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "100.64.0.0/10",
    "::1/128",
    "fc00::/7",
)


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    description: str
    ekus: tuple[str, ...]
    max_validity: datetime.timedelta
    default_validity: datetime.timedelta
    allowed_dns_suffixes: tuple[str, ...]
    denied_dns_suffixes: tuple[str, ...]
    allowed_ip_ranges: tuple[IPNetwork, ...]
    key_types: tuple[str, ...]
    issuer: str | None = None  # the issuer this profile signs with; None means the default

    def __post_init__(self) -> None:
        if not self.ekus or any(e not in EKU_OIDS for e in self.ekus):
            raise CAError(
                Kind.CONFIG,
                f"profile {self.name}: ekus must be a non-empty subset of {sorted(EKU_OIDS)}",
            )
        if not datetime.timedelta(hours=1) <= self.max_validity <= datetime.timedelta(days=825):
            raise CAError(
                Kind.CONFIG,
                f"profile {self.name}: max_validity_days must be within 1h and 825 days",
            )
        if not datetime.timedelta(0) < self.default_validity <= self.max_validity:
            raise CAError(
                Kind.CONFIG,
                f"profile {self.name}: default_validity_days must be positive and "
                "not above max_validity_days",
            )
        if not self.key_types or any(k not in SUBJECT_KEY_TYPES for k in self.key_types):
            raise CAError(
                Kind.CONFIG,
                f"profile {self.name}: key_types must be a non-empty subset of "
                f"{list(SUBJECT_KEY_TYPES)}",
            )

    @property
    def server_auth(self) -> bool:
        return "serverAuth" in self.ekus

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "ekus": list(self.ekus),
            "max_validity_days": self.max_validity / datetime.timedelta(days=1),
            "default_validity_days": self.default_validity / datetime.timedelta(days=1),
            "allowed_dns_suffixes": list(self.allowed_dns_suffixes),
            "denied_dns_suffixes": list(self.denied_dns_suffixes),
            "allowed_ip_ranges": [str(n) for n in self.allowed_ip_ranges],
            "key_types": list(self.key_types),
            "issuer": self.issuer,
        }


_BUILTIN: dict[str, dict[str, Any]] = {
    "tls-server": {
        "description": "TLS server certificate (serverAuth)",
        "ekus": ["serverAuth"],
    },
    "tls-client": {
        "description": "TLS client certificate (clientAuth), e.g. for mTLS workloads",
        "ekus": ["clientAuth"],
    },
    "tls-server-client": {
        "description": "TLS server and client certificate (serverAuth + clientAuth)",
        "ekus": ["serverAuth", "clientAuth"],
    },
}
_FIELD_DEFAULTS: dict[str, Any] = {
    "max_validity_days": 397,
    "default_validity_days": 90,
    "allowed_dns_suffixes": list(DEFAULT_DNS_SUFFIXES),
    "denied_dns_suffixes": [],
    "allowed_ip_ranges": list(DEFAULT_IP_RANGES),
    "key_types": list(SUBJECT_KEY_TYPES),
    "issuer": None,
}


def _suffixes(name: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CAError(Kind.CONFIG, f"profile {name}: {key} must be a list of strings")
    return tuple(v.strip(".").lower() for v in value)


def _profile_from_fields(name: str, fields: Mapping[str, Any]) -> Profile:
    try:
        ranges = tuple(ipaddress.ip_network(r, strict=True) for r in fields["allowed_ip_ranges"])
    except (ValueError, TypeError) as exc:
        raise CAError(Kind.CONFIG, f"profile {name}: allowed_ip_ranges: {exc}") from None
    try:
        max_days = float(fields["max_validity_days"])
        default_days = float(fields["default_validity_days"])
    except (TypeError, ValueError):
        raise CAError(Kind.CONFIG, f"profile {name}: validity days must be numbers") from None
    ekus = fields.get("ekus")
    key_types = fields["key_types"]
    return Profile(
        name=name,
        description=str(fields.get("description", "")),
        ekus=tuple(ekus) if isinstance(ekus, list) else (),
        max_validity=datetime.timedelta(days=max_days),
        default_validity=datetime.timedelta(days=default_days),
        allowed_dns_suffixes=_suffixes(
            name, "allowed_dns_suffixes", fields["allowed_dns_suffixes"]
        ),
        denied_dns_suffixes=_suffixes(name, "denied_dns_suffixes", fields["denied_dns_suffixes"]),
        allowed_ip_ranges=ranges,
        key_types=tuple(key_types) if isinstance(key_types, list) else (),
        issuer=fields.get("issuer") or None,
    )


def load_profiles(overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Profile]:
    """Built-in profiles with the configuration's overrides applied, plus any new ones."""
    profiles: dict[str, Profile] = {}
    for name in sorted(set(_BUILTIN) | set(overrides)):
        fields = {**_FIELD_DEFAULTS, **_BUILTIN.get(name, {}), **overrides.get(name, {})}
        profiles[name] = _profile_from_fields(name, fields)
    return profiles
