"""`certwright discover tls|files`: find certificates already deployed.

Each command scans first (no database needed for that), then records the whole scan in one
transaction (ca.storage.discovery). One line per target or path, then a summary; `--json` for
machines. The exit status is 0 whenever the scan ran, even if every endpoint was unreachable:
those are results, reported per target. A malformed target is a usage error (exit 2).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import click

from ca import discovery
from ca.errors import CAError
from ca.runtime import Runtime
from ca.storage import discovery as store

EXIT_USAGE = 2


def _certificate_json(record: store.ScanRecord, der: bytes) -> dict[str, Any]:
    fingerprint = hashlib.sha256(der).hexdigest()
    seen = record.certificates.get(fingerprint)
    if seen is None:
        return {"fingerprint_sha256": fingerprint, "error": "does not parse"}
    return {
        "fingerprint_sha256": fingerprint,
        "subject": seen.subject,
        "serial": seen.serial,
        "not_after": seen.not_after.isoformat(),
        "ours": seen.certificate_id is not None,
        "new": seen.new,
    }


def _leaf_summary(record: store.ScanRecord, chain: tuple[bytes, ...]) -> str:
    leaf = _certificate_json(record, chain[0])
    count = f"{len(chain)} certificate{'s' if len(chain) != 1 else ''}"
    if "subject" not in leaf:
        return f"{count}; the first does not parse"
    ours = ", ours" if leaf["ours"] else ""
    expiry = str(leaf["not_after"])[:10]
    return f"{count}; {leaf['subject'] or '(empty subject)'}, expires {expiry}{ours}"


def _summary_lines(record: store.ScanRecord, what: str) -> list[str]:
    lines = [
        f"scan {record.scan_id}: {record.targets} {what}, {record.errors} with errors, "
        + (f"{record.skipped} skipped, " if record.skipped else "")
        + f"{record.found} certificates ({record.new} new)"
    ]
    lines += [
        f"missing: {m.subject or m.fingerprint_sha256} at {m.location} "
        f"(not seen in {m.missed_scans} scans)"
        for m in record.missing
    ]
    return lines


def register(main: click.Group) -> None:
    """Add this module's commands to the `certwright` group."""
    from ca.cli import _actor, _echo_json, fail, with_runtime

    @main.group(name="discover")
    def discover() -> None:
        """Find certificates deployed on TLS endpoints and in files, into the inventory."""

    @discover.command("tls")
    @click.argument("targets", nargs=-1)
    @click.option(
        "--from-file",
        "from_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="A list of targets, one per line (# starts a comment).",
    )
    @click.option("--sni", help="Send this server name to every target (default: the host name).")
    @click.option("--timeout", type=float, help="Seconds per endpoint [discovery.timeout_seconds].")
    @click.option("--concurrency", type=int, help="Endpoints at a time [discovery.concurrency].")
    @click.option("--json", "as_json", is_flag=True)
    @with_runtime
    def discover_tls(
        runtime: Runtime,
        targets: tuple[str, ...],
        from_file: Path | None,
        sni: str | None,
        timeout: float | None,
        concurrency: int | None,
        as_json: bool,
    ) -> None:
        """Record the chain each TLS endpoint presents. TARGET is HOST:PORT, HOST:LOW-HIGH or
        [IPv6]:PORT."""
        texts = list(targets)
        try:
            if from_file is not None:
                texts += discovery.read_target_file(from_file)
            if not texts:
                fail("no target given (TARGET... or --from-file)", EXIT_USAGE)
            endpoints = discovery.parse_targets(texts, sni=sni)
        except CAError as exc:
            fail(exc.detail, EXIT_USAGE)
        timeout = (
            timeout
            if timeout is not None
            else float(runtime.config.get("discovery", "timeout_seconds"))
        )
        concurrency = (
            concurrency
            if concurrency is not None
            else int(runtime.config.get("discovery", "concurrency"))
        )
        if timeout <= 0 or concurrency < 1:
            fail("--timeout must be positive and --concurrency at least 1", EXIT_USAGE)
        started = runtime.clock.now()
        results = discovery.scan_endpoints(endpoints, timeout=timeout, concurrency=concurrency)
        observations = [
            store.Observation("tls", r.endpoint.location, r.chain, r.error) for r in results
        ]
        record = store.record_scan(
            runtime.storage,
            kind="tls",
            actor=_actor(),
            observations=observations,
            started_at=started,
            missing_after=int(runtime.config.get("discovery", "missing_after_scans")),
            detail={"timeout": timeout, "concurrency": concurrency, "sni": sni},
        )
        if as_json:
            _echo_json(
                record.to_json()
                | {
                    "results": [
                        {
                            "target": r.endpoint.address,
                            "location": r.endpoint.location,
                            "sni": r.endpoint.sni,
                            "tls_version": r.tls_version,
                            "error": r.error,
                            "certificates": [_certificate_json(record, d) for d in r.chain],
                        }
                        for r in results
                    ]
                }
            )
            return
        for r in results:
            if r.error is not None:
                click.echo(f"{r.endpoint.location}: error: {r.error}")
            else:
                click.echo(
                    f"{r.endpoint.location}: {r.tls_version}, {_leaf_summary(record, r.chain)}"
                )
        for line in _summary_lines(record, "endpoints"):
            click.echo(line)

    @discover.command("files")
    @click.argument("paths", nargs=-1, required=True)
    @click.option(
        "--max-size",
        type=int,
        default=discovery.DEFAULT_MAX_FILE_SIZE,
        show_default=True,
        help="Skip files larger than this many bytes.",
    )
    @click.option("--json", "as_json", is_flag=True)
    @with_runtime
    def discover_files(
        runtime: Runtime, paths: tuple[str, ...], max_size: int, as_json: bool
    ) -> None:
        """Find PEM, DER and PKCS#7 certificates in files and directories (walked recursively,
        symbolic link cycles skipped)."""
        if max_size < 1:
            fail("--max-size must be at least 1", EXIT_USAGE)
        started = runtime.clock.now()
        roots = [os.path.abspath(p) for p in paths]
        results = discovery.scan_files(roots, max_size=max_size)
        observations = [
            # Skipped files (too large, not regular) were not looked at: like errors, they
            # count no missed scan.
            store.Observation(
                "file",
                r.path,
                r.certificates,
                r.error if r.status == "error" else None,
                skipped=r.status == "skipped",
            )
            for r in results
        ]
        covers = [root for root in roots if os.path.isdir(root)]
        record = store.record_scan(
            runtime.storage,
            kind="files",
            actor=_actor(),
            observations=observations,
            started_at=started,
            missing_after=int(runtime.config.get("discovery", "missing_after_scans")),
            covers=covers,
            detail={"paths": roots, "max_size": max_size},
        )
        if as_json:
            _echo_json(
                record.to_json()
                | {
                    "results": [
                        {
                            "path": r.path,
                            "status": r.status,
                            "error": r.error,
                            "certificates": [_certificate_json(record, d) for d in r.certificates],
                        }
                        for r in results
                    ]
                }
            )
            return
        for r in results:
            if r.status == "found":
                note = f" (also: {r.error})" if r.error else ""
                click.echo(f"{r.path}: {_leaf_summary(record, r.certificates)}{note}")
            elif r.status == "none":
                click.echo(f"{r.path}: no certificate")
            else:
                click.echo(f"{r.path}: {r.status}: {r.error}")
        for line in _summary_lines(record, "paths"):
            click.echo(line)
