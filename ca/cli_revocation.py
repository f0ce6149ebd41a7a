"""CLI commands for revocation publishing: CRLs, OCSP responses, incidents."""

from __future__ import annotations

import click


def register(main: click.Group) -> None:
    """Add the revocation commands to the `certwright` group."""
