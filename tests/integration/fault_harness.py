"""Real faults for tests/integration/test_faults.py: a PostgreSQL server of the test's own that
it can stop and start, `certwright serve` processes it can SIGKILL, a raw ACME flow over real
HTTPS, and a worker process that issues through the real CertificateAuthority (run as
`python -m tests.integration.fault_harness burst ...`).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, func, select

from ca.storage.models import Certificate
from tests.integration.acme_client import AccountKey, AcmeClient, b64url, csr_der, ip_ids
from tests.integration.acme_harness import LOOPBACK, VENV_BIN, certwright_init, free_port
from tests.integration.test_acme_scaleout import ChallengeResponder, HttpsTransport

# -- a PostgreSQL server of the test's own ------------------------------------------------------


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    return Path(found[-1]) if found and Path(found[-1], "pg_ctl").exists() else None


class DedicatedPostgres:
    """initdb + pg_ctl in a fresh directory, as scripts/lib/postgres.sh does (as root the
    binaries run as the postgres user). `stop()` is `pg_ctl -m immediate`: a crash, no
    shutdown checkpoint, every connection cut."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.directory = Path(tempfile.mkdtemp(prefix="certwright-fault-pg."))
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/postgres"
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.directory / "data"), "-A", "trust", "-U", "postgres")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [*self._as_postgres, str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses={LOOPBACK} -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.directory / "data"),
            "-l",
            str(self.directory / "server.log"),
            "-w",
            "-o",
            options,
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-m", "immediate", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


# -- `certwright serve` processes --------------------------------------------------------------


def serve_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CERTWRIGHT_") and k != "SOFTHSM2_CONF"
    }
    env.update(extra)
    return env


class Serve:
    """A demo CA made by `certwright init` on `database_url`, served by `certwright serve`
    in its own process group (so SIGKILL reaches the listeners, workers and jobs child)."""

    def __init__(self, workdir: Path, database_url: str, responder_port: int) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.database_url = database_url
        self.http_port = free_port()
        self.https_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.env = {
            "CERTWRIGHT_DATABASE__URL": database_url,
            "CERTWRIGHT_ACME__HTTP01_PORT": str(responder_port),
            "CERTWRIGHT_ACME__CHALLENGE_WAIT_SECONDS": "20",
        }
        self.env["CERTWRIGHT_CONFIG"] = str(certwright_init(self.data, self.http_port, **self.env))
        self.root = self.data / "root.pem"

    @property
    def base(self) -> str:
        return f"https://{LOOPBACK}:{self.https_port}"

    @property
    def http_base(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def cli(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "certwright"), *args],
            env=serve_env({**self.env, **extra}),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def start(self, workers: int = 2, **extra: str) -> None:
        assert self.process is None
        self.starts += 1
        log = self.workdir / f"serve-{self.starts}.log"
        env = serve_env(
            {
                **self.env,
                "CERTWRIGHT_SERVER__WORKERS": str(workers),
                "CERTWRIGHT_SERVER__HTTP_LISTEN": f"{LOOPBACK}:{self.http_port}",
                "CERTWRIGHT_SERVER__HTTPS_LISTEN": f"{LOOPBACK}:{self.https_port}",
                **extra,
            }
        )
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "certwright"), "serve"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        transport = HttpsTransport(self.root)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"certwright serve exited: {log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if transport.get(f"{self.base}/acme/directory").status_code == 200:
                    http_get(f"{self.http_base}/healthz")  # answers, ready or not
                    return
            time.sleep(0.2)
        raise RuntimeError(f"certwright serve did not start: {log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group: no handler runs, nothing is flushed."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._reap_group()
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self._reap_group()
        self.process = None

    def _reap_group(self) -> None:
        # Children of the group (gunicorn workers) may outlive the leader by a moment; wait
        # until the group is empty so the next start can bind the same ports.
        assert self.process is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


# -- ACME over real HTTPS ----------------------------------------------------------------------


def http_get(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310  # loopback http
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def ready_order(
    server: Serve, responder: ChallengeResponder, key: AccountKey | None = None
) -> tuple[AcmeClient, str, dict[str, Any]]:
    """A new account and an order for 127.0.0.1 whose http-01 challenge was really validated."""
    client = AcmeClient(HttpsTransport(server.root), key or AccountKey.ec_p256(), base=server.base)  # type: ignore[arg-type]
    response = client.new_account()
    assert response.status_code == 201, response.get_data(as_text=True)
    client.account_url = response.headers["Location"]
    response = client.new_order(ip_ids(LOOPBACK))
    assert response.status_code == 201, response.get_data(as_text=True)
    order_url = response.headers["Location"]
    order = response.get_json()
    authz = client.get(order["authorizations"][0]).get_json()
    if authz["status"] != "valid":
        challenge = next(c for c in authz["challenges"] if c["type"] == "http-01")
        responder.tokens[challenge["token"]] = client.key.key_authorization(challenge["token"])
        answered = client.post(challenge["url"], {}).get_json()
        assert answered["status"] == "valid", answered
    return client, order_url, order


def finalize_body(client: AcmeClient, order: dict[str, Any]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return client.signed_body(order["finalize"], {"csr": b64url(csr_der(key, [LOOPBACK]))})


def download_chain(client: AcmeClient, order_url: str) -> list[x509.Certificate]:
    done = client.get(order_url).get_json()
    assert done["status"] == "valid", done
    pem = client.get(done["certificate"]).get_data(as_text=True)
    return x509.load_pem_x509_certificates(str(pem).encode())


def download(client: AcmeClient, order_url: str) -> x509.Certificate:
    return download_chain(client, order_url)[0]


def ocsp_status(server: Serve, leaf: x509.Certificate, issuer: x509.Certificate) -> str:
    """The certificate status a GET to the server's OCSP responder answers (RFC 6960 A.1)."""
    import base64
    import urllib.parse

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()  # noqa: S303  # RFC 5019 CertID
    encoded = base64.b64encode(request.public_bytes(serialization.Encoding.DER)).decode()
    status, body = http_get(f"{server.http_base}/ocsp/{urllib.parse.quote(encoded, safe='')}")
    assert status == 200, (status, body[:200])
    response = ocsp.load_der_ocsp_response(body)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL, response
    assert response.serial_number == leaf.serial_number
    return str(response.certificate_status.name)


def token_directory(server: Serve) -> Path:
    """The SoftHSM directory of the server's online token (its token.object names it)."""
    from ca.demo import ONLINE_TOKEN

    for candidate in sorted((server.data / "tokens").iterdir()):
        token_object = candidate / "token.object"
        if token_object.exists() and ONLINE_TOKEN.encode() in token_object.read_bytes():
            return candidate
    raise RuntimeError("the online token's directory was not found")


def set_token_pin(server: Serve, old: str, new: str) -> None:
    """C_SetPIN on the server's online token, from a separate process (python-pkcs11)."""
    code = (
        "import sys, pkcs11; "
        "lib = pkcs11.lib(sys.argv[1]); "
        "t = lib.get_token(token_label=sys.argv[2]); "
        "s = t.open(user_pin=sys.argv[3], rw=True); "
        "s.set_pin(sys.argv[3], sys.argv[4]); s.close()"
    )
    from ca.config import DEFAULT_SOFTHSM_MODULE
    from ca.demo import ONLINE_TOKEN

    env = serve_env({"SOFTHSM2_CONF": str(server.data / "softhsm2.conf")})
    result = subprocess.run(
        [sys.executable, "-c", code, DEFAULT_SOFTHSM_MODULE, ONLINE_TOKEN, old, new],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"C_SetPIN failed: {result.stderr.strip()[-500:]}")


# -- the database, read directly ---------------------------------------------------------------


def certificate_rows(database_url: str) -> list[tuple[str, str, bytes | None]]:
    """(serial, status, DER) of every row of `certificates`."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return [
                (str(serial), str(status), der)
                for serial, status, der in connection.execute(
                    select(Certificate.serial, Certificate.status, Certificate.der)
                )
            ]
    finally:
        engine.dispose()


def distinct_serials(database_url: str) -> tuple[int, int]:
    """(rows, distinct serials) in `certificates`, counted by the database."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                select(func.count(), func.count(func.distinct(Certificate.serial)))
            ).one()
            return int(row[0]), int(row[1])
    finally:
        engine.dispose()


# -- a worker process issuing through the real CertificateAuthority ----------------------------


def _burst(args: argparse.Namespace) -> None:
    from ca.config import DEFAULT_SOFTHSM_MODULE
    from ca.hsm import Token
    from ca.issuance import CertificateAuthority, IssuanceRequest
    from ca.policy import Identifier
    from ca.profiles import load_profiles
    from ca.storage import Storage

    storage = Storage(args.database_url)
    token = Token(DEFAULT_SOFTHSM_MODULE, args.token, os.environ["FAULT_HSM_PIN"])
    authority = CertificateAuthority(
        storage,
        token,
        load_profiles({}),
        public_base_url="http://ca.test:8080",
        default_issuer="issuing-ec",
    )
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(8)]
    serials: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(args.count))
    start = threading.Barrier(args.threads)

    def work() -> None:
        start.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                issued = authority.issue(
                    IssuanceRequest(
                        public_key=keys[i % len(keys)],
                        identifiers=(Identifier("dns", f"p{args.tag}-{i}.burst.test"),),
                        profile="tls-server",
                        source=f"burst:{args.tag}",
                    )
                )
            except Exception as exc:  # every failure is reported, none hidden
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                serials.append(issued.record.serial)

    threads = [threading.Thread(target=work) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    storage.dispose()
    json.dump({"serials": serials, "errors": errors}, sys.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fault_harness")
    sub = parser.add_subparsers(dest="command", required=True)
    burst = sub.add_parser("burst", help="issue COUNT certificates from THREADS threads")
    burst.add_argument("--database-url", required=True)
    burst.add_argument("--token", required=True)
    burst.add_argument("--count", type=int, required=True)
    burst.add_argument("--threads", type=int, default=8)
    burst.add_argument("--tag", default="0")
    args = parser.parse_args(argv)
    _burst(args)


if __name__ == "__main__":
    main()
