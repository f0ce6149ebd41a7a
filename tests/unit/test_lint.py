"""Our pkilint wrapper finds exactly what stock pkilint finds, and refuses on ERROR."""

from __future__ import annotations

import datetime
import ipaddress
from unittest import mock

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca import certs, lint
from ca.errors import CAError, Kind

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(65537, 2048)


def _stock_findings(der: bytes) -> list[lint.Finding]:
    """pkilint's lint_pkix_cert exactly as its command-line tool builds it, unmodified (also
    without our cache of small decodes)."""
    from pkilint import document as pkilint_document
    from pkilint import loader
    from pkilint.pkix import certificate, extension, name
    from pyasn1_fasder import decode_der

    validator = certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(
            name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
        ),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )
    with mock.patch.object(pkilint_document, "decode_der", decode_der):
        document = loader.RFC5280CertificateDocumentLoader().load_der_document(der, "certificate")
        return lint._findings(validator.validate(document.root))


def _builder(names: list[x509.GeneralName], subject: str | None) -> x509.CertificateBuilder:
    public = KEY.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)] if subject else [])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")]))
        .public_key(public)
        .serial_number(certs.new_serial())
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=subject is None)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(b"\x01" * 20, None, None), critical=False)
    )


def _cases() -> list[tuple[str, bytes]]:
    good = _builder([x509.DNSName("a.test")], "a.test").add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
    )
    many = _builder(
        [x509.DNSName(f"n{i}.test") for i in range(40)]
        + [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))],
        None,
    )
    # Known problems: a CA certificate without keyUsage, a non-critical SAN on an empty subject,
    # and an empty SAN DNS name.
    ca_without_ku = _builder([x509.DNSName("ca.test")], "ca").add_extension(
        x509.BasicConstraints(ca=True, path_length=None), critical=True
    )
    empty_subject_noncritical = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")]))
        .public_key(KEY.public_key())
        .serial_number(certs.new_serial())
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("x.test")]), critical=False)
    )
    empty_dns_name = _builder([x509.DNSName("")], "b.test")
    out = []
    for label, builder, key in (
        ("good", good, KEY),
        ("good-rsa-signed", good, RSA_KEY),
        ("many-names", many, KEY),
        ("ca-without-ku", ca_without_ku, KEY),
        ("empty-subject-noncritical-san", empty_subject_noncritical, KEY),
        ("empty-dns-name", empty_dns_name, KEY),
    ):
        cert = builder.sign(key, hashes.SHA256())
        out.append((label, cert.public_bytes(serialization.Encoding.DER)))
    return out


CASES = _cases()


@pytest.mark.parametrize(("label", "der"), CASES, ids=[c[0] for c in CASES])
def test_memoized_lint_finds_what_stock_pkilint_finds(label: str, der: bytes) -> None:
    # Twice: the second run answers from the memo.
    for _ in range(2):
        assert sorted(map(str, lint.lint_certificate(der))) == sorted(
            map(str, _stock_findings(der))
        )


def test_known_problems_are_errors_and_refuse() -> None:
    by_label = dict(CASES)
    assert not lint.errors(lint.lint_certificate(by_label["good"]))
    for label in ("ca-without-ku", "empty-subject-noncritical-san", "empty-dns-name"):
        findings = lint.errors(lint.lint_certificate(by_label[label]))
        assert findings, label
        with pytest.raises(CAError) as exc:
            lint.require_clean(lint.lint_certificate(by_label[label]), "certificate")
        assert exc.value.kind is Kind.LINT
        assert exc.value.rule is not None and exc.value.rule.startswith("lint.")


def test_undecodable_input_is_a_lint_error() -> None:
    with pytest.raises(CAError) as exc:
        lint.lint_certificate(b"\x30\x03\x02\x01")
    assert exc.value.kind is Kind.LINT


@pytest.mark.parametrize(
    ("names", "tolerated"),
    [
        (["*.wild.test", "wild.test"], True),
        (["*.xn--bcher-kva.test"], True),
        (["*.bad..name.test"], False),  # the base itself is not a domain name
        (["a.*.test"], False),  # a wildcard not in the leftmost label
        (["*.*.test"], False),
    ],
)
def test_wildcard_dns_names_are_tolerated_only_when_well_formed(
    names: list[str], tolerated: bool
) -> None:
    der = (
        _builder([x509.DNSName(n) for n in names], None)
        .sign(KEY, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    findings = lint.lint_certificate(der)
    raw_errors = [f for f in findings if f.severity == "ERROR"]
    assert raw_errors, "stock pkilint flags every wildcard name"
    assert (lint.errors(findings) == []) is tolerated
