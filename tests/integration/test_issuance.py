"""The one issuance path on real SoftHSM keys, against SQLite and PostgreSQL."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from ca import certs
from ca.errors import CAError, Kind
from ca.issuance import CertificateAuthority, IssuanceRequest
from ca.policy import Identifier
from ca.profiles import load_profiles
from ca.storage import CertificateFilter, Storage
from tests.conftest import BASE_URL, DATA, SessionPKI, pkilint

pytestmark = pytest.mark.integration


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, *names: str) -> bytes:
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            import ipaddress

            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _openssl_verify(tmp_path: Path, pki: SessionPKI, chain_pem: str, leaf_pem: str) -> None:
    (tmp_path / "chain.pem").write_text(chain_pem)
    (tmp_path / "leaf.pem").write_text(leaf_pem)
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(pki.root_pem),
            "-untrusted",
            str(tmp_path / "chain.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _lint_all(tmp_path: Path, pki: SessionPKI, issuer_pem: str, leaf_pem: str) -> None:
    (tmp_path / "issuer.pem").write_text(issuer_pem)
    (tmp_path / "leaf.pem").write_text(leaf_pem)
    for args in (
        ("lint_pkix_cert", str(tmp_path / "leaf.pem")),
        ("lint_pkix_cert", str(tmp_path / "issuer.pem")),
        ("lint_pkix_cert", str(pki.root_pem)),
        (
            "lint_pkix_signer_signee_cert_chain",
            str(tmp_path / "issuer.pem"),
            str(tmp_path / "leaf.pem"),
        ),
        ("lint_pkix_signer_signee_cert_chain", str(pki.root_pem), str(tmp_path / "issuer.pem")),
    ):
        result = pkilint(*args)
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"


@pytest.mark.parametrize(
    ("issuer", "subject_key"),
    [
        ("issuing-ec", "ec-p256"),
        ("issuing-ec", "rsa-2048"),
        ("issuing-rsa", "ec-p384"),
        ("issuing-rsa", "rsa-3072"),
    ],
)
def test_issue_from_csr_verifies_and_lints_clean(
    authority: CertificateAuthority, pki: SessionPKI, tmp_path: Path, issuer: str, subject_key: str
) -> None:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if subject_key.startswith("ec"):
        key = ec.generate_private_key(
            ec.SECP256R1() if subject_key == "ec-p256" else ec.SECP384R1()
        )
    else:
        key = rsa.generate_private_key(65537, int(subject_key.split("-")[1]))
    issued = authority.issue_from_csr(
        _csr(key, "web.internal", "api.web.internal", "10.0.0.7"),
        "tls-server",
        issuer=issuer,
        owner="team-web",
        source="tests",
    )
    cert = issued.certificate
    _openssl_verify(tmp_path, pki, issued.chain_pem(), issued.pem())
    _lint_all(tmp_path, pki, issued.chain_pem(), issued.pem())

    # The extensions DESIGN.md §3 promises.
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment == subject_key.startswith("rsa")
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert set(san.value.get_values_for_type(x509.DNSName)) == {"web.internal", "api.web.internal"}
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "api.web.internal"
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_cert = issued.chain[0]
    assert (
        aki.key_identifier
        == issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )
    aia = {
        d.access_method: d.access_location.value
        for d in ext.get_extension_for_class(x509.AuthorityInformationAccess).value
    }
    assert aia[AuthorityInformationAccessOID.OCSP] == f"{BASE_URL}/ocsp"
    assert aia[AuthorityInformationAccessOID.CA_ISSUERS] == f"{BASE_URL}/certs/{issuer}.der"
    cdp = ext.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name
    assert cdp is not None
    shard = cert.serial_number % 16
    assert cdp[0].value == f"{BASE_URL}/crl/{issuer}/{shard}.crl"

    # Recorded: the inventory holds exactly what was handed out.
    record = authority.storage.get_certificate(certs.serial_hex(cert.serial_number))
    assert record.status == "issued"
    assert record.der == cert.public_bytes(serialization.Encoding.DER)
    assert record.owner == "team-web"
    assert record.crl_shard == shard
    assert record.issuer_id == issuer
    events = authority.storage.audit_events(5)
    assert events[0]["action"] == "certificate.issue" and events[0]["outcome"] == "success"


def test_ip_only_certificate_has_empty_subject_and_critical_san(
    authority: CertificateAuthority, pki: SessionPKI, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = authority.issue(
        IssuanceRequest(key.public_key(), (Identifier("ip", "10.9.8.7"),), "tls-client")
    )
    assert list(issued.certificate.subject) == []
    assert issued.certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).critical
    assert list(
        issued.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    ) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    _openssl_verify(tmp_path, pki, issued.chain_pem(), issued.pem())
    _lint_all(tmp_path, pki, issued.chain_pem(), issued.pem())


def test_server_client_profile_carries_both_ekus(authority: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = authority.issue(
        IssuanceRequest(key.public_key(), (Identifier("dns", "m.internal"),), "tls-server-client")
    )
    ekus = set(issued.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ekus == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_validity_defaults_and_is_capped_by_profile(authority: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = authority.issue(
        IssuanceRequest(
            key.public_key(),
            (Identifier("dns", "v.internal"),),
            "tls-server",
            validity=datetime.timedelta(days=10),
        )
    )
    lifetime = issued.certificate.not_valid_after_utc - issued.certificate.not_valid_before_utc
    assert (
        datetime.timedelta(days=10) - datetime.timedelta(seconds=2)
        < lifetime
        <= datetime.timedelta(days=10)
    )
    with pytest.raises(CAError) as exc:
        authority.issue(
            IssuanceRequest(
                key.public_key(),
                (Identifier("dns", "v.internal"),),
                "tls-server",
                validity=datetime.timedelta(days=398),
            )
        )
    assert exc.value.rule == "validity.max"


@pytest.mark.parametrize(
    ("filename", "rule"),
    [
        ("csr-rsa1024.pem", "key.rsa_size"),
        ("csr-rsa2047.pem", "key.rsa_size"),
        ("csr-p192.pem", "key.curve"),
        ("csr-dsa.pem", "key.type"),
        ("csr-sha1.pem", "csr.signature_hash"),
        ("csr-bad-signature.der", "csr.signature"),
        ("csr-outside-policy.pem", "names.allowed"),
        ("garbage.bin", "csr.parse"),
        ("empty.csr", "csr.parse"),
    ],
)
def test_bad_requests_are_refused_and_nothing_is_issued(
    authority: CertificateAuthority, filename: str, rule: str
) -> None:
    with pytest.raises(CAError) as exc:
        authority.issue_from_csr((DATA / filename).read_bytes(), "tls-server")
    assert exc.value.rule == rule
    assert authority.storage.count_certificates() == 0  # not even a pending row
    refusal = authority.storage.audit_events(1)[0]
    assert refusal["outcome"] == "refused" and refusal["detail"]["rule"] == rule


def test_unknown_profile_and_issuer_are_refused(authority: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(CAError) as exc:
        authority.issue(IssuanceRequest(key, (Identifier("dns", "a.internal"),), "nope"))
    assert exc.value.rule == "profile.unknown"
    with pytest.raises(CAError) as exc:
        authority.issue(
            IssuanceRequest(key, (Identifier("dns", "a.internal"),), "tls-server", issuer="root")
        )
    assert exc.value.rule == "issuer.kind"
    with pytest.raises(CAError) as exc:
        authority.issue(
            IssuanceRequest(key, (Identifier("dns", "a.internal"),), "tls-server", issuer="ghost")
        )
    assert exc.value.kind is Kind.NOT_FOUND
    assert authority.storage.count_certificates() == 0


def test_retired_issuer_no_longer_issues(authority: CertificateAuthority) -> None:
    authority.storage.set_issuer_status("issuing-rsa", "retired", "tests")
    authority.forget_issuers()
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(CAError) as exc:
        authority.issue(
            IssuanceRequest(
                key, (Identifier("dns", "a.internal"),), "tls-server", issuer="issuing-rsa"
            )
        )
    assert exc.value.rule == "issuer.status"


def test_hsm_failure_leaves_a_failed_serial_and_releases_nothing(
    storage: Storage, pki: SessionPKI
) -> None:
    """A signing failure after the reservation keeps the serial on record, never reused."""
    from ca.hsm import Token

    broken = Token(pki.module, "no-such-token", "0000")
    authority = CertificateAuthority(
        storage, broken, load_profiles({}), public_base_url=BASE_URL, default_issuer="issuing-ec"
    )
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(CAError) as exc:
        authority.issue(IssuanceRequest(key, (Identifier("dns", "a.internal"),), "tls-server"))
    assert exc.value.kind is Kind.HSM
    rows = storage.list_certificates(CertificateFilter())
    assert [r.status for r in rows] == ["failed"]
    assert rows[0].der is None


def test_lint_error_refuses_issuance(
    authority: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ERROR from pkilint on the to-be-signed certificate stops it before the HSM signs."""
    from ca import lint

    signed: list[bytes] = []
    original_key = authority._issuer_key

    def spy(loaded):  # type: ignore[no-untyped-def]
        signed.append(b"x")
        return original_key(loaded)

    monkeypatch.setattr(authority, "_issuer_key", spy)
    monkeypatch.setattr(
        lint,
        "lint_certificate",
        lambda der: [lint.Finding("ERROR", "pkix.test_forced_error", "certificate")],
    )
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(CAError) as exc:
        authority.issue(IssuanceRequest(key, (Identifier("dns", "a.internal"),), "tls-server"))
    assert exc.value.kind is Kind.LINT
    assert exc.value.rule == "lint.pkix.test_forced_error"
    assert signed == []
    assert [r.status for r in authority.storage.list_certificates(CertificateFilter())] == [
        "failed"
    ]


def test_revoke_unknown_twice_and_bad_reasons(authority: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    issued = authority.issue(IssuanceRequest(key, (Identifier("dns", "r.internal"),), "tls-server"))
    serial = issued.record.serial
    with pytest.raises(CAError) as exc:
        authority.revoke("0a0b0c", "keyCompromise")
    assert exc.value.kind is Kind.NOT_FOUND
    for reason in ("certificateHold", 6, "removeFromCRL", 8, 7, "bogus", "cACompromise", 2, 10):
        with pytest.raises(CAError) as exc:
            authority.revoke(serial, reason)
        assert exc.value.kind is Kind.BAD_REVOCATION_REASON
    record = authority.revoke(serial.upper(), "keyCompromise")
    assert record.status == "revoked" and record.revocation_reason == 1
    assert record.revoked_at is not None
    with pytest.raises(CAError) as exc:
        authority.revoke(serial, "superseded")
    assert exc.value.kind is Kind.ALREADY_REVOKED
    assert authority.storage.get_certificate(serial).revocation_reason == 1


def test_inventory_filters(authority: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    a = authority.issue(
        IssuanceRequest(
            key,
            (Identifier("dns", "a.web.internal"),),
            "tls-server",
            validity=datetime.timedelta(days=5),
            owner="web",
        )
    )
    b = authority.issue(
        IssuanceRequest(
            key,
            (Identifier("dns", "db.internal"),),
            "tls-client",
            validity=datetime.timedelta(days=60),
            issuer="issuing-rsa",
        )
    )
    storage = authority.storage
    serials = lambda f: [r.serial for r in storage.list_certificates(f)]  # noqa: E731
    assert serials(CertificateFilter(name="a.web.internal")) == [a.record.serial]
    assert serials(CertificateFilter(name="*.web.internal")) == [a.record.serial]
    assert serials(CertificateFilter(profile="tls-client")) == [b.record.serial]
    assert serials(CertificateFilter(issuer="issuing-rsa")) == [b.record.serial]
    assert serials(CertificateFilter(owner="web")) == [a.record.serial]
    soon = authority.clock.now() + datetime.timedelta(days=30)
    assert serials(CertificateFilter(expiring_before=soon)) == [a.record.serial]
    authority.revoke(a.record.serial, "superseded")
    assert serials(CertificateFilter(status="revoked")) == [a.record.serial]
    assert serials(CertificateFilter(status="issued")) == [b.record.serial]


def test_many_issuances_get_distinct_recorded_serials(authority: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    serials = {
        authority.issue(
            IssuanceRequest(key, (Identifier("dns", f"n{i}.internal"),), "tls-server")
        ).certificate.serial_number
        for i in range(200)
    }
    assert len(serials) == 200
    assert all(0 < s < 1 << 128 for s in serials)
    assert authority.storage.count_certificates("issued") == 200


def test_on_record_writes_in_the_recording_transaction(
    authority: CertificateAuthority, storage: Storage
) -> None:
    """What a caller writes in `on_record` commits with the certificate's record, or neither
    does: the certificate stays pending (never released) when the caller's part fails."""
    from sqlalchemy import Connection

    from ca.storage import CertificateRecord, audit

    seen: list[str] = []

    def note(connection: Connection, record: CertificateRecord) -> None:
        seen.append(record.serial)
        audit.append(
            connection,
            audit.values(storage.clock.now(), "test", "test.note", record.serial, "success", {}),
        )

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    issued = authority.issue(
        IssuanceRequest(key, (Identifier("dns", "noted.internal"),), "tls-server"), on_record=note
    )
    assert seen == [issued.record.serial] and issued.record.status == "issued"
    assert [e["subject"] for e in storage.audit_events() if e["action"] == "test.note"] == seen

    def fail(connection: Connection, record: CertificateRecord) -> None:
        raise CAError(Kind.STORAGE, "the caller's write failed")

    with pytest.raises(CAError, match="the caller's write failed"):
        authority.issue(
            IssuanceRequest(key, (Identifier("dns", "unnoted.internal"),), "tls-server"),
            on_record=fail,
        )
    unnoted = storage.list_certificates(CertificateFilter(name="unnoted.internal"))
    assert [(r.status, r.der) for r in unnoted] == [("pending", None)]
