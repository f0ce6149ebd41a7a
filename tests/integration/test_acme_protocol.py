"""The ACME server spoken to raw (RFC 8555, RFC 8738, RFC 9773), in-process, validated for real.

The app is the real one (`ca.web.create_app` over a real `Runtime` on the session's SoftHSM
token), driven through Flask's test client at https://ca.test so the URL the server checks is
the URL signed. http-01 validation really connects: names resolve through pebble-challtestsrv
(every A query answers 127.0.0.1) to a loopback HTTP responder this module runs.

Every bad input of the ACME issue is one test that checks the RFC's error type and status, the
problem media type, a fresh Replay-Nonce, and that the database did not change. The core flow
runs on SQLite and PostgreSQL; the bad inputs run on SQLite only, to keep the module fast.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import TestResponse

from ca.clock import Clock, FakeClock
from ca.config import load_config
from ca.runtime import Runtime
from ca.storage import Storage
from ca.storage.acme_store import AcmeStore
from ca.storage.models import (
    AcmeAccount,
    AcmeAuthorization,
    AcmeChallenge,
    AcmeEabKey,
    AcmeOrder,
    Certificate,
)
from ca.web import create_app
from tests.conftest import ONLINE_PIN, ONLINE_TOKEN, SessionPKI
from tests.integration.acme_client import (
    ERROR,
    OMIT,
    PROBLEM,
    AccountKey,
    AcmeClient,
    b64url,
    csr_der,
    dns_ids,
    eab_binding,
    flattened_jws,
    ip_ids,
)
from tests.integration.acme_harness import ChallTestSrv, challtestsrv, free_port

pytestmark = pytest.mark.integration

# The bad inputs do not depend on the database backend; the core flow runs on both.
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

BASE = "https://ca.test"
ACME = f"{BASE}/acme"
# RFC 8555 §6.2 and the issue: the algorithms the server must list in badSignatureAlgorithm.
ALGORITHMS = {"ES256", "ES384", "RS256", "PS256", "EdDSA"}


# -- the rig ---------------------------------------------------------------------------------


class ChallengeResponder:
    """A threaded HTTP server answering RFC 8555 §8.3 http-01 requests from a token table."""

    def __init__(self) -> None:
        self.key_authorizations: dict[str, str] = {}
        table = self.key_authorizations

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                prefix = "/.well-known/acme-challenge/"
                token = self.path[len(prefix) :] if self.path.startswith(prefix) else ""
                body = table.get(token)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/octet-stream")
                payload = (body or "not found").encode()
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the validator's requests are not test output

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChallengeResponder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChallTestSrv]:
    with challtestsrv(tmp_path_factory.mktemp("challtestsrv")) as server:
        yield server


@pytest.fixture(scope="module")
def responder() -> Iterator[ChallengeResponder]:
    with ChallengeResponder() as server:
        yield server


@dataclasses.dataclass
class Server:
    runtime: Runtime
    http: FlaskClient
    storage: Storage  # the test's own handle on the same database, for checking state
    responder: ChallengeResponder

    def client(self, key: AccountKey | None = None) -> AcmeClient:
        return AcmeClient(self.http, key or AccountKey.ec_p256(), BASE)

    def account(self, key: AccountKey | None = None) -> AcmeClient:
        client = self.client(key)
        response = client.new_account()
        assert response.status_code == 201, response.get_data(as_text=True)
        return client


@contextlib.contextmanager
def running_server(
    storage: Storage,
    tmp_path: Path,
    dns: ChallTestSrv,
    responder: ChallengeResponder,
    name: str = "certwright",
    clock: Clock | None = None,
    **acme: Any,
) -> Iterator[Server]:
    """A real Runtime and the HTTPS app on the database `storage` already holds."""
    settings: dict[str, Any] = {
        "http01_port": responder.port,
        "tlsalpn01_port": free_port(),  # nobody listens: tls-alpn-01 is not used here
        "dns_resolver": dns.dns_address,
        "validation_timeout_seconds": 5.0,
        # The challenge POST waits for the validation, so no test has to poll or sleep.
        "challenge_wait_seconds": 30.0,
        **acme,
    }
    config = tmp_path / f"{name}.toml"
    lines = [
        "[ca]",
        'public_base_url = "http://ca.test:8080"',
        'default_issuer = "issuing-ec"',
        "[database]",
        f"url = {json.dumps(storage.url)}",
        "auto_migrate = false",
        "[hsm]",
        f"token_label = {json.dumps(ONLINE_TOKEN)}",
        "[acme]",
        *(f"{key} = {json.dumps(value)}" for key, value in settings.items()),
    ]
    config.write_text("\n".join(lines) + "\n")
    runtime = Runtime(load_config(config, environ={}), clock=clock)
    try:
        app = create_app(runtime, "https")
        yield Server(runtime, app.test_client(), storage, responder)
    finally:
        runtime.close()


@pytest.fixture
def server(
    storage: Storage,
    pki: SessionPKI,
    tmp_path: Path,
    dns: ChallTestSrv,
    responder: ChallengeResponder,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Server]:
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
    with running_server(storage, tmp_path, dns, responder) as running:
        yield running


# -- assertions and flows ---------------------------------------------------------------------


def assert_problem(
    response: TestResponse, error: str, status: int, *, sent_nonce: str | None = None
) -> dict[str, Any]:
    """An RFC 7807 problem of `urn:ietf:params:acme:error:<error>` with a fresh nonce."""
    text = response.get_data(as_text=True)
    assert response.status_code == status, f"{response.status_code}: {text}"
    assert response.mimetype == PROBLEM, f"{response.content_type}: {text}"
    body: dict[str, Any] = json.loads(text)
    assert body["type"] == ERROR + error, body
    assert body.get("status", status) == status
    # RFC 8555 §6.5: every response to a POST carries a new nonce, problems included.
    nonce = response.headers.get("Replay-Nonce")
    assert nonce, "problem without a Replay-Nonce"
    assert nonce != sent_nonce
    return body


def snapshot(storage: Storage) -> dict[str, list[tuple[Any, ...]]]:
    """Everything a request could change, to prove a refused one changed nothing."""
    with storage.transaction() as session:
        return {
            "accounts": sorted(
                tuple(r)
                for r in session.execute(
                    select(
                        AcmeAccount.id,
                        AcmeAccount.status,
                        AcmeAccount.key_thumbprint,
                        AcmeAccount.contact,
                    )
                )
            ),
            "orders": sorted(
                tuple(r)
                for r in session.execute(
                    select(AcmeOrder.id, AcmeOrder.status, AcmeOrder.certificate_serial)
                )
            ),
            "authorizations": sorted(
                tuple(r)
                for r in session.execute(select(AcmeAuthorization.id, AcmeAuthorization.status))
            ),
            "challenges": sorted(
                tuple(r) for r in session.execute(select(AcmeChallenge.id, AcmeChallenge.status))
            ),
            "certificates": sorted(
                tuple(r) for r in session.execute(select(Certificate.serial, Certificate.status))
            ),
            "eab": sorted(
                tuple(r) for r in session.execute(select(AcmeEabKey.key_id, AcmeEabKey.account_id))
            ),
        }


@contextlib.contextmanager
def unchanged(storage: Storage) -> Iterator[None]:
    before = snapshot(storage)
    yield
    assert snapshot(storage) == before


def validate(server: Server, client: AcmeClient, order: dict[str, Any]) -> None:
    """Answer http-01 for every pending authorization of `order` and validate it for real."""
    for authz_url in order["authorizations"]:
        response = client.get(authz_url)
        assert response.status_code == 200, response.get_data(as_text=True)
        authz = response.get_json()
        if authz["status"] == "valid":
            continue
        challenge = next(c for c in authz["challenges"] if c["type"] == "http-01")
        token = challenge["token"]
        server.responder.key_authorizations[token] = client.key.key_authorization(token)
        response = client.post(challenge["url"], {})
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.get_json()["status"] == "valid", response.get_json()


def ready_order(
    server: Server,
    client: AcmeClient,
    identifiers: list[dict[str, str]],
    fields: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    response = client.new_order(identifiers, fields)
    assert response.status_code == 201, response.get_data(as_text=True)
    order_url = response.headers["Location"]
    validate(server, client, response.get_json())
    order = client.get(order_url).get_json()
    assert order["status"] == "ready", order
    return order_url, order


@dataclasses.dataclass(frozen=True)
class Issued:
    order_url: str
    order: dict[str, Any]
    pem: str
    leaf: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def finalize(
    client: AcmeClient, order: dict[str, Any], names: list[str]
) -> tuple[ec.EllipticCurvePrivateKey, TestResponse]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, client.post(order["finalize"], {"csr": b64url(csr_der(key, names))})


def issue(
    server: Server, client: AcmeClient, names: list[str], fields: dict[str, Any] | None = None
) -> Issued:
    identifiers = [
        {"type": "ip" if n.replace(".", "").isdigit() else "dns", "value": n} for n in names
    ]
    order_url, order = ready_order(server, client, identifiers, fields)
    key, response = finalize(client, order, names)
    assert response.status_code == 200, response.get_data(as_text=True)
    order = response.get_json()
    assert order["status"] == "valid", order
    download = client.get(order["certificate"])
    assert download.status_code == 200, download.get_data(as_text=True)
    assert download.mimetype == "application/pem-certificate-chain"
    pem = download.get_data(as_text=True)
    leaf = x509.load_pem_x509_certificates(pem.encode())[0]
    return Issued(order_url, order, pem, leaf, key)


def ari_cert_id(certificate: x509.Certificate) -> str:
    """RFC 9773 §4.1: base64url(AKI keyIdentifier) "." base64url(serial's DER content octets)."""
    aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    serial = certificate.serial_number
    octets = serial.to_bytes(serial.bit_length() // 8 + 1, "big")  # DER: a leading 0 if needed
    return f"{b64url(aki.key_identifier)}.{b64url(octets)}"


def revoke_payload(certificate: x509.Certificate, reason: Any = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "certificate": b64url(certificate.public_bytes(serialization.Encoding.DER))
    }
    if reason is not None:
        payload["reason"] = reason
    return payload


def certificate_status(storage: Storage, certificate: x509.Certificate) -> str:
    return storage.get_certificate(format(certificate.serial_number, "x")).status


def parse_time(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- the positive flow, on both databases -------------------------------------------------------


def test_full_flow_issues_downloads_revokes_and_ari_asks_for_renewal(
    server: Server, pki: SessionPKI
) -> None:
    client = server.account()
    names = ["www.flow.test", "api.flow.test", "127.0.0.1"]
    issued = issue(server, client, names)

    chain = x509.load_pem_x509_certificates(issued.pem.encode())
    assert len(chain) == 2  # leaf and the issuing intermediate; never the root
    san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["api.flow.test", "www.flow.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    issued.leaf.verify_directly_issued_by(chain[1])
    chain[1].verify_directly_issued_by(pki.root.certificate)

    renewal = f"{client.url('renewalInfo')}/{ari_cert_id(issued.leaf)}"
    before = server.http.get(renewal)
    assert before.status_code == 200, before.get_data(as_text=True)
    now = datetime.datetime.now(datetime.UTC)
    assert parse_time(before.get_json()["suggestedWindow"]["start"]) > now

    response = client.post(client.url("revokeCert"), revoke_payload(issued.leaf, 1))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert certificate_status(server.storage, issued.leaf) == "revoked"

    after = server.http.get(renewal)
    assert after.status_code == 200
    window = after.get_json()["suggestedWindow"]
    # RFC 9773 §4.2: a window in the past tells the client to renew now.
    assert (
        parse_time(window["start"])
        < parse_time(window["end"])
        < now + datetime.timedelta(seconds=1)
    )
    assert "Retry-After" in after.headers


def test_an_order_lists_its_authorizations_the_same_way_each_time(server: Server) -> None:
    client = server.account()
    names = [f"n{i}-{case}.order-list.test" for i in range(6) for case in ("a", "B")]
    created = client.new_order(dns_ids(*names))
    assert created.status_code == 201, created.get_data(as_text=True)
    listed = created.get_json()["authorizations"]
    assert len(listed) == len(names)
    fetched = client.get(created.headers["Location"]).get_json()["authorizations"]
    assert fetched == listed


def test_replaces_names_the_earlier_certificate(server: Server) -> None:
    client = server.account()
    first = issue(server, client, ["renew.test"])
    cert_id = ari_cert_id(first.leaf)
    second = issue(server, client, ["renew.test"], {"replaces": cert_id})
    assert second.order["replaces"] == cert_id
    assert second.leaf.serial_number != first.leaf.serial_number


# -- directory, nonces, accounts ----------------------------------------------------------------


@sqlite_only
def test_directory_meta_lists_profiles_caa_identities_and_eab(server: Server) -> None:
    directory = server.client().directory
    for resource in ("newNonce", "newAccount", "newOrder", "revokeCert", "keyChange"):
        assert directory[resource].startswith(f"{ACME}/")
    assert directory["renewalInfo"] == f"{ACME}/renewal-info"
    meta = directory["meta"]
    assert {"tls-server", "tls-client", "tls-server-client"} <= set(meta["profiles"])
    assert meta["caaIdentities"] == ["certwright.internal"]
    assert meta["externalAccountRequired"] is False


@sqlite_only
def test_new_nonce_answers_head_200_and_get_204_uncached(server: Server) -> None:
    url = server.client().url("newNonce")
    head, get = server.http.head(url), server.http.get(url)
    assert (head.status_code, get.status_code) == (200, 204)
    for response in (head, get):
        assert response.headers["Cache-Control"] == "no-store"
    assert head.headers["Replay-Nonce"] != get.headers["Replay-Nonce"]


@sqlite_only
@pytest.mark.parametrize("make_key", [AccountKey.ec_p256, AccountKey.rsa, AccountKey.ed25519])
def test_accounts_with_each_key_type_sign_requests(
    server: Server, make_key: Callable[[], AccountKey]
) -> None:
    client = server.account(make_key())
    assert client.account_url is not None
    response = client.get(client.account_url)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["status"] == "valid"


@sqlite_only
def test_only_return_existing_for_an_unknown_key_is_account_does_not_exist(
    server: Server,
) -> None:
    client = server.client()
    with unchanged(server.storage):
        response = client.new_account({"onlyReturnExisting": True})
        assert_problem(response, "accountDoesNotExist", 400)


@sqlite_only
def test_the_same_key_twice_returns_the_existing_account(server: Server) -> None:
    key = AccountKey.ec_p256()
    first = server.account(key)
    with unchanged(server.storage):
        again = server.client(key).new_account()
        assert again.status_code == 200, again.get_data(as_text=True)
        assert again.headers["Location"] == first.account_url
        existing = server.client(key).new_account({"onlyReturnExisting": True})
        assert existing.status_code == 200
        assert existing.headers["Location"] == first.account_url


def key_change_body(client: AcmeClient, new_key: AccountKey) -> dict[str, Any]:
    """RFC 8555 §7.3.5: the inner JWS, signed by the new key, as the outer payload."""
    url = client.url("keyChange")
    inner = flattened_jws(
        new_key,
        {"alg": new_key.alg, "jwk": new_key.jwk, "url": url},
        json.dumps({"account": client.account_url, "oldKey": client.key.jwk}).encode(),
    )
    return inner


@sqlite_only
def test_key_change_rolls_the_account_key(server: Server) -> None:
    client = server.account()
    old_key, new_key = client.key, AccountKey.ec_p256()
    response = client.post(client.url("keyChange"), key_change_body(client, new_key))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert client.account_url is not None
    # The old key no longer signs for the account; the new one does.
    refused = client.get(client.account_url)
    assert_problem(refused, "malformed", 400)
    client.key = new_key
    assert client.get(client.account_url).status_code == 200
    found = server.client(new_key).new_account({"onlyReturnExisting": True})
    assert found.headers["Location"] == client.account_url
    gone = server.client(old_key).new_account({"onlyReturnExisting": True})
    assert_problem(gone, "accountDoesNotExist", 400)


@sqlite_only
def test_key_change_to_another_accounts_key_is_409_with_its_location(server: Server) -> None:
    client, other = server.account(), server.account()
    with unchanged(server.storage):
        response = client.post(client.url("keyChange"), key_change_body(client, other.key))
        assert response.status_code == 409, response.get_data(as_text=True)
        assert response.mimetype == PROBLEM
        assert response.headers["Location"] == other.account_url
        assert response.headers.get("Replay-Nonce")


@sqlite_only
def test_a_deactivated_account_is_refused_with_401_unauthorized(server: Server) -> None:
    client = server.account()
    assert client.account_url is not None
    response = client.post(client.account_url, {"status": "deactivated"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["status"] == "deactivated"
    with unchanged(server.storage):
        # RFC 8555 §7.3.6: "If a server receives a POST or POST-as-GET from a deactivated
        # account, it MUST return an error response with status code 401 (Unauthorized) and
        # type urn:ietf:params:acme:error:unauthorized".
        assert_problem(client.new_order(dns_ids("late.test")), "unauthorized", 401)
        assert_problem(client.get(client.account_url), "unauthorized", 401)


@sqlite_only
def test_new_account_with_a_deactivated_accounts_key_is_refused(server: Server) -> None:
    client = server.account()
    assert client.account_url is not None
    assert client.post(client.account_url, {"status": "deactivated"}).status_code == 200
    with unchanged(server.storage):
        # §7.3.6 again: a newAccount signed by that key is a POST from a deactivated account;
        # answering 200 with the account would let a client believe it is usable.
        response = server.client(client.key).new_account()
        assert_problem(response, "unauthorized", 401)


@sqlite_only
def test_authorization_deactivation_invalidates_its_order(server: Server) -> None:
    client = server.account()
    response = client.new_order(dns_ids("deact.test"))
    assert response.status_code == 201
    order_url, order = response.headers["Location"], response.get_json()
    authz_url = order["authorizations"][0]
    response = client.post(authz_url, {"status": "deactivated"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["status"] == "deactivated"
    assert client.get(authz_url).get_json()["status"] == "deactivated"
    assert client.get(order_url).get_json()["status"] == "invalid"
    with unchanged(server.storage):
        again = client.post(authz_url, {"status": "deactivated"})
        assert_problem(again, "malformed", 400)


@sqlite_only
def test_deactivating_an_authorization_of_a_ready_order_stops_its_issuance(
    server: Server,
) -> None:
    """§7.5.2 and §7.1.6: the order goes invalid with its authorization, and finalize is
    refused, even though the order was ready when the authorization went."""
    client = server.account()
    order_url, order = ready_order(server, client, dns_ids("deact-ready.test"))
    response = client.post(order["authorizations"][0], {"status": "deactivated"})
    assert response.get_json()["status"] == "deactivated", response.get_json()
    assert client.get(order_url).get_json()["status"] == "invalid"
    with unchanged(server.storage):
        assert_problem(finalize(client, order, ["deact-ready.test"])[1], "orderNotReady", 403)


@sqlite_only
def test_finalize_checks_the_authorizations_themselves(server: Server) -> None:
    """An authorization that stops being valid without its order being told (a race with
    finalize, a hand edit) still stops issuance; the order is then invalid."""
    client = server.account()
    order_url, order = ready_order(server, client, dns_ids("raced.test"))
    authz_id = order["authorizations"][0].rsplit("/", 1)[-1]
    with server.storage.transaction() as session:
        session.get_one(AcmeAuthorization, authz_id).status = "deactivated"
    certificates = snapshot(server.storage)["certificates"]
    _, response = finalize(client, order, ["raced.test"])
    assert_problem(response, "orderNotReady", 403)
    assert client.get(order_url).get_json()["status"] == "invalid"
    assert snapshot(server.storage)["certificates"] == certificates  # nothing reserved


@sqlite_only
def test_valid_authorizations_are_reused_and_orders_do_not_outlive_them(
    storage: Storage,
    pki: SessionPKI,
    tmp_path: Path,
    dns: ChallTestSrv,
    responder: ChallengeResponder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """§7.1.4: a valid authorization lives for the reuse window (authorization_reuse_hours),
    and a new order for its name reuses it, ready at once; the order expires no later than
    the authorization (§7.1.3), and then cannot be finalized."""
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
    clock = FakeClock(datetime.datetime.now(datetime.UTC).replace(microsecond=0))
    reuse = datetime.timedelta(hours=720)
    with running_server(storage, tmp_path, dns, responder, clock=clock) as srv:
        client = srv.account()
        first = issue(srv, client, ["reused.test"])
        authz_url = first.order["authorizations"][0]
        authz = client.get(authz_url).get_json()
        assert parse_time(authz["expires"]) == clock.now() + reuse

        clock.advance(reuse - datetime.timedelta(hours=2))
        response = client.new_order(dns_ids("reused.test"))
        assert response.status_code == 201, response.get_data(as_text=True)
        order = response.get_json()
        assert (order["status"], order["authorizations"]) == ("ready", [authz_url])
        assert parse_time(order["expires"]) == parse_time(authz["expires"])  # not now + 24 h

        clock.advance(datetime.timedelta(hours=3))
        assert client.get(authz_url).get_json()["status"] == "expired"
        assert client.get(response.headers["Location"]).get_json()["status"] == "invalid"
        with unchanged(storage):
            assert_problem(finalize(client, order, ["reused.test"])[1], "orderNotReady", 403)
        # And the name needs validating again.
        fresh = client.new_order(dns_ids("reused.test")).get_json()
        assert fresh["status"] == "pending" and fresh["authorizations"] != [authz_url]


@sqlite_only
def test_no_reuse_when_the_window_is_zero(storage: Storage, limited_server: LimitedServer) -> None:
    with limited_server(authorization_reuse_hours=0) as srv:
        client = srv.account()
        first = issue(srv, client, ["not-reused.test"])
        again = client.new_order(dns_ids("not-reused.test")).get_json()
        assert again["status"] == "pending"
        assert again["authorizations"] != first.order["authorizations"]


@sqlite_only
def test_external_account_binding_when_required(
    storage: Storage,
    tmp_path: Path,
    dns: ChallTestSrv,
    responder: ChallengeResponder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
    eab = AcmeStore(storage).create_eab_key("tests", [], "tests")
    with running_server(storage, tmp_path, dns, responder, external_account_required=True) as srv:
        client = srv.client()
        assert client.directory["meta"]["externalAccountRequired"] is True
        with unchanged(storage):
            assert_problem(client.new_account(), "externalAccountRequired", 400)
        url = client.url("newAccount")
        wrong_mac = eab_binding(eab.key_id, b"not the key" * 3, client.key.jwk, url)
        with unchanged(storage):
            response = client.new_account({"externalAccountBinding": wrong_mac})
            assert_problem(response, "unauthorized", 403)
        failed = storage.audit_events(1)[0]
        assert (failed["action"], failed["subject"], failed["outcome"]) == (
            "acme.authenticate",
            "externalAccountBinding",
            "refused",
        )

        binding = eab_binding(eab.key_id, eab.hmac_key, client.key.jwk, url)
        response = client.new_account({"externalAccountBinding": binding})
        assert response.status_code == 201, response.get_data(as_text=True)
        bound = AcmeStore(storage).eab_key(eab.key_id)
        assert bound is not None and bound.account_id is not None

        second = srv.client()
        reused = eab_binding(eab.key_id, eab.hmac_key, second.key.jwk, url)
        with unchanged(storage):
            response = second.new_account({"externalAccountBinding": reused})
            assert_problem(response, "unauthorized", 403)


@sqlite_only
def test_a_binding_restricts_the_names_its_account_may_order(
    storage: Storage,
    pki: SessionPKI,
    tmp_path: Path,
    dns: ChallTestSrv,
    responder: ChallengeResponder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """§7.3.4 leaves what a binding grants to the CA: here, a DNS suffix and an IP network
    (`certwright eab create --allow`). Names the profile allows but the binding does not are
    refused like names outside the profile: rejectedIdentifier, one subproblem each."""
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
    eab = AcmeStore(storage).create_eab_key("web", ["Web.TEST.", "10.1.0.0/16"], "tests")
    assert eab.allowed_names == ("web.test", "10.1.0.0/16")  # stored canonical
    with running_server(storage, tmp_path, dns, responder, external_account_required=True) as srv:
        client = srv.client()
        binding = eab_binding(eab.key_id, eab.hmac_key, client.key.jwk, client.url("newAccount"))
        response = client.new_account({"externalAccountBinding": binding})
        assert response.status_code == 201, response.get_data(as_text=True)

        inside = dns_ids("web.test", "a.web.test", "*.web.test") + ip_ids("10.1.2.3")
        response = client.new_order(inside)
        assert response.status_code == 201, response.get_data(as_text=True)

        # All inside the profile (*.test, 10.0.0.0/8); three outside the binding. "aweb.test"
        # ends with the suffix's characters but is not under it.
        outside = dns_ids("a.web.test", "db.test", "aweb.test") + ip_ids("10.2.0.1")
        with unchanged(storage):
            body = assert_problem(client.new_order(outside), "rejectedIdentifier", 400)
        refused = {(s["identifier"]["type"], s["identifier"]["value"]) for s in body["subproblems"]}
        assert refused == {("dns", "db.test"), ("dns", "aweb.test"), ("ip", "10.2.0.1")}

        with unchanged(storage):
            body = assert_problem(client.new_order(dns_ids("*.db.test")), "rejectedIdentifier", 400)
        assert "outside this account's binding" in body["detail"], body


@sqlite_only
def test_unknown_profile_is_invalid_profile(server: Server) -> None:
    client = server.account()
    with unchanged(server.storage):
        response = client.new_order(dns_ids("profile.test"), {"profile": "nope"})
        assert_problem(response, "invalidProfile", 400)


@sqlite_only
def test_replacing_an_already_replaced_certificate_is_409_already_replaced(
    server: Server,
) -> None:
    client = server.account()
    first = issue(server, client, ["twice.test"])
    cert_id = ari_cert_id(first.leaf)
    response = client.new_order(dns_ids("twice.test"), {"replaces": cert_id})
    assert response.status_code == 201, response.get_data(as_text=True)
    with unchanged(server.storage):
        # RFC 9773 §5: a certificate already marked replaced by an order that is not invalid
        # MUST be refused with 409 alreadyReplaced.
        again = client.new_order(dns_ids("twice.test"), {"replaces": cert_id})
        assert_problem(again, "alreadyReplaced", 409)


@sqlite_only
def test_a_certificate_goes_by_one_ari_identifier(server: Server) -> None:
    """RFC 9773 §4.1 spells a certificate's identifier one way; another spelling of its serial,
    or another key identifier, names no certificate of ours, for renewalInfo and replaces."""
    client = server.account()
    issued = issue(server, client, ["one-id.test"])
    cert_id = ari_cert_id(issued.leaf)
    aki_b64, serial_b64 = cert_id.split(".")
    octets = base64.urlsafe_b64decode(serial_b64 + "=" * (-len(serial_b64) % 4))
    respelled = aki_b64 + "." + b64url(bytes(1) + octets)
    other_aki = b64url(bytes(20)) + "." + serial_b64
    renewal = client.url("renewalInfo")
    assert server.http.get(f"{renewal}/{cert_id}").status_code == 200
    assert server.http.get(f"{renewal}/{respelled}").status_code == 400
    assert server.http.get(f"{renewal}/{other_aki}").status_code == 404
    with unchanged(server.storage):
        for bad in (respelled, other_aki):
            response = client.new_order(dns_ids("one-id.test"), {"replaces": bad})
            assert_problem(response, "malformed", 400)


@sqlite_only
def test_an_expired_order_no_longer_holds_its_replaces(
    storage: Storage,
    pki: SessionPKI,
    tmp_path: Path,
    dns: ChallTestSrv,
    responder: ChallengeResponder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RFC 9773 §5 refuses a second live order replacing the same certificate; an order that
    expired unfinished is invalid (§7.1.6) and no longer counts."""
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
    clock = FakeClock(datetime.datetime.now(datetime.UTC).replace(microsecond=0))
    with running_server(storage, tmp_path, dns, responder, clock=clock) as srv:
        client = srv.account()
        cert_id = ari_cert_id(issue(srv, client, ["lapsed.test"]).leaf)
        abandoned = client.new_order(dns_ids("lapsed.test"), {"replaces": cert_id})
        assert abandoned.status_code == 201, abandoned.get_data(as_text=True)
        assert_problem(
            client.new_order(dns_ids("lapsed.test"), {"replaces": cert_id}), "alreadyReplaced", 409
        )
        clock.advance(datetime.timedelta(hours=25))
        assert client.get(abandoned.headers["Location"]).get_json()["status"] == "invalid"
        second = issue(srv, client, ["lapsed.test"], {"replaces": cert_id})
        assert second.order["replaces"] == cert_id


@sqlite_only
def test_replaces_naming_another_accounts_certificate_is_refused(server: Server) -> None:
    owner, stranger = server.account(), server.account()
    issued = issue(server, owner, ["victim.test"])
    with unchanged(server.storage):
        # RFC 9773 §5: the server SHOULD check that the replaced certificate belongs to the
        # ordering account. Listing its names in a new, unvalidated order proves nothing;
        # accepting it lets a stranger claim (and, with alreadyReplaced, block) the renewal.
        response = stranger.new_order(
            dns_ids("victim.test"), {"replaces": ari_cert_id(issued.leaf)}
        )
        assert_problem(response, "unauthorized", 403)


@sqlite_only
def test_replaces_with_no_identifier_in_common_is_refused(server: Server) -> None:
    client = server.account()
    issued = issue(server, client, ["old-name.test"])
    with unchanged(server.storage):
        # RFC 9773 §5: the order and the replaced certificate SHOULD share an identifier;
        # Boulder answers malformed when they do not.
        response = client.new_order(
            dns_ids("unrelated.test"), {"replaces": ari_cert_id(issued.leaf)}
        )
        assert_problem(response, "malformed", 400)


# -- bad JWS (RFC 8555 §6.2-6.5) ----------------------------------------------------------------


def hs256(data: bytes) -> bytes:
    return hmac.new(b"a shared secret", data, hashlib.sha256).digest()


@sqlite_only
@pytest.mark.parametrize(
    ("alg", "sign"),
    [("none", lambda _data: b""), ("HS256", hs256), ("ES999", None)],
    ids=["none", "HS256", "unknown"],
)
def test_bad_signature_algorithm(
    server: Server, alg: str, sign: Callable[[bytes], bytes] | None
) -> None:
    client = server.client()
    with unchanged(server.storage):
        response = client.new_account(header={"alg": alg}, sign=sign)
        body = assert_problem(response, "badSignatureAlgorithm", 400)
    assert set(body["algorithms"]) == ALGORITHMS


@sqlite_only
def test_jwk_and_kid_together_is_malformed(server: Server) -> None:
    client = server.account()
    with unchanged(server.storage):
        response = client.new_order(dns_ids("both.test"), header={"jwk": client.key.jwk})
        assert_problem(response, "malformed", 400)


@sqlite_only
def test_neither_jwk_nor_kid_is_malformed(server: Server) -> None:
    client = server.account()
    with unchanged(server.storage):
        response = client.new_order(dns_ids("neither.test"), header={"kid": OMIT})
        assert_problem(response, "malformed", 400)


@sqlite_only
def test_jwk_where_kid_is_required_is_malformed(server: Server) -> None:
    client = server.account()
    with unchanged(server.storage):
        response = client.new_order(dns_ids("jwk.test"), use_jwk=True)
        assert_problem(response, "malformed", 400)


@sqlite_only
def test_unprotected_header_is_malformed(server: Server) -> None:
    client = server.account()
    with unchanged(server.storage):
        response = client.new_order(
            dns_ids("unprotected.test"), extra={"header": {"alg": client.key.alg}}
        )
        assert_problem(response, "malformed", 400)


@sqlite_only
@pytest.mark.parametrize("breakage", ["reused", "missing", "malformed", "unknown"])
def test_bad_nonce_answers_bad_nonce_and_a_fresh_usable_nonce(
    server: Server, breakage: str
) -> None:
    client = server.account()
    url = client.url("newOrder")
    payload = {"identifiers": dns_ids("nonce.test")}
    header: dict[str, Any] = {}
    if breakage == "reused":
        used = client.nonce()
        assert (
            client.post(client.account_url or "", None, header={"nonce": used}).status_code == 200
        )
        header = {"nonce": used}
    elif breakage == "missing":
        header = {"nonce": OMIT}
    elif breakage == "malformed":
        header = {"nonce": "not base64url!"}
    else:
        header = {"nonce": b64url(b"never issued by the server")}
    body = client.signed_body(url, payload, header=header)
    with unchanged(server.storage):
        response = client.post_raw(url, body)
        sent = header["nonce"] if isinstance(header["nonce"], str) else None
        assert_problem(response, "badNonce", 400, sent_nonce=sent)
    # §6.5: the nonce that came with the problem is good for the retry.
    retry = client.post(url, payload, header={"nonce": response.headers["Replay-Nonce"]})
    assert retry.status_code == 201, retry.get_data(as_text=True)


@sqlite_only
def test_url_mismatch_is_unauthorized(server: Server) -> None:
    client = server.account()
    with unchanged(server.storage):
        # Signed for another resource, sent to newOrder: §6.4 says the url must match.
        assert client.account_url is not None
        response = client.post(
            client.account_url, {"identifiers": dns_ids("url.test")}, to=client.url("newOrder")
        )
        assert_problem(response, "unauthorized", 403)


@sqlite_only
@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_wrong_content_type_is_415(server: Server, content_type: str) -> None:
    client = server.account()
    with unchanged(server.storage):
        response = client.new_order(dns_ids("ctype.test"), content_type=content_type)
        assert_problem(response, "malformed", 415)


@sqlite_only
@pytest.mark.parametrize("kid", [f"{ACME}/acct/987654", "https://elsewhere.test/acct/1"])
def test_unknown_account_is_account_does_not_exist(server: Server, kid: str) -> None:
    client = server.client()
    client.account_url = kid
    with unchanged(server.storage):
        response = client.new_order(dns_ids("ghost.test"))
        assert_problem(response, "accountDoesNotExist", 400)
    failed = server.storage.audit_events(1)[0]  # a failed authentication is on record
    assert (failed["action"], failed["subject"], failed["outcome"]) == (
        "acme.authenticate",
        kid,
        "refused",
    )


@sqlite_only
def test_a_bad_signature_is_malformed(server: Server) -> None:
    client = server.account()
    impostor = AccountKey.ec_p256()
    nonce = client.nonce()
    with unchanged(server.storage):
        response = client.new_order(
            dns_ids("sig.test"), sign=impostor.sign, header={"nonce": nonce}
        )
        assert_problem(response, "malformed", 400, sent_nonce=nonce)
    failed = server.storage.audit_events(1)[0]
    assert (failed["action"], failed["subject"], failed["outcome"]) == (
        "acme.authenticate",
        client.account_url,
        "refused",
    )
    # A request nobody signed must not even spend the nonce it carried.
    retry = client.new_order(dns_ids("sig.test"), header={"nonce": nonce})
    assert retry.status_code == 201, retry.get_data(as_text=True)


@sqlite_only
def test_an_rsa_1024_account_key_is_bad_public_key(server: Server) -> None:
    client = server.client(AccountKey.rsa(1024))
    with unchanged(server.storage):
        assert_problem(client.new_account(), "badPublicKey", 400)


@sqlite_only
@pytest.mark.parametrize(
    ("contact", "error"),
    [
        (["tel:+15551234567"], "unsupportedContact"),
        (["mailto:"], "invalidContact"),
        (["mailto:a@b.test,c@d.test"], "invalidContact"),
        ("mailto:ops@example.test", "malformed"),
    ],
)
def test_new_account_with_a_bad_contact(server: Server, contact: Any, error: str) -> None:
    client = server.client()
    with unchanged(server.storage):
        assert_problem(client.new_account({"contact": contact}), error, 400)


@sqlite_only
def test_a_one_megabyte_body_is_413(server: Server) -> None:
    client = server.account()
    url = client.url("newOrder")
    body = client.signed_body(url, {"identifiers": dns_ids("big.test"), "pad": "x" * 1_000_000})
    assert len(body) > 1_000_000
    with unchanged(server.storage):
        assert_problem(client.post_raw(url, body), "malformed", 413)


@sqlite_only
@pytest.mark.parametrize(
    "path", ["/acme/acct/not-a-number", "/acme/no-such-resource", "/acme/cert/ab/cd/ef"]
)
def test_an_unknown_acme_url_is_a_404_problem(server: Server, path: str) -> None:
    client = server.account()
    with unchanged(server.storage):
        response = client.post(f"{BASE}{path}", None)
        assert_problem(response, "malformed", 404)


@sqlite_only
@pytest.mark.parametrize(
    ("cert_id", "status"),
    [
        ("no-dot-here", 400),
        ("a.b.c", 400),
        ("!!.!!", 400),
        ("AAAA.AQ", 404),
        ("AAAA.AAE", 400),  # serial 1 with a leading zero octet: not its DER content octets
        ("AAAA.AQ==", 400),  # padded
        (f"{'A' * 87}.AQ", 400),  # a 65-octet key identifier
    ],
)
def test_renewal_info_for_a_bad_or_unknown_certificate_id(
    server: Server, cert_id: str, status: int
) -> None:
    client = server.client()
    response = server.http.get(f"{client.url('renewalInfo')}/{cert_id}")
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    assert response.get_json()["type"] == ERROR + "malformed"


@sqlite_only
@pytest.mark.parametrize("resource", ["newOrder", "newAccount", "order", "account"])
def test_plain_get_on_a_post_only_resource_is_405(server: Server, resource: str) -> None:
    client = server.account()
    response = client.new_order(dns_ids("get.test"))
    urls = {
        "newOrder": client.url("newOrder"),
        "newAccount": client.url("newAccount"),
        "order": response.headers["Location"],
        "account": client.account_url,
    }
    with unchanged(server.storage):
        got = server.http.get(urls[resource])
        assert_problem(got, "malformed", 405)
        assert "POST" in got.headers["Allow"]
        assert "identifiers" not in got.get_data(as_text=True)


# -- bad orders (RFC 8555 §7.4, RFC 8738) -------------------------------------------------------


@sqlite_only
@pytest.mark.parametrize(
    ("identifier", "errors"),
    [
        # A syntactically broken name: Boulder and Pebble say malformed, a policy refusal says
        # rejectedIdentifier; either is an RFC 8555 §6.7 answer, a 201 or a 500 is not.
        ({"type": "dns", "value": "bad..name.test"}, {"malformed", "rejectedIdentifier"}),
        ({"type": "dns", "value": "xn--zz.test"}, {"malformed", "rejectedIdentifier"}),
        ({"type": "dns", "value": "www.example.com"}, {"rejectedIdentifier"}),
        ({"type": "ip", "value": "8.8.8.8"}, {"rejectedIdentifier"}),
        ({"type": "email", "value": "a@b.test"}, {"unsupportedIdentifier"}),
    ],
    ids=["empty-label", "bad-punycode", "outside-policy", "ip-outside-policy", "email"],
)
def test_new_order_with_a_refused_identifier(
    server: Server, identifier: dict[str, str], errors: set[str]
) -> None:
    client = server.account()
    with unchanged(server.storage):
        response = client.new_order([identifier])
        assert response.status_code == 400, response.get_data(as_text=True)
        body = response.get_json()
        assert body["type"].removeprefix(ERROR) in errors, body
        assert_problem(response, body["type"].removeprefix(ERROR), 400)


@sqlite_only
def test_one_bad_name_among_good_ones_refuses_the_whole_order(server: Server) -> None:
    client = server.account()
    with unchanged(server.storage):
        response = client.new_order(dns_ids("ok.test", "www.example.com") + ip_ids("8.8.8.8"))
        body = assert_problem(response, "rejectedIdentifier", 400)
    # §6.7.1: one subproblem per refused identifier, each naming it.
    refused = {(s["identifier"]["type"], s["identifier"]["value"]) for s in body["subproblems"]}
    assert refused == {("dns", "www.example.com"), ("ip", "8.8.8.8")}


@sqlite_only
def test_finalize_before_ready_is_order_not_ready(server: Server) -> None:
    client = server.account()
    response = client.new_order(dns_ids("early.test"))
    assert response.status_code == 201
    order = response.get_json()
    with unchanged(server.storage):
        _, finalized = finalize(client, order, ["early.test"])
        assert_problem(finalized, "orderNotReady", 403)


# -- bad CSRs at finalize: badCSR, and the order stays ready ------------------------------------


def csr_other_names(client: AcmeClient) -> bytes:
    return csr_der(ec.generate_private_key(ec.SECP256R1()), ["csr.test", "extra.test"])


def csr_other_common_name(client: AcmeClient) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return csr_der(key, ["csr.test"], common_name="sneaky.test")


def csr_weak_key(client: AcmeClient) -> bytes:
    # The weak key is the point: the CA must refuse it.
    return csr_der(rsa.generate_private_key(65537, 1024), ["csr.test"])  # noqa: S505


def csr_bad_signature(client: AcmeClient) -> bytes:
    # RSA: flipping the last octet of the signature keeps the DER valid but the signature not.
    der = bytearray(csr_der(rsa.generate_private_key(65537, 2048), ["csr.test"]))
    der[-1] ^= 0x01
    return bytes(der)


def csr_account_key(client: AcmeClient) -> bytes:
    assert isinstance(client.key.private, ec.EllipticCurvePrivateKey)
    return csr_der(client.key.private, ["csr.test"])


@sqlite_only
@pytest.mark.parametrize(
    "make_csr",
    [csr_other_names, csr_other_common_name, csr_weak_key, csr_bad_signature, csr_account_key],
    ids=["other-names", "other-cn", "rsa-1024", "bad-signature", "account-key"],
)
def test_bad_csr_is_refused_and_the_order_stays_ready(
    server: Server, make_csr: Callable[[AcmeClient], bytes]
) -> None:
    client = server.account()
    order_url, order = ready_order(server, client, dns_ids("csr.test"))
    with unchanged(server.storage):
        response = client.post(order["finalize"], {"csr": b64url(make_csr(client))})
        assert_problem(response, "badCSR", 400)
    assert client.get(order_url).get_json()["status"] == "ready"


# -- other accounts' objects ----------------------------------------------------------------------


@sqlite_only
def test_another_accounts_objects_are_not_found_and_not_shown(server: Server) -> None:
    owner, intruder = server.account(), server.account()
    issued = issue(server, owner, ["private.test"])
    pending = owner.new_order(dns_ids("pending.test"))
    pending_order = pending.get_json()
    authz_url = pending_order["authorizations"][0]
    challenge_url = owner.get(authz_url).get_json()["challenges"][0]["url"]
    attempts = [
        (issued.order_url, None),
        (pending.headers["Location"], None),
        (authz_url, None),
        (authz_url, {"status": "deactivated"}),
        (challenge_url, None),
        (challenge_url, {}),
        (issued.order["certificate"], None),
        (pending_order["finalize"], {"csr": b64url(csr_der(issued.key, ["pending.test"]))}),
        (owner.account_url, None),
        (f"{owner.account_url}/orders", None),
    ]
    with unchanged(server.storage):
        for url, payload in attempts:
            response = intruder.post(url, payload)
            assert response.status_code in (403, 404), (url, response.status_code)
            text = response.get_data(as_text=True)
            body = assert_problem(
                response, json.loads(text)["type"].removeprefix(ERROR), response.status_code
            )
            assert body["type"] in (ERROR + "malformed", ERROR + "unauthorized"), (url, body)
            for secret in ("private.test", "pending.test", "BEGIN CERTIFICATE", "mailto:"):
                assert secret not in text, (url, text)


# -- revocation (RFC 8555 §7.6) -------------------------------------------------------------------


@sqlite_only
def test_revoking_twice_is_already_revoked(server: Server) -> None:
    client = server.account()
    issued = issue(server, client, ["twice-revoked.test"])
    url = client.url("revokeCert")
    assert client.post(url, revoke_payload(issued.leaf, 4)).status_code == 200
    with unchanged(server.storage):
        assert_problem(client.post(url, revoke_payload(issued.leaf, 4)), "alreadyRevoked", 400)


@sqlite_only
@pytest.mark.parametrize("reason", [7, 2, 8, -1, "1", True])
def test_revocation_with_a_reason_subscribers_may_not_give(server: Server, reason: Any) -> None:
    client = server.account()
    issued = issue(server, client, ["reason.test"])
    with unchanged(server.storage):
        response = client.post(client.url("revokeCert"), revoke_payload(issued.leaf, reason))
        assert_problem(response, "badRevocationReason", 400)
    assert certificate_status(server.storage, issued.leaf) == "issued"


@sqlite_only
def test_revocation_by_an_unrelated_account_is_unauthorized(server: Server) -> None:
    owner, stranger = server.account(), server.account()
    issued = issue(server, owner, ["mine.test"])
    with unchanged(server.storage):
        response = stranger.post(stranger.url("revokeCert"), revoke_payload(issued.leaf))
        assert_problem(response, "unauthorized", 403)


@sqlite_only
def test_revocation_signed_with_the_certificate_key(server: Server) -> None:
    owner = server.account()
    issued = issue(server, owner, ["own-key.test"])
    holder = server.client(AccountKey(issued.key, "ES256"))
    response = holder.post(holder.url("revokeCert"), revoke_payload(issued.leaf, 1), use_jwk=True)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert certificate_status(server.storage, issued.leaf) == "revoked"


# -- rate limits (shared: they are counts of database rows) -----------------------------------


LimitedServer = Callable[..., contextlib.AbstractContextManager[Server]]


@pytest.fixture
def limited_server(
    storage: Storage,
    pki: SessionPKI,
    tmp_path: Path,
    dns: ChallTestSrv,
    responder: ChallengeResponder,
    monkeypatch: pytest.MonkeyPatch,
) -> LimitedServer:
    """A second app on the same database with some [acme] rate limits set."""
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)

    def start(**limits: Any) -> contextlib.AbstractContextManager[Server]:
        return running_server(storage, tmp_path, dns, responder, name="limited", **limits)

    return start


def assert_rate_limited(response: TestResponse) -> None:
    assert_problem(response, "rateLimited", 429)
    assert int(response.headers["Retry-After"]) > 0


@sqlite_only
def test_new_orders_per_account_per_hour_are_limited(
    storage: Storage, limited_server: LimitedServer
) -> None:
    with limited_server(orders_per_account_per_hour=2) as srv:
        client = srv.account()
        for name in ("o1.test", "o2.test"):
            assert client.new_order(dns_ids(name)).status_code == 201
        with unchanged(storage):
            assert_rate_limited(client.new_order(dns_ids("o3.test")))
        # Another account has its own budget.
        assert srv.account().new_order(dns_ids("o3.test")).status_code == 201


@sqlite_only
def test_new_accounts_per_ip_per_hour_are_limited(
    storage: Storage, limited_server: LimitedServer
) -> None:
    with limited_server(accounts_per_ip_per_hour=1) as srv:
        srv.account()
        with unchanged(storage):
            assert_rate_limited(srv.client().new_account())


@sqlite_only
def test_failed_validations_per_account_and_name_are_limited(
    storage: Storage, limited_server: LimitedServer
) -> None:
    with limited_server(failed_validations_per_account_per_hour=1) as srv:
        client = srv.account()

        def try_http01() -> TestResponse:
            order = client.new_order(dns_ids("fails.test")).get_json()
            authz = client.get(order["authorizations"][0]).get_json()
            challenge = next(c for c in authz["challenges"] if c["type"] == "http-01")
            # No key authorization published: the responder answers 404.
            return client.post(challenge["url"], {})

        first = try_http01().get_json()
        assert first["status"] == "invalid"
        assert first["error"]["type"] == ERROR + "unauthorized"
        assert_rate_limited(try_http01())


@sqlite_only
def test_certificates_per_domain_per_week_are_limited(
    storage: Storage, limited_server: LimitedServer
) -> None:
    with limited_server(certificates_per_domain_per_week=1) as srv:
        client = srv.account()
        # Orders opened before the limit is reached are held to it at finalize.
        _, early = ready_order(srv, client, dns_ids("c.limited.test"))
        issue(srv, client, ["a.limited.test"])
        with unchanged(storage):
            assert_rate_limited(client.new_order(dns_ids("b.limited.test")))
            assert_rate_limited(finalize(client, early, ["c.limited.test"])[1])
        assert client.new_order(dns_ids("other-domain.test")).status_code == 201


# -- CAA (RFC 8659) -----------------------------------------------------------------------------


@sqlite_only
def test_caa_naming_another_ca_makes_validation_invalid(server: Server, dns: ChallTestSrv) -> None:
    dns._post(
        "/add-caa",
        {"host": "caa-blocked.test.", "policies": [{"tag": "issue", "value": "other-ca.example"}]},
    )
    client = server.account()
    order = client.new_order(dns_ids("www.caa-blocked.test")).get_json()
    authz = client.get(order["authorizations"][0]).get_json()
    challenge = next(c for c in authz["challenges"] if c["type"] == "http-01")
    token = challenge["token"]
    server.responder.key_authorizations[token] = client.key.key_authorization(token)
    result = client.post(challenge["url"], {}).get_json()
    assert result["status"] == "invalid", result
    assert result["error"]["type"] == ERROR + "caa"
    assert client.get(order_url_of(client, order)).get_json()["status"] == "invalid"


@sqlite_only
def test_caa_naming_us_allows_issuance(server: Server, dns: ChallTestSrv) -> None:
    dns._post(
        "/add-caa",
        {"host": "caa-ok.test.", "policies": [{"tag": "issue", "value": "certwright.internal"}]},
    )
    client = server.account()
    issued = issue(server, client, ["www.caa-ok.test"])
    assert issued.order["status"] == "valid"


@sqlite_only
def test_caa_is_rechecked_at_finalize_when_the_validation_is_old(
    server: Server, dns: ChallTestSrv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BR 3.2.2.8 via RFC 8555: a validation older than CAA_RECHECK_AFTER (8 hours) has its CAA
    looked up again at finalize; a younger one stands on the lookup made when it was validated."""
    import acme.service

    client = server.account()
    recent_url, recent = ready_order(server, client, dns_ids("www.recheck-young.test"))
    old_url, old = ready_order(server, client, dns_ids("www.recheck-old.test"))
    for host in ("recheck-young.test.", "recheck-old.test."):
        dns._post("/add-caa", {"host": host, "policies": [{"tag": "issue", "value": "ca.other"}]})

    # Validated moments ago: no lookup at finalize, the certificate is issued.
    _, response = finalize(client, recent, ["www.recheck-young.test"])
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["status"] == "valid"

    # The same, once every validation counts as old: CAA now forbids us, and the order stays
    # ready (nothing was reserved), so the client may finalize again once CAA allows it.
    monkeypatch.setattr(acme.service, "CAA_RECHECK_AFTER", datetime.timedelta(0))
    _, response = finalize(client, old, ["www.recheck-old.test"])
    assert response.status_code == 403, response.get_data(as_text=True)
    problem = response.get_json()
    assert problem["type"] == ERROR + "caa"
    assert problem["identifier"] == {"type": "dns", "value": "www.recheck-old.test"}
    assert client.get(old_url).get_json()["status"] == "ready"
    dns._post("/clear-caa", {"host": "recheck-old.test."})
    _, response = finalize(client, old, ["www.recheck-old.test"])
    assert response.status_code == 200, response.get_data(as_text=True)
    assert client.get(recent_url).get_json()["status"] == "valid"


def order_url_of(client: AcmeClient, order: dict[str, Any]) -> str:
    """The order URL, from its finalize URL (…/order/<id>/finalize)."""
    return str(order["finalize"]).removesuffix("/finalize")


@sqlite_only
def test_an_order_left_processing_by_a_dead_finalize_is_ready_again(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that died (or lost its database) mid-finalize leaves the order `processing`;
    the jobs' upkeep reopens it after STALE_ORDER_AFTER, and the client finalizes it again."""
    import acme.jobs
    import acme.service

    client = server.account()
    order_url, order = ready_order(server, client, dns_ids("stale.test"))
    order_id = order_url.rsplit("/", 1)[1]
    store = AcmeStore(server.storage)
    assert store.begin_finalize(order_id)  # the finalize that never finished
    assert client.get(order_url).get_json()["status"] == "processing"

    acme.jobs.run(server.runtime)  # not stale yet: left alone
    assert client.get(order_url).get_json()["status"] == "processing"

    monkeypatch.setattr(acme.service, "STALE_ORDER_AFTER", datetime.timedelta(0))
    acme.jobs.run(server.runtime)
    assert client.get(order_url).get_json()["status"] == "ready"
    _, response = finalize(client, order, ["stale.test"])
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["status"] == "valid"
