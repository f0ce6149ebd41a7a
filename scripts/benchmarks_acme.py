"""`scripts/bench acme`: N concurrent ACME clients doing whole certificate cycles, vs Pebble.

Each client is a small RFC 8555 client written here (flattened JWS with ES256, RFC 7638
thumbprints, HTTP/1.1 keep-alive over TLS that trusts only the server's root); all of them run
on one event loop, in one thread of the load generator. One cycle is what a real
client does for one certificate: newOrder → fetch the authorization → answer its http-01
challenge → finalize with a fresh P-256 CSR → poll while `processing` → download the chain; the
server validates for real, connecting to one shared HTTP responder (a small event loop) on its
http-01 port. Accounts are made before the clock starts. The same load runs against
`certwright serve` and against Pebble (PEBBLE_VA_NOSLEEP=1) in the same run, on the same machine.

Clients honour Retry-After and otherwise poll every --poll seconds. Each downloaded chain is
checked (names, leaf signed by the first intermediate); a wrong one counts as a failure. Last,
each server's "stack floor": its CPU per request on its directory, under wrk. The
figures are printed; nothing about time is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from scripts.benchmarks_revocation import wrk_rate
from tests.integration.acme_harness import (
    LOOPBACK,
    AcmeServer,
    certwright_server,
    challtestsrv,
    pebble_server,
)

ERROR_PREFIX = "urn:ietf:params:acme:error:"
# A server that leaves a request unanswered this long has stopped (Debian's Pebble 2.4 stops
# answering altogether with ~32 concurrent clients); the run of that server ends there.
REQUEST_TIMEOUT = 30.0
PHASES = ("newOrder", "authorization", "challenge", "finalize", "download")
CHALLENGE_PATH = "/.well-known/acme-challenge/"
# certwright's per-account, per-domain and per-IP limits would cap a benchmark, not the server.
NO_RATE_LIMITS = {
    "CERTWRIGHT_ACME__ORDERS_PER_ACCOUNT_PER_HOUR": "0",
    "CERTWRIGHT_ACME__CERTIFICATES_PER_DOMAIN_PER_WEEK": "0",
    "CERTWRIGHT_ACME__FAILED_VALIDATIONS_PER_ACCOUNT_PER_HOUR": "0",
    "CERTWRIGHT_ACME__ACCOUNTS_PER_IP_PER_HOUR": "0",
}


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 8555 §6.1, RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class AcmeProblem(Exception):
    """An RFC 7807 problem document the server answered with."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.type = str(problem.get("type", ""))
        super().__init__(f"{status} {self.type}: {problem.get('detail', '')}")


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body)
        return document

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return None  # an HTTP-date: treated as absent, the client polls at its own pace


# -- the http-01 responder -----------------------------------------------------------------------


class ChallengeResponder:
    """One HTTP server answering every client's http-01 key authorizations (§8.3).

    It runs on the same two cores as the server under test, so it is lean: one thread with a
    uvloop event loop answers each validation request and closes the connection. (A threaded
    `http.server` took ~0.6 ms of CPU per validation, a thread and a header parse each, a
    tenth of the load generator's whole share.)"""

    def __init__(self, port: int) -> None:
        self._port = port
        self._answers: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._loop = uvloop.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        # A short backlog drops SYNs under concurrent validations, each drop costing the
        # validator a 1 s retransmit (DESIGN.md §6).
        server = self._loop.run_until_complete(
            self._loop.create_server(
                lambda: _ResponderProtocol(self._answer), LOOPBACK, self._port, backlog=1024
            )
        )
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    def _answer(self, target: bytes) -> bytes | None:
        if not target.startswith(CHALLENGE_PATH.encode()):
            return None
        with self._lock:
            return self._answers.get(target[len(CHALLENGE_PATH) :].decode("ascii", "replace"))

    def __enter__(self) -> ChallengeResponder:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def add(self, token: str, key_authorization: str) -> None:
        with self._lock:
            self._answers[token] = key_authorization.encode("ascii")

    def remove(self, token: str) -> None:
        with self._lock:
            self._answers.pop(token, None)


class _ResponderProtocol(asyncio.Protocol):
    """One connection to the responder: reads the request head, answers it, closes."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self._answer = answer
        self._buffer = b""
        self._transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        if b"\r\n\r\n" not in self._buffer:
            if len(self._buffer) > 16384:
                self._transport.close()
            return
        parts = self._buffer.split(b"\r\n", 1)[0].split(b" ")
        body = self._answer(parts[1]) if len(parts) == 3 and parts[0] == b"GET" else None
        if body is None:
            head, body = b"HTTP/1.1 404 Not Found", b""
        else:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream"
        self._transport.write(
            head + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        self._transport.close()


# -- the client ----------------------------------------------------------------------------------


class _Connection:
    """One keep-alive HTTPS connection (HTTP/1.1): a request at a time, its reply read whole,
    framed by Content-Length or chunked (Pebble's Go server chunks larger bodies)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self._host, self._port, self._context = host, port, context
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        """Drop the connection now (no TLS close_notify): after a failure, or when the reply
        was the last the server sends on it; the next request opens another."""
        if self._writer is not None:
            self._writer.transport.abort()
        self._reader = self._writer = None

    async def aclose(self) -> None:
        """Close the connection, TLS close_notify included."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def request(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> Reply:
        head = f"{method} {target} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        if body is not None:
            head += f"Content-Length: {len(body)}\r\n"
        data = head.encode("latin-1") + b"\r\n" + (body or b"")
        for attempt in (1, 2):
            fresh = self._writer is None
            try:
                return await asyncio.wait_for(self._exchange(method, data), REQUEST_TIMEOUT)
            except (ConnectionError, asyncio.IncompleteReadError):
                # A keep-alive connection the server closed while idle: reconnect once. A
                # request the server did process answers badNonce on replay, never twice.
                self.close()
                if attempt == 2 or fresh:
                    raise
            except BaseException:
                self.close()  # a timeout leaves it mid-request: start afresh
                raise
        raise AssertionError("unreachable")

    async def _exchange(self, method: str, data: bytes) -> Reply:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self._host, self._port, ssl=self._context, limit=1 << 20
            )
        assert self._reader is not None
        self._writer.write(data)
        lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        last = headers.get("connection", "").lower() == "close"
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked()
        elif "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        else:
            body, last = await self._reader.read(), True  # framed by the connection's end
        if last:
            self.close()
        return Reply(status, headers, body)

    async def _chunked(self) -> bytes:
        assert self._reader is not None
        parts = []
        while size := int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append((await self._reader.readexactly(size + 2))[:-2])
        while await self._reader.readuntil(b"\r\n") != b"\r\n":
            pass  # trailer fields
        return b"".join(parts)


class AsyncAcmeClient:
    """One account on one ACME server; its coroutines run on one event loop at a time."""

    def __init__(
        self,
        directory_url: str,
        context: ssl.SSLContext,
        responder: ChallengeResponder,
        poll: float,
    ) -> None:
        parsed = urllib.parse.urlsplit(directory_url)
        assert parsed.hostname and parsed.port
        self._directory_url = directory_url
        self._connection = _Connection(parsed.hostname, parsed.port, context)
        self._responder = responder
        self._poll = poll
        self._key = ec.generate_private_key(ec.SECP256R1())
        numbers = self._key.public_key().public_numbers()
        # RFC 7638 §3.2: the required members only, in lexicographic order, no whitespace.
        self._jwk = {
            "crv": "P-256",
            "kty": "EC",
            "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big")),
        }
        canonical = json.dumps(self._jwk, sort_keys=True, separators=(",", ":")).encode()
        self._thumbprint = b64url(hashlib.sha256(canonical).digest())
        self._kid: str | None = None
        self._nonce: str | None = None
        self.slept = 0.0  # seconds spent waiting as the server or --poll asked
        self.phases: dict[str, float] = dict.fromkeys(PHASES, 0.0)  # seconds per cycle step
        self.directory: dict[str, Any] = {}

    async def open(self) -> None:
        """Read the directory (§7.1.1)."""
        self.directory = (await self._request("GET", self._directory_url)).json()

    async def close(self) -> None:
        await self._connection.aclose()

    async def _request(
        self, method: str, url: str, body: bytes | None = None, content_type: str | None = None
    ) -> Reply:
        headers = {"Content-Type": content_type} if content_type else {}
        path = urllib.parse.urlsplit(url)
        target = path.path + (f"?{path.query}" if path.query else "")
        return await self._connection.request(method, target, body, headers)

    async def _fresh_nonce(self) -> str:
        reply = await self._request("HEAD", self.directory["newNonce"])
        return reply.headers["replay-nonce"]

    async def _sign(self, url: str, payload: dict[str, Any] | None) -> bytes:
        """A flattened JWS (§6.2): ES256 over the protected header and payload; jwk only for
        newAccount, kid afterwards (§6.2); the empty payload is POST-as-GET (§6.3)."""
        protected: dict[str, Any] = {
            "alg": "ES256",
            "nonce": self._nonce or await self._fresh_nonce(),
            "url": url,
        }
        self._nonce = None
        if self._kid is None:
            protected["jwk"] = self._jwk
        else:
            protected["kid"] = self._kid
        encoded_protected = b64url(json.dumps(protected).encode())
        encoded_payload = "" if payload is None else b64url(json.dumps(payload).encode())
        der = self._key.sign(
            f"{encoded_protected}.{encoded_payload}".encode("ascii"), ec.ECDSA(hashes.SHA256())
        )
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # RFC 7518 §3.4
        return json.dumps(
            {
                "protected": encoded_protected,
                "payload": encoded_payload,
                "signature": b64url(signature),
            }
        ).encode()

    async def post(self, url: str, payload: dict[str, Any] | None) -> Reply:
        for attempt in range(3):
            signed = await self._sign(url, payload)
            reply = await self._request("POST", url, signed, "application/jose+json")
            self._nonce = reply.headers.get("replay-nonce")
            if reply.status < 400:
                return reply
            try:
                problem = reply.json()
            except ValueError:
                problem = {"detail": reply.body[:200].decode(errors="replace")}
            if problem.get("type") == ERROR_PREFIX + "badNonce" and attempt < 2:
                continue  # §6.5: retry with the fresh nonce the error carried
            raise AcmeProblem(reply.status, problem)
        raise AssertionError("unreachable")

    async def _wait(self, reply: Reply) -> None:
        delay = reply.retry_after if reply.retry_after is not None else self._poll
        self.slept += delay
        await asyncio.sleep(delay)

    async def register(self) -> None:
        reply = await self.post(
            self.directory["newAccount"],
            {"termsOfServiceAgreed": True, "contact": ["mailto:bench@certwright.test"]},
        )
        self._kid = reply.headers["location"]

    async def _poll_until(
        self, url: str, first: Reply, done: Callable[[str], bool]
    ) -> dict[str, Any]:
        reply = first
        while True:
            document = reply.json()
            status = str(document.get("status"))
            if done(status):
                return document
            if status == "invalid":
                raise AcmeProblem(reply.status, document.get("error") or {"detail": str(document)})
            await self._wait(reply)
            reply = await self.post(url, None)

    @contextlib.contextmanager
    def _phase(self, phase: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] += time.perf_counter() - began

    async def obtain(self, name: str) -> list[x509.Certificate]:
        """One certificate for `name`, the whole cycle (§7.4), http-01 for every authorization."""
        with self._phase("newOrder"):
            reply = await self.post(
                self.directory["newOrder"], {"identifiers": [{"type": "dns", "value": name}]}
            )
        order_url = reply.headers["location"]
        order = reply.json()
        for authz_url in order["authorizations"]:
            with self._phase("authorization"):
                authz = (await self.post(authz_url, None)).json()
            if authz["status"] == "valid":
                continue
            challenge = next(c for c in authz["challenges"] if c["type"] == "http-01")
            token = challenge["token"]
            self._responder.add(token, f"{token}.{self._thumbprint}")  # §8.1
            try:
                with self._phase("challenge"):
                    answered = await self.post(challenge["url"], {})
                    if answered.json().get("status") != "valid":
                        await self._wait(answered)
                        await self._poll_until(
                            authz_url, await self.post(authz_url, None), lambda s: s == "valid"
                        )
            finally:
                self._responder.remove(token)
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        with self._phase("finalize"):
            finalized = await self.post(
                order["finalize"], {"csr": b64url(csr.public_bytes(serialization.Encoding.DER))}
            )
            order = await self._poll_until(order_url, finalized, lambda s: s == "valid")
        with self._phase("download"):
            chain = await self.post(order["certificate"], None)
        certificates = x509.load_pem_x509_certificates(chain.body)
        check_chain(certificates, name, key.public_key())
        return certificates


class AcmeClient:
    """`AsyncAcmeClient` for callers with threads (the soak test, the tests): each call runs
    to its end on the client's own event loop. One thread at a time. Takes the arguments of
    `AsyncAcmeClient`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = uvloop.new_event_loop()
        self.client = AsyncAcmeClient(*args, **kwargs)
        self._loop.run_until_complete(self.client.open())

    @property
    def directory(self) -> dict[str, Any]:
        return self.client.directory

    def close(self) -> None:
        self._loop.run_until_complete(self.client.close())
        self._loop.close()

    def register(self) -> None:
        self._loop.run_until_complete(self.client.register())

    def post(self, url: str, payload: dict[str, Any] | None) -> Reply:
        return self._loop.run_until_complete(self.client.post(url, payload))

    def obtain(self, name: str) -> list[x509.Certificate]:
        return self._loop.run_until_complete(self.client.obtain(name))


def check_chain(
    certificates: list[x509.Certificate], name: str, public_key: ec.EllipticCurvePublicKey
) -> None:
    if len(certificates) < 2:
        raise ValueError(f"{name}: {len(certificates)} certificate(s), no chain")
    leaf = certificates[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if san.get_values_for_type(x509.DNSName) != [name]:
        raise ValueError(f"{name}: the certificate names {san}")
    if leaf.public_key() != public_key:
        raise ValueError(f"{name}: the certificate carries another key")
    leaf.verify_directly_issued_by(certificates[1])


# -- the load ------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadResult:
    label: str
    certificates: int
    seconds: float
    latencies: list[float]
    failures: list[str]
    slept: float
    phases: dict[str, float]  # seconds per step, summed over every client
    stalled: bool = False  # a request went unanswered for REQUEST_TIMEOUT: the run was cut short
    server_cpu: float = 0.0  # CPU seconds the server's processes used during the run
    client_cpu: float = 0.0  # CPU seconds this load generator used meanwhile (same cores)

    def summary(self) -> str:
        ok = len(self.latencies)
        rate = ok / self.seconds if self.seconds else 0.0
        if ok >= 2:
            cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
            p50, p99 = cuts[49], cuts[98]
        else:
            p50 = p99 = self.latencies[0] if ok else float("nan")
        return (
            f"  {self.label:24} {rate:8.1f} certificates/s  p50 {p50 * 1000:7.0f} ms"
            f"  p99 {p99 * 1000:7.0f} ms  ({ok}/{self.certificates} in {self.seconds:.1f} s,"
            f" {len(self.failures)} failed, {self.slept:.1f} s client-side waits)"
            f"\n    server CPU {self.server_cpu * 1000 / max(1, ok):.1f} ms per certificate"
            f" ({self.server_cpu / self.seconds if self.seconds else 0:.2f} cores);"
            f" load generator CPU {self.client_cpu * 1000 / max(1, ok):.1f} ms"
            f" ({self.client_cpu / self.seconds if self.seconds else 0:.2f} cores)"
            + (
                f"\n    STALLED: a request went unanswered for {REQUEST_TIMEOUT:.0f} s; cut short"
                if self.stalled
                else ""
            )
        )

    def phase_breakdown(self) -> str:
        cycles = max(1, len(self.latencies) + len(self.failures))
        return "    mean per certificate: " + ", ".join(
            f"{phase} {seconds * 1000 / cycles:.0f} ms" for phase, seconds in self.phases.items()
        )

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


def process_group_cpu(group: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of each live process in a process group."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == group:  # pgrp; fields[11:13] are utime and stime in ticks
            found[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    return found


def run_load(
    server: AcmeServer,
    label: str,
    clients: int,
    certificates: int,
    poll: float,
    warmup: int = 0,
) -> LoadResult:
    """Accounts, then `warmup` certificates off the clock (workers' first requests, the jobs'
    first round), then the measured run. Every client runs on one event loop in this thread:
    the load generator shares the machine with the server under test, and one thread
    multiplexing every connection took about a fifth less CPU per certificate than a thread
    per client."""
    with ChallengeResponder(server.http01_port) as responder:
        return uvloop.run(_load(server, label, clients, certificates, poll, warmup, responder))


async def _load(
    server: AcmeServer,
    label: str,
    clients: int,
    certificates: int,
    poll: float,
    warmup: int,
    responder: ChallengeResponder,
) -> LoadResult:
    context = ssl.create_default_context(cafile=str(server.tls_trust))
    pool = [AsyncAcmeClient(server.directory_url, context, responder, poll) for _ in range(clients)]
    try:
        for client in pool:
            await client.open()
            await client.register()
        if warmup:
            await _drive(pool, label, warmup)
            for client in pool:
                client.phases = dict.fromkeys(PHASES, 0.0)
                client.slept = 0.0
        group = server.process_group
        before = process_group_cpu(group) if group else {}
        generator = time.process_time()  # every thread: the clients' loop and the responder
        result = await _drive(pool, label, certificates)
        result.client_cpu = time.process_time() - generator
        after = process_group_cpu(group) if group else {}
        result.server_cpu = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
        return result
    finally:
        await asyncio.gather(*(client.close() for client in pool))


async def _drive(pool: list[AsyncAcmeClient], label: str, certificates: int) -> LoadResult:
    next_index = iter(range(certificates))
    latencies: list[float] = []
    failures: list[str] = []
    run_id = uuid.uuid4().hex[:8]
    stalled = False

    async def work(client: AsyncAcmeClient) -> None:
        nonlocal stalled
        while not stalled and (index := next(next_index, None)) is not None:
            # A registered domain per certificate: no shared authorization, no per-domain limit.
            name = f"www.b{run_id}-{index}.test"
            began = time.perf_counter()
            try:
                await client.obtain(name)
            except Exception as error:  # counted and shown, never hidden
                if isinstance(error, TimeoutError):
                    stalled = True
                failures.append(f"{name}: {type(error).__name__}: {error}")
                continue
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(work(client) for client in pool))
    seconds = time.perf_counter() - began
    phases = {phase: sum(c.phases[phase] for c in pool) for phase in PHASES}
    slept = sum(c.slept for c in pool)
    return LoadResult(label, certificates, seconds, latencies, failures, slept, phases, stalled)


Rig = contextlib.AbstractContextManager[AcmeServer]


def bench_acme(
    clients: int, certificates: int, workers: int, poll: float, warmup: int, rounds: int = 1
) -> None:
    """certwright, then Pebble, `rounds` times over, each on fresh servers. This VM's speed
    drifts by a third within minutes; runs that alternate meet the same drift, and the
    ratio is taken pairwise, each certwright run against the Pebble run right after it."""
    print(
        f"acme benchmark: {clients} concurrent clients, {certificates} certificates per server"
        f" after {warmup} off the clock, one name each, http-01 validated for real, chains checked"
        + (f"; {rounds} alternating rounds" if rounds > 1 else "")
    )
    # certwright's figures depend on the interpreter's build (docs/operations.md §1).
    print(
        f"  certwright and the load generator on Python {platform.python_version()}"
        f" from {sys.base_prefix}"
    )
    pairs: list[tuple[LoadResult, LoadResult]] = []
    with (
        tempfile.TemporaryDirectory(prefix="certwright-bench-acme-") as tmp,
        challtestsrv(Path(tmp) / "dns") as dns,
    ):
        rigs: tuple[tuple[str, Callable[[Path], Rig]], ...]
        rigs = (
            (
                f"certwright ({workers} workers)",
                lambda workdir: certwright_server(
                    workdir, dns, workers=workers, extra_env=NO_RATE_LIMITS
                ),
            ),
            ("pebble", lambda workdir: pebble_server(workdir, dns)),
        )
        for round_ in range(1, rounds + 1):
            if rounds > 1:
                print(f" round {round_}/{rounds}")
            results: list[LoadResult] = []
            for label, rig in rigs:
                kind = label.split()[0]
                with rig(Path(tmp) / f"{kind}-{round_}") as server:
                    result = run_load(server, label, clients, certificates, poll, warmup)
                results.append(result)
                print(result.summary())
                print(result.phase_breakdown(), flush=True)
                for failure in result.failures[:5]:
                    print(f"    failed: {failure}")
            ours, theirs = results
            pairs.append((ours, theirs))
            if theirs.rate:
                ratio = ours.rate / theirs.rate
                print(f"  certwright / pebble: {ratio:.2f}x{_caveat(ours, theirs)}")
    if rounds > 1:
        # A round where either server failed requests (Pebble stalling, say) measured no rate
        # of its: the medians leave it out, and say so.
        kept = [(o, t) for o, t in pairs if t.rate and not (o.failures or t.failures)]
        ratios = [ours.rate / theirs.rate for ours, theirs in kept]
        left_out = len(pairs) - len(kept)
        print(
            f" over {len(kept)} of {rounds} rounds: certwright median"
            f" {statistics.median(o.rate for o, _ in kept) if kept else 0:.1f}/s, pebble median"
            f" {statistics.median(t.rate for _, t in kept) if kept else 0:.1f}/s; ratio median"
            f" {statistics.median(ratios) if ratios else 0:.2f}x"
            f" (lowest {min(ratios, default=0):.2f}x, highest {max(ratios, default=0):.2f}x)"
            + (f"; {left_out} round(s) with failures left out" if left_out else "")
        )


def stack_floor(workers: int, seconds: int, connections: int = 32) -> None:
    """Each server's HTTPS stack alone: its CPU per request on its directory, a route that does
    next to no work (a small JSON document; no JWS, storage or signing), under wrk with
    keep-alive. One certificate's cycle takes five requests, so five of these are about what a
    certificate costs a server before any of its own work: for certwright, gunicorn, TLS and
    Flask (py-spy on a worker: building the directory itself is a fifth of it)."""
    if shutil.which("wrk") is None:
        print("  stack floor skipped: wrk missing (apt-get install wrk)")
        return
    with (
        tempfile.TemporaryDirectory(prefix="certwright-bench-floor-") as tmp,
        challtestsrv(Path(tmp) / "dns") as dns,
    ):
        rigs: tuple[tuple[str, Rig], ...] = (
            (
                f"certwright ({workers} workers)",
                certwright_server(Path(tmp) / "certwright", dns, workers=workers),
            ),
            ("pebble", pebble_server(Path(tmp) / "pebble", dns)),
        )
        for label, rig in rigs:
            with rig as server:
                url, group = server.directory_url, server.process_group
                assert group is not None  # both run as the leader of their process group
                wrk_rate(url, None, min(2, seconds), connections)  # warm-up, off the clock
                before = sum(process_group_cpu(group).values())
                rate = wrk_rate(url, None, seconds, connections)
                used = sum(process_group_cpu(group).values()) - before
            per_request = used * 1000 / max(1.0, rate * seconds)
            print(
                f"  stack floor, {label}: GET directory under wrk -c{connections}: {rate:.0f}"
                f" requests/s, {per_request:.3f} ms CPU per request; x{len(PHASES)} requests per"
                f" certificate = {per_request * len(PHASES):.2f} ms before any ACME work"
            )


def _caveat(ours: LoadResult, theirs: LoadResult) -> str:
    return "  (not comparable: a run had failures)" if ours.failures or theirs.failures else ""


def add_parser(sub: Any) -> None:
    """The `acme` subcommand of scripts/bench."""
    parser = sub.add_parser("acme", help="N concurrent ACME clients: certwright vs Pebble")
    parser.add_argument(
        "--clients",
        type=_client_counts,
        default=[16],
        help="concurrent clients; several, comma-separated (16,32,64), run one after another",
    )
    parser.add_argument("--certs", type=int, default=400, help="certificates per server")
    parser.add_argument("--workers", type=int, default=2, help="certwright serve workers")
    parser.add_argument(
        "--warmup", type=int, default=64, help="certificates per server before the clock starts"
    )
    parser.add_argument(
        "--poll", type=float, default=0.1, help="seconds between polls without Retry-After"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternate certwright and Pebble this many times"
    )
    # Also accepted after the subcommand; `scripts/bench --smoke acme` works as for the others.
    parser.add_argument(
        "--smoke", dest="acme_smoke", action="store_true", help="2 clients, 6 certs"
    )


def dispatch(args: argparse.Namespace) -> None:
    if args.bench == "acme":
        if args.smoke or args.acme_smoke:
            bench_acme(2, 6, args.workers, args.poll, 2)
            stack_floor(args.workers, 1)
        else:
            # Pebble's rate grows with the clients until its CPU is spent; certwright's stops
            # growing sooner: the ratio depends on the client count, so it can be swept.
            for clients in args.clients:
                bench_acme(clients, args.certs, args.workers, args.poll, args.warmup, args.rounds)
            stack_floor(args.workers, 10)


def _client_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of client counts: {text!r}") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be 1 or more: {text!r}")
    return counts
