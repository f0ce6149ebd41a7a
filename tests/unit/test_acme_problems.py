"""acme/problems.py: one constructor per RFC 8555 §6.7 type, rendered as RFC 7807."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from acme import problems
from acme.problems import AcmeProblem

DNS_ID = {"type": "dns", "value": "_bad.example"}

CONSTRUCTORS: list[tuple[Callable[[str], AcmeProblem], str, int]] = [
    (problems.account_does_not_exist, "accountDoesNotExist", 400),
    (problems.already_revoked, "alreadyRevoked", 400),
    (problems.bad_csr, "badCSR", 400),
    (problems.bad_nonce, "badNonce", 400),
    (problems.bad_public_key, "badPublicKey", 400),
    (problems.bad_revocation_reason, "badRevocationReason", 400),
    (problems.caa, "caa", 403),
    (problems.connection, "connection", 400),
    (problems.dns, "dns", 400),
    (problems.external_account_required, "externalAccountRequired", 400),
    (problems.incorrect_response, "incorrectResponse", 400),
    (problems.invalid_contact, "invalidContact", 400),
    (problems.malformed, "malformed", 400),
    (problems.order_not_ready, "orderNotReady", 403),
    (problems.rate_limited, "rateLimited", 429),
    (problems.rejected_identifier, "rejectedIdentifier", 400),
    (problems.server_internal, "serverInternal", 500),
    (problems.tls, "tls", 400),
    (problems.unauthorized, "unauthorized", 403),
    (problems.unsupported_contact, "unsupportedContact", 400),
    (problems.unsupported_identifier, "unsupportedIdentifier", 400),
    (problems.user_action_required, "userActionRequired", 403),
    (problems.conflict, "malformed", 409),
    (problems.not_found, "malformed", 404),
    (problems.payload_too_large, "malformed", 413),
    (problems.unsupported_media_type, "malformed", 415),
]


@pytest.mark.parametrize(
    ("constructor", "type_", "status"),
    CONSTRUCTORS,
    ids=[constructor.__name__ for constructor, _, _ in CONSTRUCTORS],
)
def test_constructor_sets_type_and_status(
    constructor: Callable[[str], AcmeProblem], type_: str, status: int
) -> None:
    problem = constructor("something went wrong")
    assert problem.type == type_
    assert problem.status == status
    assert problem.to_json() == {
        "type": f"urn:ietf:params:acme:error:{type_}",
        "detail": "something went wrong",
        "status": status,
    }


def test_problem_is_an_exception_whose_message_is_the_detail() -> None:
    with pytest.raises(AcmeProblem) as info:
        raise problems.bad_nonce("stale nonce")
    assert str(info.value) == "stale nonce"
    assert info.value.urn == "urn:ietf:params:acme:error:badNonce"


def test_bad_signature_algorithm_lists_algorithms() -> None:
    problem = problems.bad_signature_algorithm("no", ["ES256", "EdDSA"])
    assert problem.status == 400
    assert problem.to_json()["algorithms"] == ["ES256", "EdDSA"]


def test_subproblems_carry_their_identifier() -> None:
    sub = problems.rejected_identifier("underscore in name", identifier=DNS_ID)
    problem = problems.malformed("Some identifiers were rejected", subproblems=[sub])
    assert problem.to_json()["subproblems"] == [
        {
            "type": "urn:ietf:params:acme:error:rejectedIdentifier",
            "detail": "underscore in name",
            "identifier": DNS_ID,
        }
    ]


def test_subproblem_without_identifier_is_refused() -> None:
    with pytest.raises(ValueError, match="identifier"):
        problems.malformed("x", subproblems=[problems.malformed("y")])


def test_subproblems_do_not_nest() -> None:
    inner = problems.dns("nx", identifier=DNS_ID)
    middle = AcmeProblem("dns", "nx", 400, identifier=DNS_ID, subproblems=[inner])
    with pytest.raises(ValueError, match="nest"):
        problems.malformed("x", subproblems=[middle])


def test_compound_needs_subproblems() -> None:
    with pytest.raises(ValueError):
        problems.compound("x", [])
    problem = problems.compound("x", [problems.caa("forbidden", identifier=DNS_ID)], status=403)
    assert problem.type == "compound"
    assert problem.status == 403
    assert len(problem.to_json()["subproblems"]) == 1


def test_top_level_identifier_is_rendered() -> None:
    assert problems.caa("forbidden", identifier=DNS_ID).to_json()["identifier"] == DNS_ID


def test_rate_limited_sets_retry_after() -> None:
    assert problems.rate_limited("slow down", retry_after_seconds=30).headers == {
        "Retry-After": "30"
    }
    assert problems.rate_limited("slow down").headers == {}


def test_method_not_allowed_sets_allow() -> None:
    problem = problems.method_not_allowed("use POST", ["GET", "POST"])
    assert problem.status == 405
    assert problem.type == "malformed"
    assert problem.headers == {"Allow": "GET, POST"}


def test_user_action_required_links_terms_of_service() -> None:
    problem = problems.user_action_required(
        "accept the new terms",
        instance="https://ca.example/tos-update",
        terms_of_service="https://ca.example/tos",
    )
    assert problem.headers == {"Link": '<https://ca.example/tos>;rel="terms-of-service"'}
    assert problem.to_json()["instance"] == "https://ca.example/tos-update"


@pytest.mark.parametrize("type_", ["", "urn:ietf:params:acme:error:malformed"])
def test_type_must_be_a_bare_name(type_: str) -> None:
    with pytest.raises(ValueError):
        AcmeProblem(type_, "x", 400)


@pytest.mark.parametrize("status", [200, 302, 399, 600])
def test_status_must_be_an_error(status: int) -> None:
    with pytest.raises(ValueError):
        AcmeProblem("malformed", "x", status)
