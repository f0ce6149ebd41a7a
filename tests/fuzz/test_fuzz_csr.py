"""Fuzzing the CSR checks (ca/policy.py) and the issuance path (`CertificateAuthority`): any
input ends in a certificate or a CAError, and a refused CSR leaves nothing issued."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import example, given
from sqlalchemy import func, select

from ca import policy
from ca.errors import CAError
from ca.issuance import CertificateAuthority
from ca.profiles import load_profiles
from ca.storage import Storage
from ca.storage.models import Certificate
from tests.fuzz.conftest import fuzz_settings
from tests.fuzz.csrs import bad_utf8_name_csr, bad_version_csr, csr_inputs, off_curve_csr

pytestmark = pytest.mark.fuzz

PROFILE = load_profiles({})["tls-server"]


def check_csr(data: bytes) -> None:
    """The CA core's whole CSR check, as `issue_from_csr` and ACME finalize run it."""
    csr = policy.parse_csr(data)
    policy.check_csr_signature(csr)
    key = policy.csr_public_key(csr)
    identifiers = policy.csr_identifiers(csr)
    policy.check_public_key(key, PROFILE)
    policy.check_identifiers(identifiers, PROFILE)
    policy.common_name_for(identifiers)


def check_each(data: bytes) -> None:
    """Every check on its own, so a CSR whose signature fails still reaches the name and key
    parsers (a mutated name breaks the signature)."""
    csr = policy.parse_csr(data)
    steps: list[Callable[[], object]] = [
        lambda: policy.check_csr_signature(csr),
        lambda: policy.check_public_key(policy.csr_public_key(csr), PROFILE),
        lambda: policy.check_identifiers(policy.csr_identifiers(csr), PROFILE),
    ]
    for step in steps:
        try:
            step()
        except CAError as error:
            assert error.rule, f"refusal without a rule: {error!r}"


@fuzz_settings()
@given(csr_inputs())
@example(off_curve_csr())
@example(bad_version_csr())
@example(bad_utf8_name_csr())
def test_csr_checks_raise_only_caerror(data: bytes) -> None:
    try:
        check_csr(data)
    except CAError as error:
        assert error.rule, f"refusal without a rule: {error!r}"
    try:
        check_each(data)
    except CAError as error:
        assert error.rule == "csr.parse", f"refusal without a rule: {error!r}"


def _issued_count(storage: Storage) -> int:
    with storage.transaction() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Certificate).where(Certificate.status == "issued")
            )
            or 0
        )


@pytest.fixture(scope="module")
def csr_authority(fuzz_authority: CertificateAuthority) -> CertificateAuthority:
    fuzz_authority.lint_enabled = False  # pkilint is not under test; it costs ~0.1 s a CSR
    return fuzz_authority


@fuzz_settings()
@given(csr_inputs())
@example(off_curve_csr())
@example(bad_version_csr())
@example(bad_utf8_name_csr())
def test_issue_from_csr_refuses_with_caerror_and_records_nothing(
    csr_authority: CertificateAuthority, fuzz_storage: Storage, data: bytes
) -> None:
    before = _issued_count(fuzz_storage)
    try:
        issued = csr_authority.issue_from_csr(data, "tls-server", source="fuzz")
    except CAError:
        assert _issued_count(fuzz_storage) == before, "a refused CSR left a certificate issued"
        return
    assert _issued_count(fuzz_storage) == before + 1
    assert issued.record.status == "issued"
