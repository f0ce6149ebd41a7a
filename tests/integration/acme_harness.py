"""Real ACME servers and clients on loopback, for the interop tests and `scripts/bench acme`.

Every process runs in a process group of its own, on loopback ports picked at random, and its
context manager stops the whole group on the way out, whatever happened inside. A process that
dies or never becomes ready raises `ProcessFailed` carrying the tail of its log.

- `challtestsrv()`: pebble-challtestsrv as the test DNS server. It answers every A query with
  127.0.0.1 (and no AAAA, so validators never try an address nobody listens on) and serves the
  TXT records the dns-01 hooks set through its management API.
- `pebble_server()`: Pebble, with a listener certificate from a throw-away CA made here, its
  validation ports pointed at the ports the clients listen on, and its randomness turned off.
- `certwright_server()`: `certwright init` + `certwright serve`, the ports and the DNS resolver
  overridden through `CERTWRIGHT_<SECTION>__<KEY>` variables (DESIGN.md §4).
- `Certbot`, `Lego`: the Debian packages' programs, trusting the server through their own
  variables (REQUESTS_CA_BUNDLE, LEGO_CA_CERTIFICATES), never through an insecure flag.

Nothing here imports pytest, so the benchmark script uses the same servers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent
CERTWRIGHT = VENV_BIN / "certwright"
CLIENT_TIMEOUT = 180.0
READY_TIMEOUT = 60.0
CONTACT = "a@b.test"

Challenge = Literal["http-01", "dns-01", "tls-alpn-01"]


class ProcessFailed(RuntimeError):
    """A server that died or never became ready, or a client that exited non-zero."""


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any CERTWRIGHT_* or client trust variables."""
    dropped = ("CERTWRIGHT_", "LEGO_", "REQUESTS_CA_BUNDLE", "SSL_CERT_", "CURL_CA_BUNDLE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(extra)
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process's whole group, SIGKILL it after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)
    # Children (gunicorn workers) can outlive a leader that exited first.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def running(
    argv: Sequence[str], *, env: dict[str, str], log: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `argv` in a new process group with output to `log`; stop the group on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop_process_group(process)


def wait_until(
    ready: Callable[[], bool],
    what: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float = READY_TIMEOUT,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ProcessFailed(
                f"{what}: the process exited with {process.returncode}\n{log_tail(log)}"
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise ProcessFailed(f"{what}: not ready after {timeout:.0f} s\n{log_tail(log)}")
        time.sleep(0.1)


def http_get(url: str, *, cafile: Path | None = None, timeout: float = 5.0) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310  # fixed loopback URLs
        body: bytes = response.read()
        return body


def answers(url: str, *, cafile: Path | None = None) -> bool:
    """True when `url` answers 2xx (TLS checked against `cafile`)."""
    try:
        http_get(url, cafile=cafile, timeout=2.0)
    except urllib.error.HTTPError as error:
        error.close()  # it holds the response's socket
        return False
    except OSError:  # URLError included
        return False
    return True


# -- the test DNS server -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChallTestSrv:
    """pebble-challtestsrv: A records default to 127.0.0.1; TXT records set per test."""

    dns_address: str  # host:port, UDP and TCP
    management_url: str

    def _post(self, path: str, body: dict[str, object]) -> None:
        url = self.management_url + path  # http://127.0.0.1:<port>, made by challtestsrv()
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            response.read()

    def set_txt(self, host: str, value: str) -> None:
        self._post("/set-txt", {"host": _fqdn(host), "value": value})

    def clear_txt(self, host: str) -> None:
        self._post("/clear-txt", {"host": _fqdn(host)})

    def add_a(self, host: str, addresses: Sequence[str] = (LOOPBACK,)) -> None:
        self._post("/add-a", {"host": _fqdn(host), "addresses": list(addresses)})


def _fqdn(host: str) -> str:
    return host if host.endswith(".") else host + "."


@contextlib.contextmanager
def challtestsrv(workdir: Path) -> Iterator[ChallTestSrv]:
    dns_port, management_port = free_port(), free_port()
    log = workdir / "challtestsrv.log"
    argv = [
        "pebble-challtestsrv",
        "-dns01", f"{LOOPBACK}:{dns_port}",
        "-management", f"{LOOPBACK}:{management_port}",
        "-defaultIPv4", LOOPBACK,
        "-defaultIPv6", "",
        # Its own challenge responders stay off: the clients under test answer challenges.
        "-http01", "",
        "-https01", "",
        "-tlsalpn01", "",
    ]  # fmt: skip
    with running(argv, env=clean_env(), log=log) as process:
        management = f"http://{LOOPBACK}:{management_port}"

        def ready() -> bool:
            # Any HTTP answer (404 included) means the management server is up.
            try:
                http_get(management + "/", timeout=1.0)
            except urllib.error.HTTPError as error:
                error.close()
                return True
            except OSError:
                return False
            return True

        wait_until(ready, "pebble-challtestsrv", process, log)
        yield ChallTestSrv(f"{LOOPBACK}:{dns_port}", management)


# -- ACME servers ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AcmeServer:
    """A running ACME server and what a client needs to use and check it."""

    kind: Literal["pebble", "certwright"]
    directory_url: str
    tls_trust: Path  # anchors the ACME endpoint's own HTTPS certificate
    issuing_root: Path  # the root every issued chain must verify to
    http01_port: int  # where the server's validator connects for http-01
    tlsalpn01_port: int  # ... and for tls-alpn-01
    dns: ChallTestSrv
    workdir: Path
    log: Path  # the server's own output, shown when a client fails
    config: Path | None = None  # certwright's configuration file
    management_url: str | None = None  # Pebble's management interface
    http_base_url: str | None = None  # certwright's plain-HTTP listener
    process_group: int | None = None  # the server's processes (benchmarks count their CPU)

    def certificate_status(self, serial: int) -> str:
        """The server's own record of a certificate: "valid"/"issued", "revoked", ..."""
        if self.kind == "certwright":
            assert self.config is not None
            result = subprocess.run(
                [str(CERTWRIGHT), "show", f"{serial:x}", "--json"],
                env=clean_env(CERTWRIGHT_CONFIG=str(self.config)),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if result.returncode != 0:
                raise ProcessFailed(f"certwright show {serial:x}: {result.stderr.strip()}")
            status: str = json.loads(result.stdout)["status"]
            return status
        assert self.management_url is not None
        body = http_get(
            f"{self.management_url}/cert-status-by-serial/{serial:x}", cafile=self.tls_trust
        )
        pebble_status: str = json.loads(body)["Status"]
        return pebble_status.lower()


def write_listener_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a 127.0.0.1/localhost server certificate for Pebble's listener.

    Returns (ca.pem, cert.pem, key.pem). Made fresh per run: nothing to trust outside the test.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "throw-away Pebble listener CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].chmod(0o600)
    return paths


@contextlib.contextmanager
def pebble_server(workdir: Path, dns: ChallTestSrv) -> Iterator[AcmeServer]:
    workdir.mkdir(parents=True, exist_ok=True)
    ca_pem, cert_pem, key_pem = write_listener_certificate(workdir / "listener")
    acme_port, management_port = free_port(), free_port()
    http01_port, tlsalpn01_port = free_port(), free_port()
    config = workdir / "pebble-config.json"
    config.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"{LOOPBACK}:{acme_port}",
                    "managementListenAddress": f"{LOOPBACK}:{management_port}",
                    "certificate": str(cert_pem),
                    "privateKey": str(key_pem),
                    "httpPort": http01_port,
                    "tlsPort": tlsalpn01_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            }
        )
    )
    env = clean_env(
        PEBBLE_VA_NOSLEEP="1",  # validate at once instead of after a random 0-15 s
        PEBBLE_WFE_NONCEREJECT="0",  # no random badNonce: tests must be deterministic
        PEBBLE_AUTHZREUSE="0",  # every order validates for real, as certwright's must
    )
    argv = ["pebble", "-config", str(config), "-dnsserver", dns.dns_address]
    log = workdir / "pebble.log"
    with running(argv, env=env, log=log, cwd=workdir) as process:
        directory = f"https://{LOOPBACK}:{acme_port}/dir"
        management = f"https://{LOOPBACK}:{management_port}"
        wait_until(lambda: answers(directory, cafile=ca_pem), "pebble", process, log)
        # Pebble makes a new root at every start; issued chains verify to it.
        root = workdir / "pebble-root.pem"
        root.write_bytes(http_get(management + "/roots/0", cafile=ca_pem))
        yield AcmeServer(
            kind="pebble",
            directory_url=directory,
            tls_trust=ca_pem,
            issuing_root=root,
            http01_port=http01_port,
            tlsalpn01_port=tlsalpn01_port,
            dns=dns,
            workdir=workdir,
            log=log,
            management_url=management,
            process_group=process.pid,
        )


def certwright_init(data_dir: Path, http_port: int, **env: str) -> Path:
    """`certwright init`: a demo CA in `data_dir` whose URLs name our plain-HTTP port; `env`
    adds settings (e.g. CERTWRIGHT_DATABASE__URL for a demo on PostgreSQL)."""
    result = subprocess.run(
        [
            str(CERTWRIGHT),
            "init",
            "--data-dir",
            str(data_dir),
            "--base-url",
            f"http://{LOOPBACK}:{http_port}",
        ],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if result.returncode != 0:
        raise ProcessFailed(f"certwright init: {result.stderr.strip()}")
    return data_dir / "certwright.toml"


@contextlib.contextmanager
def certwright_server(
    workdir: Path, dns: ChallTestSrv, *, workers: int = 2, extra_env: dict[str, str] | None = None
) -> Iterator[AcmeServer]:
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, https_port = free_port(), free_port()
    http01_port, tlsalpn01_port = free_port(), free_port()
    config = certwright_init(workdir / "data", http_port)
    root = config.parent / "root.pem"
    env = clean_env(
        CERTWRIGHT_CONFIG=str(config),
        CERTWRIGHT_SERVER__HTTP_LISTEN=f"{LOOPBACK}:{http_port}",
        CERTWRIGHT_SERVER__HTTPS_LISTEN=f"{LOOPBACK}:{https_port}",
        CERTWRIGHT_SERVER__WORKERS=str(workers),
        CERTWRIGHT_ACME__HTTP01_PORT=str(http01_port),
        CERTWRIGHT_ACME__TLSALPN01_PORT=str(tlsalpn01_port),
        CERTWRIGHT_ACME__DNS_RESOLVER=dns.dns_address,
        **(extra_env or {}),
    )
    log = workdir / "certwright-serve.log"
    with running([str(CERTWRIGHT), "serve"], env=env, log=log, cwd=workdir) as process:
        http_base = f"http://{LOOPBACK}:{http_port}"
        directory = f"https://{LOOPBACK}:{https_port}/acme/directory"
        wait_until(lambda: answers(http_base + "/healthz"), "certwright /healthz", process, log)
        wait_until(
            lambda: answers(directory, cafile=root), "certwright ACME directory", process, log
        )
        yield AcmeServer(
            kind="certwright",
            directory_url=directory,
            tls_trust=root,
            issuing_root=root,
            http01_port=http01_port,
            tlsalpn01_port=tlsalpn01_port,
            dns=dns,
            workdir=workdir,
            log=log,
            config=config,
            http_base_url=http_base,
            process_group=process.pid,
        )


# -- what a client hands back, and how it is checked -------------------------------------------


def load_pem_chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


@dataclasses.dataclass(frozen=True)
class IssuedCertificate:
    """One certificate a client obtained: leaf, the chain it was served with, its key."""

    leaf: Path  # PEM, the end-entity certificate only
    chain: Path  # PEM, the intermediates the server sent after it
    key: Path

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.leaf.read_bytes())

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def names(self) -> set[str]:
        san = self.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return {str(n) for n in san.value.get_values_for_type(x509.DNSName)} | {
            str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)
        }


def split_bundle(bundle: Path, out_dir: Path) -> tuple[Path, Path]:
    """A leaf-first PEM bundle as (leaf.pem, chain.pem) in `out_dir`."""
    certificates = load_pem_chain(bundle)
    if not certificates:
        raise ProcessFailed(f"{bundle}: no certificate")
    out_dir.mkdir(parents=True, exist_ok=True)
    leaf, chain = out_dir / "leaf.pem", out_dir / "chain.pem"
    pem = serialization.Encoding.PEM
    leaf.write_bytes(certificates[0].public_bytes(pem))
    chain.write_bytes(b"".join(c.public_bytes(pem) for c in certificates[1:]))
    return leaf, chain


def openssl_verify(root: Path, issued: IssuedCertificate) -> subprocess.CompletedProcess[str]:
    """`openssl verify` of the leaf against the root, with the served chain as untrusted."""
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(root),
            "-untrusted",
            str(issued.chain),
            "-purpose",
            "sslserver",
            str(issued.leaf),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@dataclasses.dataclass(frozen=True)
class LintFinding:
    code: str
    message: str
    node_path: str

    def __str__(self) -> str:
        return f"{self.code} at {self.node_path}: {self.message}"


def pkilint_findings(path: Path) -> list[LintFinding]:
    """pkilint's ERROR-or-worse findings on a PEM certificate (empty: clean)."""
    result = subprocess.run(
        [str(VENV_BIN / "lint_pkix_cert"), "lint", "-s", "ERROR", "-f", "JSON", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # lint_pkix_cert exits 0 when clean and non-zero with findings; anything unparsable is a
    # crash, never a pass.
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise ProcessFailed(
            f"lint_pkix_cert {path} exited {result.returncode}: {result.stdout}{result.stderr}"
        ) from None
    findings = [
        LintFinding(finding["code"], finding["message"], entry["node_path"])
        for entry in report["results"]
        for finding in entry["finding_descriptions"]
    ]
    if bool(findings) != (result.returncode != 0):
        raise ProcessFailed(f"lint_pkix_cert {path}: exit {result.returncode} but {findings}")
    return findings


# -- the clients -------------------------------------------------------------------------------

# One hook for both clients' dns-01: lego's `exec` provider calls it as
# `hook present|cleanup FQDN VALUE`; certbot's --manual hooks as `hook auth|cleanup` with
# CERTBOT_DOMAIN and CERTBOT_VALIDATION in the environment.
_DNS_HOOK = '''\
#!{python}
"""dns-01 hook: sets and clears _acme-challenge TXT records in pebble-challtestsrv."""
import json, os, sys, urllib.request

management = os.environ["CHALLTESTSRV_MANAGEMENT"]
if len(sys.argv) >= 4:
    action, fqdn, value = sys.argv[1], sys.argv[2], sys.argv[3]
else:
    action = sys.argv[1]
    fqdn = "_acme-challenge." + os.environ["CERTBOT_DOMAIN"] + "."
    value = os.environ.get("CERTBOT_VALIDATION", "")
if not fqdn.endswith("."):
    fqdn += "."
if action in ("present", "auth"):
    path, body = "/set-txt", {{"host": fqdn, "value": value}}
else:
    path, body = "/clear-txt", {{"host": fqdn}}
request = urllib.request.Request(management + path, data=json.dumps(body).encode(), method="POST")
urllib.request.urlopen(request, timeout=5).read()
'''


def write_dns_hook(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    hook = directory / "dns01-hook.py"
    hook.write_text(_DNS_HOOK.format(python=sys.executable))
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    return hook


def _run_client(
    argv: Sequence[str],
    env: dict[str, str],
    what: str,
    server: AcmeServer,
    logs: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv),
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        detail = f"\n--- client log ---\n{log_tail(logs, 60)}" if logs else ""
        detail += f"\n--- {server.kind} log ---\n{log_tail(server.log, 30)}"
        raise ProcessFailed(
            f"{what} exited {result.returncode}\n$ {' '.join(argv)}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
            f"{detail}"
        )
    return result


def _cert_name(names: Sequence[str]) -> str:
    return names[0].replace("*", "wildcard")


class Certbot:
    """certbot 2.x (Debian), one config/work/logs directory per instance, one account."""

    def __init__(self, server: AcmeServer, workdir: Path) -> None:
        self.server = server
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.hook = write_dns_hook(workdir)

    def _env(self) -> dict[str, str]:
        return clean_env(
            REQUESTS_CA_BUNDLE=str(self.server.tls_trust),
            CHALLTESTSRV_MANAGEMENT=self.server.dns.management_url,
        )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [
            shutil.which("certbot") or "certbot",
            *args,
            "--server",
            self.server.directory_url,
            "--config-dir",
            str(self.workdir / "config"),
            "--work-dir",
            str(self.workdir / "work"),
            "--logs-dir",
            str(self.workdir / "logs"),
            "--non-interactive",
        ]
        return _run_client(
            argv,
            self._env(),
            f"certbot {args[0]}",
            self.server,
            self.workdir / "logs" / "letsencrypt.log",
        )

    def _challenge_args(self, challenge: Challenge) -> list[str]:
        if challenge == "http-01":
            return [
                "--standalone",
                "--preferred-challenges",
                "http-01",
                "--http-01-address",
                LOOPBACK,
                "--http-01-port",
                str(self.server.http01_port),
            ]
        if challenge == "dns-01":
            return [
                "--manual",
                "--preferred-challenges",
                "dns-01",
                "--manual-auth-hook",
                f"{self.hook} auth",
                "--manual-cleanup-hook",
                f"{self.hook} cleanup",
            ]
        raise ValueError(f"certbot 2.1 has no {challenge} authenticator")

    def issued(self, cert_name: str) -> IssuedCertificate:
        live = self.workdir / "config" / "live" / cert_name
        return IssuedCertificate(live / "cert.pem", live / "chain.pem", live / "privkey.pem")

    def certonly(
        self, names: Sequence[str], challenge: Challenge, cert_name: str
    ) -> IssuedCertificate:
        domains = [arg for name in names for arg in ("-d", name)]
        self.run(
            "certonly",
            *self._challenge_args(challenge),
            *domains,
            "--cert-name",
            cert_name,
            "--agree-tos",
            "-m",
            CONTACT,
            "--no-eff-email",
        )
        return self.issued(cert_name)

    def obtain(self, names: Sequence[str], challenge: Challenge) -> IssuedCertificate:
        return self.certonly(names, challenge, cert_name=_cert_name(names))

    def renew(self, names: Sequence[str], challenge: Challenge) -> IssuedCertificate:
        """A forced renewal of the lineage `obtain(names, ...)` made, as its renewal conf says."""
        cert_name = _cert_name(names)
        # Without --no-random-sleep-on-renew a non-interactive renew sleeps up to 8 minutes.
        self.run(
            "renew",
            "--cert-name",
            cert_name,
            "--force-renewal",
            "--no-random-sleep-on-renew",
        )
        return self.issued(cert_name)

    def revoke(self, issued: IssuedCertificate, *, reason: str, with_certificate_key: bool) -> None:
        """revokeCert signed by the account key, or by the certificate's own key (§7.6)."""
        key_args = ["--key-path", str(issued.key)] if with_certificate_key else []
        self.run(
            "revoke",
            "--cert-path",
            str(issued.leaf),
            *key_args,
            "--reason",
            reason,
            "--no-delete-after-revoke",
        )


class Lego:
    """lego 4.x (Debian), one --path (account + certificates) per instance."""

    def __init__(self, server: AcmeServer, workdir: Path) -> None:
        self.server = server
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.hook = write_dns_hook(workdir)

    def _env(self) -> dict[str, str]:
        return clean_env(
            LEGO_CA_CERTIFICATES=str(self.server.tls_trust),
            CHALLTESTSRV_MANAGEMENT=self.server.dns.management_url,
            EXEC_PATH=str(self.hook),
            EXEC_PROPAGATION_TIMEOUT="30",
            EXEC_POLLING_INTERVAL="1",
            # The exec provider solves names one after another, 60 s apart unless told.
            EXEC_SEQUENCE_INTERVAL="1",
        )

    def _challenge_args(self, challenge: Challenge) -> list[str]:
        if challenge == "http-01":
            return ["--http", "--http.port", f"{LOOPBACK}:{self.server.http01_port}"]
        if challenge == "tls-alpn-01":
            return ["--tls", "--tls.port", f"{LOOPBACK}:{self.server.tlsalpn01_port}"]
        # The exec provider calls our hook; lego then checks the TXT record through the test
        # DNS server only (--dns.resolvers), not through "authoritative" servers it would look
        # up from SOA records the test DNS server does not serve (--dns.disable-cp).
        return ["--dns", "exec", "--dns.resolvers", self.server.dns.dns_address, "--dns.disable-cp"]

    def run(
        self, names: Sequence[str], challenge: Challenge, command: str, *command_args: str
    ) -> subprocess.CompletedProcess[str]:
        argv = [
            shutil.which("lego") or "lego",
            "--server",
            self.server.directory_url,
            "--email",
            CONTACT,
            "--accept-tos",
            "--path",
            str(self.workdir / "lego"),
            *self._challenge_args(challenge),
            *(arg for name in names for arg in ("--domains", name)),
            command,
            *command_args,
        ]
        return _run_client(argv, self._env(), f"lego {command}", self.server)

    def issued(self, names: Sequence[str]) -> IssuedCertificate:
        # lego names its files after the first domain, "*" written as "_".
        stem = names[0].replace("*", "_")
        certificates = self.workdir / "lego" / "certificates"
        leaf, chain = split_bundle(certificates / f"{stem}.crt", self.workdir / "split" / stem)
        return IssuedCertificate(leaf, chain, certificates / f"{stem}.key")

    def obtain(self, names: Sequence[str], challenge: Challenge) -> IssuedCertificate:
        self.run(names, challenge, "run")
        return self.issued(names)

    def renew(self, names: Sequence[str], challenge: Challenge) -> IssuedCertificate:
        # Renew when fewer than 100 years are left: now (Pebble's certificates last 5 years).
        self.run(names, challenge, "renew", "--days", "36500", "--no-random-sleep")
        return self.issued(names)

    def revoke(self, names: Sequence[str], *, reason: int = 0) -> None:
        """revokeCert signed by the account key (lego's only way)."""
        self.run(names, "http-01", "revoke", "--keep", "--reason", str(reason))
