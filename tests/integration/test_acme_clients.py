"""Unmodified ACME clients against a real server: certbot and lego from Debian, run as programs.

Every scenario runs against certwright and, as a control that proves the harness and the
clients, against Pebble on the same rig: the test DNS server (pebble-challtestsrv) resolves
every name to 127.0.0.1, the clients answer challenges on the ports the server validates on, and
they trust the server through their own trust variables, never an insecure flag. Each
certificate a client obtains is checked three ways: its names, `openssl verify` of the served
chain up to the server's root, and pkilint.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import pytest

from scripts.benchmarks_acme import AcmeClient, ChallengeResponder, run_load
from tests.integration.acme_harness import (
    AcmeServer,
    Certbot,
    ChallTestSrv,
    IssuedCertificate,
    Lego,
    LintFinding,
    certwright_server,
    challtestsrv,
    free_port,
    openssl_verify,
    pebble_server,
    pkilint_findings,
    write_listener_certificate,
)

pytestmark = pytest.mark.integration

ClientKind = Literal["certbot", "lego"]
Client = Certbot | Lego

# The linter is pkilint's RFC 5280 one (lint_pkix_cert), which certwright's issuance runs
# too; what it reports beyond this is a failure.
WILDCARD_SYNTAX = re.compile(r'^Invalid domain name syntax: "\*\.[^"*]+"$')


def tolerated(server: AcmeServer, finding: LintFinding) -> bool:
    # Pebble 2.4 asserts keyEncipherment in every leaf, EC keys included (RFC 8813 §3 forbids
    # it): a finding about the control server, kept visible rather than silenced.
    if server.kind == "pebble" and finding.code == "pkix.key_usage_value_prohibited_for_ec":
        return True
    # RFC 5280 §4.2.1.6 leaves wildcards undefined and pkilint's PKIX linter calls every
    # "*.name" dNSName invalid syntax; a wildcard in the leftmost label is what dns-01 orders
    # ask for (RFC 8555 §7.1.3), so exactly that finding is expected, nothing else.
    return finding.code == "pkix.invalid_domain_name_syntax" and bool(
        WILDCARD_SYNTAX.match(finding.message)
    )


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChallTestSrv]:
    with challtestsrv(tmp_path_factory.mktemp("challtestsrv")) as server:
        yield server


@pytest.fixture(scope="module", params=["pebble", "certwright"])
def server(
    request: pytest.FixtureRequest, dns: ChallTestSrv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AcmeServer]:
    workdir = tmp_path_factory.mktemp(request.param)
    rig = pebble_server if request.param == "pebble" else certwright_server
    with rig(workdir, dns) as running_server:
        yield running_server


def make_client(kind: ClientKind, server: AcmeServer, workdir: Path) -> Client:
    return Certbot(server, workdir / kind) if kind == "certbot" else Lego(server, workdir / kind)


def fresh_names(*labels: str) -> list[str]:
    """Names under a registered domain of their own (`<random>.test`), so that no test shares
    an authorization, an order or a per-domain rate limit with another."""
    domain = f"{uuid.uuid4().hex[:12]}.test"
    return [domain if label == "@" else f"{label}.{domain}" for label in labels]


def assert_good_certificate(
    server: AcmeServer, issued: IssuedCertificate, names: Sequence[str]
) -> None:
    assert issued.names == set(names)
    verified = openssl_verify(server.issuing_root, issued)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    findings = [f for f in pkilint_findings(issued.leaf) if not tolerated(server, f)]
    assert not findings, "pkilint: " + "; ".join(map(str, findings))


@pytest.mark.parametrize("client_kind", ["certbot", "lego"])
def test_http01_single_name(server: AcmeServer, client_kind: ClientKind, tmp_path: Path) -> None:
    names = fresh_names("www")
    issued = make_client(client_kind, server, tmp_path).obtain(names, "http-01")
    assert_good_certificate(server, issued, names)
    # The chain check bites: the same chain does not verify up to an unrelated root.
    unrelated_root, _, _ = write_listener_certificate(tmp_path / "unrelated")
    assert openssl_verify(unrelated_root, issued).returncode != 0


@pytest.mark.parametrize("client_kind", ["certbot", "lego"])
def test_http01_three_names(server: AcmeServer, client_kind: ClientKind, tmp_path: Path) -> None:
    names = fresh_names("www", "api", "@")
    issued = make_client(client_kind, server, tmp_path).obtain(names, "http-01")
    assert_good_certificate(server, issued, names)


@pytest.mark.parametrize("client_kind", ["certbot", "lego"])
def test_dns01_wildcard(server: AcmeServer, client_kind: ClientKind, tmp_path: Path) -> None:
    names = fresh_names("*", "@")  # a wildcard and its base name: two TXT values, one name
    issued = make_client(client_kind, server, tmp_path).obtain(names, "dns-01")
    assert_good_certificate(server, issued, names)


def test_tlsalpn01_single_name_with_lego(server: AcmeServer, tmp_path: Path) -> None:
    names = fresh_names("tls")
    issued = Lego(server, tmp_path / "lego").obtain(names, "tls-alpn-01")
    assert_good_certificate(server, issued, names)


@pytest.mark.parametrize("client_kind", ["certbot", "lego"])
def test_forced_renewal(server: AcmeServer, client_kind: ClientKind, tmp_path: Path) -> None:
    names = fresh_names("renew")
    client = make_client(client_kind, server, tmp_path)
    first = client.obtain(names, "http-01")
    first_serial = first.serial
    renewed = client.renew(names, "http-01")
    assert renewed.serial != first_serial
    assert_good_certificate(server, renewed, names)


@pytest.mark.parametrize("client_kind", ["certbot", "lego"])
def test_revocation(server: AcmeServer, client_kind: ClientKind, tmp_path: Path) -> None:
    """certbot signs revokeCert with the certificate's own key, lego with the account's key
    (RFC 8555 §7.6 allows both); either way the server's own records say "revoked"."""
    names = fresh_names("revoke")
    client = make_client(client_kind, server, tmp_path)
    issued = client.obtain(names, "http-01")
    assert_good_certificate(server, issued, names)
    assert server.certificate_status(issued.serial) in {"valid", "issued"}
    if isinstance(client, Certbot):
        client.revoke(issued, reason="keycompromise", with_certificate_key=True)
    else:
        client.revoke(names, reason=4)  # superseded
    assert server.certificate_status(issued.serial) == "revoked"


def test_benchmark_client_completes_concurrent_cycles(server: AcmeServer) -> None:
    """`scripts/bench acme`'s own RFC 8555 client, as CI's smoke check of the benchmark: three
    clients, two certificates off the clock, six on it, every chain checked, no failure, and
    the server's CPU counted."""
    result = run_load(server, server.kind, clients=3, certificates=6, poll=0.1, warmup=2)
    assert result.failures == []
    assert len(result.latencies) == 6
    assert result.server_cpu > 0


class HeldGate:
    """A TCP relay that takes connections on `port` and holds each one, unanswered, until
    released; then it relays it to `backend`. In front of an http-01 responder it keeps a
    validation waiting for as long as a test needs."""

    def __init__(self, port: int, backend: int) -> None:
        self.backend = backend
        self.released = threading.Event()
        self.arrived = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        self.arrived.set()
        self.released.wait()
        with client, socket.create_connection(("127.0.0.1", self.backend)) as upstream:
            request = client.recv(65536)
            upstream.sendall(request)
            while chunk := upstream.recv(65536):
                client.sendall(chunk)

    def close(self) -> None:
        self.released.set()
        self._listener.close()


def test_a_worker_serves_other_clients_while_a_validation_waits(
    dns: ChallTestSrv, tmp_path: Path
) -> None:
    """One worker, and a validation whose http-01 answer is held back: the worker still
    answers another client meanwhile, instead of sitting on the validation (ca.web.defer). The
    challenge POST waits up to 30 s for its outcome, so before deferral the other client could
    not get in until the hold ended."""
    with certwright_server(
        tmp_path / "certwright",
        dns,
        workers=1,
        extra_env={"CERTWRIGHT_ACME__CHALLENGE_WAIT_SECONDS": "30"},
    ) as server:
        context = ssl.create_default_context(cafile=str(server.tls_trust))
        backend = free_port()
        gate = HeldGate(server.http01_port, backend)
        with ChallengeResponder(backend) as responder:
            try:
                waiting = AcmeClient(server.directory_url, context, responder, poll=0.1)
                waiting.register()
                outcome: list[object] = []

                def obtain() -> None:
                    try:
                        outcome.append(waiting.obtain(f"held-{uuid.uuid4().hex[:8]}.test"))
                    except Exception as exc:  # shown by the assertion below
                        outcome.append(exc)

                thread = threading.Thread(target=obtain, daemon=True)
                thread.start()
                assert gate.arrived.wait(30), "the validation never reached the responder"
                other_done = threading.Event()

                def other() -> None:
                    other_client = AcmeClient(server.directory_url, context, responder, 0.1)
                    other_client.register()
                    other_client.close()
                    other_done.set()

                threading.Thread(target=other, daemon=True).start()
                answered = other_done.wait(15)
                assert not gate.released.is_set()
                gate.released.set()
                thread.join(60)
                assert answered, "the worker answered nobody while the validation waited"
                assert outcome and isinstance(outcome[0], list), outcome
                waiting.close()
            finally:
                gate.close()
