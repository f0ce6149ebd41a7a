"""`certwright audit` (findings) and `certwright monitor` (expiry alerts).

`certwright audit` exits 0 whatever it finds unless `--fail-on SEVERITY` is given; then it
exits 3 (EXIT_FINDINGS) when at least one finding is at or above that severity, so a CI
pipeline can gate on it. Errors are exit 1 as for every command.
"""

from __future__ import annotations

import sys

import click

from ca.findings import SEVERITIES, at_or_above, compute_findings, severity_rank
from ca.runtime import Runtime

EXIT_FINDINGS = 3  # `audit --fail-on`: a finding at or above the chosen severity exists


def register(main: click.Group) -> None:
    """Add this module's commands to the `certwright` group."""
    from ca.cli import _echo_json, with_runtime

    severity = click.Choice(SEVERITIES, case_sensitive=False)

    @main.command("audit")
    @click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
    @click.option(
        "--fail-on",
        type=severity,
        help=f"Exit {EXIT_FINDINGS} when a finding at or above this severity exists.",
    )
    @click.option(
        "--min-severity",
        type=severity,
        default="info",
        show_default=True,
        help="Show only findings at or above this severity.",
    )
    @with_runtime
    def audit_command(
        runtime: Runtime, as_json: bool, fail_on: str | None, min_severity: str
    ) -> None:
        """Findings over the inventory: expired, expiring, weak, too long, shadow, revoked."""
        findings = compute_findings(runtime.storage, runtime.config, runtime.clock.now())
        shown = at_or_above(findings, min_severity.lower())
        if as_json:
            _echo_json([f.to_json() for f in shown])
        elif not shown:
            click.echo("no findings")
        else:
            for f in shown:
                who = f.owner or "-"
                names = ",".join(f.names)[:40] or "-"
                click.echo(
                    f"{f.severity:8} {f.code:20} {f.subject[:40]:40} {who[:16]:16} "
                    f"{names:40} {f.message}"
                )
            counts = {s: 0 for s in SEVERITIES}
            for f in shown:
                counts[f.severity] += 1
            click.echo(
                f"{len(shown)} findings: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
            )
        if fail_on and any(
            severity_rank(f.severity) <= severity_rank(fail_on.lower()) for f in findings
        ):
            sys.exit(EXIT_FINDINGS)

    @main.command("monitor")
    @click.option(
        "--once",
        is_flag=True,
        required=True,
        help="Run one pass and exit (`certwright serve` runs it periodically).",
    )
    @click.option("--json", "as_json", is_flag=True)
    @click.option(
        "--dry-run", is_flag=True, help="Show what would be queued and sent; change nothing."
    )
    @with_runtime
    def monitor_command(runtime: Runtime, once: bool, as_json: bool, dry_run: bool) -> None:
        """Expiry monitor: queue notifications for thresholds crossed and deliver due ones."""
        from ca import monitor

        report = monitor.run_once(
            runtime.storage, runtime.config, runtime.clock.now(), dry_run=dry_run
        )
        if as_json:
            _echo_json(report.to_json())
            return
        config = runtime.config
        if not config.get("monitor", "webhook_urls") and not config.get("monitor", "smtp_host"):
            click.echo(
                "note: no channel configured (monitor.webhook_urls, monitor.smtp_host): "
                "nothing is queued",
                err=True,
            )
        verb = "would queue" if dry_run else "queued"
        for q in report.queued:
            click.echo(
                f"{verb}   {q['subject']}  {q['threshold_days']}-day notice  "
                f"owner={q['owner'] or '-'}  channels={','.join(q['channels'])}"
            )
        for q in report.silenced:
            click.echo(f"silenced {q['subject']}  renewed by {q['silenced_by']}")
        for d in report.deliveries:
            line = f"{d.outcome:10} {d.channel}  owner={d.owner or '-'}  {len(d.subjects)} cert(s)"
            click.echo(line + (f"  ({d.error})" if d.error else ""))
        click.echo(
            f"{len(report.queued)} queued, {len(report.silenced)} silenced, "
            f"{report.count('sent')} sent, {report.count('retry')} retrying, "
            f"{report.count('failed')} failed"
        )
