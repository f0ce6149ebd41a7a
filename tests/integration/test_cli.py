"""The `certwright` command as an admin runs it: a real subprocess, real SoftHSM tokens."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import DATA, pkilint, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A demo CA made by `certwright init`, and the environment to use it."""
    data = tmp_path_factory.mktemp("demo") / "data"
    result = run_cli("init", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert "demo CA ready" in result.stdout
    yield {"CERTWRIGHT_CONFIG": str(data / "certwright.toml")}


def _ok(*args: str, env: dict[str, str]) -> str:
    result = run_cli(*args, env=env)
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return result.stdout


def _refused(*args: str, env: dict[str, str], expect: str) -> str:
    result = run_cli(*args, env=env)
    assert result.returncode == 1, f"{args}: rc={result.returncode} {result.stdout} {result.stderr}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("certwright: error: ")
    assert expect in lines[0], lines[0]
    return lines[0]


def test_init_is_idempotent_and_keeps_secrets_private(demo: dict[str, str]) -> None:
    data = Path(demo["CERTWRIGHT_CONFIG"]).parent
    again = run_cli("init", "--data-dir", str(data))
    assert again.returncode == 0 and "already present" in again.stdout
    for pin in ("root.pin", "online.pin"):
        assert stat.S_IMODE((data / "secrets" / pin).stat().st_mode) == 0o600
    config = (data / "certwright.toml").read_text()
    assert "certwright-root" not in config and "root.pin" not in config  # root stays offline
    issuers = json.loads(_ok("issuers", "--json", env=demo))
    assert {(i["id"], i["kind"], i["key_type"]) for i in issuers} == {
        ("root", "root", "ec-p384"),
        ("issuing-ec", "intermediate", "ec-p256"),
        ("issuing-rsa", "intermediate", "rsa-2048"),
    }


def test_issue_with_local_key_writes_files_and_verifies(
    demo: dict[str, str], tmp_path: Path
) -> None:
    data = Path(demo["CERTWRIGHT_CONFIG"]).parent
    out = tmp_path / "svc"
    record = json.loads(
        _ok(
            "issue",
            "--name",
            "svc.internal",
            "--name",
            "10.2.3.4",
            "--out-dir",
            str(out),
            "--owner",
            "team-a",
            "--json",
            env=demo,
        )
    )
    assert set(record["names"]) == {
        "svc.internal",
        "10.2.3.4",
    }
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(data / "root.pem"),
            "-untrusted",
            str(out / "chain.pem"),
            str(out / "cert.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert pkilint("lint_pkix_cert", str(out / "cert.pem")).returncode == 0
    assert (
        pkilint(
            "lint_pkix_signer_signee_cert_chain", str(out / "chain.pem"), str(out / "cert.pem")
        ).returncode
        == 0
    )
    assert (
        pkilint(
            "lint_pkix_signer_signee_cert_chain", str(data / "root.pem"), str(out / "chain.pem")
        ).returncode
        == 0
    )
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert cert.public_key() == key.public_key()

    shown = json.loads(_ok("show", record["serial"], "--json", env=demo))
    assert shown["status"] == "issued" and shown["owner"] == "team-a"
    pem = _ok("show", record["serial"], "--pem", env=demo)
    assert x509.load_pem_x509_certificate(pem.encode()) == cert


def test_issue_from_csr_list_expiring_and_revoke(demo: dict[str, str], tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("csr.internal")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "req.pem").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    out = tmp_path / "fullchain.pem"
    _ok(
        "issue",
        "--csr",
        str(tmp_path / "req.pem"),
        "--profile",
        "tls-client",
        "--days",
        "3",
        "--issuer",
        "issuing-rsa",
        "--out",
        str(out),
        env=demo,
    )
    chain = x509.load_pem_x509_certificates(out.read_bytes())
    assert len(chain) == 2
    serial = format(chain[0].serial_number, "x")

    listed = json.loads(_ok("list", "--name", "csr.internal", "--json", env=demo))
    assert [c["serial"] for c in listed] == [serial]
    assert (
        json.loads(
            _ok("list", "--profile", "tls-client", "--issuer", "issuing-rsa", "--json", env=demo)
        )[0]["serial"]
        == serial
    )
    soon = json.loads(_ok("expiring", "--within", "7d", "--json", env=demo))
    assert serial in [c["serial"] for c in soon]
    later = json.loads(_ok("list", "--expiring-within", "1d", "--json", env=demo))
    assert serial not in [c["serial"] for c in later]

    assert "revoked" in _ok("revoke", serial, "--reason", "keyCompromise", env=demo)
    _refused("revoke", serial, env=demo, expect="already revoked")
    assert json.loads(_ok("show", serial, "--json", env=demo))["revocation_reason"] == 1
    assert serial in [
        c["serial"] for c in json.loads(_ok("list", "--status", "revoked", "--json", env=demo))
    ]
    text = _ok("list", "--status", "revoked", env=demo)
    assert serial in text


@pytest.mark.parametrize(
    ("filename", "expect"),
    [
        ("csr-rsa1024.pem", "RSA key of 1024 bits refused"),
        ("csr-rsa2047.pem", "RSA key of 2047 bits refused"),
        ("csr-p192.pem", "EC curve secp192r1 refused"),
        ("csr-dsa.pem", "DSA"),
        ("csr-sha1.pem", "SHA1"),
        ("csr-bad-signature.der", "signature does not verify"),
        ("csr-outside-policy.pem", "not under any of profile tls-server's allowed domains"),
        ("garbage.bin", "neither a PEM nor a DER"),
        ("empty.csr", "the CSR is empty"),
    ],
)
def test_bad_csr_is_one_line_and_nothing_issued(
    demo: dict[str, str], filename: str, expect: str
) -> None:
    before = json.loads(_ok("list", "--json", env=demo))
    _refused("issue", "--csr", str(DATA / filename), env=demo, expect=expect)
    assert json.loads(_ok("list", "--json", env=demo)) == before


def test_other_bad_inputs_are_one_line(demo: dict[str, str], tmp_path: Path) -> None:
    _refused(
        "issue",
        "--name",
        "x.example.com",
        "--out-dir",
        str(tmp_path / "o"),
        env=demo,
        expect="not under any of profile",
    )
    assert not (tmp_path / "o").exists()  # refused before any file was written
    _refused(
        "issue",
        "--name",
        "x.internal",
        "--days",
        "9999",
        "--out-dir",
        str(tmp_path / "o"),
        env=demo,
        expect="exceeds profile tls-server's maximum",
    )
    _refused(
        "issue",
        "--name",
        "bad..name.internal",
        "--out-dir",
        str(tmp_path / "o"),
        env=demo,
        expect="not a valid DNS name",
    )
    _refused("revoke", "deadbeef", env=demo, expect="no issued certificate")
    _refused("revoke", "xyz", env=demo, expect="not a hexadecimal serial")
    _refused(
        "revoke",
        "deadbeef",
        "--reason",
        "certificateHold",
        env=demo,
        expect="unknown revocation reason",
    )
    _refused("show", "abcdef", env=demo, expect="no certificate with serial")
    _refused("list", "--expiring-within", "soon", env=demo, expect="not a duration")
    _refused("issue", "--csr", str(tmp_path / "missing.pem"), env=demo, expect="cannot read")
    _refused(
        "list", env={"CERTWRIGHT_CONFIG": str(tmp_path / "nope.toml")}, expect="does not exist"
    )
    usage = run_cli("issue", env=demo)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_eab_create_prints_a_key_id_and_hmac_key(demo: dict[str, str]) -> None:
    """`certwright eab create` (RFC 8555 §7.3.4): what an ACME client's --eab-kid and
    --eab-hmac-key take; --allow entries are kept canonical, and a malformed one is refused
    before anything is stored."""
    plain = _ok("eab", "create", "--owner", "web", env=demo).splitlines()
    assert [line.split(":")[0] for line in plain] == ["key id", "hmac key"], plain
    key = json.loads(
        _ok(
            "eab",
            "create",
            "--allow",
            "Web.Internal.",
            "--allow",
            "10.1.0.0/16",
            "--json",
            env=demo,
        )
    )
    assert key["key_id"].startswith("kid-") and key["key_id"] != plain[0].split()[-1]
    assert len(base64.urlsafe_b64decode(key["hmac_key"] + "=")) == 32  # 256-bit HMAC key
    assert key["allowed_names"] == ["web.internal", "10.1.0.0/16"]
    created = json.loads(_ok("audit-log", "--json", "--limit", "1", env=demo))[0]
    assert (created["action"], created["subject"]) == ("acme.eab.create", f"eab:{key['key_id']}")

    for bad, says in (("10.1.0.1/16", "host bits set"), ("*.web.internal", "drop the '*.'")):
        _refused("eab", "create", "--allow", "web.internal", "--allow", bad, env=demo, expect=says)
    newest = json.loads(_ok("audit-log", "--json", "--limit", "1", env=demo))[0]
    assert newest["seq"] == created["seq"]  # nothing stored for the refused ones


def test_wrong_pin_and_missing_token(demo: dict[str, str], tmp_path: Path) -> None:
    before = json.loads(_ok("list", "--json", env=demo))
    _refused(
        "issue",
        "--name",
        "p.internal",
        "--out-dir",
        str(tmp_path / "p"),
        env={**demo, "CERTWRIGHT_HSM_PIN": "wrong-pin"},
        expect="HSM PIN is incorrect",
    )
    _refused(
        "issue",
        "--name",
        "p.internal",
        "--out-dir",
        str(tmp_path / "p"),
        env={**demo, "CERTWRIGHT_HSM__TOKEN_LABEL": "no-such-token"},
        expect="not found",
    )
    _refused(
        "issue",
        "--name",
        "p.internal",
        "--out-dir",
        str(tmp_path / "p"),
        env={**demo, "CERTWRIGHT_HSM__MODULE": "/nonexistent.so"},
        expect="does not exist",
    )
    after = json.loads(_ok("list", "--json", env=demo))
    # Failed HSM attempts leave `failed` rows (serials never reused), never an issued one.
    assert [c for c in after if c["status"] == "issued"] == [
        c for c in before if c["status"] == "issued"
    ]
    assert all(c["status"] == "failed" for c in after if c not in before)


def test_ceremony_commands(demo: dict[str, str], tmp_path: Path) -> None:
    data = Path(demo["CERTWRIGHT_CONFIG"]).parent
    root_pin = (data / "secrets" / "root.pin").read_text().strip()
    root_env = {**demo, "CERTWRIGHT_ROOT_PIN": root_pin}
    common = (
        "--root-token",
        "certwright-root",
        "--root-key-label",
        "root-key",
        "--root-cert",
        str(data / "root.pem"),
    )

    # A second intermediate (RSA-3072) alongside the first ones, signed by the existing root.
    _ok(
        "ceremony",
        "intermediate",
        *common,
        "--id",
        "issuing-rsa3k",
        "--key-type",
        "rsa-3072",
        "--subject",
        "CN=second intermediate,O=certwright demo",
        "--out",
        str(tmp_path / "i.pem"),
        env=root_env,
    )
    intermediate = tmp_path / "i.pem"
    cert = x509.load_pem_x509_certificate(intermediate.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name
    assert cdp is not None and cdp[0].value.endswith("/crl/root.crl")
    assert (
        pkilint(
            "lint_pkix_signer_signee_cert_chain", str(data / "root.pem"), str(intermediate)
        ).returncode
        == 0
    )
    out = tmp_path / "x"
    _ok(
        "issue",
        "--name",
        "x.internal",
        "--issuer",
        "issuing-rsa3k",
        "--out-dir",
        str(out),
        env=demo,
    )
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(data / "root.pem"),
            "-untrusted",
            str(out / "chain.pem"),
            str(out / "cert.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr

    # Retire it, revoke it, and the next ARL lists it.
    _ok("ceremony", "retire", "issuing-rsa3k", env=demo)
    _refused(
        "issue",
        "--name",
        "y.internal",
        "--issuer",
        "issuing-rsa3k",
        "--out-dir",
        str(out / "y"),
        env=demo,
        expect="retired",
    )
    _ok("ceremony", "revoke-intermediate", "issuing-rsa3k", "--reason", "superseded", env=demo)
    arl = tmp_path / "arl.crl"
    printed = _ok("ceremony", "crl", *common, "--out", str(arl), env=root_env)
    assert "root CRL number 2" in printed  # init signed number 1
    crl = x509.load_der_x509_crl(arl.read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
    assert (
        entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        == x509.ReasonFlags.superseded
    )
    lint = pkilint("lint_crl", "-t", "ARL", "-p", "PKIX", str(arl))
    assert lint.returncode == 0, lint.stdout

    # The root's token is never reachable without its own PIN.
    _refused("ceremony", "crl", *common, env=demo, expect="no root PIN")
    _refused(
        "ceremony",
        "crl",
        *common,
        env={**demo, "CERTWRIGHT_ROOT_PIN": "bad"},
        expect="HSM PIN is incorrect",
    )


def test_ceremony_cross_sign_with_a_second_root(demo: dict[str, str], tmp_path: Path) -> None:
    """A new root on its own token cross-signs an intermediate of the first: same subject and
    key, so leaves verify up to either root; revoking the intermediate revokes both paths."""
    from ca.demo import init_softhsm_token

    data = Path(demo["CERTWRIGHT_CONFIG"]).parent
    root_env = {**demo, "CERTWRIGHT_ROOT_PIN": (data / "secrets" / "root.pin").read_text().strip()}
    init_softhsm_token(data / "softhsm2.conf", "certwright-root-2", "root-2-pin")
    root2_env = {**demo, "CERTWRIGHT_ROOT_PIN": "root-2-pin"}
    root1 = ("--root-token", "certwright-root", "--root-cert", str(data / "root.pem"))
    root2_pem = tmp_path / "root2.pem"
    root2 = ("--root-token", "certwright-root-2", "--root-cert", str(root2_pem))
    _ok(
        "ceremony",
        "root",
        "--root-token",
        "certwright-root-2",
        "--id",
        "root-2",
        "--subject",
        "CN=certwright demo root CA 2,O=certwright demo",
        "--out",
        str(root2_pem),
        env=root2_env,
    )
    own_pem = tmp_path / "own.pem"
    _ok(
        "ceremony",
        "intermediate",
        *root1,
        "--id",
        "issuing-crossed",
        "--subject",
        "CN=crossed intermediate,O=certwright demo",
        "--out",
        str(own_pem),
        env=root_env,
    )
    _refused(
        "ceremony",
        "cross-sign",
        "issuing-crossed",
        *root1,
        env=root_env,
        expect="already the parent",
    )
    _refused("ceremony", "cross-sign", "root", *root2, env=root2_env, expect="not an active")

    cross_pem = tmp_path / "cross.pem"
    printed = _ok(
        "ceremony",
        "cross-sign",
        "issuing-crossed",
        *root2,
        "--days",
        "400",
        "--out",
        str(cross_pem),
        env=root2_env,
    )
    assert "cross-signed by CN=certwright demo root CA 2" in printed
    own = x509.load_pem_x509_certificate(own_pem.read_bytes())
    cross = x509.load_pem_x509_certificate(cross_pem.read_bytes())
    assert cross.subject == own.subject and cross.public_key() == own.public_key()
    assert cross.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ) == own.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cross.issuer == x509.load_pem_x509_certificate(root2_pem.read_bytes()).subject
    assert cross.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cdp = cross.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name
    assert cdp is not None and cdp[0].value.endswith("/crl/root-2.crl")
    lint = pkilint("lint_pkix_signer_signee_cert_chain", str(root2_pem), str(cross_pem))
    assert lint.returncode == 0, lint.stdout
    lint = pkilint("lint_pkix_cert", str(cross_pem))
    assert lint.returncode == 0, lint.stdout

    out = tmp_path / "leaf"
    _ok(
        "issue",
        "--name",
        "crossed.internal",
        "--issuer",
        "issuing-crossed",
        "--out-dir",
        str(out),
        env=demo,
    )
    for anchor, untrusted in ((root2_pem, cross_pem), (data / "root.pem", own_pem)):
        verify = subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                str(anchor),
                "-untrusted",
                str(untrusted),
                str(out / "cert.pem"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr

    # Revoked, the intermediate is listed by each root's ARL: its own serial and the cross's.
    _ok("ceremony", "revoke-intermediate", "issuing-crossed", "--reason", "keyCompromise", env=demo)
    _refused(
        "ceremony", "cross-sign", "issuing-crossed", *root2, env=root2_env, expect="not an active"
    )
    arl = tmp_path / "root2.crl"
    _ok("ceremony", "crl", *root2, "--out", str(arl), env=root2_env)
    crl = x509.load_der_x509_crl(arl.read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(cross.serial_number)
    assert entry is not None
    assert (
        entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        == x509.ReasonFlags.key_compromise
    )
    assert crl.get_revoked_certificate_by_serial_number(own.serial_number) is None
    lint = pkilint("lint_crl", "-t", "ARL", "-p", "PKIX", str(arl))
    assert lint.returncode == 0, lint.stdout
    arl1 = tmp_path / "root1.crl"
    _ok("ceremony", "crl", *root1, "--out", str(arl1), env=root_env)
    crl1 = x509.load_der_x509_crl(arl1.read_bytes())
    assert crl1.get_revoked_certificate_by_serial_number(own.serial_number) is not None
    assert crl1.get_revoked_certificate_by_serial_number(cross.serial_number) is None


def test_ceremony_new_root_on_its_own_token(tmp_path: Path) -> None:
    """A root made from scratch by the ceremony command on a fresh token."""
    from ca.demo import init_softhsm_token, write_softhsm_conf

    conf = write_softhsm_conf(tmp_path)
    init_softhsm_token(conf, "ceremony-root", "4321")
    env = {
        "SOFTHSM2_CONF": str(conf),
        "CERTWRIGHT_ROOT_PIN": "4321",
        "CERTWRIGHT_DATABASE__URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
    }
    root = tmp_path / "root.pem"
    _ok(
        "ceremony",
        "root",
        "--root-token",
        "ceremony-root",
        "--subject",
        "CN=Ceremony Root,O=Test",
        "--key-type",
        "rsa-4096",
        "--days",
        "7300",
        "--path-length",
        "2",
        "--out",
        str(root),
        env=env,
    )
    cert = x509.load_pem_x509_certificate(root.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 2
    assert cert.public_key().key_size == 4096  # type: ignore[union-attr]
    assert pkilint("lint_pkix_cert", str(root)).returncode == 0
    _refused(
        "ceremony",
        "root",
        "--root-token",
        "ceremony-root",
        "--subject",
        "CN=x",
        "--out",
        str(root),
        env=env,
        expect="refusing to overwrite",
    )
    _refused(
        "ceremony",
        "root",
        "--root-token",
        "ceremony-root",
        "--subject",
        "CN=x",
        "--out",
        str(tmp_path / "r2.pem"),
        env=env,
        expect="already exists on the token",
    )


def test_cli_against_postgres(postgres_url: str, tmp_path: Path) -> None:
    """The other tests here use the demo's SQLite; this one runs the same flow on PostgreSQL."""
    env = {"CERTWRIGHT_DATABASE__URL": postgres_url}
    data = tmp_path / "data"
    result = run_cli("init", "--data-dir", str(data), env=env)
    assert result.returncode == 0, result.stderr
    env["CERTWRIGHT_CONFIG"] = str(data / "certwright.toml")
    record = json.loads(
        _ok("issue", "--name", "pg.internal", "--out-dir", str(tmp_path / "o"), "--json", env=env)
    )
    assert json.loads(_ok("show", record["serial"], "--json", env=env))["status"] == "issued"
    _ok("revoke", record["serial"], env=env)
    assert not (data / "certwright.db").exists()  # everything went to PostgreSQL


def test_incident_revokes_by_key_and_the_key_is_never_certified_again(
    demo: dict[str, str], tmp_path: Path
) -> None:
    import hashlib

    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    serials = []
    for name in ("inc-a.internal", "inc-b.internal"):
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        path = tmp_path / f"{name}.csr"
        path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
        serials.append(json.loads(_ok("issue", "--csr", str(path), "--json", env=demo))["serial"])
    digest = hashlib.sha256(spki).hexdigest()

    dry = json.loads(_ok("incident", "--key-sha256", digest, "--dry-run", "--json", env=demo))
    assert sorted(dry["revoked"]) == sorted(serials) and dry["dry_run"]
    assert all(
        json.loads(_ok("show", s, "--json", env=demo))["status"] == "issued" for s in serials
    )

    done = json.loads(_ok("incident", "--key-sha256", digest, "--json", env=demo))
    assert sorted(done["revoked"]) == sorted(serials)
    for serial in serials:
        shown = json.loads(_ok("show", serial, "--json", env=demo))
        assert shown["status"] == "revoked" and shown["revocation_reason"] == 1
    _refused(
        "issue",
        "--csr",
        str(tmp_path / "inc-a.internal.csr"),
        env=demo,
        expect="revoked for keyCompromise",
    )
    _refused("incident", env=demo, expect="name what to revoke")
