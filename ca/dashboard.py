"""The read-only admin dashboard at `/dashboard` on the HTTPS listener.

One page: inventory with search and filters (query parameters, so every view is a URL), an
expiry timeline (certificates expiring per week, an inline SVG drawn here: no script, no CDN),
findings, recent revocations, and each issuer's CRL and pre-signed OCSP health.

Authentication: a token from CERTWRIGHT_DASHBOARD_TOKEN or `dashboard.token_file`. A client
sends it as `Authorization: Bearer <token>`, or a browser posts it once to the login form and
gets a cookie holding an expiry time and an HMAC (keyed by the token) over it, never the token.
Both are compared in constant time. No token configured, or `dashboard.enabled = false`: the
dashboard does not exist (404). Without valid credentials: 401, with the login page for
browsers. Nothing here changes state except the login (and its audit record on failure).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import os
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, abort, redirect, render_template, request, url_for
from sqlalchemy import Integer, func, select

from ca import certs
from ca.errors import CAError

TOKEN_ENV = "CERTWRIGHT_DASHBOARD_TOKEN"  # noqa: S105 - a variable name, not a secret
COOKIE = "certwright_dashboard"
SESSION_SECONDS = 8 * 3600
DEFAULT_WEEKS = 12
MAX_WEEKS = 104
PAGE_LIMIT = 200
SHOWN_FINDINGS = 200
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def configured_token(config: Any) -> str | None:
    """The dashboard token, or None when the dashboard is off."""
    if not bool(config.get("dashboard", "enabled")):
        return None
    token = os.environ.get(TOKEN_ENV, "").strip()
    path = str(config.get("dashboard", "token_file"))
    if not token and path:
        try:
            token = config.resolve_path(path).read_text().strip()
        except OSError:
            token = ""
    return token or None


def session_cookie(token: str, expires: int) -> str:
    mac = hmac.new(token.encode(), f"certwright-dashboard:{expires}".encode(), hashlib.sha256)
    return f"{expires}.{mac.hexdigest()}"


def cookie_valid(token: str, value: str, now: float) -> bool:
    expires_text, _, _ = value.partition(".")
    if not expires_text.isdigit() or int(expires_text) <= now:
        return False
    expected = session_cookie(token, int(expires_text))
    return hmac.compare_digest(expected.encode(), value.encode())


def authenticated(token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer" and given:
        return hmac.compare_digest(given.strip().encode(), token.encode())
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and cookie_valid(token, cookie, time.time())


def _secured(response: Response) -> Response:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _unauthorized(error: str | None = None) -> Response:
    # Browsers name text/html; curl and scripts (*/*) get one plain line.
    if "text/html" in request.accept_mimetypes.values():
        body = render_template("dashboard/login.html", error=error)
        response = Response(body, 401, mimetype="text/html")
    else:
        response = Response("authentication required\n", 401, mimetype="text/plain")
    response.headers["WWW-Authenticate"] = 'Bearer realm="certwright dashboard"'
    return _secured(response)


# -- what the page shows -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bar:
    index: int
    start: datetime.datetime
    count: int
    x: float
    y: float
    height: float


@dataclasses.dataclass(frozen=True)
class Timeline:
    weeks: int
    bars: tuple[Bar, ...]
    peak: int
    width: float
    height: float
    bar_width: float


def expiry_timeline(runtime: Any, now: datetime.datetime, weeks: int) -> Timeline:
    """Issued (unrevoked) certificates of ours plus discovered ones not ours, expiring per
    week: one index range count per week and table, so it stays cheap at a million rows."""
    from ca.storage.models import Certificate, DiscoveredCertificate

    counts = []
    with runtime.storage.transaction(durable=False) as session:
        for week in range(weeks):
            start = now + datetime.timedelta(weeks=week)
            end = start + datetime.timedelta(weeks=1)
            ours = session.scalar(
                select(func.count())
                .select_from(Certificate)
                .where(
                    Certificate.status == "issued",
                    Certificate.not_after > start,
                    Certificate.not_after <= end,
                )
            )
            theirs = session.scalar(
                select(func.count())
                .select_from(DiscoveredCertificate)
                .where(
                    DiscoveredCertificate.certificate_id.is_(None),
                    DiscoveredCertificate.not_after > start,
                    DiscoveredCertificate.not_after <= end,
                )
            )
            counts.append((start, int(ours or 0) + int(theirs or 0)))
    width, height, gap = 720.0, 180.0, 4.0
    bar_width = width / weeks - gap
    peak = max((c for _, c in counts), default=0)
    bars = []
    for index, (start, count) in enumerate(counts):
        bar_height = 0.0 if peak == 0 else max(2.0, (height - 20) * count / peak)
        bars.append(
            Bar(
                index=index,
                start=start,
                count=count,
                x=index * (bar_width + gap) + gap / 2,
                y=height - bar_height,
                height=bar_height,
            )
        )
    return Timeline(weeks, tuple(bars), peak, width, height, bar_width)


def recent_revocations(runtime: Any, limit: int = 20) -> list[Any]:
    from ca.storage.models import Certificate

    with runtime.storage.transaction(durable=False) as session:
        return list(
            session.execute(
                select(
                    Certificate.serial,
                    Certificate.names,
                    Certificate.owner,
                    Certificate.issuer_id,
                    Certificate.revoked_at,
                    Certificate.revocation_reason,
                )
                .where(Certificate.status == "revoked")
                .order_by(Certificate.revoked_at.desc())
                .limit(limit)
            )
        )


@dataclasses.dataclass(frozen=True)
class ShardHealth:
    shard: int
    number: int
    age: datetime.timedelta
    next_update: datetime.datetime
    overdue: bool


@dataclasses.dataclass(frozen=True)
class IssuerHealth:
    id: str
    kind: str
    status: str
    subject: str
    not_after: datetime.datetime
    crls: tuple[ShardHealth, ...]
    ocsp_responses: int
    ocsp_stale: int
    ocsp_next_expiry: datetime.datetime | None

    @property
    def healthy(self) -> bool:
        return not any(c.overdue for c in self.crls) and self.ocsp_stale == 0


def _aware(value: datetime.datetime) -> datetime.datetime:
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def issuer_health(runtime: Any, now: datetime.datetime) -> list[IssuerHealth]:
    """Per issuer: the newest CRL of each shard (number, age, overdue when past nextUpdate)
    and its pre-signed OCSP responses (how many, how many past nextUpdate, the next to go)."""
    from ca.storage.models import Crl, OcspResponse

    result = []
    with runtime.storage.transaction(durable=False) as session:
        newest = (
            select(Crl.issuer_id, Crl.shard, func.max(Crl.number).label("number"))
            .group_by(Crl.issuer_id, Crl.shard)
            .subquery()
        )
        crls: dict[str, list[ShardHealth]] = {}
        for row in session.execute(
            select(Crl.issuer_id, Crl.shard, Crl.number, Crl.this_update, Crl.next_update)
            .join(
                newest,
                (Crl.issuer_id == newest.c.issuer_id)
                & (Crl.shard == newest.c.shard)
                & (Crl.number == newest.c.number),
            )
            .order_by(Crl.issuer_id, Crl.shard)
        ):
            crls.setdefault(row.issuer_id, []).append(
                ShardHealth(
                    row.shard,
                    row.number,
                    now - row.this_update,
                    row.next_update,
                    row.next_update <= now,
                )
            )
        ocsp: dict[str, tuple[int, int, datetime.datetime | None]] = {}
        for row in session.execute(
            select(
                OcspResponse.issuer_id,
                func.count(),
                func.sum((OcspResponse.next_update <= now).cast(Integer)),
                func.min(OcspResponse.next_update),
            ).group_by(OcspResponse.issuer_id)
        ):
            ocsp[row[0]] = (
                int(row[1] or 0),
                int(row[2] or 0),
                _aware(row[3]) if row[3] is not None else None,
            )
    for issuer in runtime.storage.list_issuers():
        total, stale, next_expiry = ocsp.get(issuer.id, (0, 0, None))
        result.append(
            IssuerHealth(
                issuer.id,
                issuer.kind,
                issuer.status,
                issuer.subject,
                issuer.not_after,
                tuple(crls.get(issuer.id, ())),
                total,
                stale,
                next_expiry,
            )
        )
    return result


def _filters() -> dict[str, str]:
    names = ("q", "owner", "tag", "status", "issuer", "kind", "expiring", "where")
    return {n: request.args.get(n, "").strip()[:200] for n in names}


def inventory(runtime: Any, args: dict[str, str]) -> tuple[list[Any], int, str | None]:
    """The inventory rows the filters ask for, their total, and an error for a bad filter."""
    from ca.storage.inventory import InventoryFilter, count_inventory, list_inventory

    expiring: datetime.timedelta | None = None
    if args["expiring"]:
        try:
            expiring = datetime.timedelta(days=float(args["expiring"]))
        except (ValueError, OverflowError):
            return [], 0, "expiring within: a number of days"
    name = args["q"] or None
    if name and not any(c in name for c in "*?["):
        name = f"*{name}*"  # a search box finds substrings
    f = InventoryFilter(
        owner=args["owner"] or None,
        tag=args["tag"] or None,
        status=args["status"] or None,
        issuer=args["issuer"] or None,
        name=name.lower() if name else None,
        expiring_within=expiring,
        found_where=args["where"] or None,
        kind=args["kind"] or None,
        limit=PAGE_LIMIT,
    )
    try:
        return list_inventory(runtime.storage, f), count_inventory(runtime.storage, f), None
    except CAError as exc:
        return [], 0, exc.detail


# Findings walk the whole inventory (seconds at a million certificates), so a page load reuses
# the last computation for this long.
FINDINGS_MAX_AGE_SECONDS = 60.0
_findings_cache: dict[int, tuple[float, tuple[list[Any], dict[str, int]]]] = {}


def findings(runtime: Any) -> tuple[list[Any], dict[str, int], str | None]:
    cached = _findings_cache.get(id(runtime))
    if cached is not None and time.monotonic() - cached[0] < FINDINGS_MAX_AGE_SECONDS:
        return *cached[1], None
    try:
        from ca.findings import compute_findings

        found = compute_findings(runtime.storage, runtime.config)
    except CAError as exc:
        return [], {}, exc.detail
    counts: dict[str, int] = {}
    for finding in found:
        counts[finding.severity] = counts.get(finding.severity, 0) + 1
    result = (found[:SHOWN_FINDINGS], counts)
    _findings_cache[id(runtime)] = (time.monotonic(), result)
    return *result, None


# -- the blueprint -----------------------------------------------------------------------------


def blueprint(runtime: Any) -> Blueprint:
    bp = Blueprint(
        "dashboard",
        __name__,
        url_prefix="/dashboard",
        template_folder="templates",
        static_folder="static/dashboard",
        static_url_path="/static",
    )
    bp.certwright_listener = "https"  # type: ignore[attr-defined]
    token = configured_token(runtime.config)

    def guarded(view: Callable[[str], Response]) -> Callable[[], Response]:
        def wrapped() -> Response:
            if token is None:
                abort(404)
            if not authenticated(token):
                return _unauthorized()
            return _secured(view(token))

        wrapped.__name__ = view.__name__
        return wrapped

    @bp.before_request
    def disabled() -> None:
        if token is None:
            abort(404)

    def index(_token: str) -> Response:
        now = runtime.clock.now()
        args = _filters()
        try:
            weeks = min(MAX_WEEKS, max(1, int(request.args.get("weeks", DEFAULT_WEEKS))))
        except ValueError:
            weeks = DEFAULT_WEEKS
        items, total, inventory_error = inventory(runtime, args)
        shown_findings, finding_counts, findings_error = findings(runtime)
        body = render_template(
            "dashboard/index.html",
            now=now,
            args=args,
            weeks=weeks,
            items=items,
            total=total,
            inventory_error=inventory_error,
            timeline=expiry_timeline(runtime, now, weeks),
            findings=shown_findings,
            finding_counts=finding_counts,
            findings_error=findings_error,
            revocations=recent_revocations(runtime),
            issuers=issuer_health(runtime, now),
            statuses=("pending", "issued", "revoked", "failed", "discovered"),
            reason_names=certs.REASON_NAMES,
        )
        return Response(body, 200, mimetype="text/html")

    bp.add_url_rule("", "index", guarded(index), methods=["GET"])

    @bp.post("/login")
    def login() -> Response:
        assert token is not None
        given = request.form.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            # The refusal stands even when the database cannot note it.
            with contextlib.suppress(CAError):
                runtime.storage.audit(
                    "dashboard",
                    "dashboard.login",
                    request.remote_addr or "unknown",
                    "refused",
                    {"reason": "wrong token"},
                )
            return _unauthorized("That token is not right.")
        expires = int(time.time()) + SESSION_SECONDS
        response = redirect(url_for("dashboard.index"), 303)
        response.set_cookie(
            COOKIE,
            session_cookie(token, expires),
            max_age=SESSION_SECONDS,
            path="/dashboard",
            secure=True,
            httponly=True,
            samesite="Strict",
        )
        return _secured(response)  # type: ignore[arg-type]

    return bp
