"""Prometheus metrics at /metrics (issue #5 point 6).

In process: a real issuance, a refusal, real ACME http-01 validations against a loopback HTTP
server, then a scrape through the Flask app, on SQLite and PostgreSQL. Through a real
`certwright serve` (several workers, a jobs process, the certificate maker): multiprocess mode
sums every process's values, OCSP requests are counted, and the database gauges (expiring
certificates, CRL age) appear.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import http.server
import json
import threading
import time
import types
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from acme.validation import ValidationConfig, ValidationError, validate_http01
from ca import metrics
from ca.clock import SystemClock
from ca.config import load_config
from ca.errors import CAError
from ca.issuance import CertificateAuthority, IssuanceRequest
from ca.policy import Identifier
from ca.storage import Storage
from tests.integration.acme_harness import (
    CERTWRIGHT,
    LOOPBACK,
    answers,
    certwright_init,
    clean_env,
    free_port,
    log_tail,
    running,
    wait_until,
)

pytestmark = pytest.mark.integration


# -- reading an exposition ---------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    """The sample's value; 0 when the series does not exist (yet)."""
    return samples(text).get((name, frozenset(labels.items())), 0.0)


# -- in process, through the Flask app ---------------------------------------------------------


def _metrics_app(storage: Storage) -> Flask:
    runtime = types.SimpleNamespace(
        config=load_config(None, environ={}), storage=storage, clock=SystemClock()
    )
    app = Flask("metrics-test")
    app.register_blueprint(metrics.blueprint(runtime))
    return app


def _scrape(app: Flask) -> str:
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    return response.get_data(as_text=True)


@contextlib.contextmanager
def _http01_responder(token: str, body: str) -> Iterator[int]:
    """A real HTTP server on loopback answering the challenge URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == f"/.well-known/acme-challenge/{token}":
                payload, status = body.encode(), 200
            else:
                payload, status = b"not here", 404
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_scrape_after_issuance_refusal_and_validations(
    storage: Storage, authority: CertificateAuthority
) -> None:
    app = _metrics_app(storage)
    before = _scrape(app)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = authority.issue(
        IssuanceRequest(
            public_key=key.public_key(),
            identifiers=(Identifier("dns", "metrics.test"),),
            profile="tls-server",
            validity=datetime.timedelta(days=5),
        )
    )
    with pytest.raises(CAError):
        authority.issue(
            IssuanceRequest(
                public_key=key.public_key(),
                identifiers=(Identifier("dns", "metrics.test"),),
                profile="no-such-profile",
            )
        )
    token, key_authorization = "tok_en-1", "tok_en-1.thumbprint"
    with _http01_responder(token, key_authorization) as port:
        cfg = ValidationConfig(http01_port=port, timeout=5)
        validate_http01("ip", LOOPBACK, token, key_authorization, cfg)
        with pytest.raises(ValidationError):
            validate_http01("ip", LOOPBACK, "other", "other.thumbprint", cfg)
    # A new app: the first one's database gauges are cached for 15 s since `before`.
    after = _scrape(_metrics_app(storage))

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    issuer = issued.record.issuer_id
    assert delta("certwright_certificates_issued_total", issuer=issuer, profile="tls-server") == 1
    assert delta("certwright_issuance_refusals_total", rule="profile.unknown") == 1
    assert delta("certwright_hsm_sign_seconds_count", issuer=issuer) == 1
    assert delta("certwright_hsm_sign_seconds_sum", issuer=issuer) > 0
    assert delta("certwright_acme_validations_total", type="http-01", outcome="valid") == 1
    assert delta("certwright_acme_validations_total", type="http-01", outcome="invalid") == 1
    # Database gauges: the 5-day certificate is within both windows, on this fresh database.
    assert value(after, "certwright_certificates_expiring", within_days="7") == 1
    assert value(after, "certwright_certificates_expiring", within_days="30") == 1
    assert value(after, "certwright_database_metrics_up") == 1


def test_metrics_can_be_disabled(storage: Storage) -> None:
    runtime = types.SimpleNamespace(
        config=load_config(None, environ={"CERTWRIGHT_METRICS__ENABLED": "false"}),
        storage=storage,
        clock=SystemClock(),
    )
    app = Flask("metrics-off")
    app.register_blueprint(metrics.blueprint(runtime))
    assert app.test_client().get("/metrics").status_code == 404


def test_database_gauges_are_cached(storage: Storage, authority: CertificateAuthority) -> None:
    """A scrape within the cache lifetime does not query again (cheap at a million rows)."""
    runtime = types.SimpleNamespace(storage=storage, clock=SystemClock())
    collector = metrics.DatabaseCollector(runtime, ttl=3600)
    first = {m.name: m.samples for m in collector.collect()}
    key = ec.generate_private_key(ec.SECP256R1())
    authority.issue(
        IssuanceRequest(
            public_key=key.public_key(),
            identifiers=(Identifier("dns", "cached.test"),),
            profile="tls-server",
            validity=datetime.timedelta(days=3),
        )
    )
    assert {m.name: m.samples for m in collector.collect()} == first
    fresh = metrics.DatabaseCollector(runtime, ttl=3600)
    assert {m.name: m.samples for m in fresh.collect()} != first


# -- a real `certwright serve` -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Served:
    """A running `certwright serve` and how to reach it."""

    config: Path
    data_dir: Path
    http_base: str
    https_base: str
    root: Path
    log: Path
    env: dict[str, str]

    def cli(self, *args: str) -> str:
        import subprocess

        result = subprocess.run(
            [str(CERTWRIGHT), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout


@contextlib.contextmanager
def serve(workdir: Path, *, workers: int = 2, **extra_env: str) -> Iterator[Served]:
    """`certwright init` + `certwright serve` on loopback ports; stopped on the way out."""
    http_port, https_port = free_port(), free_port()
    config = certwright_init(workdir / "data", http_port)
    env = clean_env(CERTWRIGHT_CONFIG=str(config), **extra_env)
    server_env = dict(
        env,
        CERTWRIGHT_SERVER__HTTP_LISTEN=f"{LOOPBACK}:{http_port}",
        CERTWRIGHT_SERVER__HTTPS_LISTEN=f"{LOOPBACK}:{https_port}",
        CERTWRIGHT_SERVER__WORKERS=str(workers),
    )
    log = workdir / "serve.log"
    root = config.parent / "root.pem"
    with running([str(CERTWRIGHT), "serve"], env=server_env, log=log, cwd=workdir) as process:
        http_base = f"http://{LOOPBACK}:{http_port}"
        https_base = f"https://{LOOPBACK}:{https_port}"
        wait_until(lambda: answers(http_base + "/healthz"), "/healthz", process, log)
        wait_until(
            lambda: answers(https_base + "/acme/directory", cafile=root), "HTTPS", process, log
        )
        yield Served(config, config.parent, http_base, https_base, root, log, env)


def eventually(ready: Callable[[], bool], what: str, log: Path, timeout: float = 90) -> None:
    """Poll `ready` until it holds; fail with the server's log after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s\n{log_tail(log)}")
        time.sleep(0.2)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310  # loopback
        body: bytes = response.read()
        return body.decode()


def _ocsp_post(base: str, certificate: x509.Certificate, issuer: x509.Certificate) -> bytes:
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(certificate, issuer, hashes.SHA1())  # noqa: S303  # RFC 5019 default
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    http_request = urllib.request.Request(  # noqa: S310  # loopback
        base + "/ocsp",
        data=request,
        headers={"Content-Type": "application/ocsp-request"},
        method="POST",
    )
    with urllib.request.urlopen(http_request, timeout=10) as response:  # noqa: S310
        body: bytes = response.read()
        return body


@pytest.mark.slow
def test_multiprocess_metrics_through_serve(tmp_path: Path) -> None:
    with serve(tmp_path, workers=2) as served:
        # A certificate expiring in 5 days, issued by the CLI (the database gauges see it).
        record = json.loads(
            served.cli(
                "issue",
                "--name",
                "soon.test",
                "--days",
                "5",
                "--json",
                "--out-dir",
                str(tmp_path / "soon"),
            )
        )
        issuer_id = record["issuer"]
        certificate = x509.load_pem_x509_certificate((tmp_path / "soon" / "cert.pem").read_bytes())
        issuer = x509.load_pem_x509_certificate((tmp_path / "soon" / "chain.pem").read_bytes())
        answer = ocsp.load_der_ocsp_response(_ocsp_post(served.http_base, certificate, issuer))
        assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
        _ocsp_post(served.http_base, certificate, issuer)

        # The jobs process signs the CRLs at start; wait for their age to be reported.
        def crl_reported() -> bool:
            text = _get(served.http_base + "/metrics")
            return any(
                name == "certwright_crl_age_seconds" and dict(labels).get("issuer") == issuer_id
                for name, labels in samples(text)
            )

        eventually(crl_reported, "CRL age in /metrics", served.log)

        # Every scrape, whichever worker answers it, shows every process's values.
        scrapes = [_get(served.http_base + "/metrics") for _ in range(6)]
        for text in scrapes:
            # The HTTPS listener's own certificate was issued in the maker process, which
            # has exited: its count survives it.
            assert (
                value(
                    text,
                    "certwright_certificates_issued_total",
                    issuer=issuer_id,
                    profile="tls-server",
                )
                >= 1
            )
            assert (
                value(text, "certwright_ocsp_requests_total", method="POST", outcome="answered")
                == 2
            )
            assert value(text, "certwright_ocsp_request_seconds_count", method="POST") == 2
            assert value(text, "certwright_certificates_expiring", within_days="7") >= 1
        metrics_dir = served.data_dir / "metrics"
        pids = {p.stem.rsplit("_", 1)[-1] for p in metrics_dir.glob("*.db")}
        assert len(pids) >= 2, sorted(metrics_dir.iterdir())
