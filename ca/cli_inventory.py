"""`certwright inventory` and editing owners and tags.

certwright inventory [--owner X] [--tag T] [--status S] [--issuer I] [--name GLOB]
    [--expiring-within 30d] [--found-where GLOB] [--source S] [--kind issued|discovered]
    [--limit N] [--json | --csv] [--output FILE]
certwright inventory set SERIAL|sha256:FP [--owner X] [--tag T ...] [--untag T ...]
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import click

from ca.errors import CAError, Kind
from ca.runtime import Runtime
from ca.storage import inventory
from ca.storage.inventory import InventoryFilter, InventoryItem

CSV_COLUMNS = (
    "kind",
    "ref",
    "serial",
    "fingerprint",
    "status",
    "issuer",
    "not_before",
    "not_after",
    "owner",
    "tags",
    "source",
    "names",
    "replaces",
    "replaced_by",
    "ari_checked_at",
    "deployments",
)


def render_csv(items: Sequence[InventoryItem]) -> str:
    """One row per certificate; list fields are space-separated, deployments `kind:location`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for item in items:
        writer.writerow(
            [
                item.kind,
                item.ref,
                item.serial,
                item.fingerprint or "",
                item.status,
                item.issuer,
                item.not_before.isoformat(),
                item.not_after.isoformat(),
                item.owner or "",
                " ".join(item.tags),
                item.source,
                " ".join(item.names),
                item.replaces or "",
                item.replaced_by or "",
                item.ari_checked_at.isoformat() if item.ari_checked_at else "",
                " ".join(f"{d.kind}:{d.location}" for d in item.deployments),
            ]
        )
    return buffer.getvalue()


def render_json(items: Sequence[InventoryItem]) -> str:
    return json.dumps([i.to_json() for i in items], indent=2, sort_keys=True) + "\n"


def render_table(items: Sequence[InventoryItem]) -> str:
    lines = []
    for i in items:
        ref = i.ref if i.kind == "issued" else f"sha256:{(i.fingerprint or '')[:25]}"
        lineage = f" (renewed by {i.replaced_by})" if i.replaced_by else ""
        deployed = f" [{len(i.deployments)} deployed]" if i.deployments else ""
        lines.append(
            f"{ref:34} {i.kind:10} {i.status:10} {i.not_after:%Y-%m-%d %H:%M}  "
            f"{(i.owner or '-'):16} {(','.join(i.tags) or '-'):20} "
            f"{' '.join(i.names)}{deployed}{lineage}"
        )
    return "".join(f"{line}\n" for line in lines)


def _write_output(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise CAError(Kind.BAD_REQUEST, f"cannot write {path}: {exc.strerror}") from None


def register(main: click.Group) -> None:
    """Add this module's commands to the `certwright` group."""
    from ca.cli import _actor, _echo_json, _runtime, parse_duration, with_runtime

    @main.group(name="inventory", invoke_without_command=True)
    @click.option("--owner", help="Team or person.")
    @click.option("--tag", help="Certificates carrying this tag.")
    @click.option("--status", type=click.Choice(inventory.STATUSES))
    @click.option("--issuer", help="Our issuer id, or a discovered certificate's issuer DN (glob).")
    @click.option("--name", help="Exact name or glob (*.example.internal).")
    @click.option("--expiring-within", help="Unexpired and expiring within, e.g. 30d.")
    @click.option("--found-where", help="Deployed at a location matching this glob.")
    @click.option("--source", help="cli:*, acme:*, discovery, ... (exact or glob).")
    @click.option("--kind", type=click.Choice(inventory.KINDS))
    @click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
    @click.option("--json", "as_json", is_flag=True)
    @click.option("--csv", "as_csv", is_flag=True)
    @click.option(
        "--output", type=click.Path(dir_okay=False), help="Write the listing to FILE (export)."
    )
    @click.pass_context
    def inventory_group(
        ctx: click.Context,
        owner: str | None,
        tag: str | None,
        status: str | None,
        issuer: str | None,
        name: str | None,
        expiring_within: str | None,
        found_where: str | None,
        source: str | None,
        kind: str | None,
        limit: int,
        as_json: bool,
        as_csv: bool,
        output: str | None,
    ) -> None:
        """Every certificate we issued and every one discovered: owners, tags, deployments,
        lineage. Filters combine; soonest expiry first."""
        if ctx.invoked_subcommand is not None:
            return
        if as_json and as_csv:
            raise click.UsageError("give --json or --csv, not both")
        f = InventoryFilter(
            owner=owner,
            tag=tag,
            status=status,
            issuer=issuer,
            name=name,
            expiring_within=parse_duration(expiring_within) if expiring_within else None,
            found_where=found_where,
            source=source,
            kind=kind,
            limit=limit,
        )
        items = inventory.list_inventory(_runtime(ctx).storage, f)
        if as_csv:
            text = render_csv(items)
        elif as_json:
            text = render_json(items)
        else:
            text = render_table(items)
        if output:
            _write_output(output, text)
            click.echo(f"{len(items)} certificates written to {output}")
        else:
            click.echo(text, nl=False)

    @inventory_group.command("set")
    @click.argument("ref", metavar="SERIAL|sha256:FP")
    @click.option("--owner", help="New owner (an empty string clears it).")
    @click.option("--tag", "add", multiple=True, help="Add a tag (repeatable).")
    @click.option("--untag", "remove", multiple=True, help="Remove a tag (repeatable).")
    @click.option("--json", "as_json", is_flag=True)
    @with_runtime
    def inventory_set(
        runtime: Runtime,
        ref: str,
        owner: str | None,
        add: tuple[str, ...],
        remove: tuple[str, ...],
        as_json: bool,
    ) -> None:
        """Set the owner and add or remove tags of one certificate (audited)."""
        item = inventory.set_owner_and_tags(
            runtime.storage, ref, actor=_actor(), owner=owner, add_tags=add, remove_tags=remove
        )
        if as_json:
            _echo_json(item.to_json())
        else:
            click.echo(f"{item.ref}: owner {item.owner or '-'}, tags {','.join(item.tags) or '-'}")
