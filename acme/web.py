"""The ACME web edge (RFC 8555): routes, JWS authentication, nonces, and problem documents.

The one place where errors become RFC 7807 problem documents (`application/problem+json`).
Everything the protocol decides lives in acme/service.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Response, request
from werkzeug.exceptions import HTTPException

from acme import jws, problems
from acme.problems import AcmeProblem
from acme.service import AcmeService, KeyInUse, problem_for
from ca.errors import CAError
from ca.runtime import Runtime
from ca.storage.acme_store import Account, Authorization, Challenge, Order
from ca.web import RESUME, defer

log = logging.getLogger(__name__)

NONCE_LIFETIME_MINUTES = 30
PROBLEM_TYPE = "application/problem+json"
F = TypeVar("F", bound=Callable[..., Response])


def _iso(value: Any) -> str:
    return str(value.strftime("%Y-%m-%dT%H:%M:%SZ"))


AUTH_FAILURES_AUDITED_PER_MINUTE = 30


class _PerMinuteQuota:
    """At most `limit` events per key per clock minute, in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._minute: Any = None
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, key: str, now: datetime.datetime) -> bool:
        minute = now.replace(second=0, microsecond=0)
        with self._lock:
            if minute != self._minute:
                self._minute, self._counts = minute, {}
            count = self._counts.get(key, 0)
            if count >= self.limit:
                return False
            self._counts[key] = count + 1
            return True


def blueprint(runtime: Runtime) -> Blueprint:
    """The ACME blueprint; served on the HTTPS listener only (RFC 8555 §6.1)."""
    bp = Blueprint("acme", __name__, url_prefix="/acme")
    bp.certwright_listener = "https"  # type: ignore[attr-defined]
    service_holder: dict[str, AcmeService] = {}

    auth_failure_quota = _PerMinuteQuota(AUTH_FAILURES_AUDITED_PER_MINUTE)

    def service() -> AcmeService:
        # Built on first use inside the worker, after fork.
        if "s" not in service_holder:
            service_holder["s"] = AcmeService(runtime)
        return service_holder["s"]

    # -- URLs -------------------------------------------------------------------------------

    def base() -> str:
        return request.host_url.rstrip("/") + "/acme"

    def account_url(account_id: int) -> str:
        return f"{base()}/acct/{account_id}"

    def order_url(order_id: str) -> str:
        return f"{base()}/order/{order_id}"

    def authz_url(authz_id: str) -> str:
        return f"{base()}/authz/{authz_id}"

    def challenge_url(challenge_id: str) -> str:
        return f"{base()}/chall/{challenge_id}"

    def cert_url(serial: str) -> str:
        return f"{base()}/cert/{serial}"

    # -- responses --------------------------------------------------------------------------

    def new_nonce() -> str:
        return service().store.new_nonce()

    def respond(
        body: Any,
        status: int = 200,
        *,
        location: str | None = None,
        links: list[tuple[str, str]] = (),  # type: ignore[assignment]
        retry_after: int | None = None,
        content_type: str = "application/json",
    ) -> Response:
        data = body if isinstance(body, str) else json.dumps(body, indent=2)
        response = Response(data, status=status, content_type=content_type)
        response.headers["Replay-Nonce"] = new_nonce()
        response.headers["Cache-Control"] = "no-store"
        if location:
            response.headers["Location"] = location
        response.headers.add("Link", f'<{base()}/directory>;rel="index"')
        for url, rel in links:
            response.headers.add("Link", f'<{url}>;rel="{rel}"')
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

    def problem_response(problem: AcmeProblem) -> Response:
        response = Response(
            json.dumps(problem.to_json(), indent=2),
            status=problem.status,
            content_type=PROBLEM_TYPE,
        )
        # With the database down the problem still goes out, without a nonce.
        with contextlib.suppress(CAError):
            response.headers["Replay-Nonce"] = new_nonce()
        response.headers.add("Link", f'<{base()}/directory>;rel="index"')
        for name, value in problem.headers.items():
            if name.lower() == "link":  # beside rel="index" (a terms-of-service link, say)
                response.headers.add(name, value)
            else:
                response.headers[name] = value
        return response

    @bp.errorhandler(AcmeProblem)
    def on_problem(problem: AcmeProblem) -> Response:
        return problem_response(problem)

    @bp.errorhandler(CAError)
    def on_ca_error(error: CAError) -> Response:
        problem = problem_for(error)
        if problem.status >= 500:
            # The client sees a generic detail; the operator's log gets the real one.
            log.error(
                "ACME %s %s failed: %s (%s)",
                request.method,
                request.path,
                error.detail,
                error.kind.value,
            )
        return problem_response(problem)

    @bp.errorhandler(KeyInUse)
    def on_key_in_use(error: KeyInUse) -> Response:
        response = problem_response(
            problems.conflict("the new key is already in use by an account")
        )
        response.headers["Location"] = account_url(error.account_id)
        return response

    @bp.app_errorhandler(HTTPException)
    def on_http_error(error: HTTPException) -> Response | HTTPException:
        """Routing errors under /acme/ as problem documents. Flask raises these before any
        blueprint matched, so the handler is app-wide and leaves other paths alone."""
        if not request.path.startswith("/acme/"):
            return error
        if error.code == 404:
            return problem_response(problems.not_found("no such resource"))
        if error.code == 405:
            # §6.3: resources are fetched with POST-as-GET; a plain GET is refused.
            return problem_response(
                problems.method_not_allowed(
                    "use POST (POST-as-GET for reading, RFC 8555 §6.3)",
                    getattr(error, "valid_methods", None) or ["POST"],
                )
            )
        if error.code == 413:
            return problem_response(problems.payload_too_large("request body is too large"))
        return problem_response(
            AcmeProblem("malformed", error.description or "bad request", error.code or 400)
        )

    @bp.errorhandler(Exception)
    def on_unexpected(error: Exception) -> Response | HTTPException:
        if isinstance(error, HTTPException):
            return on_http_error(error)
        log.exception("unexpected error in ACME request %s %s", request.method, request.path)
        return problem_response(problems.server_internal())

    # -- JWS authentication -----------------------------------------------------------------

    def read_body() -> bytes:
        length = request.content_length
        if length is not None and length > jws.MAX_BODY_BYTES:
            raise problems.payload_too_large(
                f"request body is larger than {jws.MAX_BODY_BYTES} bytes"
            )
        # A read may return less than asked before the end (a chunked body, say): read on
        # until one byte past the limit, enough for parse_jws to see it is too large.
        chunks: list[bytes] = []
        size = 0
        while size <= jws.MAX_BODY_BYTES:
            chunk = request.stream.read(jws.MAX_BODY_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    def authenticate(
        *, jwk_allowed: bool = False, kid_allowed: bool = True
    ) -> tuple[jws.ParsedJWS, Account | None]:
        """§6.2-6.5 in order: shape, key reference, signature, then the nonce."""
        parsed = jws.parse_jws(read_body(), request.content_type, request.url)
        jws.check_jwk_only_where_allowed(parsed, jwk_allowed, kid_allowed=kid_allowed)
        account: Account | None = None
        if parsed.kid is not None:
            prefix = f"{base()}/acct/"
            account_id = parsed.kid[len(prefix) :] if parsed.kid.startswith(prefix) else ""
            # The account URL as this server spells it: ASCII digits (str.isdigit() admits
            # "²", which int() refuses), no leading zero, at most 18 (a 64-bit integer).
            if (
                not (account_id.isascii() and account_id.isdigit())
                or account_id.startswith("0")
                or len(account_id) > 18
            ):
                problem = problems.account_does_not_exist("kid is not an account URL here")
                raise auth_failed(problem, parsed.kid)
            account = service().store.account(int(account_id))
            if account is None:
                raise auth_failed(problems.account_does_not_exist("no such account"), parsed.kid)
            key: Any = jws.stored_account_key(account.jwk)
        else:
            assert parsed.jwk is not None
            key = jws.account_key_from_jwk(parsed.jwk)
        try:
            jws.verify_signature(parsed, key)
        except AcmeProblem as bad_signature:
            raise auth_failed(bad_signature, parsed.kid or "jwk") from None
        if not service().store.consume_nonce(parsed.nonce, _minutes(NONCE_LIFETIME_MINUTES)):
            raise problems.bad_nonce("JWS anti-replay nonce is invalid, expired or already used")
        if account is not None and account.status != "valid":
            deactivated = problems.account_deactivated(f"account is {account.status}")
            raise auth_failed(deactivated, account_url(account.id))
        return parsed, account

    def auth_failed(problem: AcmeProblem, subject: str) -> AcmeProblem:
        """A failed authentication goes to the audit log (it may be an attack), best effort:
        the client's answer does not depend on the database taking the record. Each process
        records at most AUTH_FAILURES_AUDITED_PER_MINUTE per client address, so a flood of
        forged requests cannot grow the log without bound; the excess is logged here."""
        if not auth_failure_quota.take(request.remote_addr or "?", runtime.clock.now()):
            log.warning(
                "failed ACME authentication from %s not audited (over quota)", request.remote_addr
            )
            return problem
        with contextlib.suppress(CAError):
            runtime.storage.audit(
                f"acme:{request.remote_addr}",
                "acme.authenticate",
                subject,
                "refused",
                {"type": problem.type, "detail": problem.detail, "path": request.path},
            )
        return problem

    def account_json(account: Account) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": account.status,
            "contact": account.contact,
            "orders": f"{account_url(account.id)}/orders",
            "createdAt": _iso(account.created_at),
        }
        if account.tos_agreed:
            body["termsOfServiceAgreed"] = True
        if account.eab_key_id:
            body["externalAccountBinding"] = {"kid": account.eab_key_id}
        return body

    def order_json(order: Order) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": order.status,
            "expires": _iso(order.expires),
            "identifiers": order.identifiers,
            "authorizations": [authz_url(a) for a in order.authorization_ids],
            "finalize": f"{order_url(order.id)}/finalize",
            "profile": order.profile,
        }
        if order.replaces:
            body["replaces"] = order.replaces
        if order.certificate_serial and order.status == "valid":
            body["certificate"] = cert_url(order.certificate_serial)
        if order.error and order.status == "invalid":
            body["error"] = order.error
        return body

    def challenge_json(challenge: Challenge) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": challenge.type,
            "url": challenge_url(challenge.id),
            "status": challenge.status,
            "token": challenge.token,
        }
        if challenge.validated_at is not None:
            body["validated"] = _iso(challenge.validated_at)
        if challenge.error:
            body["error"] = challenge.error
        if challenge.validation_record:
            body["validationRecord"] = challenge.validation_record
        return body

    def authz_json(authz: Authorization) -> dict[str, Any]:
        challenges = authz.challenges
        if authz.status == "valid":
            # §7.1.4: a valid authorization lists the challenge that was validated.
            challenges = tuple(c for c in challenges if c.status == "valid") or challenges
        body: dict[str, Any] = {
            "identifier": {"type": authz.identifier_type, "value": authz.identifier_value},
            "status": authz.status,
            "expires": _iso(authz.expires),
            "challenges": [challenge_json(c) for c in challenges],
        }
        if authz.wildcard:
            body["wildcard"] = True
        return body

    # -- directory and nonces (§7.1.1, §7.2) ------------------------------------------------

    @bp.get("/directory")
    def directory() -> Response:
        settings = service().settings
        meta: dict[str, Any] = {
            "caaIdentities": list(settings.caa_identities),
            "externalAccountRequired": settings.external_account_required,
            "profiles": {
                name: profile.description or name
                for name, profile in runtime.authority.profiles.items()
            },
        }
        if settings.terms_of_service:
            meta["termsOfService"] = settings.terms_of_service
        if settings.website:
            meta["website"] = settings.website
        body = {
            "newNonce": f"{base()}/new-nonce",
            "newAccount": f"{base()}/new-account",
            "newOrder": f"{base()}/new-order",
            "revokeCert": f"{base()}/revoke-cert",
            "keyChange": f"{base()}/key-change",
            "renewalInfo": f"{base()}/renewal-info",
            "meta": meta,
        }
        return Response(json.dumps(body, indent=2), content_type="application/json")

    @bp.route("/new-nonce", methods=["HEAD", "GET"])
    def new_nonce_route() -> Response:
        # §7.2: HEAD answers 200, GET 204; neither may be cached.
        response = Response(status=200 if request.method == "HEAD" else 204)
        response.headers["Replay-Nonce"] = new_nonce()
        response.headers["Cache-Control"] = "no-store"
        response.headers.add("Link", f'<{base()}/directory>;rel="index"')
        return response

    # -- accounts (§7.3) --------------------------------------------------------------------

    @bp.post("/new-account")
    def new_account() -> Response:
        parsed, _ = authenticate(jwk_allowed=True, kid_allowed=False)
        assert parsed.jwk is not None
        account, created = service().new_account(
            parsed.jwk, parsed.json_payload(), request.url, request.remote_addr or ""
        )
        return respond(
            account_json(account), 201 if created else 200, location=account_url(account.id)
        )

    @bp.post("/acct/<int:account_id>")
    def account(account_id: int) -> Response:
        parsed, acct = authenticate()
        assert acct is not None
        if acct.id != account_id:
            raise problems.unauthorized("the request's account is not this account")
        if not parsed.is_post_as_get:
            acct = service().update_account(acct, parsed.json_payload())
        return respond(account_json(acct), location=account_url(acct.id))

    @bp.post("/acct/<int:account_id>/orders")
    def account_orders(account_id: int) -> Response:
        _, acct = authenticate()
        assert acct is not None
        if acct.id != account_id:
            raise problems.unauthorized("the request's account is not this account")
        orders = service().store.account_orders(acct.id)
        return respond({"orders": [order_url(o) for o in orders]})

    @bp.post("/key-change")
    def key_change() -> Response:
        parsed, acct = authenticate()
        assert acct is not None and parsed.kid is not None
        outer_payload = parsed.payload
        try:
            inner_document = json.loads(outer_payload)
        except ValueError:
            raise problems.malformed("the key change payload must be a JWS") from None
        inner = jws.parse_key_change_inner(inner_document, parsed.url)
        assert inner.jwk is not None
        jws.verify_signature(inner, jws.account_key_from_jwk(inner.jwk))
        change = inner.json_payload()
        if change.get("account") != parsed.kid:
            raise problems.malformed("keyChange payload account must equal the outer kid")
        if change.get("oldKey") != acct.jwk and (
            not isinstance(change.get("oldKey"), dict)
            or jws.jwk_thumbprint(change["oldKey"]) != acct.key_thumbprint
        ):
            raise problems.malformed("keyChange oldKey is not the account's current key")
        service().change_key(acct, inner.jwk)
        refreshed = service().store.account(acct.id)
        assert refreshed is not None
        return respond(account_json(refreshed), location=account_url(acct.id))

    # -- orders (§7.4) ----------------------------------------------------------------------

    @bp.post("/new-order")
    def new_order() -> Response:
        parsed, acct = authenticate()
        assert acct is not None
        order = service().new_order(acct, parsed.json_payload())
        return respond(order_json(order), 201, location=order_url(order.id))

    @bp.post("/order/<order_id>")
    def order(order_id: str) -> Response:
        _, acct = authenticate()
        assert acct is not None
        current = service().order_for(acct, order_id)
        retry = 1 if current.status in ("pending", "processing") else None
        return respond(order_json(current), location=order_url(order_id), retry_after=retry)

    @bp.post("/order/<order_id>/finalize")
    def finalize(order_id: str) -> Response:
        parsed, acct = authenticate()
        assert acct is not None
        done = service().finalize(acct, order_id, parsed.json_payload(), account_url(acct.id))
        retry = 1 if done.status == "processing" else None
        return respond(order_json(done), location=order_url(order_id), retry_after=retry)

    @bp.post("/authz/<authz_id>")
    def authorization(authz_id: str) -> Response:
        parsed, acct = authenticate()
        assert acct is not None
        if parsed.is_post_as_get:
            authz = service().authorization_for(acct, authz_id)
        else:
            update = parsed.json_payload()
            if update.get("status") != "deactivated":
                raise problems.malformed("an authorization can only be deactivated")
            authz = service().deactivate_authorization(acct, authz_id)
        busy = any(c.status == "processing" for c in authz.challenges)
        return respond(authz_json(authz), retry_after=1 if busy else None)

    def challenge_response(current: Challenge, authz: Authorization) -> Response:
        return respond(
            challenge_json(current),
            links=[(authz_url(authz.id), "up")],
            retry_after=1 if current.status == "processing" else None,
        )

    @bp.post("/chall/<challenge_id>")
    def challenge(challenge_id: str) -> Response:
        resume = request.environ.get(RESUME)
        if resume is not None:  # the second call of a deferred answer (ca.web.defer)
            return resume()  # type: ignore[no-any-return]
        parsed, acct = authenticate()
        assert acct is not None
        if parsed.is_post_as_get:
            return challenge_response(*service().challenge_for(acct, challenge_id))
        parsed.json_payload()  # §7.5.1: the response is an empty JSON object
        started = service().start_validation(acct, challenge_id, account_url(acct.id))
        if not isinstance(started, concurrent.futures.Future):
            return challenge_response(*started)
        # The validation's network I/O runs in another thread. Where the server can, this
        # process serves other requests while it runs, and answers when it ends (or after
        # challenge_wait_seconds, as processing).
        wait = service().settings.challenge_wait

        def finish() -> Response:
            return challenge_response(*service().validation_outcome(acct, challenge_id, started, 0))

        if defer(started, wait, finish):
            return Response(status=202)  # never sent: the server calls the app again
        return challenge_response(*service().validation_outcome(acct, challenge_id, started, wait))

    # -- certificates (§7.4.2, §7.6) --------------------------------------------------------

    @bp.post("/cert/<serial>")
    @bp.post("/cert/<serial>/<int:alternate>")
    def certificate(serial: str, alternate: int = 0) -> Response:
        _, acct = authenticate()
        assert acct is not None
        pem, chains = service().certificate_chain(acct, serial.lower(), alternate)
        # §7.4.2: every response links to each of the other chains; chain 0 is the bare URL.
        links = [
            (f"{cert_url(serial)}/{n}" if n else cert_url(serial), "alternate")
            for n in range(chains)
            if n != alternate
        ]
        return respond(pem, links=links, content_type="application/pem-certificate-chain")

    @bp.post("/revoke-cert")
    def revoke_cert() -> Response:
        parsed, acct = authenticate(jwk_allowed=True)
        service().revoke(parsed.json_payload(), acct, parsed.jwk)
        return respond("", 200, content_type="application/json")

    # -- ARI (RFC 9773) ---------------------------------------------------------------------

    @bp.get("/renewal-info/<cert_id>")
    def renewal_info(cert_id: str) -> Response:
        body, retry_after = service().renewal_info(cert_id)
        response = Response(json.dumps(body), content_type="application/json")
        response.headers["Retry-After"] = str(retry_after)
        return response

    return bp


def _minutes(n: int) -> datetime.timedelta:
    return datetime.timedelta(minutes=n)
