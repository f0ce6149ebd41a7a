"""Only one process signs a given CRL number of a shard, however many refresh at once.

Two real processes, each with its own PKCS#11 session on the same SoftHSM token, refresh the
same shards of one PostgreSQL database at the same moment (they wait on a shared start file).
Every attempt to store a signed CRL is counted in each process: an attempt that does not win
its number would mean the issuer key signed a CRL that was thrown away (two CRLs with one
number, RFC 5280 §5.2.3). The per-shard advisory lock in `ca.crl.sign_shard` makes the second
process wait, re-read, and either stop (not needed) or sign the next number. Likewise, one
process at a time pre-signs OCSP responses (`ca.ocsp_signing.refresh_ocsp`).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from ca.issuance import CertificateAuthority, IssuanceRequest
from ca.policy import Identifier
from ca.profiles import load_profiles
from ca.storage import Storage
from ca.storage.models import Crl
from tests.conftest import BASE_URL, ONLINE_PIN, ONLINE_TOKEN, SessionPKI

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SHARDS = 4

# One refreshing process: waits for the start file, refreshes `rounds` times, prints counts.
_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from ca import crl
    from ca.hsm import Token
    from ca.storage import Storage
    from ca.storage import revocation as store

    url, module, label, pin, start, rounds, force, shards = sys.argv[1:9]
    storage = Storage(url)
    token = Token(module, label, pin)
    attempts = {"insert": 0, "conflict": 0}
    real_insert = store.insert_crl

    def counted(*args, **kwargs):
        attempts["insert"] += 1
        try:
            return real_insert(*args, **kwargs)
        except Exception:
            attempts["conflict"] += 1
            raise

    store.insert_crl = counted
    print("ready", flush=True)
    while not Path(start).exists():
        time.sleep(0.01)
    signed = []
    for _ in range(int(rounds)):
        for result in crl.refresh_crls(
            storage, token, public_base_url=sys.argv[9], crl_shards=int(shards),
            force=force == "1", issuer="issuing-ec",
        ):
            signed.append([result.shard, result.number])
    print(json.dumps({"signed": signed, **attempts}), flush=True)
    """
)


def _issue_and_revoke(storage: Storage, pki: SessionPKI) -> None:
    """A few certificates spread over the shards, half of them revoked."""
    authority = CertificateAuthority(
        storage,
        pki.online,
        load_profiles({}),
        public_base_url=BASE_URL,
        crl_shards=SHARDS,
        default_issuer="issuing-ec",
    )
    for i in range(8):
        key = ec.generate_private_key(ec.SECP256R1())
        issued = authority.issue(
            IssuanceRequest(
                public_key=key.public_key(),
                identifiers=(Identifier("dns", f"host{i}.crl-leader.test"),),
                profile="tls-server",
                owner="tests",
            )
        )
        if i % 2 == 0:
            authority.revoke(issued.record.serial, reason=1, actor="tests")


def _run_two(
    url: str, pki: SessionPKI, tmp_path: Path, rounds: int, force: bool
) -> list[dict[str, Any]]:
    start = tmp_path / f"start-{rounds}-{int(force)}"
    args = [str(rounds), "1" if force else "0", str(SHARDS), BASE_URL]
    return _start_two(_CHILD, url, pki, start, args)


def _start_two(
    script: str, url: str, pki: SessionPKI, start: Path, args: list[str]
) -> list[dict[str, Any]]:
    """Run `script` in two processes (argv: url, module, token, PIN, start file, *args) that
    both load the token and the database, then start together; their last lines, as JSON."""
    env = {**os.environ, "SOFTHSM2_CONF": str(pki.softhsm_conf)}
    args = [url, pki.module, ONLINE_TOKEN, ONLINE_PIN, str(start), *args]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for child in children:  # both have loaded the token and the database before either starts
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
    start.touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        assert "Traceback" not in err, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _numbers(storage: Storage) -> dict[int, list[int]]:
    with storage.transaction() as session:
        rows = session.execute(
            select(Crl.shard, Crl.number, Crl.der)
            .where(Crl.issuer_id == "issuing-ec")
            .order_by(Crl.id)
        ).all()
    out: dict[int, list[int]] = {}
    for shard, number, der in rows:
        crl_number = x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.CRLNumber)
        assert crl_number.value.crl_number == number
        out.setdefault(shard, []).append(number)
    return out


@pytest.fixture
def pg_storage(postgres_url: str, pki: SessionPKI) -> Iterator[Storage]:
    storage = Storage(postgres_url)
    try:
        storage.migrate()
        for record in pki.issuers:
            storage.add_issuer(record)
        _issue_and_revoke(storage, pki)
        yield storage
    finally:
        storage.dispose()  # a failed test must not leave connections for the GC to warn of


def test_first_refresh_by_two_processes_signs_each_shard_once(
    pg_storage: Storage, pki: SessionPKI, tmp_path: Path
) -> None:
    results = _run_two(pg_storage.url, pki, tmp_path, rounds=1, force=False)
    # Every signature was stored: the loser of a shard waited, saw it done, and signed nothing.
    assert all(r["insert"] == len(r["signed"]) and r["conflict"] == 0 for r in results), results
    signed = sorted(tuple(s) for r in results for s in r["signed"])
    assert signed == [(shard, 1) for shard in range(SHARDS)]
    assert _numbers(pg_storage) == {shard: [1] for shard in range(SHARDS)}


def test_forced_refreshes_by_two_processes_never_share_a_number(
    pg_storage: Storage, pki: SessionPKI, tmp_path: Path
) -> None:
    rounds = 5
    results = _run_two(pg_storage.url, pki, tmp_path, rounds=rounds, force=True)
    assert all(r["conflict"] == 0 for r in results), results
    numbers = _numbers(pg_storage)
    for shard in range(SHARDS):
        # Each process signed each shard once per round; the numbers follow one another in the
        # order they were stored, none skipped, none reused.
        assert numbers[shard] == list(range(1, 2 * rounds + 1)), numbers[shard]


def test_refresh_after_a_revocation_is_not_lost(
    pg_storage: Storage, pki: SessionPKI, tmp_path: Path
) -> None:
    """After both processes agree, a new revocation makes the shard due again for one signer."""
    _run_two(pg_storage.url, pki, tmp_path, rounds=1, force=False)
    authority = CertificateAuthority(
        pg_storage,
        pki.online,
        load_profiles({}),
        public_base_url=BASE_URL,
        crl_shards=SHARDS,
        default_issuer="issuing-ec",
    )
    key = ec.generate_private_key(ec.SECP256R1())
    issued = authority.issue(
        IssuanceRequest(
            public_key=key.public_key(),
            identifiers=(Identifier("dns", "late.crl-leader.test"),),
            profile="tls-server",
            owner="tests",
        )
    )
    authority.revoke(issued.record.serial, reason=1, actor="tests")
    results = _run_two(pg_storage.url, pki, tmp_path, rounds=1, force=False)
    shard = issued.record.crl_shard
    assert all(r["conflict"] == 0 for r in results), results
    assert _numbers(pg_storage)[shard] == [1, 2]
    with pg_storage.transaction() as session:
        der = session.scalar(
            select(Crl.der).where(
                Crl.issuer_id == "issuing-ec", Crl.shard == shard, Crl.number == 2
            )
        )
    assert der is not None
    crl = x509.load_der_x509_crl(der)
    assert crl.get_revoked_certificate_by_serial_number(int(issued.record.serial, 16)) is not None
    assert crl.next_update_utc is not None
    assert crl.next_update_utc > datetime.datetime.now(datetime.UTC)


# One OCSP refreshing process: its first store of signed responses takes a second, so the two
# processes are inside a refresh at the same time.
_OCSP_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from ca.hsm import Token
    from ca.ocsp_signing import OcspSigner, refresh_ocsp
    from ca.storage import Storage
    from ca.storage import revocation as store
    url, module, label, pin, start = sys.argv[1:6]
    storage = Storage(url)
    signer = OcspSigner(storage, Token(module, label, pin))
    stored = []
    real_store = store.store_ocsp_responses
    def slow_store(storage, rows):
        rows = list(rows)
        time.sleep(1.0)
        stored.extend(row.serial for row in rows)
        return real_store(storage, rows)
    store.store_ocsp_responses = slow_store
    print("ready", flush=True)
    while not Path(start).exists():
        time.sleep(0.01)
    result = refresh_ocsp(signer)
    print(json.dumps({"signed": result.signed, "stored": stored}), flush=True)
    """
)


def test_one_process_at_a_time_pre_signs_ocsp(
    pg_storage: Storage, pki: SessionPKI, tmp_path: Path
) -> None:
    """Two job processes refreshing at once: one signs every due response, the other sees the
    refresh under way and skips its round, so no response is signed twice."""
    results = _start_two(_OCSP_CHILD, pg_storage.url, pki, tmp_path / "start-ocsp", [])
    signed = sorted(r["signed"] for r in results)
    assert signed == [0, 8], results  # _issue_and_revoke made 8 unexpired certificates
    stored = [c for r in results for c in r["stored"]]
    assert len(stored) == len(set(stored)) == 8
    again = _start_two(_OCSP_CHILD, pg_storage.url, pki, tmp_path / "start-ocsp-2", [])
    assert [r["signed"] for r in again] == [0, 0]  # nothing due any more
