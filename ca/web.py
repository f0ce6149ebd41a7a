"""The WSGI application: the core's plain-HTTP routes plus the blueprints of other packages.

`ca` imports neither `acme` nor `ocsp`. They plug in through the `certwright.blueprints` entry
point group: each entry is a function `(runtime) -> flask.Blueprint`. This module is the one
place where the parts meet.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Blueprint, Flask, Response, abort, request

from ca.errors import CAError
from ca.runtime import Runtime

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "certwright.blueprints"

# Waiting without holding the process. A server that can wait for other work while a request
# waits (ca/server.py's WsgiOverAsgi, on gunicorn's asyncio worker) puts a function under DEFER
# in each request's environ. A view whose answer waits on work in another thread (an ACME
# validation's network I/O) hands it the future, a time limit and a `resume` function, and
# returns; once the future is done or the time is up, the server calls the app again for the
# same request with `resume` under RESUME and sends only that second answer. Meanwhile the
# process serves other requests, still one at a time in one thread (DESIGN.md §6).
DEFER = "certwright.defer"
RESUME = "certwright.resume"


def defer(
    future: concurrent.futures.Future[Any], timeout: float, resume: Callable[[], Response]
) -> bool:
    """Ask the server to answer this request with `resume()` once `future` is done or
    `timeout` seconds have passed. False when the server cannot (a sync worker, Flask's test
    client): the view waits itself."""
    hook = request.environ.get(DEFER)
    if hook is None:
        return False
    hook(future, timeout, resume)
    return True


def core_blueprint(runtime: Runtime) -> Blueprint:
    bp = Blueprint("core", __name__)

    @bp.get("/healthz")
    def healthz() -> Response:
        """Liveness plus readiness: the database answers and the HSM token logs in."""
        problems = []
        try:
            runtime.storage.ping()
        except CAError as exc:
            problems.append(f"database: {exc.detail}")
        try:
            runtime.token.check()
        except CAError as exc:
            problems.append(f"hsm: {exc.detail}")
        if problems:
            return Response("not ready\n" + "\n".join(problems) + "\n", 503, mimetype="text/plain")
        return Response("ok\n", 200, mimetype="text/plain")

    @bp.get("/certs/<issuer_id>.<ext>")
    def issuer_certificate(issuer_id: str, ext: str) -> Response:
        """AIA caIssuers (RFC 5280 §4.2.2.1): the issuer certificate, DER over plain HTTP."""
        try:
            record = runtime.storage.get_issuer(issuer_id)
        except CAError:
            abort(404)
        if ext == "der":
            return Response(
                record.cert_der,
                mimetype="application/pkix-cert",
                headers={"Cache-Control": "public, max-age=86400"},
            )
        if ext == "pem":
            pem = x509.load_der_x509_certificate(record.cert_der).public_bytes(
                serialization.Encoding.PEM
            )
            return Response(pem, mimetype="application/x-pem-file")
        abort(404)

    @bp.get("/crl/<issuer_id>.crl")
    def whole_crl(issuer_id: str) -> Response:
        """An issuer's single CRL, such as the root's ARL signed in the ceremony."""
        return _crl_response(runtime, issuer_id, -1)

    @bp.get("/crl/<issuer_id>/<int:shard>.crl")
    def shard_crl(issuer_id: str, shard: int) -> Response:
        """One shard's CRL: the URL a certificate's CRL distribution point names."""
        return _crl_response(runtime, issuer_id, shard)

    return bp


# Caches may keep a CRL this long at most, so a revocation reaches them within the hour even
# though the CRL itself is valid for days.
CRL_MAX_AGE = datetime.timedelta(hours=1)


def _crl_response(runtime: Runtime, issuer_id: str, shard: int) -> Response:
    """RFC 5280 §5 CRL over HTTP (RFC 2585 §4: application/pkix-crl) with validators and a
    lifetime bounded by nextUpdate; an unknown issuer or shard is 404, a database outage 503."""
    try:
        crl = runtime.storage.latest_crl(issuer_id, shard)
    except CAError:
        return Response("CRL unavailable\n", 503, mimetype="text/plain")
    if crl is None:
        abort(404)
    now = runtime.clock.now()
    remaining = max(datetime.timedelta(0), crl.next_update - now)
    response = Response(crl.der, mimetype="application/pkix-crl")
    response.cache_control.public = True
    response.cache_control.max_age = int(min(remaining, CRL_MAX_AGE).total_seconds())
    response.set_etag(f"{issuer_id}-{shard}-{crl.number}")
    response.last_modified = crl.this_update
    response.expires = min(crl.next_update, now + CRL_MAX_AGE)
    response.make_conditional(request)  # turns it into a 304 when the ETag matches
    return response


def create_app(runtime: Runtime, listener: str | None = None) -> Flask:
    """The app for one listener: "http" (OCSP, CRLs, issuer certificates) or "https" (ACME);
    None serves everything (tests, development). A blueprint names its listener in its
    `certwright_listener` attribute; without one it belongs to "http". A blueprint may also
    carry `certwright_wsgi`, a function `(wsgi_app) -> wsgi_app`: a fast path that answers
    its hottest routes before Flask's routing (OCSP, DESIGN.md §6)."""
    app = Flask("certwright")
    routed = app.wsgi_app

    def scoped(environ: dict[str, Any], start_response: Any) -> Any:
        # A routed request uses one database connection per engine (Storage.scope), given
        # back before its response is sent. (A fast path's one look-up needs no scope.)
        with runtime.storage.scope():
            return routed(environ, start_response)

    app.wsgi_app = scoped  # type: ignore[method-assign]
    app.register_blueprint(core_blueprint(runtime))
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        factory: Any = entry.load()
        bp = factory(runtime)
        if listener is None or getattr(bp, "certwright_listener", "http") == listener:
            app.register_blueprint(bp)
            wrap = getattr(bp, "certwright_wsgi", None)
            if wrap is not None:
                app.wsgi_app = wrap(app.wsgi_app)  # type: ignore[method-assign]
            log.info("registered blueprint %s", entry.name)
    return app
