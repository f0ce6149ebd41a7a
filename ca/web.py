"""The WSGI application: the core's plain-HTTP routes plus the blueprints of other packages.

`ca` imports neither `acme` nor `ocsp`. They plug in through the `certwright.blueprints` entry
point group: each entry is a function `(runtime) -> flask.Blueprint`. This module is the one
place where the parts meet.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Blueprint, Flask, Response, abort

from ca.errors import CAError
from ca.runtime import Runtime

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "certwright.blueprints"


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
        crl = runtime.storage.latest_crl(issuer_id, -1)
        if crl is None:
            abort(404)
        return Response(
            crl.der,
            mimetype="application/pkix-crl",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    return bp


def create_app(runtime: Runtime) -> Flask:
    app = Flask("certwright")
    app.register_blueprint(core_blueprint(runtime))
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        factory: Any = entry.load()
        app.register_blueprint(factory(runtime))
        log.info("registered blueprint %s", entry.name)
    return app
