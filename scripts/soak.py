"""Soak: mixed ACME issuance, revocation and OCSP traffic against two `certwright serve`
processes on one PostgreSQL database, for a chosen time; then errors, latency per operation,
and a consistency check of every certificate's OCSP and CRL status against the database.

Run through `scripts/soak` (which starts a throw-away PostgreSQL server, as scripts/test does):

    scripts/soak --minutes 10

The pieces are the ACME benchmark's (scripts/benchmarks_acme.py: the raw ACME client, the
http-01 responder, the rate-limit overrides) and the test harness's (pebble-challtestsrv for
DNS, process start/stop). Each client thread holds one account on one of the two servers
(alternating), and loops until the time is up over: obtain a certificate (the whole RFC 8555
§7.4 cycle, http-01 validated for real), revoke one of its certificates (§7.6), and ask the
OCSP responder of either server about one of them by GET and by POST (RFC 6960 §A.1).
Every answer is checked: a chain that does not verify, a problem document, or an OCSP status
other than the one the client expects (it knows what it revoked) is an error.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import functools
import http.client
import os
import random
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from sqlalchemy import create_engine, select

from ca.storage.models import Certificate
from scripts.benchmarks_acme import NO_RATE_LIMITS, AcmeClient, ChallengeResponder, b64url
from scripts.pgdb import fresh_database
from tests.integration.acme_harness import (
    CERTWRIGHT,
    LOOPBACK,
    ChallTestSrv,
    ProcessFailed,
    answers,
    challtestsrv,
    clean_env,
    free_port,
    running,
    wait_until,
)

OPERATIONS = ("issue", "revoke", "ocsp-get", "ocsp-post")
# How a client picks its next operation: mostly OCSP (what a CA answers most), then issuance.
WEIGHTS = {"issue": 4, "revoke": 1, "ocsp-get": 3, "ocsp-post": 3}
POSTGRES_ENV = "CERTWRIGHT_TEST_POSTGRES_URL"
# The final check waits at most this long for CRLs to list the last revocations (each
# revocation re-signs its shard at once; the jobs loop is the fallback every 30 s).
CRL_CONVERGENCE_SECONDS = 90.0


# -- the servers ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Server:
    directory_url: str
    http_base: str
    log: Path


@contextlib.contextmanager
def soak_database() -> Iterator[str]:
    """A new database on the PostgreSQL server named by $CERTWRIGHT_TEST_POSTGRES_URL."""
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        raise SystemExit(f"soak: {POSTGRES_ENV} is not set (run scripts/soak, which starts one)")
    with fresh_database(admin_url, "soak") as url:
        yield url


@contextlib.contextmanager
def two_servers(
    workdir: Path, database_url: str, dns: ChallTestSrv, http01_port: int, workers: int
) -> Iterator[tuple[Server, Server]]:
    """`certwright init` once, then two `certwright serve` on their own ports, one database."""
    http_ports = [free_port(), free_port()]
    data = workdir / "data"
    env = clean_env(CERTWRIGHT_DATABASE__URL=database_url)
    init = [str(CERTWRIGHT), "init", "--data-dir", str(data)]
    init += ["--base-url", f"http://{LOOPBACK}:{http_ports[0]}"]
    with running(init, env=env, log=workdir / "init.log") as process:
        if process.wait(timeout=300) != 0:
            raise ProcessFailed((workdir / "init.log").read_text())
    env.update(
        CERTWRIGHT_CONFIG=str(data / "certwright.toml"),
        CERTWRIGHT_SERVER__WORKERS=str(workers),
        CERTWRIGHT_ACME__HTTP01_PORT=str(http01_port),
        CERTWRIGHT_ACME__DNS_RESOLVER=dns.dns_address,
        **NO_RATE_LIMITS,
    )
    root = data / "root.pem"
    with contextlib.ExitStack() as stack:
        servers = []
        for index, http_port in enumerate(http_ports):
            https_port = free_port()
            log = workdir / f"serve{index}.log"
            argv = [str(CERTWRIGHT), "serve", "--listen", f"{LOOPBACK}:{http_port}"]
            argv += ["--https-listen", f"{LOOPBACK}:{https_port}"]
            process = stack.enter_context(running(argv, env=env, log=log, cwd=workdir))
            server = Server(
                f"https://{LOOPBACK}:{https_port}/acme/directory",
                f"http://{LOOPBACK}:{http_port}",
                log,
            )
            # One at a time: each writes the shared HTTPS certificate file as it starts.
            healthz, directory = server.http_base + "/healthz", server.directory_url
            wait_until(functools.partial(answers, healthz), "healthz", process, log)
            wait_until(functools.partial(answers, directory, cafile=root), "ACME", process, log)
            servers.append(server)
        yield servers[0], servers[1]


# -- the load ------------------------------------------------------------------------------


@dataclasses.dataclass
class Held:
    """A certificate a client obtained, and what it expects the CA to say about it."""

    leaf: x509.Certificate
    issuer: x509.Certificate
    revoked: bool = False


@dataclasses.dataclass
class Tally:
    latencies: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {op: [] for op in OPERATIONS}
    )
    errors: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: {op: [] for op in OPERATIONS}
    )
    held: list[Held] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def ok(self, op: str, seconds: float) -> None:
        with self.lock:
            self.latencies[op].append(seconds)

    def error(self, op: str, detail: str) -> None:
        with self.lock:
            self.errors[op].append(detail[:300])


def _http(base: str) -> http.client.HTTPConnection:
    parsed = urllib.parse.urlsplit(base)
    return http.client.HTTPConnection(parsed.hostname or LOOPBACK, parsed.port, timeout=30)


def ocsp_status(
    connection: http.client.HTTPConnection, held: Held, method: str
) -> ocsp.OCSPCertStatus:
    """Ask the responder about one certificate (RFC 6960 §A.1: GET base64 path or POST DER)
    and check the answer is signed for that certificate; its status is returned."""
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(held.leaf, held.issuer, hashes.SHA1())  # noqa: S303  # CertID hash, RFC 5019
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    for attempt in (1, 2):
        try:
            if method == "GET":
                encoded = urllib.parse.quote(base64.b64encode(request).decode(), safe="")
                connection.request("GET", f"/ocsp/{encoded}")
            else:
                headers = {"Content-Type": "application/ocsp-request"}
                connection.request("POST", "/ocsp", body=request, headers=headers)
            reply = connection.getresponse()
            body = reply.read()
            break
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # A keep-alive connection the server closed while idle (gunicorn's keepalive):
            # reconnect once, as any HTTP client does; an OCSP request is safe to repeat.
            connection.close()
            if attempt == 2:
                raise
    if reply.status != 200:
        raise ValueError(f"OCSP {method} answered HTTP {reply.status}")
    answer = ocsp.load_der_ocsp_response(body)
    if answer.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise ValueError(f"OCSP {method}: {answer.response_status.name}")
    if answer.serial_number != held.leaf.serial_number:
        raise ValueError(f"OCSP {method}: answer for serial {answer.serial_number:x}")
    return answer.certificate_status


def _expected(held: Held) -> ocsp.OCSPCertStatus:
    return ocsp.OCSPCertStatus.REVOKED if held.revoked else ocsp.OCSPCertStatus.GOOD


def client_loop(
    client: AcmeClient,
    servers: tuple[Server, Server],
    tally: Tally,
    deadline: float,
    seed: int,
    run_id: str,
) -> None:
    rng = random.Random(seed)  # noqa: S311  # traffic mix, not cryptography
    mine: list[Held] = []
    http_connections = [_http(s.http_base) for s in servers]
    ops, weights = list(WEIGHTS), list(WEIGHTS.values())
    count = 0
    try:
        while time.monotonic() < deadline:
            op = rng.choices(ops, weights)[0] if mine else "issue"
            began = time.perf_counter()
            try:
                if op == "issue":
                    count += 1
                    chain = client.obtain(f"s{count}.c{seed}.{run_id}.soak.test")
                    held = Held(chain[0], chain[1])
                    mine.append(held)
                    with tally.lock:
                        tally.held.append(held)
                elif op == "revoke":
                    candidates = [h for h in mine if not h.revoked]
                    if not candidates:
                        continue
                    held = rng.choice(candidates)
                    der = held.leaf.public_bytes(serialization.Encoding.DER)
                    client.post(
                        client.directory["revokeCert"], {"certificate": b64url(der), "reason": 4}
                    )
                    held.revoked = True
                else:
                    held = rng.choice(mine)
                    connection = rng.choice(http_connections)
                    try:
                        status = ocsp_status(
                            connection, held, "GET" if op == "ocsp-get" else "POST"
                        )
                    except (OSError, http.client.HTTPException):
                        connection.close()  # reconnects on the next request
                        raise
                    if status is not _expected(held):
                        raise ValueError(
                            f"OCSP says {status.name}, expected {_expected(held).name}"
                        )
            except Exception as error:  # counted and shown, never hidden
                tally.error(op, f"{type(error).__name__}: {error}")
                continue
            tally.ok(op, time.perf_counter() - began)
    finally:
        for connection in http_connections:
            connection.close()


# -- the final consistency check -----------------------------------------------------------


def _crl_serials(http_base: str, url: str, issuer: x509.Certificate) -> set[int]:
    path = urllib.parse.urlsplit(url).path
    connection = _http(http_base)
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        body = reply.read()
    finally:
        connection.close()
    if reply.status != 200:
        raise ValueError(f"GET {path}: HTTP {reply.status}")
    crl = x509.load_der_x509_crl(body)
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise ValueError(f"{path}: bad signature")
    return {entry.serial_number for entry in crl}


def _crl_url(leaf: x509.Certificate) -> str:
    points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    name = points[0].full_name
    assert name is not None
    return str(name[0].value)


def consistency_check(database_url: str, servers: tuple[Server, Server], tally: Tally) -> list[str]:
    """Every certificate a client received: in the database, with the status the client
    expects; the OCSP responder of each server and the shard CRL agree with the database."""
    problems: list[str] = []
    engine = create_engine(database_url)
    with engine.connect() as database:
        rows = {
            int(serial, 16): (status, issuer)
            for serial, status, issuer in database.execute(
                select(Certificate.serial, Certificate.status, Certificate.issuer_id).where(
                    Certificate.source.like("acme%")
                )
            )
        }
    engine.dispose()
    received = {h.leaf.serial_number: h for h in tally.held}
    if len(received) != len(tally.held):
        problems.append("a serial was handed out twice")
    for serial, held in received.items():
        row = rows.get(serial)
        expected = "revoked" if held.revoked else "issued"
        if row is None:
            problems.append(f"{serial:x}: received but not in the database")
        elif row[0] != expected:
            problems.append(f"{serial:x}: database says {row[0]}, the client expects {expected}")
    missing = set(rows) - set(received)
    if missing:
        # An order the client gave up on (an error above) may still have been issued.
        print(f"  note: {len(missing)} certificate(s) in the database no client received")
    for server in servers:
        connection = _http(server.http_base)
        try:
            for serial, held in received.items():
                database_status = rows.get(serial, ("absent", ""))[0]
                want = (
                    ocsp.OCSPCertStatus.REVOKED
                    if database_status == "revoked"
                    else ocsp.OCSPCertStatus.GOOD
                )
                try:
                    got = ocsp_status(connection, held, "POST")
                except (OSError, http.client.HTTPException, ValueError) as error:
                    connection.close()
                    problems.append(f"{serial:x}: OCSP at {server.http_base}: {error}")
                    continue
                if got is not want:
                    problems.append(
                        f"{serial:x}: OCSP at {server.http_base} says {got.name},"
                        f" the database {database_status}"
                    )
        finally:
            connection.close()
    crl_problems = _crl_check(servers, received, rows)
    return problems + crl_problems


def _crl_check(
    servers: tuple[Server, Server],
    received: dict[int, Held],
    rows: dict[int, tuple[str, str]],
) -> list[str]:
    """Each shard's CRL lists exactly the database's revoked certificates of that shard (of
    those the clients hold). Waits, bounded, for a shard whose newest revocation has not been
    signed yet; how long it took is printed."""
    began = time.monotonic()
    while True:
        problems: list[str] = []
        cache: dict[tuple[str, str], set[int]] = {}
        for serial, held in received.items():
            url = _crl_url(held.leaf)
            for server in servers:
                key = (server.http_base, url)
                try:
                    if key not in cache:
                        cache[key] = _crl_serials(server.http_base, url, held.issuer)
                except (OSError, http.client.HTTPException, ValueError) as error:
                    problems.append(f"{url} at {server.http_base}: {error}")
                    cache[key] = set()
                listed = serial in cache[key]
                revoked = rows.get(serial, ("absent", ""))[0] == "revoked"
                if listed != revoked:
                    problems.append(
                        f"{serial:x}: CRL {urllib.parse.urlsplit(url).path} at"
                        f" {server.http_base} {'lists' if listed else 'omits'} it, the database"
                        f" says {'revoked' if revoked else 'not revoked'}"
                    )
        waited = time.monotonic() - began
        if not problems or waited > CRL_CONVERGENCE_SECONDS:
            print(f"  CRLs checked after {waited:.1f} s ({len(cache)} shard fetches)")
            return problems
        time.sleep(2.0)


# -- the run -------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[98]


def report(tally: Tally, seconds: float) -> int:
    errors = sum(len(e) for e in tally.errors.values())
    print(f"soak: {seconds:.0f} s of traffic, {errors} error(s)")
    print(f"  {'operation':10} {'ok':>7} {'errors':>7} {'per s':>7} {'p50 ms':>9} {'p99 ms':>9}")
    for op in OPERATIONS:
        values = tally.latencies[op]
        p50, p99 = _percentiles(values)
        print(
            f"  {op:10} {len(values):7d} {len(tally.errors[op]):7d}"
            f" {len(values) / seconds if seconds else 0:7.1f}"
            f" {p50 * 1000:9.1f} {p99 * 1000:9.1f}"
        )
    for op in OPERATIONS:
        for detail in tally.errors[op][:5]:
            print(f"  error ({op}): {detail}")
    return errors


def soak(minutes: float, clients: int, workers: int, poll: float) -> int:
    run_id = uuid.uuid4().hex[:8]
    print(
        f"soak: {minutes:g} min, {clients} ACME clients, 2 `certwright serve` processes"
        f" ({workers} worker(s) per listener) on one PostgreSQL database",
        flush=True,
    )
    http01_port = free_port()  # one http-01 responder; both servers' validators use it
    with (
        tempfile.TemporaryDirectory(prefix="certwright-soak-") as tmp,
        soak_database() as database_url,
        challtestsrv(Path(tmp) / "dns") as dns,
        ChallengeResponder(http01_port) as responder,
        two_servers(Path(tmp), database_url, dns, http01_port, workers) as servers,
    ):
        root = Path(tmp) / "data" / "root.pem"
        context = ssl.create_default_context(cafile=str(root))
        pool = [
            AcmeClient(servers[i % 2].directory_url, context, responder, poll)
            for i in range(clients)
        ]
        tally = Tally()
        try:
            for client in pool:
                client.register()
            deadline = time.monotonic() + minutes * 60
            began = time.monotonic()
            threads = [
                threading.Thread(
                    target=client_loop,
                    args=(client, servers, tally, deadline, seed, run_id),
                    daemon=True,
                )
                for seed, client in enumerate(pool)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.monotonic() - began
        finally:
            for client in pool:
                client.close()
        errors = report(tally, seconds)
        revoked = sum(1 for h in tally.held if h.revoked)
        print(
            f"consistency: {len(tally.held)} certificates received ({revoked} revoked),"
            " checking OCSP at both servers and every shard CRL against the database",
            flush=True,
        )
        problems = consistency_check(database_url, servers, tally)
        for problem in problems[:20]:
            print(f"  MISMATCH {problem}")
        print(f"consistency: {len(problems)} mismatch(es)")
        for server in servers:
            tracebacks = server.log.read_text(errors="replace").count("Traceback")
            if tracebacks:
                print(f"  {server.log.name}: {tracebacks} traceback(s) in the server log")
                errors += tracebacks
    return 1 if errors or problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic time (default 10)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent ACME clients")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers per listener")
    parser.add_argument(
        "--poll", type=float, default=0.1, help="seconds between polls without Retry-After"
    )
    args = parser.parse_args(argv)
    return soak(args.minutes, args.clients, args.workers, args.poll)


if __name__ == "__main__":
    sys.exit(main())
