"""The OCSP responder's logic, HTTP-free: request bytes in, an `Answer` out.

RFC 6960 with the RFC 5019 profile: one certificate per request, SHA-1 (and SHA-256) CertIDs,
answers from the pre-signed store when the request allows it (no nonce, SHA-1 CertID), signed
on demand otherwise. Serials we never issued get `unauthorized`, never `good` (RFC 5019 §2.2.3;
BR 4.9.10). Each rule is one function citing its section.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from sqlalchemy import bindparam, select
from werkzeug.http import HTTP_STATUS_CODES, http_date

from ca import certs
from ca.clock import Clock
from ca.errors import CAError, Kind
from ca.ocsp_signing import OcspSigner, ocsp_issuers
from ca.storage import Storage
from ca.storage import revocation as store
from ca.storage.models import OcspResponse

log = logging.getLogger(__name__)

# A one-certificate request is under 200 octets (with a 32-octet nonce and a requestor name,
# well under 1 KiB); anything far larger is refused before it is parsed.
MAX_REQUEST_OCTETS = 4096
MAX_GET_PATH = 8192
# RFC 8954 §2.1: Nonce ::= OCTET STRING (SIZE(1..32)).
NONCE_SIZES = range(1, 33)
ISSUER_RELOAD_SECONDS = 30.0
# Per-process caches (bounded, oldest out first): parsed plain requests by their bytes or GET
# path, and ready-made answers by (issuer, serial). Neither decides what is answered: every
# answer from the store is checked against the stored bytes first (see `Responder._presigned`).
PARSED_CACHE_SIZE = 20_000
# A plain request is under 200 octets, under 300 characters as base64 in a GET path. Longer
# keys (leading slashes, percent-encoding, whitespace) are parsed each time, not kept: cached,
# 20,000 distinct 8 KiB GET paths would hold 160 MB.
MAX_CACHED_KEY = 512
ANSWER_CACHE_SIZE = 20_000
_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(),  # noqa: S303 - RFC 5019 §2.1.1 mandates SHA-1 CertIDs
    "sha256": hashes.SHA256(),
}
CONTENT_TYPE = "application/ocsp-response"
_Request = TypeVar("_Request", bytes, str)


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

    @functools.cached_property
    def status_line(self) -> str:
        """The WSGI status, spelt as werkzeug spells it."""
        return f"{self.http_status} {HTTP_STATUS_CODES.get(self.http_status, 'UNKNOWN').upper()}"

    @functools.cached_property
    def wsgi_headers(self) -> tuple[tuple[str, str], ...]:
        """RFC 5019 §6.2 headers: validators and lifetimes a cache (or CDN) can use. Computed
        once per answer; a pre-signed answer is reused for as long as its max-age holds."""
        headers = [
            ("Content-Type", CONTENT_TYPE),
            ("Content-Length", str(len(self.body))),
            ("Cache-Control", self.cache_control),
        ]
        if self.this_update is not None and self.next_update is not None:
            headers.append(("ETag", f'"{self.etag}"'))
            headers.append(("Last-Modified", http_date(self.this_update)))
            headers.append(("Expires", http_date(self.next_update)))
        if self.retry_after is not None:
            headers.append(("Retry-After", str(self.retry_after)))
        return tuple(headers)


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


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """What an answer depends on (RFC 6960 §4.1.1 CertID; RFC 8954 nonce)."""

    algorithm: str | None  # sha1 | sha256; None: a CertID hash we cannot match
    name_hash: bytes
    key_hash: bytes
    serial: str  # hex, as stored
    nonce: bytes | None


def read_request(der: bytes) -> ParsedRequest:
    """Parse and check one request; MalformedRequest when it is not one we can answer."""
    request = parse_request(der)
    nonce = request_nonce(request)
    return ParsedRequest(
        request_hash(request),
        request.issuer_name_hash,
        request.issuer_key_hash,
        certs.serial_hex(request.serial_number),
        nonce,
    )


def _remember(cache: dict[Any, Any], key: Hashable, value: Any, size: int) -> None:
    """Insert into a bounded cache, dropping the oldest entry when it is full."""
    if len(cache) >= size:
        # Another thread may change it meanwhile: the bound is approximate.
        with contextlib.suppress(KeyError, RuntimeError, StopIteration):
            del cache[next(iter(cache))]
    cache[key] = value


class _Presigned:
    """A stored response as served: its bytes and times, and the answer of the current second
    (max-age counts down, so an answer is reused only while it says the same)."""

    __slots__ = ("current", "der", "next_update", "this_update")

    def __init__(
        self, der: bytes, this_update: datetime.datetime, next_update: datetime.datetime
    ) -> None:
        self.der = der
        self.this_update = this_update
        self.next_update = next_update
        self.current: tuple[int, Answer] | None = None


class StoredBytes:
    """The responder's hot read: the stored response bytes of (issuer, serial), one indexed
    SELECT on a DBAPI connection kept per thread, in autocommit so that every read sees the
    latest commit of any process or host. The SQL is compiled once from the storage model (the
    schema stays in `ca/storage`); the connection is detached from the pool, so its autocommit
    never leaks to the rest of the process. The SQLAlchemy path costs ~80 µs a read, this ~10.
    """

    def __init__(self, storage: Storage) -> None:
        self._engine = storage.engine
        self._postgres = storage.dialect == "postgresql"
        statement = select(OcspResponse.der).where(
            OcspResponse.issuer_id == bindparam("issuer_id"),
            OcspResponse.serial == bindparam("serial"),
        )
        compiled = statement.compile(dialect=storage.engine.dialect)
        self._sql = str(compiled)
        self._order = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._local = threading.local()
        # Detached connections are ours to close: when this reader goes, so do they.
        self._opened: list[Any] = []
        weakref.finalize(self, _close_all, self._opened)

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._engine.raw_connection()
            connection.detach()
            self._opened.append(connection)
            driver: Any = connection.dbapi_connection
            driver.rollback()
            if self._postgres:
                driver.autocommit = True
            else:
                driver.isolation_level = None  # sqlite3: no implicit transactions
            self._local.connection = connection
        return connection

    def der(self, issuer_id: str, serial: str) -> bytes | None:
        """The stored bytes, None when there is no row; CAError(STORAGE) when the read fails
        (the connection is dropped and the next read opens another)."""
        values = {"issuer_id": issuer_id, "serial": serial}
        params: Any = values if self._order is None else tuple(values[n] for n in self._order)
        try:
            cursor = self._connection().cursor()
            try:
                cursor.execute(self._sql, params)
                row = cursor.fetchone()
            finally:
                cursor.close()
        except Exception as exc:
            self.close()
            raise CAError(Kind.STORAGE, f"database unavailable: {type(exc).__name__}") from None
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        """Close this thread's connection (the next read opens another)."""
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            with contextlib.suppress(ValueError):
                self._opened.remove(connection)
            _close_all([connection])


def _close_all(connections: list[Any]) -> None:
    for connection in connections:
        with contextlib.suppress(Exception):  # a broken connection is thrown away anyway
            connection.close()
    connections.clear()


class Responder:
    """Answers OCSP requests for every online intermediate in the database.

    Hot path (a plain request for a pre-signed response, asked before): the parsed request
    comes from a per-process cache keyed by the request's exact bytes (or GET path), the
    stored bytes from one indexed SELECT, and the answer with its headers from a per-process
    cache used only when its bytes equal the stored ones. So an answer is never staler than
    the database: a revocation re-signed by any process is served from the next request on.
    """

    def __init__(self, storage: Storage, signer: OcspSigner, clock: Clock) -> None:
        self.storage = storage
        self.signer = signer
        self.clock = clock
        self._issuers: dict[tuple[str, bytes, bytes], str] = {}
        self._loaded_at = -ISSUER_RELOAD_SECONDS
        self._lock = threading.Lock()
        self._parsed: dict[bytes | str, ParsedRequest] = {}
        self._answers: dict[tuple[str, str], _Presigned] = {}
        self._stored = StoredBytes(storage)

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
        parsed = self._parsed.get(der)
        if parsed is None:
            return self._parse_and_answer(der, der)
        return self._answer(parsed)

    def answer_get(self, encoded: str) -> Answer:
        """`answer` for the path of a GET (RFC 6960 Appendix A.1), cached by the path itself."""
        parsed = self._parsed.get(encoded)
        if parsed is None:
            try:
                der = decode_get_path(encoded)
            except MalformedRequest as exc:
                log.debug("malformed OCSP GET path: %s", exc)
                return MALFORMED
            return self._parse_and_answer(encoded, der)
        return self._answer(parsed)

    def _parse_and_answer(self, key: bytes | str, der: bytes) -> Answer:
        try:
            parsed = read_request(der)
        except MalformedRequest as exc:
            log.debug("malformed OCSP request: %s", exc)
            return MALFORMED
        if parsed.nonce is None and len(key) <= MAX_CACHED_KEY:
            # Only requests that can recur: a nonce makes each one unique.
            _remember(self._parsed, key, parsed, PARSED_CACHE_SIZE)
        return self._answer(parsed)

    def _answer(self, request: ParsedRequest) -> Answer:
        algorithm = request.algorithm
        if algorithm is None:
            return UNAUTHORIZED
        serial = request.serial
        try:
            issuer_id = self.issuer_for(algorithm, request.name_hash, request.key_hash)
            if issuer_id is None:
                return UNAUTHORIZED
            if request.nonce is None and algorithm == "sha1":
                presigned = self._presigned(issuer_id, serial)
                if presigned is not None:
                    return presigned
            return self._sign_on_demand(issuer_id, serial, algorithm, request.nonce)
        except CAError as exc:
            if exc.kind in (Kind.HSM, Kind.STORAGE):
                log.warning("OCSP answer for %s deferred: %s", serial, exc.detail)
                return TRY_LATER
            log.error("OCSP answer for %s failed: %s", serial, exc.detail)
            return INTERNAL_ERROR

    def _presigned(self, issuer_id: str, serial: str) -> Answer | None:
        """The stored response while it is current (nextUpdate ahead), from the database only:
        this works with the HSM down. The cached answer is used only if its bytes are the ones
        stored now; otherwise the row is read again, typed, and cached."""
        now = self.clock.now()
        key = (issuer_id, serial)
        try:
            der = self._stored.der(issuer_id, serial)
        except CAError as exc:
            log.debug("fast OCSP read failed, using the storage layer: %s", exc.detail)
        else:
            if der is None:
                return None
            cached = self._answers.get(key)
            if cached is not None and cached.der == der:
                return self._current(cached, now)
        row = store.presigned_response(self.storage, issuer_id, serial)
        if row is None:
            return None
        cached = _Presigned(row.der, row.this_update, row.next_update)
        _remember(self._answers, key, cached, ANSWER_CACHE_SIZE)
        return self._current(cached, now)

    def _current(self, cached: _Presigned, now: datetime.datetime) -> Answer | None:
        if cached.next_update <= now:
            return None  # expired: signed on demand
        max_age = _max_age(cached.next_update, now)
        current = cached.current
        if current is not None and current[0] == max_age:
            return current[1]
        answer = self._success(cached.der, cached.this_update, cached.next_update, now)
        cached.current = (max_age, answer)
        return answer

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
        self,
        der: bytes,
        this_update: datetime.datetime,
        next_update: datetime.datetime,
        now: datetime.datetime | None = None,
    ) -> Answer:
        """RFC 5019 §6.2: caches may keep the response until nextUpdate and no longer."""
        max_age = _max_age(next_update, now or self.clock.now())
        return Answer(
            der,
            200,
            f"max-age={max_age}, public, no-transform, must-revalidate",
            this_update,
            next_update,
        )


def _max_age(next_update: datetime.datetime, now: datetime.datetime) -> int:
    return max(0, int((next_update - now).total_seconds()))


def guarded(answer: Callable[[_Request], Answer], request: _Request) -> Answer:
    """The last line: an unexpected failure is an OCSP internalError, logged, not a bare 500
    page a client cannot parse."""
    try:
        return answer(request)
    except Exception:
        log.exception("OCSP responder failed")
        return INTERNAL_ERROR
