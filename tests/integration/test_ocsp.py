"""The OCSP responder over real HTTP, on SoftHSM keys, SQLite and PostgreSQL (RFC 6960, 5019).

The WSGI app is the real one (`ca.web.create_app`, with the `ocsp` blueprint from its entry
point) served by werkzeug on a random loopback port in a thread; `openssl ocsp` is the client.
"""

from __future__ import annotations

import base64
import datetime
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID
from werkzeug.serving import make_server

from ca import lint, ocsp_signing
from ca.clock import FakeClock
from ca.config import load_config
from ca.errors import CAError, Kind
from ca.hsm import Token
from ca.issuance import CertificateAuthority, IssuanceRequest, IssuedCertificate
from ca.policy import Identifier
from ca.runtime import Runtime
from ca.storage import Storage
from ca.storage import revocation as store
from ca.web import create_app
from ocsp.responder import Responder
from tests.conftest import DATA, SessionPKI, pkilint

pytestmark = pytest.mark.integration
OCSP_DATA = DATA / "ocsp"


@pytest.fixture
def signer(storage: Storage, pki: SessionPKI) -> ocsp_signing.OcspSigner:
    return ocsp_signing.OcspSigner(storage, pki.online)


@pytest.fixture
def server(storage: Storage, pki: SessionPKI) -> Iterator[str]:
    """The HTTP listener's app on 127.0.0.1:<random>; stopped whatever the test does."""
    runtime = Runtime(load_config(None, environ={}))
    runtime.__dict__["storage"] = storage  # the test's database and token
    runtime.__dict__["token"] = pki.online
    httpd = make_server("127.0.0.1", 0, create_app(runtime, "http"))  # backlog 128
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        thread.join(10)
        httpd.server_close()


def _issue(
    authority: CertificateAuthority, name: str, issuer: str = "issuing-ec"
) -> IssuedCertificate:
    return authority.issue(
        IssuanceRequest(
            ec.generate_private_key(ec.SECP256R1()).public_key(),
            (Identifier("dns", name),),
            "tls-server",
            issuer=issuer,
        )
    )


@pytest.fixture
def files(tmp_path: Path, pki: SessionPKI) -> Any:
    """Write a certificate and its issuer as PEM files for openssl."""

    def write(issued: IssuedCertificate) -> tuple[Path, Path]:
        leaf = tmp_path / f"{issued.record.serial}.pem"
        leaf.write_text(issued.pem())
        issuer = tmp_path / f"{issued.record.issuer_id}.pem"
        issuer.write_text(issued.chain_pem())
        return leaf, issuer

    return write


def _openssl_ocsp(
    leaf: Path, issuer: Path, root: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl",
            "ocsp",
            "-issuer",
            str(issuer),
            "-cert",
            str(leaf),
            "-CAfile",
            str(root),
            "-verify_other",
            str(issuer),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, data=data, headers=headers or {})  # noqa: S310 - http only
    if data is not None:
        req.add_header("Content-Type", "application/ocsp-request")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:  # noqa: S310 - http only
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _status(body: bytes) -> ocsp.OCSPResponseStatus:
    return ocsp.load_der_ocsp_response(body).response_status


# -- openssl, end to end --------------------------------------------------------------------------


@pytest.mark.parametrize("nonce", [True, False], ids=["nonce", "no-nonce"])
def test_openssl_post_good_then_revoked_with_reason(
    storage: Storage,
    pki: SessionPKI,
    authority: CertificateAuthority,
    signer: ocsp_signing.OcspSigner,
    server: str,
    files: Any,
    nonce: bool,
) -> None:
    issued = _issue(authority, "post.test")
    ocsp_signing.refresh_ocsp(signer)
    authority.revocation_listeners.append(ocsp_signing.revocation_listener(signer))
    leaf, issuer = files(issued)
    flags = ("-url", f"{server}/ocsp", *(() if nonce else ("-no_nonce",)))
    first = _openssl_ocsp(leaf, issuer, pki.root_pem, *flags)
    assert "Response verify OK" in first.stderr + first.stdout, first.stderr
    assert f"{leaf}: good" in first.stdout, first.stdout + first.stderr
    authority.revoke(issued.record.serial, "keyCompromise")
    second = _openssl_ocsp(leaf, issuer, pki.root_pem, *flags)
    assert f"{leaf}: revoked" in second.stdout, second.stdout + second.stderr
    assert "Reason: keyCompromise" in second.stdout
    assert "Response verify OK" in second.stderr + second.stdout


def test_openssl_get_request_matches_the_canonical_one_and_is_answered(
    storage: Storage,
    pki: SessionPKI,
    authority: CertificateAuthority,
    signer: ocsp_signing.OcspSigner,
    server: str,
    files: Any,
    tmp_path: Path,
) -> None:
    issued = _issue(authority, "get.test", issuer="issuing-rsa")
    ocsp_signing.refresh_ocsp(signer)
    leaf, issuer = files(issued)
    request = tmp_path / "req.der"
    made = _openssl_ocsp(leaf, issuer, pki.root_pem, "-no_nonce", "-reqout", str(request))
    assert made.returncode == 0, made.stderr
    der = request.read_bytes()
    ids = signer.issuer("issuing-rsa").ids
    # What `ocsp publish` names its files after is exactly what openssl sends.
    assert der == ocsp_signing.canonical_request(ids, issued.certificate.serial_number)
    encoded = base64.b64encode(der).decode()
    for path in (
        encoded,
        urllib.parse.quote(encoded, safe=""),  # percent-encoded, `/` too
        "/" + encoded,  # an OCSP URL ending in `/` makes `//`
    ):
        status, headers, body = _http(f"{server}/ocsp/{path}")
        assert status == 200 and headers["Content-Type"] == "application/ocsp-response"
        response = tmp_path / "resp.der"
        response.write_bytes(body)
        checked = _openssl_ocsp(leaf, issuer, pki.root_pem, "-respin", str(response))
        assert f"{leaf}: good" in checked.stdout, checked.stdout + checked.stderr
        assert "Response verify OK" in checked.stderr + checked.stdout
        # RFC 5019 §6.2 caching headers.
        parsed = ocsp.load_der_ocsp_response(body)
        assert parsed.next_update_utc is not None
        max_age = int(headers["Cache-Control"].split("max-age=")[1].split(",")[0])
        left = parsed.next_update_utc - datetime.datetime.now(datetime.UTC)
        assert 0 < max_age <= left.total_seconds() + 1
        assert "public" in headers["Cache-Control"]
        assert headers["ETag"] and headers["Last-Modified"] and headers["Expires"]
    status, _, _ = _http(f"{server}/ocsp/{encoded}", headers={"If-None-Match": headers["ETag"]})
    assert status == 304


# -- statuses and bad input -----------------------------------------------------------------------


def _request(issued: IssuedCertificate, algorithm: Any = None, nonce: bytes | None = None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(
        issued.certificate,
        issued.chain[0],
        algorithm or hashes.SHA1(),  # noqa: S303 - RFC 5019 CertID
    )
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("not-der.bin", ocsp.OCSPResponseStatus.MALFORMED_REQUEST),
        ("truncated.der", ocsp.OCSPResponseStatus.MALFORMED_REQUEST),
        ("two-certs.der", ocsp.OCSPResponseStatus.MALFORMED_REQUEST),
        ("thousand-certs.der", ocsp.OCSPResponseStatus.MALFORMED_REQUEST),
        ("nonce-100-octets.der", ocsp.OCSPResponseStatus.MALFORMED_REQUEST),
        ("nonce-0-octets.der", ocsp.OCSPResponseStatus.MALFORMED_REQUEST),
        ("unknown-issuer.der", ocsp.OCSPResponseStatus.UNAUTHORIZED),
    ],
)
def test_bad_requests_get_the_rfc_answer_over_get_and_post(
    server: str, name: str, expected: ocsp.OCSPResponseStatus
) -> None:
    der = (OCSP_DATA / name).read_bytes()
    status, headers, body = _http(f"{server}/ocsp", data=der)
    assert status == 200 and _status(body) == expected
    assert headers["Content-Type"] == "application/ocsp-response"
    assert "max-age" not in headers["Cache-Control"]
    path = urllib.parse.quote(base64.b64encode(der).decode(), safe="")
    status, _, body = _http(f"{server}/ocsp/{path}")
    if len(path) > 8192:
        # A 92 kB URL is refused by the HTTP server itself (gunicorn: 400, werkzeug: 414).
        assert status in (400, 414)
        return
    assert status == 200 and _status(body) == expected


@pytest.mark.parametrize("path", ["%%%", "abc!def", "====", "M", "", "A" * 9000, "%zz"])
def test_get_with_broken_base64_is_malformed(server: str, path: str) -> None:
    status, _, body = _http(f"{server}/ocsp/{path}")
    assert status == 200 and _status(body) == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_statuses_nonce_and_sha256(
    storage: Storage,
    authority: CertificateAuthority,
    signer: ocsp_signing.OcspSigner,
    server: str,
) -> None:
    issued = _issue(authority, "status.test")
    # Not pre-signed yet: the cache-miss path signs and stores it.
    _, _, body = _http(f"{server}/ocsp", data=_request(issued))
    assert ocsp.load_der_ocsp_response(body).certificate_status == ocsp.OCSPCertStatus.GOOD
    assert store.presigned_response(storage, "issuing-ec", issued.record.serial) is not None
    # SHA-256 CertID, answered with a SHA-256 CertID.
    _, _, body = _http(f"{server}/ocsp", data=_request(issued, hashes.SHA256()))
    parsed = ocsp.load_der_ocsp_response(body)
    assert parsed.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert isinstance(parsed.hash_algorithm, hashes.SHA256)
    # A 32-octet nonce is echoed, and the answer is not cacheable.
    nonce = bytes(range(32))
    _, headers, body = _http(f"{server}/ocsp", data=_request(issued, nonce=nonce))
    parsed = ocsp.load_der_ocsp_response(body)
    assert parsed.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    assert headers["Cache-Control"] == "no-store"
    # A serial of an issuer we have, but never issued: unauthorized, never good.
    fake = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        parsed.issuer_name_hash,
        parsed.issuer_key_hash,
        0xDEADBEEF,
        hashes.SHA1(),  # noqa: S303 - RFC 5019 CertID
    )
    _, _, body = _http(f"{server}/ocsp", data=fake.build().public_bytes(serialization.Encoding.DER))
    assert _status(body) == ocsp.OCSPResponseStatus.UNAUTHORIZED
    # The other intermediate's CertID with this serial: not its certificate.
    other = _issue(authority, "other.test", issuer="issuing-rsa")
    wrong = ocsp.OCSPRequestBuilder().add_certificate(
        x509.load_der_x509_certificate(bytes(issued.record.der or b"")),
        other.chain[0],
        hashes.SHA1(),  # noqa: S303 - RFC 5019 CertID
    )
    _, _, body = _http(
        f"{server}/ocsp", data=wrong.build().public_bytes(serialization.Encoding.DER)
    )
    assert _status(body) == ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_pending_serial_is_never_good(
    storage: Storage, authority: CertificateAuthority, signer: ocsp_signing.OcspSigner
) -> None:
    issued = _issue(authority, "pending.test")
    with storage.transaction() as session:
        from sqlalchemy import update

        from ca.storage.models import Certificate

        session.execute(
            update(Certificate)
            .where(Certificate.serial == issued.record.serial)
            .values(status="pending")
        )
    responder = Responder(storage, signer, signer.clock)
    answer = responder.answer(_request(issued))
    assert _status(answer.body) == ocsp.OCSPResponseStatus.UNAUTHORIZED
    with pytest.raises(CAError) as refused:
        signer.sign(store.certificate_status(storage, issued.record.serial))  # type: ignore[arg-type]
    assert refused.value.kind is Kind.NOT_FOUND


def test_answers_from_the_store_while_the_hsm_is_down(
    storage: Storage,
    authority: CertificateAuthority,
    signer: ocsp_signing.OcspSigner,
    pki: SessionPKI,
) -> None:
    issued = _issue(authority, "hsm-down.test")
    ocsp_signing.refresh_ocsp(signer)
    broken = Token(pki.module, "no-such-token", "0000")
    down = Responder(storage, ocsp_signing.OcspSigner(storage, broken), signer.clock)
    answer = down.answer(_request(issued))
    parsed = ocsp.load_der_ocsp_response(answer.body)
    assert parsed.certificate_status == ocsp.OCSPCertStatus.GOOD
    # What needs a signature now (a nonce) is deferred, not failed.
    deferred = down.answer(_request(issued, nonce=b"n" * 16))
    assert (
        deferred.http_status == 503 and _status(deferred.body) == ocsp.OCSPResponseStatus.TRY_LATER
    )


# -- pre-signing, responders, lint ----------------------------------------------------------------


def test_refresh_signs_every_certificate_once_and_at_half_life(
    storage: Storage, authority: CertificateAuthority, pki: SessionPKI
) -> None:
    clock = FakeClock(datetime.datetime.now(datetime.UTC))
    signer = ocsp_signing.OcspSigner(storage, pki.online, clock=clock)
    issued = [
        _issue(authority, f"bulk{i}.test", issuer=("issuing-ec", "issuing-rsa")[i % 2])
        for i in range(6)
    ]
    first = ocsp_signing.refresh_ocsp(signer, batch=4)
    assert first.signed == 6
    assert ocsp_signing.refresh_ocsp(signer).signed == 0  # idempotent
    # A revocation the listener missed (another process, an HSM outage) is caught up.
    storage.revoke(issued[0].record.serial, 4, "test")
    assert ocsp_signing.refresh_ocsp(signer).signed == 1
    row = store.presigned_response(storage, "issuing-ec", issued[0].record.serial)
    assert row is not None
    parsed = ocsp.load_der_ocsp_response(row.der)
    assert parsed.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert parsed.revocation_reason == x509.ReasonFlags.superseded
    clock.advance(datetime.timedelta(days=2, seconds=1))  # half of 4 days
    assert ocsp_signing.refresh_ocsp(signer).signed == 6
    for certificate in issued:
        row = store.presigned_response(
            storage, certificate.record.issuer_id, certificate.record.serial
        )
        assert row is not None
        assert lint.errors(lint.lint_ocsp_response(row.der)) == []
        assert row.next_update - row.this_update <= datetime.timedelta(days=10)  # BR 4.9.10


def test_a_revoked_response_is_never_overwritten_by_a_stale_good_one(
    storage: Storage, authority: CertificateAuthority, signer: ocsp_signing.OcspSigner
) -> None:
    issued = _issue(authority, "race.test")
    stale = signer.row(issued.record)  # signed while the certificate was good
    revoked = authority.storage.revoke(issued.record.serial, 1, "test")
    store.store_ocsp_responses(storage, [signer.row(revoked)])
    store.store_ocsp_responses(storage, [stale])
    row = store.presigned_response(storage, "issuing-ec", issued.record.serial)
    assert row is not None
    assert ocsp.load_der_ocsp_response(row.der).certificate_status == ocsp.OCSPCertStatus.REVOKED


def test_delegated_responder_certificate_and_its_renewal(
    storage: Storage, pki: SessionPKI, authority: CertificateAuthority, tmp_path: Path
) -> None:
    clock = FakeClock(datetime.datetime.now(datetime.UTC))
    signer = ocsp_signing.OcspSigner(storage, pki.online, clock=clock)
    issued = _issue(authority, "responder.test")
    response = ocsp.load_der_ocsp_response(signer.sign(issued.record).der)
    (responder,) = response.certificates
    issuer = issued.chain[0]
    responder.verify_directly_issued_by(issuer)
    eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    assert responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
    assert responder.not_valid_after_utc - responder.not_valid_before_utc <= datetime.timedelta(
        days=31
    )
    assert response.next_update_utc is not None
    assert response.next_update_utc <= responder.not_valid_after_utc
    path = tmp_path / "responder.pem"
    path.write_bytes(responder.public_bytes(serialization.Encoding.PEM))
    result = pkilint("lint_pkix_cert", str(path))
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout
    response_path = tmp_path / "response.der"
    response_path.write_bytes(response.public_bytes(serialization.Encoding.DER))
    result = pkilint("lint_ocsp_response", str(response_path))
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout
    # Used until a third of its life is left, then replaced by a new key and certificate.
    clock.advance(datetime.timedelta(days=15))
    again = ocsp.load_der_ocsp_response(signer.sign(issued.record).der)
    assert again.certificates[0].serial_number == responder.serial_number
    clock.advance(datetime.timedelta(days=6))
    renewed = ocsp.load_der_ocsp_response(signer.sign(issued.record).der)
    assert renewed.certificates[0].serial_number != responder.serial_number
    assert renewed.certificates[0].public_key() != responder.public_key()


def test_issuer_signed_responses_by_configuration(
    storage: Storage, pki: SessionPKI, authority: CertificateAuthority
) -> None:
    signer = ocsp_signing.OcspSigner(
        storage, pki.online, ocsp_signing.OcspSettings(signer="issuer")
    )
    issued = _issue(authority, "issuer-signed.test", issuer="issuing-rsa")
    response = ocsp.load_der_ocsp_response(signer.sign(issued.record).der)
    assert response.certificates == []
    public = issued.chain[0].public_key()
    assert isinstance(public, rsa.RSAPublicKey) and response.signature_hash_algorithm
    public.verify(
        response.signature,
        response.tbs_response_bytes,
        padding.PKCS1v15(),
        response.signature_hash_algorithm,
    )
    assert (
        lint.errors(lint.lint_ocsp_response(response.public_bytes(serialization.Encoding.DER)))
        == []
    )


def test_publish_writes_files_nginx_can_serve_by_get_path(
    storage: Storage,
    authority: CertificateAuthority,
    signer: ocsp_signing.OcspSigner,
    tmp_path: Path,
) -> None:
    from ca.cli_revocation import get_request_path

    issued = _issue(authority, "publish.test")
    ocsp_signing.refresh_ocsp(signer)
    ids = signer.issuer("issuing-ec").ids
    request = ocsp_signing.canonical_request(ids, issued.certificate.serial_number)
    assert "//" not in get_request_path(request)
    assert get_request_path(b"\xff\xff\xff\xff\xff\xff") == "/"  # "////////" collapses


def test_settings_refuse_out_of_br_validity() -> None:
    with pytest.raises(CAError, match=r"BR 4\.9\.10"):
        ocsp_signing.OcspSettings(validity=datetime.timedelta(days=11))
    with pytest.raises(CAError, match="signer"):
        ocsp_signing.OcspSettings(signer="nobody")


def test_the_revocation_job_signs_crls_and_responses_and_the_listener_resigns(
    storage: Storage, pki: SessionPKI, authority: CertificateAuthority
) -> None:
    runtime = Runtime(load_config(None, environ={}))
    runtime.__dict__.update(storage=storage, token=pki.online, authority=authority)
    issued = _issue(authority, "job.test")
    ocsp_signing.refresh_revocation(runtime)
    assert store.presigned_response(storage, "issuing-ec", issued.record.serial) is not None
    assert len(store.latest_crls(storage, "issuing-ec")) == runtime.config.crl_shards
    ocsp_signing.install(runtime)
    from ca import crl

    crl.install(runtime)
    authority.revoke(issued.record.serial, "superseded")
    row = store.presigned_response(storage, "issuing-ec", issued.record.serial)
    assert row is not None
    assert ocsp.load_der_ocsp_response(row.der).certificate_status == ocsp.OCSPCertStatus.REVOKED
    shard = store.latest_crls(storage, "issuing-ec")[issued.record.crl_shard]
    assert shard.number == 2
    der = store.crl_der(storage, shard.id)
    listed = x509.load_der_x509_crl(der)
    assert listed.get_revoked_certificate_by_serial_number(issued.certificate.serial_number)


# -- the fast path: raw WSGI, cached parse and answers, never staler than the database ----------


def test_warm_caches_answer_revoked_as_soon_as_another_process_revokes(
    storage: Storage,
    authority: CertificateAuthority,
    signer: ocsp_signing.OcspSigner,
    server: str,
) -> None:
    issued = _issue(authority, "fresh.test")
    ocsp_signing.refresh_ocsp(signer)
    der = _request(issued)
    path = urllib.parse.quote(base64.b64encode(der).decode(), safe="")
    first = _http(f"{server}/ocsp/{path}")
    again = _http(f"{server}/ocsp/{path}")  # from the per-process caches
    assert first[2] == again[2] and first[1]["ETag"] == again[1]["ETag"]
    assert ocsp.load_der_ocsp_response(again[2]).certificate_status == ocsp.OCSPCertStatus.GOOD
    assert _http(f"{server}/ocsp", data=der)[2] == first[2]
    # Revoked and re-signed elsewhere (another worker, another host): no listener here.
    revoked = storage.revoke(issued.record.serial, 1, "test")
    store.store_ocsp_responses(storage, [signer.row(revoked)])
    for status, headers, body in (_http(f"{server}/ocsp/{path}"), _http(f"{server}/ocsp", der)):
        assert status == 200 and headers["ETag"] != first[1]["ETag"]
        parsed = ocsp.load_der_ocsp_response(body)
        assert parsed.certificate_status == ocsp.OCSPCertStatus.REVOKED
        assert parsed.revocation_reason == x509.ReasonFlags.key_compromise


def test_fast_path_answers_as_the_flask_routes_do(
    storage: Storage,
    pki: SessionPKI,
    authority: CertificateAuthority,
    signer: ocsp_signing.OcspSigner,
) -> None:
    from werkzeug.test import Client

    from ocsp.web import FastPath

    runtime = Runtime(load_config(None, environ={}))
    runtime.__dict__.update(storage=storage, token=pki.online)
    app = create_app(runtime, "http")
    assert isinstance(app.wsgi_app, FastPath)
    fast, routed = Client(app), Client(app.wsgi_app.app)
    issued = _issue(authority, "alike.test")
    ocsp_signing.refresh_ocsp(signer)
    der = _request(issued)
    encoded = base64.b64encode(der).decode()
    for method, url, data in (
        ("GET", f"/ocsp/{encoded}", None),
        ("GET", f"/ocsp//{urllib.parse.quote(encoded, safe='')}", None),
        ("POST", "/ocsp", der),
        ("POST", "/ocsp/", der),
        ("GET", "/ocsp", None),
        ("GET", "/ocsp/%%%", None),
        ("POST", "/ocsp", b"not der"),
        ("POST", "/ocsp", b"\x30" * 5000),
        ("POST", "/ocsp", _request(issued, nonce=b"n" * 8)),
    ):
        a = fast.open(url, method=method, data=data)
        b = routed.open(url, method=method, data=data)
        assert (a.status_code, a.content_type) == (b.status_code, b.content_type), url
        if data is None or b"n" * 8 not in data:  # a nonce answer is signed anew each time
            assert a.data == b.data, url
            for name in ("ETag", "Last-Modified", "Expires", "Content-Length"):
                assert a.headers.get(name) == b.headers.get(name), (url, name)
        assert (
            a.headers["Cache-Control"].split(",")[1:] == b.headers["Cache-Control"].split(",")[1:]
        )
    etag = fast.get(f"/ocsp/{encoded}").headers["ETag"]
    assert fast.get(f"/ocsp/{encoded}", headers={"If-None-Match": etag}).status_code == 304
    assert fast.head(f"/ocsp/{encoded}").status_code == 200  # HEAD: the blueprint's route
    assert fast.put("/ocsp").status_code == 405
    assert fast.get("/ocspx").status_code == 404
    assert fast.get("/healthz").status_code in (200, 503)  # not OCSP: Flask


def test_a_failed_fast_read_falls_back_to_the_storage_layer(
    storage: Storage,
    authority: CertificateAuthority,
    signer: ocsp_signing.OcspSigner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ocsp.responder import StoredBytes

    issued = _issue(authority, "fallback.test")
    ocsp_signing.refresh_ocsp(signer)
    responder = Responder(storage, signer, signer.clock)
    good = responder.answer(_request(issued))
    assert ocsp.load_der_ocsp_response(good.body).certificate_status == ocsp.OCSPCertStatus.GOOD

    def broken(self: StoredBytes, issuer_id: str, serial: str) -> bytes | None:
        raise CAError(Kind.STORAGE, "database unavailable: test")

    with monkeypatch.context() as patch:
        patch.setattr(StoredBytes, "der", broken)
        assert responder.answer(_request(issued)).body == good.body
    responder._stored.close()  # a dropped connection is reopened on the next read
    assert responder.answer(_request(issued)).body == good.body


def test_a_get_path_ending_in_a_slash_is_published_as_index_der() -> None:
    from ca.cli_revocation import get_request_path, published_file

    # 00 00 3f base64-encodes to "AAA/": the GET path ends in "/", so the answer goes to
    # <path>/index.der, which nginx serves for that URI with `index index.der;`.
    assert get_request_path(b"\x00\x00\x3f") == "AAA/"
    assert published_file(b"\x00\x00\x3f") == "AAA/index.der"
    assert published_file(b"\x00\x00\x00") == "AAAA"
