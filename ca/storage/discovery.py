"""Recording discovery scans: what was found, where, and what went missing.

One scan is one transaction: a `discovery_scans` row, the certificates upserted by SHA-256
fingerprint into `discovered_certificates`, one `certificate_sightings` row per (certificate,
location kind, location), the missed-scan counters, and an audit record.

Missed scans: a location that answered this scan (a TLS endpoint that completed a handshake, a
file that was read, any file under a directory that was walked) and used to show a certificate
it no longer shows counts one miss for that sighting; a sighting seen again goes back to 0. At
`missing_after` misses in a row the sighting is "missing". A location that failed (endpoint
unreachable or timing out, file unreadable or skipped) is scanned-with-error: it counts no
miss, so an outage or a permission change does not make certificates look retired.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning
from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from ca.errors import CAError, Kind
from ca.storage import audit
from ca.storage.models import (
    Certificate,
    CertificateSighting,
    DiscoveredCertificate,
    DiscoveryScan,
)
from ca.storage.store import Storage

_CHUNK = 500
_ATTEMPTS = 3
_FAILURES_KEPT = 100
_LOCATION_MAX = 1024


@dataclasses.dataclass(frozen=True)
class Observation:
    """What one location showed in one scan.

    `certificates` are DER, in the order presented; `error` set means the location could not
    be scanned (no miss is counted for it)."""

    location_kind: str  # "tls" | "file"
    location: str
    certificates: tuple[bytes, ...] = ()
    error: str | None = None
    skipped: bool = False  # not looked at on purpose (too large, ...): no miss, not an error


@dataclasses.dataclass(frozen=True)
class CertificateFacts:
    """The columns of `discovered_certificates` read from one DER certificate."""

    fingerprint_sha256: str
    der: bytes
    subject: str
    issuer: str
    serial: str
    common_name: str | None
    names: str
    key_type: str
    signature_algorithm: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    self_signed: bool
    is_ca: bool


@dataclasses.dataclass(frozen=True)
class SeenCertificate:
    id: int
    fingerprint_sha256: str
    subject: str
    serial: str
    not_after: datetime.datetime
    certificate_id: int | None
    new: bool


@dataclasses.dataclass(frozen=True)
class MissingSighting:
    fingerprint_sha256: str
    subject: str
    location_kind: str
    location: str
    missed_scans: int


@dataclasses.dataclass(frozen=True)
class ScanRecord:
    """What `record_scan` stored."""

    scan_id: int
    targets: int
    found: int  # distinct certificates seen
    new: int  # of those, first seen in this scan
    errors: int
    skipped: int
    certificates: dict[str, SeenCertificate]  # by fingerprint
    unparseable: dict[str, str]  # location -> why a presented certificate did not parse
    missing: list[MissingSighting]  # sightings at or above the threshold after this scan

    def to_json(self) -> dict[str, Any]:
        return {
            "scan_id": self.scan_id,
            "targets": self.targets,
            "found": self.found,
            "new": self.new,
            "errors": self.errors,
            "skipped": self.skipped,
            "missing": [dataclasses.asdict(m) for m in self.missing],
        }


# -- reading certificates ----------------------------------------------------------------------


def key_type_of(key: Any) -> str:
    """`rsa-2048`, `ec-p256`, `ec-secp192r1`, `ed25519`, ..."""
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        short = {"secp256r1": "p256", "secp384r1": "p384", "secp521r1": "p521"}
        return f"ec-{short.get(key.curve.name, key.curve.name)}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return f"dsa-{key.key_size}"
    return "unknown"


def _serial_hex(serial: int) -> str:
    # Same form as certificates.serial: lowercase hex, no leading zeros.
    return format(serial, "x") if serial >= 0 else "-" + format(-serial, "x")


def _names(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    names: list[str] = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    names += [str(n) for n in san.get_values_for_type(x509.RFC822Name)]
    names += [str(n) for n in san.get_values_for_type(x509.UniformResourceIdentifier)]
    return names


def _self_signed(certificate: x509.Certificate) -> bool:
    """Subject equals issuer and the certificate's own key verifies its signature; when the
    signature cannot be checked here (SHA-1, an unusual key), the names decide."""
    if certificate.subject != certificate.issuer:
        return False
    try:
        certificate.verify_directly_issued_by(certificate)
    except InvalidSignature:
        return False
    except (UnsupportedAlgorithm, ValueError, TypeError):
        return True
    return True


def certificate_facts(der: bytes) -> CertificateFacts:
    """The inventory columns of one certificate; ValueError if it does not parse."""
    # Deployed certificates that break RFC 5280 (negative serials, ...) are recorded as found.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return _certificate_facts(der)


def _certificate_facts(der: bytes) -> CertificateFacts:
    certificate = x509.load_der_x509_certificate(der)
    try:
        cn_attrs = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        common_name = str(cn_attrs[0].value)[:256] if cn_attrs else None
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
            is_ca = constraints.value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        try:
            key_type = key_type_of(certificate.public_key())
        except (ValueError, TypeError):
            key_type = "unknown"
        oid = certificate.signature_algorithm_oid
        return CertificateFacts(
            fingerprint_sha256=hashlib.sha256(der).hexdigest(),
            der=der,
            subject=certificate.subject.rfc4514_string()[:1024],
            issuer=certificate.issuer.rfc4514_string()[:1024],
            serial=_serial_hex(certificate.serial_number)[:48],
            common_name=common_name,
            names=" ".join(_names(certificate)),
            key_type=key_type[:32],
            signature_algorithm=str(getattr(oid, "_name", oid.dotted_string))[:64],
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            self_signed=_self_signed(certificate),
            is_ca=is_ca,
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"certificate fields do not parse: {exc}") from None


# -- recording ---------------------------------------------------------------------------------


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _upsert_certificates(
    session: Session, facts: dict[str, CertificateFacts], now: datetime.datetime
) -> dict[str, SeenCertificate]:
    seen: dict[str, SeenCertificate] = {}
    fingerprints = list(facts)
    for chunk in _chunks(fingerprints):
        known = session.execute(
            select(DiscoveredCertificate).where(DiscoveredCertificate.fingerprint_sha256.in_(chunk))
        ).scalars()
        for row in known:
            row.last_seen = now
            seen[row.fingerprint_sha256] = SeenCertificate(
                row.id,
                row.fingerprint_sha256,
                row.subject,
                row.serial,
                row.not_after,
                row.certificate_id,
                new=False,
            )
    missing = [f for f in fingerprints if f not in seen]
    ours = _our_certificates(session, [facts[f] for f in missing])
    added = {
        fingerprint: DiscoveredCertificate(
            **dataclasses.asdict(facts[fingerprint]),
            certificate_id=ours.get(fingerprint),
            owner=None,
            tags="",
            first_seen=now,
            last_seen=now,
        )
        for fingerprint in missing
    }
    session.add_all(added.values())
    session.flush()
    for fingerprint, row in added.items():
        seen[fingerprint] = SeenCertificate(
            row.id,
            fingerprint,
            row.subject,
            row.serial,
            row.not_after,
            row.certificate_id,
            new=True,
        )
    return seen


def _our_certificates(session: Session, facts: list[CertificateFacts]) -> dict[str, int]:
    """fingerprint -> certificates.id, for those we issued: same serial and identical DER."""
    by_serial: dict[str, list[CertificateFacts]] = {}
    for fact in facts:  # another CA may have used one of our serials: the DER decides
        by_serial.setdefault(fact.serial, []).append(fact)
    ours: dict[str, int] = {}
    for chunk in _chunks(list(by_serial)):
        rows = session.execute(
            select(Certificate.id, Certificate.serial, Certificate.der).where(
                Certificate.serial.in_(chunk)
            )
        )
        for cid, serial, der in rows:
            for fact in by_serial[serial]:
                if der is not None and bytes(der) == fact.der:
                    ours[fact.fingerprint_sha256] = int(cid)
    return ours


def _at_locations(keys: Iterable[tuple[str, str]]) -> Iterator[ColumnElement[bool]]:
    """WHERE clauses matching sightings at these (kind, location) pairs, a chunk at a time."""
    by_kind: dict[str, list[str]] = {}
    for kind, location in keys:
        by_kind.setdefault(kind, []).append(location)
    for kind, locations in sorted(by_kind.items()):
        for chunk in _chunks(sorted(set(locations))):
            yield and_(
                CertificateSighting.location_kind == kind, CertificateSighting.location.in_(chunk)
            )


def _upsert_sightings(
    session: Session,
    pairs: set[tuple[int, str, str]],
    scan_id: int,
    now: datetime.datetime,
) -> None:
    by_location: dict[tuple[str, str], set[int]] = {}
    for discovered_id, kind, location in pairs:
        by_location.setdefault((kind, location), set()).add(discovered_id)
    keys = list(by_location)
    existing: set[tuple[int, str, str]] = set()
    for condition in _at_locations(keys):
        rows = session.execute(select(CertificateSighting).where(condition)).scalars()
        for row in rows:
            key = (row.discovered_id, row.location_kind, row.location)
            if key in pairs:
                row.last_seen = now
                row.last_scan_id = scan_id
                row.missed_scans = 0
                existing.add(key)
    for discovered_id, kind, location in sorted(pairs - existing):
        session.add(
            CertificateSighting(
                discovered_id=discovered_id,
                location_kind=kind,
                location=location,
                first_seen=now,
                last_seen=now,
                last_scan_id=scan_id,
                missed_scans=0,
            )
        )
    session.flush()


def _count_misses(
    session: Session,
    scanned: Sequence[tuple[str, str]],
    covers: Sequence[str],
    failed: Sequence[str],
    scan_id: int,
) -> None:
    """One miss for every sighting at a location scanned without error (or a file under a
    walked directory, except under a path that failed) that this scan did not refresh."""
    not_seen = or_(
        CertificateSighting.last_scan_id.is_(None), CertificateSighting.last_scan_id != scan_id
    )
    ids: set[int] = set()
    for condition in _at_locations(scanned):
        ids.update(
            session.execute(select(CertificateSighting.id).where(condition, not_seen)).scalars()
        )
    for directory in covers:
        prefix = directory.rstrip("/") + "/"
        rows = session.execute(
            select(CertificateSighting.id, CertificateSighting.location).where(
                CertificateSighting.location_kind == "file",
                CertificateSighting.location.startswith(prefix, autoescape=True),
                not_seen,
            )
        )
        for sighting_id, location in rows:
            if not any(location == f or location.startswith(f.rstrip("/") + "/") for f in failed):
                ids.add(int(sighting_id))
    for chunk in _chunks(sorted(ids)):
        session.execute(
            update(CertificateSighting)
            .where(CertificateSighting.id.in_(chunk))
            .values(missed_scans=CertificateSighting.missed_scans + 1)
        )


def _missing(
    session: Session, locations: Sequence[tuple[str, str]], covers: Sequence[str], threshold: int
) -> list[MissingSighting]:
    """Sightings at the scanned locations (or under walked directories) flagged missing."""
    query = (
        select(
            DiscoveredCertificate.fingerprint_sha256,
            DiscoveredCertificate.subject,
            CertificateSighting.location_kind,
            CertificateSighting.location,
            CertificateSighting.missed_scans,
        )
        .join(DiscoveredCertificate, DiscoveredCertificate.id == CertificateSighting.discovered_id)
        .where(CertificateSighting.missed_scans >= threshold)
    )
    found: dict[tuple[str, str, str], MissingSighting] = {}
    conditions = list(_at_locations(locations)) + [
        and_(
            CertificateSighting.location_kind == "file",
            CertificateSighting.location.startswith(d.rstrip("/") + "/", autoescape=True),
        )
        for d in covers
    ]
    for condition in conditions:
        for row in session.execute(query.where(condition)):
            found[(row[0], row[2], row[3])] = MissingSighting(
                row[0], row[1], row[2], row[3], row[4]
            )
    return sorted(found.values(), key=lambda m: (m.location, m.subject))


def record_scan(
    storage: Storage,
    *,
    kind: str,
    actor: str,
    observations: Sequence[Observation],
    started_at: datetime.datetime,
    missing_after: int,
    covers: Sequence[str] = (),
    detail: dict[str, Any] | None = None,
) -> ScanRecord:
    """Store one scan (see the module's docstring); retried when a concurrent scan inserted
    the same certificate or sighting first."""
    if kind not in ("tls", "files"):
        raise CAError(Kind.BAD_REQUEST, f"unknown scan kind {kind!r}")
    # The column holds 1024 characters; a longer path is kept by its first 1024.
    observations = [
        dataclasses.replace(o, location=o.location[:_LOCATION_MAX])
        if len(o.location) > _LOCATION_MAX
        else o
        for o in observations
    ]
    facts: dict[str, CertificateFacts] = {}
    unparseable: dict[str, str] = {}
    for observation in observations:
        for der in observation.certificates:
            fingerprint = hashlib.sha256(der).hexdigest()
            if fingerprint in facts:
                continue
            try:
                facts[fingerprint] = certificate_facts(der)
            except ValueError as exc:
                unparseable[observation.location] = str(exc)[:200]
    for attempt in range(_ATTEMPTS):
        try:
            return _record(
                storage,
                kind,
                actor,
                observations,
                started_at,
                missing_after,
                covers,
                detail or {},
                facts,
                unparseable,
            )
        except CAError as exc:
            if exc.kind is not Kind.CONFLICT or attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _record(
    storage: Storage,
    kind: str,
    actor: str,
    observations: Sequence[Observation],
    started_at: datetime.datetime,
    missing_after: int,
    covers: Sequence[str],
    detail: dict[str, Any],
    facts: dict[str, CertificateFacts],
    unparseable: dict[str, str],
) -> ScanRecord:
    skipped = sum(1 for o in observations if o.skipped)
    errors = sum(1 for o in observations if o.error is not None and not o.skipped)
    with storage.transaction() as session:
        now = storage.clock.now()
        scan = DiscoveryScan(
            kind=kind,
            actor=actor[:128],
            started_at=started_at,
            finished_at=now,
            targets=len(observations),
            found=len(facts),
            errors=errors,
            detail=json.dumps(
                detail
                | {
                    "skipped": skipped,
                    # The first failures, so a scan's record says what went wrong where.
                    "failures": [
                        {"location": o.location, "error": o.error}
                        for o in observations
                        if o.error is not None and not o.skipped
                    ][:_FAILURES_KEPT],
                },
                sort_keys=True,
                default=str,
            ),
        )
        session.add(scan)
        session.flush()
        seen = _upsert_certificates(session, facts, now)
        pairs: set[tuple[int, str, str]] = set()
        for observation in observations:
            if observation.error is not None or observation.skipped:
                continue
            for der in observation.certificates:
                item = seen.get(hashlib.sha256(der).hexdigest())
                if item is not None:
                    pairs.add((item.id, observation.location_kind, observation.location))
        _upsert_sightings(session, pairs, scan.id, now)
        scanned = [
            (o.location_kind, o.location) for o in observations if o.error is None and not o.skipped
        ]
        failed = [o.location for o in observations if o.error is not None or o.skipped]
        _count_misses(session, scanned, covers, failed, scan.id)
        missing = _missing(session, scanned, covers, missing_after)
        new = sum(1 for s in seen.values() if s.new)
        audit.append(
            session,
            audit.values(
                now,
                actor,
                "discovery.scan",
                f"scan:{scan.id}",
                "success",
                {
                    "kind": kind,
                    "targets": len(observations),
                    "found": len(facts),
                    "new": new,
                    "errors": errors,
                    "skipped": skipped,
                    "missing": len(missing),
                },
            ),
        )
        return ScanRecord(
            scan_id=scan.id,
            targets=len(observations),
            found=len(facts),
            new=new,
            errors=errors,
            skipped=skipped,
            certificates=seen,
            unparseable=unparseable,
            missing=missing,
        )
