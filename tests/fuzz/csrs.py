"""CSR inputs for the fuzzers: structured CSRs built with odd choices, and byte mutations of
valid and known-bad seeds (tests/data)."""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier
from hypothesis import strategies as st

from tests.conftest import DATA
from tests.fuzz.mutate import mutated

SigningKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


@functools.cache
def keys() -> dict[str, Any]:
    """Made once: key generation (RSA above all) would dominate the time per example."""
    return {
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p256b": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "p521": ec.generate_private_key(ec.SECP521R1()),
        "k256": ec.generate_private_key(ec.SECP256K1()),
        "rsa2048": rsa.generate_private_key(65537, 2048),
        "rsa1024": rsa.generate_private_key(65537, 1024),  # noqa: S505 - refused on purpose
        "rsa2048e3": rsa.generate_private_key(3, 2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "ed448": ed448.Ed448PrivateKey.generate(),
    }


_HASHES: dict[str, Any] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
    "sha224": hashes.SHA224(),
    "sha1": hashes.SHA1(),  # noqa: S303 - a refused algorithm, on purpose
    "sha3_256": hashes.SHA3_256(),
}

dns_labels = st.one_of(
    st.sampled_from(["a", "www", "*", "xn--nxasmq6b", "xn--zz", "ab--cd", "-a", "a-", "1", "_x"]),
    st.text(alphabet="abcz09-*._", min_size=0, max_size=12),
    st.text(max_size=6),
)
dns_names = st.one_of(
    st.lists(dns_labels, min_size=1, max_size=5).map(".".join).map(lambda n: n + ".test"),
    st.lists(dns_labels, min_size=1, max_size=5).map(".".join),
    st.sampled_from(["host.test", "*.host.test", "localhost", "a" * 300 + ".test", "1.2.3.4"]),
)
ip_addresses = st.one_of(
    st.ip_addresses(),
    st.sampled_from([ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("::1")]),
)


@st.composite
def general_names(draw: st.DrawFn) -> x509.GeneralName:
    try:
        return _general_name(draw)
    except (ValueError, UnicodeError):
        return x509.DNSName("unencodable.host.test")  # cryptography refuses to build it


def _general_name(draw: st.DrawFn) -> x509.GeneralName:
    kind = draw(st.sampled_from(["dns", "dns", "dns", "ip", "email", "uri", "rid", "other"]))
    if kind == "dns":
        return x509.DNSName(draw(dns_names))
    if kind == "ip":
        return x509.IPAddress(draw(ip_addresses))
    if kind == "email":
        return x509.RFC822Name(draw(st.sampled_from(["a@b.test", "x", "@"])))
    if kind == "uri":
        return x509.UniformResourceIdentifier(draw(st.sampled_from(["https://a.test/", "x"])))
    if kind == "rid":
        return x509.RegisteredID(ObjectIdentifier("1.2.3.4"))
    return x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x03abc")


@st.composite
def built_csrs(draw: st.DrawFn) -> bytes:
    """A CSR made with odd but encodable choices: any key type, hash, subject, SAN list
    (up to 150 names), unknown extensions, and a key/signature mismatch."""
    key_name = draw(st.sampled_from(sorted(keys())))
    key = keys()[key_name]
    attributes: list[x509.NameAttribute[Any]] = []
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        oid = draw(
            st.sampled_from([NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.COUNTRY_NAME])
        )
        value = draw(st.one_of(dns_names, st.text(min_size=1, max_size=80)))
        with contextlib.suppress(ValueError):  # e.g. a country name of other than 2 letters
            attributes.append(x509.NameAttribute(oid, value))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if draw(st.integers(min_value=0, max_value=9)) != 5:  # not 0: hypothesis favours bounds
        count = draw(st.sampled_from([0, 1, 1, 2, 3, 5, 101, 150]))
        names = [draw(general_names()) for _ in range(min(count, 3))]
        names += [x509.DNSName(f"n{i}.host.test") for i in range(count - len(names))]
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=draw(st.booleans())
        )
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        dotted = draw(
            st.sampled_from(["1.2.3.4.5", "2.5.29.17", "2.5.29.19", "1.3.6.1.5.5.7.1.24"])
        )
        with contextlib.suppress(ValueError):  # "already set": one extension per OID
            builder = builder.add_extension(
                x509.UnrecognizedExtension(ObjectIdentifier(dotted), draw(st.binary(max_size=40))),
                critical=draw(st.booleans()),
            )
    algorithm = None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        algorithm = _HASHES[draw(st.sampled_from(sorted(_HASHES)))]
    try:
        der = builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return b"\x30\x00"  # a choice cryptography refuses to encode: an empty SEQUENCE
    if draw(st.integers(min_value=0, max_value=9)) == 5:
        der = swap_key(der, key_name)
    return der


def _spki(key: Any) -> bytes:
    spki: bytes = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return spki


def swap_key(der: bytes, key_name: str) -> bytes:
    """The CSR with another key of the same size in place of its own: the signature no longer
    matches the key it claims."""
    other = {"p256": "p256b", "p256b": "p256"}.get(key_name)
    if other is None:
        return der
    return der.replace(_spki(keys()[key_name]), _spki(keys()[other]))


@functools.cache
def seed_csrs() -> tuple[bytes, ...]:
    """Valid CSRs of every accepted key type, plus the known-bad files of tests/data."""
    seeds = []
    for name in ("p256", "p384", "rsa2048"):
        seeds.append(
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seed.host.test")]))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("seed.host.test"),
                        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
                    ]
                ),
                critical=False,
            )
            .sign(keys()[name], hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
    # Names that are not what their string type says (broken UTF-8, a NUL, Latin-1 bytes);
    # the signature no longer verifies, but the name parsers still see them.
    for bad in (b"seed\xff\xfe.host.te", b"see\x00.host.test", b"s\xe9ed.host.test"):
        seeds.append(seeds[0].replace(b"seed.host.test", bad, 1))  # the CN only
        seeds.append(seeds[0].replace(b"seed.host.test", bad))  # and the SAN
    for path in sorted(DATA.glob("csr-*")):
        raw = path.read_bytes()
        if raw.startswith(b"-----BEGIN"):
            raw = x509.load_pem_x509_csr(raw).public_bytes(serialization.Encoding.DER)
        seeds.append(raw)
    return tuple(seeds)


def pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


@st.composite
def csr_inputs(draw: st.DrawFn) -> bytes:
    """Everything a CSR parser may be handed: structured, mutated DER, PEM (mutated or with a
    damaged body), non-UTF-8 and plain byte soup."""
    kind = draw(
        st.sampled_from(["built", "built", "mutated", "mutated", "resigned", "pem", "soup"])
    )
    if kind == "built":
        return draw(built_csrs())
    if kind == "resigned":
        # Mutated inside, signed again: past the signature check into the name/key parsers.
        der = seed_csrs()[0]
        tbs = x509.load_der_x509_csr(der).tbs_certrequest_bytes
        return resigned(der, tbs, draw(mutated([tbs])))
    if kind == "mutated":
        return draw(mutated(seed_csrs()))
    if kind == "pem":
        der = draw(st.one_of(st.sampled_from(seed_csrs()), mutated(seed_csrs())))
        text = pem(der)
        if draw(st.booleans()):
            text = draw(mutated([text], max_ops=3))
        return text
    return draw(
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from([b"", b" \n", b"-----BEGIN", b"\xff\xfe\x00", b"\x30\x80\x00\x00"]),
        )
    )


def off_curve_csr() -> bytes:
    """Regression seed: a P-256 CSR whose public point is not on the curve. cryptography's
    `is_signature_valid` raised ValueError("Invalid key") on it, which escaped the CSR check
    as an unhandled exception (fixed in ca/policy.py `check_csr_signature`)."""
    der = seed_csrs()[0]
    point = (
        keys()["p256"]
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    return der.replace(point, b"\x04" + b"\x01" * 64)


def bad_version_csr() -> bytes:
    """Regression seed: a CSR of version 16. cryptography raises `x509.InvalidVersion`, which is
    not a ValueError, so it escaped `policy.parse_csr` and ACME finalize (a 500)."""
    der = seed_csrs()[0]
    return der.replace(b"\x02\x01\x00", b"\x02\x01\x10", 1)


@functools.cache
def certificate_seeds() -> tuple[bytes, ...]:
    """A self-signed certificate, and the same with version 16 (cryptography's InvalidVersion:
    it escaped ACME revokeCert as a 500)."""
    key = keys()["p256"]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seed.host.test")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    der = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(0x1234)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    return der, der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x10", 1)


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def resigned(der: bytes, old: bytes, new: bytes) -> bytes:
    """``der`` (a P-256 seed CSR) with ``old`` replaced by ``new`` in its
    CertificationRequestInfo, signed again: a CSR with a valid signature that no builder
    would make."""
    csr = x509.load_der_x509_csr(der)
    tbs = csr.tbs_certrequest_bytes
    algorithm = der[der.index(tbs) + len(tbs) :]  # AlgorithmIdentifier, then the BIT STRING
    algorithm = algorithm[: 2 + algorithm[1]]
    new_tbs = tbs.replace(old, new)
    signature = keys()["p256"].sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    return _tlv(0x30, new_tbs + algorithm + _tlv(0x03, b"\x00" + signature))


def bad_utf8_name_csr() -> bytes:
    """Regression seed: a correctly signed CSR whose CN is a UTF8String of invalid UTF-8.
    Reading the subject raised ValueError out of `policy.csr_identifiers` (finalize: a 500)."""
    der = seed_csrs()[0]
    tbs = x509.load_der_x509_csr(der).tbs_certrequest_bytes
    cn_at = tbs.index(b"seed.host.test")  # the subject's CN comes before the SAN
    broken = tbs[:cn_at] + b"seed\xff\xfe.host.te" + tbs[cn_at + 14 :]
    return resigned(der, tbs, broken)
