"""Authentication of ACME requests: the flattened JWS of RFC 8555 §6.2-6.5 and EAB (§7.3.4).

Each rule is one small function that raises :class:`~acme.problems.AcmeProblem`. Every check
runs on the raw JSON before any key object is built, because josepy 2.2 fails with KeyError on
``alg: none``, with TypeError on ``HS256`` under an RSA key, and knows no EdDSA; signatures are
verified with ``cryptography`` directly.

The web edge is expected to call, in this order::

    parsed = parse_jws(body, content_type, request_url)     # §6.2, §6.4, shape of §6.5
    check_jwk_only_where_allowed(parsed, jwk_allowed=...)   # §6.2
    key = account_key_from_jwk(parsed.jwk or stored_jwk)    # account key policy
    verify_signature(parsed, key)                           # §6.2
    check_nonce(parsed, nonce_store)                        # §6.5

The nonce is consumed only after the signature verifies (as Boulder does), so a request nobody
signed changes no server state.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from josepy.jwk import JWK, JWKEC, JWKRSA

from acme import problems

ALLOWED_ALGORITHMS: Final = ("ES256", "ES384", "RS256", "PS256", "EdDSA")
MAX_BODY_BYTES: Final = 64 * 1024
JOSE_CONTENT_TYPE: Final = "application/jose+json"

MIN_RSA_MODULUS_BITS: Final = 2048
MAX_RSA_MODULUS_BITS: Final = 8192
# No real key uses a public exponent wider than 32 bits; a huge one only makes every
# verification cost as much as a private-key operation.
MAX_RSA_EXPONENT_BITS: Final = 32

EAB_ALGORITHMS: Final[Mapping[str, str]] = {
    "HS256": "sha256",
    "HS384": "sha384",
    "HS512": "sha512",
}

DEFAULT_NONCE_LIFETIME: Final = timedelta(minutes=15)
DEFAULT_MAX_OUTSTANDING_NONCES: Final = 100_000

_FLATTENED_MEMBERS: Final = frozenset({"protected", "payload", "signature"})
# RFC 7518 §6.2.2 and §6.3.2 (and "k" of §6.4.1): members that only a private or symmetric key has.
_PRIVATE_JWK_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_B64URL_ALPHABET: Final = re.compile(r"[A-Za-z0-9_-]*")

_EC_CURVES: Final[Mapping[str, ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
}
# RFC 7518 §3.4: an ECDSA JWS signature is R || S, each the full coordinate size.
_ECDSA_ALGORITHMS: Final[Mapping[str, tuple[str, int, hashes.HashAlgorithm]]] = {
    "ES256": ("secp256r1", 32, hashes.SHA256()),
    "ES384": ("secp384r1", 48, hashes.SHA384()),
}

AccountPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | Ed25519PublicKey


# --- base64url and JSON, strictly -------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    """RFC 7515 §2: base64url with the trailing ``=`` removed."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(value: str) -> bytes:
    """Decode RFC 7515 §2 base64url, accepting exactly one spelling per octet string.

    Padding, whitespace and characters outside the URL-safe alphabet are errors (the standard
    library would silently skip them), and so are non-zero pad bits (RFC 4648 §3.5 lets a
    decoder reject them), so that two different strings never decode to the same bytes.

    :raises ValueError: if ``value`` is not canonical unpadded base64url.
    """
    if not _B64URL_ALPHABET.fullmatch(value) or len(value) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        decoded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except binascii.Error as error:
        raise ValueError("not unpadded base64url") from error
    if b64url_encode(decoded) != value:
        raise ValueError("base64url with non-zero pad bits")
    return decoded


def _reject_duplicate_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7515 §4 / RFC 7516 §4: parsers MUST reject duplicate header names or take the last
    # one; taking one silently lets two parsers see two different headers, so reject.
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError("duplicate member name")
        result[name] = value
    return result


def _reject_constant(name: str) -> Any:
    # RFC 8259 §6: NaN and Infinity are not JSON numbers.
    raise ValueError(f"{name} is not valid JSON")


def _strict_json_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse UTF-8 JSON (RFC 8259 §8.1) that must be an object with unique member names."""
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_reject_duplicate_members,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError) as error:
        # ValueError covers bad UTF-8, bad JSON, duplicates and over-long integers;
        # RecursionError is a deeply nested document.
        raise problems.malformed(f"{what} is not valid JSON") from error
    if not isinstance(value, dict):
        raise problems.malformed(f"{what} must be a JSON object")
    return value


# --- the parsed request ---------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedJWS:
    """A flattened JWS whose shape has been checked; its signature has NOT been verified."""

    protected: dict[str, Any]
    protected_b64: str
    payload_b64: str
    signature: bytes
    alg: str
    nonce: str
    url: str
    jwk: dict[str, Any] | None
    kid: str | None
    payload: bytes

    @property
    def is_post_as_get(self) -> bool:
        """RFC 8555 §6.3: a POST-as-GET carries the empty string as its payload."""
        return self.payload_b64 == ""

    @property
    def signing_input(self) -> bytes:
        """RFC 7515 §5.1 step 8: ASCII(BASE64URL(protected) || '.' || BASE64URL(payload))."""
        return f"{self.protected_b64}.{self.payload_b64}".encode("ascii")

    def json_payload(self) -> dict[str, Any]:
        """The payload as a JSON object (RFC 8555 §7: every resource request body is one)."""
        if self.is_post_as_get:
            raise problems.malformed("Request payload is empty; this resource needs a JSON object")
        return _strict_json_object(self.payload, "JWS payload")


@dataclass(frozen=True)
class _Flattened:
    protected_b64: str
    payload_b64: str
    signature_b64: str


# --- RFC 8555 §6.2-6.5: one function per rule ------------------------------------------------


def check_content_type(content_type: str | None) -> None:
    """RFC 8555 §6.2: a JWS body must be sent as ``application/jose+json``, else 415.

    Media type parameters are ignored and the type compares case-insensitively (RFC 9110
    §8.3.1).
    """
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != JOSE_CONTENT_TYPE:
        raise problems.unsupported_media_type(f"Request Content-Type must be {JOSE_CONTENT_TYPE}")


def check_body_size(body: bytes) -> None:
    """Bound the work an unauthenticated request can cause (RFC 9110 §15.5.14, 413).

    No ACME request comes near the limit: the largest is a finalize carrying a CSR.
    """
    if len(body) > MAX_BODY_BYTES:
        raise problems.payload_too_large(f"Request body is larger than {MAX_BODY_BYTES} bytes")


def check_flattened_members(document: Mapping[str, Any], what: str = "JWS") -> None:
    """RFC 8555 §6.2: only the Flattened JSON Serialization (RFC 7515 §7.2.2), one signature,
    no unprotected header, nothing else."""
    if "signatures" in document:
        raise problems.malformed(
            f"{what} must use the flattened JSON serialization with a single signature"
        )
    if "header" in document:
        raise problems.malformed(f"{what} must not have an unprotected header")
    unexpected = set(document) - _FLATTENED_MEMBERS
    if unexpected:
        raise problems.malformed(
            f"{what} has unexpected members; only protected, payload and signature are allowed"
        )
    missing = _FLATTENED_MEMBERS - set(document)
    if missing:
        raise problems.malformed(f"{what} is missing {', '.join(sorted(missing))}")
    for member in sorted(_FLATTENED_MEMBERS):
        if not isinstance(document[member], str):
            raise problems.malformed(f"{what} member {member} must be a string")


def _flattened_from_document(document: Mapping[str, Any], what: str) -> _Flattened:
    check_flattened_members(document, what)
    return _Flattened(
        protected_b64=document["protected"],
        payload_b64=document["payload"],
        signature_b64=document["signature"],
    )


def decode_protected_header(protected_b64: str, what: str = "JWS") -> dict[str, Any]:
    """RFC 7515 §5.2 steps 2-4: the protected header is base64url of a UTF-8 JSON object.

    RFC 8555 §6.2 puts every header parameter there, so an empty one is an error.
    """
    if protected_b64 == "":
        raise problems.malformed(f"{what} protected header is missing")
    try:
        raw = b64url_decode(protected_b64)
    except ValueError as error:
        raise problems.malformed(f"{what} protected header is not valid base64url") from error
    return _strict_json_object(raw, f"{what} protected header")


def check_algorithm(protected: Mapping[str, Any]) -> str:
    """RFC 8555 §6.2: ``alg`` must be an asymmetric signature algorithm the server supports,
    never ``none`` or a MAC; otherwise badSignatureAlgorithm listing the supported values."""
    alg = protected.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        raise problems.bad_signature_algorithm(
            "JWS signature algorithm is missing or not supported; supported algorithms are "
            + ", ".join(ALLOWED_ALGORITHMS),
            ALLOWED_ALGORITHMS,
        )
    return alg


def check_nonce_present(protected: Mapping[str, Any]) -> str:
    """RFC 8555 §6.5 and §6.5.2: a protected ``nonce`` that is base64url; an absent or
    unusable nonce is badNonce, which tells the client to retry with a fresh one."""
    nonce = protected.get("nonce")
    if not isinstance(nonce, str) or nonce == "":
        raise problems.bad_nonce("JWS has no anti-replay nonce")
    try:
        b64url_decode(nonce)
    except ValueError as error:
        raise problems.bad_nonce("JWS anti-replay nonce is not valid base64url") from error
    return nonce


def check_url(protected: Mapping[str, Any], request_url: str) -> str:
    """RFC 8555 §6.4: the protected ``url`` must be exactly the URL the request was sent to;
    a mismatch is unauthorized, so a signed request cannot be replayed at another resource."""
    url = protected.get("url")
    if not isinstance(url, str) or url == "":
        raise problems.malformed("JWS protected header must contain the url parameter")
    if url != request_url:
        raise problems.unauthorized("JWS url parameter does not match the request URL")
    return url


def check_key_reference(protected: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """RFC 8555 §6.2: exactly one of ``jwk`` (an embedded key) or ``kid`` (an account URL)."""
    has_jwk = "jwk" in protected
    has_kid = "kid" in protected
    if has_jwk and has_kid:
        raise problems.malformed("JWS protected header must not contain both jwk and kid")
    if not has_jwk and not has_kid:
        raise problems.malformed("JWS protected header must contain either jwk or kid")
    if has_jwk:
        jwk = protected["jwk"]
        if not isinstance(jwk, dict):
            raise problems.malformed("JWS jwk parameter must be a JSON object")
        return jwk, None
    kid = protected["kid"]
    if not isinstance(kid, str) or kid == "":
        raise problems.malformed("JWS kid parameter must be a non-empty string")
    return None, kid


def check_no_extensions(protected: Mapping[str, Any], what: str = "JWS") -> None:
    """RFC 8555 §6.2 forbids the unencoded payload option (RFC 7797 ``b64``), and RFC 7515
    §4.1.11 requires rejecting any ``crit`` extension the server does not implement (none)."""
    if "b64" in protected and protected["b64"] is not True:
        raise problems.malformed(f"{what} must not use the unencoded payload option (b64)")
    if "crit" in protected:
        raise problems.malformed(f"{what} must not declare critical header extensions (crit)")


def _decode_payload(payload_b64: str, what: str = "JWS") -> bytes:
    """RFC 7515 §5.2 step 6; an empty payload is the POST-as-GET of RFC 8555 §6.3."""
    try:
        return b64url_decode(payload_b64)
    except ValueError as error:
        raise problems.malformed(f"{what} payload is not valid base64url") from error


def _decode_signature(signature_b64: str, what: str = "JWS") -> bytes:
    """RFC 7515 §5.2 step 7."""
    try:
        signature = b64url_decode(signature_b64)
    except ValueError as error:
        raise problems.malformed(f"{what} signature is not valid base64url") from error
    if not signature:
        raise problems.malformed(f"{what} signature is empty")
    return signature


def parse_jws(body: bytes, content_type: str | None, request_url: str) -> ParsedJWS:
    """Check an ACME POST body against RFC 8555 §6.2-6.5 without verifying its signature.

    Raises AcmeProblem naming the first rule the request breaks.
    """
    check_content_type(content_type)
    check_body_size(body)
    flattened = _flattened_from_document(_strict_json_object(body, "Request body"), "JWS")
    protected = decode_protected_header(flattened.protected_b64)
    alg = check_algorithm(protected)
    nonce = check_nonce_present(protected)
    url = check_url(protected, request_url)
    jwk, kid = check_key_reference(protected)
    check_no_extensions(protected)
    return ParsedJWS(
        protected=protected,
        protected_b64=flattened.protected_b64,
        payload_b64=flattened.payload_b64,
        signature=_decode_signature(flattened.signature_b64),
        alg=alg,
        nonce=nonce,
        url=url,
        jwk=jwk,
        kid=kid,
        payload=_decode_payload(flattened.payload_b64),
    )


def check_jwk_only_where_allowed(
    parsed: ParsedJWS, jwk_allowed: bool, *, kid_allowed: bool = True
) -> None:
    """RFC 8555 §6.2: only newAccount and revokeCert signed by the certificate key may embed
    a ``jwk``; every other request names its account with ``kid``.

    newAccount passes ``jwk_allowed=True, kid_allowed=False`` (§7.3: there is no account yet);
    revokeCert passes ``jwk_allowed=True`` (§7.6 allows either); everything else passes
    ``jwk_allowed=False``.
    """
    if not jwk_allowed and not kid_allowed:
        raise ValueError("a request must be allowed to use jwk or kid")
    if parsed.jwk is not None and not jwk_allowed:
        raise problems.malformed(
            "This request must be signed by an account key named by kid, not an embedded jwk"
        )
    if parsed.kid is not None and not kid_allowed:
        raise problems.malformed("This request must be signed by a key embedded as jwk, not kid")


# --- account keys ---------------------------------------------------------------------------


class JWKOKP(JWK):
    """An Ed25519 public key as an RFC 8037 §2 ``OKP`` JWK, which josepy 2.2 lacks.

    Deliberately not added to josepy's global ``JWK.TYPES`` registry: only
    :func:`account_key_from_jwk` builds these, after checking the key.
    """

    typ = "OKP"
    __slots__ = ("key",)
    required = ("crv", JWK.type_field_name, "x")
    cryptography_key_types = (Ed25519PublicKey,)
    key: Ed25519PublicKey

    def fields_to_partial_json(self) -> dict[str, Any]:
        raw = self.key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"crv": "Ed25519", "x": b64url_encode(raw)}

    @classmethod
    def fields_from_json(cls, jobj: Mapping[str, Any]) -> JWKOKP:
        return cls(key=_ed25519_public_key(jobj))

    def public_key(self) -> JWKOKP:
        return self

    def __hash__(self) -> int:
        # cryptography's Ed25519 keys are unhashable; josepy's other JWKs hash, so hash the
        # raw public bytes to keep JWKOKP usable the same way (sets, dict keys).
        return hash((type(self), self.key.public_bytes(Encoding.Raw, PublicFormat.Raw)))


def _string_member(jwk: Mapping[str, Any], name: str) -> str:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise problems.malformed(f"JWK member {name} must be a string")
    return value


def _fixed_length_member(jwk: Mapping[str, Any], name: str, length: int) -> bytes:
    """RFC 7518 §6.2.1.2-3 and RFC 8037 §2: coordinates are full-length octet strings."""
    try:
        raw = b64url_decode(_string_member(jwk, name))
    except ValueError as error:
        raise problems.malformed(f"JWK member {name} is not valid base64url") from error
    if len(raw) != length:
        raise problems.bad_public_key(f"JWK member {name} must be {length} bytes")
    return raw


def _uint_member(jwk: Mapping[str, Any], name: str) -> int:
    """RFC 7518 §2 Base64urlUInt: big-endian, non-empty, in the minimum number of octets.

    Rejecting leading zeros keeps one JWK spelling per key, so the RFC 7638 thumbprint a
    client computes is the one the server computes.
    """
    try:
        raw = b64url_decode(_string_member(jwk, name))
    except ValueError as error:
        raise problems.malformed(f"JWK member {name} is not valid base64url") from error
    if not raw or (raw[0] == 0 and len(raw) > 1):
        raise problems.malformed(f"JWK member {name} is not a minimal Base64urlUInt")
    return int.from_bytes(raw, "big")


def check_no_private_members(jwk: Mapping[str, Any]) -> None:
    """RFC 7515 §4.1.3: ``jwk`` is the public key; private or symmetric members mean the
    client is leaking a secret, which the server must not store."""
    if _PRIVATE_JWK_MEMBERS & set(jwk):
        raise problems.malformed("JWK contains private key material")


def _rsa_public_key(jwk: Mapping[str, Any]) -> rsa.RSAPublicKey:
    """RFC 7518 §6.3.1."""
    n = _uint_member(jwk, "n")
    e = _uint_member(jwk, "e")
    try:
        return rsa.RSAPublicNumbers(e=e, n=n).public_key()
    except ValueError as error:
        raise problems.bad_public_key("JWK is not a valid RSA public key") from error


def _ec_public_key(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    """RFC 7518 §6.2.1; only the curves of :data:`_EC_CURVES` are accepted."""
    crv = jwk.get("crv")
    curve = _EC_CURVES.get(crv) if isinstance(crv, str) else None
    if curve is None:
        raise problems.bad_public_key(
            "EC account keys must use curve " + " or ".join(sorted(_EC_CURVES))
        )
    size = (curve.key_size + 7) // 8
    x = int.from_bytes(_fixed_length_member(jwk, "x", size), "big")
    y = int.from_bytes(_fixed_length_member(jwk, "y", size), "big")
    try:
        return ec.EllipticCurvePublicNumbers(x=x, y=y, curve=curve).public_key()
    except ValueError as error:
        raise problems.bad_public_key("JWK point is not on its curve") from error


def _ed25519_public_key(jwk: Mapping[str, Any]) -> Ed25519PublicKey:
    """RFC 8037 §2; Ed448 and the X25519/X448 key-agreement curves cannot sign ACME requests."""
    if jwk.get("crv") != "Ed25519":
        raise problems.bad_public_key("OKP account keys must use curve Ed25519")
    raw = _fixed_length_member(jwk, "x", 32)
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as error:
        raise problems.bad_public_key("JWK is not a valid Ed25519 public key") from error


def check_account_key_policy(key: AccountPublicKey) -> None:
    """Account keys are RSA of 2048-8192 bits, ECDSA P-256/P-384, or Ed25519.

    Checked on the cryptography key, so a key that reaches :func:`verify_signature` by any
    path obeys the same policy.
    """
    if isinstance(key, rsa.RSAPublicKey):
        bits = key.key_size
        if not MIN_RSA_MODULUS_BITS <= bits <= MAX_RSA_MODULUS_BITS:
            raise problems.bad_public_key(
                f"RSA account keys must be {MIN_RSA_MODULUS_BITS} to {MAX_RSA_MODULUS_BITS} bits"
            )
        numbers = key.public_numbers()
        if numbers.n % 2 == 0:
            raise problems.bad_public_key("RSA modulus must be odd")
        if numbers.e.bit_length() > MAX_RSA_EXPONENT_BITS:
            raise problems.bad_public_key("RSA public exponent is too large")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in {curve.name for curve in _EC_CURVES.values()}:
            raise problems.bad_public_key(
                "EC account keys must use curve " + " or ".join(sorted(_EC_CURVES))
            )
        return
    if isinstance(key, Ed25519PublicKey):
        return
    raise problems.bad_public_key("Unsupported account key type")


def account_key_from_jwk(jwk: Mapping[str, Any]) -> JWK:
    """Build an account key from a public JWK, enforcing :func:`check_account_key_policy`.

    Anything outside the policy is badPublicKey; JSON that is not a public JWK is malformed.
    """
    if not isinstance(jwk, Mapping):
        raise problems.malformed("JWK must be a JSON object")
    check_no_private_members(jwk)
    kty = jwk.get("kty")
    if not isinstance(kty, str):
        raise problems.malformed("JWK member kty must be a string")
    key: JWK
    if kty == "RSA":
        rsa_key = _rsa_public_key(jwk)
        check_account_key_policy(rsa_key)
        key = JWKRSA(key=rsa_key)
    elif kty == "EC":
        ec_key = _ec_public_key(jwk)
        check_account_key_policy(ec_key)
        key = JWKEC(key=ec_key)
    elif kty == "OKP":
        ed_key = _ed25519_public_key(jwk)
        check_account_key_policy(ed_key)
        key = JWKOKP(key=ed_key)
    else:
        raise problems.bad_public_key("Account keys must be RSA, EC or OKP (Ed25519)")
    return key


def _cryptography_public_key(key: JWK) -> AccountPublicKey:
    public = key.public_key()
    if isinstance(public, JWKOKP):
        return public.key
    # josepy wraps RSA and EC keys in a ComparableKey that forwards attribute access but is
    # not an instance of the cryptography type; rebuild from the public numbers instead of
    # reaching into the wrapper's private field.
    if isinstance(public, JWKRSA):
        rsa_numbers: rsa.RSAPublicNumbers = public.key.public_numbers()
        return rsa_numbers.public_key()
    if isinstance(public, JWKEC):
        ec_numbers: ec.EllipticCurvePublicNumbers = public.key.public_numbers()
        return ec_numbers.public_key()
    raise problems.bad_public_key("Unsupported account key type")


# --- signature verification -----------------------------------------------------------------


def _algorithms_for_key(key: AccountPublicKey) -> tuple[str, ...]:
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256", "PS256")
    if isinstance(key, Ed25519PublicKey):
        return ("EdDSA",)
    return tuple(alg for alg, (curve, _, _) in _ECDSA_ALGORITHMS.items() if key.curve.name == curve)


def check_algorithm_fits_key(alg: str, key: AccountPublicKey) -> None:
    """RFC 7518 §3.1 and RFC 8037 §3.1: each ``alg`` names one key type (and ECDSA one curve);
    accepting another would let a signature be checked under rules its signer never used."""
    if alg not in _algorithms_for_key(key):
        raise problems.bad_signature_algorithm(
            "JWS signature algorithm does not match the account key type", ALLOWED_ALGORITHMS
        )


def _verify_rsa(alg: str, key: rsa.RSAPublicKey, signature: bytes, data: bytes) -> None:
    """RFC 7518 §3.3 (RS256, PKCS#1 v1.5) and §3.5 (PS256).

    §3.5 says the PSS salt is as long as the hash, but josepy (so certbot) signs with the
    longest salt the key allows; the salt length does not weaken PSS, so any is accepted, as
    go-jose does.
    """
    pad: padding.AsymmetricPadding
    if alg == "PS256":
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
    else:
        pad = padding.PKCS1v15()
    key.verify(signature, data, pad, hashes.SHA256())


def _verify_ecdsa(alg: str, key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> None:
    """RFC 7518 §3.4: the JWS carries R || S, not the DER that cryptography verifies."""
    _, size, hash_algorithm = _ECDSA_ALGORITHMS[alg]
    if len(signature) != 2 * size:
        raise problems.malformed(f"{alg} signature must be {2 * size} bytes")
    r = int.from_bytes(signature[:size], "big")
    s = int.from_bytes(signature[size:], "big")
    key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hash_algorithm))


def stored_account_key(jwk: Mapping[str, Any]) -> AccountPublicKey:
    """An account's stored JWK as a policy-checked public key, for :func:`verify_signature`.

    Built once per distinct key in each process: rebuilding it checks the EC point twice (most
    of a request's key handling), and an account sends many requests with one key."""
    return _public_key_of(json.dumps(jwk, sort_keys=True, separators=(",", ":")))


@functools.lru_cache(maxsize=4096)
def _public_key_of(canonical_jwk: str) -> AccountPublicKey:
    public = _cryptography_public_key(account_key_from_jwk(json.loads(canonical_jwk)))
    check_account_key_policy(public)
    return public


def verify_signature(parsed: ParsedJWS, key: JWK | AccountPublicKey) -> None:
    """RFC 8555 §6.2 / RFC 7515 §5.2 step 8: the signature over the signing input verifies
    under ``key`` with the header's ``alg``; otherwise the request is malformed. ``key`` is a
    JWK from :func:`account_key_from_jwk` or a key from :func:`stored_account_key`."""
    if isinstance(key, JWK):
        public = _cryptography_public_key(key)
        check_account_key_policy(public)
    else:
        public = key
    check_algorithm_fits_key(parsed.alg, public)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            _verify_rsa(parsed.alg, public, parsed.signature, parsed.signing_input)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            _verify_ecdsa(parsed.alg, public, parsed.signature, parsed.signing_input)
        else:
            public.verify(parsed.signature, parsed.signing_input)
    except InvalidSignature as error:
        raise problems.malformed("JWS signature is invalid") from error


# --- thumbprints and key authorizations -----------------------------------------------------


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 §3 SHA-256 thumbprint, base64url, of an account key (RFC 8037 §2 for OKP).

    The key passes :func:`account_key_from_jwk` first, which admits only minimal encodings,
    so the canonical re-encoding hashed here equals the client's own members.
    """
    return _thumbprint_of(json.dumps(jwk, sort_keys=True, separators=(",", ":")))


@functools.lru_cache(maxsize=4096)
def _thumbprint_of(canonical_jwk: str) -> str:
    return b64url_encode(account_key_from_jwk(json.loads(canonical_jwk)).thumbprint(hashes.SHA256))


def key_authorization(token: str, jwk: Mapping[str, Any]) -> str:
    """RFC 8555 §8.1: ``token || '.' || base64url(Thumbprint(accountKey))``."""
    if not token or not _B64URL_ALPHABET.fullmatch(token):
        raise ValueError("challenge token must be non-empty base64url (RFC 8555 §8.1)")
    return f"{token}.{jwk_thumbprint(jwk)}"


# --- External Account Binding ---------------------------------------------------------------


def verify_eab(
    outer_jwk: Mapping[str, Any],
    eab_jws: Any,
    expected_url: str,
    lookup_hmac_key: Callable[[str], bytes | None],
) -> str:
    """RFC 8555 §7.3.4: check ``externalAccountBinding`` and return its key identifier.

    The binding is a flattened JWS MAC'd with a key the CA handed out: ``alg`` a MAC
    algorithm, ``kid`` the key identifier, ``url`` the outer ``url``, no ``nonce``, and the
    payload exactly the outer ``jwk``. Shape errors are malformed; an unknown key, a wrong MAC,
    a different URL or a different key are unauthorized.
    """
    what = "External account binding"
    if not isinstance(eab_jws, Mapping):
        raise problems.malformed(f"{what} must be a JSON object")
    flattened = _flattened_from_document(eab_jws, what)
    protected = decode_protected_header(flattened.protected_b64, what)

    alg = protected.get("alg")
    if not isinstance(alg, str) or alg not in EAB_ALGORITHMS:
        raise problems.malformed(
            f"{what} alg must be a MAC algorithm: " + ", ".join(EAB_ALGORITHMS)
        )
    if "nonce" in protected:
        raise problems.malformed(f"{what} must not contain a nonce")
    kid = protected.get("kid")
    if not isinstance(kid, str) or kid == "":
        raise problems.malformed(f"{what} kid must be a non-empty string")
    url = protected.get("url")
    if not isinstance(url, str):
        raise problems.malformed(f"{what} must contain the url parameter")
    check_no_extensions(protected, what)
    signature = _decode_signature(flattened.signature_b64, what)
    payload = _decode_payload(flattened.payload_b64, what)

    if url != expected_url:
        raise problems.unauthorized(f"{what} url does not match the request URL")
    hmac_key = lookup_hmac_key(kid)
    # An empty MAC key would let anyone compute the MAC, so it counts as no key at all.
    if not hmac_key:
        raise problems.unauthorized(f"{what} key identifier is not known")
    signing_input = f"{flattened.protected_b64}.{flattened.payload_b64}".encode("ascii")
    expected_mac = hmac.new(hmac_key, signing_input, EAB_ALGORITHMS[alg]).digest()
    if not hmac.compare_digest(expected_mac, signature):
        raise problems.unauthorized(f"{what} MAC is invalid")
    # Read only after the MAC verifies: the payload is attacker-controlled until then.
    bound_key = _strict_json_object(payload, f"{what} payload")
    if bound_key != dict(outer_jwk):
        raise problems.unauthorized(f"{what} payload is not the account key of this request")
    return kid


# --- nonces ---------------------------------------------------------------------------------


class NonceStore(Protocol):
    """Issues and redeems the anti-replay nonces of RFC 8555 §6.5."""

    def new_nonce(self) -> str:
        """A fresh nonce for a Replay-Nonce header (RFC 8555 §6.5.1)."""
        ...

    def consume(self, nonce: str) -> bool:
        """True exactly once for a nonce this store issued and that has not expired."""
        ...


def _utc_now() -> datetime:
    return datetime.now(UTC)


class InMemoryNonceStore:
    """A single-process :class:`NonceStore` for tests and development.

    Nonces are 128 random bits (RFC 8555 §6.5.1 and §10.2 need them unpredictable). The oldest
    outstanding nonces are forgotten beyond ``max_outstanding`` so memory stays bounded; a
    client holding one of those gets badNonce and retries, as §6.5 intends.
    """

    def __init__(
        self,
        clock: Callable[[], datetime] = _utc_now,
        lifetime: timedelta = DEFAULT_NONCE_LIFETIME,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING_NONCES,
    ) -> None:
        if lifetime <= timedelta(0):
            raise ValueError("nonce lifetime must be positive")
        if max_outstanding < 1:
            raise ValueError("max_outstanding must be at least 1")
        self._clock = clock
        self._lifetime = lifetime
        self._max_outstanding = max_outstanding
        # Insertion order is issue order, so the oldest nonce is always first.
        self._expiry_by_nonce: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def new_nonce(self) -> str:
        nonce = b64url_encode(secrets.token_bytes(16))
        with self._lock:
            now = self._clock()
            self._forget_expired(now)
            while len(self._expiry_by_nonce) >= self._max_outstanding:
                del self._expiry_by_nonce[next(iter(self._expiry_by_nonce))]
            self._expiry_by_nonce[nonce] = now + self._lifetime
        return nonce

    def consume(self, nonce: str) -> bool:
        with self._lock:
            expiry = self._expiry_by_nonce.pop(nonce, None)
            return expiry is not None and self._clock() < expiry

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry_by_nonce)

    def _forget_expired(self, now: datetime) -> None:
        while self._expiry_by_nonce:
            oldest = next(iter(self._expiry_by_nonce))
            if self._expiry_by_nonce[oldest] > now:
                return
            del self._expiry_by_nonce[oldest]


def check_nonce(parsed: ParsedJWS, store: NonceStore) -> None:
    """RFC 8555 §6.5: a nonce the server did not issue, already used or expired is badNonce."""
    if not store.consume(parsed.nonce):
        raise problems.bad_nonce("JWS anti-replay nonce is invalid, expired or already used")


def parse_key_change_inner(document: Any, outer_url: str) -> ParsedJWS:
    """RFC 8555 §7.3.5: the inner JWS of a key change is signed by the new key, carries it
    as ``jwk``, has the outer request's ``url`` and no ``nonce``. Signature not yet verified."""
    what = "Key change inner JWS"
    if not isinstance(document, Mapping):
        raise problems.malformed(f"{what} must be a JSON object")
    flattened = _flattened_from_document(document, what)
    protected = decode_protected_header(flattened.protected_b64, what)
    alg = check_algorithm(protected)
    if "nonce" in protected:
        raise problems.malformed(f"{what} must not contain a nonce")
    url = protected.get("url")
    if url != outer_url:
        raise problems.malformed(f"{what} url must equal the outer JWS url")
    jwk = protected.get("jwk")
    if not isinstance(jwk, dict) or "kid" in protected:
        raise problems.malformed(f"{what} must carry the new key as jwk, and no kid")
    check_no_extensions(protected, what)
    return ParsedJWS(
        protected=protected,
        protected_b64=flattened.protected_b64,
        payload_b64=flattened.payload_b64,
        signature=_decode_signature(flattened.signature_b64, what),
        alg=alg,
        nonce="",
        url=url,
        jwk=jwk,
        kid=None,
        payload=_decode_payload(flattened.payload_b64, what),
    )
