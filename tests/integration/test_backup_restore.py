"""The backup/restore drill of docs/operations.md, for real, on SQLite and PostgreSQL.

Issue and revoke, back up (SQLite's online `.backup`; PostgreSQL's pg_dump -Fc; the SoftHSM
token directory copied while nothing runs), wipe, restore; then `certwright list`/`show` give
what they gave before, the audit chain verifies against the head recorded before the backup,
and the restored HSM token still signs: a new certificate can be issued.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import fresh_postgres_database, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _ok(*args: str, env: dict[str, str]) -> str:
    result = run_cli(*args, env=env)
    assert result.returncode == 0, f"certwright {' '.join(args)}: {result.stderr}"
    return result.stdout


def _state(env: dict[str, str]) -> tuple[list[object], dict[str, object]]:
    listing = json.loads(_ok("list", "--json", env=env))
    serials = [row["serial"] for row in listing]
    shown = {serial: json.loads(_ok("show", serial, "--json", env=env)) for serial in serials}
    return listing, shown


def _populate(env: dict[str, str], tmp_path: Path) -> str:
    """Three certificates, one revoked, one CRL signed; returns the audit chain's head."""
    serials = []
    for name in ("a", "b", "c"):
        out = _ok(
            "issue",
            "--name",
            f"{name}.backup.test",
            "--out-dir",
            str(tmp_path / name),
            "--json",
            env=env,
        )
        serials.append(json.loads(out)["serial"])
    _ok("revoke", serials[1], "--reason", "keyCompromise", env=env)
    _ok("crl", "sign", env=env)
    head = json.loads(_ok("audit-log", "verify", "--json", env=env))
    assert head["ok"] is True
    return f"{head['head_seq']}:{head['head_hash']}"


def _check_restored(
    env: dict[str, str], before: tuple[list[object], dict[str, object]], anchor: str, tmp: Path
) -> None:
    assert _state(env) == before
    verified = json.loads(_ok("audit-log", "verify", "--anchor", anchor, "--json", env=env))
    assert verified["ok"] is True
    assert f"{verified['head_seq']}:{verified['head_hash']}" == anchor
    # The restored token's keys still sign.
    _ok("issue", "--name", "after.backup.test", "--out-dir", str(tmp / "after"), env=env)


@pytest.fixture
def sqlite_ca(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    data = tmp_path / "data"
    assert run_cli("init", "--data-dir", str(data)).returncode == 0
    yield data, {"CERTWRIGHT_CONFIG": str(data / "certwright.toml")}


def test_sqlite_backup_and_restore(sqlite_ca: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    data, env = sqlite_ca
    anchor = _populate(env, tmp_path)
    before = _state(env)
    backup = tmp_path / "backup"
    backup.mkdir()
    # The database: sqlite3's online backup (safe while the CA runs, unlike cp).
    subprocess.run(
        ["sqlite3", str(data / "certwright.db"), f".backup {backup / 'certwright.db'}"],
        check=True,
        timeout=60,
    )
    # The SoftHSM tokens, PINs and configuration: copied while no certwright process runs.
    for name in ("tokens", "secrets"):
        shutil.copytree(data / name, backup / name)
    for name in ("certwright.toml", "softhsm2.conf", "root.pem"):
        shutil.copy2(data / name, backup / name)

    shutil.rmtree(data)  # the disaster
    assert run_cli("list", env=env).returncode != 0

    data.mkdir(mode=0o700)
    for name in ("tokens", "secrets"):
        shutil.copytree(backup / name, data / name)
    for name in ("certwright.db", "certwright.toml", "softhsm2.conf", "root.pem"):
        shutil.copy2(backup / name, data / name)
    _check_restored(env, before, anchor, tmp_path)


def _libpq(url: str) -> str:
    """The SQLAlchemy URL as libpq (pg_dump, pg_restore) reads it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _pg_tool(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if found else name


@pytest.mark.postgres
def test_postgres_backup_and_restore(tmp_path: Path) -> None:
    with fresh_postgres_database() as url:
        data = tmp_path / "data"
        env = {"CERTWRIGHT_DATABASE__URL": url}
        assert run_cli("init", "--data-dir", str(data), env=env).returncode == 0
        env["CERTWRIGHT_CONFIG"] = str(data / "certwright.toml")
        anchor = _populate(env, tmp_path)
        before = _state(env)
        dump = tmp_path / "certwright.dump"
        # pg_dump takes a consistent snapshot while the CA keeps running.
        subprocess.run(
            [_pg_tool("pg_dump"), "--format=custom", "--file", str(dump), _libpq(url)],
            check=True,
            timeout=120,
        )

        name = make_url(url).database
        admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:  # the disaster, then an empty database
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        assert (
            run_cli("list", env={**env, "CERTWRIGHT_DATABASE__AUTO_MIGRATE": "false"}).returncode
            != 0
        )

        subprocess.run(
            [
                _pg_tool("pg_restore"),
                "--no-owner",
                "--exit-on-error",
                "--dbname",
                _libpq(url),
                str(dump),
            ],
            check=True,
            timeout=120,
        )
        _check_restored(env, before, anchor, tmp_path)
