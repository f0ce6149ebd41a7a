"""The listeners' access log: certwright's `AccessLog` writes the very line gunicorn would."""

from __future__ import annotations

import base64
import datetime
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gunicorn.config import Config as GunicornConfig
from gunicorn.glogging import Logger

from ca.server import AccessLog

NOW = "[02/Dec/2026:01:02:03 +0000]"


def _clear_gunicorn_loggers() -> None:
    """gunicorn's loggers are process-wide; a new gunicorn Logger drops, unclosed, the handler
    the last one made."""
    for name in ("gunicorn.access", "gunicorn.error"):
        log = logging.getLogger(name)
        for handler in list(log.handlers):
            if getattr(handler, "_gunicorn", False):
                log.removeHandler(handler)
                handler.close()


def _only_gunicorns_handler(logger: Logger) -> None:
    """Without the capture handlers pytest adds to every logger for the test's report."""
    handlers = logger.access_log.handlers
    handlers[:] = [h for h in handlers if getattr(h, "_gunicorn", False)]


@pytest.fixture(autouse=True)
def _fresh_gunicorn_loggers() -> Iterator[None]:
    _clear_gunicorn_loggers()
    yield
    _clear_gunicorn_loggers()


class _Response:
    def __init__(self, status: Any, sent: int | None, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.sent = sent
        self.headers = headers


class _Request:
    def __init__(self, headers: list[tuple[str, str]]) -> None:
        self.headers = headers


def _logger(logger_class: type[Logger], path: Path, access_format: str | None) -> Logger:
    cfg = GunicornConfig()
    cfg.set("accesslog", str(path))  # gunicorn's own FileHandler, as for `accesslog`
    if access_format is not None:
        cfg.set("access_log_format", access_format)
    logger = logger_class(cfg)
    logger.now = lambda: NOW  # the same instant for both
    return logger


def _lines(logger_class: type[Logger], tmp: Path, access_format: str | None, **call: Any) -> str:
    path = tmp / f"{logger_class.__name__}.log"
    logger = _logger(logger_class, path, access_format)
    _only_gunicorns_handler(logger)  # so AccessLog writes its line itself
    logger.access(**call)
    _clear_gunicorn_loggers()
    return path.read_text()


def _environ(**extra: str) -> dict[str, str]:
    environ = {
        "REQUEST_METHOD": "POST",
        "RAW_URI": "/acme/authz/abc?x=1",
        "PATH_INFO": "/acme/authz/abc",
        "QUERY_STRING": "x=1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_USER_AGENT": 'certbot/2.11 (quoted "agent")',
        "wsgi.url_scheme": "https",
    }
    environ.update(extra)
    return environ


CALLS = {
    "typical": dict(
        resp=_Response("200 OK", 512, [("Content-Type", "application/json")]),
        environ=_environ(),
    ),
    "no length, referer": dict(
        resp=_Response("204 No Content", None, []),
        environ=_environ(HTTP_REFERER="https://example.test/"),
    ),
    "integer status, basic auth, no agent": dict(
        resp=_Response(403, 0, [("Link", "<a>"), ("link", '<b "q">')]),
        environ={
            **{k: v for k, v in _environ().items() if k != "HTTP_USER_AGENT"},
            "HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"admin:pw").decode(),
        },
    ),
}

FORMATS = {
    "gunicorn's default": None,
    "config/gunicorn.conf.py's": '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"',
    "every atom": " ".join(f"%({a})s" for a in "hlutrsmUqHbBfaTDMLp"),
    "headers and environ": (
        '%({X-Forwarded-For}i)s %({content-type}o)s "%({LINK}o)s" %({wsgi.url_scheme}e)s'
        " %({absent}i)s %({absent}o)s %({absent}e)s %({bogus}x)s %(nosuch)s"
    ),
}


@pytest.mark.parametrize("access_format", FORMATS.values(), ids=list(FORMATS))
@pytest.mark.parametrize("case", CALLS, ids=list(CALLS))
def test_line_is_gunicorns(tmp_path: Path, case: str, access_format: str | None) -> None:
    call = dict(
        CALLS[case],
        req=_Request([("User-Agent", "x"), ("X-Forwarded-For", "192.0.2.7")]),
        request_time=datetime.timedelta(seconds=2, microseconds=1500),
    )
    ours = _lines(AccessLog, tmp_path, access_format, **call)
    assert ours == _lines(Logger, tmp_path, access_format, **call)
    assert ours.count("\n") == 1


def test_line_written_directly_to_gunicorns_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path: no logging record for gunicorn's own handler."""
    logger = _logger(AccessLog, tmp_path / "direct.log", None)
    _only_gunicorns_handler(logger)
    emitted: list[logging.LogRecord] = []
    monkeypatch.setattr(logger.access_log, "handle", emitted.append)  # where a record would go
    logger.access(
        resp=CALLS["typical"]["resp"],
        req=_Request([]),
        environ=CALLS["typical"]["environ"],
        request_time=datetime.timedelta(milliseconds=3),
    )
    assert emitted == []
    assert (tmp_path / "direct.log").read_text().startswith("127.0.0.1 - - [02/Dec/2026")


def test_other_handlers_get_gunicorns_record(tmp_path: Path) -> None:
    """A handler certwright did not see made (logconfig, syslog, a filter) gets gunicorn's
    own logging record, with its atoms as the arguments."""
    logger = _logger(AccessLog, tmp_path / "unused.log", '%(s)s "%({x-forwarded-for}i)s"')
    _only_gunicorns_handler(logger)
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger.access_log.addHandler(Capture())
    logger.access(
        resp=CALLS["typical"]["resp"],
        req=_Request([("X-Forwarded-For", "192.0.2.7")]),
        environ=CALLS["typical"]["environ"],
        request_time=datetime.timedelta(milliseconds=3),
    )
    assert [r.getMessage() for r in records] == ['200 "192.0.2.7"']
    assert isinstance(records[0].args, dict) and records[0].args["h"] == "127.0.0.1"
