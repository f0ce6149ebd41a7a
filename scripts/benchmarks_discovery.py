"""Discovery benchmark: a TLS scan of N loopback endpoints, recorded into a temporary SQLite
database. Part of `scripts/bench inventory` (target: 1,000 endpoints in <= 30 s); on its own:

  .venv/bin/python -m scripts.benchmarks_discovery [--endpoints 1000] [--concurrency 64]

The endpoints are real TLS listeners, one port each, each presenting its own leaf certificate
plus a shared root: two child processes run an asyncio server per port. The scan is the one
`certwright discover tls` runs (ca.discovery) and the import is its recording
(ca.storage.discovery). Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import multiprocessing
import socket
import ssl
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca import discovery
from ca.storage import Storage
from ca.storage import discovery as discovery_store

SERVER_PROCESSES = 2


def _write_certificates(directory: Path, count: int) -> None:
    """A root and `count` leaves (one key shared by the leaves: key generation is not what is
    measured), as `leaf-N.pem` (leaf + root) and `key.pem`."""
    now = datetime.datetime.now(datetime.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "discovery bench root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    root_pem = root.public_bytes(serialization.Encoding.PEM)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    (directory / "key.pem").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for index in range(count):
        name = f"endpoint-{index}.bench.test"
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(root_name)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(root_key, hashes.SHA256())
        )
        pem = leaf.public_bytes(serialization.Encoding.PEM) + root_pem
        (directory / f"leaf-{index}.pem").write_bytes(pem)


async def _serve(directory: Path, indexes: list[int], report: Connection) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1)  # until the scanner closes
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    servers = []
    ports = []
    for index in indexes:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(directory / f"leaf-{index}.pem", directory / "key.pem")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        servers.append(await asyncio.start_server(handle, sock=sock, ssl=context))
        ports.append(sock.getsockname()[1])
    report.send(ports)
    report.close()
    await asyncio.Event().wait()  # until terminated


def _server_process(directory: str, indexes: list[int], report: Connection) -> None:
    asyncio.run(_serve(Path(directory), indexes, report))


def bench_discovery(
    endpoints: int = 1000, concurrency: int = 64, timeout: float = 5.0, *, echo: bool = True
) -> dict[str, Any]:
    """Start `endpoints` loopback TLS endpoints, scan them twice (first sight, then re-scan)
    and record each scan in a temporary SQLite database; the times, in seconds. `seconds` is
    the first scan plus its import, the figure compared with the 30 s target; `echo` prints
    the figures too."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="certwright-bench-discovery-") as tmp:
        workdir = Path(tmp)
        _write_certificates(workdir, endpoints)
        children = []
        ports: list[int] = []
        try:
            for part in range(SERVER_PROCESSES):
                receive, send = context.Pipe(duplex=False)
                indexes = list(range(part, endpoints, SERVER_PROCESSES))
                child = context.Process(
                    target=_server_process, args=(str(workdir), indexes, send), daemon=True
                )
                child.start()
                send.close()
                children.append((child, receive))
            for _, receive in children:
                ports += receive.recv()
            storage = Storage(f"sqlite:///{workdir / 'bench.db'}")
            storage.migrate()
            targets = [discovery.Endpoint("127.0.0.1", port, None) for port in sorted(ports)]
            figures: dict[str, Any] = {"endpoints": len(targets), "concurrency": concurrency}
            for label in ("first", "rescan"):
                started = time.perf_counter()
                results = discovery.scan_endpoints(
                    targets, timeout=timeout, concurrency=concurrency
                )
                scanned = time.perf_counter()
                record = discovery_store.record_scan(
                    storage,
                    kind="tls",
                    actor="bench",
                    observations=[
                        discovery_store.Observation("tls", r.endpoint.location, r.chain, r.error)
                        for r in results
                    ],
                    started_at=datetime.datetime.now(datetime.UTC),
                    missing_after=3,
                )
                done = time.perf_counter()
                figures[label] = {
                    "scan_seconds": round(scanned - started, 3),
                    "import_seconds": round(done - scanned, 3),
                    "total_seconds": round(done - started, 3),
                    "answered": sum(1 for r in results if r.error is None),
                    "errors": record.errors,
                    "certificates": record.found,
                }
            storage.dispose()
        finally:
            for child, _ in children:
                child.terminate()
                child.join(10)
    figures["seconds"] = figures["first"]["total_seconds"]
    figures["target_seconds"] = 30.0
    if echo:
        print_figures(figures)
    return figures


def print_figures(figures: dict[str, Any]) -> None:
    print(f"discovery scan of {figures['endpoints']} loopback TLS endpoints (target <= 30 s)")
    for label in ("first", "rescan"):
        f = figures[label]
        print(
            f"  {label:6}  {f['total_seconds']:.2f} s  (scan {f['scan_seconds']:.2f} s, "
            f"import {f['import_seconds']:.2f} s; {f['answered']} answered, "
            f"{f['errors']} errors, {f['certificates']} certificates)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts.benchmarks_discovery")
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    bench_discovery(args.endpoints, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
