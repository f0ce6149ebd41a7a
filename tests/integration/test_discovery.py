"""Discovery: real TLS servers on loopback (threads in this process, started and stopped by the
tests) presenting chains issued by our CA and self-signed ones, bad endpoints of every kind,
and real files and directories with certificates, junk, loops and unreadable entries."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from ca import discovery
from ca.clock import FakeClock
from ca.errors import CAError
from ca.issuance import CertificateAuthority, IssuanceRequest, IssuedCertificate
from ca.policy import Identifier
from ca.storage import Storage
from ca.storage import discovery as store
from ca.storage.models import AuditEvent, CertificateSighting, DiscoveredCertificate, DiscoveryScan
from tests.conftest import VENV_BIN, run_cli

TIMEOUT = 5.0

# -- certificates and servers ------------------------------------------------------------------


def _issue(authority: CertificateAuthority, name: str) -> tuple[IssuedCertificate, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = authority.issue(
        IssuanceRequest(key.public_key(), (Identifier("dns", name),), "tls-server")
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return issued, key_pem


def _self_signed(
    name: str, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
) -> tuple[x509.Certificate, bytes]:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA384()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, algorithm)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate, key_pem


def _pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _context(directory: Path, label: str, chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    (directory / f"{label}.chain.pem").write_bytes(chain_pem)
    (directory / f"{label}.key.pem").write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / f"{label}.chain.pem", directory / f"{label}.key.pem")
    return context


class _Listener:
    """A loopback TCP listener in a thread; `serve(conn)` runs per connection in its own
    thread. Stopping closes the listener and every open connection."""

    def __init__(self, serve: Callable[[socket.socket], None], host: str = "127.0.0.1") -> None:
        self._serve = serve
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, 0), family=family)
        self._sock.settimeout(0.2)  # so the accept loop notices `stop()`
        self.port: int = self._sock.getsockname()[1]
        self._stopped = threading.Event()
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._loop, daemon=True)
        self._accept.start()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(30)
            self._connections.append(conn)
            thread = threading.Thread(target=self._guarded, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _guarded(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            try:
                self._serve(conn)
            finally:
                conn.close()

    def stop(self) -> None:
        self._stopped.set()
        self._accept.join()
        self._sock.close()
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)


class TlsServer:
    """A real TLS server: presents `chains[None]`, or `chains[name]` for an SNI name it has.
    `chains` may be changed while it runs (a certificate replaced on the endpoint)."""

    def __init__(self, chains: dict[str | None, ssl.SSLContext], host: str = "127.0.0.1") -> None:
        self.chains = chains
        self.sni_seen: list[str | None] = []
        self._front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._front.sni_callback = self._pick
        self._listener = _Listener(self._handle, host)
        self.port = self._listener.port

    def _pick(self, connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        self.sni_seen.append(name)
        connection.context = self.chains.get(name) or self.chains[None]

    def _handle(self, conn: socket.socket) -> None:
        with self._front.wrap_socket(conn, server_side=True) as tls:
            while tls.recv(1024):
                pass

    def stop(self) -> None:
        self._listener.stop()


@contextlib.contextmanager
def tls_server(
    chains: dict[str | None, ssl.SSLContext], host: str = "127.0.0.1"
) -> Iterator[TlsServer]:
    server = TlsServer(chains, host)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def raw_server(serve: Callable[[socket.socket], None]) -> Iterator[int]:
    listener = _Listener(serve)
    try:
        yield listener.port
    finally:
        listener.stop()


def _drain(conn: socket.socket) -> None:
    while conn.recv(1024):
        pass


def _silent(conn: socket.socket) -> None:
    _drain(conn)  # accepts, never answers, until the scanner gives up


def _plain_tcp(conn: socket.socket) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
    _drain(conn)


def _tls_shaped_garbage(conn: socket.socket) -> None:
    # A TLS record header (handshake, TLS 1.0, 32 bytes) around bytes that are no handshake.
    conn.sendall(b"\x16\x03\x01\x00\x20" + b"\xde\xad\xbe\xef" * 8)
    _drain(conn)


def _random_garbage(conn: socket.socket) -> None:
    conn.sendall(bytes((i * 73 + 41) % 256 for i in range(4096)))
    _drain(conn)


def _hang_up(conn: socket.socket) -> None:
    conn.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that is bound (so nothing else takes it) but not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _scan(*endpoints: discovery.Endpoint, timeout: float = TIMEOUT) -> list[discovery.TlsResult]:
    return discovery.scan_endpoints(list(endpoints), timeout=timeout, concurrency=8)


def _record(storage: Storage, results: list[discovery.TlsResult]) -> store.ScanRecord:
    return store.record_scan(
        storage,
        kind="tls",
        actor="tests",
        observations=[
            store.Observation("tls", r.endpoint.location, r.chain, r.error) for r in results
        ],
        started_at=storage.clock.now(),
        missing_after=3,
    )


def _sightings(storage: Storage) -> dict[tuple[str, str], CertificateSighting]:
    """(certificate CN, location) -> sighting."""
    with storage.transaction() as session:
        rows = session.execute(
            select(DiscoveredCertificate.common_name, CertificateSighting).join(
                DiscoveredCertificate,
                DiscoveredCertificate.id == CertificateSighting.discovered_id,
            )
        ).all()
        return {(str(cn), sighting.location): sighting for cn, sighting in rows}


def _discovered(storage: Storage) -> dict[str, DiscoveredCertificate]:
    with storage.transaction() as session:
        rows = session.execute(select(DiscoveredCertificate)).scalars().all()
        return {str(row.common_name): row for row in rows}


# -- targets -----------------------------------------------------------------------------------


def test_targets_ports_ranges_ipv6_and_sni() -> None:
    assert discovery.parse_target("127.0.0.1:443") == [discovery.Endpoint("127.0.0.1", 443, None)]
    assert [e.port for e in discovery.parse_target("10.0.0.1:8440-8443")] == [
        8440,
        8441,
        8442,
        8443,
    ]
    (v6,) = discovery.parse_target("[::1]:8443")
    assert (v6.host, v6.port, v6.sni, v6.location) == ("::1", 8443, None, "[::1]:8443")
    (name,) = discovery.parse_target("web.example.test:443")
    assert name.sni == "web.example.test" and name.location == "web.example.test:443"
    (forced,) = discovery.parse_target("127.0.0.1:443", sni="b.test")
    assert forced.location == "127.0.0.1:443 sni=b.test"
    # Duplicates across targets are scanned once.
    assert len(discovery.parse_targets(["a.test:1-3", "a.test:2"])) == 3


@pytest.mark.parametrize(
    "text",
    [
        "localhost",
        "localhost:",
        "host:0",
        "host:70000",
        "host:9-3",
        "::1:443",
        "[nope]:443",
        "a b:443",
        "host:44x",
    ],
)
def test_malformed_targets_are_refused(text: str) -> None:
    with pytest.raises(CAError):
        discovery.parse_target(text)


@pytest.mark.parametrize("sni", ["10.0.0.1", "a b", "", "-"])
def test_sni_must_be_a_host_name(sni: str) -> None:
    with pytest.raises(CAError, match="SNI"):
        discovery.parse_target("127.0.0.1:443", sni=sni)


def test_target_list_file(tmp_path: Path) -> None:
    listing = tmp_path / "targets.txt"
    listing.write_text(
        "# our web tier\n10.0.0.1:443\n\n  10.0.0.2:8443-8444  # staging\n[::1]:443\n"
    )
    assert discovery.read_target_file(listing) == [
        "10.0.0.1:443",
        "10.0.0.2:8443-8444",
        "[::1]:443",
    ]
    with pytest.raises(CAError, match="cannot read target list"):
        discovery.read_target_file(tmp_path / "absent.txt")


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_scan_records_presented_chains_linked_to_our_records(
    authority: CertificateAuthority, storage: Storage, tmp_path: Path
) -> None:
    issued, key_pem = _issue(authority, "shop.example.test")
    shadow, shadow_key = _self_signed(
        "shadow.example.test", ec.generate_private_key(ec.SECP384R1())
    )
    ours = _context(tmp_path, "ours", issued.fullchain_pem().encode(), key_pem)
    theirs = _context(tmp_path, "shadow", _pem(shadow), shadow_key)
    with tls_server({None: ours}) as a, tls_server({None: theirs}) as b:
        results = _scan(
            *discovery.parse_target(f"127.0.0.1:{a.port}"),
            *discovery.parse_target(f"127.0.0.1:{b.port}"),
        )
    assert [r.error for r in results] == [None, None]
    # The whole chain as presented: leaf, then the issuing intermediate.
    assert results[0].chain == (_der(issued.certificate), *(_der(c) for c in issued.chain))
    assert results[0].tls_version in ("TLSv1.2", "TLSv1.3")
    assert results[1].chain == (_der(shadow),)

    record = _record(storage, results)
    assert (record.targets, record.found, record.new, record.errors) == (2, 3, 3, 0)
    found = _discovered(storage)
    leaf = found["shop.example.test"]
    assert leaf.certificate_id == issued.record.id  # ours: same serial, identical DER
    assert leaf.serial == issued.record.serial
    assert (leaf.key_type, leaf.signature_algorithm) == ("ec-p256", "ecdsa-with-SHA256")
    assert leaf.names == "shop.example.test"
    assert not leaf.self_signed and not leaf.is_ca
    assert leaf.not_after == issued.certificate.not_valid_after_utc
    intermediate = found["certwright test issuing-ec"]
    assert intermediate.is_ca and intermediate.certificate_id is None
    other = found["shadow.example.test"]
    assert other.self_signed and other.certificate_id is None
    assert (other.key_type, other.signature_algorithm) == ("ec-p384", "ecdsa-with-SHA384")
    sightings = _sightings(storage)
    assert set(sightings) == {
        ("shop.example.test", f"127.0.0.1:{a.port}"),
        ("certwright test issuing-ec", f"127.0.0.1:{a.port}"),
        ("shadow.example.test", f"127.0.0.1:{b.port}"),
    }
    assert all(
        s.location_kind == "tls" and s.last_scan_id == record.scan_id for s in sightings.values()
    )
    with storage.transaction() as session:
        scan = session.get(DiscoveryScan, record.scan_id)
        assert scan is not None and (scan.kind, scan.targets, scan.found) == ("tls", 2, 3)
        event = session.execute(
            select(AuditEvent).where(AuditEvent.action == "discovery.scan")
        ).scalar_one()
        assert event.subject == f"scan:{record.scan_id}"


def test_sni_selects_the_chain_and_defaults_to_the_host_name(tmp_path: Path) -> None:
    default, default_key = _self_signed("default.test", ec.generate_private_key(ec.SECP256R1()))
    named, named_key = _self_signed("b.test", ed25519.Ed25519PrivateKey.generate())
    local, local_key = _self_signed("localhost", ec.generate_private_key(ec.SECP256R1()))
    chains: dict[str | None, ssl.SSLContext] = {
        None: _context(tmp_path, "default", _pem(default), default_key),
        "b.test": _context(tmp_path, "b", _pem(named), named_key),
        "localhost": _context(tmp_path, "localhost", _pem(local), local_key),
    }
    with tls_server(chains) as server:
        by_ip, forced, by_name = _scan(
            *discovery.parse_target(f"127.0.0.1:{server.port}"),
            *discovery.parse_target(f"127.0.0.1:{server.port}", sni="b.test"),
            *discovery.parse_target(f"localhost:{server.port}"),
        )
    assert by_ip.chain == (_der(default),)
    assert forced.chain == (_der(named),) and forced.endpoint.location.endswith(" sni=b.test")
    assert by_name.chain == (_der(local),)
    assert set(server.sni_seen) == {None, "b.test", "localhost"}


def test_ipv6_endpoint(tmp_path: Path) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    certificate, key = _self_signed("v6.test", ec.generate_private_key(ec.SECP256R1()))
    with tls_server({None: _context(tmp_path, "v6", _pem(certificate), key)}, "::1") as server:
        (result,) = _scan(*discovery.parse_target(f"[::1]:{server.port}"))
    assert result.error is None and result.chain == (_der(certificate),)
    assert result.endpoint.location == f"[::1]:{server.port}"


def test_rescan_moves_last_seen_and_a_replaced_certificate_is_flagged_after_n_scans(
    storage: Storage, tmp_path: Path
) -> None:
    clock = FakeClock(datetime.datetime.now(datetime.UTC).replace(microsecond=0))
    storage.clock = clock
    old, old_key = _self_signed("old.test", ec.generate_private_key(ec.SECP256R1()))
    new, new_key = _self_signed("new.test", ec.generate_private_key(ec.SECP256R1()))
    old_context = _context(tmp_path, "old", _pem(old), old_key)
    new_context = _context(tmp_path, "new", _pem(new), new_key)
    with tls_server({None: old_context}) as server:
        endpoint = discovery.parse_target(f"127.0.0.1:{server.port}")
        location = endpoint[0].location
        first = _record(storage, _scan(*endpoint))
        seen_at = clock.now()
        clock.advance(datetime.timedelta(hours=1))
        _record(storage, _scan(*endpoint))
        sighting = _sightings(storage)[("old.test", location)]
        assert (sighting.first_seen, sighting.last_seen) == (seen_at, clock.now())
        assert sighting.last_scan_id != first.scan_id and sighting.missed_scans == 0
        assert _discovered(storage)["old.test"].last_seen == clock.now()

        # The endpoint now presents another certificate: the old one misses scans.
        server.chains = {None: new_context}
        for expected_misses in (1, 2, 3):
            clock.advance(datetime.timedelta(hours=1))
            record = _record(storage, _scan(*endpoint))
            assert _sightings(storage)[("old.test", location)].missed_scans == expected_misses
            flagged = [(m.subject, m.location) for m in record.missing]
            assert flagged == ([("CN=old.test", location)] if expected_misses >= 3 else [])
        assert _sightings(storage)[("new.test", location)].missed_scans == 0

        # Seen again: back to zero; the new one misses one.
        server.chains = {None: old_context}
        record = _record(storage, _scan(*endpoint))
        assert record.missing == []
        sightings = _sightings(storage)
        assert sightings[("old.test", location)].missed_scans == 0
        assert sightings[("new.test", location)].missed_scans == 1

    # Unreachable is scanned-with-error: an outage counts no miss for anything there.
    record = _record(storage, _scan(*endpoint))
    assert record.errors == 1 and record.found == 0
    sightings = _sightings(storage)
    assert sightings[("old.test", location)].missed_scans == 0
    assert sightings[("new.test", location)].missed_scans == 1


@pytest.mark.parametrize(
    ("serve", "expected"),
    [
        (_silent, "timed out"),
        (_plain_tcp, "TLS handshake failed"),
        (_tls_shaped_garbage, "TLS handshake failed"),
        (_random_garbage, "TLS handshake failed"),
        (_hang_up, "connection"),
    ],
    ids=["silent", "plain-tcp", "tls-shaped-garbage", "random-garbage", "hang-up"],
)
def test_bad_endpoints_are_reported_and_the_scan_goes_on(
    serve: Callable[[socket.socket], None], expected: str, refused_port: int, tmp_path: Path
) -> None:
    good, good_key = _self_signed("good.test", ec.generate_private_key(ec.SECP256R1()))
    with (
        raw_server(serve) as bad_port,
        tls_server({None: _context(tmp_path, "good", _pem(good), good_key)}) as server,
    ):
        bad, refused, ok = _scan(
            *discovery.parse_target(f"127.0.0.1:{bad_port}"),
            *discovery.parse_target(f"127.0.0.1:{refused_port}"),
            *discovery.parse_target(f"127.0.0.1:{server.port}"),
            timeout=1.0,
        )
    assert bad.error is not None and expected in bad.error and bad.chain == ()
    assert refused.error == "connection refused"
    assert ok.error is None and ok.chain == (_der(good),)


def test_cli_discover_tls(refused_port: int, tmp_path: Path) -> None:
    certificate, key = _self_signed("cli.test", ec.generate_private_key(ec.SECP256R1()))
    env = {"CERTWRIGHT_DATABASE__URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    listing = tmp_path / "targets.txt"
    with tls_server({None: _context(tmp_path, "cli", _pem(certificate), key)}) as server:
        listing.write_text(f"# one good, one refused\n127.0.0.1:{server.port}\n")
        result = run_cli(
            "discover",
            "tls",
            f"127.0.0.1:{refused_port}",
            "--from-file",
            str(listing),
            "--timeout",
            "2",
            env=env,
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == f"127.0.0.1:{refused_port}: error: connection refused"
        assert lines[1].startswith(f"127.0.0.1:{server.port}: TLSv1.")
        assert "1 certificate; CN=cli.test, expires" in lines[1]
        assert lines[2].startswith("scan 1: 2 endpoints, 1 with errors, 1 certificates (1 new)")

        as_json = run_cli("discover", "tls", f"127.0.0.1:{server.port}", "--json", env=env)
        assert as_json.returncode == 0, as_json.stderr
        report = json.loads(as_json.stdout)
        assert (report["scan_id"], report["found"], report["new"]) == (2, 1, 0)
        (entry,) = report["results"]
        assert entry["error"] is None
        assert entry["certificates"][0]["subject"] == "CN=cli.test"
        assert entry["certificates"][0]["ours"] is False

    for bad in ("nohost", "127.0.0.1:99999", "127.0.0.1:9-3"):
        refused = run_cli("discover", "tls", bad, env=env)
        assert refused.returncode == 2
        assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("certwright: error:")
    nothing = run_cli("discover", "tls", env=env)
    assert nothing.returncode == 2 and "no target" in nothing.stderr


# -- files -------------------------------------------------------------------------------------


def test_files_pem_der_pkcs7_and_bad_entries(
    authority: CertificateAuthority, storage: Storage, tmp_path: Path
) -> None:
    issued, _ = _issue(authority, "files.example.test")
    chain = (issued.certificate, *issued.chain)
    edwards, _ = _self_signed("ed.test", ed25519.Ed25519PrivateKey.generate())
    root = tmp_path / "scan"
    (root / "sub").mkdir(parents=True)
    broken = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    (root / "bundle.pem").write_bytes(b"# deployed chain\n" + _pem(*chain) + broken)
    (root / "leaf.der").write_bytes(_der(issued.certificate))
    (root / "sub" / "chain.p7b").write_bytes(
        pkcs7.serialize_certificates(list(chain), serialization.Encoding.DER)
    )
    (root / "sub" / "chain.p7c").write_bytes(
        pkcs7.serialize_certificates([edwards], serialization.Encoding.PEM)
    )
    (root / "junk.bin").write_bytes(b"\x30\x82" + bytes((i * 31) % 256 for i in range(5000)))
    with (root / "huge.pem").open("wb") as huge:
        huge.truncate(64 * 1024 * 1024)  # sparse: nothing written, larger than the cap
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    os.symlink(root, root / "sub" / "up")  # a directory cycle
    os.symlink("absent.pem", root / "dangling.pem")
    os.mkfifo(root / "fifo")  # opening it would block: must be skipped, not read

    results = {os.path.relpath(r.path, root): r for r in discovery.scan_files([root])}
    status = {path: (r.status, r.error) for path, r in results.items()}
    assert status["bundle.pem"] == ("found", "a PEM CERTIFICATE block does not parse")
    assert results["bundle.pem"].certificates == tuple(_der(c) for c in chain)
    assert results["leaf.der"].certificates == (_der(issued.certificate),)
    # PKCS#7 holds a SET OF certificates: DER sorts them, so the order is not the chain's.
    assert sorted(results["sub/chain.p7b"].certificates) == sorted(_der(c) for c in chain)
    assert results["sub/chain.p7c"].certificates == (_der(edwards),)
    assert status["junk.bin"] == ("none", None)
    assert status["huge.pem"] == ("skipped", f"larger than {discovery.DEFAULT_MAX_FILE_SIZE} bytes")
    assert status["loop-a"] == status["loop-b"] == ("error", "symbolic link loop")
    assert status["sub/up"] == ("skipped", "already scanned (through another link)")
    assert status["dangling.pem"] == ("error", "no such file or directory")
    assert status["fifo"] == ("skipped", "not a regular file")
    assert "." not in status  # a directory walked without trouble is not a result itself

    record = store.record_scan(
        storage,
        kind="files",
        actor="tests",
        observations=[
            store.Observation(
                "file",
                r.path,
                r.certificates,
                r.error if r.status == "error" else None,
                skipped=r.status == "skipped",
            )
            for r in results.values()
        ],
        started_at=storage.clock.now(),
        missing_after=3,
        covers=[str(root)],
    )
    assert record.found == 3 and record.errors == 3 and record.skipped == 3
    found = _discovered(storage)
    assert found["files.example.test"].certificate_id == issued.record.id
    assert found["ed.test"].key_type == "ed25519" and found["ed.test"].self_signed
    locations = {loc for (cn, loc) in _sightings(storage) if cn == "files.example.test"}
    assert locations == {str(root / p) for p in ("bundle.pem", "leaf.der", "sub/chain.p7b")}


def test_certificate_facts_name_weak_keys_and_signatures() -> None:
    """Findings judge these columns: they must say exactly what was deployed."""
    p192, _ = _self_signed("p192.test", ec.generate_private_key(ec.SECP192R1()))
    facts = store.certificate_facts(_der(p192))
    assert (facts.key_type, facts.signature_algorithm) == ("ec-secp192r1", "ecdsa-with-SHA384")
    # cryptography refuses to sign with SHA-1; openssl still does, as old deployments did.
    made = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:1024",
            "-sha1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=old.test",
            "-set_serial",
            "0x00ff01",
            "-keyout",
            "/dev/null",
            "-outform",
            "DER",
        ],
        capture_output=True,
        check=True,
    )
    sha1 = x509.load_der_x509_certificate(made.stdout)
    facts = store.certificate_facts(_der(sha1))
    assert (facts.key_type, facts.signature_algorithm) == ("rsa-1024", "sha1WithRSAEncryption")
    assert facts.serial == "ff01" and facts.self_signed and facts.names == ""
    with pytest.raises(ValueError):
        store.certificate_facts(b"\x30\x03\x02\x01\x01")


def _cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        "CERTWRIGHT_DATABASE__URL": f"sqlite:///{tmp_path / 'files.db'}",
        "CERTWRIGHT_DISCOVERY__MISSING_AFTER_SCANS": "2",
    }


def test_cli_files_a_deleted_certificate_file_is_flagged(tmp_path: Path) -> None:
    certificate, _ = _self_signed("gone.test", ec.generate_private_key(ec.SECP256R1()))
    directory = tmp_path / "etc-ssl"
    directory.mkdir()
    (directory / "gone.pem").write_bytes(_pem(certificate))
    env = _cli_env(tmp_path)
    first = run_cli("discover", "files", str(directory), env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"{directory / 'gone.pem'}: 1 certificate; CN=gone.test, expires "
        f"{certificate.not_valid_after_utc:%Y-%m-%d}",
        "scan 1: 1 paths, 0 with errors, 1 certificates (1 new)",
    ]
    (directory / "gone.pem").unlink()
    run_cli("discover", "files", str(directory), env=env)
    second = run_cli("discover", "files", str(directory), "--json", env=env)
    assert second.returncode == 0, second.stderr
    (missing,) = json.loads(second.stdout)["missing"]
    assert missing["location"] == str(directory / "gone.pem") and missing["missed_scans"] == 2
    assert missing["subject"] == "CN=gone.test"


def test_cli_files_unreadable_entries_are_reported_and_count_no_miss(tmp_path: Path) -> None:
    """chmod 000 stops every user but root, whose CAP_DAC_OVERRIDE reads anything. As root the
    CLI runs with those capabilities dropped (setpriv), which is what an unreadable file is to
    any process that is not all-powerful; as root without setpriv the test cannot make one and
    skips. As root it also scans once with full rights first, to show that a file or directory
    turning unreadable counts no missed scan for what was seen there."""
    readable, _ = _self_signed("readable.test", ec.generate_private_key(ec.SECP256R1()))
    hidden, _ = _self_signed("hidden.test", ec.generate_private_key(ec.SECP256R1()))
    inner, _ = _self_signed("inner.test", ec.generate_private_key(ec.SECP256R1()))
    directory = tmp_path / "certs"
    (directory / "private").mkdir(parents=True)
    (directory / "readable.pem").write_bytes(_pem(readable))
    secret = directory / "secret.pem"
    secret.write_bytes(_pem(hidden))
    (directory / "private" / "inner.pem").write_bytes(_pem(inner))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTWRIGHT_")}
    env |= _cli_env(tmp_path)  # missing after 2 scans
    prefix: list[str] = []
    as_root = os.geteuid() == 0
    if as_root:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: no file is unreadable to root")
        prefix = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
        first = run_cli("discover", "files", str(directory), env=_cli_env(tmp_path))
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines()[-1].startswith("scan 1: 3 paths, 0 with errors")

    def scan() -> list[str]:
        result = subprocess.run(
            [*prefix, str(VENV_BIN / "certwright"), "discover", "files", str(directory)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    secret.chmod(0)
    (directory / "private").chmod(0)
    try:
        lines = scan()
        if as_root:
            lines = scan()  # twice: more than enough misses to flag, were misses counted
    finally:
        secret.chmod(0o600)
        (directory / "private").chmod(0o700)
    assert f"{directory / 'private'}: error: permission denied" in lines
    assert f"{secret}: error: permission denied" in lines
    assert any(line.startswith(f"{directory / 'readable.pem'}: 1 certificate") for line in lines)
    assert lines[-1].endswith(
        "3 paths, 2 with errors, 1 certificates (0 new)"
        if as_root
        else "3 paths, 2 with errors, 1 certificates (1 new)"
    )
    if as_root:
        storage = Storage(_cli_env(tmp_path)["CERTWRIGHT_DATABASE__URL"])
        try:
            sightings = _sightings(storage)
        finally:
            storage.dispose()
        assert {cn: s.missed_scans for (cn, _), s in sightings.items()} == {
            "readable.test": 0,
            "hidden.test": 0,
            "inner.test": 0,
        }


def test_benchmark_scans_and_records_every_endpoint() -> None:
    """The `scripts/bench inventory` discovery figure, at a small N: every endpoint answers
    and every certificate is recorded (times are printed by the benchmark, not judged here)."""
    from scripts.benchmarks_discovery import bench_discovery

    figures = bench_discovery(endpoints=6, concurrency=4, echo=False)
    for label in ("first", "rescan"):
        assert figures[label]["answered"] == 6 and figures[label]["errors"] == 0
        assert figures[label]["certificates"] == 7  # six leaves and their root
