"""The HTTP listener's WSGI-over-ASGI bridge (gunicorn's asyncio worker), without a server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from ca.server import WsgiOverAsgi, wsgi_environ


def _run(app: Any, scope: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    incoming = list(messages)

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def _echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = environ["wsgi.input"].read()
    start_response(
        "201 Created", [("Content-Type", "text/plain"), ("X-Path", environ["PATH_INFO"])]
    )
    return [environ["REQUEST_METHOD"].encode(), b" ", body]


def _scope(**extra: Any) -> dict[str, Any]:
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/ocsp/a/b",
        "query_string": b"x=1",
        "headers": [(b"content-type", b"application/ocsp-request"), (b"x-a", b"1"), (b"x-a", b"2")],
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.2", 5555),
    }
    scope.update(extra)
    return scope


def test_a_request_reaches_the_wsgi_app_and_its_answer_the_client() -> None:
    sent = _run(
        WsgiOverAsgi(_echo),
        _scope(),
        [
            {"type": "http.request", "body": b"ab", "more_body": True},
            {"type": "http.request", "body": b"cd"},
        ],
    )
    assert sent[0]["status"] == 201
    assert (b"content-type", b"text/plain") in sent[0]["headers"]
    assert (b"x-path", b"/ocsp/a/b") in sent[0]["headers"]
    assert sent[1] == {"type": "http.response.body", "body": b"POST abcd"}


def test_environ_follows_pep_3333() -> None:
    environ = wsgi_environ(_scope(path="/ocsp/é"), b"body")
    assert environ["PATH_INFO"] == "/ocsp/é".encode().decode("latin-1")
    assert environ["QUERY_STRING"] == "x=1"
    assert environ["CONTENT_TYPE"] == "application/ocsp-request"
    assert environ["CONTENT_LENGTH"] == "4"
    assert environ["HTTP_X_A"] == "1,2"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("127.0.0.1", "8080")
    assert environ["REMOTE_ADDR"] == "127.0.0.2"
    assert environ["wsgi.input"].read() == b"body"
    assert "CONTENT_LENGTH" not in wsgi_environ(_scope(method="GET", headers=[]), b"")


def test_oversized_bodies_are_refused_and_lifespan_is_answered() -> None:
    big = {"type": "http.request", "body": b"x" * (WsgiOverAsgi.max_body + 1)}
    sent = _run(WsgiOverAsgi(_echo), _scope(), [big])
    assert sent[0]["status"] == 413
    sent = _run(
        WsgiOverAsgi(_echo),
        {"type": "lifespan"},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert _run(WsgiOverAsgi(_echo), _scope(), []) == []  # the client went away
