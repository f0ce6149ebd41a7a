"""The responder's request rules, one test per rule (RFC 6960 §4.1, RFC 5019 §5, RFC 8954)."""

from __future__ import annotations

import base64
import urllib.parse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from ocsp.responder import (
    MAX_REQUEST_OCTETS,
    MalformedRequest,
    decode_get_path,
    parse_request,
    request_hash,
    request_nonce,
)
from tests.conftest import DATA

OCSP_DATA = DATA / "ocsp"


def _request(nonce: bytes | None = None, algorithm: hashes.HashAlgorithm | None = None) -> bytes:
    algorithm = algorithm or hashes.SHA1()  # noqa: S303 - RFC 5019 CertID
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        b"\x01" * algorithm.digest_size, b"\x02" * algorithm.digest_size, 7, algorithm
    )
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


# A DER request whose base64 holds `+`, `/` and `//` (found by searching serials).
def _awkward() -> bytes:
    for serial in range(1, 100000):
        der = (
            ocsp.OCSPRequestBuilder()
            .add_certificate_by_hash(
                b"\xfb" * 20,
                b"\xff" * 20,
                serial,
                hashes.SHA1(),  # noqa: S303 - RFC 5019 CertID
            )
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        text = base64.b64encode(der).decode()
        if "+" in text and "//" in text:
            return der
    raise AssertionError("no request with + and // in its base64")


AWKWARD = _awkward()
ENCODED = base64.b64encode(AWKWARD).decode()


@pytest.mark.parametrize(
    "path",
    [
        ENCODED,
        urllib.parse.quote(ENCODED, safe=""),  # percent-encoded
        urllib.parse.quote(urllib.parse.quote(ENCODED, safe=""), safe=""),  # twice
        "/" + ENCODED,  # `{url}/` + `/...`
        "//" + ENCODED,
        ENCODED.replace("+", " "),  # a `+` that became a space on the way
        ENCODED.rstrip("="),  # padding dropped
        base64.urlsafe_b64encode(AWKWARD).decode(),  # the URL-safe alphabet
    ],
)
def test_get_path_variants_decode_to_the_request(path: str) -> None:
    """RFC 5019 §5 / RFC 6960 Appendix A.1, with the tolerance real clients need."""
    assert decode_get_path(path) == AWKWARD


@pytest.mark.parametrize("path", ["%%%", "abc!", "=", "A" * 9000, "M\x00"])
def test_get_path_that_is_not_base64_is_malformed(path: str) -> None:
    with pytest.raises(MalformedRequest):
        decode_get_path(path)


@pytest.mark.parametrize(
    "name", ["not-der.bin", "truncated.der", "two-certs.der", "thousand-certs.der"]
)
def test_unparseable_or_multi_certificate_requests_are_malformed(name: str) -> None:
    """RFC 6960 §4.1.1 DER; RFC 5019 §2.1.1 one Request per OCSPRequest."""
    with pytest.raises(MalformedRequest):
        parse_request((OCSP_DATA / name).read_bytes())


def test_empty_and_oversized_requests_are_malformed() -> None:
    with pytest.raises(MalformedRequest):
        parse_request(b"")
    with pytest.raises(MalformedRequest):
        parse_request(_request() + b"\x00" * MAX_REQUEST_OCTETS)


def test_trailing_garbage_is_malformed() -> None:
    with pytest.raises(MalformedRequest):
        parse_request(_request() + b"\x00")


@pytest.mark.parametrize("size", [1, 16, 32])
def test_nonces_of_rfc8954_sizes_are_accepted(size: int) -> None:
    assert request_nonce(parse_request(_request(b"n" * size))) == b"n" * size


@pytest.mark.parametrize("name", ["nonce-100-octets.der", "nonce-0-octets.der"])
def test_nonces_outside_1_to_32_octets_are_malformed(name: str) -> None:
    """RFC 8954 §2.1: Nonce ::= OCTET STRING (SIZE(1..32))."""
    with pytest.raises(MalformedRequest):
        request_nonce(parse_request((OCSP_DATA / name).read_bytes()))


def test_no_nonce_is_none() -> None:
    assert request_nonce(parse_request(_request())) is None


def test_cert_id_hashes_we_match() -> None:
    assert request_hash(parse_request(_request())) == "sha1"
    assert request_hash(parse_request(_request(algorithm=hashes.SHA256()))) == "sha256"
    assert request_hash(parse_request(_request(algorithm=hashes.SHA384()))) is None
