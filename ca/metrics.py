"""Prometheus metrics (prometheus-client) and `GET /metrics` on the plain-HTTP listener.

Events are counted where they happen, by the process they happen in: issuance and HSM signing
(ca/issuance.py), ACME validations (acme/validation.py), OCSP requests (ocsp/web.py). `serve`
runs several gunicorn workers and a jobs process, so it turns on prometheus-client's
multiprocess mode (`enable_multiprocess`) before any of them starts: each process writes its
values to memory-mapped files in one directory and a scrape sums them. Every metric here has
labels, so no value exists before the first `labels()` call and the mode can still be switched
after this module is imported.

Two families are facts about the database rather than events: certificates expiring within
7/30 days and the age of the newest CRL per issuer and shard. `DatabaseCollector` computes them
at scrape time from indexed queries and keeps the result for `CACHE_SECONDS`, so scrapes stay
cheap with a million certificates.
"""

from __future__ import annotations

import datetime
import functools
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from ca.errors import CAError

if TYPE_CHECKING:
    from flask import Blueprint

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CACHE_SECONDS = 15.0
EXPIRY_WINDOWS_DAYS = (7, 30)
# HSM signatures take milliseconds (SoftHSM EC) to a second (a busy network HSM).
_SIGN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# OCSP answers from the pre-signed store take tens of microseconds; signing on demand, ms.
_OCSP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0)

ISSUED = Counter(
    "certwright_certificates_issued",
    "Certificates issued, by issuer and profile.",
    ["issuer", "profile"],
)
REFUSED = Counter(
    "certwright_issuance_refusals",
    "Issuance requests refused by policy, by the rule that refused them.",
    ["rule"],
)
LINT_REFUSED = Counter(
    "certwright_lint_refusals",
    "Certificates refused by the pre-issuance lint (pkilint ERROR), by profile.",
    ["profile"],
)
HSM_SIGN_SECONDS = Histogram(
    "certwright_hsm_sign_seconds",
    "Time the HSM took to sign a certificate, by issuer.",
    ["issuer"],
    buckets=_SIGN_BUCKETS,
)
ACME_VALIDATIONS = Counter(
    "certwright_acme_validations",
    "ACME challenge validations, by challenge type and outcome (valid or invalid).",
    ["type", "outcome"],
)
OCSP_REQUESTS = Counter(
    "certwright_ocsp_requests",
    "OCSP requests, by HTTP method and outcome (answered, malformed, unauthorized, "
    "try_later, internal_error).",
    ["method", "outcome"],
)
OCSP_SECONDS = Histogram(
    "certwright_ocsp_request_seconds",
    "Time to answer an OCSP request, by HTTP method.",
    ["method"],
    buckets=_OCSP_BUCKETS,
)


@functools.cache
def ocsp_series(method: str, outcome: str) -> tuple[Any, Any]:
    """The OCSP latency and request series for one method and outcome. Looked up once: a
    `labels()` call costs more than the observation itself, and OCSP answers are hot."""
    return OCSP_SECONDS.labels(method), OCSP_REQUESTS.labels(method, outcome)


# -- multiprocess mode -------------------------------------------------------------------------


def enable_multiprocess(directory: Path) -> None:
    """Use `directory`, emptied, for every process started from here on (and this one).

    Called by `serve` before any listener or worker starts: children inherit the environment
    variable (spawned ones import prometheus-client with it set), and forked gunicorn workers
    make their first values after the fork, in files named by their own pid."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(directory)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def multiprocess_directory() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn's `child_exit` hook: a dead worker's live gauges go (its counters stay, as
    Prometheus counters must not go down)."""
    directory = multiprocess_directory()
    if directory:
        multiprocess.mark_process_dead(worker.pid, directory)  # type: ignore[no-untyped-call]


# -- database facts, computed at scrape time ---------------------------------------------------


class DatabaseCollector(Collector):
    """Gauges read from the database: expiring certificates and CRL age, cached briefly."""

    def __init__(self, runtime: Any, ttl: float = CACHE_SECONDS) -> None:
        self._runtime = runtime
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cached: list[Metric] = []
        self._stamp = -float("inf")

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if time.monotonic() - self._stamp >= self._ttl:
                self._cached = self._compute()
                self._stamp = time.monotonic()
            return list(self._cached)

    def _compute(self) -> list[Metric]:
        from ca.storage.models import Certificate, Crl

        now: datetime.datetime = self._runtime.clock.now()
        expiring = GaugeMetricFamily(
            "certwright_certificates_expiring",
            "Issued, unrevoked certificates whose notAfter falls within the next N days.",
            labels=["within_days"],
        )
        crl_age = GaugeMetricFamily(
            "certwright_crl_age_seconds",
            "Seconds since thisUpdate of the newest CRL, by issuer and shard (-1: whole CRL).",
            labels=["issuer", "shard"],
        )
        up = GaugeMetricFamily(
            "certwright_database_metrics_up",
            "1 when the database gauges could be computed at the last refresh, else 0.",
        )
        try:
            with self._runtime.storage.transaction(durable=False) as session:
                for days in EXPIRY_WINDOWS_DAYS:
                    # Counted in ix_certificates_status_not_after alone (no table rows read):
                    # one index range per window, cheap at a million certificates.
                    count = session.scalar(
                        select(func.count())
                        .select_from(Certificate)
                        .where(
                            Certificate.status == "issued",
                            Certificate.not_after > now,
                            Certificate.not_after <= now + datetime.timedelta(days=days),
                        )
                    )
                    expiring.add_metric([str(days)], float(count or 0))
                rows = session.execute(
                    select(Crl.issuer_id, Crl.shard, func.max(Crl.this_update)).group_by(
                        Crl.issuer_id, Crl.shard
                    )
                )
                for issuer_id, shard, this_update in rows:
                    if this_update.tzinfo is None:  # an aggregate skips the column's type
                        this_update = this_update.replace(tzinfo=datetime.UTC)
                    age = (now - this_update).total_seconds()
                    crl_age.add_metric([issuer_id, str(shard)], max(0.0, age))
            up.add_metric([], 1.0)
        except CAError:
            up.add_metric([], 0.0)
        return [expiring, crl_age, up]


class _Combined(Collector):
    def __init__(self, *sources: Callable[[], Iterable[Metric]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            yield from source()


def exposition_registry(runtime: Any) -> CollectorRegistry:
    """What one scrape shows: every process's values (multiprocess mode) or this process's,
    plus the database gauges."""
    registry = CollectorRegistry(auto_describe=False)
    database = DatabaseCollector(runtime)
    directory = multiprocess_directory()
    if directory:
        events = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(events, directory)  # type: ignore[no-untyped-call]
        registry.register(_Combined(events.collect, database.collect))
    else:
        registry.register(_Combined(REGISTRY.collect, database.collect))
    return registry


def blueprint(runtime: Any) -> Blueprint:
    """`GET /metrics` on the plain-HTTP listener, when `metrics.enabled`."""
    # Imported here: the CLI imports this module (through issuance) and needs no web stack.
    from flask import Blueprint, Response, abort

    bp = Blueprint("metrics", __name__)
    bp.certwright_listener = "http"  # type: ignore[attr-defined]
    enabled = bool(runtime.config.get("metrics", "enabled"))
    registry: list[CollectorRegistry] = []

    @bp.get("/metrics")
    def metrics() -> Response:
        if not enabled:
            abort(404)
        if not registry:
            registry.append(exposition_registry(runtime))
        return Response(generate_latest(registry[0]), content_type=CONTENT_TYPE_LATEST)

    return bp
