"""The certificate inventory: every certificate we issued plus every discovered one that is not
ours, with owners, tags, where each is deployed and its lineage.

Reads are two ordered, limited queries (ours, then discovered certificates not linked to ours)
merged by `not_after`; the indexes they lean on are `ix_certificates_status_not_after` (expiring
within), `ix_certificates_owner_not_after` (by owner) and `certificate_names.name` (by exact
name). Lineage and deployments are looked up for the displayed rows only, so nothing is added to
the issuance path: `replaced_by` comes from ACME `replaces` or, failing that, from a later
certificate with exactly the same names (same-names renewal).
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Select,
    any_,
    bindparam,
    func,
    literal,
    select,
    text,
    update,
)

from ca import certs
from ca.errors import CAError, Kind
from ca.storage import audit
from ca.storage.models import (
    Certificate,
    CertificateName,
    CertificateSighting,
    DiscoveredCertificate,
)
from ca.storage.store import Storage, rowcount, tags_column

KINDS = ("issued", "discovered")
# Statuses of our own rows; a discovered certificate's status is "discovered".
STATUSES = ("pending", "issued", "revoked", "failed", "discovered")
# Without a status filter the inventory shows certificates that exist: not reserved serials
# that were never signed (pending) or whose signing failed.
DEFAULT_STATUSES = ("issued", "revoked")
MAX_TAG = 64
MAX_OWNER = 128
_TAG = re.compile(r"^[a-z0-9_.:-]{1,64}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 500


@dataclasses.dataclass(frozen=True)
class Deployment:
    """One place a certificate was seen: a TLS endpoint or a file."""

    kind: str  # "tls" | "file"
    location: str
    last_seen: datetime.datetime
    missed_scans: int

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "location": self.location,
            "last_seen": self.last_seen.isoformat(),
            "missed_scans": self.missed_scans,
        }


@dataclasses.dataclass(frozen=True)
class InventoryItem:
    kind: str  # "issued" (ours) | "discovered" (found by a scan, not issued by us)
    serial: str
    fingerprint: str | None  # SHA-256 of the DER, for discovered certificates
    names: tuple[str, ...]
    owner: str | None
    tags: tuple[str, ...]
    source: str
    status: str  # pending|issued|revoked|failed for ours, "discovered" otherwise
    issuer: str  # our issuer id, or the issuer DN of a discovered certificate
    not_before: datetime.datetime
    not_after: datetime.datetime
    replaces: str | None = None
    replaced_by: str | None = None
    ari_checked_at: datetime.datetime | None = None
    deployments: tuple[Deployment, ...] = ()
    row_id: int = 0  # the row's id in its table (for stable ordering)
    issued_at: datetime.datetime | None = None

    @property
    def ref(self) -> str:
        """How `certwright inventory set` names it: the serial, or `sha256:<fingerprint>`."""
        return self.serial if self.kind == "issued" else f"sha256:{self.fingerprint}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ref": self.ref,
            "serial": self.serial,
            "fingerprint": self.fingerprint,
            "names": list(self.names),
            "owner": self.owner,
            "tags": list(self.tags),
            "source": self.source,
            "status": self.status,
            "issuer": self.issuer,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "replaces": self.replaces,
            "replaced_by": self.replaced_by,
            "ari_checked_at": self.ari_checked_at.isoformat() if self.ari_checked_at else None,
            "deployments": [d.to_json() for d in self.deployments],
        }


@dataclasses.dataclass(frozen=True)
class InventoryFilter:
    owner: str | None = None
    tag: str | None = None
    status: str | None = None
    issuer: str | None = None  # issuer id (ours) or issuer DN (discovered); globs allowed
    name: str | None = None  # exact name (index seek) or a glob with * ? [ ]
    expiring_within: datetime.timedelta | None = None  # unexpired, expiring within this
    found_where: str | None = None  # glob over sighting locations (host:port, file path)
    source: str | None = None  # exact or glob: "acme:*", "cli:*", "discovery"
    kind: str | None = None  # "issued" | "discovered"
    limit: int = 1000


# -- tags -------------------------------------------------------------------------------------


def validate_tag(tag: str) -> str:
    """A tag is lowercase letters, digits and `-_.:`, at most 64 characters."""
    if not _TAG.match(tag):
        raise CAError(
            Kind.BAD_REQUEST,
            f"bad tag {tag!r}: use lowercase letters, digits and -_.: (at most {MAX_TAG})",
            rule="tags.syntax",
        )
    return tag


def validate_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Validated, de-duplicated, sorted."""
    return tuple(sorted({validate_tag(t) for t in tags}))


def parse_tags_column(value: str | None) -> tuple[str, ...]:
    return tuple(t for t in (value or "").split(",") if t)


def _validate_owner(owner: str) -> str:
    owner = owner.strip()
    if len(owner) > MAX_OWNER or any(ord(c) < 32 for c in owner):
        raise CAError(Kind.BAD_REQUEST, f"bad owner {owner[:40]!r}: at most {MAX_OWNER} characters")
    return owner


# -- reading ----------------------------------------------------------------------------------


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _like(text: str) -> str:
    """A glob as a LIKE pattern (`[...]` classes widen to `_` and are checked afterwards)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return re.sub(r"\[[^\]]*\]", "_", escaped).replace("*", "%").replace("?", "_")


def _match(column: Any, text: str) -> ColumnElement[bool]:
    if _is_glob(text):
        return column.like(_like(text), escape="\\")  # type: ignore[no-any-return]
    return column == text  # type: ignore[no-any-return]


def _wants(f: InventoryFilter, kind: str) -> bool:
    if f.kind is not None and f.kind != kind:
        return False
    if f.status is not None:
        return (f.status == "discovered") == (kind == "discovered")
    return True


def _check_filter(f: InventoryFilter) -> None:
    if f.kind is not None and f.kind not in KINDS:
        raise CAError(Kind.BAD_REQUEST, f"unknown kind {f.kind!r} (issued or discovered)")
    if f.status is not None and f.status not in STATUSES:
        raise CAError(Kind.BAD_REQUEST, f"unknown status {f.status!r} ({', '.join(STATUSES)})")
    if f.tag is not None:
        validate_tag(f.tag)
    if f.limit < 1:
        raise CAError(Kind.BAD_REQUEST, "limit must be at least 1")


_OURS_COLUMNS = (
    Certificate.id,
    Certificate.serial,
    Certificate.issuer_id,
    Certificate.status,
    Certificate.names,
    Certificate.not_before,
    Certificate.not_after,
    Certificate.owner,
    Certificate.source,
    Certificate.tags,
    Certificate.replaces,
    Certificate.ari_checked_at,
    Certificate.issued_at,
    Certificate.created_at,
)


def _ours_where(f: InventoryFilter, now: datetime.datetime) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if f.status is not None:
        where.append(Certificate.status == f.status)
    elif f.expiring_within is not None:
        # Expiry matters for certificates in use; this also makes it one index range scan.
        where.append(Certificate.status == "issued")
    else:
        where.append(Certificate.status.in_(DEFAULT_STATUSES))
    if f.owner is not None:
        where.append(Certificate.owner == f.owner)
    if f.tag is not None:
        where.append(Certificate.tags.like(f"%,{f.tag},%"))
    if f.issuer is not None:
        where.append(_match(Certificate.issuer_id, f.issuer))
    if f.source is not None:
        where.append(_match(Certificate.source, f.source))
    if f.expiring_within is not None:
        where.append(Certificate.not_after > now)
        where.append(Certificate.not_after <= now + f.expiring_within)
    if f.name is not None:
        name = f.name.lower()
        where.append(
            Certificate.id.in_(
                select(CertificateName.certificate_id).where(_match(CertificateName.name, name))
            )
        )
    if f.found_where is not None:
        where.append(
            Certificate.id.in_(
                select(DiscoveredCertificate.certificate_id)
                .join(
                    CertificateSighting,
                    CertificateSighting.discovered_id == DiscoveredCertificate.id,
                )
                .where(
                    DiscoveredCertificate.certificate_id.is_not(None),
                    _match(CertificateSighting.location, f.found_where),
                )
            )
        )
    return where


def _theirs_where(f: InventoryFilter, now: datetime.datetime) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [DiscoveredCertificate.certificate_id.is_(None)]
    if f.owner is not None:
        where.append(DiscoveredCertificate.owner == f.owner)
    if f.tag is not None:
        where.append(DiscoveredCertificate.tags.like(f"%,{f.tag},%"))
    if f.issuer is not None:
        where.append(_match(DiscoveredCertificate.issuer, f.issuer))
    if f.source is not None and not fnmatch.fnmatchcase("discovery", f.source):
        where.append(literal(False))
    if f.expiring_within is not None:
        where.append(DiscoveredCertificate.not_after > now)
        where.append(DiscoveredCertificate.not_after <= now + f.expiring_within)
    if f.name is not None:
        # Names are one space-separated column here: a coarse LIKE, refined afterwards.
        padded = literal(" ") + func.lower(DiscoveredCertificate.names) + literal(" ")
        where.append(padded.like(f"% {_like(f.name.lower())} %", escape="\\"))
    if f.found_where is not None:
        where.append(
            DiscoveredCertificate.id.in_(
                select(CertificateSighting.discovered_id).where(
                    _match(CertificateSighting.location, f.found_where)
                )
            )
        )
    return where


def _ours_query(f: InventoryFilter, now: datetime.datetime) -> Select[*tuple[Any, ...]]:
    return (
        select(*_OURS_COLUMNS)
        .where(*_ours_where(f, now))
        .order_by(Certificate.not_after, Certificate.id)
        .limit(f.limit)
    )


def _theirs_query(f: InventoryFilter, now: datetime.datetime) -> Select[*tuple[Any, ...]]:
    return (
        select(
            DiscoveredCertificate.id,
            DiscoveredCertificate.serial,
            DiscoveredCertificate.fingerprint_sha256,
            DiscoveredCertificate.issuer,
            DiscoveredCertificate.names,
            DiscoveredCertificate.not_before,
            DiscoveredCertificate.not_after,
            DiscoveredCertificate.owner,
            DiscoveredCertificate.tags,
        )
        .where(*_theirs_where(f, now))
        .order_by(DiscoveredCertificate.not_after, DiscoveredCertificate.id)
        .limit(f.limit)
    )


def _name_matches(names: Sequence[str], pattern: str | None) -> bool:
    if pattern is None:
        return True
    pattern = pattern.lower()
    if _is_glob(pattern):
        return any(fnmatch.fnmatchcase(n.lower(), pattern) for n in names)
    return pattern in (n.lower() for n in names)


def _ours_item(row: Any) -> InventoryItem:
    return InventoryItem(
        kind="issued",
        serial=row.serial,
        fingerprint=None,
        names=tuple(row.names.split()),
        owner=row.owner,
        tags=parse_tags_column(row.tags),
        source=row.source,
        status=row.status,
        issuer=row.issuer_id,
        not_before=row.not_before,
        not_after=row.not_after,
        replaces=row.replaces,
        ari_checked_at=row.ari_checked_at,
        row_id=row.id,
        issued_at=row.issued_at or row.created_at,
    )


def _theirs_item(row: Any) -> InventoryItem:
    return InventoryItem(
        kind="discovered",
        serial=row.serial,
        fingerprint=row.fingerprint_sha256,
        names=tuple(row.names.split()),
        owner=row.owner,
        tags=parse_tags_column(row.tags),
        source="discovery",
        status="discovered",
        issuer=row.issuer,
        not_before=row.not_before,
        not_after=row.not_after,
        row_id=row.id,
    )


def list_inventory(
    storage: Storage, f: InventoryFilter, *, now: datetime.datetime | None = None
) -> list[InventoryItem]:
    """The certificates matching `f`, soonest expiry first (ties: ours first, then by id)."""
    _check_filter(f)
    now = now or storage.clock.now()
    items: list[InventoryItem] = []
    with storage.transaction() as session:
        if _wants(f, "issued"):
            items.extend(_ours_item(row) for row in session.execute(_ours_query(f, now)))
        if _wants(f, "discovered"):
            items.extend(_theirs_item(row) for row in session.execute(_theirs_query(f, now)))
        items = [
            i
            for i in items
            if _name_matches(i.names, f.name)
            and (
                f.issuer is None
                or not _is_glob(f.issuer)
                or fnmatch.fnmatchcase(i.issuer, f.issuer)
            )
        ]
        items.sort(key=lambda i: (i.not_after, i.kind != "issued", i.row_id))
        items = items[: f.limit]
        return _with_lineage_and_deployments(session, items)


def count_inventory(
    storage: Storage, f: InventoryFilter, *, now: datetime.datetime | None = None
) -> int:
    """How many certificates match `f`, without the limit (a `[...]` glob counts its LIKE)."""
    _check_filter(f)
    now = now or storage.clock.now()
    total = 0
    with storage.transaction() as session:
        if _wants(f, "issued"):
            query = select(func.count()).select_from(Certificate).where(*_ours_where(f, now))
            total += int(session.scalar(query) or 0)
        if _wants(f, "discovered"):
            query = (
                select(func.count())
                .select_from(DiscoveredCertificate)
                .where(*_theirs_where(f, now))
            )
            total += int(session.scalar(query) or 0)
    return total


def _resolve(session: Any, kind: str, key: str) -> tuple[str, str]:
    """A discovered certificate that we issued is our own record."""
    if kind == "discovered":
        linked = session.scalar(
            select(DiscoveredCertificate.certificate_id).where(
                DiscoveredCertificate.fingerprint_sha256 == key
            )
        )
        if linked is not None:
            serial = session.scalar(select(Certificate.serial).where(Certificate.id == linked))
            return "issued", str(serial)
    return kind, key


def get_item(storage: Storage, ref: str) -> InventoryItem:
    """One certificate by serial (ours) or `sha256:<fingerprint>` (discovered)."""
    kind, key = parse_ref(ref)
    with storage.transaction() as session:
        kind, key = _resolve(session, kind, key)
        if kind == "issued":
            row = session.execute(
                select(*_OURS_COLUMNS).where(Certificate.serial == key)
            ).one_or_none()
            if row is None:
                raise CAError(Kind.NOT_FOUND, f"no certificate with serial {key}")
            item = _ours_item(row)
        else:
            found = session.scalar(
                select(DiscoveredCertificate).where(DiscoveredCertificate.fingerprint_sha256 == key)
            )
            if found is None:
                raise CAError(Kind.NOT_FOUND, f"no discovered certificate sha256:{key}")
            item = _theirs_item(found)
        return _with_lineage_and_deployments(session, [item])[0]


_REPLACED_SQL = (
    "SELECT id, serial, replaces, status FROM certificates {} WHERE replaces IN :serials"
)
# PostgreSQL takes the whole list as one array parameter: no statement with 1,000 placeholders.
_REPLACED = text(
    "SELECT id, serial, replaces, status FROM certificates WHERE replaces = ANY(:serials)"
)
_REPLACED_SQLITE = text(_REPLACED_SQL.format("INDEXED BY ix_certificates_replaces")).bindparams(
    bindparam("serials", expanding=True)
)


def _chunks(values: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), max(size, 1)):
        yield values[start : start + max(size, 1)]


def _in(column: Any, values: Sequence[Any], postgresql: bool) -> ColumnElement[bool]:
    """`column IN (...)`; on PostgreSQL `column = ANY(array)`, one parameter for the list."""
    if postgresql:
        return column == any_(literal(list(values), type_=ARRAY(column.type)))  # type: ignore[no-any-return]
    return column.in_(values)  # type: ignore[no-any-return]


def _with_lineage_and_deployments(session: Any, items: list[InventoryItem]) -> list[InventoryItem]:
    """Fill replaced_by/replaces (lineage) and deployments for the rows shown."""
    ours = [i for i in items if i.kind == "issued"]
    theirs = [i for i in items if i.kind == "discovered"]
    replaced_by: dict[str, str] = {}
    same_names_before: dict[str, str] = {}
    deployments: dict[tuple[str, int], list[Deployment]] = {}
    postgresql = session.get_bind().dialect.name == "postgresql"
    chunk_size = len(items) if postgresql else _CHUNK
    if ours:
        serials = [i.serial for i in ours]
        # ACME `replaces` (RFC 9773): the first certificate naming each shown one. Most rows
        # have no `replaces`, so SQLite's statistics (after ANALYZE) call that index unselective
        # and would scan the table; with the IN list it is a few index seeks.
        for chunk in _chunks(serials, chunk_size):
            rows = session.execute(
                _REPLACED if postgresql else _REPLACED_SQLITE, {"serials": list(chunk)}
            )
            for _, successor, replaced, status in sorted(rows):
                if status in DEFAULT_STATUSES:
                    replaced_by.setdefault(replaced, successor)
        # Same-names renewal: a certificate issued later for exactly the same set of names.
        firsts = sorted({i.names[0].lower() for i in ours if i.names})
        candidates: dict[int, tuple[str, frozenset[str], datetime.datetime, int]] = {}
        for chunk in _chunks(firsts, chunk_size):
            rows = session.execute(
                select(
                    Certificate.id,
                    Certificate.serial,
                    Certificate.names,
                    func.coalesce(Certificate.issued_at, Certificate.created_at),
                )
                .join(CertificateName, CertificateName.certificate_id == Certificate.id)
                .where(
                    _in(CertificateName.name, chunk, postgresql),
                    Certificate.status.in_(DEFAULT_STATUSES),
                )
            )
            for row_id, serial, names, issued in rows:
                key = frozenset(n.lower() for n in names.split())
                candidates[row_id] = (serial, key, issued, row_id)
        by_names: dict[frozenset[str], list[tuple[datetime.datetime, int, str]]] = {}
        for serial, key, issued, row_id in candidates.values():
            by_names.setdefault(key, []).append((issued, row_id, serial))
        for group in by_names.values():
            group.sort()
        for item in ours:
            group = by_names.get(frozenset(n.lower() for n in item.names), [])
            mine = (item.issued_at, item.row_id)
            later = [g for g in group if (g[0], g[1]) > mine]
            earlier = [g for g in group if (g[0], g[1]) < mine]
            if later:
                replaced_by.setdefault(item.serial, later[0][2])
            if earlier:
                same_names_before[item.serial] = earlier[-1][2]
        # Deployments: sightings of the discovered copies of our certificates.
        for chunk in _chunks([i.row_id for i in ours], chunk_size):
            rows = session.execute(
                select(
                    DiscoveredCertificate.certificate_id,
                    CertificateSighting.location_kind,
                    CertificateSighting.location,
                    CertificateSighting.last_seen,
                    CertificateSighting.missed_scans,
                )
                .join(
                    CertificateSighting,
                    CertificateSighting.discovered_id == DiscoveredCertificate.id,
                )
                .where(_in(DiscoveredCertificate.certificate_id, chunk, postgresql))
                .order_by(CertificateSighting.location_kind, CertificateSighting.location)
            )
            for owner_id, kind, location, last_seen, missed in rows:
                deployments.setdefault(("issued", owner_id), []).append(
                    Deployment(kind, location, last_seen, missed)
                )
    if theirs:
        for chunk in _chunks([i.row_id for i in theirs], chunk_size):
            rows = session.execute(
                select(
                    CertificateSighting.discovered_id,
                    CertificateSighting.location_kind,
                    CertificateSighting.location,
                    CertificateSighting.last_seen,
                    CertificateSighting.missed_scans,
                )
                .where(_in(CertificateSighting.discovered_id, chunk, postgresql))
                .order_by(CertificateSighting.location_kind, CertificateSighting.location)
            )
            for owner_id, kind, location, last_seen, missed in rows:
                deployments.setdefault(("discovered", owner_id), []).append(
                    Deployment(kind, location, last_seen, missed)
                )
    out = []
    for i in items:
        found = deployments.get((i.kind, i.row_id))
        replaces = (i.replaces or same_names_before.get(i.serial)) if i.kind == "issued" else None
        successor = replaced_by.get(i.serial) if i.kind == "issued" else None
        if found or replaces != i.replaces or successor != i.replaced_by:
            # Most rows have no lineage and no sightings: copy only those that do.
            i = dataclasses.replace(
                i, replaces=replaces, replaced_by=successor, deployments=tuple(found or ())
            )
        out.append(i)
    return out


# -- editing ----------------------------------------------------------------------------------


def parse_ref(ref: str) -> tuple[str, str]:
    """("issued", serial) or ("discovered", fingerprint) from `SERIAL` or `sha256:FP`."""
    text = ref.strip()
    if text.lower().startswith("sha256:"):
        fingerprint = text[7:].lower().replace(":", "")
        if not _FINGERPRINT.match(fingerprint):
            raise CAError(Kind.BAD_REQUEST, f"{ref!r} is not sha256:<64 hex digits>")
        return "discovered", fingerprint
    return "issued", certs.parse_serial(text)


def set_owner_and_tags(
    storage: Storage,
    ref: str,
    *,
    actor: str,
    owner: str | None = None,
    add_tags: Sequence[str] = (),
    remove_tags: Sequence[str] = (),
) -> InventoryItem:
    """Set the owner (`""` clears it) and add/remove tags on one certificate, with an audit
    event. A discovered certificate that we issued is edited on our own record."""
    add = validate_tags(add_tags)
    remove = validate_tags(remove_tags)
    new_owner = None if owner is None else _validate_owner(owner)
    if owner is None and not add and not remove:
        raise CAError(Kind.BAD_REQUEST, "nothing to change: give --owner, --tag or --untag")
    kind, key = parse_ref(ref)
    with storage.transaction() as session:
        kind, key = _resolve(session, kind, key)
        table: Any = Certificate if kind == "issued" else DiscoveredCertificate
        key_column = Certificate.serial if kind == "issued" else table.fingerprint_sha256
        subject = f"serial:{key}" if kind == "issued" else f"sha256:{key}"
        row = session.execute(
            select(table.id, table.owner, table.tags).where(key_column == key)
        ).one_or_none()
        if row is None:
            what = (
                f"certificate with serial {key}" if kind == "issued" else f"certificate {subject}"
            )
            raise CAError(Kind.NOT_FOUND, f"no {what}")
        tags = set(parse_tags_column(row.tags))
        tags = (tags | set(add)) - set(remove)
        values: dict[str, Any] = {"tags": tags_column(sorted(tags))}
        if new_owner is not None:
            values["owner"] = new_owner or None
        result = session.execute(
            update(table).where(table.id == row.id, table.tags == row.tags).values(**values)
        )
        if rowcount(result) != 1:
            raise CAError(Kind.CONFLICT, f"{subject} changed meanwhile; try again")
        detail: dict[str, Any] = {"tags": sorted(tags)}
        if new_owner is not None:
            detail["owner"] = new_owner or None
            detail["previous_owner"] = row.owner
        if add:
            detail["added"] = list(add)
        if remove:
            detail["removed"] = list(remove)
        audit.append(
            session,
            audit.values(storage.clock.now(), actor, "inventory.set", subject, "success", detail),
        )
    return get_item(storage, key if kind == "issued" else f"sha256:{key}")


def mark_ari_checked(storage: Storage, serial: str, when: datetime.datetime) -> None:
    """Record that an ACME client asked for this certificate's renewalInfo (one UPDATE)."""
    with storage.transaction(durable=False) as session:
        session.execute(
            update(Certificate).where(Certificate.serial == serial).values(ari_checked_at=when)
        )


__all__ = [
    "Deployment",
    "InventoryFilter",
    "InventoryItem",
    "count_inventory",
    "get_item",
    "list_inventory",
    "mark_ari_checked",
    "parse_ref",
    "parse_tags_column",
    "set_owner_and_tags",
    "tags_column",
    "validate_tag",
    "validate_tags",
]
