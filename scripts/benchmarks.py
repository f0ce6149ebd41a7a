"""Benchmarks behind `scripts/bench`. Each prints figures; none asserts anything about time."""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca.hsm import HsmEcPrivateKey, Token
from ca.issuance import CertificateAuthority, IssuanceRequest
from ca.policy import Identifier, PublicKey
from ca.profiles import load_profiles
from scripts import (
    benchmarks_acme,
    benchmarks_inventory,
    benchmarks_revocation,
    benchmarks_storage,
)
from scripts.bench_pki import BASE_URL, bench_pki


def _setup(workdir: Path, db_url: str | None) -> tuple[CertificateAuthority, Token]:
    storage, online = bench_pki(
        workdir, db_url, (("issuing-ec", "ec-p256"), ("issuing-rsa", "rsa-2048"))
    )
    authority = CertificateAuthority(storage, online, load_profiles({}), public_base_url=BASE_URL)
    authority.warm_up()
    return authority, online


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:10.1f}/s  ({seconds * 1000 / n:.3f} ms each, n={n})"


def bench_issuance(n: int, db_url: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="certwright-bench-") as tmp:
        authority, online = _setup(Path(tmp), db_url)
        backend = authority.storage.dialect
        print(f"issuance benchmark: n={n} per row, database={backend}, one process")
        subject_keys: dict[str, PublicKey] = {
            "ec-p256": ec.generate_private_key(ec.SECP256R1()).public_key(),
            "rsa-2048": rsa.generate_private_key(65537, 2048).public_key(),
        }
        for issuer_id, label in (("issuing-ec", "P-256"), ("issuing-rsa", "RSA-2048")):
            key = online.key(issuer_id)
            digest = hashlib.sha256(b"bench").digest()
            # Raw HSM signing through the same adapter cryptography calls.
            start = time.perf_counter()
            if isinstance(key, HsmEcPrivateKey):
                from cryptography.hazmat.primitives import hashes
                from cryptography.hazmat.primitives.asymmetric import utils

                for _ in range(n):
                    key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
            else:
                from cryptography.hazmat.primitives import hashes
                from cryptography.hazmat.primitives.asymmetric import padding

                for _ in range(n):
                    key.sign(b"bench", padding.PKCS1v15(), hashes.SHA256())
            raw = time.perf_counter() - start
            print(f"  {label:9} raw HSM sign         {_rate(n, raw)}")

            for lint_enabled in (True, False):
                authority.lint_enabled = lint_enabled
                latencies = []
                start, cpu_start = time.perf_counter(), time.process_time()
                for i in range(n):
                    t0 = time.perf_counter()
                    authority.issue(
                        IssuanceRequest(
                            subject_keys["ec-p256"],
                            (Identifier("dns", f"host{i}.bench.internal"),),
                            "tls-server",
                            issuer=issuer_id,
                        )
                    )
                    latencies.append(time.perf_counter() - t0)
                total = time.perf_counter() - start
                cpu = time.process_time() - cpu_start  # the rest of `total` waits for fsync
                what = "full path (with lint)" if lint_enabled else "full path, lint off  "
                p99 = (
                    statistics.quantiles(latencies, n=100)[98] * 1000
                    if n >= 100
                    else max(latencies) * 1000
                )
                print(
                    f"  {label:9} {what} {_rate(n, total)}  p99 {p99:.2f} ms,"
                    f" CPU {cpu * 1000 / n:.3f} ms each"
                )
            authority.lint_enabled = True
        print(f"  rows recorded: {authority.storage.count_certificates('issued')}")
        authority.storage.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench")
    parser.add_argument("--smoke", action="store_true", help="small N, for CI")
    sub = parser.add_subparsers(dest="bench", required=True)
    issuance = sub.add_parser("issuance", help="full issuance path vs raw HSM signing")
    issuance.add_argument("--n", type=int, default=2000)
    issuance.add_argument("--db", help="database URL (default: a temporary SQLite file)")
    benchmarks_revocation.add_parsers(sub)
    benchmarks_acme.add_parser(sub)
    benchmarks_inventory.add_parser(sub)
    benchmarks_storage.add_parser(sub)
    args = parser.parse_args(argv)
    if args.bench == "issuance":
        bench_issuance(50 if args.smoke else args.n, args.db)
    benchmarks_revocation.dispatch(args)
    benchmarks_acme.dispatch(args)
    benchmarks_inventory.dispatch(args)
    benchmarks_storage.dispatch(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
