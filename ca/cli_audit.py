"""`certwright audit-log`: the hash-chained audit log (newest records, verify, export)."""

from __future__ import annotations

import json
import sys
from typing import TextIO

import click

from ca.runtime import Runtime
from ca.storage import audit
from ca.storage.store import _database_errors

EXIT_BROKEN = 4  # the chain does not verify


def register(main: click.Group) -> None:
    """Add `audit-log` and its subcommands to the `certwright` group."""
    from ca.cli import _echo_json, with_runtime

    @main.group("audit-log", invoke_without_command=True)
    @click.option("--limit", type=int, default=50, show_default=True)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def audit_log(ctx: click.Context, limit: int, as_json: bool) -> None:
        """The newest audit records; `verify` checks the chain, `export` writes JSON lines."""
        if ctx.invoked_subcommand is None:
            ctx.invoke(_newest, limit=limit, as_json=as_json)

    @with_runtime
    def _newest(runtime: Runtime, limit: int, as_json: bool) -> None:
        events = runtime.storage.audit_events(limit)
        if as_json:
            _echo_json(list(events))
            return
        for e in events:
            click.echo(
                f"{e['seq']:>8}  {e['time']}  {e['actor']:16} {e['action']:22} "
                f"{e['outcome']:8} {e['subject']}"
            )

    @audit_log.command("verify")
    @click.option(
        "--anchor",
        metavar="SEQ:HASH",
        help="A head printed by an earlier verify and kept outside the database.",
    )
    @click.option("--json", "as_json", is_flag=True)
    @with_runtime
    def verify(runtime: Runtime, anchor: str | None, as_json: bool) -> None:
        """Walk the whole chain; exit 4 when a record was edited, deleted or reordered."""
        expected = audit.parse_anchor(anchor) if anchor else None
        with _database_errors(), runtime.storage.engine.connect() as connection:
            verdict = audit.verify(connection, anchor=expected)
        if as_json:
            _echo_json(verdict.to_json())
        elif verdict.ok:
            head = f"{verdict.head_seq}:{verdict.head_hash}"
            click.echo(f"ok: {verdict.records} records chained; head {head}")
        else:
            click.echo(f"certwright: audit log broken: {verdict.problem}", err=True)
        if not verdict.ok:
            sys.exit(EXIT_BROKEN)

    @audit_log.command("export")
    @click.option(
        "--output",
        "-o",
        type=click.File("w"),
        default="-",
        help="File to write (default: stdout).",
    )
    @click.option("--after-seq", type=int, default=0, help="Only records after this one.")
    @with_runtime
    def export(runtime: Runtime, output: TextIO, after_seq: int) -> None:
        """Every record as one JSON object per line, oldest first, with its chain hashes."""
        with _database_errors(), runtime.storage.engine.connect() as connection:
            for record in audit.records(connection, after_seq=after_seq):
                output.write(json.dumps(record.to_json(), sort_keys=True) + "\n")
