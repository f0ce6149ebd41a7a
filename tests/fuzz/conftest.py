"""Property-based fuzzing of hostile input (issue #6 point 4): settings and shared fixtures.

How many inputs each target gets comes from ``CERTWRIGHT_FUZZ_EXAMPLES``:

* unset, or 2000: the CI smoke mode, part of the normal ``pytest`` run. It is
  **derandomized**: hypothesis derives its seed from each test function, so every CI run tries
  the same 2,000 inputs per target and a red build is reproducible on any machine by running
  the same test again (no flaky CI, no example database to carry between runs).
* anything larger (``CERTWRIGHT_FUZZ_EXAMPLES=100000 .venv/bin/pytest tests/fuzz``): the full
  mode. It is randomized, so each full run explores inputs the smoke mode never sees; a
  failure prints hypothesis's reproduction blob (``print_blob``), and the shrunk input is
  then pinned with ``@example(...)`` as a regression case.

Every target, the HTTP-level ones included, gets the full count; the small targeted tests
that pin regressions (``@example``) run 5 % of it on top (``fuzz_settings(smoke_share=...)``).
The smoke mode takes under 2 minutes in all. 100,000 inputs take ~8-13 minutes per
direct-parser target; for the HTTP-level ones pick a count that fits (``-k`` and a smaller
CERTWRIGHT_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from ca.issuance import CertificateAuthority
from ca.profiles import load_profiles
from ca.storage import Storage
from tests.conftest import BASE_URL, SessionPKI

EXAMPLES_ENV = "CERTWRIGHT_FUZZ_EXAMPLES"
SMOKE_EXAMPLES = 2000
EXAMPLES = int(os.environ.get(EXAMPLES_ENV) or SMOKE_EXAMPLES)
FULL = EXAMPLES > SMOKE_EXAMPLES
PROFILE = "certwright-fuzz-full" if FULL else "certwright-fuzz-smoke"

_COMMON: dict[str, Any] = {
    "deadline": None,  # SoftHSM signatures and database commits vary; time is not a property
    "database": None,  # nothing written under .hypothesis/ by CI runs
    "print_blob": True,
    # Module-scoped fixtures (a real app, token and database) are shared on purpose, and big
    # nested inputs are the point of the exercise.
    "suppress_health_check": list(HealthCheck),
}
settings.register_profile(
    "certwright-fuzz-smoke", max_examples=SMOKE_EXAMPLES, derandomize=True, **_COMMON
)
settings.register_profile(
    "certwright-fuzz-full", max_examples=EXAMPLES, derandomize=False, **_COMMON
)


def fuzz_settings(smoke_share: float = 1.0) -> settings:
    """The profile chosen by CERTWRIGHT_FUZZ_EXAMPLES; in smoke mode only ``smoke_share`` of
    the examples. Not loaded globally: other hypothesis tests keep their own settings."""
    examples = EXAMPLES if FULL else max(1, int(EXAMPLES * smoke_share))
    return settings(settings.get_profile(PROFILE), max_examples=examples)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"fuzz: property-based fuzzing of hostile input ({EXAMPLES_ENV} examples)"
    )


@pytest.fixture(scope="module")
def fuzz_storage(pki: SessionPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    """One SQLite database per fuzz module (a fresh one per example would dominate the time)."""
    directory: Path = tmp_path_factory.mktemp("fuzzdb")
    store = Storage(f"sqlite:///{directory / 'ca.db'}")
    store.migrate()
    for record in pki.issuers:
        store.add_issuer(record)
    yield store
    store.dispose()


@pytest.fixture(scope="module")
def fuzz_authority(fuzz_storage: Storage, pki: SessionPKI) -> CertificateAuthority:
    return CertificateAuthority(
        fuzz_storage,
        pki.online,
        load_profiles({}),
        public_base_url=BASE_URL,
        crl_shards=16,
        default_issuer="issuing-ec",
    )
