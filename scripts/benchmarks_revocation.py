"""Revocation benchmarks behind `scripts/bench crl` and `scripts/bench ocsp`. They print figures
and assert nothing about time.

  scripts/bench crl [--revoked 1000000] [--shards 16] [--db URL]
      one issuer with N revoked certificates spread over its shards: seconds and peak memory
      to build, lint and HSM-sign every shard, then the cost of a refresh with nothing due.
  scripts/bench ocsp [--certs 2000] [--seconds 10] [--connections 64]
      pre-signed GET and POST, and cache-miss signing (a nonce per request), against
      `certwright serve`'s HTTP listener with wrk; then the same pre-signed files via nginx.
"""

from __future__ import annotations

import datetime
import os
import random
import resource
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from ca import certs, crl
from ca.hsm import Token
from ca.storage import Storage
from ca.storage.models import Certificate
from scripts.bench_pki import BASE_URL, bench_pki

_REASONS = (0, 1, 4, 5, 9)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pki(workdir: Path, db_url: str | None, key_type: str) -> tuple[Storage, Token]:
    return bench_pki(workdir, db_url, (("issuing", key_type),))


def _insert_revoked(storage: Storage, count: int, shards: int, batch: int = 20000) -> None:
    """Revoked certificate rows straight into the table (no DER: CRLs never read it)."""
    now = datetime.datetime.now(datetime.UTC)
    rng = random.Random(1)  # noqa: S311 - spreads reasons and dates, nothing secret
    statement = insert(Certificate)
    done = 0
    while done < count:
        rows: list[dict[str, Any]] = []
        for _ in range(min(batch, count - done)):
            serial = certs.new_serial()
            rows.append(
                {
                    "serial": certs.serial_hex(serial),
                    "issuer_id": "issuing",
                    "profile": "tls-server",
                    "status": "revoked",
                    "common_name": None,
                    "names": "",
                    "key_type": "ec-p256",
                    "spki_sha256": secrets.token_hex(32),
                    "not_before": now - datetime.timedelta(days=10),
                    "not_after": now + datetime.timedelta(days=rng.randint(1, 80)),
                    "crl_shard": serial % shards,
                    "source": "bench",
                    "created_at": now,
                    "revoked_at": now - datetime.timedelta(seconds=rng.randint(0, 864000)),
                    "revocation_reason": rng.choice(_REASONS),
                }
            )
        with storage.engine.begin() as connection:
            connection.execute(statement, rows)
        done += len(rows)


def bench_crl(revoked: int, shards: int, db_url: str | None, key_type: str) -> None:
    with tempfile.TemporaryDirectory(prefix="certwright-bench-crl-") as tmp:
        storage, online = _pki(Path(tmp), db_url, key_type)
        print(
            f"CRL benchmark: {revoked} revoked entries, one {key_type} issuer, {shards} shards, "
            f"database={storage.dialect}"
        )
        start = time.perf_counter()
        _insert_revoked(storage, revoked, shards)
        print(
            f"  inserted rows             {time.perf_counter() - start:8.2f} s (setup, not timed)"
        )
        baseline = _peak_mib()
        start = time.perf_counter()
        signed = crl.refresh_crls(
            storage,
            online,
            public_base_url=BASE_URL,
            crl_shards=shards,
            issuer="issuing",
            force=True,
        )
        seconds = time.perf_counter() - start
        sizes = [len(c.der) for c in signed]
        entries = sum(c.entries for c in signed)
        print(
            f"  build+lint+sign+store     {seconds:8.2f} s  for {len(signed)} shards, "
            f"{entries} entries ({seconds / max(1, len(signed)) * 1000:.0f} ms per shard)"
        )
        print(
            f"  CRL sizes                 {sum(sizes) / 2**20:8.1f} MiB total, largest "
            f"{max(sizes) / 2**20:.2f} MiB"
        )
        print(
            f"  peak RSS                  {_peak_mib():8.0f} MiB (before signing: {baseline:.0f})"
        )
        start = time.perf_counter()
        again = crl.refresh_crls(
            storage, online, public_base_url=BASE_URL, crl_shards=shards, issuer="issuing"
        )
        print(
            f"  refresh, nothing due      {time.perf_counter() - start:8.3f} s "
            f"({len(again)} signed)"
        )
        storage.dispose()


_WRK_GET = """
paths = {}
for line in io.lines("%(list)s") do paths[#paths + 1] = line end
request = function() return wrk.format("GET", paths[math.random(#paths)]) end
"""
_WRK_POST = """
bodies = {}
for name in io.lines("%(list)s") do
  local f = io.open(name, "rb"); bodies[#bodies + 1] = f:read("*a"); f:close()
end
headers = {["Content-Type"] = "application/ocsp-request"}
request = function()
  return wrk.format("POST", "/ocsp", headers, bodies[math.random(#bodies)])
end
"""
_NGINX = """
worker_processes 2;
pid %(dir)s/nginx.pid;
error_log %(dir)s/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %(dir)s/tmp; proxy_temp_path %(dir)s/tmp;
  fastcgi_temp_path %(dir)s/tmp; uwsgi_temp_path %(dir)s/tmp; scgi_temp_path %(dir)s/tmp;
  server {
    listen 127.0.0.1:%(port)d backlog=4096;
    root %(www)s;
    location /ocsp/ { default_type application/ocsp-response; index index.der; }
  }
}
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wrk_rate(url: str, script: Path | None, seconds: int, connections: int) -> float:
    """Requests/s that wrk (two threads, keep-alive) reached; non-2xx answers are printed."""
    result = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s"]
        + (["-s", str(script)] if script else [])
        + [url],
        capture_output=True,
        text=True,
        check=False,
    )
    rate = 0.0
    for line in result.stdout.splitlines():
        if line.startswith("Requests/sec:"):
            rate = float(line.split()[1])
        if "Non-2xx" in line or "Socket errors" in line:
            print(f"    wrk: {line.strip()}")
    return rate


def _wait_for(url: str, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback http
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer")


def bench_ocsp(certificates: int, seconds: int, connections: int) -> None:
    """Pre-signed GET/POST and cache-miss signing from `certwright serve`, then nginx."""
    import base64
    import signal

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import ocsp as x509_ocsp

    from ca import ocsp_signing
    from ca.cli_revocation import get_request_path
    from ca.config import load_config
    from ca.issuance import IssuanceRequest
    from ca.policy import Identifier
    from ca.runtime import Runtime
    from ca.server import ASGI_WORKER

    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if missing:
        print(f"ocsp benchmark skipped: {', '.join(missing)} missing (apt-get install wrk nginx)")
        return
    venv = Path(__file__).resolve().parent.parent / ".venv" / "bin"
    with tempfile.TemporaryDirectory(prefix="certwright-bench-ocsp-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's workers run as another user and read the published files
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CERTWRIGHT_", "SOFTHSM"))}
        data = work / "data"
        subprocess.run(
            [venv / "certwright", "init", "--data-dir", str(data)],
            env=env,
            check=True,
            capture_output=True,
        )
        config_path = data / "certwright.toml"
        os.environ.pop("SOFTHSM2_CONF", None)
        runtime = Runtime(load_config(config_path))
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        serials = []
        for i in range(certificates):
            issued = runtime.authority.issue(
                IssuanceRequest(key, (Identifier("dns", f"b{i}.bench.internal"),), "tls-server")
            )
            serials.append((issued.record.issuer_id, issued.certificate.serial_number))
        signer = ocsp_signing.OcspSigner(runtime.storage, runtime.token)
        ocsp_signing.refresh_ocsp(signer)
        ids = signer.issuer(serials[0][0]).ids
        requests = [ocsp_signing.canonical_request(ids, serial) for _, serial in serials]
        paths = work / "paths.txt"
        paths.write_text("".join(f"/ocsp/{base64.b64encode(r).decode()}\n" for r in requests))
        nginx_paths = work / "nginx-paths.txt"
        nginx_paths.write_text("".join(f"/ocsp/{get_request_path(r)}\n" for r in requests))
        bodies, nonced = work / "bodies.txt", work / "nonced.txt"
        body_names, nonce_names = [], []
        for n, (_, serial) in enumerate(serials[:1000]):
            plain = work / f"req-{n}.der"
            plain.write_bytes(requests[n])
            body_names.append(str(plain))
            with_nonce = work / f"nonce-{n}.der"
            builder = (
                x509_ocsp.OCSPRequestBuilder()
                .add_certificate_by_hash(
                    ids.name_hash["sha1"],
                    ids.key_hash["sha1"],
                    serial,
                    hashes.SHA1(),  # noqa: S303 - RFC 5019 CertID
                )
                .add_extension(x509.OCSPNonce(secrets.token_bytes(16)), critical=False)
            )
            with_nonce.write_bytes(builder.build().public_bytes(serialization.Encoding.DER))
            nonce_names.append(str(with_nonce))
        bodies.write_text("\n".join(body_names) + "\n")
        nonced.write_text("\n".join(nonce_names) + "\n")
        scripts = {}
        for name, template, listing in (
            ("get", _WRK_GET, paths),
            ("nginx-get", _WRK_GET, nginx_paths),
            ("post", _WRK_POST, bodies),
            ("nonce", _WRK_POST, nonced),
        ):
            scripts[name] = work / f"{name}.lua"
            scripts[name].write_text(template % {"list": listing})
        runtime.close()

        http_port, https_port = _free_port(), _free_port()
        serve_env = dict(env, CERTWRIGHT_CONFIG=str(config_path))
        log = (work / "serve.log").open("wb")
        server = subprocess.Popen(
            [
                venv / "certwright",
                "serve",
                "--listen",
                f"127.0.0.1:{http_port}",
                "--https-listen",
                f"127.0.0.1:{https_port}",
                "--workers",
                "2",
            ],
            env=serve_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        rates: dict[str, float] = {}
        try:
            base = f"http://127.0.0.1:{http_port}"
            _wait_for(f"{base}/healthz")
            # Untimed warm-up: each worker's first request for a certificate parses it and
            # reads its response through the storage layer; steady state is what is measured.
            for name in ("get", "post"):
                wrk_rate(base, scripts[name], min(2, seconds), connections)
            print(
                f"OCSP benchmark: {certificates} pre-signed responses, wrk -t2 -c{connections} "
                f"-d{seconds}s after a 2 s warm-up, certwright serve's HTTP listener with 2 "
                f"workers ({'asgi' if ASGI_WORKER else 'gthread'}); load average "
                f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
            )
            for name, what in (
                ("get", "pre-signed GET"),
                ("post", "pre-signed POST"),
                ("nonce", "cache-miss signing (nonce)"),
            ):
                rates[name] = wrk_rate(base, scripts[name], seconds, connections)
                print(f"  certwright {what:28} {rates[name]:10.0f} responses/s")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
            log.close()
        # Why answers were not 200 (the responder logs each tryLater and internalError).
        problems = [
            line
            for line in (work / "serve.log").read_text(errors="replace").splitlines()
            if "WARNING" in line or "ERROR" in line or "deferred" in line or "failed" in line
        ]
        for line in sorted(set(problems))[:5]:
            print(f"    serve: {line[:160]} (x{problems.count(line)})")
        www = work / "www"
        subprocess.run(
            [venv / "certwright", "ocsp", "publish", "--out", str(www)],
            env=serve_env,
            check=True,
            capture_output=True,
        )
        nginx_dir = work / "nginx"
        (nginx_dir / "tmp").mkdir(parents=True)
        port = _free_port()
        conf = nginx_dir / "nginx.conf"
        conf.write_text(_NGINX % {"dir": nginx_dir, "port": port, "www": www})
        nginx = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(nginx_dir), "-g", "daemon off;"],
            start_new_session=True,
        )
        try:
            _wait_for(f"http://127.0.0.1:{port}{nginx_paths.read_text().splitlines()[0]}")
            rates["nginx"] = wrk_rate(
                f"http://127.0.0.1:{port}", scripts["nginx-get"], seconds, connections
            )
            print(f"  nginx      {'published files, GET':28} {rates['nginx']:10.0f} responses/s")
        finally:
            nginx.terminate()
            nginx.wait(30)
        if rates.get("nginx"):
            print(f"  certwright pre-signed GET / nginx = {rates['get'] / rates['nginx']:.2f}")


def add_parsers(sub: Any) -> None:
    """`crl` and `ocsp` subcommands for scripts/bench."""
    crl_parser = sub.add_parser("crl", help="sign every CRL shard of one issuer with N revoked")
    crl_parser.add_argument("--revoked", type=int, default=1_000_000)
    crl_parser.add_argument("--shards", type=int, default=16)
    crl_parser.add_argument("--key-type", default="ec-p256")
    crl_parser.add_argument("--db", help="database URL (default: a temporary SQLite file)")
    ocsp_parser = sub.add_parser("ocsp", help="OCSP responses/s with wrk, certwright vs nginx")
    ocsp_parser.add_argument("--certs", type=int, default=2000)
    ocsp_parser.add_argument("--seconds", type=int, default=10)
    ocsp_parser.add_argument("--connections", type=int, default=64)


def dispatch(args: Any) -> None:
    if args.bench == "crl":
        bench_crl(2000 if args.smoke else args.revoked, args.shards, args.db, args.key_type)
    elif args.bench == "ocsp":
        bench_ocsp(
            200 if args.smoke else args.certs, 2 if args.smoke else args.seconds, args.connections
        )
