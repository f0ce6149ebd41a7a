"""`certwright audit-log`: the hash-chained audit log (list, verify, export)."""

from __future__ import annotations

import click


def register(main: click.Group) -> None:
    """Add this module's commands to the `certwright` group."""
