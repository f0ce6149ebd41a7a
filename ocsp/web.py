"""The OCSP responder's HTTP edge: `/ocsp` over GET and POST (RFC 6960 Appendix A, RFC 5019
§5), plain HTTP. Registered through the `certwright.blueprints` entry point as
`ocsp.web:blueprint`; `ca` never imports this package.

Two ways in, one responder: `FastPath`, a WSGI middleware the blueprint hands to `create_app`
(its `certwright_wsgi` attribute), answers `/ocsp` GET and POST before Flask's routing and
request/response machinery (~200 µs a request, more than the answer itself costs); the
blueprint's routes answer the rest (HEAD, OPTIONS, 405) and any app built without the
middleware.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.routing import BaseConverter
from werkzeug.wsgi import get_content_length, get_input_stream

from ca import metrics
from ca.ocsp_signing import OcspSigner, settings_from_config
from ocsp.responder import (
    CONTENT_TYPE,
    INTERNAL_ERROR,
    MALFORMED,
    MAX_REQUEST_OCTETS,
    TRY_LATER,
    UNAUTHORIZED,
    Answer,
    Responder,
    guarded,
)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# Request headers that make a GET conditional (RFC 9110 §13): answered by werkzeug's rules.
_CONDITIONAL = ("HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE", "HTTP_IF_MATCH")


# The unsuccessful answers are shared constants: telling them apart costs a dict look-up.
_OUTCOMES = {
    id(MALFORMED): "malformed",
    id(UNAUTHORIZED): "unauthorized",
    id(TRY_LATER): "try_later",
    id(INTERNAL_ERROR): "internal_error",
}


def _observe(method: str, answer: Answer, started: float) -> None:
    latency, requests = metrics.ocsp_series(method, _OUTCOMES.get(id(answer), "answered"))
    latency.observe(time.perf_counter() - started)
    requests.inc()


class _AnyPath(BaseConverter):
    """Everything after `/ocsp/`, slashes included: base64 has `/` and may have `//`."""

    regex = ".*"
    part_isolating = False


def _response(answer: Answer) -> Response:
    response = Response(answer.body, answer.http_status, content_type=CONTENT_TYPE)
    response.headers["Cache-Control"] = answer.cache_control
    if answer.this_update is not None and answer.next_update is not None:
        # RFC 5019 §6.2: validators and lifetimes a cache (or CDN) can use.
        response.set_etag(str(answer.etag))
        response.last_modified = answer.this_update
        response.expires = answer.next_update
    if answer.retry_after is not None:
        response.headers["Retry-After"] = str(answer.retry_after)
    return response


def _post_body(environ: dict[str, Any]) -> bytes | None:
    """The request body as werkzeug's `request.stream` reads it; None when it is too large."""
    length = get_content_length(environ)
    if length is not None and length > MAX_REQUEST_OCTETS:
        return None
    if length is not None and not environ.get("wsgi.input_terminated"):
        return bytes(environ["wsgi.input"].read(length))
    return bytes(get_input_stream(environ).read(MAX_REQUEST_OCTETS + 1))


class FastPath:
    """WSGI middleware: `/ocsp` GET and POST go straight to the responder; everything else to
    the wrapped app. A GET with validators (If-None-Match, If-Modified-Since, If-Match) gets
    werkzeug's conditional handling, so a 304 is exactly what the blueprint would send."""

    def __init__(self, app: WsgiApp, responder: Callable[[], Responder]) -> None:
        self.app = app
        self.responder = responder

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path: str = environ.get("PATH_INFO", "")
        if not path.startswith("/ocsp") or (len(path) > 5 and path[5] != "/"):
            return self.app(environ, start_response)
        method = environ.get("REQUEST_METHOD")
        started = time.perf_counter()
        if method == "GET":
            if len(path) <= 6:
                answer = MALFORMED  # `/ocsp` or `/ocsp/`: no request
            else:
                answer = guarded(lambda p: self.responder().answer_get(p), path[6:])
            if any(name in environ for name in _CONDITIONAL):
                _observe(method, answer, started)
                response = _response(answer).make_conditional(environ)
                return response(environ, start_response)
        elif method == "POST":
            # RFC 6960 Appendix A.1: Content-Type application/ocsp-request is not enforced:
            # some clients omit it, and the body decides.
            body = _post_body(environ)
            answer = (
                MALFORMED if body is None else guarded(lambda d: self.responder().answer(d), body)
            )
        else:
            return self.app(environ, start_response)  # HEAD, OPTIONS, 405: the blueprint's
        _observe(method, answer, started)
        start_response(answer.status_line, list(answer.wsgi_headers))
        return [answer.body]


def blueprint(runtime: Any) -> Blueprint:
    """The responder for `runtime`'s storage, token and clock (built on first request, so a
    forked worker opens its own database connections and PKCS#11 session)."""
    bp = Blueprint("ocsp", __name__)

    @functools.cache
    def responder() -> Responder:
        signer = OcspSigner(
            runtime.storage,
            lambda: runtime.token,
            settings_from_config(runtime.config),
            runtime.clock,
        )
        return Responder(runtime.storage, signer, runtime.clock)

    def register_converter(state: Any) -> None:
        state.app.url_map.converters["ocsp_any"] = _AnyPath

    bp.record_once(register_converter)
    # ca.web.create_app wraps the app's WSGI callable with this (see FastPath).
    bp.certwright_wsgi = lambda app: FastPath(app, responder)  # type: ignore[attr-defined]

    @bp.get("/ocsp/<ocsp_any:encoded>", merge_slashes=False, strict_slashes=False)
    def ocsp_get(encoded: str) -> Response:
        """RFC 5019 §5: GET {url}/{url-encoded base64 of the DER request}."""
        started = time.perf_counter()
        answer = guarded(lambda p: responder().answer_get(p), encoded)
        _observe("GET", answer, started)
        return _conditional(answer)

    @bp.post("/ocsp", strict_slashes=False)
    @bp.post("/ocsp/<ocsp_any:_path>", merge_slashes=False, strict_slashes=False)
    def ocsp_post(_path: str = "") -> Response:
        """RFC 6960 Appendix A.1: POST with Content-Type application/ocsp-request. The type is
        not enforced: some clients omit it, and the body decides."""
        if (request.content_length or 0) > MAX_REQUEST_OCTETS:
            return _response(MALFORMED)
        started = time.perf_counter()
        der = request.stream.read(MAX_REQUEST_OCTETS + 1)
        answer = guarded(responder().answer, der)
        _observe("POST", answer, started)
        return _response(answer)

    @bp.get("/ocsp", strict_slashes=False)
    def ocsp_empty() -> Response:
        return _response(MALFORMED)

    return bp


def _conditional(answer: Answer) -> Response:
    """A GET answer, with 304 Not Modified for a cache that revalidates with its ETag."""
    response = _response(answer)
    response.make_conditional(request)  # a 304 when the ETag matches
    return response
