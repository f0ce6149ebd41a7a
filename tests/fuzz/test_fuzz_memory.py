"""Bounded memory: a batch of distinct hostile inputs through the direct parsers leaves (almost)
nothing behind and never needs much at once. Inputs come from a seeded PRNG (the same every
run), not hypothesis, whose own bookkeeping grows with every example and would be measured too.
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
import tracemalloc
from collections.abc import Callable

import pytest

from acme.problems import AcmeProblem
from ca.errors import CAError
from tests.fuzz.csrs import seed_csrs
from tests.fuzz.jws_inputs import JOSE, sign, signing_keys
from tests.fuzz.mutate import b64url
from tests.fuzz.test_fuzz_csr import check_csr
from tests.fuzz.test_fuzz_jws import ACCOUNT_URL, NONCES, URL, authenticate_directly

pytestmark = pytest.mark.fuzz

BATCH = 5000
MiB = 1024 * 1024


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        if not data:
            break
        at = rng.randrange(len(data))
        op = rng.randrange(4)
        if op == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            del data[at:]
        elif op == 2:
            data[at:at] = rng.randbytes(rng.randint(1, 64))
        else:
            data[at:at] = data[at : at + rng.randint(1, 4096)]  # grow by duplication
    return bytes(data)


def measure(batch: Callable[[int], None]) -> tuple[int, int]:
    """(bytes still allocated after the batch, peak bytes during it), both over a baseline."""
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(BATCH):
            batch(i)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return current - baseline, peak - baseline


def _jws_seed(nonce: str, payload: bytes) -> bytes:
    alg, private = signing_keys()["p256"]
    header = {"alg": alg, "nonce": nonce, "url": URL, "kid": ACCOUNT_URL}
    protected = b64url(json.dumps(header).encode())
    payload_b64 = b64url(payload)
    signature = b64url(sign(alg, private, f"{protected}.{payload_b64}".encode()))
    return json.dumps(
        {"protected": protected, "payload": payload_b64, "signature": signature}
    ).encode()


def test_jws_parser_memory_is_bounded() -> None:
    rng = random.Random(64)
    payloads = [b"{}", b'{"identifiers": []}', b'{"csr": "' + b"A" * 40_000 + b'"}']

    def one(i: int) -> None:
        body = _jws_seed(NONCES.new_nonce(), payloads[i % len(payloads)])
        if i % 4:
            body = _mutate(rng, body)
        with contextlib.suppress(AcmeProblem):
            parsed, _ = authenticate_directly(body, JOSE)
            parsed.json_payload()

    retained, peak = measure(one)
    # The nonce store holds at most 1,000 nonces (~200 KB); nothing else may stay.
    assert retained < 4 * MiB, f"{retained / MiB:.1f} MiB retained"
    assert peak < 64 * MiB, f"{peak / MiB:.1f} MiB peak"


def test_csr_checks_memory_is_bounded() -> None:
    rng = random.Random(2986)
    seeds = seed_csrs()

    def one(i: int) -> None:
        with contextlib.suppress(CAError):
            check_csr(_mutate(rng, seeds[i % len(seeds)]))

    retained, peak = measure(one)
    assert retained < 2 * MiB, f"{retained / MiB:.1f} MiB retained"
    assert peak < 32 * MiB, f"{peak / MiB:.1f} MiB peak"
