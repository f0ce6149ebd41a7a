"""Sharded leaf CRLs on real SoftHSM keys, SQLite and PostgreSQL (RFC 5280 §5, BR 4.9.7)."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Flask

from ca import certs, crl, lint
from ca.clock import FakeClock
from ca.config import load_config
from ca.errors import CAError, Kind
from ca.issuance import CertificateAuthority, IssuanceRequest, IssuedCertificate
from ca.policy import Identifier
from ca.runtime import Runtime
from ca.storage import Storage
from ca.storage import revocation as store
from ca.web import core_blueprint
from tests.conftest import BASE_URL, SessionPKI, pkilint

pytestmark = pytest.mark.integration
SHARDS = 4


def _issue(authority: CertificateAuthority, name: str, days: float = 30) -> IssuedCertificate:
    from cryptography.hazmat.primitives.asymmetric import ec

    return authority.issue(
        IssuanceRequest(
            ec.generate_private_key(ec.SECP256R1()).public_key(),
            (Identifier("dns", name),),
            "tls-server",
            validity=datetime.timedelta(days=days),
        )
    )


def _refresh(storage: Storage, pki: SessionPKI, clock: Any = None, **kwargs: Any) -> list[Any]:
    return crl.refresh_crls(
        storage,
        pki.online,
        public_base_url=BASE_URL,
        crl_shards=SHARDS,
        clock=clock,
        issuer="issuing-ec",
        **kwargs,
    )


@pytest.fixture
def authority4(storage: Storage, pki: SessionPKI) -> CertificateAuthority:
    """Issuance into 4 CRL shards, so a handful of certificates spread over them."""
    from ca.profiles import load_profiles

    return CertificateAuthority(
        storage,
        pki.online,
        load_profiles({}),
        public_base_url=BASE_URL,
        crl_shards=SHARDS,
        default_issuer="issuing-ec",
    )


def _shard_crl(storage: Storage, issuer_id: str, shard: int) -> x509.CertificateRevocationList:
    latest = store.latest_crls(storage, issuer_id)[shard]
    return x509.load_der_x509_crl(store.crl_der(storage, latest.id))


def test_every_shard_is_signed_linted_and_names_its_own_url(
    storage: Storage, pki: SessionPKI, authority4: CertificateAuthority
) -> None:
    issued = [_issue(authority4, f"h{i}.test") for i in range(6)]
    authority4.revoke(issued[0].record.serial, "keyCompromise")
    authority4.revoke(issued[1].record.serial, "unspecified")
    signed = _refresh(storage, pki)
    assert sorted(c.shard for c in signed) == list(range(SHARDS))
    issuer = x509.load_der_x509_certificate(
        next(i for i in pki.issuers if i.id == "issuing-ec").cert_der
    )
    for c in signed:
        parsed = x509.load_der_x509_crl(c.der)
        assert parsed.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
        idp = parsed.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        assert idp.critical and idp.value.only_contains_user_certs
        url = certs.crl_url(BASE_URL, "issuing-ec", c.shard)
        assert idp.value.full_name == [x509.UniformResourceIdentifier(url)]
        aki = parsed.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki == certs.authority_key_identifier(issuer)
        assert parsed.next_update_utc - parsed.last_update_utc <= datetime.timedelta(days=10)
        assert lint.errors(lint.lint_crl(c.der, br=True)) == []
    # Each certificate's CRL DP names the shard that lists it.
    for cert, reason in ((issued[0], x509.ReasonFlags.key_compromise), (issued[1], None)):
        dp = cert.certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints)
        url = dp.value[0].full_name[0].value  # type: ignore[index]
        shard = int(url.rsplit("/", 1)[1].removesuffix(".crl"))
        entry = _shard_crl(storage, "issuing-ec", shard).get_revoked_certificate_by_serial_number(
            cert.certificate.serial_number
        )
        assert entry is not None
        reasons = [e.value for e in entry.extensions if isinstance(e.value, x509.CRLReason)]
        # RFC 5280 §5.3.1: no reasonCode at all for unspecified.
        assert [r.reason for r in reasons] == ([reason] if reason else [])


def test_pkilint_command_line_br_profile_is_clean(
    storage: Storage, pki: SessionPKI, authority4: CertificateAuthority, tmp_path: Path
) -> None:
    cert = _issue(authority4, "lint.test")
    authority4.revoke(cert.record.serial, "superseded")
    for c in _refresh(storage, pki):
        path = tmp_path / f"{c.shard}.crl"
        path.write_bytes(c.der)
        result = pkilint("lint_crl", "-t", "CRL", "-p", "BR", str(path))
        assert result.returncode == 0 and result.stdout.strip() == "", result.stdout


def test_refresh_is_idempotent_and_reacts_to_a_revocation(
    storage: Storage, pki: SessionPKI, authority4: CertificateAuthority
) -> None:
    issued = [_issue(authority4, f"r{i}.test") for i in range(3)]
    assert len(_refresh(storage, pki)) == SHARDS
    assert _refresh(storage, pki) == []  # nothing changed: nothing signed
    authority4.revoke(issued[2].record.serial, "cessationOfOperation")
    again = _refresh(storage, pki)
    assert [(c.shard, c.number, c.entries) for c in again] == [(issued[2].record.crl_shard, 2, 1)]
    assert _refresh(storage, pki) == []


def test_half_life_refresh_and_expired_entries_dropped(
    storage: Storage, pki: SessionPKI, authority4: CertificateAuthority
) -> None:
    cert = _issue(authority4, "short.test", days=2)
    authority4.revoke(cert.record.serial, "keyCompromise")
    now = datetime.datetime.now(datetime.UTC)
    clock = FakeClock(now)
    first = {c.shard: c for c in _refresh(storage, pki, clock)}
    assert first[cert.record.crl_shard].entries == 1
    clock.advance(datetime.timedelta(days=1))
    assert _refresh(storage, pki, clock) == []  # not yet at half-life, nothing changed
    clock.advance(datetime.timedelta(days=2))  # the certificate has expired
    dropped = {c.shard: c for c in _refresh(storage, pki, clock)}
    assert dropped[cert.record.crl_shard].entries == 0
    clock.advance(datetime.timedelta(days=4))  # past half-life of 7 days
    assert len(_refresh(storage, pki, clock)) == SHARDS


def test_clock_stepped_back_an_hour_still_increases_number_and_this_update(
    storage: Storage, pki: SessionPKI
) -> None:
    clock = FakeClock(datetime.datetime.now(datetime.UTC).replace(microsecond=0))
    before = {c.shard: c for c in _refresh(storage, pki, clock, force=True)}
    clock.advance(datetime.timedelta(hours=-1))
    after = {c.shard: c for c in _refresh(storage, pki, clock, force=True)}
    for shard, c in after.items():
        assert c.number == before[shard].number + 1
        assert c.this_update > before[shard].this_update
        parsed = x509.load_der_x509_crl(c.der)
        number = parsed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        assert number == c.number
        assert parsed.last_update_utc == c.this_update


def test_two_processes_publishing_the_same_number_one_retries(
    storage: Storage, pki: SessionPKI
) -> None:
    """A signer that read the shard before another published signs the next number."""
    first = _refresh(storage, pki, shards=[0], force=True)
    assert [c.number for c in first] == [1]
    record = next(i for i in pki.issuers if i.id == "issuing-ec")
    loaded = crl._load_issuer(record, pki.online)
    late = crl.sign_shard(
        storage,
        loaded,
        0,
        public_base_url=BASE_URL,
        settings=crl.CrlSettings(),
        clock=FakeClock(datetime.datetime.now(datetime.UTC)),
        actor="test",
        previous=None,  # stale: it would publish number 1 again
    )
    assert late is not None and late.number == 2
    with pytest.raises(CAError) as refused:
        store.insert_crl(storage, "issuing-ec", 0, 2, late.this_update, late.next_update, b"", "t")
    assert refused.value.kind is Kind.CONFLICT


def test_settings_refuse_a_crl_valid_longer_than_ten_days() -> None:
    with pytest.raises(CAError, match="10 days"):
        crl.CrlSettings(validity=datetime.timedelta(days=11))


def test_openssl_verify_crl_check(
    storage: Storage, pki: SessionPKI, authority4: CertificateAuthority, tmp_path: Path
) -> None:
    good = _issue(authority4, "good.test")
    bad = _issue(authority4, "bad.test")
    authority4.revoke(bad.record.serial, "keyCompromise")
    _refresh(storage, pki)
    crl_pem = tmp_path / "crls.pem"
    crl_pem.write_bytes(
        b"".join(
            _shard_crl(storage, "issuing-ec", s).public_bytes(serialization.Encoding.PEM)
            for s in range(SHARDS)
        )
    )
    results = {}
    for name, issued in (("good", good), ("bad", bad)):
        leaf = tmp_path / f"{name}.pem"
        leaf.write_text(issued.pem())
        chain = tmp_path / "chain.pem"
        chain.write_text(issued.chain_pem())
        results[name] = subprocess.run(
            [
                "openssl",
                "verify",
                "-crl_check",
                "-CAfile",
                str(pki.root_pem),
                "-untrusted",
                str(chain),
                "-CRLfile",
                str(crl_pem),
                str(leaf),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    assert results["good"].returncode == 0, results["good"].stdout + results["good"].stderr
    assert results["bad"].returncode != 0
    assert "certificate revoked" in results["bad"].stdout + results["bad"].stderr


# -- HTTP ---------------------------------------------------------------------------------------


def _runtime(storage: Storage, pki: SessionPKI) -> Runtime:
    runtime = Runtime(load_config(None, environ={}))
    runtime.__dict__["storage"] = storage  # the test's database and token, not the config's
    runtime.__dict__["token"] = pki.online
    return runtime


def test_http_serves_shards_with_caching_headers_and_404s(
    storage: Storage, pki: SessionPKI
) -> None:
    _refresh(storage, pki)
    app = Flask("test")
    app.register_blueprint(core_blueprint(_runtime(storage, pki)))
    client = app.test_client()
    response = client.get("/crl/issuing-ec/1.crl")
    assert response.status_code == 200
    assert response.content_type == "application/pkix-crl"
    assert x509.load_der_x509_crl(response.data) is not None
    assert response.headers["ETag"] and response.headers["Last-Modified"]
    assert response.headers["Expires"]
    max_age = response.cache_control.max_age
    assert max_age is not None and 0 < max_age <= 3600
    assert "public" in response.headers["Cache-Control"]
    cached = client.get(
        "/crl/issuing-ec/1.crl", headers={"If-None-Match": response.headers["ETag"]}
    )
    assert cached.status_code == 304
    for missing in (
        "/crl/issuing-ec/99.crl",
        "/crl/issuing-ec/-1.crl",
        "/crl/issuing-ec/x.crl",
        "/crl/nobody/0.crl",
        "/crl/nobody.crl",
        "/crl/issuing-ec/0.crl.crl",
    ):
        assert client.get(missing).status_code == 404, missing


@pytest.mark.parametrize("reason", ["certificateHold", "removeFromCRL", "6", "8", "7", "11"])
def test_revoking_with_a_reason_crls_never_carry_is_refused(
    storage: Storage, pki: SessionPKI, authority4: CertificateAuthority, reason: str
) -> None:
    """RFC 5280 §5.3.1 / BR 7.2.2: no certificateHold (6), removeFromCRL (8); 7 is unused."""
    cert = _issue(authority4, "hold.test")
    _refresh(storage, pki)
    with pytest.raises(CAError) as refused:
        authority4.revoke(cert.record.serial, reason)
    assert refused.value.kind is Kind.BAD_REVOCATION_REASON
    assert storage.get_certificate(cert.record.serial).status == "issued"
    assert _refresh(storage, pki) == []  # nothing to publish


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_sign_and_publish_crls_and_ocsp_for_static_serving(tmp_path: Path) -> None:
    import json

    from ca.cli_revocation import published_file
    from ca.ocsp_signing import canonical_request, cert_id_keys
    from tests.conftest import run_cli

    data = tmp_path / "data"
    # The session's SOFTHSM2_CONF would hide the demo's own tokens from the subprocesses.
    env = {"SOFTHSM2_CONF": str(data / "softhsm2.conf")}
    assert run_cli("init", "--data-dir", str(data), env=env).returncode == 0
    env["CERTWRIGHT_CONFIG"] = str(data / "certwright.toml")

    def ok(*args: str) -> str:
        result = run_cli(*args, env=env)
        assert result.returncode == 0, f"{args}: {result.stderr}"
        return result.stdout

    out = tmp_path / "cert"
    record = json.loads(ok("issue", "--name", "cli.internal", "--out-dir", str(out), "--json"))
    ok("revoke", record["serial"], "--reason", "keyCompromise")
    signed = ok("crl", "sign")
    assert "CRL(s) signed" in signed and "shard" in signed
    assert ok("crl", "sign").strip().endswith("0 CRL(s) signed")  # idempotent
    published = tmp_path / "www"
    ok("crl", "publish", "--out", str(published))
    shard_file = published / "crl" / record["issuer"] / f"{record['crl_shard']}.crl"
    assert (published / "crl" / "root.crl").is_file()  # the root's ARL from the ceremony
    crl_der = shard_file.read_bytes()
    parsed = x509.load_der_x509_crl(crl_der)
    assert parsed.get_revoked_certificate_by_serial_number(int(record["serial"], 16)) is not None
    result = pkilint("lint_crl", "-t", "ARL", "-p", "PKIX", str(published / "crl" / "root.crl"))
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout
    # openssl rejects the revoked certificate with the published shard.
    crl_pem = tmp_path / "shard.pem"
    crl_pem.write_bytes(parsed.public_bytes(serialization.Encoding.PEM))
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-crl_check",
            "-CAfile",
            str(data / "root.pem"),
            "-untrusted",
            str(out / "chain.pem"),
            "-CRLfile",
            str(crl_pem),
            str(out / "cert.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode != 0 and "certificate revoked" in verify.stdout + verify.stderr

    assert "OCSP response(s) signed" in ok("ocsp", "sign")
    ok("ocsp", "publish", "--out", str(published))
    chain = x509.load_pem_x509_certificates((out / "chain.pem").read_bytes())
    ids = cert_id_keys(record["issuer"], chain[0])
    path = published / "ocsp" / published_file(canonical_request(ids, int(record["serial"], 16)))
    response = x509.ocsp.load_der_ocsp_response(path.read_bytes())
    assert response.certificate_status == x509.ocsp.OCSPCertStatus.REVOKED
    by_serial = published / "ocsp-by-serial" / record["issuer"] / f"{record['serial']}.der"
    assert by_serial.read_bytes() == path.read_bytes()
    assert response.serial_number == int(record["serial"], 16)
