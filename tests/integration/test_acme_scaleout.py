"""Two `certwright serve` processes on one PostgreSQL database behave as one CA.

A round-robin TCP balancer in front of them hands each new connection to the next server, as
a load balancer would. Every request opens a new connection, and a POST two (HEAD newNonce,
then the POST), so each nonce issued by one process is redeemed by the other; the test checks
that, and steers the finalize to the process that did not create the order. (Before, it only
counted requests per process, and newOrder and finalize landed on the same one.)
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import itertools
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import VENV_BIN, run_cli
from tests.integration.acme_client import AccountKey, AcmeClient, b64url, csr_der, ip_ids

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Response:
    """The slice of werkzeug's TestResponse that AcmeClient reads."""

    def __init__(self, status: int, headers: http.client.HTTPMessage, data: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.data = data

    def get_json(self) -> Any:
        return json.loads(self.data)

    def get_data(self, as_text: bool = False) -> str | bytes:
        return self.data.decode() if as_text else self.data


class HttpsTransport:
    """Real HTTPS, one new connection per request, trusting only our root."""

    def __init__(self, root_pem: Path) -> None:
        self.context = ssl.create_default_context(cafile=str(root_pem))

    def _request(
        self, method: str, url: str, body: bytes | None, content_type: str | None
    ) -> _Response:
        parts = urlsplit(url)
        connection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, context=self.context, timeout=30
        )
        try:
            headers = {"Content-Type": content_type} if content_type else {}
            connection.request(method, parts.path, body=body, headers=headers)
            # The response is closed too: when the server dies mid-body, its file holds the
            # socket's last reference, which connection.close() alone leaves open.
            with connection.getresponse() as response:
                return _Response(response.status, response.headers, response.read())
        finally:
            connection.close()

    def get(self, url: str) -> _Response:
        return self._request("GET", url, None, None)

    def head(self, url: str) -> _Response:
        return self._request("HEAD", url, None, None)

    def post(self, url: str, data: bytes, content_type: str) -> _Response:
        return self._request("POST", url, data, content_type)


class RoundRobinBalancer:
    """A TCP balancer: each accepted connection is piped to the next backend in turn."""

    def __init__(self, backends: list[int]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = int(self.listener.getsockname()[1])
        self._next = itertools.cycle(backends)
        self.counts = dict.fromkeys(backends, 0)
        self.sequence: list[int] = []  # the backend of each connection, in order
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            backend = next(self._next)
            self.counts[backend] += 1
            self.sequence.append(backend)
            threading.Thread(target=self._pipe_pair, args=(client, backend), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _pipe_pair(self, client: socket.socket, backend: int) -> None:
        with client, socket.create_connection(("127.0.0.1", backend)) as upstream:
            other = threading.Thread(target=self._pipe, args=(upstream, client))
            other.start()
            self._pipe(client, upstream)
            other.join()

    def close(self) -> None:
        self._stop = True
        self.listener.close()


class ChallengeResponder(http.server.ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        responder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                token = self.path.rsplit("/", 1)[-1]
                body = responder.tokens.get(token, "").encode()
                self.send_response(200 if body else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def two_servers(
    postgres_url: str, tmp_path: Path
) -> Iterator[tuple[RoundRobinBalancer, Path, ChallengeResponder, list[Path]]]:
    responder = ChallengeResponder()
    threading.Thread(target=responder.serve_forever, daemon=True).start()
    data = tmp_path / "data"
    env = {"CERTWRIGHT_DATABASE__URL": postgres_url}
    result = run_cli("init", "--data-dir", str(data), env=env)
    assert result.returncode == 0, result.stderr
    env.update(
        CERTWRIGHT_CONFIG=str(data / "certwright.toml"),
        CERTWRIGHT_ACME__HTTP01_PORT=str(responder.server_address[1]),
        CERTWRIGHT_ACME__CHALLENGE_WAIT_SECONDS="10",
        CERTWRIGHT_SERVER__WORKERS="1",
    )
    processes: list[subprocess.Popen[bytes]] = []
    https_ports: list[int] = []
    logs: list[Path] = []
    try:
        for i in range(2):
            https_port = _free_port()
            log = tmp_path / f"server{i}.log"
            logs.append(log)
            full_env = {k: v for k, v in os.environ.items() if not k.startswith("CERTWRIGHT_")}
            full_env.update(env)
            with log.open("wb") as log_file:
                processes.append(
                    subprocess.Popen(
                        [
                            str(VENV_BIN / "certwright"),
                            "serve",
                            "--listen",
                            f"127.0.0.1:{_free_port()}",
                            "--https-listen",
                            f"127.0.0.1:{https_port}",
                        ],
                        env=full_env,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            https_ports.append(https_port)
            # One at a time: each writes the shared TLS certificate file on start.
            _wait_for_directory(https_port, data / "root.pem", processes[-1], log)
        balancer = RoundRobinBalancer(https_ports)
        yield balancer, data / "root.pem", responder, logs
        balancer.close()
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        responder.shutdown()
        responder.server_close()


def _wait_for_directory(port: int, root: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    transport = HttpsTransport(root)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited: {log.read_text()[-2000:]}")
        try:
            if transport.get(f"https://127.0.0.1:{port}/acme/directory").status_code == 200:
                return
        except (OSError, ssl.SSLError):
            pass
        time.sleep(0.2)
    pytest.fail(f"server did not start: {log.read_text()[-2000:]}")


def test_one_flow_across_two_processes_on_postgres(two_servers: Any) -> None:
    balancer, root, responder, _logs = two_servers
    base = f"https://127.0.0.1:{balancer.port}"
    client = AcmeClient(HttpsTransport(root), AccountKey.ec_p256(), base=base)  # type: ignore[arg-type]

    assert client.new_account().status_code == 201
    order_response = client.new_order(ip_ids("127.0.0.1"))
    assert order_response.status_code == 201, order_response.get_data(as_text=True)
    created_on = balancer.sequence[-1]
    order_url = order_response.headers["Location"]
    order = order_response.get_json()
    authz = client.get(order["authorizations"][0]).get_json()
    challenge = next(c for c in authz["challenges"] if c["type"] == "http-01")
    responder.tokens[challenge["token"]] = client.key.key_authorization(challenge["token"])
    answered = client.post(challenge["url"], {}).get_json()
    assert answered["status"] == "valid", answered

    key = ec.generate_private_key(ec.SECP256R1())
    # A POST takes two connections (HEAD newNonce, then the POST), so it lands where the
    # last connection did; one more connection moves it to the other process.
    if balancer.sequence[-1] == created_on:
        client.nonce()
    finalized = client.post(order["finalize"], {"csr": b64url(csr_der(key, ["127.0.0.1"]))})
    assert finalized.status_code == 200, finalized.get_data(as_text=True)
    assert balancer.sequence[-1] != created_on  # finalized on the process it was not created on
    done = client.get(order_url).get_json()
    assert done["status"] == "valid"
    pem = client.get(done["certificate"]).get_data(as_text=True)
    chain = x509.load_pem_x509_certificates(pem.encode())
    assert chain[0].public_key() == key.public_key()

    # Both processes served this one flow and every connection alternated: each POST's nonce
    # came from the HEAD newNonce just before it, issued by one process, redeemed by the other.
    assert all(a != b for a, b in itertools.pairwise(balancer.sequence)), balancer.sequence
    assert all(count >= 5 for count in balancer.counts.values()), balancer.counts
