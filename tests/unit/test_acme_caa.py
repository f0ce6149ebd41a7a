"""acme.caa against a real DNS server on loopback.

pebble-challtestsrv serves CAA records but always with flags 0 and never answers NXDOMAIN,
and both matter here (RFC 8659 §4.1 critical flag, §3 climbing past non-existent names).
So this file runs a small authoritative server built on dnspython's message API, answering
UDP queries on a random loopback port from a table each test fills in.
"""

from __future__ import annotations

import select
import socket
import threading
import uuid
from collections.abc import Iterator

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from acme.caa import check_caa, parse_issue_value
from acme.validation import ValidationConfig, ValidationError, resolve

OURS = "ca.certwright.test"
ACCOUNT = "https://ca.certwright.test/acme/acct/42"


class StaticDNSServer:
    """Answers from ``records[(owner, type)]``; unknown names get NXDOMAIN, names in
    ``servfail`` get SERVFAIL, ``cnames`` are followed one step like a real server would."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.cnames: dict[str, str] = {}
        self.servfail: set[str] = set()
        self.drop_once: set[str] = set()  # the first query for these names goes unanswered
        self.queries: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    @property
    def address(self) -> str:
        port: int = self._sock.getsockname()[1]
        return f"127.0.0.1:{port}"

    def add(self, owner: str, rdtype: str, *rdatas: str) -> None:
        self.records.setdefault((_fqdn(owner), rdtype), []).extend(rdatas)

    def caa(self, owner: str, *rdatas: str) -> None:
        self.add(owner, "CAA", *rdatas)

    def _exists(self, name: str) -> bool:
        owners = {owner for owner, _ in self.records} | set(self.cnames)
        # An ancestor of an existing name exists too (an "empty non-terminal": NODATA).
        return any(owner == name or owner.endswith(f".{name}") for owner in owners)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if name in self.cnames and rdtype != "CNAME":
            target = self.cnames[name]
            response.answer.append(dns.rrset.from_text_list(name, 60, "IN", "CNAME", [target]))
            name = target
        rdatas = self.records.get((name, rdtype))
        if rdatas:
            response.answer.append(dns.rrset.from_text_list(name, 60, "IN", rdtype, rdatas))
        elif not self._exists(name):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self._sock, self._wake_reader], [], [])
            if self._wake_reader in ready:
                return
            wire, peer = self._sock.recvfrom(65535)
            try:
                query = dns.message.from_wire(wire)
            except dns.exception.DNSException:
                continue
            name = query.question[0].name.to_text().lower()
            if name in self.drop_once:
                self.drop_once.discard(name)
                self.queries.append((name, "dropped"))
                continue
            self._sock.sendto(self._answer(query).to_wire(), peer)

    def close(self) -> None:
        self._wake_writer.send(b"x")
        self._thread.join()
        for sock in (self._sock, self._wake_reader, self._wake_writer):
            sock.close()


def _fqdn(name: str) -> str:
    return dns.name.from_text(name).to_text().lower()


@pytest.fixture
def dns_server() -> Iterator[StaticDNSServer]:
    server = StaticDNSServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def cfg(dns_server: StaticDNSServer) -> ValidationConfig:
    return ValidationConfig(dns_resolver=dns_server.address, timeout=5)


@pytest.fixture
def zone() -> str:
    return f"z{uuid.uuid4().hex[:10]}.test"


def caa_check(
    name: str,
    cfg: ValidationConfig,
    *,
    account_uri: str | None = ACCOUNT,
    method: str = "http-01",
) -> None:
    check_caa(name, issuer_domains=[OURS], account_uri=account_uri, method=method, cfg=cfg)


def refused(
    name: str,
    cfg: ValidationConfig,
    *,
    account_uri: str | None = ACCOUNT,
    method: str = "http-01",
) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        caa_check(name, cfg, account_uri=account_uri, method=method)
    assert caught.value.problem_type == "caa", caught.value.detail
    return caught.value


# --- where the relevant RRset is (RFC 8659 §3) ----------------------------------------------


def test_no_caa_anywhere_allows_issuance(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.add(f"www.{zone}", "A", "192.0.2.1")
    caa_check(f"www.{zone}", cfg)
    # Climbed to the top-level label and no further: the root holds no CAA.
    assert [name for name, _ in dns_server.queries] == [f"www.{zone}.", f"{zone}.", "test."]


def test_our_issue_record_allows_issuance(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, f'0 issue "{OURS}"')
    caa_check(zone, cfg)


def test_parent_record_applies_to_a_name_that_does_not_exist(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, '0 issue "other-ca.test"')
    error = refused(f"a.b.{zone}", cfg)
    assert "other-ca.test" in error.detail
    assert zone in error.detail


def test_climbing_stops_at_the_closest_rrset(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(f"www.{zone}", f'0 issue "{OURS}"')
    dns_server.caa(zone, '0 issue "other-ca.test"')
    caa_check(f"www.{zone}", cfg)
    refused(f"mail.{zone}", cfg)


def test_closest_rrset_refusing_wins_over_a_permissive_parent(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(f"www.{zone}", '0 issue "other-ca.test"')
    dns_server.caa(zone, f'0 issue "{OURS}"')
    refused(f"www.{zone}", cfg)


def test_alias_target_rrset_applies(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.cnames[f"www.{zone}."] = f"cdn.{zone}."
    dns_server.caa(f"cdn.{zone}", '0 issue "other-ca.test"')
    refused(f"www.{zone}", cfg)


# --- wildcards (RFC 8659 §4.3) --------------------------------------------------------------


def test_issuewild_governs_wildcards_only(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, f'0 issue "{OURS}"', '0 issuewild "other-ca.test"')
    caa_check(zone, cfg)
    refused(f"*.{zone}", cfg)


def test_issuewild_can_allow_wildcards_that_issue_does_not(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, '0 issue "other-ca.test"', f'0 issuewild "{OURS}"')
    caa_check(f"*.{zone}", cfg)
    refused(zone, cfg)


def test_wildcard_without_issuewild_falls_back_to_issue(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, '0 issue "other-ca.test"')
    refused(f"*.{zone}", cfg)


def test_wildcard_rrset_is_looked_up_on_the_base_name(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(f"www.{zone}", '0 issue "other-ca.test"')
    refused(f"*.www.{zone}", cfg)
    assert (f"*.www.{zone}.", "CAA") not in dns_server.queries


# --- what the RRset says (RFC 8659 §4) ------------------------------------------------------


@pytest.mark.parametrize(
    "rdatas",
    [
        ['0 iodef "mailto:security@example.test"'],
        ['0 tbs "unknown, not critical"'],
        [f'0 issuewild "{OURS}"', '0 issuewild "other-ca.test"'],
        ['128 iodef "mailto:security@example.test"'],
    ],
    ids=["iodef only", "unknown non-critical", "issuewild only", "critical iodef"],
)
def test_rrset_without_issue_properties_does_not_restrict(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str, rdatas: list[str]
) -> None:
    dns_server.caa(zone, *rdatas)
    caa_check(zone, cfg)


def test_unknown_critical_property_refuses(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, f'0 issue "{OURS}"', '128 tbs "must understand"')
    error = refused(zone, cfg)
    assert "tbs" in error.detail


@pytest.mark.parametrize("value", [";", "", "  ;  "])
def test_empty_issuer_refuses_every_ca(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str, value: str
) -> None:
    dns_server.caa(zone, f'0 issue "{value}"')
    refused(zone, cfg)


def test_tags_and_issuer_domains_match_case_insensitively(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, f'0 ISSUE "{OURS.upper()}"')
    caa_check(zone, cfg)


def test_malformed_record_refuses_for_itself_only(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(f"bad.{zone}", f'0 issue "{OURS}; accounturi"')
    refused(f"bad.{zone}", cfg)
    dns_server.caa(f"mixed.{zone}", f'0 issue "{OURS}; accounturi"', f'0 issue "{OURS}"')
    caa_check(f"mixed.{zone}", cfg)


# --- RFC 8657 parameters --------------------------------------------------------------------


def test_accounturi_must_equal_the_requesting_account(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, f'0 issue "{OURS}; accounturi={ACCOUNT}"')
    caa_check(zone, cfg)
    refused(zone, cfg, account_uri=f"{ACCOUNT}0")
    refused(zone, cfg, account_uri=None)


def test_validationmethods_must_list_the_method_used(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, f'0 issue "{OURS}; validationmethods=dns-01,tls-alpn-01"')
    caa_check(zone, cfg, method="dns-01")
    caa_check(zone, cfg, method="tls-alpn-01")
    error = refused(zone, cfg, method="http-01")
    assert "http-01" in error.detail


def test_both_parameters_must_hold(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, f'0 issue "{OURS} ; accounturi={ACCOUNT} ; validationmethods=http-01"')
    caa_check(zone, cfg, method="http-01")
    refused(zone, cfg, method="dns-01")
    refused(zone, cfg, account_uri="https://elsewhere.test/acct/1")


def test_unknown_parameters_are_ignored(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, f'0 issue "{OURS}; policy=ev"')
    caa_check(zone, cfg)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"ca.test", ("ca.test", {})),
        (b"  Ca.Test ;", ("ca.test", {})),
        (b";", ("", {})),
        (b"ca.test; a=1; b-c=x=y", ("ca.test", {"a": "1", "b-c": "x=y"})),
        (b"ca.test;\ta = 1", ("ca.test", {"a": "1"})),
        (b"ca..test", None),
        (b"-ca.test", None),
        (b"ca.test.", None),
        (b"ca.test; a", None),
        (b"ca.test; a=1;", None),
        (b"ca.test; a=1 2", None),
        (b"ca.test; a=1; a=2", None),
        (b"ca.test; a_b=1", None),
        (b"ca.t\xc3\xa9st", None),
    ],
)
def test_issue_value_grammar(value: bytes, expected: tuple[str, dict[str, str]] | None) -> None:
    parsed = parse_issue_value(value)
    if expected is None:
        assert parsed is None
    else:
        assert parsed is not None
        assert (parsed.issuer_domain, dict(parsed.parameters)) == expected


def test_malformed_validationmethods_refuses(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, f'0 issue "{OURS}; validationmethods=http-01,,dns-01"')
    refused(zone, cfg, method="http-01")


# --- failures: no answer means no issuance --------------------------------------------------


def test_servfail_on_the_name_is_dns_problem(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.servfail.add(f"www.{zone}.")
    with pytest.raises(ValidationError) as caught:
        caa_check(f"www.{zone}", cfg)
    assert caught.value.problem_type == "dns"


def test_servfail_on_a_parent_is_dns_problem(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.add(f"www.{zone}", "A", "192.0.2.1")
    dns_server.servfail.add(f"{zone}.")
    with pytest.raises(ValidationError) as caught:
        caa_check(f"www.{zone}", cfg)
    assert caught.value.problem_type == "dns"


def test_a_failure_above_the_closest_rrset_does_not_matter(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    # Every label is asked at once, but the climb stops at the closest RRset (RFC 8659 §3):
    # what a parent answered, SERVFAIL included, is never looked at.
    dns_server.caa(f"www.{zone}", f'0 issue "{OURS}"')
    dns_server.servfail.add(f"{zone}.")
    caa_check(f"www.{zone}", cfg)


def test_labels_are_asked_once_each_in_one_round_trip(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.add(f"www.{zone}", "A", "192.0.2.1")
    caa_check(f"www.{zone}", cfg)
    assert sorted(dns_server.queries) == sorted(
        [(f"www.{zone}.", "CAA"), (f"{zone}.", "CAA"), ("test.", "CAA")]
    )
    dns_server.queries.clear()
    assert [str(a) for a in resolve(f"www.{zone}", cfg)] == ["192.0.2.1"]
    assert sorted(dns_server.queries) == [(f"www.{zone}.", "A"), (f"www.{zone}.", "AAAA")]


def test_a_lost_answer_is_asked_again(
    dns_server: StaticDNSServer, cfg: ValidationConfig, zone: str
) -> None:
    dns_server.caa(zone, '0 issue "other-ca.example"')
    dns_server.drop_once.add(f"{zone}.")
    error = refused(f"www.{zone}", cfg)  # the parent's record is found on the second asking
    assert "other-ca.example" in error.detail or zone in error.detail
    assert dns_server.queries.count((f"{zone}.", "CAA")) == 1
    assert (f"{zone}.", "dropped") in dns_server.queries


def test_unreachable_resolver_is_dns_problem(zone: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        silent_port = probe.getsockname()[1]
    cfg = ValidationConfig(dns_resolver=f"127.0.0.1:{silent_port}", timeout=0.5)
    with pytest.raises(ValidationError) as caught:
        caa_check(zone, cfg)
    assert caught.value.problem_type == "dns"


@pytest.mark.parametrize("name", ["192.0.2.1", "bad_name.test", "", "*.*.test"])
def test_non_dns_names_are_malformed(cfg: ValidationConfig, name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        caa_check(name, cfg)
    assert caught.value.problem_type == "malformed"


def test_resolve_nxdomain_is_dns_problem(cfg: ValidationConfig, zone: str) -> None:
    # Lives here: this server, unlike pebble-challtestsrv, answers NXDOMAIN.
    with pytest.raises(ValidationError) as caught:
        resolve(f"missing.{zone}", cfg)
    assert caught.value.problem_type == "dns"
    assert "NXDOMAIN" in caught.value.detail
