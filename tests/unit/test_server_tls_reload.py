"""The HTTPS listener's certificate: when it is renewed, and how a running worker picks it up."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca.server import _needs_renewal, _ReloadingContext

NOW = datetime.datetime(2030, 6, 1, tzinfo=datetime.UTC)


def _pem(
    names: tuple[str, ...] = ("localhost", "127.0.0.1"),
    not_before: datetime.datetime = NOW - datetime.timedelta(days=1),
    lifetime: datetime.timedelta = datetime.timedelta(days=90),
) -> tuple[bytes, int]:
    """A self-signed P-256 certificate as ensure_server_certificate writes it: key, then chain."""
    key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = []
    for name in names:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            san.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + lifetime)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + cert.public_bytes(serialization.Encoding.PEM)
    return pem, cert.serial_number


def _replace(path: Path, pem: bytes) -> None:
    """Write a new file and rename it over the old one, as a renewal does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pem)
    os.replace(tmp, path)


def _no_default() -> ssl.SSLContext:
    raise AssertionError("gunicorn's default context must not be used")


def _served_serial(server: ssl.SSLContext, server_hostname: str | None) -> int:
    """Handshake a non-verifying client with `server` over memory BIOs; the peer's serial."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, obj in (("client", cli), ("server", srv)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "handshake did not complete"
    der = cli.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture
def cert_file(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "tls" / "server.pem"
    path.parent.mkdir()
    pem, serial = _pem()
    path.write_bytes(pem)
    return path, serial


@pytest.mark.parametrize("server_hostname", ["localhost", None], ids=["sni", "no-sni"])
def test_renewed_certificate_is_served_by_the_same_context(
    cert_file: tuple[Path, int], server_hostname: str | None
) -> None:
    path, first = cert_file
    # The asgi worker asks for the context once and keeps it.
    context = _ReloadingContext(path, check_interval=0)(conf=None, default_factory=_no_default)
    assert _served_serial(context, server_hostname) == first

    pem, second = _pem()
    _replace(path, pem)
    assert _served_serial(context, server_hostname) == second
    assert _served_serial(context, server_hostname) == second

    pem, third = _pem()
    _replace(path, pem)
    assert _served_serial(context, server_hostname) == third


def test_hook_returns_one_context(cert_file: tuple[Path, int]) -> None:
    path, first = cert_file
    hook = _ReloadingContext(path, check_interval=0)
    context = hook(conf=None, default_factory=_no_default)
    assert _served_serial(context, None) == first
    pem, second = _pem()
    _replace(path, pem)
    # The sync worker calls the hook per connection: same object, new certificate.
    again = hook(conf=None, default_factory=_no_default)
    assert again is context
    assert _served_serial(again, None) == second


@pytest.mark.parametrize(
    "content", [b"", b"-----BEGIN PRIVATE KEY-----\nMIGH", b"not a pem file\n"], ids=str
)
def test_corrupt_replacement_keeps_the_previous_certificate(
    cert_file: tuple[Path, int], content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path, first = cert_file
    context = _ReloadingContext(path, check_interval=0)(conf=None, default_factory=_no_default)
    _replace(path, content)
    for sni in ("localhost", None):
        assert _served_serial(context, sni) == first
    assert "keeping the previous TLS certificate" in caplog.text
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1

    # Once the file is whole again, it is served.
    pem, second = _pem()
    _replace(path, pem)
    assert _served_serial(context, None) == second


def test_missing_file_keeps_the_previous_certificate(cert_file: tuple[Path, int]) -> None:
    path, first = cert_file
    context = _ReloadingContext(path, check_interval=0)(conf=None, default_factory=_no_default)
    path.unlink()
    assert _served_serial(context, None) == first


def test_file_is_not_checked_more_often_than_the_interval(cert_file: tuple[Path, int]) -> None:
    path, first = cert_file
    context = _ReloadingContext(path, check_interval=3600)(conf=None, default_factory=_no_default)
    pem, _ = _pem()
    _replace(path, pem)
    assert _served_serial(context, "localhost") == first


def test_unreadable_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "server.pem"
    path.write_bytes(b"garbage")
    with pytest.raises(ssl.SSLError):
        _ReloadingContext(path)(conf=None, default_factory=_no_default)


def test_asyncio_server_serves_the_renewed_certificate(cert_file: tuple[Path, int]) -> None:
    """As gunicorn's asgi worker: loop.create_server(ssl=context) with the context made once."""
    path, first = cert_file
    context = _ReloadingContext(path, check_interval=0)(conf=None, default_factory=_no_default)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def serial(port: int, sni: str) -> int:
        # server_hostname="" sends no SNI, as a client connecting by IP address does.
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=sni
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return x509.load_der_x509_certificate(der).serial_number

    async def main() -> tuple[list[int], list[int], int]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        async with server:
            before = [await serial(port, "localhost"), await serial(port, "")]
            pem, second = _pem()
            _replace(path, pem)
            after = [await serial(port, "localhost"), await serial(port, "")]
        return before, after, second

    before, after, second = asyncio.run(main())
    assert before == [first, first]
    assert after == [second, second]


# -- _needs_renewal ---------------------------------------------------------------------------


def _write(tmp_path: Path, pem: bytes) -> Path:
    path = tmp_path / "server.pem"
    path.write_bytes(pem)
    return path


def test_renewal_when_a_third_of_the_lifetime_is_left(tmp_path: Path) -> None:
    start = NOW
    path = _write(tmp_path, _pem(not_before=start, lifetime=datetime.timedelta(days=90))[0])
    names = ["localhost", "127.0.0.1"]
    assert not _needs_renewal(path, start, names)
    assert not _needs_renewal(path, start + datetime.timedelta(days=59), names)
    assert not _needs_renewal(path, start + datetime.timedelta(days=60), names)
    assert _needs_renewal(path, start + datetime.timedelta(days=60, seconds=1), names)
    assert _needs_renewal(path, start + datetime.timedelta(days=89), names)
    assert _needs_renewal(path, start + datetime.timedelta(days=91), names)


def test_renewal_when_the_names_change(tmp_path: Path) -> None:
    path = _write(tmp_path, _pem(names=("localhost", "ca.example", "127.0.0.1"))[0])
    assert not _needs_renewal(path, NOW, ["localhost"])
    assert not _needs_renewal(path, NOW, ["127.0.0.1", "ca.example"])
    assert not _needs_renewal(path, NOW, ["localhost", "ca.example", "127.0.0.1"])
    assert not _needs_renewal(path, NOW, [])
    assert _needs_renewal(path, NOW, ["localhost", "other.example"])
    assert _needs_renewal(path, NOW, ["10.0.0.1"])
    assert _needs_renewal(path, NOW, ["::1"])


def test_renewal_when_the_file_is_missing_or_unreadable(tmp_path: Path) -> None:
    assert _needs_renewal(tmp_path / "absent.pem", NOW, ["localhost"])
    assert _needs_renewal(_write(tmp_path, b"garbage"), NOW, ["localhost"])
    key_only = _pem()[0].split(b"-----BEGIN CERTIFICATE-----")[0]
    assert _needs_renewal(_write(tmp_path, key_only), NOW, ["localhost"])
