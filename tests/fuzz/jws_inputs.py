"""Hostile ACME request bodies: nearly valid flattened JWS objects, and byte soup.

A case starts from a correctly signed request (a real key, the nonce and URL the server expects)
and may break it at one level: the protected header's members, its encoding, the signature, the
flattened document, or the whole body. Unbroken cases get past the signature check into the
payload parsers (newOrder identifiers, finalize CSR, revokeCert, keyChange, EAB).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import strategies as st

from tests.fuzz.csrs import csr_inputs
from tests.fuzz.mutate import b64url, bad_b64url, huge_values, json_values, mutated

JOSE = "application/jose+json"
GOOD_ALGS = ("ES256", "ES384", "RS256", "PS256", "EdDSA")
BAD_ALGS = ("none", "None", "HS256", "HS512", "RS512", "ES512", "es256", "", "EdDSA ", "Ed25519")
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


@functools.cache
def signing_keys() -> dict[str, tuple[str, Any]]:
    """name -> (the alg it signs with, private key). Some are outside the account key policy."""
    return {
        "p256": ("ES256", ec.generate_private_key(ec.SECP256R1())),
        "p384": ("ES384", ec.generate_private_key(ec.SECP384R1())),
        "p521": ("ES256", ec.generate_private_key(ec.SECP521R1())),
        "k256": ("ES256", ec.generate_private_key(ec.SECP256K1())),
        "rsa": ("RS256", rsa.generate_private_key(65537, 2048)),
        "rsa-pss": ("PS256", rsa.generate_private_key(65537, 2048)),
        "rsa1024": ("RS256", rsa.generate_private_key(65537, 1024)),  # noqa: S505 - refused
        "ed25519": ("EdDSA", ed25519.Ed25519PrivateKey.generate()),
        "ed448": ("EdDSA", ed448.Ed448PrivateKey.generate()),
    }


def _uint(value: int) -> str:
    return b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def jwk_of(private: Any) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        numbers = public.public_numbers()
        size = (public.curve.key_size + 7) // 8
        return {
            "kty": "EC",
            "crv": _CURVE_NAMES.get(public.curve.name, public.curve.name),
            "x": b64url(numbers.x.to_bytes(size, "big")),
            "y": b64url(numbers.y.to_bytes(size, "big")),
        }
    if isinstance(public, rsa.RSAPublicKey):
        rsa_numbers = public.public_numbers()
        return {"kty": "RSA", "n": _uint(rsa_numbers.n), "e": _uint(rsa_numbers.e)}
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    crv = "Ed25519" if isinstance(public, ed25519.Ed25519PublicKey) else "Ed448"
    return {"kty": "OKP", "crv": crv, "x": b64url(raw)}


def sign(alg: str, private: Any, data: bytes) -> bytes:
    """RFC 7518 §3 signatures; a key signs in its own way whatever ``alg`` says."""
    if isinstance(private, ec.EllipticCurvePrivateKey):
        size = (private.curve.key_size + 7) // 8
        digest = hashes.SHA384() if alg == "ES384" else hashes.SHA256()
        r, s = decode_dss_signature(private.sign(data, ec.ECDSA(digest)))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if isinstance(private, rsa.RSAPrivateKey):
        if alg == "PS256":
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            return private.sign(data, pss, hashes.SHA256())
        return private.sign(data, padding.PKCS1v15(), hashes.SHA256())
    signature: bytes = private.sign(data)
    return signature


@st.composite
def mutated_jwks(draw: st.DrawFn) -> Any:
    """A public JWK with one member wrong: kty, crv, coordinates, small or even RSA moduli,
    leading zeros, private members, wrong types."""
    base = jwk_of(signing_keys()[draw(st.sampled_from(sorted(signing_keys())))][1])
    choice = draw(st.integers(min_value=0, max_value=9))
    if choice == 0:
        base["kty"] = draw(
            st.one_of(st.sampled_from(["oct", "rsa", "EC ", "OKP", ""]), json_values())
        )
    elif choice == 1:
        base["crv"] = draw(
            st.one_of(
                st.sampled_from(["P-521", "secp256k1", "X25519", "Ed448", "P-256", "p-256"]),
                json_values(),
            )
        )
    elif choice == 2:
        member = draw(st.sampled_from(["x", "y", "n", "e"]))
        base[member] = draw(st.one_of(bad_b64url(), json_values(), st.binary().map(b64url)))
    elif choice == 3:
        n = draw(st.sampled_from([3, 15, 2**64 + 13, 2**2048, 2**2047 + 1, 2**9000 + 1]))
        base = {
            "kty": "RSA",
            "n": _uint(n),
            "e": draw(st.sampled_from(["AQAB", "Aw", "AA", "AAEAAQ"])),
        }
    elif choice == 4:
        base["e"] = _uint(draw(st.sampled_from([1, 2, 3, 2**64 + 1, 2**4000 + 1])))
    elif choice == 5:
        base[draw(st.sampled_from(["d", "p", "k", "oth"]))] = "AQAB"
    elif choice == 6:
        base = {"kty": "EC", "crv": "P-256", "x": b64url(b"\x00" * 32), "y": b64url(b"\x01" * 32)}
    elif choice == 7:
        return draw(json_values())
    elif choice == 8:
        base.pop(draw(st.sampled_from(sorted(base))))
    else:
        base[draw(st.text(max_size=6))] = draw(json_values())
    return base


@dataclasses.dataclass(frozen=True)
class Signer:
    """Who signs a case: the alg, the private key and how the header names the key."""

    alg: str
    private: Any
    kid: str | None  # None: the key goes in as jwk


def _encode_protected(draw: st.DrawFn, header: dict[str, Any], broken: bool) -> str:
    try:
        text = json.dumps(header)
    except ValueError:
        text = json.dumps({k: str(v)[:100] for k, v in header.items()})
    if not broken:
        return b64url(text.encode())
    how = draw(st.sampled_from(["dup", "dup", "notobject", "utf8", "nan", "b64", "deep", "empty"]))
    if how == "dup":
        name = draw(st.sampled_from(["alg", "nonce", "url", "jwk", "kid"]))
        value = json.dumps(draw(st.one_of(st.sampled_from(BAD_ALGS), json_values())))
        text = text[:-1] + f', "{name}": {value}}}'
    elif how == "notobject":
        text = json.dumps(draw(json_values()))
    elif how == "utf8":
        return b64url(text.encode()[:-1] + b"\xff\xfe}")
    elif how == "nan":
        text = text[:-1] + ', "x": NaN}'
    elif how == "b64":
        return draw(bad_b64url()) + b64url(text.encode())
    elif how == "deep":
        text = "[" * 100_000 + "]" * 100_000
    else:
        return ""
    return b64url(text.encode())


@st.composite
def jws_bodies(
    draw: st.DrawFn,
    *,
    url: str,
    nonce: str | None,
    signer: Signer,
    payloads: st.SearchStrategy[bytes | None],
) -> tuple[bytes, str]:
    """(body, content type) of a request for ``url``; see the module docstring."""
    level = draw(
        st.sampled_from(
            [
                *("valid", "valid", "valid", "header", "header"),
                *("encoding", "signature", "document", "soup"),
            ]
        )
    )
    if level == "soup":
        body = draw(
            st.one_of(
                st.binary(max_size=300),
                json_values().map(lambda v: json.dumps(v).encode()),
                st.sampled_from([b"", b"{}", b"[]", b"null", b'{"protected":1}', b"{" * 5000]),
            )
        )
        return body, draw(st.sampled_from([JOSE, JOSE, "application/json", ""]))
    alg, private = signer.alg, signer.private
    header: dict[str, Any] = {"alg": alg, "url": url}
    if nonce is not None:  # None: the inner JWS of a key change, which has none
        header["nonce"] = nonce
    if signer.kid is None:
        header["jwk"] = jwk_of(private)
    else:
        header["kid"] = signer.kid
    if level == "header":
        for _ in range(draw(st.integers(min_value=1, max_value=3))):
            _break_header(draw, header)
    payload = draw(payloads)
    protected_b64 = _encode_protected(draw, header, broken=level == "encoding")
    payload_b64 = "" if payload is None else b64url(payload)
    if level == "encoding" and draw(st.booleans()):
        payload_b64 = draw(bad_b64url())
    signature = sign(alg, private, f"{protected_b64}.{payload_b64}".encode())
    signature_b64 = b64url(signature)
    if level == "signature":
        how = draw(st.sampled_from(["flip", "short", "long", "empty", "b64", "other", "random"]))
        if how == "flip":
            at = draw(st.integers(min_value=0, max_value=len(signature) - 1))
            signature_b64 = b64url(
                signature[:at] + bytes([signature[at] ^ 1]) + signature[at + 1 :]
            )
        elif how == "short":
            signature_b64 = b64url(signature[: draw(st.integers(0, len(signature) - 1))])
        elif how == "long":
            signature_b64 = b64url(signature + draw(st.binary(min_size=1, max_size=600)))
        elif how == "empty":
            signature_b64 = ""
        elif how == "b64":
            signature_b64 = draw(bad_b64url())
        elif how == "other":
            other = signing_keys()[draw(st.sampled_from(sorted(signing_keys())))]
            signature_b64 = b64url(sign(alg, other[1], b"x"))
        else:
            signature_b64 = b64url(draw(st.binary(max_size=600)))
    document: dict[str, Any] = {
        "protected": protected_b64,
        "payload": payload_b64,
        "signature": signature_b64,
    }
    raw_extra = ""
    if level == "document":
        how = draw(st.sampled_from(["header", "signatures", "extra", "drop", "type", "dup", "big"]))
        if how == "header":
            document["header"] = draw(st.one_of(st.just({"alg": "none"}), json_values()))
        elif how == "signatures":
            document["signatures"] = [{"protected": protected_b64, "signature": signature_b64}]
        elif how == "extra":
            document[draw(st.text(max_size=10))] = draw(json_values())
        elif how == "drop":
            document.pop(draw(st.sampled_from(sorted(document))))
        elif how == "type":
            document[draw(st.sampled_from(sorted(document)))] = draw(json_values())
        elif how == "dup":
            member = draw(st.sampled_from(["protected", "payload", "signature"]))
            raw_extra = f', "{member}": {json.dumps(draw(json_values()))}'
        else:
            document["payload"] = draw(huge_values().filter(lambda v: isinstance(v, str)))
    text = json.dumps(document)
    if raw_extra:
        text = text[:-1] + raw_extra + "}"
    content_type = JOSE
    if draw(st.integers(min_value=0, max_value=19)) == 7:  # 1 in 20; bounds come up more
        content_type = draw(
            st.sampled_from(["application/json", "", "APPLICATION/JOSE+JSON; charset=x", "text/x"])
        )
    return text.encode(), content_type


def _break_header(draw: st.DrawFn, header: dict[str, Any]) -> None:
    what = draw(
        st.sampled_from(["alg", "jwk", "kid", "both", "neither", "nonce", "url", "extra", "huge"])
    )
    if what == "alg":
        header["alg"] = draw(
            st.one_of(st.sampled_from(GOOD_ALGS), st.sampled_from(BAD_ALGS), json_values())
        )
    elif what == "jwk":
        header.pop("kid", None)
        header["jwk"] = draw(mutated_jwks())
    elif what == "kid":
        header.pop("jwk", None)
        header["kid"] = draw(
            st.one_of(
                st.sampled_from(["", "1", "https://ca.test/acme/acct/999999", "/acme/acct/1"]),
                st.integers(min_value=0, max_value=10**6).map(
                    lambda n: f"https://ca.test/acme/acct/{n}"
                ),
                st.text(max_size=30).map(lambda s: "https://ca.test/acme/acct/" + s),
                json_values(),
            )
        )
    elif what == "both":
        header["jwk"] = header.get("jwk") or draw(mutated_jwks())
        header["kid"] = header.get("kid") or "https://ca.test/acme/acct/1"
    elif what == "neither":
        header.pop("jwk", None)
        header.pop("kid", None)
    elif what == "nonce":
        if draw(st.booleans()):
            header.pop("nonce", None)
        else:
            header["nonce"] = draw(st.one_of(bad_b64url(), json_values()))
    elif what == "url":
        if draw(st.booleans()):
            header.pop("url", None)
        else:
            header["url"] = draw(
                st.one_of(
                    st.sampled_from(["", "https://ca.test/acme/new-order", "http://ca.test/"]),
                    st.just(f"{header.get('url')}/"),
                    json_values(),
                )
            )
    elif what == "extra":
        name = draw(st.one_of(st.sampled_from(["b64", "crit", "typ", "cty", "x5c"]), st.text()))
        header[name] = draw(st.one_of(st.sampled_from([False, True, ["b64"], []]), json_values()))
    else:
        header[draw(st.sampled_from(["nonce", "url", "kid", "x"]))] = draw(huge_values())


# -- payloads --------------------------------------------------------------------------------


def json_payload(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes | None]:
    """A JSON payload from ``strategy``, sometimes raw bytes, sometimes POST-as-GET (None)."""

    def encode(value: Any) -> bytes:
        try:
            return json.dumps(value).encode()
        except ValueError:
            return b'"unencodable"'

    return st.one_of(
        strategy.map(encode),
        strategy.map(encode),
        strategy.map(encode),
        st.none(),
        st.binary(max_size=64),
        st.sampled_from([b"{", b'{"a":1,"a":2}', b"\xff", b"[]", b"null", b'{"x": NaN}']),
    )


identifiers = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["dns", "dns", "ip", "email", "DNS", ""]),
            "value": st.one_of(
                st.sampled_from(["a.fuzz.test", "*.fuzz.test", "10.0.0.1", "::1", "example.com"]),
                st.text(max_size=30),
            ),
        }
    ),
    json_values(),
)
new_order_payloads = st.one_of(
    st.fixed_dictionaries(
        {"identifiers": st.lists(identifiers, max_size=4)},
        optional={
            "notBefore": json_values(),
            "notAfter": st.one_of(st.just("2030-01-01T00:00:00Z"), json_values()),
            "profile": st.one_of(st.sampled_from(["tls-server", "nope", ""]), json_values()),
            "replaces": st.one_of(st.sampled_from(["a.b", "...", ""]), json_values()),
        },
    ),
    st.fixed_dictionaries(
        {"identifiers": st.just([{"type": "dns", "value": f"n{i}.fuzz.test"} for i in range(150)])}
    ),
    json_values(),
)
finalize_payloads = st.one_of(
    csr_inputs().map(lambda der: {"csr": b64url(der)}),
    csr_inputs().map(lambda der: {"csr": b64url(der)}),
    st.fixed_dictionaries({"csr": st.one_of(bad_b64url(), json_values())}),
    json_values(),
)
account_payloads = st.fixed_dictionaries(
    {},
    optional={
        "termsOfServiceAgreed": st.one_of(st.booleans(), json_values()),
        "contact": st.one_of(
            st.lists(st.sampled_from(["mailto:a@b.test", "tel:1", "mailto:", "x"]), max_size=3),
            json_values(),
        ),
        "onlyReturnExisting": st.one_of(st.booleans(), json_values()),
        "externalAccountBinding": json_values(),
        # A deactivation would end the fuzzing account, so status is never "deactivated".
        "status": st.sampled_from(["valid", "revoked", "", 1]),
    },
)


def revoke_payloads(certificates: list[bytes]) -> st.SearchStrategy[Any]:
    seeds = certificates or [b"\x30\x00"]
    return (
        st.fixed_dictionaries(
            {"certificate": st.one_of(st.sampled_from(seeds), mutated(seeds)).map(b64url)},
            optional={
                "reason": st.one_of(
                    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, -1]), json_values()
                )
            },
        )
        | json_values()
    )


def key_change_payloads(
    account_url: str, old_jwk: dict[str, Any], url: str
) -> st.SearchStrategy[Any]:
    """An inner JWS (RFC 8555 §7.3.5), nearly valid, signed by a new key."""

    @st.composite
    def inner(draw: st.DrawFn) -> Any:
        name = draw(st.sampled_from(["p256", "p384", "ed25519", "rsa", "p521"]))
        alg, private = signing_keys()[name]
        change = {"account": account_url, "oldKey": old_jwk}
        if draw(st.booleans()):
            change[draw(st.sampled_from(["account", "oldKey"]))] = draw(
                st.one_of(json_values(), mutated_jwks())
            )
        body, _ = draw(
            jws_bodies(
                url=url,
                nonce="AAAA" if draw(st.integers(0, 4)) == 2 else None,
                signer=Signer(alg, private, None),
                payloads=st.just(json.dumps(change).encode()),
            )
        )
        try:
            return json.loads(body)
        except ValueError:
            return body.decode("latin-1")

    return inner()
