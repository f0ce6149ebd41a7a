"""The admin dashboard (issue #5 point 7), end to end: a real `certwright serve`, real TLS,
Debian's headless Chromium driven by Playwright. Plus the bad input "a dashboard request
without credentials" and the dashboard's absence when no token is configured.

Chromium is a test requirement (scripts/setup --test installs it): a missing browser fails.
"""

from __future__ import annotations

import datetime
import json
import ssl
import struct
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask import Flask

if TYPE_CHECKING:
    from playwright.sync_api import Page

from ca import dashboard
from ca.clock import SystemClock
from ca.config import load_config
from ca.storage import Storage
from tests.integration.test_metrics import Served, serve

pytestmark = pytest.mark.integration

TOKEN = "dash-token-0123456789abcdef"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EVIL_OWNER = "<script>alert('owned')</script>"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, dict[str, str]]]:
    """A running CA with a few certificates: expiring in 3, 10 and 20 days, one revoked."""
    workdir = tmp_path_factory.mktemp("dashboard")
    with serve(workdir, workers=1, CERTWRIGHT_DASHBOARD_TOKEN=TOKEN) as server:
        serials = {}
        for name, owner, tag, days in (
            ("web-a.test", "team-a", "web", 3),
            ("web-b.test", "team-b", "web", 10),
            ("api.test", "team-a", "api", 20),
            ("old.test", EVIL_OWNER, "legacy", 40),
        ):
            out = server.cli(
                "issue",
                "--name",
                name,
                "--owner",
                owner,
                "--tag",
                tag,
                "--days",
                str(days),
                "--json",
                "--out-dir",
                str(workdir / name),
            )
            serials[name] = json.loads(out)["serial"]
        server.cli("revoke", serials["old.test"], "--reason", "superseded")
        # A certificate we did not issue, found on disk by a discovery scan.
        found = workdir / "found"
        found.mkdir()
        (found / "shadow.pem").write_bytes(_self_signed("shadow.test", days=15))
        server.cli("discover", "files", str(found))
        yield server, serials


def _self_signed(name: str, *, days: int) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def _tls_context(server: Served) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.root))


def _request(
    server: Served,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> tuple[int, Message, str]:
    request = urllib.request.Request(  # noqa: S310  # loopback
        server.https_base + path, data=data, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(  # noqa: S310  # loopback
            request, timeout=30, context=_tls_context(server)
        ) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read().decode()


# -- without credentials -----------------------------------------------------------------------


def test_without_credentials_is_401(served: tuple[Served, dict[str, str]]) -> None:
    server, _ = served
    status, headers, body = _request(server, "/dashboard", headers={"Accept": "text/html"})
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert 'name="token"' in body and "Inventory" not in body  # the login page, no data
    status, headers, body = _request(server, "/dashboard", headers={"Accept": "*/*"})
    assert (status, body) == (401, "authentication required\n")
    assert headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
        # A cookie keyed by another token, an expired one, and the token itself as a cookie.
        {"Cookie": f"certwright_dashboard={dashboard.session_cookie('other', 4102444800)}"},
        {"Cookie": f"certwright_dashboard={dashboard.session_cookie(TOKEN, 1000)}"},
        {"Cookie": f"certwright_dashboard={TOKEN}"},
    ],
)
def test_bad_credentials_are_401(
    served: tuple[Served, dict[str, str]], headers: dict[str, str]
) -> None:
    server, _ = served
    status, _, body = _request(server, "/dashboard", headers=headers)
    assert status == 401
    assert "web-a.test" not in body


def test_bearer_token_and_read_only(served: tuple[Served, dict[str, str]]) -> None:
    server, _ = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, headers, body = _request(server, "/dashboard?q=web", headers=auth)
    assert status == 200
    table = body.split('id="inventory-table"', 1)[1].split("</table>", 1)[0]
    assert "web-a.test" in table and "web-b.test" in table and "api.test" not in table
    assert headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    # Escaped: the owner's markup is text, never markup.
    status, _, body = _request(server, "/dashboard?status=revoked", headers=auth)
    assert EVIL_OWNER not in body
    assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in body
    # Nothing to change: POST is not a dashboard method.
    status, _, _ = _request(server, "/dashboard", headers=auth, data=b"x=1")
    assert status == 405


def test_wrong_login_is_refused_and_audited(served: tuple[Served, dict[str, str]]) -> None:
    server, _ = served
    form = urllib.parse.urlencode({"token": "guess"}).encode()
    status, headers, body = _request(
        server, "/dashboard/login", data=form, headers={"Accept": "text/html"}
    )
    assert status == 401
    assert "Set-Cookie" not in headers
    assert "That token is not right." in body
    storage = Storage(load_config(server.config, environ={}).database_url())
    try:
        events = storage.audit_events(50)
    finally:
        storage.dispose()
    assert any(e["action"] == "dashboard.login" and e["outcome"] == "refused" for e in events), (
        events
    )


# -- no token, no dashboard --------------------------------------------------------------------


def _app(storage: Storage, tmp_path: Path, environ: dict[str, str]) -> Flask:
    runtime = types.SimpleNamespace(
        config=load_config(None, environ={"CERTWRIGHT_CA__DATA_DIR": str(tmp_path), **environ}),
        storage=storage,
        clock=SystemClock(),
    )
    app = Flask("dashboard-test")
    app.register_blueprint(dashboard.blueprint(runtime))
    return app


def test_no_token_configured_means_no_dashboard(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(dashboard.TOKEN_ENV, raising=False)
    client = _app(storage, tmp_path, {}).test_client()
    assert client.get("/dashboard", headers={"Authorization": "Bearer x"}).status_code == 404
    assert client.post("/dashboard/login", data={"token": ""}).status_code == 404
    # Configured but switched off: also absent.
    monkeypatch.setenv(dashboard.TOKEN_ENV, TOKEN)
    off = _app(storage, tmp_path, {"CERTWRIGHT_DASHBOARD__ENABLED": "false"}).test_client()
    assert off.get("/dashboard", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_token_file_and_cookie(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(dashboard.TOKEN_ENV, raising=False)
    (tmp_path / "dashboard.token").write_text("from-a-file\n")
    app = _app(storage, tmp_path, {"CERTWRIGHT_DASHBOARD__TOKEN_FILE": "dashboard.token"})
    client = app.test_client()
    assert client.get("/dashboard").status_code == 401
    response = client.post("/dashboard/login", data={"token": "from-a-file"})
    assert response.status_code == 303
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie
    assert "from-a-file" not in cookie
    assert client.get("/dashboard").status_code == 200  # the cookie now authenticates
    assert dashboard.cookie_valid("from-a-file", cookie.split(";")[0].split("=", 1)[1], 0)
    assert not dashboard.cookie_valid(
        "from-a-file", dashboard.session_cookie("from-a-file", 10), time.time()
    )


# -- in Chromium -------------------------------------------------------------------------------


def png_pixels(png: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    """Width, height and RGB(A) pixels of an 8-bit, non-interlaced PNG (what Chromium writes)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat, header = 8, b"", b""
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind = png[offset + 4 : offset + 8]
        data = png[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            header = data
        elif kind == b"IDAT":
            idat += data
        offset += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and interlace == 0 and color in (2, 6), (depth, color, interlace)
    channels = 4 if color == 6 else 3
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytearray] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            upper_left = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - upper_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else upper_left
                line[i] = (line[i] + predictor) & 0xFF
        rows.append(line)
        previous = line
    pixels = [
        tuple(row[x * channels : x * channels + channels]) for row in rows for x in range(width)
    ]
    return width, height, pixels


def _names(page: Page) -> set[str]:
    cells = page.locator("#inventory-table tbody tr.item td.names")
    return {n for text in cells.all_inner_texts() for n in text.split(", ")}


def test_dashboard_in_chromium(served: tuple[Served, dict[str, str]], tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail("Debian chromium is not installed: scripts/setup --test installs it")
    from playwright.sync_api import Dialog, sync_playwright

    server, serials = served
    base = server.https_base
    dialogs: list[str] = []
    with sync_playwright() as playwright:
        # A fresh profile; the server's certificate is from our own test root, which this
        # throw-away profile does not trust, so certificate errors are ignored here (TLS is
        # still spoken, and checked against the root by the urllib tests above).
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            ignore_https_errors=True,
            viewport={"width": 1280, "height": 1600},
        )
        try:
            page = context.new_page()

            def on_dialog(dialog: Dialog) -> None:
                dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)
            response = page.goto(base + "/dashboard")
            assert response is not None and response.status == 401
            assert page.locator("#token").is_visible()

            # Log in with the token: an HttpOnly, Secure, SameSite=Strict cookie, not the token.
            page.fill("#token", TOKEN)
            with page.expect_navigation():
                page.click("#login")
            assert page.url.rstrip("/") == base + "/dashboard"
            cookie = next(c for c in context.cookies() if c["name"] == "certwright_dashboard")
            assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
            assert TOKEN not in cookie["value"]
            assert page.evaluate("document.cookie") == ""  # HttpOnly: no script can read it
            assert {"web-a.test", "web-b.test", "api.test", "old.test"} <= _names(page)

            # Search and filters, through the form.
            page.fill("input[name=q]", "web")
            with page.expect_navigation():
                page.click("#apply")
            assert _names(page) == {"web-a.test", "web-b.test"}
            page.fill("input[name=q]", "")
            page.fill("input[name=owner]", "team-a")
            with page.expect_navigation():
                page.click("#apply")
            assert _names(page) == {"web-a.test", "api.test"}
            page.fill("input[name=owner]", "")
            page.select_option("select[name=status]", "revoked")
            with page.expect_navigation():
                page.click("#apply")
            assert _names(page) == {"old.test"}
            owner_cell = page.locator("#inventory-table tbody tr.item td").nth(2)
            assert owner_cell.inner_text() == EVIL_OWNER  # shown as text
            page.goto(base + "/dashboard?tag=api")
            assert _names(page) == {"api.test"}
            page.goto(base + "/dashboard?expiring=7")
            assert _names(page) == {"web-a.test"}
            # Discovered certificates: listed with where they were found.
            page.goto(base + "/dashboard?kind=discovered")
            assert _names(page) == {"shadow.test"}
            deployed = page.locator("#inventory-table tbody tr.item td").nth(8).inner_text()
            assert deployed.endswith("shadow.pem")
            page.goto(base + "/dashboard?where=*/found/*")
            assert _names(page) == {"shadow.test"}
            page.goto(base + "/dashboard?expiring=soon")
            assert page.locator("#inventory-error").is_visible()

            page.goto(base + "/dashboard")
            # Findings: the certificates expiring within 30 days are there.
            finding_text = page.locator("#findings-table").inner_text()
            for name in ("web-a.test", "web-b.test", "api.test", "shadow.test"):
                assert name in finding_text
            assert page.locator("#findings-table tbody tr.finding").count() >= 3
            # Recent revocations.
            revoked = page.locator("#revocations-table tbody tr.revocation")
            assert revoked.first.get_attribute("data-serial") == serials["old.test"]
            # Issuers with CRL and OCSP health: the root and the intermediate are listed.
            issuers = page.locator("#issuers-table tbody tr.issuer-row")
            assert issuers.count() >= 2
            kinds = page.locator("#issuers-table tbody tr.issuer-row td:nth-child(2)")
            assert {"root", "intermediate"} <= set(kinds.all_inner_texts())

            # The expiry timeline: 12 weekly bars, weeks 0, 1 and 2 hold our three.
            bars = page.locator("#expiry-chart g.week")
            assert bars.count() == 12
            counts = [int(bars.nth(i).get_attribute("data-count") or "0") for i in range(12)]
            assert counts[0] >= 1 and counts[1] >= 1 and counts[2] >= 1, counts
            chart = page.locator("#expiry-chart")
            box = chart.bounding_box()
            assert box is not None and box["width"] > 300 and box["height"] > 100
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)  # for a human
            png = chart.screenshot()
            (tmp_path / "chart.png").write_bytes(png)
            width, height, pixels = png_pixels(png)
            # The element's own screenshot (pixel rounding aside: a subpixel position).
            assert abs(width - box["width"]) <= 2 and abs(height - box["height"]) <= 2
            bar_blue = sum(
                1
                for p in pixels
                if abs(p[0] - 0x2F) < 24 and abs(p[1] - 0x6F) < 24 and abs(p[2] - 0xD6) < 24
            )
            assert bar_blue > 200, bar_blue  # the bars were painted, in the bar colour
            assert len(set(pixels)) > 3  # bars, axis, labels on the background
        finally:
            context.close()
    assert dialogs == []  # no script ran from the data


def test_bearer_token_in_chromium(served: tuple[Served, dict[str, str]], tmp_path: Path) -> None:
    """The Bearer header also works for a browser (a tool that cannot fill a form)."""
    if not CHROMIUM.exists():
        pytest.fail("Debian chromium is not installed: scripts/setup --test installs it")
    from playwright.sync_api import sync_playwright

    server, _ = served
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(
                ignore_https_errors=True,
                extra_http_headers={"Authorization": f"Bearer {TOKEN}"},
            )
            page = context.new_page()
            response = page.goto(server.https_base + "/dashboard?weeks=4")
            assert response is not None and response.status == 200
            assert page.locator("#expiry-chart g.week").count() == 4
            shot = page.screenshot(full_page=True)
            width, height, _ = png_pixels(shot)
            assert width >= 1000 and height > 600
        finally:
            browser.close()
