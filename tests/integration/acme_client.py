"""A raw RFC 8555 client for tests: it signs flattened JWS itself and can break any part of one.

It deliberately shares no code with the server (acme/jws.py): the JWS encoding, the RFC 7638
thumbprint and the key authorization are computed here from the RFCs, so a server that gets
them wrong fails the tests instead of agreeing with itself. Requests go through Flask's test
client with absolute `https://ca.test/...` URLs, so the URL the server sees is the one signed.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

JOSE: Final = "application/jose+json"
PROBLEM: Final = "application/problem+json"
ERROR: Final = "urn:ietf:params:acme:error:"
DEFAULT_BASE: Final = "https://ca.test"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class Omit:
    """Marks a protected-header member to leave out of a deliberately broken request."""


OMIT: Final = Omit()


def b64url(data: bytes) -> str:
    """RFC 7515 §2: base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(value: int) -> str:
    """RFC 7518 §2 Base64urlUInt: big-endian, minimal octets."""
    return b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


@dataclasses.dataclass(frozen=True)
class AccountKey:
    """A private key with the JWS `alg` it signs with (RFC 7518 §3, RFC 8037 §3.1)."""

    private: PrivateKey
    alg: str

    @staticmethod
    def ec_p256() -> AccountKey:
        return AccountKey(ec.generate_private_key(ec.SECP256R1()), "ES256")

    @staticmethod
    def rsa(bits: int = 2048) -> AccountKey:
        return AccountKey(rsa.generate_private_key(65537, bits), "RS256")

    @staticmethod
    def ed25519() -> AccountKey:
        return AccountKey(ed25519.Ed25519PrivateKey.generate(), "EdDSA")

    @property
    def jwk(self) -> dict[str, str]:
        """The public JWK (RFC 7518 §6, RFC 8037 §2)."""
        key = self.private
        if isinstance(key, ec.EllipticCurvePrivateKey):
            numbers = key.public_key().public_numbers()
            size = (key.curve.key_size + 7) // 8
            return {
                "kty": "EC",
                "crv": "P-256",
                "x": b64url(numbers.x.to_bytes(size, "big")),
                "y": b64url(numbers.y.to_bytes(size, "big")),
            }
        if isinstance(key, rsa.RSAPrivateKey):
            public = key.public_key().public_numbers()
            return {"kty": "RSA", "n": _uint(public.n), "e": _uint(public.e)}
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}

    @property
    def thumbprint(self) -> str:
        """RFC 7638 §3: SHA-256 over the required members, sorted, no whitespace."""
        required = {
            "EC": ("crv", "kty", "x", "y"),
            "RSA": ("e", "kty", "n"),
            "OKP": ("crv", "kty", "x"),
        }
        jwk = self.jwk
        canonical = json.dumps(
            {name: jwk[name] for name in required[jwk["kty"]]}, separators=(",", ":")
        )
        return b64url(hashlib.sha256(canonical.encode()).digest())

    def key_authorization(self, token: str) -> str:
        """RFC 8555 §8.1."""
        return f"{token}.{self.thumbprint}"

    def sign(self, data: bytes) -> bytes:
        key = self.private
        if isinstance(key, ec.EllipticCurvePrivateKey):
            # RFC 7518 §3.4: R || S, each 32 octets, not DER.
            r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return key.sign(data)

    def spki_der(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def flattened_jws(
    key: AccountKey,
    protected: Mapping[str, Any],
    payload: bytes | None,
    *,
    sign: Callable[[bytes], bytes] | None = None,
) -> dict[str, str]:
    """RFC 7515 §7.2.2 flattened serialization; `payload` None is the empty POST-as-GET one."""
    protected_b64 = b64url(json.dumps(dict(protected)).encode())
    payload_b64 = "" if payload is None else b64url(payload)
    signing_input = f"{protected_b64}.{payload_b64}".encode("ascii")
    signature = (sign or key.sign)(signing_input)
    return {"protected": protected_b64, "payload": payload_b64, "signature": b64url(signature)}


def eab_binding(key_id: str, hmac_key: bytes, account_jwk: Mapping[str, Any], url: str) -> Any:
    """RFC 8555 §7.3.4: the account key, MAC'd with the CA-issued key (HS256)."""
    protected = {"alg": "HS256", "kid": key_id, "url": url}
    return flattened_jws(
        AccountKey.ec_p256(),  # unused: the MAC below replaces the signature
        protected,
        json.dumps(dict(account_jwk)).encode(),
        sign=lambda data: hmac.new(hmac_key, data, hashlib.sha256).digest(),
    )


def csr_der(key: PrivateKey, names: list[str], *, common_name: str | None = None) -> bytes:
    """A PKCS#10 request (RFC 2986) for `names` (IP addresses become iPAddress SANs)."""
    import ipaddress

    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name(
        [x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)] if common_name else []
    )
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


class AcmeClient:
    """One account's view of the server: nonces, signing, and the RFC 8555 resources.

    `post` signs with the account (`kid`) once `account_url` is set, otherwise with `jwk`;
    its keyword arguments break the request on purpose (see `signed_body`).
    """

    def __init__(self, http: FlaskClient, key: AccountKey, base: str = DEFAULT_BASE) -> None:
        self.http = http
        self.key = key
        self.base = base
        self.account_url: str | None = None
        self._directory: dict[str, Any] | None = None

    # -- plain HTTP ------------------------------------------------------------------------

    @property
    def directory(self) -> dict[str, Any]:
        if self._directory is None:
            response = self.http.get(f"{self.base}/acme/directory")
            assert response.status_code == 200, response.get_data(as_text=True)
            self._directory = response.get_json()
        return self._directory

    def url(self, resource: str) -> str:
        value: str = self.directory[resource]
        return value

    def nonce(self) -> str:
        """RFC 8555 §7.2: HEAD newNonce."""
        response = self.http.head(self.url("newNonce"))
        assert response.status_code == 200
        nonce: str = response.headers["Replay-Nonce"]
        return nonce

    # -- JWS -------------------------------------------------------------------------------

    def protected_header(
        self, url: str, *, use_jwk: bool | None = None, key: AccountKey | None = None
    ) -> dict[str, Any]:
        key = key or self.key
        header: dict[str, Any] = {"alg": key.alg, "nonce": self.nonce(), "url": url}
        if use_jwk if use_jwk is not None else self.account_url is None:
            header["jwk"] = key.jwk
        else:
            header["kid"] = self.account_url
        return header

    def signed_body(
        self,
        url: str,
        payload: Mapping[str, Any] | bytes | None,
        *,
        key: AccountKey | None = None,
        use_jwk: bool | None = None,
        header: Mapping[str, Any] | None = None,
        sign: Callable[[bytes], bytes] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bytes:
        """A flattened JWS for `url`. `header` overrides protected members (OMIT drops one),
        `sign` replaces the signature function, `extra` adds top-level members."""
        key = key or self.key
        protected = self.protected_header(url, use_jwk=use_jwk, key=key)
        for name, value in (header or {}).items():
            if isinstance(value, Omit):
                protected.pop(name, None)
            else:
                protected[name] = value
        raw = payload if isinstance(payload, bytes | type(None)) else json.dumps(payload).encode()
        document: dict[str, Any] = flattened_jws(key, protected, raw, sign=sign)
        document.update(extra or {})
        return json.dumps(document).encode()

    def post(
        self,
        url: str,
        payload: Mapping[str, Any] | bytes | None = None,
        *,
        content_type: str = JOSE,
        to: str | None = None,
        **breakage: Any,
    ) -> TestResponse:
        """POST a signed request for `url` (to `to` when the URL signed must differ)."""
        body = self.signed_body(url, payload, **breakage)
        return self.post_raw(to or url, body, content_type=content_type)

    def post_raw(self, url: str, body: bytes, *, content_type: str = JOSE) -> TestResponse:
        return self.http.post(url, data=body, content_type=content_type)

    # -- resources -------------------------------------------------------------------------

    def new_account(self, payload: Mapping[str, Any] | None = None, **kw: Any) -> TestResponse:
        body = {"termsOfServiceAgreed": True, "contact": ["mailto:ops@example.test"]}
        body.update(payload or {})
        response = self.post(self.url("newAccount"), body, use_jwk=True, **kw)
        if response.status_code in (200, 201):
            self.account_url = response.headers["Location"]
        return response

    def new_order(
        self,
        identifiers: list[dict[str, str]],
        fields: Mapping[str, Any] | None = None,
        **breakage: Any,
    ) -> TestResponse:
        """RFC 8555 §7.4; `fields` adds payload members (profile, replaces)."""
        payload = {"identifiers": identifiers, **(fields or {})}
        return self.post(self.url("newOrder"), payload, **breakage)

    def get(self, url: str) -> TestResponse:
        """POST-as-GET (RFC 8555 §6.3)."""
        return self.post(url, None)


def dns_ids(*names: str) -> list[dict[str, str]]:
    return [{"type": "dns", "value": n} for n in names]


def ip_ids(*addresses: str) -> list[dict[str, str]]:
    return [{"type": "ip", "value": a} for a in addresses]
