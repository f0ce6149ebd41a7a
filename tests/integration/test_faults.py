"""Faults that lose nothing (issue #6, point 3), each made for real.

- The database stops between the serial's reservation and the certificate's recording: the
  caller gets CAError(STORAGE) / ACME `serverInternal`, the serial stays on record as pending,
  nothing was released; once the database is back the order is finalized again, with a new
  serial. The database is a PostgreSQL server of this test's own, stopped with
  `pg_ctl -m immediate` from inside the real HSM key's sign call.
- SIGKILL of a `certwright serve` process group during a burst of ACME issuances: after a
  restart, every certificate a client received is in the inventory, issued, with the same DER,
  and no serial appears twice.
- The HSM token becomes unavailable (wrong module path, PIN changed, token removed): issuance
  answers 503 `serverInternal`, /healthz says not ready, OCSP keeps answering from pre-signed
  responses, and issuance comes back without a restart once the token does.
- Two finalize requests for one order at the same moment, over real HTTPS to a two-worker
  server: exactly one certificate.
- 1,000 issuances from 2 processes x 8 threads through the real CertificateAuthority on one
  PostgreSQL database: 1,000 rows, 1,000 distinct serials.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import acme.jobs
import acme.service
from ca import certs
from ca.config import load_config
from ca.errors import CAError, Kind
from ca.hsm import HsmEcPrivateKey
from ca.issuance import CertificateAuthority, IssuanceRequest
from ca.policy import Identifier
from ca.profiles import load_profiles
from ca.runtime import Runtime
from ca.storage import Storage
from ca.web import create_app
from tests.conftest import BASE_URL, ONLINE_PIN, ONLINE_TOKEN, SessionPKI
from tests.integration import fault_harness as fh
from tests.integration.acme_client import (
    ERROR,
    PROBLEM,
    AccountKey,
    AcmeClient,
    b64url,
    csr_der,
    ip_ids,
)
from tests.integration.test_acme_scaleout import ChallengeResponder

pytestmark = [pytest.mark.integration]
postgres = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def issuers_on_postgres(postgres_url: str, pki: SessionPKI) -> Iterator[str]:
    """A fresh PostgreSQL database that knows the session's root and intermediates."""
    store = Storage(postgres_url)
    store.migrate()
    for record in pki.issuers:
        store.add_issuer(record)
    store.dispose()
    yield postgres_url


@pytest.fixture
def own_postgres() -> Iterator[fh.DedicatedPostgres]:
    """A PostgreSQL server of this test's own, which it may stop and start."""
    bin_dir = fh.postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries are missing in CI (.ci/run installs them)")
        pytest.skip("needs PostgreSQL server binaries (apt-get install postgresql)")
    server = fh.DedicatedPostgres(bin_dir)
    try:
        server.start()
        store = Storage(server.url)
        store.migrate()
        store.dispose()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def responder() -> Iterator[ChallengeResponder]:
    server = ChallengeResponder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class StopsTheDatabaseFirst(HsmEcPrivateKey):
    """The real issuer key on the token; its first signature stops the database just before
    signing, i.e. after the serial was reserved and before the certificate is recorded."""

    def __init__(self, key: HsmEcPrivateKey, stop: Callable[[], None]) -> None:
        super().__init__(key.token, key.label, key._handle, key.public_key())
        self._stop: Callable[[], None] | None = stop

    def sign(self, data: Any, signature_algorithm: Any) -> bytes:
        if self._stop is not None:
            stop, self._stop = self._stop, None
            stop()
        return super().sign(data, signature_algorithm)


def _rows(url: str) -> dict[str, tuple[str, bytes | None]]:
    return {serial: (status, der) for serial, status, der in fh.certificate_rows(url)}


# -- the database stops mid-issuance -----------------------------------------------------------


@postgres
def test_database_stops_between_reservation_and_recording(
    own_postgres: fh.DedicatedPostgres, pki: SessionPKI
) -> None:
    storage = Storage(own_postgres.url)
    for record in pki.issuers:
        storage.add_issuer(record)
    authority = CertificateAuthority(
        storage,
        pki.online,
        load_profiles({}),
        public_base_url=BASE_URL,
        default_issuer="issuing-ec",
    )
    loaded = authority._loaded("issuing-ec")
    real_key = authority._issuer_key(loaded)
    assert isinstance(real_key, HsmEcPrivateKey)
    loaded.key = StopsTheDatabaseFirst(real_key, own_postgres.stop)
    request = IssuanceRequest(
        public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
        identifiers=(Identifier("dns", "db-stops.test"),),
        profile="tls-server",
    )
    try:
        with pytest.raises(CAError) as failure:
            authority.issue(request)  # nothing is returned: nothing released
        assert failure.value.kind is Kind.STORAGE, failure.value

        own_postgres.start()
        rows = _rows(own_postgres.url)
        assert len(rows) == 1
        [(pending_serial, (status, der))] = rows.items()
        assert (status, der) == ("pending", None)

        issued = authority.issue(request)  # the pool reconnects to the restarted server
        assert issued.record.serial != pending_serial
        rows = _rows(own_postgres.url)
        assert rows[pending_serial] == ("pending", None)  # reserved, never reused or released
        assert rows[issued.record.serial][0] == "issued"
        assert rows[issued.record.serial][1] == issued.certificate.public_bytes(
            serialization.Encoding.DER
        )
    finally:
        storage.dispose()


@postgres
def test_database_stops_mid_acme_finalize(
    own_postgres: fh.DedicatedPostgres,
    pki: SessionPKI,
    responder: ChallengeResponder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = Storage(own_postgres.url)
    for record in pki.issuers:
        storage.add_issuer(record)
    storage.dispose()
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
    config = tmp_path / "certwright.toml"
    config.write_text(
        "\n".join(
            [
                "[ca]",
                f"public_base_url = {json.dumps(BASE_URL)}",
                'default_issuer = "issuing-ec"',
                "[database]",
                f"url = {json.dumps(own_postgres.url)}",
                "auto_migrate = false",
                "[hsm]",
                f"token_label = {json.dumps(ONLINE_TOKEN)}",
                "[acme]",
                f"http01_port = {responder.server_address[1]}",
                "challenge_wait_seconds = 20.0",
            ]
        )
        + "\n"
    )
    runtime = Runtime(load_config(config, environ={}))
    try:
        app = create_app(runtime, "https")
        client = AcmeClient(app.test_client(), AccountKey.ec_p256(), "https://ca.test")
        response = client.new_account()
        assert response.status_code == 201, response.get_data(as_text=True)
        client.account_url = response.headers["Location"]
        response = client.new_order(ip_ids(fh.LOOPBACK))
        assert response.status_code == 201, response.get_data(as_text=True)
        order_url, order = response.headers["Location"], response.get_json()
        authz = client.get(order["authorizations"][0]).get_json()
        challenge = next(c for c in authz["challenges"] if c["type"] == "http-01")
        responder.tokens[challenge["token"]] = client.key.key_authorization(challenge["token"])
        assert client.post(challenge["url"], {}).get_json()["status"] == "valid"

        loaded = runtime.authority._loaded("issuing-ec")
        real_key = runtime.authority._issuer_key(loaded)
        assert isinstance(real_key, HsmEcPrivateKey)
        loaded.key = StopsTheDatabaseFirst(real_key, own_postgres.stop)

        def finalize() -> Any:
            key = ec.generate_private_key(ec.SECP256R1())
            return client.post(order["finalize"], {"csr": b64url(csr_der(key, [fh.LOOPBACK]))})

        failed = finalize()
        assert failed.status_code == 503, failed.get_data(as_text=True)
        assert failed.mimetype == PROBLEM
        assert failed.get_json()["type"] == ERROR + "serverInternal"

        own_postgres.start()
        [(pending_serial, (status, der))] = _rows(own_postgres.url).items()
        assert (status, der) == ("pending", None)
        # The failure could not be written back, so the order is still `processing`; the
        # jobs' upkeep makes it ready again once it is stale (at once here).
        assert client.get(order_url).get_json()["status"] == "processing"
        monkeypatch.setattr(acme.service, "STALE_ORDER_AFTER", datetime.timedelta(0))
        acme.jobs.run(runtime)
        assert client.get(order_url).get_json()["status"] == "ready"

        again = finalize()
        assert again.status_code == 200, again.get_data(as_text=True)
        done = client.get(order_url).get_json()
        assert done["status"] == "valid", done
        pem = client.get(done["certificate"]).get_data(as_text=True)
        leaf = x509.load_pem_x509_certificates(str(pem).encode())[0]
        serial = certs.serial_hex(leaf.serial_number)
        rows = _rows(own_postgres.url)
        assert rows[pending_serial] == ("pending", None)
        assert set(rows) == {pending_serial, serial}
        assert rows[serial][0] == "issued"
    finally:
        runtime.close()


# -- 1,000 concurrent issuances across 2 processes ---------------------------------------------


@postgres
def test_1000_concurrent_issuances_across_two_processes(
    issuers_on_postgres: str, pki: SessionPKI
) -> None:
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(pki.softhsm_conf),
        "FAULT_HSM_PIN": ONLINE_PIN,
        "PYTHONPATH": str(REPO),
    }
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.fault_harness",
                "burst",
                "--database-url",
                issuers_on_postgres,
                "--token",
                ONLINE_TOKEN,
                "--count",
                "500",
                "--threads",
                "8",
                "--tag",
                str(n),
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    reported: list[str] = []
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
        result = json.loads(out)
        assert result["errors"] == []
        reported.extend(result["serials"])
    assert len(reported) == 1000
    assert len(set(reported)) == 1000
    rows, distinct = fh.distinct_serials(issuers_on_postgres)
    assert (rows, distinct) == (1000, 1000)
    records = fh.certificate_rows(issuers_on_postgres)
    assert {status for _, status, _ in records} == {"issued"}
    assert {serial for serial, _, _ in records} == set(reported)


# -- certwright serve on PostgreSQL: concurrent finalize, SIGKILL mid-burst ---------------------


@pytest.fixture
def serve(postgres_url: str, responder: ChallengeResponder, tmp_path: Path) -> Iterator[fh.Serve]:
    server = fh.Serve(tmp_path, postgres_url, int(responder.server_address[1]))
    try:
        yield server
    finally:
        server.stop()


def _at_once(client: AcmeClient, url: str, bodies: list[bytes]) -> list[Any]:
    """POST each body from its own thread, all released by one barrier."""
    barrier = threading.Barrier(len(bodies))
    answers: list[Any] = [None] * len(bodies)

    def send(i: int) -> None:
        barrier.wait()
        answers[i] = client.post_raw(url, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


@postgres
def test_two_finalize_requests_at_once_give_one_certificate(
    serve: fh.Serve, responder: ChallengeResponder
) -> None:
    serve.start(workers=2)
    before = len(fh.certificate_rows(serve.database_url))  # the HTTPS listener's own
    for attempt in range(3):
        client, order_url, order = fh.ready_order(serve, responder)
        # Both requests are signed (each with its own nonce) before either is sent, then sent
        # at the same moment on two connections to a two-worker server.
        bodies = [fh.finalize_body(client, order) for _ in range(2)]
        answers = _at_once(client, order["finalize"], bodies)
        statuses = sorted(a.status_code for a in answers)
        # The loser sees the order processing or valid (200) or, if it came second and the
        # order is past ready, orderNotReady (403); never a second certificate.
        assert all(s in (200, 403) for s in statuses), [a.get_data() for a in answers]
        assert 200 in statuses
        leaf = fh.download(client, order_url)
        rows = fh.certificate_rows(serve.database_url)
        assert len(rows) == before + attempt + 1, [r[:2] for r in rows]
        assert certs.serial_hex(leaf.serial_number) in {serial for serial, _, _ in rows}


@postgres
def test_sigkill_of_the_server_mid_burst_loses_no_certificate(
    serve: fh.Serve, responder: ChallengeResponder
) -> None:
    serve.start(workers=2)
    received: list[x509.Certificate] = []
    failures: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    stop = threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            try:
                client, order_url, order = fh.ready_order(serve, responder)
                response = client.post_raw(order["finalize"], fh.finalize_body(client, order))
                if response.status_code != 200:
                    raise RuntimeError(f"finalize {response.status_code}")
                leaf = fh.download(client, order_url)
            except Exception as exc:  # the kill cuts flows short; that is the point
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                received.append(leaf)
                if len(received) >= 6:
                    enough.set()

    threads = [threading.Thread(target=client_loop) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        assert enough.wait(timeout=300), failures[-5:]
        serve.kill()  # SIGKILL, mid-burst: the other flows are in flight
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    with lock:
        got = list(received)
    assert failures, "the kill interrupted no flow: it did not happen mid-burst"

    serve.start(workers=2)
    rows = fh.certificate_rows(serve.database_url)
    by_serial = {serial: (status, der) for serial, status, der in rows}
    assert len(by_serial) == len(rows), "a serial appears twice"
    total, distinct = fh.distinct_serials(serve.database_url)
    assert total == distinct
    for leaf in got:
        status, der = by_serial[certs.serial_hex(leaf.serial_number)]
        assert status == "issued"
        assert der == leaf.public_bytes(serialization.Encoding.DER)
    # The inventory as an operator sees it, through the restarted server's own CLI.
    listed = serve.cli("list", "--status", "issued")
    assert listed.returncode == 0, listed.stderr
    for leaf in got:
        assert certs.serial_hex(leaf.serial_number) in listed.stdout


# -- the HSM token becomes unavailable ---------------------------------------------------------


def _not_ready(server: fh.Serve) -> str:
    status, body = fh.http_get(f"{server.http_base}/healthz")
    assert status == 503, body
    return body.decode()


def _finalize_refused(client: AcmeClient, order: dict[str, Any]) -> None:
    response = client.post_raw(order["finalize"], fh.finalize_body(client, order))
    assert response.status_code == 503, response.get_data()
    assert response.headers["Content-Type"].startswith(PROBLEM)
    assert response.get_json()["type"] == ERROR + "serverInternal"


@postgres
def test_hsm_token_unavailable_then_back(serve: fh.Serve, responder: ChallengeResponder) -> None:
    # A certificate issued while all is well, and its OCSP response pre-signed.
    serve.start(workers=2)
    client, order_url, order = fh.ready_order(serve, responder)
    assert client.post_raw(order["finalize"], fh.finalize_body(client, order)).status_code == 200
    leaf, issuer = fh.download_chain(client, order_url)[:2]
    signed = serve.cli("ocsp", "sign")
    assert signed.returncode == 0, signed.stderr
    assert fh.ocsp_status(serve, leaf, issuer) == "GOOD"
    serve.stop()

    # Module path wrong: the server starts, says it is not ready, refuses issuance with a
    # clear 503 and answers OCSP from the pre-signed responses in the database.
    serve.start(workers=2, CERTWRIGHT_HSM__MODULE="/nonexistent/libsofthsm2.so")
    assert "/nonexistent/libsofthsm2.so" in _not_ready(serve)
    client, order_url, order = fh.ready_order(serve, responder)
    _finalize_refused(client, order)
    assert fh.ocsp_status(serve, leaf, issuer) == "GOOD"
    serve.stop()

    # PIN changed on the token: not ready, 503, OCSP still answers; the PIN restored, the
    # same running server issues again (no restart), on the order left ready.
    pin = (serve.data / "secrets" / "online.pin").read_text().strip()
    fh.set_token_pin(serve, pin, pin + "-changed")
    try:
        serve.start(workers=2)
        assert "PIN is incorrect" in _not_ready(serve)
        _finalize_refused(client, order)
        assert fh.ocsp_status(serve, leaf, issuer) == "GOOD"
    finally:
        fh.set_token_pin(serve, pin + "-changed", pin)
    status, body = fh.http_get(f"{serve.http_base}/healthz")
    assert status == 200, body
    response = client.post_raw(order["finalize"], fh.finalize_body(client, order))
    assert response.status_code == 200, response.get_data()
    assert fh.download(client, order_url).serial_number != leaf.serial_number

    # Token removed while the server runs (its directory moved out of SoftHSM's tokendir;
    # SoftHSM notices: handles become invalid and the token is no longer found), then put back.
    client, order_url, order = fh.ready_order(serve, responder)
    token_dir = fh.token_directory(serve)
    away = serve.workdir / "token-away"
    token_dir.rename(away)
    try:
        _finalize_refused(client, order)
        assert "hsm:" in _not_ready(serve)
        assert fh.ocsp_status(serve, leaf, issuer) == "GOOD"
    finally:
        away.rename(token_dir)
    status, body = fh.http_get(f"{serve.http_base}/healthz")
    assert status == 200, body
    response = client.post_raw(order["finalize"], fh.finalize_body(client, order))
    assert response.status_code == 200, response.get_data()
    fh.download(client, order_url)
