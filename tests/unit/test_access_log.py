"""The listeners' access log: the line in gunicorn's default format is gunicorn's own."""

from __future__ import annotations

import base64
import datetime
import logging
from typing import Any

import pytest
from gunicorn.config import Config as GunicornConfig
from gunicorn.glogging import Logger

from ca.server import AccessLog


class _Response:
    def __init__(self, status: Any, sent: int | None, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.sent = sent
        self.headers = headers


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _line(logger_class: type[Logger], access_format: str | None, **call: Any) -> str:
    cfg = GunicornConfig()
    cfg.set("accesslog", "-")
    if access_format is not None:
        cfg.set("access_log_format", access_format)
    logger = logger_class(cfg)
    capture = _Capture()
    logger.access_log.handlers[:] = [capture]
    logger.now = lambda: "[02/Dec/2026:01:02:03 +0000]"  # the same instant for both
    logger.access(**call)
    assert len(capture.lines) == 1
    return capture.lines[0]


def _environ(**extra: str) -> dict[str, str]:
    environ = {
        "REQUEST_METHOD": "POST",
        "RAW_URI": "/acme/authz/abc?x=1",
        "PATH_INFO": "/acme/authz/abc",
        "QUERY_STRING": "x=1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_USER_AGENT": 'certbot/2.11 (quoted "agent")',
    }
    environ.update(extra)
    return environ


CASES = {
    "typical": dict(
        resp=_Response("200 OK", 512, [("Content-Type", "application/json")]),
        environ=_environ(),
    ),
    "no length, referer": dict(
        resp=_Response("204 No Content", None, []),
        environ=_environ(HTTP_REFERER="https://example.test/"),
    ),
    "integer status, basic auth, no agent": dict(
        resp=_Response(403, 0, []),
        environ={
            **{k: v for k, v in _environ().items() if k != "HTTP_USER_AGENT"},
            "HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"admin:pw").decode(),
        },
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_default_format_line_is_gunicorns(case: str) -> None:
    call = dict(
        CASES[case], req=[("User-Agent", "x")], request_time=datetime.timedelta(microseconds=1500)
    )
    ours = _line(AccessLog, None, **call)
    assert ours == _line(Logger, None, **call)
    assert "127.0.0.1" in ours


def test_another_format_goes_gunicorns_way() -> None:
    call = dict(
        CASES["typical"],
        req=[("X-Forwarded-For", "192.0.2.7")],
        request_time=datetime.timedelta(milliseconds=3),
    )
    access_format = '%({x-forwarded-for}i)s %(m)s %(U)s %(s)s %(M)s ms "%({content-type}o)s"'
    ours = _line(AccessLog, access_format, **call)
    assert ours == _line(Logger, access_format, **call)
    assert ours == '192.0.2.7 POST /acme/authz/abc 200 3 ms "application/json"'
