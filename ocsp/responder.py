"""The OCSP responder's logic, HTTP-free: request bytes in, an `Answer` out.

RFC 6960 with the RFC 5019 profile: one certificate per request, SHA-1 (and SHA-256) CertIDs,
answers from the pre-signed store when the request allows it (no nonce, SHA-1 CertID), signed
on demand otherwise. Serials we never issued get `unauthorized`, never `good` (RFC 5019 §2.2.3;
BR 4.9.10). Each rule is one function citing its section.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from ca import certs
from ca.clock import Clock
from ca.errors import CAError, Kind
from ca.ocsp_signing import OcspSigner, ocsp_issuers
from ca.storage import Storage
from ca.storage import revocation as store

log = logging.getLogger(__name__)

# A one-certificate request is under 200 octets (with a 32-octet nonce and a requestor name,
# well under 1 KiB); anything far larger is refused before it is parsed.
MAX_REQUEST_OCTETS = 4096
MAX_GET_PATH = 8192
# RFC 8954 §2.1: Nonce ::= OCTET STRING (SIZE(1..32)).
NONCE_SIZES = range(1, 33)
ISSUER_RELOAD_SECONDS = 30.0
_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(),  # noqa: S303 - RFC 5019 §2.1.1 mandates SHA-1 CertIDs
    "sha256": hashes.SHA256(),
}
CONTENT_TYPE = "application/ocsp-response"


class MalformedRequest(Exception):
    """The request cannot be understood (RFC 6960 §2.3 malformedRequest)."""


@dataclasses.dataclass(frozen=True)
class Answer:
    """What to send back: a DER OCSPResponse, its HTTP status and headers."""

    body: bytes
    http_status: int
    cache_control: str
    this_update: datetime.datetime | None = None
    next_update: datetime.datetime | None = None
    retry_after: int | None = None

    @property
    def etag(self) -> str | None:
        if self.this_update is None:
            return None
        return hashlib.sha256(self.body).hexdigest()[:32]


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )


MALFORMED = Answer(_unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST), 200, "no-store")
UNAUTHORIZED = Answer(_unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED), 200, "no-store")
TRY_LATER = Answer(_unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER), 503, "no-store", retry_after=5)
INTERNAL_ERROR = Answer(_unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR), 500, "no-store")


# -- request rules ------------------------------------------------------------------------------


def decode_get_path(path: str) -> bytes:
    """RFC 6960 Appendix A.1 / RFC 5019 §5: GET carries the base64 of the DER request,
    URL-encoded, after the responder's URL. Clients and proxies differ, so we accept: a
    leading `/` (an OCSP URL ending in `/`), percent-encoding (once or twice), `+` turned into
    a space, the URL-safe alphabet and missing padding. `//` inside is data (base64 `/`)."""
    if len(path) > MAX_GET_PATH:
        raise MalformedRequest("GET path too long")
    text = path
    for _ in range(2):
        if "%" not in text:
            break
        text = unquote(text)
    text = text.lstrip("/").replace(" ", "+").replace("-", "+").replace("_", "/")
    text = "".join(text.split())
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequest("not base64") from None


def parse_request(der: bytes) -> ocsp.OCSPRequest:
    """RFC 6960 §4.1.1: a DER OCSPRequest. RFC 5019 §2.1.1 allows exactly one Request in its
    requestList; cryptography refuses more, and so do we (1,000 CertIDs in one request would
    make one HTTP request cost 1,000 signatures)."""
    if not der or len(der) > MAX_REQUEST_OCTETS:
        raise MalformedRequest("empty or oversized request")
    try:
        request = ocsp.load_der_ocsp_request(der)
        request.serial_number  # noqa: B018 - parse the CertID now, not while answering
    except (ValueError, NotImplementedError) as exc:
        # cryptography says NotImplementedError for a requestList of more than one.
        raise MalformedRequest(str(exc)) from None
    return request


def request_nonce(request: ocsp.OCSPRequest) -> bytes | None:
    """RFC 8954 §2.1: a nonce is 1 to 32 octets; a responder that echoes nonces refuses other
    sizes rather than echo attacker-chosen bulk."""
    try:
        extension = request.extensions.get_extension_for_class(x509.OCSPNonce)
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        raise MalformedRequest(f"bad extensions: {exc}") from None
    nonce = extension.value.nonce
    if len(nonce) not in NONCE_SIZES:
        raise MalformedRequest("nonce must be 1 to 32 octets (RFC 8954)")
    return nonce


def request_hash(request: ocsp.OCSPRequest) -> str | None:
    """The CertID hash (RFC 6960 §4.1.1); None when it is one we cannot match (not SHA-1 or
    SHA-256), which makes us not authoritative for it."""
    try:
        name = request.hash_algorithm.name
    except UnsupportedAlgorithm:
        return None
    return name if name in _HASHES else None


# -- the responder ------------------------------------------------------------------------------


class Responder:
    """Answers OCSP requests for every online intermediate in the database."""

    def __init__(self, storage: Storage, signer: OcspSigner, clock: Clock) -> None:
        self.storage = storage
        self.signer = signer
        self.clock = clock
        self._issuers: dict[tuple[str, bytes, bytes], str] = {}
        self._loaded_at = -ISSUER_RELOAD_SECONDS
        self._lock = threading.Lock()

    def _reload_issuers(self) -> None:
        issuers: dict[tuple[str, bytes, bytes], str] = {}
        for record in ocsp_issuers(self.storage, self.clock.now()):
            ids = self.signer.issuer(record.id).ids
            for algorithm in _HASHES:
                issuers[(algorithm, ids.name_hash[algorithm], ids.key_hash[algorithm])] = record.id
        self._issuers = issuers

    def issuer_for(self, algorithm: str, name_hash: bytes, key_hash: bytes) -> str | None:
        """RFC 6960 §4.1.1: the issuer is the one whose name hash and key hash both match. A
        miss re-reads the issuers (a new intermediate), at most every ISSUER_RELOAD_SECONDS."""
        key = (algorithm, name_hash, key_hash)
        found = self._issuers.get(key)
        if found is None:
            with self._lock:
                if time.monotonic() - self._loaded_at >= ISSUER_RELOAD_SECONDS:
                    self._reload_issuers()
                    self._loaded_at = time.monotonic()
            found = self._issuers.get(key)
        return found

    def answer(self, der: bytes) -> Answer:
        """The whole exchange; every refusal is an OCSP status, never an exception."""
        try:
            request = parse_request(der)
            nonce = request_nonce(request)
        except MalformedRequest as exc:
            log.debug("malformed OCSP request: %s", exc)
            return MALFORMED
        algorithm = request_hash(request)
        if algorithm is None:
            return UNAUTHORIZED
        serial = certs.serial_hex(request.serial_number)
        try:
            issuer_id = self.issuer_for(
                algorithm, request.issuer_name_hash, request.issuer_key_hash
            )
            if issuer_id is None:
                return UNAUTHORIZED
            if nonce is None and algorithm == "sha1":
                presigned = store.presigned_response(self.storage, issuer_id, serial)
                if presigned is not None and presigned.next_update > self.clock.now():
                    return self._success(
                        presigned.der, presigned.this_update, presigned.next_update
                    )
            return self._sign_on_demand(issuer_id, serial, algorithm, nonce)
        except CAError as exc:
            if exc.kind in (Kind.HSM, Kind.STORAGE):
                log.warning("OCSP answer for %s deferred: %s", serial, exc.detail)
                return TRY_LATER
            log.error("OCSP answer for %s failed: %s", serial, exc.detail)
            return INTERNAL_ERROR

    def _sign_on_demand(
        self, issuer_id: str, serial: str, algorithm: str, nonce: bytes | None
    ) -> Answer:
        """The cache-miss path: a nonce or a SHA-256 CertID cannot be pre-signed, and a
        certificate just issued may not have its response yet. What is signed without a
        nonce on SHA-1 is stored for the next asker."""
        status = store.certificate_status(self.storage, serial)
        if status is None or status.issuer_id != issuer_id:
            return UNAUTHORIZED
        if status.status not in ("issued", "revoked"):
            return UNAUTHORIZED  # pending or failed: never released, so never `good`
        signed = self.signer.sign(status, algorithm=_HASHES[algorithm], nonce=nonce)
        if nonce is not None:
            return Answer(signed.der, 200, "no-store")  # unique to this request
        if algorithm == "sha1":
            store.store_ocsp_responses(
                self.storage,
                [
                    store.OcspRow(
                        issuer_id,
                        serial,
                        signed.cert_status,
                        signed.der,
                        signed.this_update,
                        signed.next_update,
                        self.clock.now(),
                    )
                ],
            )
        return self._success(signed.der, signed.this_update, signed.next_update)

    def _success(
        self, der: bytes, this_update: datetime.datetime, next_update: datetime.datetime
    ) -> Answer:
        """RFC 5019 §6.2: caches may keep the response until nextUpdate and no longer."""
        max_age = max(0, int((next_update - self.clock.now()).total_seconds()))
        return Answer(
            der,
            200,
            f"max-age={max_age}, public, no-transform, must-revalidate",
            this_update,
            next_update,
        )


def guarded(answer: Callable[[bytes], Answer], der: bytes) -> Answer:
    """The last line: an unexpected failure is an OCSP internalError, logged, not a bare 500
    page a client cannot parse."""
    try:
        return answer(der)
    except Exception:
        log.exception("OCSP responder failed")
        return INTERNAL_ERROR
