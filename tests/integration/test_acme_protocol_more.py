"""More of the ACME server spoken to raw (RFC 8555, RFC 8738): Link headers, Retry-After,
terms of service, account updates, key-change refusals, revocation by authorization, offered
challenge types, 405s, the HMAC nonces, stale-challenge recovery and where dns-01 looks.

The rig (the real app over a real Runtime, pebble-challtestsrv, the http-01 responder) is
test_acme_protocol's; its fixtures are imported by name so pytest finds them here. Like the
bad inputs there, everything here runs on SQLite only.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import TestResponse

from ca.clock import FakeClock
from ca.storage import Storage
from ca.storage.acme_store import AcmeStore
from tests.conftest import ONLINE_PIN, SessionPKI
from tests.integration.acme_client import (
    ERROR,
    AccountKey,
    AcmeClient,
    dns_ids,
    flattened_jws,
    ip_ids,
)
from tests.integration.acme_harness import ChallTestSrv
from tests.integration.test_acme_protocol import (
    ACME,
    ChallengeResponder,
    LimitedServer,
    Server,
    assert_problem,
    certificate_status,
    dns,
    finalize,
    issue,
    limited_server,
    ready_order,
    responder,
    revoke_payload,
    running_server,
    server,
    snapshot,
    sqlite_only,
    unchanged,
)

# The rig's fixtures, imported so that pytest finds them in this module too.
__all__ = ["dns", "limited_server", "responder", "server"]

pytestmark = pytest.mark.integration

DIRECTORY = f"{ACME}/directory"


def links(response: TestResponse) -> set[tuple[str, str]]:
    """The (target, rel) pairs of every Link header (RFC 8288; no commas in our URLs)."""
    found: set[tuple[str, str]] = set()
    for value in response.headers.getlist("Link"):
        for part in value.split(","):
            match = re.fullmatch(r'\s*<([^>]*)>\s*;\s*rel="?([^";]+)"?\s*', part)
            assert match, f"unparsable Link header {value!r}"
            found.add((match[1], match[2]))
    return found


def pending_challenge(
    client: AcmeClient, name: str, kind: str = "http-01"
) -> tuple[str, str, dict[str, Any]]:
    """A new order for `name`: (order URL, authorization URL, its `kind` challenge)."""
    response = client.new_order(dns_ids(name))
    assert response.status_code == 201, response.get_data(as_text=True)
    authz_url = response.get_json()["authorizations"][0]
    authz = client.get(authz_url).get_json()
    challenge = next(c for c in authz["challenges"] if c["type"] == kind)
    return response.headers["Location"], authz_url, challenge


def retry_after(response: TestResponse) -> int:
    value = response.headers.get("Retry-After")
    assert value is not None, f"no Retry-After on {response.status_code}"
    seconds = int(value)
    assert seconds > 0
    return seconds


# -- 1. Link headers (RFC 8555 §7.1, §7.5.1) ----------------------------------------------------


@sqlite_only
def test_responses_link_the_directory_and_a_challenge_links_up_to_its_authorization(
    server: Server,
) -> None:
    client = server.client()
    index = (DIRECTORY, "index")
    # §7.1: the "index" link relation, to the directory, is on every resource but the
    # directory: nonces, created objects and problem documents alike.
    for nonce in (
        server.http.head(client.url("newNonce")),
        server.http.get(client.url("newNonce")),
    ):
        assert index in links(nonce), nonce.headers
    created = client.new_account()
    assert created.status_code == 201, created.get_data(as_text=True)
    assert index in links(created), created.headers

    unknown = server.client().new_account({"onlyReturnExisting": True})
    assert_problem(unknown, "accountDoesNotExist", 400)
    assert index in links(unknown), unknown.headers
    not_allowed = server.http.get(client.url("newOrder"))
    assert_problem(not_allowed, "malformed", 405)
    assert index in links(not_allowed), not_allowed.headers

    # §7.5.1: the challenge resource links "up" to its authorization, read or responded to.
    _, authz_url, challenge = pending_challenge(client, "link-up.test")
    read = client.get(challenge["url"])
    assert read.status_code == 200, read.get_data(as_text=True)
    assert {index, (authz_url, "up")} <= links(read), read.headers
    token = challenge["token"]
    server.responder.key_authorizations[token] = client.key.key_authorization(token)
    answered = client.post(challenge["url"], {})
    assert answered.get_json()["status"] == "valid", answered.get_json()
    assert {index, (authz_url, "up")} <= links(answered), answered.headers


# -- 2. processing and Retry-After (RFC 8555 §7.4, §7.5.1, §8.2) ---------------------------------


@sqlite_only
def test_a_processing_order_is_read_as_processing_with_retry_after(server: Server) -> None:
    """§7.4: while an order is processing, the client polls it; the server SHOULD say when."""
    client = server.account()
    order_url, _ = ready_order(server, client, dns_ids("polled.test"))
    assert AcmeStore(server.storage).begin_finalize(order_url.rsplit("/", 1)[1])
    with unchanged(server.storage):
        polled = client.get(order_url)
        assert polled.status_code == 200, polled.get_data(as_text=True)
        assert polled.get_json()["status"] == "processing"
        assert "certificate" not in polled.get_json()
        retry_after(polled)


@sqlite_only
def test_finalize_of_a_processing_order_is_order_not_ready(server: Server) -> None:
    """§7.4: "A request to finalize an order will result in error if the order is not in the
    "ready" state. In such cases, the server MUST return a 403 (Forbidden) error with a problem
    document of type "orderNotReady"." A processing order is not ready."""
    client = server.account()
    order_url, order = ready_order(server, client, dns_ids("finalized-twice.test"))
    assert AcmeStore(server.storage).begin_finalize(order_url.rsplit("/", 1)[1])
    with unchanged(server.storage):
        _, again = finalize(client, order, ["finalized-twice.test"])
        assert_problem(again, "orderNotReady", 403)
    assert client.get(order_url).get_json()["status"] == "processing"


@sqlite_only
def test_finalize_of_a_valid_order_is_order_not_ready(server: Server) -> None:
    """§7.4 again: a second finalize of an issued order issues nothing more."""
    client = server.account()
    issued = issue(server, client, ["issued-once.test"])
    with unchanged(server.storage):
        _, again = finalize(client, issued.order, ["issued-once.test"])
        assert_problem(again, "orderNotReady", 403)


@sqlite_only
def test_a_challenge_not_finished_within_the_wait_answers_processing_with_retry_after(
    storage: Storage, limited_server: LimitedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """challenge_wait_seconds = 0: the challenge POST does not wait for the validation; it
    answers the challenge as processing, with Retry-After (§7.5.1, §8.2), and the validation
    finishes in the background. The validation is held on an event, so nothing races."""
    import acme.service

    release, done = threading.Event(), threading.Event()
    original = acme.service.AcmeService.validate

    def held_validate(self: acme.service.AcmeService, *args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        try:
            return original(self, *args, **kwargs)
        finally:
            done.set()

    monkeypatch.setattr(acme.service.AcmeService, "validate", held_validate)
    with limited_server(challenge_wait_seconds=0) as srv:
        client = srv.account()
        order_url, authz_url, challenge = pending_challenge(client, "no-wait.test")
        token = challenge["token"]
        srv.responder.key_authorizations[token] = client.key.key_authorization(token)
        try:
            answered = client.post(challenge["url"], {})
            assert answered.status_code == 200, answered.get_data(as_text=True)
            assert answered.get_json()["status"] == "processing", answered.get_json()
            retry_after(answered)
            polled = client.get(authz_url)
            assert polled.get_json()["status"] == "pending"
            retry_after(polled)
        finally:
            release.set()
        assert done.wait(30), "the validation never finished"
        final = client.get(challenge["url"])
        assert final.get_json()["status"] == "valid", final.get_json()
        assert "Retry-After" not in final.headers
        assert client.get(order_url).get_json()["status"] == "ready"


# -- 3. terms of service and website (RFC 8555 §7.1.1, §7.3) -------------------------------------


@sqlite_only
def test_terms_of_service_are_listed_and_must_be_agreed_to(
    storage: Storage, limited_server: LimitedServer
) -> None:
    with limited_server() as plain:
        meta = plain.client().directory["meta"]
        assert "termsOfService" not in meta and "website" not in meta, meta

    terms, website = "https://ca.test/terms/v1", "https://ca.test/about"
    with limited_server(terms_of_service=terms, website=website) as srv:
        meta = srv.client().directory["meta"]
        assert (meta["termsOfService"], meta["website"]) == (terms, website)

        # §7.3: "the server MUST reject newAccount requests that do not have the
        # "termsOfServiceAgreed" field set to "true"". The RFC names no error type; the server
        # (like Boulder and Pebble) answers malformed.
        client = srv.client()
        url = client.url("newAccount")
        contact = {"contact": ["mailto:ops@example.test"]}
        with unchanged(storage):
            omitted = client.post(url, contact, use_jwk=True)
            assert_problem(omitted, "malformed", 400)
            refused = client.post(url, {**contact, "termsOfServiceAgreed": False}, use_jwk=True)
            assert_problem(refused, "malformed", 400)

        agreed = client.new_account({"termsOfServiceAgreed": True})
        assert agreed.status_code == 201, agreed.get_data(as_text=True)
        assert agreed.get_json()["termsOfServiceAgreed"] is True
        assert client.account_url is not None
        assert client.get(client.account_url).get_json()["termsOfServiceAgreed"] is True


# -- 4. account update (RFC 8555 §7.3.2) -------------------------------------------------------


@sqlite_only
def test_an_account_update_replaces_its_contact(server: Server) -> None:
    client = server.account()
    assert client.account_url is not None
    new_contact = ["mailto:new@example.test"]
    response = client.post(client.account_url, {"contact": new_contact})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["contact"] == new_contact
    assert response.get_json()["status"] == "valid"
    assert client.get(client.account_url).get_json()["contact"] == new_contact
    stored = [row[3] for row in snapshot(server.storage)["accounts"]]
    assert json.loads(stored[0]) == new_contact


@sqlite_only
@pytest.mark.parametrize(
    ("contact", "error"),
    [
        (["tel:+15551234567"], "unsupportedContact"),
        (["mailto:ops@example.test?subject=hello"], "invalidContact"),
        (["mailto:"], "invalidContact"),
    ],
    ids=["tel", "mailto-with-query", "empty-mailto"],
)
def test_an_account_update_with_a_bad_contact_changes_nothing(
    server: Server, contact: list[str], error: str
) -> None:
    client = server.account()
    assert client.account_url is not None
    with unchanged(server.storage):
        assert_problem(client.post(client.account_url, {"contact": contact}), error, 400)
    assert client.get(client.account_url).get_json()["contact"] == ["mailto:ops@example.test"]


# -- 5. key-change refusals (RFC 8555 §7.3.5) ----------------------------------------------------


KEY_CHANGE_BREAKAGES = [
    "signed-by-another-key",
    "account-is-not-the-kid",
    "old-key-is-not-current",
    "url-is-not-the-outer-url",
    "inner-nonce",
]


@sqlite_only
@pytest.mark.parametrize("breakage", KEY_CHANGE_BREAKAGES)
def test_a_bad_key_change_is_malformed_and_keeps_the_old_key(server: Server, breakage: str) -> None:
    client, other = server.account(), server.account()
    new_key = AccountKey.ec_p256()
    url = client.url("keyChange")
    header: dict[str, Any] = {"alg": new_key.alg, "jwk": new_key.jwk, "url": url}
    change: dict[str, Any] = {"account": client.account_url, "oldKey": client.key.jwk}
    sign = None
    if breakage == "signed-by-another-key":
        sign = AccountKey.ec_p256().sign  # §7.3.5: the inner JWS must verify under its jwk
    elif breakage == "account-is-not-the-kid":
        change["account"] = other.account_url
    elif breakage == "old-key-is-not-current":
        change["oldKey"] = AccountKey.ec_p256().jwk
    elif breakage == "url-is-not-the-outer-url":
        header["url"] = client.account_url
    else:
        header["nonce"] = client.nonce()  # §7.3.5: the inner JWS MUST omit "nonce"
    inner = flattened_jws(new_key, header, json.dumps(change).encode(), sign=sign)
    with unchanged(server.storage):
        assert_problem(client.post(url, inner), "malformed", 400)
    assert client.account_url is not None
    assert client.get(client.account_url).status_code == 200  # the old key still signs
    assert_problem(
        server.client(new_key).new_account({"onlyReturnExisting": True}),
        "accountDoesNotExist",
        400,
    )


# -- 6. revocation by an account holding the authorizations (RFC 8555 §7.6) ----------------------


@sqlite_only
def test_revocation_by_an_account_authorized_for_every_name(server: Server) -> None:
    owner, holder = server.account(), server.account()
    names = ["a.held.test", "b.held.test"]
    issued = issue(server, owner, names)
    ready_order(server, holder, dns_ids(*names))  # valid authorizations for both names
    response = holder.post(holder.url("revokeCert"), revoke_payload(issued.leaf, 1))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert certificate_status(server.storage, issued.leaf) == "revoked"


@sqlite_only
def test_revocation_by_an_account_authorized_for_only_some_names_is_unauthorized(
    server: Server,
) -> None:
    owner, holder = server.account(), server.account()
    issued = issue(server, owner, ["a.half-held.test", "b.half-held.test"])
    ready_order(server, holder, dns_ids("a.half-held.test"))
    with unchanged(server.storage):
        response = holder.post(holder.url("revokeCert"), revoke_payload(issued.leaf, 1))
        assert_problem(response, "unauthorized", 403)
    assert certificate_status(server.storage, issued.leaf) == "issued"


# -- 7. offered challenge types (RFC 8555 §7.1.3, §7.1.4; RFC 8738 §7) ---------------------------


@sqlite_only
def test_each_identifier_kind_is_offered_the_challenge_types_it_may_use(server: Server) -> None:
    client = server.account()
    response = client.new_order(
        dns_ids("*.wild.offer.test", "plain.offer.test") + ip_ids("10.7.7.7")
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    authzs = {}
    for url in response.get_json()["authorizations"]:
        authz = client.get(url).get_json()
        authzs[(authz["identifier"]["type"], authz["identifier"]["value"])] = authz
    assert set(authzs) == {
        ("dns", "wild.offer.test"),  # §7.1.4: the wildcard's base name, without "*."
        ("dns", "plain.offer.test"),
        ("ip", "10.7.7.7"),
    }

    def offered(key: tuple[str, str]) -> list[str]:
        return sorted(c["type"] for c in authzs[key]["challenges"])

    wildcard = authzs[("dns", "wild.offer.test")]
    assert wildcard.get("wildcard") is True
    assert offered(("dns", "wild.offer.test")) == ["dns-01"]
    # §7.1.4: "wildcard" MUST be absent from the other authorizations.
    assert "wildcard" not in authzs[("dns", "plain.offer.test")]
    assert "wildcard" not in authzs[("ip", "10.7.7.7")]
    assert offered(("dns", "plain.offer.test")) == ["dns-01", "http-01", "tls-alpn-01"]
    assert offered(("ip", "10.7.7.7")) == ["http-01", "tls-alpn-01"]


# -- 8. plain GET on POST-only resources (RFC 8555 §6.3) -----------------------------------------


@sqlite_only
@pytest.mark.parametrize(
    "resource",
    [
        "authz",
        "challenge",
        "certificate",
        "finalize",
        "revokeCert",
        "keyChange",
        "orders",
        "newNonce",
    ],
)
def test_plain_get_on_every_post_only_resource_is_405(server: Server, resource: str) -> None:
    client = server.account()
    issued = issue(server, client, ["get-405.test"])
    _, authz_url, challenge = pending_challenge(client, "get-405-pending.test")
    urls = {
        "authz": authz_url,
        "challenge": challenge["url"],
        "certificate": issued.order["certificate"],
        "finalize": issued.order["finalize"],
        "revokeCert": client.url("revokeCert"),
        "keyChange": client.url("keyChange"),
        "orders": f"{client.account_url}/orders",
        "newNonce": client.url("newNonce"),
    }
    with unchanged(server.storage):
        got = server.http.get(urls[resource])
        if resource == "newNonce":
            # §7.2: newNonce answers GET (204) as well as HEAD.
            assert got.status_code == 204, got.get_data(as_text=True)
            assert got.headers.get("Replay-Nonce")
            return
        assert_problem(got, "malformed", 405)
        assert "POST" in got.headers["Allow"]
        text = got.get_data(as_text=True)
        for secret in ("get-405", "BEGIN CERTIFICATE", "token", "mailto:"):
            assert secret not in text, text


# -- 9. the HMAC nonces (RFC 8555 §6.5) ----------------------------------------------------------


@sqlite_only
def test_nonces_expire_are_authenticated_and_are_good_once(
    storage: Storage,
    pki: SessionPKI,
    tmp_path: Path,
    dns: ChallTestSrv,
    responder: ChallengeResponder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
    clock = FakeClock(datetime.datetime.now(datetime.UTC).replace(microsecond=0))
    with running_server(storage, tmp_path, dns, responder, clock=clock) as srv:
        client = srv.account()
        assert client.account_url is not None
        account_url = client.account_url

        def read_account(nonce: str) -> TestResponse:
            return client.post(account_url, None, header={"nonce": nonce})

        # Within the 30-minute lifetime a nonce is good; past it, badNonce with a fresh one.
        young = client.nonce()
        clock.advance(datetime.timedelta(minutes=29))
        assert read_account(young).status_code == 200
        old = client.nonce()
        clock.advance(datetime.timedelta(minutes=30, seconds=1))
        with unchanged(storage):
            expired = read_account(old)
            assert_problem(expired, "badNonce", 400, sent_nonce=old)
        assert read_account(expired.headers["Replay-Nonce"]).status_code == 200

        # One character of the MAC changed: not a nonce of ours; the real one is still unused.
        real = client.nonce()
        forged = real[:-1] + ("A" if real[-1] != "A" else "B")
        assert len(base64.urlsafe_b64decode(real + "=" * (-len(real) % 4))) == 36
        with unchanged(storage):
            assert_problem(read_account(forged), "badNonce", 400, sent_nonce=forged)
        assert read_account(real).status_code == 200

        # Good once.
        with unchanged(storage):
            replayed = read_account(real)
            assert_problem(replayed, "badNonce", 400, sent_nonce=real)
        assert read_account(replayed.headers["Replay-Nonce"]).status_code == 200


# -- 10. a challenge left processing by a dead process ------------------------------------------


@sqlite_only
def test_a_challenge_left_processing_by_a_dead_process_is_validated_by_the_upkeep(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that died mid-validation leaves the challenge `processing`; the jobs' upkeep
    runs the validation again once it is older than STALE_CHALLENGE_AFTER."""
    import acme.jobs
    import acme.service

    client = server.account()
    order_url, authz_url, challenge = pending_challenge(client, "stale-challenge.test")
    token = challenge["token"]
    server.responder.key_authorizations[token] = client.key.key_authorization(token)
    challenge_id = challenge["url"].rsplit("/", 1)[1]
    assert AcmeStore(server.storage).start_challenge(challenge_id)  # the validation that died
    polled = client.get(challenge["url"])
    assert polled.get_json()["status"] == "processing"
    retry_after(polled)

    acme.jobs.run(server.runtime)  # not stale yet: left alone
    assert client.get(challenge["url"]).get_json()["status"] == "processing"

    monkeypatch.setattr(acme.service, "STALE_CHALLENGE_AFTER", datetime.timedelta(0))
    acme.jobs.run(server.runtime)
    done = client.get(challenge["url"]).get_json()
    assert done["status"] == "valid", done
    assert client.get(authz_url).get_json()["status"] == "valid"
    assert client.get(order_url).get_json()["status"] == "ready"


# -- 11. dns-01 looks at _acme-challenge.<name> only (RFC 8555 §8.4) ----------------------------


def txt_digest(key_authorization: str) -> str:
    """RFC 8555 §8.4: base64url(SHA-256(key authorization)), no padding."""
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@sqlite_only
def test_dns01_ignores_the_digest_published_at_the_bare_name(
    server: Server,
    dns: ChallTestSrv,
) -> None:
    client = server.account()
    # The same digest at the right place validates: the refusal below is about the place only.
    _, right_authz, right = pending_challenge(client, "right.dns01-place.test", "dns-01")
    dns.set_txt(
        "_acme-challenge.right.dns01-place.test",
        txt_digest(client.key.key_authorization(right["token"])),
    )
    assert client.post(right["url"], {}).get_json()["status"] == "valid"
    assert client.get(right_authz).get_json()["status"] == "valid"

    order_url, authz_url, wrong = pending_challenge(client, "bare.dns01-place.test", "dns-01")
    dns.set_txt("bare.dns01-place.test", txt_digest(client.key.key_authorization(wrong["token"])))
    result = client.post(wrong["url"], {}).get_json()
    assert result["status"] == "invalid", result
    # Nothing at _acme-challenge.bare.dns01-place.test: the look-up found no TXT record.
    assert result["error"]["type"] == ERROR + "dns", result["error"]
    assert "_acme-challenge.bare.dns01-place.test" in result["error"]["detail"]
    assert client.get(authz_url).get_json()["status"] == "invalid"
    assert client.get(order_url).get_json()["status"] == "invalid"
