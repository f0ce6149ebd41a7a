"""Discovery: find certificates already deployed, on TLS endpoints and in files.

This module only looks; `ca.storage.discovery` records what it saw. Nothing here verifies a
chain: a scan records what an endpoint presents or a file holds, trusted or not, so shadow and
broken certificates show up in the inventory instead of being hidden by a failed handshake.

TLS: asyncio connections, at most `concurrency` at a time, each bounded by `timeout` from the
first SYN to the end of the handshake; TLS 1.2 or newer. SNI is the target's host name when it
is a name (never an IP address, RFC 6066 §3) unless `sni` forces one.

Files: walks files and directories without following a symlink cycle (directories and files
are remembered by (st_dev, st_ino)), reads only regular files up to `max_size` bytes (a FIFO
would block, a device could be endless), and finds PEM (any number of CERTIFICATE and PKCS7
blocks per file), DER and PKCS#7 (DER) certificates. Anything unreadable or unparseable is
reported for that path and the scan goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import os
import re
import socket
import ssl
import stat
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.utils import CryptographyDeprecationWarning

from ca.errors import CAError, Kind

DEFAULT_MAX_FILE_SIZE = 1024 * 1024

# -- targets -----------------------------------------------------------------------------------

_TARGET = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^\s:\[\]]+)):(?P<ports>\S+)$")
_PORTS = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?$")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One TLS endpoint to scan: where to connect and which SNI to send (None: none)."""

    host: str
    port: int
    sni: str | None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def location(self) -> str:
        """Where a certificate was seen: `host:port`, plus the SNI when it is not the host
        (one endpoint can present a different chain per name)."""
        if self.sni is None or self.sni == self.host:
            return self.address
        return f"{self.address} sni={self.sni}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def parse_target(text: str, *, sni: str | None = None) -> list[Endpoint]:
    """`HOST:PORT`, `HOST:LOW-HIGH` or `[IPv6]:PORT[-HIGH]`; a CAError(BAD_REQUEST) otherwise."""
    raw = text.strip()
    match = _TARGET.match(raw)
    if not match:
        raise CAError(
            Kind.BAD_REQUEST, f"{text!r} is not a target (HOST:PORT, HOST:PORT-PORT, [v6]:PORT)"
        )
    ports = _PORTS.match(match.group("ports"))
    if not ports:
        raise CAError(
            Kind.BAD_REQUEST, f"{text!r}: {match.group('ports')!r} is not a port or range"
        )
    low = int(ports.group(1))
    high = int(ports.group(2) or low)
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        raise CAError(Kind.BAD_REQUEST, f"{text!r}: ports are between 1 and 65535")
    if high < low:
        raise CAError(Kind.BAD_REQUEST, f"{text!r}: the range's end is below its start")
    if match.group("v6") is not None:
        host = match.group("v6")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise CAError(Kind.BAD_REQUEST, f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host = match.group("host")
        if not _is_ip(host) and not _HOSTNAME.match(host):
            raise CAError(Kind.BAD_REQUEST, f"{text!r}: {host!r} is not a host name or address")
    if sni is not None and (_is_ip(sni) or not _HOSTNAME.match(sni)):
        # RFC 6066 §3: a server name is a DNS host name, never an address.
        raise CAError(Kind.BAD_REQUEST, f"{sni!r} is not a host name to send as SNI")
    if sni is None and not _is_ip(host):
        sni = host.rstrip(".")
    return [Endpoint(host, port, sni) for port in range(low, high + 1)]


def parse_targets(texts: Iterable[str], *, sni: str | None = None) -> list[Endpoint]:
    """Every endpoint of every target, in order, without duplicates."""
    seen: dict[Endpoint, None] = {}
    for text in texts:
        for endpoint in parse_target(text, sni=sni):
            seen.setdefault(endpoint, None)
    return list(seen)


def read_target_file(path: Path) -> list[str]:
    """Targets from a list file: one per line; blank lines and `#` comments are ignored."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise CAError(Kind.BAD_REQUEST, f"cannot read target list {path}: {reason}") from None
    lines = (line.split("#", 1)[0].strip() for line in content.splitlines())
    return [line for line in lines if line]


# -- TLS scanning ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TlsResult:
    """What one endpoint presented (leaf first, as sent), or why it presented nothing."""

    endpoint: Endpoint
    chain: tuple[bytes, ...] = ()
    tls_version: str | None = None
    error: str | None = None


def client_context() -> ssl.SSLContext:
    """TLS 1.2+, no verification: we record what is presented, trusted or not."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def presented_chain(ssl_object: ssl.SSLObject) -> tuple[bytes, ...]:
    """The whole chain the peer sent, DER, leaf first.

    Python 3.13 has `SSLObject.get_unverified_chain()`; 3.11's `_ssl._SSLSocket` already has it
    internally. Without either, only the leaf is available."""
    public = getattr(ssl_object, "get_unverified_chain", None)
    internal = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    getter = public or internal
    if getter is not None:
        import _ssl

        chain = getter()
        if chain:
            if isinstance(chain[0], bytes):
                return tuple(chain)
            return tuple(c.public_bytes(_ssl.ENCODING_DER) for c in chain)
    leaf = ssl_object.getpeercert(binary_form=True)
    return (leaf,) if leaf else ()


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s (no TLS answer)"
    if isinstance(exc, ssl.SSLEOFError):
        return "connection closed during the TLS handshake"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.strerror or str(exc)
        return f"TLS handshake failed: {str(reason).lower().replace('_', ' ')}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset during the TLS handshake"
    if isinstance(exc, (asyncio.IncompleteReadError, EOFError)):
        return "connection closed during the TLS handshake"
    if isinstance(exc, OSError):
        if isinstance(exc, socket.gaierror):
            return "cannot resolve the host name"
        return (exc.strerror or str(exc) or type(exc).__name__).lower()
    return f"{type(exc).__name__}: {str(exc)[:160]}"


async def scan_endpoint(
    endpoint: Endpoint, *, timeout: float, context: ssl.SSLContext | None = None
) -> TlsResult:
    """Connect, handshake, take the presented chain, close. Never raises for the endpoint's
    faults: they become the result's `error`."""
    context = context or client_context()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(
                endpoint.host,
                endpoint.port,
                ssl=context,
                # "" sends no SNI (an IP target); asyncio would otherwise send the host.
                server_hostname=endpoint.sni or "",
                ssl_handshake_timeout=timeout,
            )
        ssl_object = writer.get_extra_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject):
            return TlsResult(endpoint, error="no TLS session")
        chain = presented_chain(ssl_object)
        if not chain:
            return TlsResult(endpoint, error="the server presented no certificate")
        return TlsResult(endpoint, chain, ssl_object.version())
    except (OSError, TimeoutError, EOFError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
        return TlsResult(endpoint, error=_describe(exc, timeout))
    except UnicodeError:
        return TlsResult(endpoint, error="the host name cannot be encoded (IDNA)")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout):
                    await writer.wait_closed()


async def scan_endpoints_async(
    endpoints: Sequence[Endpoint], *, timeout: float, concurrency: int
) -> list[TlsResult]:
    """Every endpoint, `concurrency` at a time; results in the endpoints' order."""
    limit = asyncio.Semaphore(max(1, concurrency))
    context = client_context()

    async def one(endpoint: Endpoint) -> TlsResult:
        async with limit:
            return await scan_endpoint(endpoint, timeout=timeout, context=context)

    return list(await asyncio.gather(*(one(e) for e in endpoints)))


def scan_endpoints(
    endpoints: Sequence[Endpoint], *, timeout: float, concurrency: int
) -> list[TlsResult]:
    if timeout <= 0:
        raise CAError(Kind.BAD_REQUEST, "the timeout must be positive")
    if concurrency < 1:
        raise CAError(Kind.BAD_REQUEST, "the concurrency must be at least 1")
    return asyncio.run(scan_endpoints_async(endpoints, timeout=timeout, concurrency=concurrency))


# -- file scanning -----------------------------------------------------------------------------

_PEM_BLOCK = re.compile(
    rb"-----BEGIN (?P<label>[A-Z0-9 ]+)-----\r?\n.*?-----END (?P=label)-----", re.DOTALL
)
_PEM_CERT_LABELS = {b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE"}
_PEM_PKCS7_LABELS = {b"PKCS7", b"PKCS #7 SIGNED DATA", b"CMS"}


@dataclasses.dataclass(frozen=True)
class FileResult:
    """One path the walk looked at.

    status: `found` (certificates, maybe with `error` naming blocks that did not parse),
    `none` (read, no certificate in it), `skipped` (not read: too large, not a regular file,
    already seen through another path), `error` (could not be read or listed)."""

    path: str
    status: str
    certificates: tuple[bytes, ...] = ()
    error: str | None = None


def parse_certificates(data: bytes) -> tuple[list[bytes], list[str]]:
    """Certificates (DER) in a file's bytes, and what failed to parse."""
    # A certificate that breaks RFC 5280 (a negative serial, ...) is still deployed: record it
    # (findings judge it) instead of letting cryptography's deprecation warnings interfere.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return _parse_certificates(data)


def _parse_certificates(data: bytes) -> tuple[list[bytes], list[str]]:
    found: list[bytes] = []
    problems: list[str] = []
    if b"-----BEGIN " in data:
        for block in _PEM_BLOCK.finditer(data):
            label = block.group("label")
            try:
                if label in _PEM_CERT_LABELS:
                    pem = block.group(0)
                    if label != b"CERTIFICATE":
                        pem = pem.replace(label, b"CERTIFICATE")
                    found.append(_der(x509.load_pem_x509_certificate(pem)))
                elif label in _PEM_PKCS7_LABELS:
                    pem = block.group(0).replace(label, b"PKCS7")
                    found.extend(_der(c) for c in pkcs7.load_pem_pkcs7_certificates(pem))
            except ValueError:
                problems.append(f"a PEM {label.decode()} block does not parse")
        return found, problems
    if data[:1] != b"\x30":  # every DER certificate and PKCS#7 object is a SEQUENCE
        return found, problems
    try:
        return [_der(x509.load_der_x509_certificate(data))], problems
    except ValueError:
        pass
    try:
        return [_der(c) for c in pkcs7.load_der_pkcs7_certificates(data)], problems
    except ValueError:
        return found, problems


def _der(certificate: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return certificate.public_bytes(Encoding.DER)


def _read_file(path: str, size: int) -> FileResult:
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after lstat, open() does not hang.
        fd = os.open(
            path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
        )
    except OSError as exc:
        return FileResult(path, "error", error=_os_reason(exc))
    try:
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(size + 1)
    except OSError as exc:
        return FileResult(path, "error", error=_os_reason(exc))
    found, problems = parse_certificates(data)
    if found:
        return FileResult(path, "found", tuple(found), "; ".join(problems) or None)
    if problems:
        return FileResult(path, "error", error="; ".join(problems))
    return FileResult(path, "none")


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return (exc.strerror or str(exc)).lower()


def walk_files(
    paths: Sequence[str | os.PathLike[str]], *, max_size: int = DEFAULT_MAX_FILE_SIZE
) -> Iterator[FileResult]:
    """Every file under `paths`, each reported once (see FileResult)."""
    visited: set[tuple[int, int]] = set()
    stack: list[str] = [os.path.abspath(os.fspath(p)) for p in reversed(list(paths))]
    while stack:
        path = stack.pop()
        try:
            # Follows symbolic links (so a link to a certificate is read); a link cycle
            # a -> b -> a fails here with ELOOP, a link to an ancestor directory is caught by
            # `visited`.
            info = os.stat(path)
        except OSError as exc:
            yield FileResult(path, "error", error=_os_reason(exc))
            continue
        identity = (info.st_dev, info.st_ino)
        if identity in visited:
            yield FileResult(path, "skipped", error="already scanned (through another link)")
            continue
        visited.add(identity)
        if stat.S_ISDIR(info.st_mode):
            try:
                with os.scandir(path) as entries:
                    names = sorted(entry.name for entry in entries)
            except OSError as exc:
                yield FileResult(path, "error", error=_os_reason(exc))
                continue
            stack.extend(os.path.join(path, name) for name in reversed(names))
        elif not stat.S_ISREG(info.st_mode):
            yield FileResult(path, "skipped", error="not a regular file")
        elif info.st_size > max_size:
            yield FileResult(path, "skipped", error=f"larger than {max_size} bytes")
        else:
            real = os.path.realpath(path)
            result = _read_file(real, max_size)
            yield dataclasses.replace(result, path=path)


def scan_files(
    paths: Sequence[str | os.PathLike[str]], *, max_size: int = DEFAULT_MAX_FILE_SIZE
) -> list[FileResult]:
    if max_size < 1:
        raise CAError(Kind.BAD_REQUEST, "the maximum file size must be at least 1 byte")
    return list(walk_files(paths, max_size=max_size))
