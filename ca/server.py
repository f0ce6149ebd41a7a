"""`certwright serve`: the processes of a running CA.

- HTTPS listener (this process): gunicorn, ACME (RFC 8555 §6.1 requires HTTPS). Its
  certificate is issued by our own intermediate and renewed by the jobs process; each worker
  reloads it when the file changes, so renewal needs no restart.
- HTTP listener (a child process): gunicorn, OCSP, CRLs, issuer certificates, /healthz; on
  gunicorn's asyncio worker with keep-alive (`WsgiOverAsgi`), OCSP not access-logged.
- Jobs (a child process): periodic work — the server certificate's renewal and every task
  registered in the `certwright.jobs` entry point group (CRL and OCSP refresh, ACME upkeep).

Both listeners use gunicorn's asyncio worker where gunicorn has one (>= 25): it keeps
connections alive (one TLS handshake per ACME client, not per request) and parses in a third
of the sync worker's time, while still running the app one request at a time in one thread
per process, as DESIGN.md §6 asks of sync workers. Each worker is one process with its own
PKCS#11 session, opened after the fork; no process here touches the HSM before gunicorn forks:
the server certificate is made in a spawned child.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import gc
import importlib.metadata
import io
import logging
import multiprocessing
import os
import runpy
import signal
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]
from gunicorn.config import Config as GunicornConfig  # type: ignore[import-untyped]
from gunicorn.glogging import Logger  # type: ignore[import-untyped]
from gunicorn.workers import SUPPORTED_WORKERS  # type: ignore[import-untyped]

from ca import metrics, web
from ca.config import Config
from ca.errors import CAError, Kind
from ca.issuance import IssuanceRequest
from ca.policy import Identifier
from ca.runtime import Runtime

log = logging.getLogger("certwright.server")
JOBS_GROUP = "certwright.jobs"
JOB_INTERVAL_SECONDS = 30.0
ASGI_WORKER = "asgi" in SUPPORTED_WORKERS  # gunicorn >= 25


# What makes each listener what it is: a gunicorn configuration file cannot change these.
_LISTENER_SETTINGS = frozenset(
    {
        "bind",
        "certfile",
        "keyfile",
        "ssl_context",
        "worker_class",
        "threads",
        "logger_class",
        "preload_app",
        "child_exit",
        "asgi_lifespan",
        "control_socket_disable",
    }
)


def gunicorn_file_settings(path: Path) -> dict[str, Any]:
    """The settings of a gunicorn configuration file (`config/gunicorn.conf.py`, gunicorn's own
    Python format) that apply to both listeners: workers, timeouts, keep-alive, max_requests,
    logging and the like. Names gunicorn does not know are ignored, as gunicorn does; binds, TLS
    and worker classes stay certwright's. A file gunicorn would refuse is a CONFIG error."""
    try:
        values = runpy.run_path(str(path))
    except OSError as exc:
        raise CAError(Kind.CONFIG, f"cannot read {path}: {exc.strerror}") from None
    except Exception as exc:  # the file is code: any error in it is the operator's to fix
        raise CAError(Kind.CONFIG, f"{path}: {type(exc).__name__}: {exc}") from None
    check = GunicornConfig()
    settings = {}
    for key, value in values.items():
        if key in check.settings and key not in _LISTENER_SETTINGS:
            try:
                check.set(key, value)
            except Exception as exc:
                raise CAError(Kind.CONFIG, f"{path}: invalid {key}: {exc}") from None
            settings[key] = value
    return settings


class _Application(BaseApplication):  # type: ignore[misc]  # gunicorn ships no type hints
    def __init__(
        self,
        config: Config,
        listener: str,
        options: dict[str, Any],
        gunicorn_config: Path | None = None,
    ) -> None:
        self._config = config
        self._listener = listener
        self._options = options
        self._gunicorn_config = gunicorn_config
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)
        if self._gunicorn_config is not None:
            for key, value in gunicorn_file_settings(self._gunicorn_config).items():
                self.cfg.set(key, value)
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn >= 27 opens a control socket at one per-user path: two listeners (or
            # two servers on a host) would fight over it.
            self.cfg.set("control_socket_disable", True)

    def load(self) -> Any:
        # Runs in each worker after fork: the runtime, and with it the HSM session, is the
        # worker's own.
        # The HTTPS arbiter is the parent of the HTTP and jobs children; a worker forked from
        # it inherits that list, and multiprocessing's exit handler would try to join them in
        # the worker ("can only join a child process"). Forget them, as multiprocessing does
        # in the children it starts itself.
        getattr(multiprocessing.process, "_children", set()).clear()
        runtime = Runtime(self._config)
        app = web.create_app(runtime, self._listener)
        if self._listener == "https":
            try:
                runtime.authority.warm_up()  # the first certificate should not pay for it
            except CAError as exc:
                log.warning("warm-up failed (%s); serving anyway, /healthz says why", exc.detail)
        # The cyclic collector's youngest generation every 10,000 allocations, not 700: most of
        # a request's objects are freed by reference counting before a collection would see
        # them. Timed with gc.callbacks in both workers over 1,000 ACME certificates: 215 ms
        # of collections per worker at the default, 85 ms at 10,000 (each pause ~5 ms; 50,000
        # saved no more and paused for 100 ms).
        gc.set_threshold(10_000, 10, 10)
        if self._options.get("worker_class") == "asgi":
            return WsgiOverAsgi(app)
        return app


class WsgiOverAsgi:
    """A WSGI app served by gunicorn's asyncio worker (`asgi`, gunicorn >= 25), for both
    listeners: its parsing and keep-alive cost a third of the sync and gthread workers' per
    request, which is most of what a pre-signed OCSP answer costs. The WSGI app runs in the
    event loop's one thread, one call at a time per process, as in a sync worker (so its
    PKCS#11 session is never shared between threads, DESIGN.md §6); reading a request body,
    writing a response and a deferred answer's wait (`ca.web.defer`) never block it."""

    max_body = 1 << 20  # the HTTP listener takes OCSP requests (< 4 KiB) and no uploads

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return  # no WebSocket here: gunicorn refuses the upgrade
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                await send({"type": "http.response.start", "status": 413, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
        environ = wsgi_environ(scope, b"".join(chunks))
        deferred: list[tuple[Any, float, Any]] = []
        environ[web.DEFER] = lambda *deferral: deferred.append(deferral)
        status, headers, body = self._call(environ)
        if deferred:
            # ca.web.defer: wait for the future here, serving other requests meanwhile, then
            # ask the app again; the first answer is never sent.
            future, timeout, resume = deferred[0]
            await asyncio.wait([asyncio.wrap_future(future)], timeout=timeout)
            del environ[web.DEFER]
            environ[web.RESUME] = resume
            status, headers, body = self._call(environ)
        await send(
            {
                "type": "http.response.start",
                "status": int(status[:3]),
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _call(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        """One synchronous call of the WSGI app: status, headers and the whole body."""
        started: list[Any] = []
        parts: list[bytes] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], Any]:
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return parts.append

        result = self.app(environ, start_response)
        try:
            parts.extend(part for part in result if part)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        return status, headers, b"".join(parts)


def wsgi_environ(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    """PEP 3333 environ for an ASGI HTTP scope (paths as latin-1 strings of their bytes)."""
    server = scope.get("server") or ("localhost", 80)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode().decode("latin-1"),
        "PATH_INFO": scope["path"].encode().decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1] or 80),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    client = scope.get("client")
    if client:
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = str(client[0]), str(client[1])
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        key = name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{name}"
        value = raw_value.decode("latin-1")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    if body or "CONTENT_LENGTH" in environ:
        environ["CONTENT_LENGTH"] = str(len(body))
    return environ


def _sent(resp: Any) -> Any:
    return getattr(resp, "sent", None)


def _micros(took: Any) -> int:
    return int(took.seconds * 1_000_000 + took.microseconds)


# gunicorn's atoms (`Logger.atoms`) by name: (logger, response, environ, request time) -> value.
_ATOMS: dict[str, Callable[[Any, Any, dict[str, Any], Any], Any]] = {
    "h": lambda log, resp, env, took: env.get("REMOTE_ADDR", "-"),
    "l": lambda log, resp, env, took: "-",
    "u": lambda log, resp, env, took: log._get_user(env) or "-",
    "t": lambda log, resp, env, took: log.now(),
    "r": lambda log, resp, env, took: (
        f"{env['REQUEST_METHOD']} {env['RAW_URI']} {env['SERVER_PROTOCOL']}"
    ),
    "s": lambda log, resp, env, took: (
        resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
    ),
    "m": lambda log, resp, env, took: env.get("REQUEST_METHOD"),
    "U": lambda log, resp, env, took: env.get("PATH_INFO"),
    "q": lambda log, resp, env, took: env.get("QUERY_STRING"),
    "H": lambda log, resp, env, took: env.get("SERVER_PROTOCOL"),
    "b": lambda log, resp, env, took: str(_sent(resp)) if _sent(resp) is not None else "-",
    "B": lambda log, resp, env, took: _sent(resp),
    "f": lambda log, resp, env, took: env.get("HTTP_REFERER", "-"),
    "a": lambda log, resp, env, took: env.get("HTTP_USER_AGENT", "-"),
    "T": lambda log, resp, env, took: took.seconds,
    "D": lambda log, resp, env, took: _micros(took),
    "M": lambda log, resp, env, took: _micros(took) // 1000,
    "L": lambda log, resp, env, took: f"{took.seconds}.{took.microseconds:06d}",
    "p": lambda log, resp, env, took: f"<{os.getpid()}>",
}


_ABSENT = object()


class _Atoms(dict):  # type: ignore[type-arg]
    """gunicorn's access-log atoms (`Logger.atoms` read through `SafeAtoms`), each worked out
    only when the format names it. gunicorn's own first copies every request header, response
    header and environ entry into a dict, for every request."""

    def __init__(self, log: Logger, resp: Any, req: Any, environ: dict[str, Any], took: Any):
        super().__init__()
        self._args = (log, resp, req, environ, took)

    def __getitem__(self, key: str) -> Any:
        value = self._value(key)
        if value is _ABSENT:
            return "-"
        return value.replace('"', '\\"') if isinstance(value, str) else value

    def _value(self, key: str) -> Any:
        log, resp, req, environ, took = self._args
        atom = _ATOMS.get(key)
        if atom is not None:
            return atom(log, resp, environ, took)
        if not (key.startswith("{") and key[-2:] in ("}i", "}o", "}e")):
            return _ABSENT
        name, kind = key[1:-2].lower(), key[-1]
        if kind == "e":
            pairs: Any = environ.items()
        else:  # as gunicorn reads them: a request's headers, or the request as a header list
            source = getattr(req, "headers", req) if kind == "i" else resp.headers
            pairs = source.items() if hasattr(source, "items") else source
        found: Any = _ABSENT
        for header, value in pairs:  # the last of repeated names wins, as in gunicorn's dict
            if header.lower() == name:
                found = value
        return found


class AccessLog(Logger):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's logger, with the access line made cheaper; its text is gunicorn's own.

    Timed inside the workers under `scripts/bench acme`'s load, an access line took ~0.19 ms of
    a worker's time and ~85 µs of its CPU per request, 65 µs of that in the `logging` record.
    gunicorn also collects every request header, response header and environ entry as atoms
    first (17 of a line's 30 µs in a microbenchmark). Here the atoms the format names are
    worked out on demand, and when the access log's handlers are the plain stream or file
    gunicorn made for `accesslog`, the line is written to them directly, under their lock (so
    a log reopen waits as it would for an `emit`). Any other set-up (syslog, `logconfig`,
    filters) goes gunicorn's way, record and all."""

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not getattr(self, "access_log_enabled", True):
            return
        streams = self._plain_streams()
        if streams is None:
            super().access(resp, req, environ, request_time)
            return
        try:
            line = self.cfg.access_log_format % _Atoms(self, resp, req, environ, request_time)
            for handler in streams:
                handler.acquire()
                try:
                    handler.stream.write(line + handler.terminator)
                    handler.flush()
                finally:
                    handler.release()
        except Exception:
            self.error(traceback.format_exc())

    def _plain_streams(self) -> list[logging.StreamHandler[Any]] | None:
        """The access log's handlers when they are gunicorn's own plain ones, else None."""
        log = self.access_log
        if log.filters or log.disabled or not log.isEnabledFor(logging.INFO) or log.propagate:
            return None
        handlers = log.handlers
        if not handlers:
            return None  # nothing to write to: gunicorn's path decides what that means
        for handler in handlers:
            if (
                type(handler) not in (logging.StreamHandler, logging.FileHandler)
                or not getattr(handler, "_gunicorn", False)
                or handler.filters
                or handler.level > logging.INFO
                or handler.stream is None
                or getattr(handler.formatter, "_fmt", None) != self.access_fmt
            ):
                return None
        return handlers  # type: ignore[no-any-return]


class _HttpLog(AccessLog):
    """The HTTP listener's log: OCSP requests are not access-logged (thousands a second, and a
    stdout line costs more than a pre-signed answer); CRLs, certificates and /healthz are."""

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not environ.get("PATH_INFO", "").startswith("/ocsp"):
            super().access(resp, req, environ, request_time)


CPU_AFFINITY = ("auto", "off")


def cpu_affinity_setting(config: Config) -> str:
    value = str(config.get("server", "cpu_affinity"))
    if value not in CPU_AFFINITY:
        raise CAError(Kind.CONFIG, f"server.cpu_affinity must be one of {', '.join(CPU_AFFINITY)}")
    return value


def _pick_cpu(allowed: set[int], taken: Iterable[int | None], workers: int) -> int | None:
    """The allowed CPU with the fewest live workers on it (the lowest of those); None when the
    listener has fewer workers than CPUs (the kernel has room to place them) or one CPU only."""
    if len(allowed) < 2 or workers < len(allowed):
        return None
    counts = collections.Counter(taken)
    return min(sorted(allowed), key=lambda cpu: counts[cpu])


def _pin_pre_fork(server: Any, worker: Any) -> None:
    """gunicorn's pre_fork (in the arbiter): choose the new worker's CPU among those this
    process may run on, away from the live workers (a replaced worker gets the CPU it left)."""
    taken = (getattr(w, "certwright_cpu", None) for w in server.WORKERS.values())
    worker.certwright_cpu = _pick_cpu(os.sched_getaffinity(0), taken, server.num_workers)


def _pin_post_fork(server: Any, worker: Any) -> None:
    """gunicorn's post_fork (in the new worker): run on the chosen CPU only."""
    cpu = getattr(worker, "certwright_cpu", None)
    if cpu is None:
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:  # the CPU went away (a cpuset changed): run where the kernel says
        log.warning("worker %s stays unpinned: %s", os.getpid(), exc)


def _gunicorn_options(
    listen: str, workers: int, listener: str = "https", cpu_affinity: str = "auto"
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bind": [listen],
        "workers": max(1, workers),
        "worker_class": "sync",
        "backlog": 2048,  # a small backlog drops SYNs under bursts, each costing a 1 s retry
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": "info",
        "logger_class": AccessLog,
        "timeout": 60,
        "preload_app": False,
        "child_exit": metrics.worker_exit,
    }
    if listener == "https" and ASGI_WORKER:
        # ACME clients send several requests in a row; with keep-alive they pay one TLS
        # handshake, not one per request. The asyncio worker runs the WSGI app one request at
        # a time per process, in one thread, as a sync worker does (PKCS#11, DESIGN.md §6).
        # Its loop is uvloop (a dependency; gunicorn's "auto" picks it): TLS and the loop in
        # C cut the server's CPU per ACME certificate by about a sixth (scripts/bench acme).
        options.update(keepalive=5, worker_class="asgi", asgi_lifespan="off")
    if listener == "http":
        # OCSP answers are small and cheap: the cost is gunicorn's own, per request and per
        # connection. The sync worker closes each connection and waits for the client's FIN
        # (RFC 9112 §9.6) before it accepts the next; the asyncio worker keeps connections
        # alive and parses in a third of the time (bench: ~2x the answers/s). Without it
        # (gunicorn < 25), gthread with one thread: keep-alive, and a PKCS#11 session that is
        # never shared between threads (DESIGN.md §6).
        options.update(keepalive=5, logger_class=_HttpLog)
        if ASGI_WORKER:
            options.update(worker_class="asgi", asgi_lifespan="off")
        else:
            options.update(worker_class="gthread", threads=1)
    if cpu_affinity == "auto":
        # A listener with a worker per CPU (or more) runs each on a CPU of its own. Left to the
        # kernel, a busy 2-core host runs both workers on one CPU at times while the other
        # idles (wake-up placement): under `scripts/bench acme` 12-16 % of the CPU time was
        # idle while the workers waited to run 27 % of theirs. Pinned, idle fell to 8-12 % and
        # the rate rose 9-35 % in five of five interleaved pairs. With fewer workers than CPUs
        # the kernel keeps placing them: it has room, and other services may pin too. The
        # worker's threads (ACME validations) share its CPU, as they share its interpreter lock.
        options.update(pre_fork=_pin_pre_fork, post_fork=_pin_post_fork)
    return options


# -- the server's own certificate ---------------------------------------------------------


def server_certificate_path(config: Config) -> Path:
    return config.data_dir / "tls" / "server.pem"


def _tls_names(config: Config, https_listen: str) -> list[str]:
    names = [str(n) for n in config.get("server", "tls_names")]
    host = https_listen.rsplit(":", 1)[0].strip("[]")
    if host and host not in names and host not in ("0.0.0.0", "::"):  # noqa: S104 - a comparison
        names.append(host)
    return names


def _needs_renewal(path: Path, now: datetime.datetime, names: list[str]) -> bool:
    try:
        chain = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return True
    leaf = chain[0]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    present = {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }
    # Renew with a third of the lifetime left, as ACME clients do by default.
    return leaf.not_valid_after_utc - now < lifetime / 3 or not set(names) <= present


def ensure_server_certificate(config: Config, https_listen: str) -> bool:
    """Issue (or renew) the HTTPS listener's certificate; True when a new one was written.

    The key is made here, in software: it protects a TLS listener, not a CA.
    """
    path = server_certificate_path(config)
    runtime = Runtime(config)
    try:
        names = _tls_names(config, https_listen)
        if not _needs_renewal(path, runtime.clock.now(), names):
            return False
        key = ec.generate_private_key(ec.SECP256R1())
        identifiers = []
        for name in names:
            try:
                import ipaddress

                ipaddress.ip_address(name)
                identifiers.append(Identifier("ip", name))
            except ValueError:
                identifiers.append(Identifier("dns", name))
        issued = runtime.authority.issue(
            IssuanceRequest(
                public_key=key.public_key(),
                identifiers=tuple(identifiers),
                profile="tls-server",
                owner="certwright",
                source="certwright:server",
            )
        )
        pem = (
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            + issued.fullchain_pem().encode()
        )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        # One file for key and chain, replaced atomically: a worker never reads a key of one
        # certificate with the chain of another.
        tmp.replace(path)
        log.info("server certificate %s issued for %s", issued.record.serial, ", ".join(names))
        return True
    finally:
        runtime.close()


TLS_RELOAD_CHECK_SECONDS = 1.0


class _ReloadingContext:
    """gunicorn's `ssl_context` hook: the same SSLContext on every call (the sync worker calls
    the hook per connection, the asgi worker once at start). Its `sni_callback`, which OpenSSL
    runs on every handshake, SNI or not, looks at the file's (mtime, inode) at most every
    `check_interval` seconds and moves the handshake to a context loaded from the new file;
    a file that fails to load keeps the previous certificate."""

    def __init__(self, path: Path, check_interval: float = TLS_RELOAD_CHECK_SECONDS) -> None:
        self._path = path
        self._check_interval = check_interval
        self._lock = threading.Lock()
        self._base: ssl.SSLContext | None = None
        self._current: ssl.SSLContext | None = None
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0

    def __call__(self, conf: Any, default_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        with self._lock:
            if self._base is None:
                # No previous certificate to fall back on: a failure here is an error.
                stamp = self._file_stamp()
                base = self._load()
                base.sni_callback = self._on_handshake
                self._base = self._current = base
                self._stamp, self._checked = stamp, time.monotonic()
            return self._base

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self._path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_ino)

    def _load(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile=str(self._path))
        return context

    def _newest(self) -> ssl.SSLContext | None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self._check_interval:
                self._checked = now
                stamp = self._file_stamp()
                if stamp is not None and stamp != self._stamp:
                    # Remember the stamp even on failure: one warning per file, not per check.
                    self._stamp = stamp
                    try:
                        self._current = self._load()
                    except (OSError, ssl.SSLError, ValueError) as exc:
                        log.warning("keeping the previous TLS certificate: %s: %s", self._path, exc)
            return self._current

    def _on_handshake(
        self, connection: ssl.SSLSocket | ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        try:
            newest = self._newest()
            if newest is not None and newest is not connection.context:
                connection.context = newest
        except Exception:  # an exception here would fail the handshake
            log.warning("TLS certificate reload failed", exc_info=True)


# -- jobs ----------------------------------------------------------------------------------


def _registered_jobs() -> list[tuple[str, Callable[[Runtime], Any]]]:
    jobs = []
    for entry in importlib.metadata.entry_points(group=JOBS_GROUP):
        jobs.append((entry.name, entry.load()))
    return jobs


def run_jobs_once(config: Config, https_listen: str, runtime: Runtime) -> None:
    """Every periodic task once; one task failing does not stop the others."""
    try:
        ensure_server_certificate(config, https_listen)
    except CAError as exc:
        log.error("server certificate renewal failed: %s", exc.detail)
    for name, job in _registered_jobs():
        try:
            job(runtime)
        except CAError as exc:
            log.error("job %s failed: %s", name, exc.detail)
        except Exception:
            log.exception("job %s failed", name)


def _jobs_main(config: Config, https_listen: str) -> None:
    logging.basicConfig(level=logging.INFO, format="[jobs] %(levelname)s %(message)s")
    runtime = Runtime(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.is_set():
        run_jobs_once(config, https_listen, runtime)
        stop.wait(JOB_INTERVAL_SECONDS)
    runtime.close()


def _http_main(
    config: Config,
    listen: str,
    workers: int,
    gunicorn_config: Path | None = None,
    cpu_affinity: str = "auto",
) -> None:
    options = _gunicorn_options(listen, workers, "http", cpu_affinity)
    _Application(config, "http", options, gunicorn_config).run()


def serve(
    config: Config,
    http_listen: str,
    https_listen: str,
    workers: int,
    gunicorn_config: Path | None = None,
) -> None:
    if gunicorn_config is not None:
        gunicorn_file_settings(gunicorn_config)  # a bad file fails here, in one line
    cpu_affinity = cpu_affinity_setting(config)  # and a bad setting here
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Before any process that counts starts: they all write to this (emptied) directory.
    metrics.enable_multiprocess(config.data_dir / "metrics")
    spawn = multiprocessing.get_context("spawn")
    maker = spawn.Process(target=ensure_server_certificate, args=(config, https_listen))
    maker.start()
    maker.join()
    path = server_certificate_path(config)
    if maker.exitcode != 0 or not path.exists():
        raise CAError(
            Kind.HSM,
            "could not issue the HTTPS listener's certificate (see the log above)",
        )
    children = [
        spawn.Process(
            target=_http_main,
            args=(config, http_listen, workers, gunicorn_config, cpu_affinity),
            name="http",
        ),
        spawn.Process(target=_jobs_main, args=(config, https_listen), name="jobs"),
    ]
    for child in children:
        child.start()
    print(
        f"certwright: ACME directory https://{https_listen}/acme/directory\n"
        f"certwright: OCSP, CRLs and issuer certificates on http://{http_listen}/\n"
        f"certwright: trust anchor {config.data_dir / 'root.pem'}",
        file=sys.stderr,
        flush=True,
    )
    options = _gunicorn_options(https_listen, workers, "https", cpu_affinity)
    options.update(certfile=str(path), keyfile=None, ssl_context=_ReloadingContext(path))
    arbiter = os.getpid()
    try:
        _Application(config, "https", options, gunicorn_config).run()
    finally:
        # gunicorn forks its workers inside run(): a worker leaving run() must not touch the
        # arbiter's children (it is not their parent).
        if os.getpid() == arbiter:
            _stop_children(children)


def _stop_children(children: list[Any]) -> None:
    for child in children:
        child.terminate()
    deadline = time.monotonic() + 10
    for child in children:
        child.join(max(0.1, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
