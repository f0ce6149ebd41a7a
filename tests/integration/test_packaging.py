"""`pip install .` (not editable) gives a working `certwright` with all its package data.

The source is copied the way the Dockerfile copies it (pyproject.toml, README.md, ca, acme,
ocsp), then installed into a fresh venv in tmp. Offline and quick: the venv sees the project
venv's site-packages for the dependencies and setuptools (a path in a .pth file), and pip runs
with --no-deps --no-build-isolation --no-index, so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ca", "acme", "ocsp")


def _data_files(base: Path) -> set[str]:
    """Every file of the packages that is neither Python source nor a developer's note: what
    package data must ship (templates, static files, migrations' template, py.typed)."""
    found = set()
    for package in PACKAGES:
        for path in (base / package).rglob("*"):
            if (
                path.is_file()
                and "__pycache__" not in path.parts
                and path.suffix not in (".py", ".md")
            ):
                found.add(str(path.relative_to(base)))
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(venv, its site-packages) with certwright installed from a copy of the source."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    target = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # The project venv's dependencies, but not its editable certwright: a path listed in a
    # .pth file is added to sys.path without running the .pth files inside it.
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "CERTWRIGHT_"))}
    offline = ["--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check"]
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *offline, str(source)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return target, site


def test_installed_certwright_runs(installed: tuple[Path, Path], tmp_path: Path) -> None:
    target, site = installed
    result = subprocess.run(
        [str(target / "bin" / "certwright"), "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "0.1.0" in result.stdout
    where = subprocess.run(
        [str(target / "bin" / "python"), "-c", "import ca, acme, ocsp; print(ca.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed copy, not the checkout


def test_installed_package_has_its_data(installed: tuple[Path, Path]) -> None:
    _, site = installed
    wanted = _data_files(ROOT)
    assert "ca/migrations/script.py.mako" in wanted
    missing = {name for name in wanted if not (site / name).is_file()}
    assert not missing, f"not installed (pyproject package-data): {sorted(missing)}"
    migrations = {p.name for p in (ROOT / "ca" / "migrations" / "versions").glob("*.py")}
    installed_migrations = {p.name for p in (site / "ca" / "migrations" / "versions").glob("*.py")}
    assert migrations and migrations <= installed_migrations


def test_installed_certwright_makes_a_ca(installed: tuple[Path, Path], tmp_path: Path) -> None:
    """The installed package finds its migrations: `init` creates a working database."""
    target, _ = installed
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTWRIGHT_")}
    env.pop("SOFTHSM2_CONF", None)
    init = subprocess.run(
        [str(target / "bin" / "certwright"), "init", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    env["CERTWRIGHT_CONFIG"] = str(tmp_path / "data" / "certwright.toml")
    issuers = subprocess.run(
        [str(target / "bin" / "certwright"), "issuers"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert issuers.returncode == 0, issuers.stderr
    assert "issuing-ec" in issuers.stdout
    assert sys.executable  # the test ran under the project venv


def test_the_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    """systemd's own checks of config/certwright.service (offline: no systemd needs to run):
    `verify` finds no error once the program it starts exists, and `security` rates its
    exposure "OK" or better (at most 2.0 of 10)."""
    source = Path(__file__).resolve().parents[2] / "config" / "certwright.service"
    unit = tmp_path / "certwright.service"
    program = shutil.which("true")
    assert program is not None
    unit.write_text(source.read_text().replace("/opt/certwright/bin/certwright", program))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert security.returncode == 0, security.stderr
    level = security.stdout.split("Overall exposure level for certwright.service:")[1].split()[0]
    assert float(level) <= 2.0, security.stdout[-400:]
