"""`certwright serve --gunicorn-config config/gunicorn.conf.py`: the shipped gunicorn settings
file is the one a real server runs with, and a bad one stops `serve` in one line."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONF = Path(__file__).resolve().parents[2] / "config" / "gunicorn.conf.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str, context: ssl.SSLContext | None = None) -> int:
    connection: http.client.HTTPConnection = (
        http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        if context is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    )
    try:
        connection.request("GET", path)
        with connection.getresponse() as response:
            response.read()
            return response.status
    finally:
        connection.close()


def _env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTWRIGHT_")}
    env.pop("SOFTHSM2_CONF", None)
    env.update(CERTWRIGHT_CONFIG=str(data / "certwright.toml"), **extra)
    return env


def test_serve_runs_with_the_shipped_gunicorn_config(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run_cli("init", "--data-dir", str(data)).returncode == 0
    http_port, https_port = _free_port(), _free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                str(VENV_BIN / "certwright"),
                "serve",
                "--gunicorn-config",
                str(CONF),
                "--listen",
                f"127.0.0.1:{http_port}",
                "--https-listen",
                f"127.0.0.1:{https_port}",
            ],
            env=_env(data, WEB_CONCURRENCY="2", CERTWRIGHT_GUNICORN_MAX_REQUESTS="1000"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        context = ssl.create_default_context(cafile=str(data / "root.pem"))
        deadline = time.monotonic() + 90
        healthy = directory = False
        while time.monotonic() < deadline and not (healthy and directory):
            assert process.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(OSError, ssl.SSLError):
                healthy = healthy or _get(http_port, "/healthz") == 200
                directory = directory or _get(https_port, "/acme/directory", context) == 200
            time.sleep(0.2)
        assert healthy and directory, log.read_text()[-3000:]
        # The file's `workers` (from WEB_CONCURRENCY) took effect on both listeners.
        booted = log.read_text().count("Booting worker")
        assert booted == 4, log.read_text()[-3000:]
        # What the README's run command promises to print: where to point clients, what to trust.
        printed = log.read_text()
        assert f"ACME directory https://127.0.0.1:{https_port}/acme/directory" in printed
        assert f"trust anchor {data / 'root.pem'}" in printed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("workers = 'many'\n", "invalid workers"),
        ("import nonexistent_module_xyz\n", "ModuleNotFoundError"),
    ],
)
def test_a_bad_gunicorn_config_is_one_line(tmp_path: Path, content: str, message: str) -> None:
    data = tmp_path / "data"
    assert run_cli("init", "--data-dir", str(data)).returncode == 0
    bad = tmp_path / "gunicorn.conf.py"
    bad.write_text(content)
    result = run_cli(
        "serve",
        "--gunicorn-config",
        str(bad),
        env={"CERTWRIGHT_CONFIG": str(data / "certwright.toml")},
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
