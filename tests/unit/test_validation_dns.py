"""The wire-level shortcuts of acme.validation.dns_lookups, against dnspython's own messages.

dns_lookups builds its queries without dnspython's message objects and reads a response's
header, then at most its answer section; here each shortcut is compared with what dnspython
builds or parses the long way. (test_acme_caa.py and test_acme_validation.py run the look-ups
themselves against DNS servers on loopback.)
"""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from acme.validation import (
    Absent,
    ValidationConfig,
    _answers_only,
    _echoes,
    _empty_answer,
    _plain_answer,
    _query_wire,
    make_resolver,
)

NAMES = ["host1.bench.test", "Example.COM", "a.b.c.d.e.example", "bücher.example", "test"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rdtype", ["A", "AAAA", "CAA", "TXT"])
def test_query_wire_is_make_query_byte_for_byte(name: str, rdtype: str) -> None:
    wire = _query_wire(name, rdtype)
    expected = dns.message.make_query(name, rdtype).to_wire()
    assert wire[2:] == expected[2:]
    parsed = dns.message.from_wire(wire)
    assert parsed.question[0].name == dns.name.from_text(name)
    assert parsed.flags == dns.flags.RD and parsed.edns == -1


def test_query_ids_are_random() -> None:
    ids = {_query_wire("host1.bench.test", "A")[:2] for _ in range(64)}
    assert len(ids) > 48  # 64 draws from 65,536 values


def response_to(query: bytes, *, rcode: int = dns.rcode.NOERROR) -> dns.message.Message:
    response = dns.message.make_response(dns.message.from_wire(query))
    response.set_rcode(rcode)
    return response


def with_authority_and_additional(response: dns.message.Message) -> dns.message.Message:
    """What real resolvers add and dns_lookups never reads: an SOA or NS, and glue."""
    response.authority.append(
        dns.rrset.from_text("example.", 300, "IN", "SOA", "ns.example. admin.example. 1 2 3 4 5")
    )
    response.authority.append(dns.rrset.from_text("example.", 300, "IN", "NS", "ns.example."))
    response.additional.append(dns.rrset.from_text("ns.example.", 300, "IN", "A", "192.0.2.53"))
    return response


def test_echoes_accepts_a_response_to_the_query() -> None:
    query = _query_wire("www.example", "A")
    assert _echoes(query, response_to(query).to_wire())


def test_echoes_refuses_anything_else() -> None:
    query = _query_wire("www.example", "A")
    good = bytearray(response_to(query).to_wire())
    other_id = bytes([good[0] ^ 1]) + bytes(good[1:])
    assert not _echoes(query, other_id)
    assert not _echoes(query, query)  # QR clear: a query, not a response
    notify = response_to(query)
    notify.set_opcode(dns.opcode.NOTIFY)
    assert not _echoes(query, notify.to_wire())
    other_question = response_to(_query_wire("www.example", "AAAA"))
    other_question.id = int.from_bytes(query[:2], "big")
    assert not _echoes(query, other_question.to_wire())
    assert not _echoes(query, bytes(good[:14]))  # cut short


def test_empty_answer_reads_nxdomain_and_nodata_from_the_header() -> None:
    query = _query_wire("www.example", "CAA")
    nxdomain = with_authority_and_additional(response_to(query, rcode=dns.rcode.NXDOMAIN))
    assert _empty_answer(nxdomain.to_wire()) is Absent.NXDOMAIN
    nodata = with_authority_and_additional(response_to(query))
    assert _empty_answer(nodata.to_wire()) is Absent.NODATA
    servfail = response_to(query, rcode=dns.rcode.SERVFAIL)
    assert _empty_answer(servfail.to_wire()) is None
    truncated = response_to(query)
    truncated.flags |= dns.flags.TC
    assert _empty_answer(truncated.to_wire()) is None
    answered = response_to(query)
    answered.answer.append(dns.rrset.from_text("www.example.", 60, "IN", "CAA", '0 issue "ca"'))
    assert _empty_answer(answered.to_wire()) is None


@pytest.mark.parametrize("extras", [False, True])
def test_answers_only_gives_the_answer_a_full_parse_gives(extras: bool) -> None:
    query = _query_wire("www.example", "A")
    response = response_to(query)
    response.answer.append(dns.rrset.from_text("www.example.", 60, "IN", "CNAME", "cdn.example."))
    response.answer.append(
        dns.rrset.from_text("cdn.example.", 60, "IN", "A", "192.0.2.1", "192.0.2.2")
    )
    if extras:
        response = with_authority_and_additional(response)
    wire = response.to_wire()
    parsed = _answers_only(wire)
    assert not parsed.authority and not parsed.additional  # never parsed
    short = _plain_answer(parsed)
    full = _plain_answer(dns.message.from_wire(wire))
    assert isinstance(short, dns.rrset.RRset) and short == full
    assert short.name == dns.name.from_text("cdn.example.")
    assert {rdata.to_text() for rdata in short} == {"192.0.2.1", "192.0.2.2"}


def test_answers_only_keeps_a_chain_that_ends_in_nothing_nodata() -> None:
    query = _query_wire("www.example", "AAAA")
    response = with_authority_and_additional(response_to(query))
    response.answer.append(dns.rrset.from_text("www.example.", 60, "IN", "CNAME", "cdn.example."))
    assert _plain_answer(_answers_only(response.to_wire())) is Absent.NODATA


def test_a_configured_resolver_is_made_once_the_systems_each_time() -> None:
    cfg = ValidationConfig(dns_resolver="127.0.0.1:5353")
    assert make_resolver(cfg) is make_resolver(ValidationConfig(dns_resolver="127.0.0.1:5353"))
    assert make_resolver(cfg).cache is None
    system = ValidationConfig()
    assert make_resolver(system) is not make_resolver(system)
