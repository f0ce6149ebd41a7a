"""The WSGI-over-ASGI bridge of both listeners (gunicorn's asyncio worker), without a server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, request

from ca import web
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


def _deferring_app(
    future: concurrent.futures.Future[str], timeout: float, calls: list[str]
) -> Flask:
    """POST /slow defers its answer on `future` (as the ACME challenge view does); GET /fast
    answers at once. `calls` records every call of a view, in order."""
    app = Flask("deferring")

    @app.post("/slow")
    def slow() -> Response:
        resume = web.RESUME in request.environ
        calls.append("slow resumed" if resume else "slow")
        if resume:
            return request.environ[web.RESUME]()  # type: ignore[no-any-return]

        def finish() -> Response:
            done = future.result() if future.done() else "still running"
            return Response(done, status=200)

        if web.defer(future, timeout, finish):
            return Response("never sent", status=202)
        return Response(future.result(), status=200)

    @app.get("/fast")
    def fast() -> Response:
        calls.append("fast")
        return Response("fast", status=200)

    return app


async def _request(app: Any, path: str, method: str) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "http.request", "body": b""}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_scope(path=path, method=method, headers=[]), receive, send)
    return sent


def test_a_deferred_answer_lets_the_process_serve_others_meanwhile() -> None:
    future: concurrent.futures.Future[str] = concurrent.futures.Future()
    calls: list[str] = []
    bridge = WsgiOverAsgi(_deferring_app(future, 30.0, calls))

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        slow = asyncio.ensure_future(_request(bridge, "/slow", "POST"))
        await asyncio.sleep(0)  # the slow request deferred, and waits
        fast = await _request(bridge, "/fast", "GET")  # served meanwhile
        assert not slow.done()
        threading.Timer(0.05, future.set_result, ("validated",)).start()
        return await slow, fast

    slow, fast = asyncio.run(scenario())
    assert calls == ["slow", "fast", "slow resumed"]
    assert fast[1]["body"] == b"fast"
    assert (slow[0]["status"], slow[1]["body"]) == (200, b"validated")


def test_a_deferred_answer_goes_out_after_its_time_limit() -> None:
    future: concurrent.futures.Future[str] = concurrent.futures.Future()
    calls: list[str] = []
    bridge = WsgiOverAsgi(_deferring_app(future, 0.05, calls))
    sent = asyncio.run(_request(bridge, "/slow", "POST"))
    assert calls == ["slow", "slow resumed"]
    assert (sent[0]["status"], sent[1]["body"]) == (200, b"still running")
    assert not future.cancelled()  # the work goes on; only the wait ended


def test_without_the_bridge_a_view_waits_itself() -> None:
    future: concurrent.futures.Future[str] = concurrent.futures.Future()
    future.set_result("validated")
    calls: list[str] = []
    response = _deferring_app(future, 30.0, calls).test_client().post("/slow")
    assert (response.status_code, response.data, calls) == (200, b"validated", ["slow"])
