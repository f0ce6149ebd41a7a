"""Policy rules, one test (or parametrized case) per rule; no HSM, no database."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ca import certs, policy
from ca.errors import CAError, Kind
from ca.policy import Identifier
from ca.profiles import load_profiles

DATA = Path(__file__).parent.parent / "data"
PROFILES = load_profiles({})
SERVER = PROFILES["tls-server"]


def _rule(exc: pytest.ExceptionInfo[CAError]) -> str | None:
    return exc.value.rule


@pytest.mark.parametrize(
    ("filename", "rule"),
    [
        ("empty.csr", "csr.parse"),
        ("garbage.bin", "csr.parse"),
        ("csr-sha1.pem", "csr.signature_hash"),
        ("csr-bad-signature.der", "csr.signature"),
    ],
)
def test_bad_csr_files_are_refused_naming_the_rule(filename: str, rule: str) -> None:
    with pytest.raises(CAError) as exc:
        csr = policy.parse_csr((DATA / filename).read_bytes())
        policy.check_csr_signature(csr)
    assert exc.value.kind is Kind.BAD_CSR
    assert _rule(exc) == rule


@pytest.mark.parametrize(
    ("filename", "rule"),
    [
        ("csr-rsa1024.pem", "key.rsa_size"),
        ("csr-rsa2047.pem", "key.rsa_size"),
        ("csr-p192.pem", "key.curve"),
        ("csr-dsa.pem", "key.type"),
    ],
)
def test_weak_or_unapproved_keys_are_refused(filename: str, rule: str) -> None:
    csr = policy.parse_csr((DATA / filename).read_bytes())
    policy.check_csr_signature(csr)  # the signatures themselves are fine
    with pytest.raises(CAError) as exc:
        policy.check_public_key(policy.csr_public_key(csr), SERVER)
    assert _rule(exc) == rule
    assert exc.value.kind is Kind.BAD_CSR


def test_good_csr_passes() -> None:
    csr = policy.parse_csr((DATA / "csr-good-rsa2048.pem").read_bytes())
    policy.check_csr_signature(csr)
    policy.check_public_key(policy.csr_public_key(csr), SERVER)
    assert policy.csr_identifiers(csr) == (Identifier("dns", "bad.test"),)


def test_profile_may_narrow_key_types() -> None:
    ec_only = load_profiles({"tls-server": {"key_types": ["ec-p256"]}})["tls-server"]
    with pytest.raises(CAError) as exc:
        policy.check_public_key(rsa.generate_private_key(65537, 2048).public_key(), ec_only)
    assert _rule(exc) == "key.type"
    policy.check_public_key(ec.generate_private_key(ec.SECP256R1()).public_key(), ec_only)


def test_profiles_cannot_allow_weak_key_types() -> None:
    with pytest.raises(CAError, match="key_types"):
        load_profiles({"tls-server": {"key_types": ["rsa-1024"]}})


@pytest.mark.parametrize(
    "name",
    [
        "bad..name.test",
        "-lead.test",
        "trail-.test",
        "a_b.test",
        "xn--zz.test",  # invalid punycode
        "ab--cd.test",  # reserved hyphens in positions 3-4
        "*.test",  # wildcard over a single label
        "localhost",  # a single label
        "a.*.test",
        "1.2.3.4",  # looks like an IP, is not a DNS name
        "x" * 64 + ".test",
        "ünicode.test",
        "",
    ],
)
def test_bad_dns_names_are_refused(name: str) -> None:
    with pytest.raises(CAError) as exc:
        policy.check_identifier(Identifier("dns", name), SERVER)
    assert _rule(exc) == "names.syntax"


def test_valid_punycode_and_wildcards_pass() -> None:
    assert policy.check_identifier(Identifier("dns", "xn--bcher-kva.test"), SERVER).value == (
        "xn--bcher-kva.test"
    )
    assert policy.check_identifier(Identifier("dns", "*.Web.Internal"), SERVER).value == (
        "*.web.internal"
    )


def test_names_outside_the_profile_are_refused() -> None:
    with pytest.raises(CAError) as exc:
        policy.check_identifier(Identifier("dns", "www.example.com"), SERVER)
    assert _rule(exc) == "names.allowed"
    with pytest.raises(CAError) as exc:
        policy.check_identifier(Identifier("ip", "8.8.8.8"), SERVER)
    assert _rule(exc) == "names.ip_range"


def test_denied_suffix_wins_over_allowed() -> None:
    profile = load_profiles({"tls-server": {"denied_dns_suffixes": ["secret.internal"]}})[
        "tls-server"
    ]
    with pytest.raises(CAError) as exc:
        policy.check_identifier(Identifier("dns", "db.secret.internal"), profile)
    assert _rule(exc) == "names.denied"
    policy.check_identifier(Identifier("dns", "db.public.internal"), profile)


def test_suffix_match_is_on_label_boundaries() -> None:
    profile = load_profiles({"tls-server": {"allowed_dns_suffixes": ["corp.example"]}})[
        "tls-server"
    ]
    policy.check_identifier(Identifier("dns", "a.corp.example"), profile)
    with pytest.raises(CAError):
        policy.check_identifier(Identifier("dns", "evilcorp.example"), profile)


def test_identifiers_are_deduplicated_and_canonical() -> None:
    checked = policy.check_identifiers(
        [Identifier("dns", "A.test"), Identifier("dns", "a.test"), Identifier("ip", "10.0.0.1")],
        SERVER,
    )
    assert checked == (Identifier("dns", "a.test"), Identifier("ip", "10.0.0.1"))
    with pytest.raises(CAError) as exc:
        policy.check_identifiers([], SERVER)
    assert _rule(exc) == "names.empty"


@pytest.mark.parametrize(
    ("entry", "canonical"),
    [
        ("Example.TEST.", "example.test"),
        ("internal", "internal"),  # one label: every name under it
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.0.0.5", "10.0.0.5/32"),
        ("fd00::/8", "fd00::/8"),
        ("2001:db8::1", "2001:db8::1/128"),
    ],
)
def test_name_restrictions_are_canonical(entry: str, canonical: str) -> None:
    assert policy.normalize_name_restriction(entry) == canonical


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("10.0.0.1/8", "host bits set"),
        ("fe80::/zz", "is not an IP network"),
        ("*.example.test", "drop the '*.'"),
        ("bad..name.test", "not a valid DNS name"),
        ("bücher.test", "not a valid DNS name"),
        ("xn--zz.test", "invalid punycode"),
        ("10.0.0.300", "looks like an IP address"),
        ("10", "neither a DNS suffix nor an IP network"),
        ("a b", "neither a DNS suffix nor an IP network"),
        ("", "neither a DNS suffix nor an IP network"),
    ],
)
def test_malformed_name_restrictions_are_refused(entry: str, says: str) -> None:
    with pytest.raises(CAError) as exc:
        policy.normalize_name_restriction(entry)
    assert _rule(exc) == "names.syntax"
    assert says in exc.value.detail


def test_validity_above_maximum_is_refused() -> None:
    with pytest.raises(CAError) as exc:
        policy.check_validity(SERVER.max_validity + datetime.timedelta(days=1), SERVER)
    assert _rule(exc) == "validity.max"
    with pytest.raises(CAError) as exc:
        policy.check_validity(datetime.timedelta(0), SERVER)
    assert _rule(exc) == "validity.positive"
    assert policy.check_validity(None, SERVER) == SERVER.default_validity


def test_common_name_not_in_san_becomes_a_requested_name() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cn.test")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("san.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    assert set(policy.csr_identifiers(csr)) == {
        Identifier("dns", "san.test"),
        Identifier("dns", "cn.test"),
    }


def test_serials_have_at_least_64_random_bits() -> None:
    """10,000 serials from the function the issuance path draws from (issuance uses it too)."""
    serials = [certs.new_serial() for _ in range(10_000)]
    assert len(set(serials)) == len(serials)
    assert all(s > 0 for s in serials)
    # DER INTEGER content octets, including a leading 0x00 when the top bit is set.
    assert max((s.bit_length() // 8) + 1 for s in serials) <= 20
    # The top random bit (bit 127) is set in about half: the randomness reaches the top.
    top = sum(1 for s in serials if s.bit_length() == certs.SERIAL_BITS)
    assert 4_500 < top < 5_500
    # Every one of the low 64 bits is set in about half as well.
    for bit in range(64):
        ones = sum((s >> bit) & 1 for s in serials)
        assert 4_500 < ones < 5_500, bit


def test_parse_serial_forms() -> None:
    assert certs.parse_serial("0A:1b:FF") == "a1bff"
    assert certs.parse_serial("0x00a1bff") == "a1bff"
    with pytest.raises(CAError):
        certs.parse_serial("zz")
    with pytest.raises(CAError):
        certs.parse_serial("0")
