"""More of the ACME server spoken to raw: ARI windows and identifiers (RFC 9773), `replaces`
spellings, profiles, CAA parameters (RFC 8657) and the finalize-time CAA recheck at its real
threshold, rate limits shared by two processes, the plain-HTTP listener's issuer certificates,
and a chunked oversized body.

The rig (a real Runtime on the session's SoftHSM token, validation through pebble-challtestsrv
to a loopback http-01 responder) is tests/integration/test_acme_protocol.py's; its fixtures are
imported by name so pytest finds them here.
"""

from __future__ import annotations

import datetime
import io
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from werkzeug.test import EnvironBuilder, TestResponse
from werkzeug.wrappers import Request

from ca.clock import FakeClock
from ca.storage import Storage
from ca.web import create_app
from tests.conftest import ONLINE_PIN, SessionPKI
from tests.integration import test_acme_protocol as protocol
from tests.integration.acme_client import (
    ERROR,
    JOSE,
    AcmeClient,
    b64url,
    dns_ids,
)
from tests.integration.acme_harness import ChallTestSrv
from tests.integration.test_acme_protocol import (
    BASE,
    ChallengeResponder,
    LimitedServer,
    Server,
    ari_cert_id,
    assert_problem,
    finalize,
    issue,
    parse_time,
    ready_order,
    running_server,
    sqlite_only,
    unchanged,
)

pytestmark = pytest.mark.integration

# The rig's fixtures, found by pytest under these names in this module too.
dns = protocol.dns
responder = protocol.responder
server = protocol.server
limited_server = protocol.limited_server

HTTP_BASE = "http://ca.test:8080"  # the plain-HTTP listener's public base URL in the rig


def start_clock() -> FakeClock:
    return FakeClock(datetime.datetime.now(datetime.UTC).replace(microsecond=0))


def der_serial(certificate: x509.Certificate) -> bytes:
    """The content octets of the DER INTEGER serial (a leading 0 when the high bit is set)."""
    serial = certificate.serial_number
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big")


def aki_of(certificate: x509.Certificate) -> bytes:
    aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    return aki.key_identifier


def padded_cert_id(certificate: x509.Certificate) -> str:
    """The certificate's ARI id with one extra leading zero octet in the serial: the same
    integer, but not its DER encoding (X.690 §8.3.2), so no certificate's RFC 9773 §4.1 id."""
    padded = bytes(1) + der_serial(certificate)
    return f"{b64url(aki_of(certificate))}.{b64url(padded)}"


def other_aki_cert_id(certificate: x509.Certificate, pki: SessionPKI) -> str:
    """The certificate's serial under the key identifier of another of our intermediates."""
    own = aki_of(certificate)
    other = next(
        bytes.fromhex(i.ski)
        for i in pki.issuers
        if i.kind == "intermediate" and bytes.fromhex(i.ski) != own
    )
    return f"{b64url(other)}.{b64url(der_serial(certificate))}"


def renewal_info(server: Server, client: AcmeClient, cert_id: str) -> TestResponse:
    return server.http.get(f"{client.url('renewalInfo')}/{cert_id}")


def window_of(response: TestResponse) -> tuple[datetime.datetime, datetime.datetime]:
    assert response.status_code == 200, response.get_data(as_text=True)
    window = response.get_json()["suggestedWindow"]
    return parse_time(window["start"]), parse_time(window["end"])


def close_to(actual: datetime.datetime, expected: datetime.datetime) -> bool:
    return abs(actual - expected) <= datetime.timedelta(seconds=1)


# -- 1-3: ARI renewalInfo (RFC 9773 §4) -----------------------------------------------------------


@sqlite_only
def test_renewal_info_for_a_fresh_certificate_is_its_last_third(server: Server) -> None:
    client = server.account()
    issued = issue(server, client, ["ari-window.test"])
    response = renewal_info(server, client, ari_cert_id(issued.leaf))
    start, end = window_of(response)
    assert response.mimetype == "application/json"
    # §4.3: the server tells the client when to ask again.
    assert int(response.headers["Retry-After"]) > 0

    not_before = issued.leaf.not_valid_before_utc
    not_after = issued.leaf.not_valid_after_utc
    assert not_before < start < end < not_after
    # acme/service.py renewal_info: from 2/3 to 5/6 of the lifetime.
    lifetime = not_after - not_before
    assert close_to(start, not_before + lifetime * 2 / 3), (start, lifetime)
    assert close_to(end, not_before + lifetime * 5 / 6), (end, lifetime)


@sqlite_only
def test_renewal_info_asks_for_renewal_now_when_the_issuer_is_retired(
    storage: Storage,
    pki: SessionPKI,
    tmp_path: Path,
    dns: ChallTestSrv,
    responder: ChallengeResponder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An issuer leaving service (status `retired`: the only state besides active and revoked,
    ca/storage/models.py) moves its certificates' windows to now, before the normal one."""
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
    clock = start_clock()
    with running_server(storage, tmp_path, dns, responder, clock=clock) as srv:
        client = srv.account()
        issued = issue(srv, client, ["ari-retired.test"])
        url_id = ari_cert_id(issued.leaf)
        normal_start, normal_end = window_of(renewal_info(srv, client, url_id))
        issuer_id = storage.get_certificate(format(issued.leaf.serial_number, "x")).issuer_id
        assert issuer_id == "issuing-ec"

        clock.advance(datetime.timedelta(days=1))
        storage.set_issuer_status(issuer_id, "retired", "tests")
        try:
            response = renewal_info(srv, client, url_id)
            start, end = window_of(response)
            assert int(response.headers["Retry-After"]) > 0
        finally:
            storage.set_issuer_status(issuer_id, "active", "tests")
        now = clock.now()
        lifetime = issued.leaf.not_valid_after_utc - issued.leaf.not_valid_before_utc
        assert start <= now < end
        assert close_to(start, now)
        assert close_to(end, now + min(lifetime / 10, datetime.timedelta(days=2)))
        assert end < normal_start
        # Active again: the normal window is back.
        assert window_of(renewal_info(srv, client, url_id)) == (normal_start, normal_end)


@sqlite_only
def test_renewal_info_asks_for_renewal_at_once_when_the_issuer_is_revoked(server: Server) -> None:
    """A revoked intermediate makes its certificates useless: a window in the past (§4.2)."""
    client = server.account()
    issued = issue(server, client, ["ari-issuer-revoked.test"])
    url_id = ari_cert_id(issued.leaf)
    issuer_id = server.storage.get_certificate(format(issued.leaf.serial_number, "x")).issuer_id
    server.storage.revoke_issuer(issuer_id, 1, "tests")  # keyCompromise; this test's database
    start, end = window_of(renewal_info(server, client, url_id))
    assert start < end < datetime.datetime.now(datetime.UTC)


@sqlite_only
def test_renewal_info_for_a_known_serial_under_another_issuers_aki_is_404(
    server: Server, pki: SessionPKI
) -> None:
    client = server.account()
    issued = issue(server, client, ["ari-aki.test"])
    assert renewal_info(server, client, ari_cert_id(issued.leaf)).status_code == 200
    with unchanged(server.storage):
        response = renewal_info(server, client, other_aki_cert_id(issued.leaf, pki))
        # RFC 9773 §4: an id naming no certificate of ours is not found.
        assert_problem(response, "malformed", 404)


@sqlite_only
def test_renewal_info_for_a_serial_with_an_extra_leading_zero_is_refused(server: Server) -> None:
    """RFC 9773 §4.1: the id carries the serial's DER content octets. b"\\x00" + those octets
    is no DER INTEGER (X.690 §8.3.2), so it names no certificate: not found (or malformed),
    never the certificate whose serial has the same value."""
    client = server.account()
    issued = issue(server, client, ["ari-padded.test"])
    response = renewal_info(server, client, padded_cert_id(issued.leaf))
    assert response.status_code in (400, 404), (
        f"{response.status_code}: {response.get_data(as_text=True)}"
    )
    assert_problem(response, "malformed", response.status_code)


# -- 4: `replaces` (RFC 9773 §5) ------------------------------------------------------------------


@sqlite_only
def test_replaces_with_a_serial_under_another_issuers_aki_is_refused(
    server: Server, pki: SessionPKI
) -> None:
    """The id's AKI is part of what names the certificate (renewalInfo answers 404 for it):
    an order must not claim to replace a certificate of ours through an id that is not its."""
    client = server.account()
    issued = issue(server, client, ["replace-aki.test"])
    with unchanged(server.storage):
        response = client.new_order(
            dns_ids("replace-aki.test"), {"replaces": other_aki_cert_id(issued.leaf, pki)}
        )
        # The server's own answer for a `replaces` naming no certificate of ours.
        assert_problem(response, "malformed", 400)


@sqlite_only
def test_replaces_spelling_the_same_serial_differently_is_already_replaced(
    server: Server,
) -> None:
    """RFC 9773 §5: one live order per replaced certificate; a second id spelling for the same
    certificate (an extra leading zero octet) must not open a second live replacing order."""
    client = server.account()
    issued = issue(server, client, ["replace-twice.test"])
    first = client.new_order(dns_ids("replace-twice.test"), {"replaces": ari_cert_id(issued.leaf)})
    assert first.status_code == 201, first.get_data(as_text=True)
    with unchanged(server.storage):
        again = client.new_order(
            dns_ids("replace-twice.test"), {"replaces": padded_cert_id(issued.leaf)}
        )
        text = again.get_data(as_text=True)
        # 409 alreadyReplaced (§5), or malformed 400 if the spelling itself is refused.
        assert again.status_code in (409, 400), f"{again.status_code}: {text}"
        expected = "alreadyReplaced" if again.status_code == 409 else "malformed"
        assert_problem(again, expected, again.status_code)


# -- 5: profiles ----------------------------------------------------------------------------------


@sqlite_only
def test_a_tls_client_order_issues_a_client_auth_only_certificate(server: Server) -> None:
    client = server.account()
    assert "tls-client" in client.directory["meta"]["profiles"]
    response = client.new_order(dns_ids("mtls.test"), {"profile": "tls-client"})
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["profile"] == "tls-client"

    issued = issue(server, client, ["mtls-leaf.test"], {"profile": "tls-client"})
    assert issued.order["profile"] == "tls-client"
    assert client.get(issued.order_url).get_json()["profile"] == "tls-client"
    ekus = list(issued.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in ekus
    assert ExtendedKeyUsageOID.SERVER_AUTH not in ekus


# -- 6: CAA parameters (RFC 8657) end to end ---------------------------------------------------


def answer_http01(server: Server, client: AcmeClient, name: str) -> tuple[str, dict[str, Any]]:
    """Order `name`, publish its http-01 key authorization and respond: (order URL, challenge)."""
    response = client.new_order(dns_ids(name))
    assert response.status_code == 201, response.get_data(as_text=True)
    authz = client.get(response.get_json()["authorizations"][0]).get_json()
    challenge = next(c for c in authz["challenges"] if c["type"] == "http-01")
    token = challenge["token"]
    server.responder.key_authorizations[token] = client.key.key_authorization(token)
    result = client.post(challenge["url"], {})
    assert result.status_code == 200, result.get_data(as_text=True)
    return response.headers["Location"], result.get_json()


@sqlite_only
@pytest.mark.parametrize(
    ("case", "valid"),
    [
        ("accounturi-self", True),
        ("accounturi-other", False),
        ("methods-dns01", False),
        ("methods-http01", True),
    ],
)
def test_caa_accounturi_and_validationmethods(
    server: Server,
    dns: ChallTestSrv,
    case: str,
    valid: bool,
) -> None:
    client, other = server.account(), server.account()
    identities = client.directory["meta"]["caaIdentities"]
    assert identities, "the directory names no CAA identity"
    ours = identities[0]
    value = {
        "accounturi-self": f"{ours}; accounturi={client.account_url}",
        "accounturi-other": f"{ours}; accounturi={other.account_url}",
        "methods-dns01": f"{ours}; validationmethods=dns-01",
        "methods-http01": f"{ours}; validationmethods=http-01",
    }[case]
    domain = f"caa-{case}.test"
    dns._post("/add-caa", {"host": f"{domain}.", "policies": [{"tag": "issue", "value": value}]})

    order_url, challenge = answer_http01(server, client, f"www.{domain}")
    if valid:
        assert challenge["status"] == "valid", challenge
        assert client.get(order_url).get_json()["status"] == "ready"
        return
    assert challenge["status"] == "invalid", challenge
    assert challenge["error"]["type"] == ERROR + "caa", challenge["error"]
    assert challenge["error"].get("status", 403) == 403
    assert client.get(order_url).get_json()["status"] == "invalid"


# -- 7: the CAA recheck at finalize, at the real 8-hour threshold ----------------------------------


@sqlite_only
def test_caa_is_rechecked_at_finalize_only_after_eight_hours(
    storage: Storage,
    pki: SessionPKI,
    tmp_path: Path,
    dns: ChallTestSrv,
    responder: ChallengeResponder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
    refuse = [{"tag": "issue", "value": "other-ca.example"}]
    clock = start_clock()
    with running_server(storage, tmp_path, dns, responder, clock=clock) as srv:
        client = srv.account()

        # Validated 7h59m ago: the lookup made at validation stands; no recheck.
        _, young = ready_order(srv, client, dns_ids("www.caa-7h59.test"))
        dns._post("/add-caa", {"host": "caa-7h59.test.", "policies": refuse})
        clock.advance(datetime.timedelta(hours=7, minutes=59))
        _, response = finalize(client, young, ["www.caa-7h59.test"])
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.get_json()["status"] == "valid"

        # Validated 8h01m ago: CAA is looked up again and now forbids us.
        old_url, old = ready_order(srv, client, dns_ids("www.caa-8h01.test"))
        dns._post("/add-caa", {"host": "caa-8h01.test.", "policies": refuse})
        clock.advance(datetime.timedelta(hours=8, minutes=1))
        with unchanged(storage):
            _, response = finalize(client, old, ["www.caa-8h01.test"])
            problem = assert_problem(response, "caa", 403)
        assert problem["identifier"] == {"type": "dns", "value": "www.caa-8h01.test"}
        assert client.get(old_url).get_json()["status"] == "ready"


# -- 8: rate limits are shared by every process on the database -----------------------------------


@sqlite_only
def test_orders_per_account_limit_is_shared_by_two_apps_on_one_database(
    storage: Storage,
    tmp_path: Path,
    dns: ChallTestSrv,
    responder: ChallengeResponder,
    limited_server: LimitedServer,
) -> None:
    limit = 2
    with (
        limited_server(orders_per_account_per_hour=limit) as first,
        running_server(
            storage, tmp_path, dns, responder, name="second", orders_per_account_per_hour=limit
        ) as second,
    ):
        on_first = first.account()
        for n in range(limit):
            response = on_first.new_order(dns_ids(f"shared-{n}.test"))
            assert response.status_code == 201, response.get_data(as_text=True)
        # The same account, through the other process.
        on_second = second.client(on_first.key)
        on_second.account_url = on_first.account_url
        with unchanged(storage):
            response = on_second.new_order(dns_ids("shared-next.test"))
            assert_problem(response, "rateLimited", 429)
        assert int(response.headers["Retry-After"]) > 0


# -- 9: the plain-HTTP listener -------------------------------------------------------------------


@sqlite_only
def test_the_http_app_serves_issuer_certificates_but_not_acme(
    server: Server, pki: SessionPKI
) -> None:
    http = create_app(server.runtime, "http").test_client()
    for record in pki.issuers:
        der = http.get(f"{HTTP_BASE}/certs/{record.id}.der")
        assert der.status_code == 200, (record.id, der.status_code)
        assert der.mimetype == "application/pkix-cert"
        assert der.data == record.cert_der == server.storage.get_issuer(record.id).cert_der
        pem = http.get(f"{HTTP_BASE}/certs/{record.id}.pem")
        assert pem.status_code == 200, (record.id, pem.status_code)
        loaded = x509.load_pem_x509_certificate(pem.data)
        assert loaded.public_bytes(serialization.Encoding.DER) == record.cert_der

    # A leaf's AIA caIssuers URL (RFC 5280 §4.2.2.1) answers with its issuer.
    client = server.account()
    leaf = issue(server, client, ["aia.test"]).leaf
    aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    ca_issuers = next(
        str(d.access_location.value)
        for d in aia
        if d.access_method == AuthorityInformationAccessOID.CA_ISSUERS
    )
    assert ca_issuers.startswith(f"{HTTP_BASE}/certs/"), ca_issuers
    fetched = http.get(ca_issuers)
    assert fetched.status_code == 200
    leaf.verify_directly_issued_by(x509.load_der_x509_certificate(fetched.data))

    assert http.get(f"{HTTP_BASE}/certs/no-such-issuer.der").status_code == 404
    assert http.get(f"{HTTP_BASE}/certs/no-such-issuer.pem").status_code == 404
    assert http.get(f"{HTTP_BASE}/certs/issuing-ec.txt").status_code == 404
    # RFC 8555 §6.1: ACME is HTTPS only; the directory is served on the HTTPS app alone.
    assert http.get(f"{HTTP_BASE}/acme/directory").status_code == 404
    assert server.http.get(f"{BASE}/acme/directory").status_code == 200


# -- 10: a chunked body with no Content-Length ----------------------------------------------------


class _Chunks(io.RawIOBase):
    """A request body arriving in pieces of unknown total length, like a chunked upload."""

    def __init__(self, data: bytes, piece: int = 8192) -> None:
        self._data = memoryview(data)
        self._piece = piece
        self.read_so_far = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._piece, len(self._data) - self.read_so_far)
        buffer[:n] = self._data[self.read_so_far : self.read_so_far + n]
        self.read_so_far += n
        return n


def post_chunked(server: Server, url: str, body: bytes) -> TestResponse:
    """POST `body` as a chunked upload: no Content-Length; the server terminates the stream
    (`wsgi.input_terminated`, as gunicorn and ca/server.py set it)."""
    path = url.removeprefix(BASE)
    environ = EnvironBuilder(
        path=path,
        base_url=BASE,
        method="POST",
        content_type=JOSE,
        headers=[("Transfer-Encoding", "chunked")],
    ).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input"] = io.BufferedReader(_Chunks(body))
    environ["wsgi.input_terminated"] = True
    return server.http.open(Request(environ))


@sqlite_only
def test_a_chunked_megabyte_without_content_length_is_413(server: Server) -> None:
    client = server.client()
    url = client.url("newAccount")
    # The rig carries a chunked body to the app: a small one creates the account.
    small = client.signed_body(url, {"termsOfServiceAgreed": True}, use_jwk=True)
    assert post_chunked(server, url, small).status_code == 201

    stranger = server.client()
    big = stranger.signed_body(
        url, {"termsOfServiceAgreed": True, "pad": "x" * 1_000_000}, use_jwk=True
    )
    assert len(big) > 1_000_000
    with unchanged(server.storage):
        response = post_chunked(server, url, big)
        assert_problem(response, "malformed", 413)
