"""The one error type of the ACME edge, and its RFC 7807 rendering.

Code anywhere under ``acme/`` raises :class:`AcmeProblem`; the web layer turns it into an
``application/problem+json`` response in one place (RFC 8555 §6.7). The constructors below
carry the HTTP status that goes with each problem type, so a handler never picks a status by
hand. ``detail`` reaches the client verbatim: it must never hold internal state (stack traces,
SQL, key handles, file paths).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

ERROR_URN_PREFIX = "urn:ietf:params:acme:error:"
PROBLEM_CONTENT_TYPE = "application/problem+json"


class AcmeProblem(Exception):
    """An RFC 8555 §6.7 problem: a short ``type`` name, a safe ``detail`` and an HTTP status.

    ``type`` is the name after ``urn:ietf:params:acme:error:``. ``headers`` are extra HTTP
    response headers the problem requires (``Retry-After``, ``Allow``, ``Link``).
    """

    def __init__(
        self,
        type: str,
        detail: str,
        status: int,
        *,
        identifier: Mapping[str, str] | None = None,
        subproblems: Iterable[AcmeProblem] = (),
        algorithms: Iterable[str] | None = None,
        instance: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not type or ":" in type:
            raise ValueError(f"problem type must be a bare ACME error name, got {type!r}")
        if not 400 <= status <= 599:
            raise ValueError(f"problem status must be an HTTP error status, got {status}")
        subproblem_list = list(subproblems)
        for sub in subproblem_list:
            # RFC 8555 §6.7.1: a subproblem exists to say which identifier failed.
            if sub.identifier is None:
                raise ValueError("every subproblem must carry an identifier (RFC 8555 §6.7.1)")
            if sub.subproblems:
                raise ValueError("subproblems cannot nest (RFC 8555 §6.7.1)")
        super().__init__(detail)
        self.type = type
        self.detail = detail
        self.status = status
        self.identifier: dict[str, str] | None = (
            dict(identifier) if identifier is not None else None
        )
        self.subproblems: list[AcmeProblem] = subproblem_list
        self.algorithms: list[str] | None = list(algorithms) if algorithms is not None else None
        self.instance = instance
        self.headers: dict[str, str] = dict(headers) if headers is not None else {}

    @property
    def urn(self) -> str:
        return ERROR_URN_PREFIX + self.type

    def to_json(self) -> dict[str, Any]:
        """The RFC 7807 problem document, with the RFC 8555 §6.7 extensions."""
        document: dict[str, Any] = {
            "type": self.urn,
            "detail": self.detail,
            "status": self.status,
        }
        if self.instance is not None:
            document["instance"] = self.instance
        if self.identifier is not None:
            document["identifier"] = dict(self.identifier)
        if self.algorithms is not None:
            document["algorithms"] = list(self.algorithms)
        if self.subproblems:
            document["subproblems"] = [sub._subproblem_json() for sub in self.subproblems]
        return document

    def _subproblem_json(self) -> dict[str, Any]:
        # RFC 8555 §6.7.1 example: a subproblem is type, detail and identifier; its status is
        # implied by the parent response.
        assert self.identifier is not None  # enforced by the parent's constructor
        return {"type": self.urn, "detail": self.detail, "identifier": dict(self.identifier)}

    def __repr__(self) -> str:
        return f"AcmeProblem(type={self.type!r}, status={self.status}, detail={self.detail!r})"


# One constructor per RFC 8555 §6.7 error type, each with its default status (Pebble's where
# Pebble has the type).


def account_does_not_exist(detail: str) -> AcmeProblem:
    return AcmeProblem("accountDoesNotExist", detail, 400)


def already_revoked(detail: str) -> AcmeProblem:
    return AcmeProblem("alreadyRevoked", detail, 400)


def bad_csr(detail: str) -> AcmeProblem:
    return AcmeProblem("badCSR", detail, 400)


def bad_nonce(detail: str) -> AcmeProblem:
    return AcmeProblem("badNonce", detail, 400)


def bad_public_key(detail: str) -> AcmeProblem:
    return AcmeProblem("badPublicKey", detail, 400)


def bad_revocation_reason(detail: str) -> AcmeProblem:
    return AcmeProblem("badRevocationReason", detail, 400)


def bad_signature_algorithm(detail: str, algorithms: Iterable[str]) -> AcmeProblem:
    """RFC 8555 §6.2: the document MUST list the ``alg`` values the server accepts."""
    return AcmeProblem("badSignatureAlgorithm", detail, 400, algorithms=algorithms)


def caa(detail: str, identifier: Mapping[str, str] | None = None) -> AcmeProblem:
    return AcmeProblem("caa", detail, 403, identifier=identifier)


def compound(detail: str, subproblems: Iterable[AcmeProblem], status: int = 400) -> AcmeProblem:
    """RFC 8555 §6.7.1: the specific failures are the subproblems."""
    subproblem_list = list(subproblems)
    if not subproblem_list:
        raise ValueError("a compound problem needs at least one subproblem")
    return AcmeProblem("compound", detail, status, subproblems=subproblem_list)


def connection(detail: str, identifier: Mapping[str, str] | None = None) -> AcmeProblem:
    return AcmeProblem("connection", detail, 400, identifier=identifier)


def dns(detail: str, identifier: Mapping[str, str] | None = None) -> AcmeProblem:
    return AcmeProblem("dns", detail, 400, identifier=identifier)


def external_account_required(detail: str) -> AcmeProblem:
    return AcmeProblem("externalAccountRequired", detail, 400)


def incorrect_response(detail: str, identifier: Mapping[str, str] | None = None) -> AcmeProblem:
    return AcmeProblem("incorrectResponse", detail, 400, identifier=identifier)


def invalid_contact(detail: str) -> AcmeProblem:
    return AcmeProblem("invalidContact", detail, 400)


def malformed(detail: str, subproblems: Iterable[AcmeProblem] = ()) -> AcmeProblem:
    return AcmeProblem("malformed", detail, 400, subproblems=subproblems)


def order_not_ready(detail: str) -> AcmeProblem:
    return AcmeProblem("orderNotReady", detail, 403)


def rate_limited(detail: str, retry_after_seconds: int | None = None) -> AcmeProblem:
    # RFC 8555 §6.6: the server SHOULD say when the client may retry.
    headers = {"Retry-After": str(retry_after_seconds)} if retry_after_seconds is not None else {}
    return AcmeProblem("rateLimited", detail, 429, headers=headers)


def rejected_identifier(
    detail: str,
    identifier: Mapping[str, str] | None = None,
    subproblems: Iterable[AcmeProblem] = (),
) -> AcmeProblem:
    return AcmeProblem(
        "rejectedIdentifier", detail, 400, identifier=identifier, subproblems=subproblems
    )


def server_internal(detail: str = "The server experienced an internal error") -> AcmeProblem:
    return AcmeProblem("serverInternal", detail, 500)


def tls(detail: str, identifier: Mapping[str, str] | None = None) -> AcmeProblem:
    return AcmeProblem("tls", detail, 400, identifier=identifier)


def account_deactivated(detail: str = "this account is deactivated") -> AcmeProblem:
    """RFC 8555 §7.3.6: requests from a deactivated account MUST get 401 unauthorized."""
    return AcmeProblem("unauthorized", detail, 401)


def already_replaced(detail: str) -> AcmeProblem:
    """RFC 9773 §5: a certificate already named by another order's `replaces`: 409."""
    return AcmeProblem("alreadyReplaced", detail, 409)


def unauthorized(detail: str) -> AcmeProblem:
    return AcmeProblem("unauthorized", detail, 403)


def unsupported_contact(detail: str) -> AcmeProblem:
    return AcmeProblem("unsupportedContact", detail, 400)


def unsupported_identifier(detail: str, identifier: Mapping[str, str] | None = None) -> AcmeProblem:
    return AcmeProblem("unsupportedIdentifier", detail, 400, identifier=identifier)


def user_action_required(
    detail: str, instance: str | None = None, terms_of_service: str | None = None
) -> AcmeProblem:
    """RFC 8555 §7.3.3: ``instance`` is the page the human must visit; a changed terms of
    service is announced with a ``Link: <...>;rel="terms-of-service"`` header."""
    headers = {"Link": f'<{terms_of_service}>;rel="terms-of-service"'} if terms_of_service else {}
    return AcmeProblem("userActionRequired", detail, 403, instance=instance, headers=headers)


# HTTP-level failures. RFC 8555 has no dedicated type for them, so, like Pebble and Boulder, they
# are ``malformed`` with the status that describes the HTTP condition.


def conflict(detail: str) -> AcmeProblem:
    return AcmeProblem("malformed", detail, 409)


def method_not_allowed(detail: str, allowed_methods: Iterable[str]) -> AcmeProblem:
    # RFC 9110 §15.5.6: a 405 response MUST carry an Allow header.
    return AcmeProblem("malformed", detail, 405, headers={"Allow": ", ".join(allowed_methods)})


def not_found(detail: str) -> AcmeProblem:
    return AcmeProblem("malformed", detail, 404)


def payload_too_large(detail: str) -> AcmeProblem:
    return AcmeProblem("malformed", detail, 413)


def unsupported_media_type(detail: str) -> AcmeProblem:
    return AcmeProblem("malformed", detail, 415)
