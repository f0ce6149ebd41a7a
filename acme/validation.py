"""Challenge validation: http-01, dns-01 (RFC 8555 §8.3, §8.4) and tls-alpn-01 (RFC 8737),
for DNS and IP identifiers (RFC 8738).

Each ``validate_*`` function returns the validation records of what it contacted, or raises
:class:`ValidationError` with an RFC 8555 §6.7 problem type and a detail safe to show the
client. The records are attached to the error too: the client sees what was tried either way.

One time budget (``ValidationConfig.timeout``) covers a whole validation, DNS look-ups and
redirects included, so a slow responder cannot hold a validator longer than configured.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import hmac
import http.client
import ipaddress
import re
import secrets
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeAlias, TypeVar
from urllib.parse import urljoin, urlsplit, urlunsplit

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.txtbase
import dns.resolver
import dns.rrset
from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from ca import metrics

__all__ = [
    "ACME_TLS_1_PROTOCOL",
    "ID_PE_ACME_IDENTIFIER",
    "MAX_HTTP01_BODY",
    "IPAddress",
    "IdentifierType",
    "ProblemType",
    "ValidationConfig",
    "ValidationError",
    "ValidationRecord",
    "key_authorization_digest",
    "resolve",
    "validate_dns01",
    "validate_http01",
    "validate_tls_alpn01",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IdentifierType = Literal["dns", "ip"]
ProblemType = Literal[
    "connection", "dns", "incorrectResponse", "tls", "unauthorized", "malformed", "caa"
]

# RFC 8737 §6.2 (ALPN protocol ID) and §6.1 (id-pe-acmeIdentifier, id-pe 31).
ACME_TLS_1_PROTOCOL = "acme-tls/1"
ID_PE_ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")

# A key authorization is token "." thumbprint, ~87 bytes (RFC 8555 §8.1); 1 KiB leaves room
# for trailing whitespace while bounding what one validation may make us buffer.
MAX_HTTP01_BODY = 1024

# Redirects allowed by the CA/B Forum BRs §3.2.2.4.19 (the ACME http-01 method); 303 is not.
_REDIRECT_STATUSES = frozenset({301, 302, 307, 308})
_MAX_REDIRECT_URL = 2000
_USER_AGENT = "certwright-validator"

# RFC 8555 §8.3: the token is base64url; anything else must never reach a URL path.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _counted(challenge_type: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Count each validation's outcome in `certwright_acme_validations_total`."""

    def decorate(validate: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(validate)
        def counted(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            outcome = "error"
            try:
                result = validate(*args, **kwargs)
                outcome = "valid"
                return result
            except ValidationError:
                outcome = "invalid"
                raise
            finally:
                metrics.ACME_VALIDATIONS.labels(challenge_type, outcome).inc()

        return counted

    return decorate


class ValidationError(Exception):
    """A failed validation: an RFC 8555 §6.7 problem type plus a detail safe for the client."""

    def __init__(
        self,
        problem_type: ProblemType,
        detail: str,
        records: Sequence[ValidationRecord] = (),
    ) -> None:
        super().__init__(f"{problem_type}: {detail}")
        self.problem_type: ProblemType = problem_type
        self.detail = detail
        self.records: tuple[ValidationRecord, ...] = tuple(records)


@dataclass(frozen=True)
class ValidationRecord:
    """What one validation step contacted: the challenge object's ``validationRecord`` entry.

    RFC 8555 §8 leaves its content to the server; the field names follow Boulder and Pebble so
    clients that print them (certbot, lego) understand them. ``addresses_tried`` lists the
    addresses that failed before ``address_used``.
    """

    hostname: str
    port: int | None = None
    url: str | None = None
    addresses_resolved: tuple[IPAddress, ...] = ()
    address_used: IPAddress | None = None
    addresses_tried: tuple[IPAddress, ...] = ()

    def to_json(self) -> dict[str, object]:
        document: dict[str, object] = {"hostname": self.hostname}
        if self.url is not None:
            document["url"] = self.url
        if self.port is not None:
            document["port"] = str(self.port)
        if self.addresses_resolved:
            document["addressesResolved"] = [str(a) for a in self.addresses_resolved]
        if self.address_used is not None:
            document["addressUsed"] = str(self.address_used)
        if self.addresses_tried:
            document["addressesTried"] = [str(a) for a in self.addresses_tried]
        return document


@dataclass(frozen=True)
class ValidationConfig:
    """Where the validator connects; every field is a knob a test rig needs (DESIGN §4).

    ``http01_port`` and ``http01_https_port`` stand for ports 80 and 443 of http-01 URLs (the
    second only reached by a redirect to https). ``dns_resolver`` is ``None`` for the system
    resolver, or ``"host:port"`` / ``"[v6]:port"`` with an IP address as host (port 53 when
    omitted).
    """

    http01_port: int = 80
    http01_https_port: int = 443
    tlsalpn01_port: int = 443
    dns_resolver: str | None = None
    timeout: float = 10.0
    max_redirects: int = 10

    def __post_init__(self) -> None:
        for name in ("http01_port", "http01_https_port", "tlsalpn01_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise ValueError(f"{name} must be a TCP port 1-65535, got {port!r}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {self.timeout!r}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects!r}")
        if self.dns_resolver is not None:
            parse_resolver_address(self.dns_resolver)


def parse_resolver_address(spec: str) -> tuple[str, int]:
    """``"127.0.0.1:8053"``, ``"[::1]:8053"``, ``"::1"`` or ``"10.0.0.1"`` -> (ip, port)."""
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"dns_resolver {spec!r} is not [ipv6]:port")
        port_text = rest[1:]
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
    else:
        host, port_text = spec, ""
    try:
        address = ipaddress.ip_address(host)
        port = int(port_text) if port_text else 53
    except ValueError:
        raise ValueError(f"dns_resolver {spec!r} is not ip[:port]") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"dns_resolver {spec!r} has an invalid port")
    return str(address), port


class Deadline:
    """The time left of one validation's budget (shared by ``acme.caa``)."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left, zero or less once spent."""
        return self._end - time.monotonic()

    def remaining(self, problem_type: ProblemType, doing: str) -> float:
        """Seconds left, always > 0: a zero socket timeout would mean non-blocking mode."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise ValidationError(problem_type, f"Timed out {doing}")
        return left


def make_resolver(cfg: ValidationConfig) -> dns.resolver.Resolver:
    """A stub resolver on ``cfg.dns_resolver`` (or the system's), without a cache.

    No cache: a client that has just published its TXT or fixed its CAA must be seen at once.
    The one for a configured address is made once and shared: a look-up only reads it. The
    system's is made anew each time, so that a change to /etc/resolv.conf counts at once.
    """
    if cfg.dns_resolver is None:
        resolver = dns.resolver.Resolver()
        resolver.cache = None
        return resolver
    return _resolver_on(cfg.dns_resolver)


@functools.lru_cache(maxsize=64)
def _resolver_on(address: str) -> dns.resolver.Resolver:
    host, port = parse_resolver_address(address)
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
    resolver.cache = None
    return resolver


class Absent(enum.Enum):
    """Why a look-up found no RRset: CAA climbing (RFC 8659 §3) treats both as empty."""

    NXDOMAIN = "NXDOMAIN"
    NODATA = "no records"


def dns_lookup(
    resolver: dns.resolver.Resolver, name: str, rdtype: str, deadline: Deadline
) -> dns.rrset.RRset | Absent:
    """The RRset (after any CNAME chain) or why there is none; any failure is a dns error."""
    doing = f"looking up {rdtype} for {name}"
    try:
        answer = resolver.resolve(
            dns.name.from_text(name),
            rdtype,
            raise_on_no_answer=False,
            lifetime=deadline.remaining("dns", doing),
        )
    except dns.resolver.NXDOMAIN:
        return Absent.NXDOMAIN
    except dns.resolver.NoNameservers:
        raise ValidationError(
            "dns", f"DNS problem: no server answered (SERVFAIL, REFUSED or unreachable) {doing}"
        ) from None
    except dns.exception.Timeout:
        raise ValidationError("dns", f"DNS problem: query timed out {doing}") from None
    except dns.exception.DNSException:
        raise ValidationError("dns", f"DNS problem {doing}") from None
    if answer.rrset is None:
        return Absent.NODATA
    return answer.rrset


def dns_lookups(
    resolver: dns.resolver.Resolver, queries: Sequence[tuple[str, str]], deadline: Deadline
) -> Iterator[dns.rrset.RRset | Absent]:
    """Several look-ups at once, as `dns_lookup` gives each, in one round trip, in order.

    The queries go out together over one UDP socket to the resolver's first server (Boulder,
    too, climbs CAA in parallel): one wait instead of one per query, and an empty answer (most
    of a CAA climb) is read from its header (`_empty_answer`). Only plain answers are taken
    from there: NOERROR (the CNAME chain followed as dnspython's resolver does) and NXDOMAIN.
    Any other outcome (truncated, SERVFAIL, REFUSED, lost, a socket error) is asked again
    through `dns_lookup`, with its retries, TCP fallback and error messages, when the caller
    reaches it: a caller that stops early (CAA found on a closer name) never sees a failure
    further up.
    """
    results: list[dns.rrset.RRset | Absent | None] = [None] * len(queries)
    server = resolver.nameservers[0] if resolver.nameservers else None
    wires = [_query_wire(name, rdtype) for name, rdtype in queries]
    pending = {wire[:2]: i for i, wire in enumerate(wires)}
    if (
        len(queries) > 1
        and type(server) is dns.nameserver.Do53Nameserver
        and len(pending) == len(wires)  # no two random query ids alike
    ):
        family = socket.AF_INET6 if ":" in server.address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.settimeout(min(resolver.timeout, deadline.remaining("dns", "looking up")))
                sock.connect((server.address, server.port))
                for wire in wires:
                    sock.send(wire)
                while pending:
                    wire = sock.recv(65535)
                    i = pending.get(wire[:2])
                    if i is None or not _echoes(wires[i], wire):
                        continue
                    result: dns.rrset.RRset | Absent | None = _empty_answer(wire)
                    if result is None:
                        try:
                            result = _plain_answer(_answers_only(wire))
                        except dns.exception.DNSException:
                            continue
                    del pending[wire[:2]]
                    results[i] = result
        except (OSError, ValidationError):
            pass  # what is still unanswered is asked again, one at a time
    for result, (name, rdtype) in zip(results, queries, strict=True):
        yield result if result is not None else dns_lookup(resolver, name, rdtype, deadline)


# A query's header after its id (RFC 1035 §4.1.1): RD set, one question, no other records; so
# no EDNS either, as dns.message.make_query() builds it when given no EDNS option.
_QUERY_HEADER = struct.pack("!HHHHH", dns.flags.RD, 1, 0, 0, 0)


@functools.lru_cache(maxsize=4096)
def _question_wire(name: str, rdtype: str) -> bytes:
    """The question section of a query for ``name`` (IDNA as dnspython encodes it)."""
    qname = dns.name.from_text(name).to_wire()
    assert qname is not None  # given no file, to_wire() returns the bytes
    return qname + struct.pack("!HH", dns.rdatatype.from_text(rdtype), dns.rdataclass.IN)


def _query_wire(name: str, rdtype: str) -> bytes:
    """``dns.message.make_query(name, rdtype).to_wire()``, byte for byte, with a random id from
    the CSPRNG; without dnspython's message objects, which cost more than the look-up's own
    network round trip (tests/unit/test_validation_dns.py compares the two)."""
    return secrets.token_bytes(2) + _QUERY_HEADER + _question_wire(name, rdtype)


def _echoes(query: bytes, response: bytes) -> bool:
    """A response (QR) to ``query``: the same id, opcode QUERY and our one question echoed byte
    for byte, as a resolver echoes it (RFC 1035 §7.3). What dnspython's `is_response()` asks,
    stricter only on the question's case, which we never vary."""
    question_end = len(query)  # a query from _query_wire is header + its question only
    return (
        len(response) >= question_end
        and response[:2] == query[:2]
        and response[2] & 0x80 != 0  # QR
        and response[2] & 0x78 == 0  # opcode QUERY
        and response[4:6] == b"\x00\x01"  # QDCOUNT 1
        and response[12:question_end] == query[12:question_end]
    )


def _empty_answer(response: bytes) -> Absent | None:
    """NXDOMAIN or NODATA read from the header of a response that `_echoes` our query, or None
    to parse its answers (`_answers_only`).

    Most answers a CAA climb gets are empty, and dnspython's parse of one (its SOA included)
    costs more than the rest of the look-up. The header (RFC 1035 §4.1.1) says enough: not
    truncated (TC), the RCODE and no answer records. Queries carry no EDNS, so there is no
    extended RCODE.
    """
    if response[2] & 0x02:  # TC: dns_lookup asks again over TCP
        return None
    rcode = response[3] & 0x0F
    if rcode == dns.rcode.NXDOMAIN:
        return Absent.NXDOMAIN
    if rcode == dns.rcode.NOERROR and response[6:8] == b"\x00\x00":  # ANCOUNT 0
        return Absent.NODATA
    return None


def _answers_only(response: bytes) -> dns.message.Message:
    """The response parsed by dnspython up to its answer section, all that `_plain_answer`
    reads: the authority and additional sections (a resolver's SOA or NS records, which cost
    most of a parse) count as zero and their bytes as trailing."""
    return dns.message.from_wire(
        response[:8] + b"\x00\x00\x00\x00" + response[12:], ignore_trailing=True
    )


def _plain_answer(response: dns.message.Message) -> dns.rrset.RRset | Absent | None:
    if response.flags & dns.flags.TC or not isinstance(response, dns.message.QueryMessage):
        return None
    if response.rcode() == dns.rcode.NXDOMAIN:
        return Absent.NXDOMAIN
    if response.rcode() != dns.rcode.NOERROR:
        return None
    try:
        answer = response.resolve_chaining().answer
    except dns.exception.DNSException:
        return None
    return Absent.NODATA if answer is None else answer


def split_wildcard(name: str) -> tuple[str, bool]:
    """``*.example.com`` -> (``example.com``, True): RFC 8555 §7.1.3 validates the base name."""
    if name.startswith("*."):
        return name[2:], True
    return name, False


def check_hostname(name: str) -> str:
    """The lower-cased LDH host name, or a malformed error.

    It ends up in a Host header, a URL, an SNI and DNS queries, so nothing else may pass.
    IP addresses are refused: RFC 8738 §3 gives them their own identifier type.
    """
    host = name.lower()
    labels = host.split(".")
    if (
        not host
        or len(host) > 253
        or not host.isascii()
        or not all(_LABEL_RE.fullmatch(label) for label in labels)
    ):
        raise ValidationError("malformed", f"{name!r} is not a valid DNS name")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    raise ValidationError("malformed", f"{name!r} is an IP address, not a DNS name")


def _parse_ip_identifier(value: str) -> IPAddress:
    # RFC 8738 §3: the value is the RFC 1123 / RFC 5952 textual form, so only that is accepted.
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError("malformed", f"{value!r} is not an IP address") from None
    if str(address) != value:
        raise ValidationError(
            "malformed", f"{value!r} is not in canonical form; expected {address}"
        )
    return address


def _resolve(host: str, resolver: dns.resolver.Resolver, deadline: Deadline) -> list[IPAddress]:
    addresses: list[IPAddress] = []
    absences: list[Absent] = []
    for result in dns_lookups(resolver, [(host, "A"), (host, "AAAA")], deadline):
        if isinstance(result, Absent):
            absences.append(result)
        else:
            addresses.extend(ipaddress.ip_address(rdata.to_text()) for rdata in result)
    if not addresses:
        if all(absence is Absent.NXDOMAIN for absence in absences):
            raise ValidationError("dns", f"DNS problem: NXDOMAIN looking up A/AAAA for {host}")
        raise ValidationError("dns", f"DNS problem: no A or AAAA records found for {host}")
    return addresses


def resolve(name: str, cfg: ValidationConfig) -> list[IPAddress]:
    """A and AAAA addresses of ``name`` via ``cfg.dns_resolver``; none at all is a dns error."""
    return _resolve(check_hostname(name), make_resolver(cfg), Deadline(cfg.timeout))


def key_authorization_digest(key_authorization: str) -> str:
    """RFC 8555 §8.4: base64url(SHA-256(key authorization)) without padding."""
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _candidates(addresses: Sequence[IPAddress]) -> list[IPAddress]:
    # RFC 8555 does not say which address to use. Like Boulder: the first IPv6 address, then
    # the first IPv4 one as a fallback, so a host with broken IPv6 still validates while one
    # validation never walks a long address list.
    v6 = [a for a in addresses if a.version == 6]
    v4 = [a for a in addresses if a.version == 4]
    return v6[:1] + v4[:1]


def _describe_os_error(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "Timeout"
    return exc.strerror or type(exc).__name__


def _connect(
    addresses: Sequence[IPAddress], port: int, deadline: Deadline, tried: list[IPAddress]
) -> tuple[socket.socket, IPAddress]:
    """Connect to the first candidate that accepts; only connect failures move on."""
    candidates = _candidates(addresses)
    failure = "no address to connect to"
    for position, address in enumerate(candidates):
        budget = deadline.remaining("connection", f"connecting to {address} port {port}")
        if position < len(candidates) - 1:
            # An unreachable IPv6 address must not eat the IPv4 fallback's whole budget.
            budget /= 2
        try:
            return socket.create_connection((str(address), port), timeout=budget), address
        except OSError as exc:
            tried.append(address)
            failure = f"{address}: {_describe_os_error(exc)} connecting to port {port}"
    raise ValidationError("connection", failure)


class _DeadlineSocket(socket.socket):
    """A connection whose every read first checks the validation's whole budget.

    Socket timeouts bound each read, and ``http.client`` reads headers a line at a time: a
    peer trickling one byte at a time would hold the validator for as long as it likes. Here
    each read may wait only for what is left of the budget, and none starts once it is spent
    (TimeoutError, as a socket timeout), so the response as a whole ends by the deadline,
    without a timer thread per fetch.
    """

    deadline: Deadline

    @classmethod
    def adopt(cls, sock: socket.socket, deadline: Deadline) -> _DeadlineSocket:
        adopted = cls(sock.family, sock.type, sock.proto, sock.detach())
        adopted.deadline = deadline
        return adopted

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        _wait_at_most(self, self.deadline)
        return super().recv_into(buffer, nbytes, flags)


class _DeadlineTLSSocket(ssl.SSLSocket):
    """`_DeadlineSocket` for TLS, the class `_https_client_context` wraps sockets in: TLS
    reads the connection in C, so the budget is checked on the reads of the TLS socket."""

    deadline: Deadline

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        _wait_at_most(self, self.deadline)
        return super().recv_into(buffer, nbytes, flags)


def _wait_at_most(sock: socket.socket, deadline: Deadline) -> None:
    left = deadline.left()
    if left <= 0:
        raise TimeoutError("the validation's time is spent")
    sock.settimeout(left)


# --- http-01 (RFC 8555 §8.3, RFC 8738 §4-5) -------------------------------------------------


@dataclass(frozen=True)
class _HTTPTarget:
    host: str
    address: IPAddress | None
    port: int
    path: str
    host_header: str
    url: str
    tls: bool = False

    @property
    def key(self) -> tuple[bool, str, int, str]:
        return self.tls, self.host, self.port, self.path


@dataclass(frozen=True)
class _Redirect:
    location: str


def _url_host(host: str, address: IPAddress | None) -> str:
    # RFC 3986 §3.2.2: an IPv6 literal in a URL or Host header goes in brackets.
    return f"[{host}]" if address is not None and address.version == 6 else host


def _initial_http_target(
    identifier_type: IdentifierType, identifier_value: str, token: str, cfg: ValidationConfig
) -> _HTTPTarget:
    if not _TOKEN_RE.fullmatch(token):
        raise ValidationError("malformed", "Challenge token is not base64url")
    address: IPAddress | None
    if identifier_type == "ip":
        # RFC 8738 §4: no DNS step; the identifier is the address to connect to.
        address = _parse_ip_identifier(identifier_value)
        host = str(address)
    elif identifier_type == "dns":
        if identifier_value.startswith("*."):
            # BRs §3.2.2.4.19: a web-server challenge cannot prove control of a whole zone.
            raise ValidationError("malformed", "http-01 cannot validate a wildcard name")
        address = None
        host = check_hostname(identifier_value)
    else:
        raise ValidationError("malformed", f"Unknown identifier type {identifier_type!r}")
    path = f"/.well-known/acme-challenge/{token}"
    url_host = _url_host(host, address)
    # The configured port is a transport detail of the test rig (as in Boulder and Pebble):
    # the URL and Host header stay what RFC 8555 §8.3 and RFC 8738 §5 prescribe.
    return _HTTPTarget(host, address, cfg.http01_port, path, url_host, f"http://{url_host}{path}")


def _redirect_target(
    location: str,
    current: _HTTPTarget,
    identifier_type: IdentifierType,
    cfg: ValidationConfig,
) -> _HTTPTarget:
    """The next hop, if policy allows it: as Let's Encrypt, http or https on its default port
    (BRs §3.2.2.4.19: 80 or 443), plus the rig's ports."""
    if len(location) > _MAX_REDIRECT_URL or not all(0x21 <= ord(c) <= 0x7E for c in location):
        raise ValidationError("connection", "Invalid redirect target: not a printable ASCII URL")
    try:
        parts = urlsplit(urljoin(current.url, location))
        written_port = parts.port
    except ValueError:
        raise ValidationError("connection", "Invalid redirect target: malformed URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValidationError(
            "connection",
            f"Redirect to scheme {parts.scheme!r} not followed; only http and https are",
        )
    if parts.username is not None or parts.password is not None or not parts.hostname:
        raise ValidationError("connection", "Invalid redirect target: bad authority")
    tls = parts.scheme == "https"
    default_port, port = (443, cfg.http01_https_port) if tls else (80, cfg.http01_port)
    if written_port not in (None, default_port, port):
        raise ValidationError(
            "connection",
            f"Redirect to {parts.scheme} port {written_port} not followed; "
            f"only {default_port} and {port} are",
        )
    host = parts.hostname
    address: IPAddress | None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        # A DNS name's owner proves control through names; redirecting its proof to a bare
        # address would prove nothing about the name (Boulder refuses the same).
        if identifier_type != "ip":
            raise ValidationError(
                "connection", f"Redirect to IP address {host} not followed for a DNS identifier"
            )
        host = str(address)
    else:
        try:
            host = check_hostname(host)
        except ValidationError:
            raise ValidationError(
                "connection", f"Invalid host in redirect target {host!r}"
            ) from None
    url_host = _url_host(host, address)
    # The scheme's default port and its configured port both mean "the http-01 responder".
    netloc = url_host if written_port in (None, default_port) else f"{url_host}:{written_port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    return _HTTPTarget(host, address, port, path, netloc, url, tls)


def _read_capped_body(response: http.client.HTTPResponse, deadline: Deadline, url: str) -> bytes:
    body = bytearray()
    while len(body) <= MAX_HTTP01_BODY:
        # Each read waits at most what is left (_DeadlineSocket); none starts once it is spent.
        # No `sock.settimeout()` here: from Python 3.13 on, `read1()` closes the socket as soon
        # as the Content-Length is read, and a call on it then fails with EBADF.
        deadline.remaining("connection", f"reading the response from {url}")
        chunk = response.read1(MAX_HTTP01_BODY + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
    raise ValidationError(
        "incorrectResponse", f"Response from {url} is larger than {MAX_HTTP01_BODY} bytes"
    )


def _https_client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # As Let's Encrypt: the certificate is not checked. Getting a first one is often the point.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _DeadlineTLSSocket
    return context


def _start_tls(
    sock: socket.socket, target: _HTTPTarget, used: IPAddress, deadline: Deadline
) -> _DeadlineTLSSocket:
    # The socket timeout bounds the whole handshake (see `_handshake`). No SNI for an address
    # (RFC 6066 §3).
    sock.settimeout(deadline.remaining("connection", f"in the TLS handshake with {used}"))
    server_name = target.host if target.address is None else None
    try:
        tls = _https_client_context().wrap_socket(sock, server_hostname=server_name)
    except ssl.SSLError as exc:  # wrap_socket has closed the socket
        raise ValidationError(
            "tls", f"{used}: TLS handshake failed ({exc.reason or 'unknown reason'})"
        ) from None
    assert isinstance(tls, _DeadlineTLSSocket)  # the context's sslsocket_class
    tls.deadline = deadline
    return tls


def _exchange(
    sock: socket.socket, target: _HTTPTarget, used: IPAddress, deadline: Deadline
) -> bytes | _Redirect:
    conn = http.client.HTTPConnection(str(used), target.port)
    sock = conn.sock = _DeadlineSocket.adopt(sock, deadline)
    try:
        if target.tls:
            sock = conn.sock = _start_tls(sock, target, used, deadline)
        sock.settimeout(deadline.remaining("connection", f"sending to {target.url}"))
        conn.putrequest("GET", target.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", target.host_header)
        conn.putheader("User-Agent", _USER_AGENT)
        # Some WAFs reject requests without Accept; Boulder learned this the hard way.
        conn.putheader("Accept", "*/*")
        conn.putheader("Connection", "close")
        conn.endheaders()
        sock.settimeout(deadline.remaining("connection", f"waiting for {target.url}"))
        with conn.getresponse() as response:
            location = response.getheader("Location")
            if response.status in _REDIRECT_STATUSES and location:
                return _Redirect(location)
            if response.status == 303 and location:
                raise ValidationError(
                    "connection", f"Redirect status 303 from {target.url} is not followed"
                )
            if response.status != 200:
                # As Boulder: the responder refused to show a key authorization at all.
                raise ValidationError(
                    "unauthorized",
                    f"Invalid response from {target.url} [{used}]: HTTP {response.status}",
                )
            return _read_capped_body(response, deadline, target.url)
    finally:
        conn.close()


def _fetch(
    target: _HTTPTarget,
    cfg: ValidationConfig,
    deadline: Deadline,
    records: list[ValidationRecord],
) -> bytes | _Redirect:
    addresses: tuple[IPAddress, ...] = ()
    tried: list[IPAddress] = []
    used: IPAddress | None = None
    try:
        if target.address is not None:
            addresses = (target.address,)
        else:
            addresses = tuple(_resolve(target.host, make_resolver(cfg), deadline))
        sock, used = _connect(addresses, target.port, deadline, tried)
        try:
            return _exchange(sock, target, used, deadline)
        except TimeoutError:
            raise ValidationError(
                "connection", f"{used}: Timeout after connect (waiting for {target.url})"
            ) from None
        except http.client.HTTPException:
            raise ValidationError(
                "connection", f"{used}: Malformed or missing HTTP response from {target.url}"
            ) from None
        except OSError as exc:
            raise ValidationError(
                "connection", f"{used}: {_describe_os_error(exc)} after connect ({target.url})"
            ) from None
    finally:
        records.append(
            ValidationRecord(
                hostname=target.host,
                port=target.port,
                url=target.url,
                addresses_resolved=addresses,
                address_used=used,
                addresses_tried=tuple(tried),
            )
        )


@_counted("http-01")
def validate_http01(
    identifier_type: IdentifierType,
    identifier_value: str,
    token: str,
    key_authorization: str,
    cfg: ValidationConfig,
) -> tuple[ValidationRecord, ...]:
    """RFC 8555 §8.3 (RFC 8738 §4-5 for IPs): GET the token's URL, body must be the key
    authorization. Returns one record per request made (the first, then each redirect)."""
    records: list[ValidationRecord] = []
    try:
        target = _initial_http_target(identifier_type, identifier_value, token, cfg)
        deadline = Deadline(cfg.timeout)
        visited = {target.key}
        redirects = 0
        while True:
            outcome = _fetch(target, cfg, deadline, records)
            if not isinstance(outcome, _Redirect):
                _check_key_authorization(outcome, key_authorization, target.url)
                return tuple(records)
            if redirects == cfg.max_redirects:
                raise ValidationError(
                    "connection", f"Too many redirects (more than {cfg.max_redirects})"
                )
            redirects += 1
            target = _redirect_target(outcome.location, target, identifier_type, cfg)
            if target.key in visited:
                raise ValidationError("connection", f"Redirect loop detected at {target.url}")
            visited.add(target.key)
    except ValidationError as exc:
        exc.records = tuple(records)
        raise


def _check_key_authorization(body: bytes, key_authorization: str, url: str) -> None:
    # RFC 8555 §8.3: "The server SHOULD ignore whitespace characters at the end of the body".
    payload = body.rstrip()
    if not hmac.compare_digest(payload, key_authorization.encode("ascii")):
        # RFC 8555 §6.7 incorrectResponse: a response came, it does not match the challenge.
        shown = payload[:64].decode("ascii", "backslashreplace")
        raise ValidationError(
            "incorrectResponse",
            f"The key authorization from {url} does not match this challenge "
            f"(got {shown!r}{'...' if len(payload) > 64 else ''})",
        )


# --- dns-01 (RFC 8555 §8.4) -----------------------------------------------------------------


@_counted("dns-01")
def validate_dns01(
    name: str, key_authorization: str, cfg: ValidationConfig
) -> tuple[ValidationRecord, ...]:
    """RFC 8555 §8.4: one of the TXT records at ``_acme-challenge.<name>`` must hold
    :func:`key_authorization_digest`. A wildcard is validated on its base name (§7.1.3).
    IP identifiers cannot use dns-01 (RFC 8738 §7)."""
    base, _ = split_wildcard(name)
    records: tuple[ValidationRecord, ...] = ()
    try:
        host = check_hostname(base)
        records = (ValidationRecord(hostname=host),)
        challenge_name = f"_acme-challenge.{host}"
        result = dns_lookup(make_resolver(cfg), challenge_name, "TXT", Deadline(cfg.timeout))
        if isinstance(result, Absent):
            raise ValidationError(
                "dns", f"DNS problem: {result.value} looking up TXT for {challenge_name}"
            )
        expected = key_authorization_digest(key_authorization).encode("ascii")
        # RFC 7208 §3.3 convention: a TXT record's character-strings form one value.
        values = [
            b"".join(rdata.strings)
            for rdata in result
            if isinstance(rdata, dns.rdtypes.txtbase.TXTBase)
        ]
        if any(hmac.compare_digest(value, expected) for value in values):
            return records
        # RFC 8555 §6.7 incorrectResponse (Boulder says unauthorized): the record exists,
        # its content does not match — the same type http-01 and tls-alpn-01 use for it.
        shown = ", ".join(repr(v[:64].decode("ascii", "backslashreplace")) for v in values[:3])
        raise ValidationError(
            "incorrectResponse", f"Incorrect TXT record {shown} found at {challenge_name}"
        )
    except ValidationError as exc:
        exc.records = records
        raise


# --- tls-alpn-01 (RFC 8737, RFC 8738 §6) ----------------------------------------------------


def _alpn_client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The challenge certificate is self-signed by design (RFC 8737 §3): nothing to verify.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # RFC 8737 §4: acme-tls/1 is only negotiated over TLS 1.2 or later.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # RFC 8737 §3: offer exactly one protocol, acme-tls/1.
    context.set_alpn_protocols([ACME_TLS_1_PROTOCOL])
    return context


def _handshake(
    sock: socket.socket, server_name: str, used: IPAddress, deadline: Deadline
) -> tuple[bytes | None, str | None]:
    """The peer's leaf certificate (DER) and the ALPN protocol it selected."""
    doing = f"in the TLS handshake with {used}"
    with sock:
        # Since Python 3.5 the socket timeout bounds the whole handshake, not each read
        # (ssl.SSLSocket.do_handshake), so unlike HTTP no watchdog is needed here.
        sock.settimeout(deadline.remaining("connection", doing))
        try:
            with _alpn_client_context().wrap_socket(sock, server_hostname=server_name) as tls:
                return tls.getpeercert(binary_form=True), tls.selected_alpn_protocol()
        except TimeoutError:
            raise ValidationError("connection", f"{used}: Timeout {doing}") from None
        except ssl.SSLError as exc:
            raise ValidationError(
                "tls", f"{used}: TLS handshake failed ({exc.reason or 'unknown reason'})"
            ) from None
        except OSError as exc:
            raise ValidationError(
                "connection", f"{used}: {_describe_os_error(exc)} during the TLS handshake"
            ) from None


def _general_name_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName | x509.IPAddress):
        return str(name.value)
    return type(name).__name__


def _check_challenge_certificate(
    der: bytes, expected: x509.DNSName | x509.IPAddress, key_authorization: str
) -> None:
    # Every mismatch is RFC 8555 §6.7 incorrectResponse: a certificate came, it is not the
    # one this challenge asks for.
    try:
        extensions = x509.load_der_x509_certificate(der).extensions
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        acme_identifier = extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    except x509.ExtensionNotFound as exc:
        missing = "acmeIdentifier" if exc.oid == ID_PE_ACME_IDENTIFIER else "subjectAltName"
        raise ValidationError(
            "incorrectResponse", f"The challenge certificate has no {missing} extension"
        ) from None
    except (ValueError, x509.DuplicateExtension, x509.InvalidVersion):
        raise ValidationError(
            "incorrectResponse", "The challenge certificate could not be parsed"
        ) from None

    # RFC 8737 §3: the subjectAltName holds the identifier "and no other entries".
    names = list(san)
    if len(names) != 1 or not _same_general_name(names[0], expected):
        shown = ", ".join(_general_name_text(n) for n in names[:5])
        raise ValidationError(
            "incorrectResponse",
            f"The challenge certificate must name only {expected.value}; it names [{shown}]",
        )
    # RFC 8737 §3: the acmeIdentifier extension MUST be critical, so that such a certificate
    # can never be mistaken for an ordinary server certificate.
    if not acme_identifier.critical:
        raise ValidationError(
            "incorrectResponse", "The acmeIdentifier extension of the certificate is not critical"
        )
    # Authorization ::= OCTET STRING (SIZE (32)), DER: 04 20 <SHA-256(key authorization)>.
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    if not hmac.compare_digest(acme_identifier.value.public_bytes(), b"\x04\x20" + digest):
        raise ValidationError(
            "incorrectResponse",
            "The acmeIdentifier extension does not hold the SHA-256 digest of the key "
            "authorization for this challenge",
        )


def _same_general_name(name: x509.GeneralName, expected: x509.DNSName | x509.IPAddress) -> bool:
    if isinstance(expected, x509.DNSName):
        return isinstance(name, x509.DNSName) and name.value.lower() == expected.value
    return isinstance(name, x509.IPAddress) and name.value == expected.value


@_counted("tls-alpn-01")
def validate_tls_alpn01(
    identifier_type: IdentifierType,
    identifier_value: str,
    key_authorization: str,
    cfg: ValidationConfig,
) -> tuple[ValidationRecord, ...]:
    """RFC 8737 §3: a TLS handshake offering only acme-tls/1 must select it and present a
    certificate naming only the identifier, with the critical acmeIdentifier extension."""
    records: tuple[ValidationRecord, ...] = ()
    addresses: tuple[IPAddress, ...] = ()
    tried: list[IPAddress] = []
    used: IPAddress | None = None
    expected: x509.DNSName | x509.IPAddress
    try:
        deadline = Deadline(cfg.timeout)
        if identifier_type == "ip":
            address = _parse_ip_identifier(identifier_value)
            # RFC 8738 §6: SNI cannot carry an address, so it carries the reverse-mapping name,
            # e.g. 1.0.0.127.in-addr.arpa (no trailing dot in SNI: RFC 6066 §3).
            server_name = address.reverse_pointer
            expected = x509.IPAddress(address)
            addresses = (address,)
        elif identifier_type == "dns":
            if identifier_value.startswith("*."):
                # BRs §3.2.2.4.20: one host's TLS responder cannot prove control of a zone.
                raise ValidationError("malformed", "tls-alpn-01 cannot validate a wildcard name")
            server_name = check_hostname(identifier_value)
            expected = x509.DNSName(server_name)
        else:
            raise ValidationError("malformed", f"Unknown identifier type {identifier_type!r}")
        try:
            if not addresses:
                addresses = tuple(_resolve(server_name, make_resolver(cfg), deadline))
            sock, used = _connect(addresses, cfg.tlsalpn01_port, deadline, tried)
            der, protocol = _handshake(sock, server_name, used, deadline)
        finally:
            records = (
                ValidationRecord(
                    hostname=identifier_value,
                    port=cfg.tlsalpn01_port,
                    addresses_resolved=addresses,
                    address_used=used,
                    addresses_tried=tuple(tried),
                ),
            )
        if protocol != ACME_TLS_1_PROTOCOL:
            # ALPN is part of the handshake: a responder that does not select acme-tls/1 is
            # not speaking the challenge protocol at all (RFC 8737 §3).
            raise ValidationError(
                "tls", f"{used}: the server did not negotiate ALPN protocol {ACME_TLS_1_PROTOCOL}"
            )
        if der is None:
            raise ValidationError("tls", f"{used}: the server presented no certificate")
        _check_challenge_certificate(der, expected, key_authorization)
        return records
    except ValidationError as exc:
        exc.records = records
        raise
