"""Our pkilint wrapper finds exactly what stock pkilint finds, and refuses on ERROR."""

from __future__ import annotations

import datetime
import ipaddress
from unittest import mock

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

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
    from pyasn1_fasder import decode_der

    validator = lint.stock_certificate_validator()
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
    # What our memos key on: the same URI and name strings, good and bad, in several places
    # (AIA, CRL DP, SAN, NameConstraints, where an empty or dot-led name is fine), and
    # extensions whose checks depend on their OID, criticality or type.
    ocsp_url, issuer_url = "http://pki.test/ocsp", "http://pki.test/certs/ec.der"

    def aia(*urls: str) -> x509.AuthorityInformationAccess:
        return x509.AuthorityInformationAccess(
            [
                x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP
                    if i == 0
                    else AuthorityInformationAccessOID.CA_ISSUERS,
                    x509.UniformResourceIdentifier(url),
                )
                for i, url in enumerate(urls)
            ]
        )

    def crl_dp(url: str) -> x509.CRLDistributionPoints:
        return x509.CRLDistributionPoints(
            [x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)]
        )

    issuance_like = (
        good.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(aia(ocsp_url, issuer_url), critical=False)
        .add_extension(crl_dp("http://pki.test/crl/ec/3.crl"), critical=False)
    )
    bad_uris = (
        _builder([x509.DNSName("c.test")], "c.test")
        .add_extension(aia("not a uri", "ldap://pki.test/cn=ca"), critical=False)
        .add_extension(crl_dp(ocsp_url), critical=False)
    )
    critical_aia = _builder([x509.DNSName("d.test")], "d.test").add_extension(
        aia(ocsp_url, issuer_url), critical=True
    )
    dot_names = _builder(
        [
            x509.DNSName(".nc.test"),
            x509.UniformResourceIdentifier(".nc.test"),
            x509.RFC822Name("nc.test"),
            x509.RFC822Name("not an address"),
        ],
        "e.test",
    )
    name_constraints = (
        _builder([x509.DNSName("ca2.test")], "ca2")
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.NameConstraints(
                [
                    x509.DNSName(".nc.test"),
                    x509.UniformResourceIdentifier(".nc.test"),
                    x509.RFC822Name("nc.test"),
                    x509.IPAddress(ipaddress.ip_network("10.0.0.0/8")),
                ],
                [x509.DNSName("")],
            ),
            critical=True,
        )
    )
    mixed_extensions = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "f.test"),
                    x509.NameAttribute(NameOID.EMAIL_ADDRESS, "bad@@f.test"),
                ]
            )
        )
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")]))
        .public_key(KEY.public_key())
        .serial_number(certs.new_serial())
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("f.test")]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(b"\x02" * 20), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=True)
        .add_extension(x509.PolicyConstraints(0, None), critical=False)
        .add_extension(x509.InhibitAnyPolicy(0), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"),
            critical=False,
        )
    )
    out = []
    for label, builder, key in (
        ("good", good, KEY),
        ("good-rsa-signed", good, RSA_KEY),
        ("many-names", many, KEY),
        ("ca-without-ku", ca_without_ku, KEY),
        ("empty-subject-noncritical-san", empty_subject_noncritical, KEY),
        ("empty-dns-name", empty_dns_name, KEY),
        ("issuance-like", issuance_like, KEY),
        ("bad-uris", bad_uris, KEY),
        ("critical-aia", critical_aia, KEY),
        ("dot-names-outside-name-constraints", dot_names, KEY),
        ("name-constraints", name_constraints, KEY),
        ("mixed-extensions", mixed_extensions, KEY),
    ):
        cert = builder.sign(key, hashes.SHA256())
        out.append((label, cert.public_bytes(serialization.Encoding.DER)))
    return out


CASES = _cases()


@pytest.mark.parametrize(("label", "der"), CASES, ids=[c[0] for c in CASES])
def test_memoized_lint_finds_what_stock_pkilint_finds(label: str, der: bytes) -> None:
    # Twice: the second run answers from the memos. In the same order: the first ERROR names
    # the refusal's rule.
    for _ in range(2):
        assert list(map(str, lint.lint_certificate(der))) == list(map(str, _stock_findings(der)))


def test_memos_do_not_carry_findings_from_one_certificate_to_another() -> None:
    # Every case after every other, both ways round, twice: what one certificate left in the
    # memos (plans, name checks, small decodes) never shows in another's findings.
    stock = {label: list(map(str, _stock_findings(der))) for label, der in CASES}
    assert len({tuple(f) for f in stock.values()}) > len(CASES) // 2  # the cases differ
    for order in (CASES, CASES[::-1], CASES, CASES[::-1]):
        for label, der in order:
            assert list(map(str, lint.lint_certificate(der))) == stock[label], label


def test_cases_cover_what_the_memos_handle() -> None:
    # The comparison above means something only if the cases reach the memoized paths.
    codes = {f.code for _, der in CASES for f in _stock_findings(der)}
    assert {
        "pkix.invalid_uri_syntax",
        "pkix.ldap_uri_not_validated",
        "pkix.invalid_domain_name_syntax",
        "pkix.invalid_email_address_syntax",
        "pkix.authority_information_access_extension_critical",
    } <= codes, codes


def test_crl_and_ocsp_lints_are_repeatable() -> None:
    # Their documents are taken apart after each lint; a second lint of the same bytes, and
    # pkilint's own container built afresh, find the same.
    from pkilint import loader, pkix
    from pkilint.pkix import crl, extension, name

    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(7)
        .revocation_date(NOW)
        .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
        .build()
    )
    der = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(NOW)
        .next_update(NOW + datetime.timedelta(days=7))
        .add_revoked_certificate(revoked)
        .add_extension(x509.CRLNumber(3), critical=False)
        .sign(KEY, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    stock_validator = crl.create_pkix_crl_validator_container(
        [
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [
            crl.create_issuer_validator_container([]),
            crl.create_validity_validator_container([]),
            crl.create_extensions_validator_container([]),
        ],
    )
    document = loader.RFC5280CertificateListDocumentLoader().load_der_document(der, "CRL")
    stock = list(map(str, lint._findings(stock_validator.validate(document.root))))
    assert stock  # at least the missing AKI
    assert list(map(str, lint.lint_crl(der))) == stock
    assert list(map(str, lint.lint_crl(der))) == stock

    from cryptography.x509 import ocsp as x509_ocsp
    from pkilint.pkix import ocsp

    issuer_cert = (
        x509.CertificateBuilder()
        .subject_name(issuer)
        .issuer_name(issuer)
        .public_key(KEY.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .sign(KEY, hashes.SHA256())
    )
    subject_cert = x509.load_der_x509_certificate(dict(CASES)["good"])
    der = (
        x509_ocsp.OCSPResponseBuilder()
        .add_response(
            cert=subject_cert,
            issuer=issuer_cert,
            algorithm=hashes.SHA256(),
            cert_status=x509_ocsp.OCSPCertStatus.GOOD,
            this_update=NOW,
            next_update=NOW + datetime.timedelta(days=1),
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(x509_ocsp.OCSPResponderEncoding.HASH, issuer_cert)
        .sign(KEY, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    stock_validator = ocsp.create_pkix_ocsp_response_validator_container(
        [
            ocsp.create_response_decoder(),
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [],
    )
    document = loader.RFC6960OCSPResponseDocumentLoader().load_der_document(der, "OCSP")
    stock = list(map(str, lint._findings(stock_validator.validate(document.root))))
    assert list(map(str, lint.lint_ocsp_response(der))) == stock
    assert list(map(str, lint.lint_ocsp_response(der))) == stock


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
