"""`certwright audit` findings over real certificates: ours from the SoftHSM-backed authority,
discovered ones built with `cryptography` (weak keys, SHA-1, self-signed, foreign issuers) and
stored through the models, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ca.config import Config, load_config
from ca.findings import Finding, at_or_above, compute_findings
from ca.issuance import CertificateAuthority, IssuanceRequest, IssuedCertificate
from ca.policy import Identifier
from ca.storage import Reservation, Storage
from ca.storage.models import CertificateSighting, DiscoveredCertificate
from tests.conftest import run_cli

pytestmark = pytest.mark.integration

DAY = datetime.timedelta(days=1)
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def config(environ: Mapping[str, str] | None = None) -> Config:
    """Defaults plus CERTWRIGHT_SECTION__KEY overrides, without reading the process env."""
    return load_config(None, environ=dict(environ or {}))


def issue(
    authority: CertificateAuthority,
    *names: str,
    days: float,
    owner: str | None = None,
    replaces: str | None = None,
) -> IssuedCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return authority.issue(
        IssuanceRequest(
            key.public_key(),
            tuple(Identifier("dns", n) for n in names),
            "tls-server",
            validity=datetime.timedelta(days=days),
            owner=owner,
            replaces=replaces,
        )
    )


def build_cert(
    *,
    cn: str,
    key: PrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    issuer_cn: str | None = None,
    issuer_key: PrivateKey | None = None,
    is_ca: bool = False,
) -> x509.Certificate:
    """A real certificate; self-signed unless an issuer is given."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn or cn)])
    signer = issuer_key or key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


def openssl_sha1_cert(
    directory: Path, cn: str, *, bits: int, days: int, ca: bool
) -> x509.Certificate:
    """A self-signed SHA-1 RSA certificate made by the openssl command (cryptography refuses to
    sign with SHA-1, as it should)."""
    out = directory / f"{cn}.pem"
    extensions = ["-addext", f"basicConstraints=critical,CA:{'TRUE' if ca else 'FALSE'}"]
    if not ca:
        extensions += ["-addext", f"subjectAltName=DNS:{cn}"]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-sha1",
            "-newkey",
            f"rsa:{bits}",
            "-nodes",
            "-keyout",
            str(directory / f"{cn}.key"),
            "-subj",
            f"/CN={cn}",
            "-days",
            str(days),
            "-out",
            str(out),
            *extensions,
        ],
        check=True,
        capture_output=True,
    )
    return x509.load_pem_x509_certificate(out.read_bytes())


def add_discovered(
    storage: Storage,
    cert: x509.Certificate,
    *,
    seen: datetime.datetime,
    locations: tuple[str, ...] = ("127.0.0.1:443",),
    missed_scans: int = 0,
    certificate_id: int | None = None,
    owner: str | None = None,
) -> str:
    """Store a discovered certificate and its sightings as a scan would; returns the subject."""
    der = cert.public_bytes(serialization.Encoding.DER)
    fingerprint = hashlib.sha256(der).hexdigest()
    try:
        names = " ".join(
            cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.DNSName)
        )
    except x509.ExtensionNotFound:
        names = ""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    public = cert.public_key()
    key_type = (
        f"rsa-{public.key_size}"
        if isinstance(public, rsa.RSAPublicKey)
        else f"ec-{public.curve.name}"  # type: ignore[union-attr]
    )
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    with storage.transaction() as session:
        row = DiscoveredCertificate(
            fingerprint_sha256=fingerprint,
            der=der,
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            serial=format(cert.serial_number, "x"),
            common_name=str(cns[0].value) if cns else None,
            names=names,
            key_type=key_type,
            signature_algorithm=cert.signature_algorithm_oid._name,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            self_signed=cert.issuer == cert.subject,
            is_ca=is_ca,
            certificate_id=certificate_id,
            owner=owner,
            tags="",
            first_seen=seen - DAY,
            last_seen=seen,
        )
        session.add(row)
        session.flush()
        for location in locations:
            kind = "file" if location.startswith("/") else "tls"
            session.add(
                CertificateSighting(
                    discovered_id=row.id,
                    location_kind=kind,
                    location=location,
                    first_seen=seen - DAY,
                    last_seen=seen,
                    missed_scans=missed_scans,
                )
            )
    return f"sha256:{fingerprint}"


def by_subject(findings: list[Finding]) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for f in findings:
        out.setdefault(f.subject, set()).add((f.code, f.severity))
    return out


def test_findings_over_our_and_discovered_certificates(
    storage: Storage, authority: CertificateAuthority, tmp_path: Path
) -> None:
    real_now = datetime.datetime.now(datetime.UTC)
    now = real_now + 2 * DAY  # audit as of two days from now
    expiring = issue(authority, "expiring.internal", days=10, owner="team-a")
    urgent = issue(authority, "urgent.internal", days=3, owner="team-a")
    healthy = issue(authority, "healthy.internal", days=90, owner="team-b")
    expired_deployed = issue(authority, "gone-bad.internal", days=1, owner="team-c")
    expired_quiet = issue(authority, "quiet.internal", days=1)
    renewed_old = issue(authority, "renewed.internal", days=1)
    renewed_new = issue(authority, "renewed.internal", days=90, replaces=renewed_old.record.serial)
    revoked = issue(authority, "revoked.internal", days=90, owner="team-d")
    revoked_clean = issue(authority, "revoked-clean.internal", days=90)
    authority.revoke(revoked.record.serial, "keyCompromise", actor="tests")
    authority.revoke(revoked_clean.record.serial, "superseded", actor="tests")
    # A reserved serial that was never signed: not live, never an expiry finding.
    storage.reserve_serial(
        Reservation(
            serial="abcdef0123",
            issuer_id="issuing-ec",
            profile="tls-server",
            common_name="pending.internal",
            names=("pending.internal",),
            key_type="ec-p256",
            spki_sha256="0" * 64,
            not_before=real_now,
            not_after=real_now + DAY,
            crl_shard=0,
            owner=None,
            source="tests",
        )
    )

    # Our certificates as a scan saw them: one expired but still served, one revoked yet seen
    # after its revocation, one revoked and gone before.
    add_discovered(
        storage,
        expired_deployed.certificate,
        seen=real_now,
        certificate_id=expired_deployed.record.id,
    )
    add_discovered(
        storage,
        revoked.certificate,
        seen=real_now + datetime.timedelta(hours=1),
        locations=("10.0.0.5:8443",),
        certificate_id=revoked.record.id,
    )
    add_discovered(
        storage,
        revoked_clean.certificate,
        seen=real_now - DAY,
        certificate_id=revoked_clean.record.id,
    )
    # Ours, found in a file but not linked: the authority key identifier says it is ours.
    unlinked_ours = add_discovered(
        storage, healthy.certificate, seen=real_now, locations=("/etc/ssl/healthy.pem",)
    )

    # Shadow certificates.
    shadow = add_discovered(
        storage,
        openssl_sha1_cert(tmp_path, "legacy.internal", bits=1024, days=5 * 365, ca=False),
        seen=real_now,
        owner="legacy-team",
    )
    foreign_ca = ec.generate_private_key(ec.SECP384R1())
    foreign = add_discovered(
        storage,
        build_cert(
            cn="foreign.internal",
            key=ec.generate_private_key(ec.SECP256R1()),
            issuer_cn="Some Other CA",
            issuer_key=foreign_ca,
            not_before=real_now - DAY,
            not_after=real_now + 60 * DAY,
        ),
        seen=real_now,
    )
    odd_curve = add_discovered(
        storage,
        build_cert(
            cn="koblitz.internal",
            key=ec.generate_private_key(ec.SECP256K1()),
            issuer_cn="Some Other CA",
            issuer_key=foreign_ca,
            not_before=real_now - DAY,
            not_after=real_now + 4 * DAY,  # 2 days left at `now`
        ),
        seen=real_now,
    )
    vanished = add_discovered(
        storage,
        build_cert(
            cn="vanished.internal",
            key=ec.generate_private_key(ec.SECP256R1()),
            issuer_cn="Some Other CA",
            issuer_key=foreign_ca,
            not_before=real_now - 10 * DAY,
            not_after=real_now - DAY,
        ),
        seen=real_now - 5 * DAY,
        missed_scans=3,
    )
    root_sha1 = add_discovered(
        storage,
        openssl_sha1_cert(tmp_path, "Old Root", bits=2048, days=3000, ca=True),
        seen=real_now,
        locations=("/etc/ssl/bundle.pem",),
    )

    findings = compute_findings(
        storage,
        config(
            {
                # The profile was narrowed after `healthy` was issued for 90 days.
                "CERTWRIGHT_PROFILES__TLS_SERVER__MAX_VALIDITY_DAYS": "60",
                "CERTWRIGHT_PROFILES__TLS_SERVER__DEFAULT_VALIDITY_DAYS": "30",
            }
        ),
        now,
    )
    got = by_subject(findings)
    serial = {
        name: f"serial:{issued.record.serial}"
        for name, issued in {
            "expiring": expiring,
            "urgent": urgent,
            "healthy": healthy,
            "expired_deployed": expired_deployed,
            "expired_quiet": expired_quiet,
            "renewed_old": renewed_old,
            "renewed_new": renewed_new,
            "revoked": revoked,
            "revoked_clean": revoked_clean,
        }.items()
    }
    assert got[serial["expiring"]] == {("expiring", "medium")}
    assert got[serial["urgent"]] == {("expiring", "high")}
    assert got[serial["expired_deployed"]] == {("expired", "critical")}
    assert got[serial["expired_quiet"]] == {("expired", "low")}
    assert got[serial["renewed_old"]] == {("expired", "info")}
    assert got[serial["revoked"]] == {("revoked-but-deployed", "high")}
    assert got[serial["healthy"]] == {("validity-too-long", "medium")}
    assert got[serial["renewed_new"]] == {("validity-too-long", "medium")}
    assert serial["revoked_clean"] not in got
    assert "serial:abcdef0123" not in got
    assert unlinked_ours not in got  # issued by us (AKI), valid, not expiring
    assert got[shadow] == {
        ("weak-key", "high"),
        ("sha1-signature", "high"),
        ("validity-too-long", "medium"),
        ("self-signed", "medium"),
    }
    assert got[foreign] == {("unknown-issuer", "medium")}
    assert got[odd_curve] == {
        ("weak-key", "high"),
        ("expiring", "high"),
        ("unknown-issuer", "medium"),
    }
    assert got[vanished] == {("missing", "low"), ("expired", "info"), ("unknown-issuer", "medium")}
    assert root_sha1 not in got  # a root's own SHA-1 self-signature is nobody's problem

    # Worst first; every finding names what it is about and why.
    ranks = [("critical", "high", "medium", "low", "info").index(f.severity) for f in findings]
    assert ranks == sorted(ranks)
    deployed = next(f for f in findings if f.subject == serial["expired_deployed"])
    assert deployed.owner == "team-c" and deployed.locations == ("127.0.0.1:443",)
    assert "still deployed" in deployed.message
    revoked_finding = next(f for f in findings if f.subject == serial["revoked"])
    assert revoked_finding.locations == ("10.0.0.5:8443",)
    assert {f.severity for f in at_or_above(findings, "high")} == {"critical", "high"}
    assert json.loads(json.dumps([f.to_json() for f in findings]))[0]["severity"] == "critical"


def test_expiry_thresholds_come_from_config(
    storage: Storage, authority: CertificateAuthority
) -> None:
    issued = issue(authority, "t.internal", days=20)
    subject = f"serial:{issued.record.serial}"
    now = datetime.datetime.now(datetime.UTC)
    assert subject not in by_subject(
        compute_findings(storage, config({"CERTWRIGHT_FINDINGS__EXPIRING_WARNING_DAYS": "10"}), now)
    )
    tight = config(
        {
            "CERTWRIGHT_FINDINGS__EXPIRING_WARNING_DAYS": "60",
            "CERTWRIGHT_FINDINGS__EXPIRING_CRITICAL_DAYS": "25",
        }
    )
    assert by_subject(compute_findings(storage, tight, now))[subject] == {("expiring", "high")}


def test_audit_command_gates_on_severity(
    storage: Storage, authority: CertificateAuthority, db_url: str
) -> None:
    env = {"CERTWRIGHT_DATABASE__URL": db_url}
    clean = run_cli("audit", "--fail-on", "high", env=env)
    assert clean.returncode == 0, clean.stderr
    assert "no findings" in clean.stdout

    issue(authority, "soon.internal", days=20, owner="team-a")  # medium
    medium_only = run_cli("audit", "--fail-on", "high", env=env)
    assert medium_only.returncode == 0, medium_only.stderr
    assert "expiring" in medium_only.stdout and "team-a" in medium_only.stdout

    issue(authority, "sooner.internal", days=2, owner="team-a")  # high
    gated = run_cli("audit", "--fail-on", "high", "--json", env=env)
    assert gated.returncode == 3, gated.stderr
    codes = {(f["code"], f["severity"]) for f in json.loads(gated.stdout)}
    assert codes == {("expiring", "medium"), ("expiring", "high")}

    only_high = run_cli("audit", "--min-severity", "high", "--json", env=env)
    assert only_high.returncode == 0
    assert [f["severity"] for f in json.loads(only_high.stdout)] == ["high"]

    bad = run_cli("audit", "--fail-on", "severe", env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr

    broken = run_cli("audit", env={"CERTWRIGHT_DATABASE__URL": "nosuchdriver://x/y"})
    assert broken.returncode == 1
    lines = broken.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certwright: error: "), broken.stderr
