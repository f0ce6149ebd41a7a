"""A throw-away two-tier PKI on fresh SoftHSM tokens, for the benchmarks."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

from ca import ceremony, certs
from ca.config import DEFAULT_SOFTHSM_MODULE
from ca.demo import init_softhsm_token, write_softhsm_conf
from ca.hsm import KeySpec, Token
from ca.storage import Storage

BASE_URL = "http://ca.bench"


def bench_pki(
    workdir: Path, db_url: str | None, intermediates: Sequence[tuple[str, str]]
) -> tuple[Storage, Token]:
    """Tokens in `workdir`, a P-384 root, and one intermediate per (id, key type)."""
    conf = write_softhsm_conf(workdir)
    init_softhsm_token(conf, "bench-root", "1111")
    init_softhsm_token(conf, "bench-online", "2222")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    root_token = Token(DEFAULT_SOFTHSM_MODULE, "bench-root", "1111")
    online = Token(DEFAULT_SOFTHSM_MODULE, "bench-online", "2222")
    storage = Storage(db_url or f"sqlite:///{workdir / 'bench.db'}")
    storage.migrate()
    root = ceremony.create_root(
        root_token,
        key_label="root",
        spec=KeySpec.parse("ec-p384"),
        subject=certs.parse_name("CN=bench root"),
        validity=datetime.timedelta(days=3650),
        path_length=0,
    )
    ceremony.register_root(storage, "root", root.certificate, "bench")
    for issuer_id, spec in intermediates:
        ceremony.create_intermediate(
            storage,
            root,
            online,
            issuer_id=issuer_id,
            key_label=issuer_id,
            spec=KeySpec.parse(spec),
            subject=certs.parse_name(f"CN=bench {issuer_id}"),
            validity=datetime.timedelta(days=365),
            public_base_url=BASE_URL,
            actor="bench",
        )
    return storage, online
