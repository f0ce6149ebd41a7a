"""server.cpu_affinity: with "auto" each gunicorn worker of `certwright serve` runs on a CPU of
its own, a replaced worker takes the CPU its predecessor left, and "off" leaves them unpinned."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca.server import _pick_cpu
from tests.conftest import run_cli
from tests.integration.acme_harness import AcmeServer, certwright_server, challtestsrv

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALLOWED = os.sched_getaffinity(0)
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning needs two CPUs")


@pytest.mark.parametrize(
    ("allowed", "taken", "workers", "expected"),
    [
        ({0, 1}, [], 2, 0),
        ({0, 1}, [0], 2, 1),
        ({0, 1}, [0, 1], 3, 0),  # more workers than CPUs: round and round
        ({0, 1}, [None, 1], 2, 0),  # a worker forked unpinned counts for no CPU
        ({2, 5}, [2], 2, 5),  # only the CPUs this process may use (a cpuset, taskset)
        ({0, 1, 2}, [1, 0, 1], 4, 2),
        ({0, 1, 2, 3}, [], 2, None),  # fewer workers than CPUs: the kernel places them
        ({3}, [], 1, None),  # one CPU: nothing to choose
    ],
)
def test_a_new_worker_gets_the_least_used_allowed_cpu(
    allowed: set[int], taken: list[int | None], workers: int, expected: int | None
) -> None:
    assert _pick_cpu(allowed, taken, workers) == expected


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def https_workers(server: AcmeServer) -> dict[int, set[int]]:
    """The ACME listener's workers (children of the arbiter that run `certwright serve`, not
    the spawned HTTP listener and jobs processes) and the CPUs each may run on."""
    arbiter = server.process_group
    assert arbiter is not None
    workers = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if _status(int(entry)).get("PPid") != str(arbiter):
                continue
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if not any(part.endswith(b"certwright") for part in command) or b"serve" not in command:
                continue
            workers[int(entry)] = os.sched_getaffinity(int(entry))
        except (OSError, KeyError):
            continue  # gone meanwhile
    return workers


def wait_for_workers(
    server: AcmeServer, count: int, without: int | None = None
) -> dict[int, set[int]]:
    deadline = time.monotonic() + 60
    while True:
        workers = https_workers(server)
        if len(workers) == count and without not in workers:
            return workers
        assert time.monotonic() < deadline, f"workers: {workers}"
        time.sleep(0.2)


TWO = set(sorted(ALLOWED)[:2])


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    """`certwright serve` with 2 workers, started while this process may run on two CPUs only
    (the server inherits that, as from taskset): a worker per CPU, whatever the machine."""

    def start(**env: str) -> object:
        return certwright_server(tmp_path / "cw", dns, workers=2, extra_env=env)

    os.sched_setaffinity(0, TWO)
    try:
        with challtestsrv(tmp_path / "dns") as dns:
            yield start
    finally:
        os.sched_setaffinity(0, ALLOWED)


@needs_two_cpus
def test_auto_pins_each_worker_to_its_own_cpu_and_a_replacement_to_the_freed_one(
    serve: object,
) -> None:
    with serve() as server:  # type: ignore[operator]
        workers = wait_for_workers(server, 2)
        assert all(len(allowed) == 1 for allowed in workers.values()), workers
        assert set().union(*workers.values()) == TWO
        victim, victim_cpus = max(workers.items(), key=lambda item: min(item[1]))
        os.kill(victim, signal.SIGKILL)
        replaced = wait_for_workers(server, 2, without=victim)
        newcomer = next(pid for pid in replaced if pid not in workers)
        assert replaced[newcomer] == victim_cpus


@needs_two_cpus
def test_off_leaves_the_workers_where_the_kernel_puts_them(serve: object) -> None:
    with serve(CERTWRIGHT_SERVER__CPU_AFFINITY="off") as server:  # type: ignore[operator]
        workers = wait_for_workers(server, 2)
        assert all(allowed == TWO for allowed in workers.values()), workers


@needs_two_cpus
def test_fewer_workers_than_cpus_stay_unpinned(tmp_path: Path) -> None:
    with (
        challtestsrv(tmp_path / "dns") as dns,
        certwright_server(tmp_path / "cw", dns, workers=1) as server,
    ):
        workers = wait_for_workers(server, 1)
        assert all(allowed == ALLOWED for allowed in workers.values()), workers


def test_an_unknown_setting_stops_serve_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run_cli("init", "--data-dir", str(data)).returncode == 0
    result = run_cli(
        "serve",
        env={
            "CERTWRIGHT_CONFIG": str(data / "certwright.toml"),
            "CERTWRIGHT_SERVER__CPU_AFFINITY": "sometimes",
        },
    )
    assert result.returncode != 0
    assert "server.cpu_affinity must be one of auto, off" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
