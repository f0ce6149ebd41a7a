"""ACME upkeep, run by the `certwright serve` jobs process (entry point `certwright.jobs`)."""

from __future__ import annotations

from acme.service import AcmeService
from ca.runtime import Runtime


def run(runtime: Runtime) -> None:
    """Forget expired nonces; re-run validations a dead process left `processing`."""
    service = AcmeService(runtime)
    service.store.purge_nonces()
    service.recover_stale_challenges()
