"""The OCSP responder's HTTP edge: `/ocsp` over GET and POST (RFC 6960 Appendix A, RFC 5019
§5), plain HTTP. Registered through the `certwright.blueprints` entry point as
`ocsp.web:blueprint`; `ca` never imports this package."""

from __future__ import annotations

import functools
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.routing import BaseConverter

from ca.ocsp_signing import OcspSigner, settings_from_config
from ocsp.responder import (
    CONTENT_TYPE,
    MALFORMED,
    MAX_REQUEST_OCTETS,
    Answer,
    MalformedRequest,
    Responder,
    decode_get_path,
    guarded,
)


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


def blueprint(runtime: Any) -> Blueprint:
    """The responder for `runtime`'s storage, token and clock (built on first request, so a
    forked worker opens its own database pool and PKCS#11 session)."""
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

    @bp.get("/ocsp/<ocsp_any:encoded>", merge_slashes=False, strict_slashes=False)
    def ocsp_get(encoded: str) -> Response:
        """RFC 5019 §5: GET {url}/{url-encoded base64 of the DER request}."""
        try:
            der = decode_get_path(encoded)
        except MalformedRequest:
            return _response(MALFORMED)
        return _conditional(guarded(responder().answer, der))

    @bp.post("/ocsp", strict_slashes=False)
    @bp.post("/ocsp/<ocsp_any:_path>", merge_slashes=False, strict_slashes=False)
    def ocsp_post(_path: str = "") -> Response:
        """RFC 6960 Appendix A.1: POST with Content-Type application/ocsp-request. The type is
        not enforced: some clients omit it, and the body decides."""
        if (request.content_length or 0) > MAX_REQUEST_OCTETS:
            return _response(MALFORMED)
        der = request.stream.read(MAX_REQUEST_OCTETS + 1)
        return _response(guarded(responder().answer, der))

    @bp.get("/ocsp", strict_slashes=False)
    def ocsp_empty() -> Response:
        return _response(MALFORMED)

    return bp


def _conditional(answer: Answer) -> Response:
    """A GET answer, with 304 Not Modified for a cache that revalidates with its ETag."""
    response = _response(answer)
    response.make_conditional(request)  # a 304 when the ETag matches
    return response
