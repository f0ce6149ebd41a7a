"""acme/jws.py: one test per RFC 8555 §6.2-6.5 / §7.3.4 rule and per bad input.

The JWS under test are built here with ``cryptography`` and a local base64url, not with the
module under test, so a bug in acme/jws.py cannot hide itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from josepy.jwk import JWKRSA

from acme import jws
from acme.problems import AcmeProblem

URL = "https://acme.example/acme/new-order"
NEW_ACCOUNT_URL = "https://acme.example/acme/new-account"
ACCOUNT_URL = "https://acme.example/acme/acct/1"
CONTENT_TYPE = "application/jose+json"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | Ed25519PrivateKey


# --- helpers: an independent JWS signer --------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64_json(value: Any) -> str:
    return b64(json.dumps(value).encode())


def b64_uint(value: int) -> str:
    return b64(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


NONCE = b64(b"sixteen byte nonce")


@cache
def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@cache
def ec_key(curve_name: str) -> ec.EllipticCurvePrivateKey:
    curves: dict[str, ec.EllipticCurve] = {
        "P-256": ec.SECP256R1(),
        "P-384": ec.SECP384R1(),
        "P-521": ec.SECP521R1(),
        "secp256k1": ec.SECP256K1(),
    }
    return ec.generate_private_key(curves[curve_name])


@cache
def ed25519_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def key_for(alg: str) -> PrivateKey:
    if alg in ("RS256", "PS256"):
        return rsa_key()
    if alg == "ES256":
        return ec_key("P-256")
    if alg == "ES384":
        return ec_key("P-384")
    return ed25519_key()


_CRV_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def public_jwk(key: PrivateKey) -> dict[str, str]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {"kty": "RSA", "n": b64_uint(numbers.n), "e": b64_uint(numbers.e)}
    if isinstance(public, ec.EllipticCurvePublicKey):
        size = (public.curve.key_size + 7) // 8
        point = public.public_numbers()
        return {
            "kty": "EC",
            "crv": _CRV_NAMES.get(public.curve.name, public.curve.name),
            "x": b64(point.x.to_bytes(size, "big")),
            "y": b64(point.y.to_bytes(size, "big")),
        }
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}


def natural_alg(key: PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384"}.get(key.curve.name, "ES512")
    return "EdDSA"


def sign(alg: str, key: PrivateKey, data: bytes) -> bytes:
    """RFC 7518 §3 signatures, produced the way a client would."""
    if alg in ("RS256", "PS256"):
        assert isinstance(key, rsa.RSAPrivateKey)
        if alg == "RS256":
            return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return key.sign(data, pss, hashes.SHA256())
    if alg in ("ES256", "ES384", "ES512"):
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        hash_algorithm: hashes.HashAlgorithm = {
            "ES256": hashes.SHA256(),
            "ES384": hashes.SHA384(),
            "ES512": hashes.SHA512(),
        }[alg]
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hash_algorithm)))
        size = (key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    assert isinstance(key, Ed25519PrivateKey)
    return key.sign(data)


def make_jws(
    key: PrivateKey,
    alg: str | None = None,
    *,
    payload: bytes = b"{}",
    kid: str | None = None,
    header: dict[str, Any] | None = None,
    omit: tuple[str, ...] = (),
    sign_as: str | None = None,
) -> dict[str, str]:
    """A flattened JWS; ``header`` overrides members, ``sign_as`` forges a mismatched alg."""
    alg = alg or natural_alg(key)
    protected: dict[str, Any] = {"alg": alg, "nonce": NONCE, "url": URL}
    if kid is not None:
        protected["kid"] = kid
    else:
        protected["jwk"] = public_jwk(key)
    protected.update(header or {})
    for name in omit:
        protected.pop(name, None)
    protected_b64 = b64_json(protected)
    payload_b64 = b64(payload)
    signing_alg = sign_as or (alg if alg in jws.ALLOWED_ALGORITHMS else natural_alg(key))
    signature = sign(signing_alg, key, f"{protected_b64}.{payload_b64}".encode())
    return {"protected": protected_b64, "payload": payload_b64, "signature": b64(signature)}


def to_body(document: Any) -> bytes:
    return json.dumps(document).encode()


def parse(document: Any, content_type: str | None = CONTENT_TYPE, url: str = URL) -> jws.ParsedJWS:
    return jws.parse_jws(to_body(document), content_type, url)


def authenticate(document: Any, url: str = URL) -> jws.ParsedJWS:
    parsed = parse(document, url=url)
    assert parsed.jwk is not None
    jws.verify_signature(parsed, jws.account_key_from_jwk(parsed.jwk))
    return parsed


def with_protected(document: dict[str, str], protected: bytes | str) -> dict[str, str]:
    raw = protected if isinstance(protected, str) else b64(protected)
    return {**document, "protected": raw}


@contextmanager
def raises_problem(type_: str, status: int) -> Iterator[pytest.ExceptionInfo[AcmeProblem]]:
    with pytest.raises(AcmeProblem) as info:
        yield info
    assert info.value.type == type_, info.value
    assert info.value.status == status, info.value


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


# --- happy paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256", "PS256", "EdDSA"])
def test_valid_signature_verifies(alg: str) -> None:
    key = key_for(alg)
    parsed = authenticate(make_jws(key, alg, payload=b'{"termsOfServiceAgreed": true}'))
    assert parsed.alg == alg
    assert parsed.nonce == NONCE
    assert parsed.url == URL
    assert parsed.jwk == public_jwk(key)
    assert parsed.kid is None
    assert parsed.json_payload() == {"termsOfServiceAgreed": True}
    assert not parsed.is_post_as_get


def test_kid_request_parses_and_verifies_with_stored_key() -> None:
    key = key_for("ES256")
    parsed = parse(make_jws(key, "ES256", kid=ACCOUNT_URL))
    assert parsed.kid == ACCOUNT_URL
    assert parsed.jwk is None
    jws.verify_signature(parsed, jws.account_key_from_jwk(public_jwk(key)))


def test_rfc8037_ed25519_known_answer() -> None:
    # RFC 8037 Appendix A.4: the JWS produced by the A.1 key.
    compact = (
        "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
        "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
    )
    protected_b64, payload_b64, signature_b64 = compact.split(".")
    okp = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    parsed = jws.ParsedJWS(
        protected={"alg": "EdDSA"},
        protected_b64=protected_b64,
        payload_b64=payload_b64,
        signature=jws.b64url_decode(signature_b64),
        alg="EdDSA",
        nonce=NONCE,
        url=URL,
        jwk=okp,
        kid=None,
        payload=b"Example of Ed25519 signing",
    )
    jws.verify_signature(parsed, jws.account_key_from_jwk(okp))


def test_post_as_get_has_empty_payload() -> None:
    parsed = authenticate(make_jws(key_for("ES256"), payload=b""))
    assert parsed.is_post_as_get
    assert parsed.payload == b""
    with raises_problem("malformed", 400):
        parsed.json_payload()


# --- Content-Type and size (§6.2) -------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "", "application/json", "text/plain"])
def test_wrong_or_missing_content_type_is_415(content_type: str | None) -> None:
    with raises_problem("malformed", 415):
        parse(make_jws(key_for("ES256")), content_type=content_type)


@pytest.mark.parametrize(
    "content_type", ["application/jose+json; charset=utf-8", "Application/JOSE+JSON"]
)
def test_content_type_parameters_and_case_are_ignored(content_type: str) -> None:
    assert parse(make_jws(key_for("ES256")), content_type=content_type).alg == "ES256"


def test_one_megabyte_body_is_413() -> None:
    body = to_body(make_jws(key_for("ES256"), payload=b"A" * (1024 * 1024)))
    with raises_problem("malformed", 413):
        jws.parse_jws(body, CONTENT_TYPE, URL)


def test_body_exactly_at_the_limit_is_accepted() -> None:
    body = to_body(make_jws(key_for("ES256")))
    padded = body + b" " * (jws.MAX_BODY_BYTES - len(body))
    assert len(padded) == jws.MAX_BODY_BYTES
    assert jws.parse_jws(padded, CONTENT_TYPE, URL).alg == "ES256"


def test_content_type_is_checked_before_size() -> None:
    with raises_problem("malformed", 415):
        jws.parse_jws(b"x" * (jws.MAX_BODY_BYTES + 1), "text/plain", URL)


# --- body shape: flattened serialization only (§6.2) ------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'["protected", "payload", "signature"]',
        b'"a string"',
        b"\xff\xfe{}",
        b'{"protected": "a", "protected": "b", "payload": "", "signature": "AA"}',
        b"[" * 20000 + b"]" * 20000,
        b'{"protected": NaN, "payload": "", "signature": "AA"}',
    ],
    ids=["not-json", "array", "string", "not-utf8", "duplicate-member", "deep-nesting", "nan"],
)
def test_body_that_is_not_a_json_object_is_malformed(body: bytes) -> None:
    with raises_problem("malformed", 400):
        jws.parse_jws(body, CONTENT_TYPE, URL)


def test_general_serialization_with_signatures_is_malformed() -> None:
    flat = make_jws(key_for("ES256"))
    general = {
        "payload": flat["payload"],
        "signatures": [{"protected": flat["protected"], "signature": flat["signature"]}],
    }
    with raises_problem("malformed", 400) as info:
        parse(general)
    assert "single signature" in info.value.detail


def test_signatures_alongside_flattened_members_is_malformed() -> None:
    flat = make_jws(key_for("ES256"))
    with raises_problem("malformed", 400):
        parse({**flat, "signatures": []})


def test_unprotected_header_is_malformed() -> None:
    with raises_problem("malformed", 400) as info:
        parse({**make_jws(key_for("ES256")), "header": {"kid": ACCOUNT_URL}})
    assert "unprotected" in info.value.detail


def test_unknown_member_is_malformed() -> None:
    with raises_problem("malformed", 400):
        parse({**make_jws(key_for("ES256")), "extra": "x"})


@pytest.mark.parametrize("member", ["protected", "payload", "signature"])
def test_missing_member_is_malformed(member: str) -> None:
    document = make_jws(key_for("ES256"))
    del document[member]
    with raises_problem("malformed", 400):
        parse(document)


@pytest.mark.parametrize("member", ["protected", "payload", "signature"])
def test_non_string_member_is_malformed(member: str) -> None:
    document: dict[str, Any] = dict(make_jws(key_for("ES256")))
    document[member] = {"not": "a string"}
    with raises_problem("malformed", 400):
        parse(document)


# --- base64url (RFC 7515 §2) ------------------------------------------------------------------


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s + "=",
        lambda s: s[:-1] + "+",
        lambda s: s[:-1] + "/",
        lambda s: s[:10] + " " + s[10:],
        lambda s: s + "\n",
        lambda s: s + "A" * ((1 - len(s)) % 4),  # length 4k+1 cannot be base64
    ],
    ids=["padding", "plus", "slash", "space", "newline", "bad-length"],
)
@pytest.mark.parametrize("member", ["protected", "payload", "signature"])
def test_bad_base64url_is_malformed(member: str, mangle: Callable[[str], str]) -> None:
    document = make_jws(key_for("ES256"), payload=b'{"a": 1}')
    document[member] = mangle(document[member])
    with raises_problem("malformed", 400):
        parse(document)


def test_non_zero_pad_bits_are_rejected() -> None:
    assert jws.b64url_decode("QQ") == b"A"
    with pytest.raises(ValueError):
        jws.b64url_decode("QR")


def test_empty_signature_is_malformed() -> None:
    with raises_problem("malformed", 400):
        parse({**make_jws(key_for("ES256")), "signature": ""})


# --- protected header -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "protected",
    [b"[1, 2]", b"not json", b'"alg"', b'{"alg": "ES256", "alg": "none"}'],
    ids=["array", "not-json", "string", "duplicate-parameter"],
)
def test_protected_header_must_be_a_json_object(protected: bytes) -> None:
    with raises_problem("malformed", 400):
        parse(with_protected(make_jws(key_for("ES256")), protected))


def test_empty_protected_header_is_malformed() -> None:
    with raises_problem("malformed", 400):
        parse(with_protected(make_jws(key_for("ES256")), ""))


# --- alg (§6.2) -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "none"},
        {"alg": "HS256"},
        {"alg": "ES512"},
        {"alg": "RS512"},
        {"alg": "es256"},
        {"alg": "made-up"},
        {"alg": 256},
        {"alg": None},
    ],
    ids=["none", "HS256", "ES512", "RS512", "lowercase", "unknown", "number", "null"],
)
def test_unsupported_alg_is_bad_signature_algorithm(header: dict[str, Any]) -> None:
    with raises_problem("badSignatureAlgorithm", 400) as info:
        parse(make_jws(key_for("RS256"), header=header))
    assert info.value.to_json()["algorithms"] == list(jws.ALLOWED_ALGORITHMS)


def test_missing_alg_is_bad_signature_algorithm() -> None:
    with raises_problem("badSignatureAlgorithm", 400) as info:
        parse(make_jws(key_for("ES256"), omit=("alg",)))
    assert info.value.algorithms == list(jws.ALLOWED_ALGORITHMS)


def test_alg_is_checked_before_everything_else_in_the_header() -> None:
    document = make_jws(key_for("ES256"), header={"alg": "none"}, omit=("nonce", "url", "jwk"))
    with raises_problem("badSignatureAlgorithm", 400):
        parse(document)


# --- nonce shape (§6.5, §6.5.2) ---------------------------------------------------------------


def test_missing_nonce_is_bad_nonce() -> None:
    with raises_problem("badNonce", 400):
        parse(make_jws(key_for("ES256"), omit=("nonce",)))


@pytest.mark.parametrize(
    "nonce", ["", "not base64!", "abcd=", "a+b/", 12345, None, ["AAAA"]], ids=repr
)
def test_malformed_nonce_is_bad_nonce(nonce: Any) -> None:
    with raises_problem("badNonce", 400):
        parse(make_jws(key_for("ES256"), header={"nonce": nonce}))


# --- url (§6.4) -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://acme.example/acme/new-account",
        URL + "/",
        URL.replace("https", "http"),
        URL.upper(),
    ],
)
def test_url_mismatch_is_unauthorized(url: str) -> None:
    with raises_problem("unauthorized", 403):
        parse(make_jws(key_for("ES256"), header={"url": url}))


@pytest.mark.parametrize("header", [{}, {"url": ""}, {"url": 7}], ids=["absent", "empty", "int"])
def test_missing_url_is_malformed(header: dict[str, Any]) -> None:
    omit = ("url",) if not header else ()
    with raises_problem("malformed", 400):
        parse(make_jws(key_for("ES256"), header=header, omit=omit))


# --- jwk / kid (§6.2) -------------------------------------------------------------------------


def test_jwk_and_kid_together_are_malformed() -> None:
    key = key_for("ES256")
    with raises_problem("malformed", 400):
        parse(make_jws(key, header={"kid": ACCOUNT_URL}))


def test_neither_jwk_nor_kid_is_malformed() -> None:
    with raises_problem("malformed", 400):
        parse(make_jws(key_for("ES256"), omit=("jwk",)))


@pytest.mark.parametrize("kid", ["", 1, None, {"url": ACCOUNT_URL}], ids=repr)
def test_kid_must_be_a_non_empty_string(kid: Any) -> None:
    document = make_jws(key_for("ES256"), header={"kid": kid}, omit=("jwk",))
    with raises_problem("malformed", 400):
        parse(document)


@pytest.mark.parametrize("jwk", ["a string", ["RSA"], None], ids=repr)
def test_jwk_must_be_an_object(jwk: Any) -> None:
    with raises_problem("malformed", 400):
        parse(make_jws(key_for("ES256"), header={"jwk": jwk}))


def test_jwk_rejected_where_kid_is_required() -> None:
    parsed = parse(make_jws(key_for("ES256")))
    with raises_problem("malformed", 400):
        jws.check_jwk_only_where_allowed(parsed, jwk_allowed=False)


def test_kid_rejected_on_new_account() -> None:
    parsed = parse(make_jws(key_for("ES256"), kid=ACCOUNT_URL))
    with raises_problem("malformed", 400):
        jws.check_jwk_only_where_allowed(parsed, jwk_allowed=True, kid_allowed=False)


def test_jwk_and_kid_each_accepted_where_allowed() -> None:
    with_jwk = parse(make_jws(key_for("ES256")))
    with_kid = parse(make_jws(key_for("ES256"), kid=ACCOUNT_URL))
    jws.check_jwk_only_where_allowed(with_jwk, jwk_allowed=True, kid_allowed=False)
    jws.check_jwk_only_where_allowed(with_kid, jwk_allowed=False)
    # revokeCert (§7.6) accepts either.
    jws.check_jwk_only_where_allowed(with_jwk, jwk_allowed=True)
    jws.check_jwk_only_where_allowed(with_kid, jwk_allowed=True)


def test_endpoint_allowing_neither_is_a_programming_error() -> None:
    parsed = parse(make_jws(key_for("ES256")))
    with pytest.raises(ValueError):
        jws.check_jwk_only_where_allowed(parsed, jwk_allowed=False, kid_allowed=False)


# --- b64 and crit (§6.2, RFC 7797, RFC 7515 §4.1.11) ------------------------------------------


@pytest.mark.parametrize(
    "header",
    [{"b64": False}, {"b64": "false"}, {"crit": ["b64"], "b64": False}, {"crit": ["exp"]}],
    ids=["b64-false", "b64-string", "crit-b64", "crit-other"],
)
def test_unencoded_payload_and_crit_are_malformed(header: dict[str, Any]) -> None:
    with raises_problem("malformed", 400):
        parse(make_jws(key_for("ES256"), header=header))


def test_b64_true_is_the_default_and_allowed() -> None:
    assert parse(make_jws(key_for("ES256"), header={"b64": True})).alg == "ES256"


# --- payload ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"[]", b'"string"', b"42", b"null", b"{not json", b'{"a": 1, "a": 2}', b"\xc3\x28"],
    ids=["array", "string", "number", "null", "invalid", "duplicate", "bad-utf8"],
)
def test_non_object_payload_is_malformed(payload: bytes) -> None:
    parsed = authenticate(make_jws(key_for("ES256"), payload=payload))
    with raises_problem("malformed", 400):
        parsed.json_payload()


# --- account keys -----------------------------------------------------------------------------


def test_rsa_1024_account_key_is_bad_public_key() -> None:
    key = rsa_key(1024)
    parsed = parse(make_jws(key, "RS256"))
    assert parsed.jwk is not None
    with raises_problem("badPublicKey", 400):
        jws.account_key_from_jwk(parsed.jwk)


def test_rsa_modulus_above_8192_bits_is_bad_public_key() -> None:
    # An odd 8200-bit number: the size check must not depend on the modulus being a real key.
    n = (1 << 8199) | 1
    with raises_problem("badPublicKey", 400):
        jws.account_key_from_jwk({"kty": "RSA", "n": b64_uint(n), "e": "AQAB"})


def test_rsa_even_modulus_is_bad_public_key() -> None:
    n = rsa_key().public_key().public_numbers().n + 1
    with raises_problem("badPublicKey", 400):
        jws.account_key_from_jwk({"kty": "RSA", "n": b64_uint(n), "e": "AQAB"})


@pytest.mark.parametrize("e", [2, 65536, 1, (1 << 64) + 1], ids=["2", "even", "1", "huge"])
def test_rsa_bad_public_exponent_is_bad_public_key(e: int) -> None:
    jwk = {**public_jwk(rsa_key()), "e": b64_uint(e)}
    with raises_problem("badPublicKey", 400):
        jws.account_key_from_jwk(jwk)


def test_rsa_modulus_with_leading_zero_is_malformed() -> None:
    # RFC 7518 §2: Base64urlUInt uses the minimum number of octets.
    n = rsa_key().public_key().public_numbers().n
    padded = b64(b"\x00" + n.to_bytes(256, "big"))
    with raises_problem("malformed", 400):
        jws.account_key_from_jwk({"kty": "RSA", "n": padded, "e": "AQAB"})


def test_p521_account_key_is_bad_public_key() -> None:
    with raises_problem("badPublicKey", 400):
        jws.account_key_from_jwk(public_jwk(ec_key("P-521")))


def test_p521_es512_request_is_rejected_at_alg() -> None:
    with raises_problem("badSignatureAlgorithm", 400):
        parse(make_jws(ec_key("P-521"), "ES512"))


@pytest.mark.parametrize("crv", ["secp256k1", "P-192", "p-256", None])
def test_other_ec_curves_are_bad_public_key(crv: str | None) -> None:
    jwk: dict[str, Any] = {**public_jwk(ec_key("P-256")), "crv": crv}
    with raises_problem("badPublicKey", 400):
        jws.account_key_from_jwk(jwk)


def test_ec_point_not_on_curve_is_bad_public_key() -> None:
    jwk = public_jwk(ec_key("P-256"))
    y = int.from_bytes(jws.b64url_decode(jwk["y"]), "big") ^ 1
    with raises_problem("badPublicKey", 400):
        jws.account_key_from_jwk({**jwk, "y": b64(y.to_bytes(32, "big"))})


def test_ec_coordinate_of_wrong_length_is_bad_public_key() -> None:
    jwk = public_jwk(ec_key("P-256"))
    with raises_problem("badPublicKey", 400):
        jws.account_key_from_jwk({**jwk, "x": b64(b"\x00" + jws.b64url_decode(jwk["x"]))})


def test_p384_key_with_p256_label_is_bad_public_key() -> None:
    with raises_problem("badPublicKey", 400):
        jws.account_key_from_jwk({**public_jwk(ec_key("P-384")), "crv": "P-256"})


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "OKP", "crv": "Ed448", "x": b64(b"\x01" * 57)},
        {"kty": "OKP", "crv": "X25519", "x": b64(b"\x01" * 32)},
        {"kty": "OKP", "crv": "Ed25519", "x": b64(b"\x01" * 31)},
    ],
    ids=["Ed448", "X25519", "short-x"],
)
def test_other_okp_keys_are_bad_public_key(jwk: dict[str, str]) -> None:
    with raises_problem("badPublicKey", 400):
        jws.account_key_from_jwk(jwk)


def test_ed448_request_is_rejected() -> None:
    raw = Ed448PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    with raises_problem("badPublicKey", 400):
        jws.account_key_from_jwk({"kty": "OKP", "crv": "Ed448", "x": b64(raw)})


@pytest.mark.parametrize("kty", ["oct", "DSA", "rsa"])
def test_unknown_key_type_is_bad_public_key(kty: str) -> None:
    with raises_problem("badPublicKey", 400):
        jws.account_key_from_jwk({"kty": kty, "n": "AQAB", "e": "AQAB"})


@pytest.mark.parametrize("jwk", [{}, {"kty": 1}, {"kty": "RSA"}, {"kty": "RSA", "n": 5, "e": 3}])
def test_incomplete_jwk_is_malformed(jwk: dict[str, Any]) -> None:
    with raises_problem("malformed", 400):
        jws.account_key_from_jwk(jwk)


def test_jwk_that_is_not_an_object_is_malformed() -> None:
    not_a_mapping: Any = ["kty", "RSA"]
    with raises_problem("malformed", 400):
        jws.account_key_from_jwk(not_a_mapping)


def _private_jwk(key: PrivateKey) -> dict[str, str]:
    jwk = public_jwk(key)
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        jwk.update(
            d=b64_uint(numbers.d),
            p=b64_uint(numbers.p),
            q=b64_uint(numbers.q),
            dp=b64_uint(numbers.dmp1),
            dq=b64_uint(numbers.dmq1),
            qi=b64_uint(numbers.iqmp),
        )
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        jwk["d"] = b64(key.private_numbers().private_value.to_bytes(32, "big"))
    else:
        jwk["d"] = b64(key.private_bytes_raw())
    return jwk


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_private_key_material_in_jwk_is_rejected(alg: str) -> None:
    key = key_for(alg)
    parsed = parse(make_jws(key, alg, header={"jwk": _private_jwk(key)}))
    assert parsed.jwk is not None
    with raises_problem("malformed", 400) as info:
        jws.account_key_from_jwk(parsed.jwk)
    assert "private" in info.value.detail


def test_symmetric_jwk_is_rejected() -> None:
    with raises_problem("malformed", 400):
        jws.account_key_from_jwk({"kty": "oct", "k": b64(b"secret")})


def test_account_key_serializes_to_the_public_jwk() -> None:
    for alg in ("RS256", "ES256", "ES384", "EdDSA"):
        jwk = public_jwk(key_for(alg))
        assert jws.account_key_from_jwk({**jwk, "use": "sig"}).to_json() == jwk


def test_okp_account_keys_compare_and_hash_by_value() -> None:
    jwk = public_jwk(ed25519_key())
    assert jws.account_key_from_jwk(jwk) == jws.account_key_from_jwk(dict(jwk))
    assert len({jws.account_key_from_jwk(jwk), jws.account_key_from_jwk(dict(jwk))}) == 1


# --- signature verification -------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256", "PS256", "EdDSA"])
def test_tampered_payload_is_malformed(alg: str) -> None:
    document = make_jws(key_for(alg), alg, payload=b'{"identifiers": []}')
    document["payload"] = b64(b'{"identifiers": [1]}')
    with raises_problem("malformed", 400) as info:
        authenticate(document)
    assert info.value.detail == "JWS signature is invalid"


def test_tampered_protected_header_is_malformed() -> None:
    key = key_for("ES256")
    good = make_jws(key)
    other = make_jws(key, header={"nonce": b64(b"another nonce")})
    with raises_problem("malformed", 400):
        authenticate({**good, "protected": other["protected"]})


def test_signature_by_another_key_is_malformed() -> None:
    key = key_for("ES256")
    impostor = ec.generate_private_key(ec.SECP256R1())
    document = make_jws(impostor, "ES256", header={"jwk": public_jwk(key)})
    with raises_problem("malformed", 400):
        authenticate(document)


@pytest.mark.parametrize(
    ("key_alg", "header_alg"),
    [
        ("ES256", "ES384"),
        ("ES384", "ES256"),
        ("ES256", "RS256"),
        ("RS256", "ES256"),
        ("RS256", "EdDSA"),
        ("EdDSA", "ES256"),
        ("EdDSA", "PS256"),
    ],
)
def test_alg_not_matching_key_type_is_bad_signature_algorithm(
    key_alg: str, header_alg: str
) -> None:
    document = make_jws(key_for(key_alg), header_alg, sign_as=key_alg)
    with raises_problem("badSignatureAlgorithm", 400) as info:
        authenticate(document)
    assert info.value.algorithms == list(jws.ALLOWED_ALGORITHMS)


@pytest.mark.parametrize(("header_alg", "sign_as"), [("RS256", "PS256"), ("PS256", "RS256")])
def test_rsa_padding_confusion_is_malformed(header_alg: str, sign_as: str) -> None:
    document = make_jws(rsa_key(), header_alg, sign_as=sign_as)
    with raises_problem("malformed", 400):
        authenticate(document)


@pytest.mark.parametrize(
    "salt_length", [32, padding.PSS.MAX_LENGTH, 0], ids=["hash-length", "josepy-max", "empty"]
)
def test_ps256_accepts_any_salt_length(salt_length: int) -> None:
    # RFC 7518 §3.5 asks for a 32-byte salt, but josepy-based clients sign with the maximum.
    key = rsa_key()
    document = make_jws(key, "PS256")
    signing_input = f"{document['protected']}.{document['payload']}".encode()
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt_length)
    signature = key.sign(signing_input, pss, hashes.SHA256())
    authenticate({**document, "signature": b64(signature)})


def test_der_encoded_ecdsa_signature_is_malformed() -> None:
    key = key_for("ES256")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    document = make_jws(key, "ES256")
    signing_input = f"{document['protected']}.{document['payload']}".encode()
    der = key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    with raises_problem("malformed", 400) as info:
        authenticate({**document, "signature": b64(der)})
    assert "64 bytes" in info.value.detail


def test_verify_signature_enforces_key_policy_on_any_key() -> None:
    small = rsa_key(1024)
    parsed = parse(make_jws(small, "RS256"))
    with raises_problem("badPublicKey", 400):
        jws.verify_signature(parsed, JWKRSA(key=small.public_key()))


def test_verify_signature_accepts_a_private_josepy_key() -> None:
    key = rsa_key()
    jws.verify_signature(parse(make_jws(key, "RS256")), JWKRSA(key=key))


# --- thumbprints and key authorizations (RFC 7638, RFC 8555 §8.1) -----------------------------

RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_"
        "FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhA"
        "I4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}


def test_rfc7638_rsa_thumbprint() -> None:
    assert jws.jwk_thumbprint(RFC7638_JWK) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_rfc8037_ed25519_thumbprint() -> None:
    okp = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jws.jwk_thumbprint(okp) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


@pytest.mark.parametrize("alg", ["ES256", "ES384"])
def test_ec_thumbprint_matches_rfc7638_construction(alg: str) -> None:
    jwk = public_jwk(key_for(alg))
    canonical = json.dumps(
        {name: jwk[name] for name in ("crv", "kty", "x", "y")}, separators=(",", ":")
    )
    expected = b64(hashlib.sha256(canonical.encode()).digest())
    reordered = {"use": "sig", **dict(reversed(list(jwk.items())))}
    assert jws.jwk_thumbprint(reordered) == expected


def test_key_authorization() -> None:
    token = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
    assert jws.key_authorization(token, RFC7638_JWK) == (
        token + ".NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    )


@pytest.mark.parametrize("token", ["", "a.b", "a=", "a b"])
def test_key_authorization_refuses_a_token_that_is_not_base64url(token: str) -> None:
    with pytest.raises(ValueError):
        jws.key_authorization(token, RFC7638_JWK)


# --- External Account Binding (§7.3.4) --------------------------------------------------------

EAB_KID = "kid-1"
EAB_KEY = b"\x17" * 32


def make_eab(
    jwk: Any,
    *,
    alg: str = "HS256",
    mac_key: bytes = EAB_KEY,
    header: dict[str, Any] | None = None,
    omit: tuple[str, ...] = (),
) -> dict[str, str]:
    protected: dict[str, Any] = {"alg": alg, "kid": EAB_KID, "url": NEW_ACCOUNT_URL}
    protected.update(header or {})
    for name in omit:
        protected.pop(name, None)
    protected_b64 = b64_json(protected)
    payload_b64 = b64_json(jwk)
    digest = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}.get(alg, "sha256")
    mac = hmac.new(mac_key, f"{protected_b64}.{payload_b64}".encode(), digest).digest()
    return {"protected": protected_b64, "payload": payload_b64, "signature": b64(mac)}


def lookup(kid: str) -> bytes | None:
    return {EAB_KID: EAB_KEY, "empty": b""}.get(kid)


def verify_eab(outer_jwk: dict[str, str], eab: Any) -> str:
    return jws.verify_eab(outer_jwk, eab, NEW_ACCOUNT_URL, lookup)


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_valid_eab_returns_kid(alg: str) -> None:
    jwk = public_jwk(key_for("ES256"))
    assert verify_eab(jwk, make_eab(jwk, alg=alg)) == EAB_KID


def test_eab_payload_compares_as_json_not_bytes() -> None:
    jwk = public_jwk(key_for("ES256"))
    reordered = dict(reversed(list(jwk.items())))
    assert verify_eab(jwk, make_eab(reordered)) == EAB_KID


def test_eab_wrong_mac_is_unauthorized() -> None:
    jwk = public_jwk(key_for("ES256"))
    with raises_problem("unauthorized", 403):
        verify_eab(jwk, make_eab(jwk, mac_key=b"\x18" * 32))


def test_eab_mac_over_different_header_is_unauthorized() -> None:
    jwk = public_jwk(key_for("ES256"))
    eab = make_eab(jwk)
    eab["protected"] = make_eab(jwk, header={"extra": 1})["protected"]
    with raises_problem("unauthorized", 403):
        verify_eab(jwk, eab)


def test_eab_wrong_url_is_unauthorized() -> None:
    jwk = public_jwk(key_for("ES256"))
    with raises_problem("unauthorized", 403):
        verify_eab(jwk, make_eab(jwk, header={"url": URL}))


def test_eab_payload_not_equal_to_outer_key_is_unauthorized() -> None:
    outer = public_jwk(key_for("ES256"))
    other = public_jwk(key_for("ES384"))
    with raises_problem("unauthorized", 403):
        verify_eab(outer, make_eab(other))


@pytest.mark.parametrize("kid", ["unknown-kid", "empty"])
def test_eab_unknown_kid_is_unauthorized(kid: str) -> None:
    jwk = public_jwk(key_for("ES256"))
    with raises_problem("unauthorized", 403):
        verify_eab(jwk, make_eab(jwk, header={"kid": kid}))


def test_eab_with_nonce_is_malformed() -> None:
    jwk = public_jwk(key_for("ES256"))
    with raises_problem("malformed", 400):
        verify_eab(jwk, make_eab(jwk, header={"nonce": NONCE}))


@pytest.mark.parametrize("alg", ["RS256", "ES256", "none", "HS1"])
def test_eab_with_non_mac_alg_is_malformed(alg: str) -> None:
    jwk = public_jwk(key_for("ES256"))
    with raises_problem("malformed", 400):
        verify_eab(jwk, make_eab(jwk, header={"alg": alg}))


@pytest.mark.parametrize("omit", ["alg", "kid", "url"])
def test_eab_missing_header_parameter_is_malformed(omit: str) -> None:
    jwk = public_jwk(key_for("ES256"))
    with raises_problem("malformed", 400):
        verify_eab(jwk, make_eab(jwk, omit=(omit,)))


def test_eab_not_flattened_is_malformed() -> None:
    jwk = public_jwk(key_for("ES256"))
    eab = make_eab(jwk)
    general = {
        "payload": eab["payload"],
        "signatures": [{"protected": eab["protected"], "signature": eab["signature"]}],
    }
    with raises_problem("malformed", 400):
        verify_eab(jwk, general)


@pytest.mark.parametrize("eab", ["a string", None, ["x"]], ids=repr)
def test_eab_that_is_not_an_object_is_malformed(eab: Any) -> None:
    with raises_problem("malformed", 400):
        verify_eab(public_jwk(key_for("ES256")), eab)


def test_eab_payload_that_is_not_json_is_malformed_after_the_mac() -> None:
    jwk = public_jwk(key_for("ES256"))
    protected_b64 = b64_json({"alg": "HS256", "kid": EAB_KID, "url": NEW_ACCOUNT_URL})
    payload_b64 = b64(b"not json")
    mac = hmac.new(EAB_KEY, f"{protected_b64}.{payload_b64}".encode(), "sha256").digest()
    eab = {"protected": protected_b64, "payload": payload_b64, "signature": b64(mac)}
    with raises_problem("malformed", 400):
        verify_eab(jwk, eab)


# --- nonces (§6.5) ----------------------------------------------------------------------------


def parsed_with_nonce(nonce: str) -> jws.ParsedJWS:
    return parse(make_jws(key_for("ES256"), header={"nonce": nonce}))


def test_issued_nonce_is_accepted_once() -> None:
    store = jws.InMemoryNonceStore()
    parsed = parsed_with_nonce(store.new_nonce())
    jws.check_nonce(parsed, store)
    with raises_problem("badNonce", 400):
        jws.check_nonce(parsed, store)


def test_unknown_nonce_is_bad_nonce() -> None:
    store = jws.InMemoryNonceStore()
    store.new_nonce()
    with raises_problem("badNonce", 400):
        jws.check_nonce(parsed_with_nonce(NONCE), store)


def test_expired_nonce_is_bad_nonce() -> None:
    clock = FakeClock()
    store = jws.InMemoryNonceStore(clock=clock, lifetime=timedelta(minutes=5))
    parsed = parsed_with_nonce(store.new_nonce())
    clock.advance(timedelta(minutes=5))
    with raises_problem("badNonce", 400):
        jws.check_nonce(parsed, store)


def test_nonce_just_before_expiry_is_accepted() -> None:
    clock = FakeClock()
    store = jws.InMemoryNonceStore(clock=clock, lifetime=timedelta(minutes=5))
    parsed = parsed_with_nonce(store.new_nonce())
    clock.advance(timedelta(minutes=5) - timedelta(microseconds=1))
    jws.check_nonce(parsed, store)


def test_expired_nonces_are_forgotten() -> None:
    clock = FakeClock()
    store = jws.InMemoryNonceStore(clock=clock, lifetime=timedelta(seconds=10))
    for _ in range(5):
        store.new_nonce()
    clock.advance(timedelta(seconds=11))
    store.new_nonce()
    assert len(store) == 1


def test_oldest_nonce_is_evicted_beyond_max_outstanding() -> None:
    store = jws.InMemoryNonceStore(max_outstanding=2)
    first, second, third = store.new_nonce(), store.new_nonce(), store.new_nonce()
    assert not store.consume(first)
    assert store.consume(second)
    assert store.consume(third)


def test_new_nonces_are_unique_and_well_formed() -> None:
    store = jws.InMemoryNonceStore()
    nonces = {store.new_nonce() for _ in range(200)}
    assert len(nonces) == 200
    for nonce in nonces:
        assert len(jws.b64url_decode(nonce)) == 16
        assert jws.check_nonce_present({"nonce": nonce}) == nonce


@pytest.mark.parametrize(
    "kwargs",
    [{"lifetime": timedelta(0)}, {"lifetime": timedelta(seconds=-1)}, {"max_outstanding": 0}],
)
def test_nonce_store_rejects_nonsense_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        jws.InMemoryNonceStore(**kwargs)


def test_in_memory_store_satisfies_the_protocol() -> None:
    store: jws.NonceStore = jws.InMemoryNonceStore()
    assert store.consume(store.new_nonce())
