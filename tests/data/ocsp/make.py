"""Make the bad OCSP requests in this folder (run: python tests/data/ocsp/make.py).

Every request names a made-up issuer (name hash 01.., key hash 02..), so the files do not depend
on the session's keys: the responder must refuse the malformed ones before it looks for the
issuer, and answer `unauthorized` to the well-formed one.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

HERE = Path(__file__).parent


def _request(nonce: bytes | None = None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        b"\x01" * 20,
        b"\x02" * 20,
        0x1234567890ABCDEF,
        hashes.SHA1(),  # noqa: S303 - RFC 5019 CertID
    )
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _length(len(body)) + body


def _inner(der: bytes) -> bytes:
    """The contents of a DER SEQUENCE."""
    assert der[0] == 0x30
    if der[1] < 0x80:
        return der[2:]
    size = der[1] & 0x7F
    return der[2 + size :]


def many_requests(count: int) -> bytes:
    """An OCSPRequest whose requestList holds `count` copies of one Request."""
    request_list = _inner(_inner(_request()))  # OCSPRequest > TBSRequest > requestList
    one = _inner(request_list)  # one Request TLV
    return _tlv(0x30, _tlv(0x30, _tlv(0x30, one * count)))


def main() -> None:
    good = _request()
    (HERE / "unknown-issuer.der").write_bytes(good)
    (HERE / "truncated.der").write_bytes(good[: len(good) // 2])
    (HERE / "not-der.bin").write_bytes(b"GET / HTTP/1.0\r\n\r\nthis is not an OCSP request\n" * 4)
    (HERE / "thousand-certs.der").write_bytes(many_requests(1000))
    (HERE / "two-certs.der").write_bytes(many_requests(2))
    (HERE / "nonce-100-octets.der").write_bytes(_request(b"\x5a" * 100))
    (HERE / "nonce-0-octets.der").write_bytes(_request(b""))


if __name__ == "__main__":
    main()
