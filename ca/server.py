"""Running the WSGI app under gunicorn, from `certwright serve`.

gunicorn `sync` workers: they beat `gthread` on these CPU-bound handlers, and each worker is
one process with its own PKCS#11 session, opened after the fork (DESIGN.md §6).
"""

from __future__ import annotations

import sys
from typing import Any

from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

from ca.config import Config
from ca.runtime import Runtime
from ca.web import create_app


class _Application(BaseApplication):  # type: ignore[misc]  # gunicorn ships no type hints
    def __init__(self, config: Config, options: dict[str, Any]) -> None:
        self._config = config
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Runs in each worker after fork: the runtime, and with it the HSM session, is the
        # worker's own.
        return create_app(Runtime(self._config))


def serve(config: Config, listen: str, workers: int) -> None:
    options = {
        "bind": [listen],
        "workers": max(1, workers),
        "worker_class": "sync",
        "backlog": 2048,  # a small backlog drops SYNs under bursts, each costing a 1 s retry
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": "info",
        "timeout": 60,
        "preload_app": False,
    }
    print(f"certwright: serving http://{listen}/ with {workers} worker(s)", file=sys.stderr)
    _Application(config, options).run()
