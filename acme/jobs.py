"""ACME upkeep, run by the `certwright serve` jobs process (entry point `certwright.jobs`)."""

from __future__ import annotations

from acme.service import AcmeService
from ca.runtime import Runtime


def run(runtime: Runtime) -> None:
    """Forget expired nonces; re-run validations and reopen finalizes a dead process (or a
    lost database) left `processing`."""
    service = AcmeService(runtime)
    service.store.purge_nonces()
    service.recover_stale_challenges()
    service.recover_stale_orders()
