"""Leaf CRLs, one per (issuer, shard), signed in the HSM and stored for publishing.

A certificate's shard is fixed at issuance (`certificates.crl_shard`) and named by its CRL
distribution point, `certs.crl_url(base, issuer, shard)`. Each shard's CRL:
- carries an Issuing Distribution Point with that same URL, critical, onlyContainsUserCerts
  (RFC 5280 §5.2.5), so a CRL of one shard can never be taken for another's;
- carries the issuer's AKI (§5.2.1) and a CRLNumber that strictly increases per shard even when
  the clock steps back (§5.2.3); thisUpdate never goes backwards either;
- lists each revoked certificate until it expires (§5.1.2.6; BR 4.9.7) with a reasonCode only
  when the reason is not unspecified (§5.3.1, BR 7.2.2);
- is valid for at most ten days (BR 4.9.7) and is re-signed at half-life and as soon as the
  shard's content changes.

`refresh_crls` is what a job loop calls: idempotent, cheap when nothing changed, and safe to run
from several processes at once (the UNIQUE (issuer, shard, number) constraint picks one winner
per number; a loser re-reads and signs the next number only if still needed).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca import certs, lint
from ca.clock import Clock, SystemClock
from ca.errors import CAError, Kind
from ca.hsm import HsmPrivateKey, Token, signature_hash
from ca.storage import CertificateRecord, IssuerRecord, Storage
from ca.storage import revocation as store

log = logging.getLogger(__name__)

# BR 4.9.7: a subscriber CRL's nextUpdate is at most ten days after its thisUpdate.
MAX_VALIDITY = datetime.timedelta(days=10)
# BR 7.2.2: the reason codes a subscriber CRL may carry; unspecified (0) is said by omission.
BR_LEAF_REASONS = frozenset({1, 3, 4, 5, 9})
# Above this many entries the lint runs on a sample (see `_lint_before_signing`).
FULL_LINT_ENTRIES = 500
_SAMPLE_ENTRIES = 8
_PUBLISH_ATTEMPTS = 5


@dataclasses.dataclass(frozen=True)
class CrlSettings:
    """How long a shard's CRL is valid, and when it is re-signed without a change."""

    validity: datetime.timedelta = datetime.timedelta(days=7)
    refresh_after: datetime.timedelta = datetime.timedelta(days=3, hours=12)

    def __post_init__(self) -> None:
        if not datetime.timedelta(hours=1) <= self.validity <= MAX_VALIDITY:
            raise CAError(Kind.CONFIG, "crl validity must be between 1 hour and 10 days (BR 4.9.7)")
        if not datetime.timedelta(0) < self.refresh_after < self.validity:
            raise CAError(Kind.CONFIG, "crl refresh interval must be shorter than its validity")


def settings_from_config(config: Any) -> CrlSettings:
    """Read `[crl] validity_hours` and `refresh_hours` if the configuration has them."""
    section: Mapping[str, Any] = config.values.get("crl", {})
    defaults = CrlSettings()
    validity = float(section.get("validity_hours", defaults.validity.total_seconds() / 3600))
    refresh = float(section.get("refresh_hours", defaults.refresh_after.total_seconds() / 3600))
    return CrlSettings(datetime.timedelta(hours=validity), datetime.timedelta(hours=refresh))


@dataclasses.dataclass(frozen=True)
class SignedCrl:
    issuer_id: str
    shard: int
    number: int
    this_update: datetime.datetime
    next_update: datetime.datetime
    entries: int
    der: bytes


# Per process: the revoked-set fingerprint each stored CRL was built from, by (database, CRL
# row id). A process that did not sign a CRL falls back to its entry count.
_fingerprints: dict[tuple[str, int], tuple[int, int]] = {}
_fingerprints_lock = threading.Lock()


# -- the rules, one function each ---------------------------------------------------------------


def next_number_and_time(
    previous: store.CrlMeta | None, now: datetime.datetime
) -> tuple[int, datetime.datetime]:
    """RFC 5280 §5.2.3: the CRLNumber strictly increases; §5.1.2.4: thisUpdate is the issue
    time. A clock that stepped back must not make a CRL look older than the one it replaces,
    so thisUpdate is at least one second after the previous one."""
    now = certs.utcnow_floor(now)
    if previous is None:
        return 1, now
    return previous.number + 1, max(now, previous.this_update + datetime.timedelta(seconds=1))


def reason_extension(code: int | None) -> x509.Extension[x509.CRLReason] | None:
    """RFC 5280 §5.3.1: omit reasonCode for unspecified; BR 7.2.2 limits the rest to
    keyCompromise, affiliationChanged, superseded, cessationOfOperation, privilegeWithdrawn.
    certificateHold and removeFromCRL are never written (revocation refuses them)."""
    if code is None or code not in BR_LEAF_REASONS:
        return None
    flag = x509.ReasonFlags(certs.REASON_NAMES[code])
    return x509.Extension(x509.CRLReason.oid, False, x509.CRLReason(flag))


def revoked_certificate(entry: store.RevokedEntry) -> x509.RevokedCertificate:
    """One CRL entry (RFC 5280 §5.1.2.6), revocation date in whole seconds."""
    builder = x509.RevokedCertificateBuilder(
        serial_number=int(entry.serial, 16),
        revocation_date=entry.revoked_at.replace(microsecond=0),
    )
    reason = reason_extension(entry.reason)
    if reason is not None:
        builder = builder.add_extension(reason.value, critical=False)
    return builder.build()


def issuing_distribution_point(url: str) -> x509.Extension[x509.IssuingDistributionPoint]:
    """RFC 5280 §5.2.5: critical, naming the same URL as the certificates' CRL DP, and
    onlyContainsUserCerts because a leaf shard lists no CA certificate."""
    return x509.Extension(
        x509.IssuingDistributionPoint.oid,
        True,
        x509.IssuingDistributionPoint(
            full_name=[x509.UniformResourceIdentifier(url)],
            relative_name=None,
            only_contains_user_certs=True,
            only_contains_ca_certs=False,
            only_some_reasons=None,
            indirect_crl=False,
            only_contains_attribute_certs=False,
        ),
    )


def crl_builder(
    issuer: x509.Certificate,
    url: str,
    number: int,
    this_update: datetime.datetime,
    validity: datetime.timedelta,
    revoked: Sequence[x509.RevokedCertificate],
) -> x509.CertificateRevocationListBuilder:
    """A shard's CRL. The entries go to the constructor: chaining add_revoked_certificate
    copies the list on every call, quadratic in the entries (DESIGN.md §6)."""
    return x509.CertificateRevocationListBuilder(
        issuer_name=issuer.subject,
        last_update=this_update,
        next_update=this_update + validity,
        revoked_certificates=list(revoked),
        extensions=[
            x509.Extension(
                x509.AuthorityKeyIdentifier.oid, False, certs.authority_key_identifier(issuer)
            ),
            x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
            issuing_distribution_point(url),
        ],
    )


@functools.cache
def _throwaway(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    """A software key of an issuer's type, made once per process, that only signs lint input."""
    if key_type.startswith("ec-"):
        curve = ec.SECP384R1() if key_type == "ec-p384" else ec.SECP256R1()
        return ec.generate_private_key(curve)
    return rsa.generate_private_key(65537, int(key_type.split("-")[1]))


def _lint_before_signing(
    issuer: x509.Certificate,
    url: str,
    number: int,
    this_update: datetime.datetime,
    validity: datetime.timedelta,
    revoked: Sequence[x509.RevokedCertificate],
    reasons: Sequence[int | None],
) -> None:
    """pkilint's BR CRL profile, before the issuer key signs (as issuance does, DESIGN.md §3).

    pkilint decodes with pyasn1 at tens of microseconds per entry, which for a 60k-entry shard
    would cost more than building and signing it. Entries are uniform (serial, date, optional
    reasonCode), so a large shard is linted as its header plus a sample holding every reason it
    uses; a small one is linted whole.
    """
    sample = list(revoked)
    if len(sample) > FULL_LINT_ENTRIES:
        first_of_reason: dict[int | None, int] = {}
        for index, reason in enumerate(reasons):
            first_of_reason.setdefault(reason, index)
        sample = [*revoked[:_SAMPLE_ENTRIES], *(revoked[i] for i in first_of_reason.values())]
    key = _throwaway(certs.key_type_of(issuer.public_key()))  # type: ignore[arg-type]
    draft = crl_builder(issuer, url, number, this_update, validity, sample).sign(
        key, signature_hash(key)
    )
    lint.require_clean(
        lint.lint_crl(draft.public_bytes(serialization.Encoding.DER), br=True), "CRL"
    )


# -- signing and refreshing ---------------------------------------------------------------------


@dataclasses.dataclass
class _Issuer:
    record: IssuerRecord
    certificate: x509.Certificate
    key: HsmPrivateKey


def sign_shard(
    storage: Storage,
    issuer: _Issuer,
    shard: int,
    *,
    public_base_url: str,
    settings: CrlSettings,
    clock: Clock,
    actor: str,
    previous: store.CrlMeta | None = None,
    needed: Callable[[store.CrlMeta | None], bool] = lambda _: True,
    prefetched: list[store.RevokedEntry] | None = None,
) -> SignedCrl | None:
    """Sign and store the next CRL of one shard; None when another process already did.

    The shard's signing lock (`store.crl_signing_lock`) makes signers of one shard take turns:
    under it the shard is re-read, and if another process's CRL makes ours unnecessary we stop
    before signing. Should a number still collide (SQLite takes no lock), the shard is re-read
    the same way and the next number signed only if still needed.
    """
    issuer_id = issuer.record.id
    url = certs.crl_url(public_base_url.rstrip("/"), issuer_id, shard)
    with store.crl_signing_lock(storage, issuer_id, shard):
        latest = store.latest_crls(storage, issuer_id).get(shard)
        if (latest.number if latest else 0) != (previous.number if previous else 0):
            previous, prefetched = latest, None  # another process signed while we waited
            if not needed(previous):
                return None
        return _sign_and_store(
            storage,
            issuer,
            shard,
            url=url,
            settings=settings,
            clock=clock,
            actor=actor,
            previous=previous,
            needed=needed,
            prefetched=prefetched,
        )


def _sign_and_store(
    storage: Storage,
    issuer: _Issuer,
    shard: int,
    *,
    url: str,
    settings: CrlSettings,
    clock: Clock,
    actor: str,
    previous: store.CrlMeta | None,
    needed: Callable[[store.CrlMeta | None], bool],
    prefetched: list[store.RevokedEntry] | None,
) -> SignedCrl | None:
    issuer_id = issuer.record.id
    for _ in range(_PUBLISH_ATTEMPTS):
        now = clock.now()
        number, this_update = next_number_and_time(previous, now)
        entries = (
            prefetched
            if prefetched is not None
            else store.revoked_entries(storage, issuer_id, shard, now)
        )
        prefetched = None  # a retry after a conflict reads afresh
        revoked = [revoked_certificate(e) for e in entries]
        _lint_before_signing(
            issuer.certificate,
            url,
            number,
            this_update,
            settings.validity,
            revoked,
            [e.reason for e in entries],
        )
        builder = crl_builder(
            issuer.certificate, url, number, this_update, settings.validity, revoked
        )
        der = builder.sign(issuer.key, signature_hash(issuer.key)).public_bytes(
            serialization.Encoding.DER
        )
        next_update = this_update + settings.validity
        try:
            crl_id = store.insert_crl(
                storage, issuer_id, shard, number, this_update, next_update, der, actor
            )
        except CAError as exc:
            if exc.kind is not Kind.CONFLICT:
                raise
            previous = store.latest_crls(storage, issuer_id).get(shard)
            if not needed(previous):
                return None
            continue
        fingerprint = (len(entries), sum(e.id for e in entries))
        with _fingerprints_lock:
            _fingerprints[(storage.url, crl_id)] = fingerprint
        return SignedCrl(issuer_id, shard, number, this_update, next_update, len(entries), der)
    raise CAError(Kind.CONFLICT, f"could not publish a CRL for {issuer_id} shard {shard}")


def _recorded_fingerprint(storage: Storage, meta: store.CrlMeta) -> tuple[int, int] | None:
    """The (count, id sum) a stored CRL was built from, if this process signed it; otherwise
    None after caching its entry count, read once from its DER."""
    key = (storage.url, meta.id)
    with _fingerprints_lock:
        known = _fingerprints.get(key)
    if known is not None:
        return known
    count = len(x509.load_der_x509_crl(store.crl_der(storage, meta.id)))
    with _fingerprints_lock:
        _fingerprints[key] = (count, -1)  # -1: the id sum is unknown here
    return _fingerprints[key]


def shard_is_due(
    storage: Storage,
    meta: store.CrlMeta | None,
    current: tuple[int, int],
    now: datetime.datetime,
    settings: CrlSettings,
) -> bool:
    """A shard needs a new CRL when it has none, its CRL is past half its life (so one is
    always published well before nextUpdate, BR 4.9.7), or its revoked set changed."""
    if meta is None:
        return True
    if now >= meta.this_update + settings.refresh_after or now >= meta.next_update:
        return True
    recorded = _recorded_fingerprint(storage, meta)
    if recorded is None:
        return True
    count, total = recorded
    return count != current[0] or (total != -1 and total != current[1])


def crl_issuers(storage: Storage, now: datetime.datetime) -> list[IssuerRecord]:
    """Online intermediates that still answer for what they issued: active or retired, with a
    key on the online token, not expired. A revoked intermediate's CRLs would not be trusted."""
    return [
        i
        for i in storage.list_issuers()
        if i.kind == "intermediate"
        and i.status in ("active", "retired")
        and i.key_label
        and i.not_after > now
    ]


def _load_issuer(record: IssuerRecord, token: Token) -> _Issuer:
    assert record.key_label is not None
    return _Issuer(
        record, x509.load_der_x509_certificate(record.cert_der), token.key(record.key_label)
    )


def refresh_crls(
    storage: Storage,
    token: Token,
    *,
    public_base_url: str,
    crl_shards: int,
    settings: CrlSettings | None = None,
    clock: Clock | None = None,
    issuer: str | None = None,
    shards: Sequence[int] | None = None,
    force: bool = False,
    actor: str = "crl-refresh",
) -> list[SignedCrl]:
    """Sign every shard CRL that is due (or all with `force`); return what was signed.

    Nothing touches the HSM when nothing is due: the check is one grouped count per issuer plus
    the newest CRL row of each shard.
    """
    settings = settings or CrlSettings()
    clock = clock or SystemClock()
    signed: list[SignedCrl] = []
    now = clock.now()
    records = crl_issuers(storage, now)
    if issuer is not None:
        records = [r for r in records if r.id == issuer]
        if not records:
            raise CAError(Kind.NOT_FOUND, f"no online intermediate named {issuer!r} signs CRLs")
    for record in records:
        latest = {s: m for s, m in store.latest_crls(storage, record.id).items() if s >= 0}
        current = store.revoked_fingerprints(storage, record.id, now)
        wanted = (
            set(shards)
            if shards is not None
            else set(range(crl_shards)) | set(latest) | store.certificate_shards(storage, record.id)
        )
        loaded: _Issuer | None = None
        due = [
            s
            for s in sorted(wanted)
            if force or shard_is_due(storage, latest.get(s), current.get(s, (0, 0)), now, settings)
        ]
        # Most shards due (first run, forced): one scan of the issuer's revoked certificates
        # instead of one index walk per shard (100k entries on SQLite: 7.3 s instead of 10.4 s).
        bulk = (
            store.revoked_entries_by_shard(storage, record.id, now)
            if len(due) > max(2, len(wanted) // 2)
            else None
        )
        for shard in due:
            fingerprint = current.get(shard, (0, 0))

            def needed(
                meta: store.CrlMeta | None, fingerprint: tuple[int, int] = fingerprint
            ) -> bool:
                return shard_is_due(storage, meta, fingerprint, clock.now(), settings)

            loaded = loaded or _load_issuer(record, token)
            result = sign_shard(
                storage,
                loaded,
                shard,
                public_base_url=public_base_url,
                settings=settings,
                clock=clock,
                actor=actor,
                previous=latest.get(shard),
                needed=(lambda _meta: True) if force else needed,
                prefetched=bulk.get(shard, []) if bulk is not None else None,
            )
            if result is not None:
                signed.append(result)
    return signed


def on_revocation(
    storage: Storage,
    token: Callable[[], Token],
    *,
    public_base_url: str,
    crl_shards: int,
    settings: CrlSettings,
    clock: Clock,
) -> Callable[[CertificateRecord], None]:
    """A revocation listener that re-signs the revoked certificate's shard at once."""

    def listener(record: CertificateRecord) -> None:
        refresh_crls(
            storage,
            token(),
            public_base_url=public_base_url,
            crl_shards=crl_shards,
            settings=settings,
            clock=clock,
            issuer=record.issuer_id,
            shards=[record.crl_shard],
            actor="revocation",
        )

    return listener


def install(runtime: Any) -> None:
    """Re-sign a shard's CRL as soon as one of its certificates is revoked in this process."""
    runtime.authority.revocation_listeners.append(
        on_revocation(
            runtime.storage,
            lambda: runtime.token,
            public_base_url=runtime.config.public_base_url,
            crl_shards=runtime.config.crl_shards,
            settings=settings_from_config(runtime.config),
            clock=runtime.clock,
        )
    )


def latest_for_publishing(storage: Storage) -> list[tuple[str, int, bytes]]:
    """Every issuer's newest CRL per shard (shard -1: its whole CRL, e.g. the root's ARL)."""
    out: list[tuple[str, int, bytes]] = []
    for record in storage.list_issuers():
        for shard, meta in sorted(store.latest_crls(storage, record.id).items()):
            out.append((record.id, shard, store.crl_der(storage, meta.id)))
    return out
