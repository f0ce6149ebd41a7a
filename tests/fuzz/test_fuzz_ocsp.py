"""Fuzzing the OCSP request parser (ocsp/responder.py) and the real WSGI app (ocsp/web.py):
every answer is an OCSP response (malformedRequest, unauthorized, or a signed one) with HTTP
200, or a 4xx; never an exception, never a 500."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import random
import tracemalloc
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from flask.testing import FlaskClient
from hypothesis import example, given
from hypothesis import strategies as st

from ca import policy
from ca.config import load_config
from ca.issuance import CertificateAuthority, IssuanceRequest
from ca.ocsp_signing import OcspSigner, settings_from_config
from ca.policy import Identifier
from ca.runtime import Runtime
from ca.storage import Storage
from ca.web import create_app
from ocsp import responder as ocsp_responder
from ocsp.responder import Answer, MalformedRequest, Responder
from tests.conftest import DATA, SessionPKI
from tests.fuzz.conftest import fuzz_settings
from tests.fuzz.mutate import mutated

pytestmark = pytest.mark.fuzz

OK_STATUSES = {
    ocsp.OCSPResponseStatus.SUCCESSFUL,
    ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
    ocsp.OCSPResponseStatus.UNAUTHORIZED,
}
_SHA1_OID = bytes.fromhex("06052b0e03021a")
_SHA256_OID = bytes.fromhex("0609608648016503040201")


# -- seeds: real requests for a certificate this CA issued, and the known-bad files -------------


@dataclasses.dataclass(frozen=True)
class Seeds:
    requests: tuple[bytes, ...]


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _children(der: bytes) -> list[tuple[int, bytes]]:
    """The (tag, body) items of a DER SEQUENCE body (definite lengths only)."""
    items = []
    at = 0
    while at < len(der):
        tag, first = der[at], der[at + 1]
        at += 2
        if first < 0x80:
            length = first
        else:
            length = int.from_bytes(der[at : at + (first & 0x7F)], "big")
            at += first & 0x7F
        items.append((tag, der[at : at + length]))
        at += length
    return items


def with_requests(der: bytes, count: int) -> bytes:
    """The same OCSPRequest with its one Request repeated ``count`` times (RFC 5019 allows
    one; a requestList of thousands must not cost thousands of signatures)."""
    ((_, outer),) = _children(der)
    (tbs_tag, tbs), *rest = _children(outer)
    items = _children(tbs)
    rebuilt = b""
    for tag, body in items:
        if tag == 0x30:  # requestList
            ((request_tag, request),) = _children(body)
            body = _tlv(request_tag, request) * count
        rebuilt += _tlv(tag, body)
    tail = b"".join(_tlv(tag, body) for tag, body in rest)
    return _tlv(0x30, _tlv(tbs_tag, rebuilt) + tail)


def _build(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    algorithm: hashes.HashAlgorithm,
    nonce: bytes | None = None,
) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm)
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def seeds(fuzz_authority: CertificateAuthority) -> Seeds:
    fuzz_authority.lint_enabled = False
    csr = x509.load_pem_x509_csr((DATA / "csr-good-rsa2048.pem").read_bytes())
    issued = fuzz_authority.issue(
        IssuanceRequest(
            public_key=policy.csr_public_key(csr),
            identifiers=(Identifier("dns", "ocsp.test"),),
            profile="tls-server",
            source="fuzz",
        )
    )
    cert, issuer = issued.certificate, issued.chain[0]
    requests = [
        _build(cert, issuer, hashes.SHA1()),  # noqa: S303 - RFC 5019 CertID
        _build(cert, issuer, hashes.SHA256()),
        _build(cert, issuer, hashes.SHA384()),
        _build(cert, issuer, hashes.SHA1(), b"\x01" * 16),  # noqa: S303
        _build(cert, issuer, hashes.SHA256(), b"\x02"),
        _build(cert, issuer, hashes.SHA1(), b"\x03" * 33),  # noqa: S303
        _build(cert, issuer, hashes.SHA1(), b"\x04" * 1000),  # noqa: S303 - a huge nonce
        _build(issuer, issuer, hashes.SHA1()),  # noqa: S303 - not an end-entity serial
    ]
    requests.append(with_requests(requests[0], 2))
    requests.append(with_requests(requests[1], 50))
    requests.extend(path.read_bytes() for path in sorted((DATA / "ocsp").glob("*.der")))
    return Seeds(tuple(requests))


@st.composite
def ocsp_requests(draw: st.DrawFn, seeds: Seeds) -> bytes:
    """A seed, a seed with another hash OID, a seed with bytes mutated, or byte soup."""
    kind = draw(st.sampled_from(["seed", "oid", "mutated", "mutated", "mutated", "soup"]))
    if kind == "seed":
        return draw(st.sampled_from(seeds.requests))
    if kind == "oid":
        der = draw(st.sampled_from(seeds.requests))
        oid = draw(st.sampled_from([_SHA1_OID, _SHA256_OID]))
        replacement = oid[:2] + draw(st.binary(min_size=len(oid) - 2, max_size=len(oid) - 2))
        return der.replace(oid, replacement)
    if kind == "mutated":
        return draw(mutated(seeds.requests))
    return draw(st.binary(max_size=300))


@st.composite
def get_paths(draw: st.DrawFn, seeds: Seeds) -> str:
    """What follows `/ocsp/` in a GET: base64 in the spellings clients use, damaged or not."""
    der = draw(ocsp_requests(seeds))
    text = base64.b64encode(der).decode()
    style = draw(
        st.sampled_from(["plain", "quoted", "twice", "urlsafe", "space", "slashes", "soup"])
    )
    if style == "quoted":
        text = quote(text, safe="")  # %2F, %2B, %3D
    elif style == "twice":
        text = quote(quote(text, safe=""), safe="")
    elif style == "urlsafe":
        text = text.replace("+", "-").replace("/", "_").rstrip("=")
    elif style == "space":
        text = text.replace("+", " ")
    elif style == "slashes":
        text = "/" * draw(st.integers(min_value=1, max_value=3)) + text
    elif style == "soup":
        text = draw(st.text(alphabet="AQgw+/=%2F3D_- \t", max_size=200))
    if draw(st.integers(min_value=0, max_value=9)) == 5:
        text = draw(st.text(max_size=20)) + text
    return text


def check_answer(answer: Answer) -> None:
    assert answer.http_status == 200, answer
    response = ocsp.load_der_ocsp_response(answer.body)
    assert response.response_status in OK_STATUSES, response.response_status


# -- the parser and the responder, directly ----------------------------------------------------


@pytest.fixture(scope="module")
def runtime(fuzz_storage: Storage, pki: SessionPKI) -> Iterator[Runtime]:
    runtime = Runtime(load_config(None, environ={}))
    runtime.__dict__["storage"] = fuzz_storage
    runtime.__dict__["token"] = pki.online
    yield runtime


@pytest.fixture(scope="module")
def responder(runtime: Runtime) -> Responder:
    signer = OcspSigner(
        runtime.storage, lambda: runtime.token, settings_from_config(runtime.config), runtime.clock
    )
    return Responder(runtime.storage, signer, runtime.clock)


@fuzz_settings()
@given(data=st.data())
def test_request_parser_refuses_only_as_malformed(seeds: Seeds, data: st.DataObject) -> None:
    der = data.draw(ocsp_requests(seeds))
    with contextlib.suppress(MalformedRequest):
        ocsp_responder.read_request(der)
    path = data.draw(get_paths(seeds))
    with contextlib.suppress(MalformedRequest):
        ocsp_responder.decode_get_path(path)


@fuzz_settings()
@given(data=st.data())
def test_responder_answers_every_request(
    seeds: Seeds, responder: Responder, data: st.DataObject
) -> None:
    check_answer(responder.answer(data.draw(ocsp_requests(seeds))))
    check_answer(responder.answer_get(data.draw(get_paths(seeds))))


# -- the real WSGI app --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(runtime: Runtime) -> FlaskClient:
    return create_app(runtime, "http").test_client()


def check_http(status: int, body: bytes) -> None:
    assert status == 200 or 400 <= status < 500, f"HTTP {status}"
    if status == 200:
        response = ocsp.load_der_ocsp_response(body)
        assert response.response_status in OK_STATUSES, response.response_status


@fuzz_settings()
@given(data=st.data())
def test_wsgi_app_never_answers_500(seeds: Seeds, http: FlaskClient, data: st.DataObject) -> None:
    path = data.draw(get_paths(seeds))
    response = http.get("/ocsp/" + quote(path, safe="/%+=-_"))
    check_http(response.status_code, response.get_data())
    der = data.draw(ocsp_requests(seeds))
    content_type = data.draw(st.sampled_from(["application/ocsp-request", "text/plain", ""]))
    response = http.post("/ocsp", data=der, content_type=content_type)
    check_http(response.status_code, response.get_data())


# -- bounded memory -----------------------------------------------------------------------------


@fuzz_settings(smoke_share=0.05)
@given(padding=st.integers(min_value=0, max_value=ocsp_responder.MAX_GET_PATH - 200))
@example(padding=4000)  # a distinct 4 KiB key for one request: was kept in the parsed cache
def test_only_short_get_paths_are_cached(seeds: Seeds, responder: Responder, padding: int) -> None:
    path = "/" * padding + base64.b64encode(seeds.requests[0]).decode()
    check_answer(responder.answer_get(path))
    assert (path in responder._parsed) == (len(path) <= ocsp_responder.MAX_CACHED_KEY)


def test_memory_stays_bounded_over_distinct_requests(seeds: Seeds, responder: Responder) -> None:
    """20,000 distinct hostile requests (long GET paths that decode to a valid request, damaged
    DER) allocate a bounded amount: the parsed-request cache must not keep big keys."""
    rng = random.Random(6)
    valid = base64.b64encode(seeds.requests[0]).decode()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            if i % 2:
                # Each a different key, each the same request: slashes are skipped.
                padding = "/" * rng.randrange(1, ocsp_responder.MAX_GET_PATH - len(valid))
                check_answer(responder.answer_get(padding + valid))
            else:
                der = bytearray(rng.choice(seeds.requests))
                der[rng.randrange(len(der))] ^= 1 << rng.randrange(8)
                responder.answer(bytes(der))
        retained = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    # Before MAX_CACHED_KEY this retained 27 MB (the ~4 KiB paths kept as cache keys).
    assert retained < 16 * 1024 * 1024, f"{retained / 1e6:.1f} MB retained"
