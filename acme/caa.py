"""CAA checking before issuance: RFC 8659 (which CA may issue) with the RFC 8657 parameters
``accounturi`` and ``validationmethods`` (which account, which challenge type).

A refusal is ``ValidationError("caa", ...)`` naming the records that refused; a look-up that
fails is ``ValidationError("dns", ...)``: without an answer we cannot know the domain's wishes,
so we do not issue (RFC 8659 §5.4 and §6 discuss suppressed and failing CAA look-ups; the CA/B
Forum BRs §3.2.2.8 allow issuing on failure only in narrow cases we do not try to detect).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dns.rdtypes.ANY.CAA

from acme.validation import (
    Absent,
    Deadline,
    ValidationConfig,
    ValidationError,
    check_hostname,
    dns_lookups,
    make_resolver,
    split_wildcard,
)

__all__ = ["CAAProperty", "IssueValue", "check_caa", "parse_issue_value"]

# RFC 8659 §4.1: bit 0 (most significant, value 128) of the flags is Issuer Critical.
_ISSUER_CRITICAL = 128
# The properties we understand; a critical one outside this set forbids issuance (§4.1).
# iodef (§4.4) is understood and deliberately not acted upon: reporting is optional.
_KNOWN_TAGS = frozenset({"issue", "issuewild", "iodef"})

# RFC 8659 §4.2: label = (ALPHA / DIGIT) *( *("-") (ALPHA / DIGIT)), also the parameter tag.
_LABEL = r"[A-Za-z0-9](?:-*[A-Za-z0-9])*"
_ISSUER_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# parameter = tag *WSP "=" *WSP value; value = *(%x21-3A / %x3C-7E)
_PARAMETER_RE = re.compile(rf"({_LABEL})[ \t]*=[ \t]*([\x21-\x3a\x3c-\x7e]*)")
# RFC 8657 §4: value = [*(label ",") label]
_METHODS_RE = re.compile(rf"(?:(?:{_LABEL},)*{_LABEL})?")


@dataclass(frozen=True)
class CAAProperty:
    """One CAA record as received: flags, tag (case kept) and the raw value bytes."""

    flags: int
    tag: str
    value: bytes

    @property
    def critical(self) -> bool:
        return bool(self.flags & _ISSUER_CRITICAL)

    def __str__(self) -> str:
        shown = self.value[:200].decode("ascii", "backslashreplace")
        return f'{self.flags} {self.tag} "{shown}"'


@dataclass(frozen=True)
class IssueValue:
    """A parsed issue/issuewild value. An empty ``issuer_domain`` (``";"``) names no CA."""

    issuer_domain: str
    parameters: Mapping[str, str]


def parse_issue_value(value: bytes) -> IssueValue | None:
    """RFC 8659 §4.2 ``issue-value``, or ``None`` when it does not follow the grammar.

    A duplicated parameter is treated as malformed too: which copy the domain owner meant
    is a guess, and guessing here can only widen who may issue.
    """
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    domain_part, semicolon, parameters_part = text.partition(";")
    domain = domain_part.strip(" \t")
    if domain and not _ISSUER_DOMAIN_RE.fullmatch(domain):
        return None
    parameters: dict[str, str] = {}
    parameters_part = parameters_part.strip(" \t")
    if semicolon and parameters_part:
        for item in parameters_part.split(";"):
            match = _PARAMETER_RE.fullmatch(item.strip(" \t"))
            if match is None or match.group(1) in parameters:
                return None
            parameters[match.group(1)] = match.group(2)
    return IssueValue(domain.lower(), parameters)


def _authorizes(
    prop: CAAProperty, issuer_domains: frozenset[str], account_uri: str | None, method: str
) -> bool:
    parsed = parse_issue_value(prop.value)
    if parsed is None or parsed.issuer_domain not in issuer_domains:
        return False
    # RFC 8657 §3: with accounturi, only that ACME account may have certificates issued.
    if "accounturi" in parsed.parameters and parsed.parameters["accounturi"] != account_uri:
        return False
    # RFC 8657 §4: with validationmethods, only the listed challenge types count.
    if "validationmethods" in parsed.parameters:
        methods = parsed.parameters["validationmethods"]
        if not _METHODS_RE.fullmatch(methods) or method not in methods.split(","):
            return False
    # Other parameters are the issuer's own vocabulary; ours has none beyond RFC 8657's.
    return True


def _relevant_rrset(host: str, cfg: ValidationConfig) -> tuple[str, list[CAAProperty]] | None:
    """RFC 8659 §3: the CAA RRset of the name, else of its closest ancestor that has one.

    Aliases are followed by the resolver within each query, as §3 expects; the climb itself
    goes up the original name's labels. The root is not queried: it holds no CAA.
    """
    labels = host.split(".")
    owners = [".".join(labels[start:]) for start in range(len(labels))]
    results = dns_lookups(
        make_resolver(cfg), [(owner, "CAA") for owner in owners], Deadline(cfg.timeout)
    )
    for owner, result in zip(owners, results, strict=True):
        if isinstance(result, Absent):
            continue
        properties = [
            CAAProperty(rdata.flags, rdata.tag.decode("ascii"), rdata.value)
            for rdata in result
            if isinstance(rdata, dns.rdtypes.ANY.CAA.CAA)
        ]
        if properties:
            return owner, properties
    return None


def check_caa(
    name: str,
    *,
    issuer_domains: Sequence[str],
    account_uri: str | None,
    method: str,
    cfg: ValidationConfig,
) -> None:
    """Raise unless CAA lets a CA known by any of ``issuer_domains`` issue for ``name``.

    ``name`` is a DNS name, possibly ``*.``-prefixed; ``method`` is the challenge type that
    validated it (``"http-01"``, ``"dns-01"``, ``"tls-alpn-01"``). CAA is published on domain
    names; there is no RFC 8659 look-up for an IP address, so IP identifiers are the caller's
    to skip (an IP literal here is a malformed error).
    """
    ours = frozenset(domain.lower().rstrip(".") for domain in issuer_domains)
    if not ours:
        raise ValueError("issuer_domains must name at least one issuer domain")
    base, wildcard = split_wildcard(name)
    host = check_hostname(base)
    found = _relevant_rrset(host, cfg)
    if found is None:
        return
    owner, properties = found

    for prop in properties:
        if prop.critical and prop.tag.lower() not in _KNOWN_TAGS:
            raise ValidationError(
                "caa",
                f"CAA record for {owner} prevents issuance: unknown critical property "
                f"({prop}) (RFC 8659 §4.1)",
            )

    issue = [p for p in properties if p.tag.lower() == "issue"]
    issuewild = [p for p in properties if p.tag.lower() == "issuewild"]
    # RFC 8659 §4.3: issuewild, when present, governs wildcard names instead of issue.
    relevant = issuewild if wildcard and issuewild else issue
    if not relevant:
        # RFC 8659 §3: an RRset with no property restricting issuance (only iodef, or only
        # non-critical unknown tags) does not restrict issuance.
        return
    if any(_authorizes(p, ours, account_uri, method) for p in relevant):
        return
    shown = "; ".join(str(p) for p in relevant[:5])
    raise ValidationError(
        "caa",
        f"CAA record for {owner} prevents issuance for {name} "
        f"(account {account_uri or 'unknown'}, method {method}): {shown}",
    )
