"""Fuzzing ACME request authentication (acme/jws.py) and the ACME HTTP edge (acme/web.py,
acme/service.py): hostile bodies end in an AcmeProblem of a 4xx status, and over HTTP in an
`application/problem+json` document of an `urn:ietf:params:acme:error:*` type; never a 500."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import event, example, given
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from acme import jws
from acme.problems import ERROR_URN_PREFIX, AcmeProblem
from ca.storage import Storage
from ca.storage.acme_store import AcmeStore
from tests.conftest import ONLINE_PIN, SessionPKI, fresh_postgres_database
from tests.fuzz.conftest import fuzz_settings
from tests.fuzz.csrs import bad_utf8_name_csr, bad_version_csr, certificate_seeds, csr_inputs
from tests.fuzz.jws_inputs import (
    JOSE,
    Signer,
    account_payloads,
    finalize_payloads,
    json_payload,
    jwk_of,
    jws_bodies,
    key_change_payloads,
    new_order_payloads,
    revoke_payloads,
    sign,
    signing_keys,
)
from tests.fuzz.mutate import b64url, bad_b64url, json_values, mutated
from tests.integration.acme_client import AccountKey, dns_ids
from tests.integration.acme_harness import challtestsrv
from tests.integration.test_acme_protocol import (
    BASE,
    ChallengeResponder,
    Server,
    issue,
    ready_order,
    running_server,
)

pytestmark = pytest.mark.fuzz

ACME = f"{BASE}/acme"
EAB_KID, EAB_KEY = "eab-fuzz", b"k" * 32


def check_problem(problem: AcmeProblem) -> None:
    event(f"problem {problem.type}")  # --hypothesis-show-statistics: how deep inputs got
    assert 400 <= problem.status < 500, problem
    assert problem.type != "serverInternal", problem


@st.composite
def eab_documents(draw: st.DrawFn, jwk: Any, url: str) -> Any:
    """RFC 8555 §7.3.4 bindings: a valid HS256 one, then maybe one member broken."""
    protected = {"alg": "HS256", "kid": EAB_KID, "url": url}
    if draw(st.booleans()):
        protected[draw(st.sampled_from(["alg", "kid", "url", "nonce", "crit"]))] = draw(
            st.one_of(st.sampled_from(["HS512", "none", "ES256", ""]), json_values())
        )
    protected_b64 = b64url(json.dumps(protected).encode())
    payload_b64 = b64url(json.dumps(draw(st.one_of(st.just(jwk), json_values()))).encode())
    mac = hmac.new(EAB_KEY, f"{protected_b64}.{payload_b64}".encode(), hashlib.sha256).digest()
    document: Any = {"protected": protected_b64, "payload": payload_b64, "signature": b64url(mac)}
    if draw(st.integers(min_value=0, max_value=3)) == 2:
        document = draw(st.one_of(json_values(), st.just({**document, "header": {}})))
    return document


# -- the parser, directly -------------------------------------------------------------------


URL = f"{ACME}/new-order"
ACCOUNT_URL = f"{ACME}/acct/1"
DIRECT_ENDPOINTS = ("new-account", "new-order", "finalize", "revoke-cert", "key-change")
NONCES = jws.InMemoryNonceStore(max_outstanding=1000)


def _signer(data: st.DataObject, account: str) -> Signer:
    if data.draw(st.booleans(), label="use kid"):
        alg, private = signing_keys()[account]
        return Signer(alg, private, ACCOUNT_URL)
    name = data.draw(st.sampled_from(sorted(signing_keys())), label="jwk key")
    alg, private = signing_keys()[name]
    return Signer(alg, private, None)


def authenticate_directly(body: bytes, content_type: str) -> tuple[jws.ParsedJWS, Any]:
    """What acme/web.py `authenticate` does, with one known account (ACCOUNT_URL)."""
    parsed = jws.parse_jws(body, content_type, URL)
    jws.check_jwk_only_where_allowed(parsed, jwk_allowed=True)
    if parsed.jwk is not None:
        jwk = parsed.jwk
    elif parsed.kid == ACCOUNT_URL:
        jwk = jwk_of(signing_keys()["p256"][1])
    else:
        raise AcmeProblem("accountDoesNotExist", "no such account", 400)
    jws.verify_signature(parsed, jws.account_key_from_jwk(jwk))
    jws.check_nonce(parsed, NONCES)
    return parsed, jwk


def read_payload(endpoint: str, parsed: jws.ParsedJWS, jwk: Any) -> None:
    """The payload parsing that follows authentication, for the parts acme/jws.py owns."""
    jws.jwk_thumbprint(jwk)
    jws.key_authorization("token", jwk)
    if parsed.is_post_as_get:
        return
    if endpoint == "key-change":
        try:
            inner_document = json.loads(parsed.payload)
        except ValueError:
            return
        inner = jws.parse_key_change_inner(inner_document, parsed.url)
        assert inner.jwk is not None
        jws.verify_signature(inner, jws.account_key_from_jwk(inner.jwk))
        change = inner.json_payload()
        if isinstance(change.get("oldKey"), dict):
            jws.jwk_thumbprint(change["oldKey"])
        return
    payload = parsed.json_payload()
    if endpoint == "new-account" and "externalAccountBinding" in payload:
        keys = {EAB_KID: EAB_KEY}
        jws.verify_eab(jwk, payload["externalAccountBinding"], URL, keys.get)


@functools.cache
def direct_payloads(endpoint: str) -> st.SearchStrategy[bytes | None]:
    account_jwk = jwk_of(signing_keys()["p256"][1])
    if endpoint == "new-account":
        eab = eab_documents(account_jwk, URL)
        return json_payload(
            st.one_of(
                account_payloads,
                st.fixed_dictionaries({"externalAccountBinding": eab}),
            )
        )
    if endpoint == "new-order":
        return json_payload(new_order_payloads)
    if endpoint == "finalize":
        return json_payload(finalize_payloads)
    if endpoint == "revoke-cert":
        return json_payload(revoke_payloads([]))
    return json_payload(key_change_payloads(ACCOUNT_URL, account_jwk, URL))


@fuzz_settings()
@given(data=st.data())
def test_jws_parser_raises_only_acme_problems(data: st.DataObject) -> None:
    endpoint = data.draw(st.sampled_from(DIRECT_ENDPOINTS), label="endpoint")
    signer = _signer(data, "p256")
    body, content_type = data.draw(
        jws_bodies(
            url=URL,
            nonce=NONCES.new_nonce(),
            signer=signer,
            payloads=direct_payloads(endpoint),
        ),
        label="request",
    )
    try:
        parsed, jwk = authenticate_directly(body, content_type)
        read_payload(endpoint, parsed, jwk)
        event("accepted")
    except AcmeProblem as problem:
        check_problem(problem)


# -- the real HTTP path -----------------------------------------------------------------------


@dataclasses.dataclass
class Rig:
    server: Server
    account_url: str
    account_key: str  # a name in signing_keys()
    order_url: str  # a ready order: finalize reaches the CSR checks
    authz_url: str
    challenge_url: str
    certificate_url: str
    certificates: list[bytes]
    nonce: str = ""

    def fresh_nonce(self) -> str:
        if not self.nonce:
            self.nonce = self.server.http.head(f"{ACME}/new-nonce").headers["Replay-Nonce"]
        nonce, self.nonce = self.nonce, ""
        return nonce

    def undo_key_change(self) -> None:
        """A key change the fuzzer got right rolled the account key: roll it back. Every
        example must see the same account key, or hypothesis's replay of a choice sequence
        draws different data (FlakyStrategyDefinition)."""
        account_id = int(self.account_url.rsplit("/", 1)[1])
        account = AcmeStore(self.server.storage).account(account_id)
        assert account is not None and account.status == "valid", account
        changed_to = next(
            (name for name, (_, key) in signing_keys().items() if jwk_of(key) == account.jwk), None
        )
        assert changed_to is not None, f"the account key is none of the fuzzer's: {account.jwk}"
        if changed_to == self.account_key:
            return
        original, self.account_key = self.account_key, changed_to
        url = f"{ACME}/key-change"
        alg, private = signing_keys()[original]
        inner = flattened(
            alg,
            private,
            {"alg": alg, "jwk": jwk_of(private), "url": url},
            json.dumps({"account": self.account_url, "oldKey": account.jwk}).encode(),
        )
        response = post_signed(self, url, self.account_url, json.dumps(inner).encode())
        assert response.status_code == 200, response.get_data(as_text=True)
        self.account_key = original


@pytest.fixture(scope="module")
def rig(
    fuzz_storage: Storage, pki: SessionPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rig]:
    with (
        challtestsrv(tmp_path_factory.mktemp("challtestsrv")) as dns,
        ChallengeResponder() as responder,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
        directory = tmp_path_factory.mktemp("acme")
        with running_server(fuzz_storage, directory, dns, responder) as server:
            alg, private = signing_keys()["p256"]
            client = server.account(AccountKey(private, alg))
            assert client.account_url is not None
            issued = issue(server, client, ["one.fuzz.test"])
            order_url, order = ready_order(server, client, dns_ids("two.fuzz.test"))
            authz_url = order["authorizations"][0]
            authz = client.get(authz_url).get_json()
            yield Rig(
                server=server,
                account_url=client.account_url,
                account_key="p256",
                order_url=order_url,
                authz_url=authz_url,
                challenge_url=authz["challenges"][0]["url"],
                certificate_url=issued.order["certificate"],
                certificates=[issued.leaf.public_bytes(serialization.Encoding.DER)],
            )


def http_payloads(rig: Rig, endpoint: str, url: str) -> st.SearchStrategy[bytes | None]:
    return _http_payloads(endpoint, url, rig.account_url, rig.account_key, tuple(rig.certificates))


@functools.cache
def _http_payloads(
    endpoint: str, url: str, account_url: str, account_key: str, certificates: tuple[bytes, ...]
) -> st.SearchStrategy[bytes | None]:
    account_jwk = jwk_of(signing_keys()[account_key][1])
    if endpoint in ("new-account", "acct"):
        return json_payload(
            st.one_of(
                account_payloads,
                st.fixed_dictionaries({"externalAccountBinding": eab_documents(account_jwk, url)}),
            )
        )
    if endpoint == "new-order":
        return json_payload(new_order_payloads)
    if endpoint == "finalize":
        return json_payload(finalize_payloads)
    if endpoint == "revoke-cert":
        return json_payload(revoke_payloads(list(certificates)))
    if endpoint == "key-change":
        return json_payload(key_change_payloads(account_url, account_jwk, url))
    return json_payload(json_values())


def check_http_answer(response: TestResponse) -> None:
    text = response.get_data(as_text=True)
    assert response.status_code < 500, f"{response.status_code}: {text}"
    if response.status_code >= 400:
        assert response.mimetype == "application/problem+json", text
        problem = json.loads(text)
        assert problem["type"].startswith(ERROR_URN_PREFIX), problem
        assert problem["type"] != ERROR_URN_PREFIX + "serverInternal", problem


@fuzz_settings()
@given(data=st.data())
def test_acme_http_answers_problems_never_500(rig: Rig, data: st.DataObject) -> None:
    order_id = rig.order_url.rsplit("/", 1)[1]
    urls = {
        "new-account": f"{ACME}/new-account",
        "acct": rig.account_url,
        "new-order": f"{ACME}/new-order",
        "order": rig.order_url,
        "finalize": f"{ACME}/order/{order_id}/finalize",
        "authz": rig.authz_url,
        "chall": rig.challenge_url,
        "cert": rig.certificate_url,
        "revoke-cert": f"{ACME}/revoke-cert",
        "key-change": f"{ACME}/key-change",
    }
    endpoint = data.draw(st.sampled_from(sorted(urls)), label="endpoint")
    url = urls[endpoint]
    if endpoint == "new-account" or (endpoint == "revoke-cert" and data.draw(st.booleans())):
        name = data.draw(st.sampled_from(sorted(signing_keys())), label="jwk key")
        signer = Signer(*signing_keys()[name], None)
    else:
        signer = Signer(*signing_keys()[rig.account_key], rig.account_url)
    body, content_type = data.draw(
        jws_bodies(
            url=url,
            nonce=rig.fresh_nonce(),
            signer=signer,
            payloads=http_payloads(rig, endpoint, url),
        ),
        label="request",
    )
    response = rig.server.http.post(url, data=body, content_type=content_type)
    rig.nonce = response.headers.get("Replay-Nonce", "")
    check_http_answer(response)
    answer = response.get_json(silent=True) if response.status_code >= 400 else None
    outcome = f"{answer['type'].rsplit(':', 1)[1]}: {answer['detail'][:50]}" if answer else "ok"
    event(f"{endpoint} {response.status_code} {outcome}")
    if endpoint == "key-change" and response.status_code == 200:
        rig.undo_key_change()


def flattened(alg: str, private: Any, header: Any, payload: bytes | None) -> dict[str, str]:
    """RFC 7515 §7.2.2, correctly signed; ``payload`` None is a POST-as-GET."""
    protected_b64 = b64url(json.dumps(header).encode())
    payload_b64 = "" if payload is None else b64url(payload)
    signature = sign(alg, private, f"{protected_b64}.{payload_b64}".encode())
    return {"protected": protected_b64, "payload": payload_b64, "signature": b64url(signature)}


def post_signed(rig: Rig, url: str, kid: str, payload: bytes | None) -> TestResponse:
    """A correctly signed request with the account's key under ``kid``."""
    alg, private = signing_keys()[rig.account_key]
    header = {"alg": alg, "nonce": rig.fresh_nonce(), "url": url, "kid": kid}
    document = flattened(alg, private, header, payload)
    response = rig.server.http.post(url, data=json.dumps(document), content_type=JOSE)
    rig.nonce = response.headers.get("Replay-Nonce", "")
    return response


account_ids = st.one_of(
    st.text(max_size=25),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.text(alphabet="0123456789\u00b2\u00b3\u0661\u0662\u07c1\U0001d7d9", min_size=1, max_size=25),
)


@fuzz_settings(smoke_share=0.05)
@given(account_id=account_ids)
@example(account_id="²")  # str.isdigit() but not int(): was a 500
@example(account_id="\u0661")  # an Arabic-Indic one: int() reads it as account 1
@example(account_id="01")  # an alias of account 1: was accepted as account 1
@example(account_id="9" * 30)  # beyond a 64-bit database integer: was a 500
@example(account_id="1" * 5000)  # beyond int()'s 4,300-digit limit: was a 500
def test_kid_account_urls_never_answer_500(rig: Rig, account_id: str) -> None:
    """A correctly signed request whose kid is this server's account URL prefix plus anything."""
    response = post_signed(rig, f"{ACME}/new-order", f"{ACME}/acct/{account_id}", b"{}")
    check_http_answer(response)
    canonical = account_id.isascii() and account_id.isdigit() and account_id[0] != "0"
    if not (canonical and len(account_id) <= 18):  # else maybe an account the fuzzer made
        assert response.status_code == 400, response.get_data(as_text=True)
        assert response.get_json()["type"] == ERROR_URN_PREFIX + "accountDoesNotExist"


# -- PostgreSQL: what SQLite accepts and PostgreSQL refuses -----------------------------------


@pytest.fixture(scope="module")
def pg_server(pki: SessionPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """A bare ACME server on PostgreSQL with one account (no orders)."""
    with fresh_postgres_database() as url:
        store = Storage(url)
        store.migrate()
        for record in pki.issuers:
            store.add_issuer(record)
        with (
            challtestsrv(tmp_path_factory.mktemp("challtestsrv-pg")) as dns,
            ChallengeResponder() as responder,
            pytest.MonkeyPatch.context() as patch,
        ):
            patch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
            directory = tmp_path_factory.mktemp("acme-pg")
            with running_server(store, directory, dns, responder) as server:
                alg, private = signing_keys()["p256"]
                client = server.account(AccountKey(private, alg))
                assert client.account_url is not None
                yield Rig(server, client.account_url, "p256", "", "", "", "", [])
        store.dispose()


@pytest.mark.postgres
@fuzz_settings(smoke_share=0.05)
@given(
    resource=st.sampled_from(["order", "authz", "chall", "cert"]),
    object_id=st.text(st.characters(codec="utf-8"), min_size=1, max_size=30),
)
@example(resource="order", object_id="\x00")  # PostgreSQL refuses NUL in text: was a 503
@example(resource="authz", object_id="a\x00b")
@example(resource="chall", object_id="\x00")
def test_object_ids_in_urls_never_answer_5xx_on_postgresql(
    pg_server: Rig, resource: str, object_id: str
) -> None:
    url = f"{ACME}/{resource}/{quote(object_id, safe='')}"
    check_http_answer(post_signed(pg_server, url, pg_server.account_url, None))


# -- regressions over HTTP: payloads that reached cryptography's loaders ---------------------


@fuzz_settings(smoke_share=0.05)
@given(csr=csr_inputs())
@example(csr=bad_version_csr())  # x509.InvalidVersion is no ValueError: was a 500
@example(csr=bad_utf8_name_csr())  # a CN of invalid UTF-8 (with its signature): was a 500
def test_finalize_csrs_never_answer_500(rig: Rig, csr: bytes) -> None:
    order_id = rig.order_url.rsplit("/", 1)[1]
    payload = json.dumps({"csr": b64url(csr)}).encode()
    response = post_signed(rig, f"{ACME}/order/{order_id}/finalize", rig.account_url, payload)
    check_http_answer(response)


@fuzz_settings(smoke_share=0.05)
@given(certificate=st.one_of(st.sampled_from(certificate_seeds()), mutated(certificate_seeds())))
@example(certificate=certificate_seeds()[1])  # version 16, InvalidVersion: was a 500
def test_revoke_certificates_never_answer_500(rig: Rig, certificate: bytes) -> None:
    payload = json.dumps({"certificate": b64url(certificate)}).encode()
    check_http_answer(post_signed(rig, f"{ACME}/revoke-cert", rig.account_url, payload))


@fuzz_settings(smoke_share=0.05)
@given(
    cert_id=st.one_of(
        st.text(max_size=80),
        st.tuples(bad_b64url(), bad_b64url()).map(".".join),
        st.tuples(st.binary(max_size=40), st.binary(max_size=40)).map(
            lambda parts: f"{b64url(parts[0])}.{b64url(parts[1])}"
        ),
    )
)
def test_renewal_info_ids_never_answer_500(rig: Rig, cert_id: str) -> None:
    """RFC 9773 renewalInfo: an unauthenticated GET whose path is the client's to choose."""
    response = rig.server.http.get(f"{ACME}/renewal-info/{quote(cert_id, safe='')}")
    check_http_answer(response)
