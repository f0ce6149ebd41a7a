"""Shared fixtures: real SoftHSM tokens in a temporary directory, a two-tier PKI made once per
session on them, and a fresh database per test on SQLite and (when available) PostgreSQL.

SoftHSM reads SOFTHSM2_CONF when the PKCS#11 module is first loaded, and a token created after
that is invisible to the process, so every token the in-process tests use is made here, before
anything loads the module. CLI tests run `certwright` as a subprocess with tokens of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca import ceremony, certs
from ca.config import DEFAULT_SOFTHSM_MODULE
from ca.demo import init_softhsm_token, write_softhsm_conf
from ca.hsm import KeySpec, Token
from ca.issuance import CertificateAuthority
from ca.profiles import load_profiles
from ca.storage import IssuerRecord, Storage
from scripts.pgdb import fresh_database

ROOT_TOKEN, ROOT_PIN = "test-root", "root-pin-0000"
ONLINE_TOKEN, ONLINE_PIN = "test-online", "online-pin-1111"
SPARE_TOKEN, SPARE_PIN = "test-spare", "spare-pin-2222"
BASE_URL = "http://ca.test:8080"
DATA = Path(__file__).parent / "data"
POSTGRES_ENV = "CERTWRIGHT_TEST_POSTGRES_URL"
VENV_BIN = Path(sys.executable).parent


@dataclasses.dataclass(frozen=True)
class SessionPKI:
    softhsm_conf: Path
    module: str
    root: ceremony.RootKey
    root_pem: Path
    issuers: tuple[IssuerRecord, ...]
    online: Token
    root_token: Token


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not Path(DEFAULT_SOFTHSM_MODULE).exists():
        pytest.fail("SoftHSM2 is not installed (apt-get install softhsm2): scripts/test does it")
    directory = tmp_path_factory.mktemp("softhsm")
    conf = write_softhsm_conf(directory)
    for label, pin in (
        (ROOT_TOKEN, ROOT_PIN),
        (ONLINE_TOKEN, ONLINE_PIN),
        (SPARE_TOKEN, SPARE_PIN),
    ):
        init_softhsm_token(conf, label, pin)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return conf


@pytest.fixture(scope="session")
def pki(softhsm: Path, tmp_path_factory: pytest.TempPathFactory) -> SessionPKI:
    """Root (P-384) and two intermediates (P-256, RSA-2048), made once on the session's tokens."""
    directory = tmp_path_factory.mktemp("pki")
    root_token = Token(DEFAULT_SOFTHSM_MODULE, ROOT_TOKEN, ROOT_PIN)
    online = Token(DEFAULT_SOFTHSM_MODULE, ONLINE_TOKEN, ONLINE_PIN)
    root = ceremony.create_root(
        root_token,
        key_label="root-key",
        spec=KeySpec.parse("ec-p384"),
        subject=certs.parse_name("CN=certwright test root,O=certwright tests"),
        validity=datetime.timedelta(days=3650),
        path_length=1,
    )
    root_pem = directory / "root.pem"
    from cryptography.hazmat.primitives import serialization

    root_pem.write_bytes(root.certificate.public_bytes(serialization.Encoding.PEM))
    storage = Storage(f"sqlite:///{directory / 'pki.db'}")
    storage.migrate()
    ceremony.register_root(storage, "root", root.certificate, "tests")
    for issuer_id, spec in (("issuing-ec", "ec-p256"), ("issuing-rsa", "rsa-2048")):
        ceremony.create_intermediate(
            storage,
            root,
            online,
            issuer_id=issuer_id,
            key_label=f"{issuer_id}-key",
            spec=KeySpec.parse(spec),
            subject=certs.parse_name(f"CN=certwright test {issuer_id},O=certwright tests"),
            validity=datetime.timedelta(days=1000),
            public_base_url=BASE_URL,
            actor="tests",
        )
    issuers = tuple(storage.list_issuers())
    storage.dispose()
    return SessionPKI(softhsm, DEFAULT_SOFTHSM_MODULE, root, root_pem, issuers, online, root_token)


def _postgres_admin_url() -> str | None:
    url = os.environ.get(POSTGRES_ENV)
    if not url and os.environ.get("CI"):
        pytest.fail(f"{POSTGRES_ENV} is not set in CI: PostgreSQL tests must run (scripts/test)")
    return url


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database on the test server, dropped afterwards."""
    admin = _postgres_admin_url()
    if not admin:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV} (scripts/test starts a server)")
    with fresh_database(admin) as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for one test, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ca.db'}"
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def storage(db_url: str, pki: SessionPKI) -> Iterator[Storage]:
    """A migrated database that knows the session's root and intermediates."""
    store = Storage(db_url)
    store.migrate()
    for record in pki.issuers:
        store.add_issuer(record)
    yield store
    store.dispose()


@pytest.fixture
def authority(storage: Storage, pki: SessionPKI) -> CertificateAuthority:
    return CertificateAuthority(
        storage,
        pki.online,
        load_profiles({}),
        public_base_url=BASE_URL,
        crl_shards=16,
        default_issuer="issuing-ec",
    )


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `certwright` console script in a subprocess."""
    # The session's SoftHSM configuration is the in-process tests'; a CLI subprocess uses the
    # one its own configuration names unless the caller passes one.
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CERTWRIGHT_") and k != "SOFTHSM2_CONF"
    }
    full_env.update(env or {})
    return subprocess.run(
        [str(VENV_BIN / "certwright"), *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        input=input,
        timeout=120,
        check=False,
    )


def pkilint(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one of pkilint's command-line linters, reporting ERROR and worse only."""
    return subprocess.run(
        [str(VENV_BIN / tool), "lint", "-s", "ERROR", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
