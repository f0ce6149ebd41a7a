"""Audit findings over the inventory: what is expired, expiring, weak, too long or unknown.

`compute_findings(storage, config, now)` looks at our own certificates (table `certificates`)
and at what discovery scans found (`discovered_certificates`, `certificate_sightings`) and
returns a list of `Finding`, worst first. `certwright audit` prints them; the dashboard shows
them.

Severity table (a certificate is "deployed" when a discovery scan saw it at some location and
that location has not missed `discovery.missing_after_scans` scans since):

==========================  ==========  =====================================================
code                        severity    when
==========================  ==========  =====================================================
expired                     critical    expired and still deployed somewhere
expired                     low         ours, expired within the last 30 days, not deployed
                                        (`info` when a live successor renewed it)
expired                     info        discovered (not ours), expired, no longer deployed
expiring                    high        expires within `findings.expiring_critical_days`
expiring                    medium      expires within `findings.expiring_warning_days`
expiring                    low         ours, expiring, but a live successor renewed it and
                                        the old one is not deployed
revoked-but-deployed        high        ours, revoked, yet a sighting has last_seen after
                                        revoked_at at a location still being seen
weak-key                    high        RSA < 2048 bits, DSA, or an EC curve other than
                                        P-256/P-384/P-521 (discovered certificates)
md5-signature               critical    signed with MD5 (discovered)
sha1-signature              high        signed with SHA-1 (discovered; not for the
                                        self-signature of a root, which nobody checks)
validity-too-long           medium      ours: longer than its profile's max_validity_days;
                                        discovered leaf: longer than 398 days
self-signed                 medium      a discovered leaf certificate signed by itself
unknown-issuer              medium      a discovered leaf not issued by any of our issuers
                                        (a "shadow" certificate; compared by issuer name and
                                        authority key identifier with the `issuers` table)
missing                     low         a sighting missed `discovery.missing_after_scans`
                                        scans in a row (gone from that location)
==========================  ==========  =====================================================

Only live certificates of ours (status `issued`) count for expiry; pending, failed and revoked
ones never do. Our own certificates passed policy at issuance (ca/policy.py refuses weak keys
and SHA-1), so key and signature checks apply to discovered certificates, whose DER is parsed;
everything about our own certificates is decided with SQL filters on indexed columns, so the
cost grows with the number of findings, not with the size of the inventory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from ca.config import Config
from ca.profiles import load_profiles
from ca.storage import Storage
from ca.storage.models import (
    Certificate,
    CertificateName,
    CertificateSighting,
    DiscoveredCertificate,
    Issuer,
)

SEVERITIES = ("critical", "high", "medium", "low", "info")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}
APPROVED_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
RSA_MIN_BITS = 2048
DISCOVERED_LEAF_MAX_DAYS = 398  # the CA/Browser Forum limit for public TLS leaves
EXPIRED_LOOKBACK = datetime.timedelta(days=30)  # ours, expired and not deployed: this recent
_CHUNK = 1000  # bound parameters per IN list


@dataclasses.dataclass(frozen=True)
class Finding:
    severity: str  # critical | high | medium | low | info
    code: str
    subject: str  # "serial:<hex>" for ours, "sha256:<hex>" for a discovered certificate
    names: tuple[str, ...]
    owner: str | None
    message: str
    source: str = "ours"  # "ours" | "discovered"
    not_after: datetime.datetime | None = None
    locations: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "code": self.code,
            "subject": self.subject,
            "names": list(self.names),
            "owner": self.owner,
            "message": self.message,
            "source": self.source,
            "not_after": self.not_after.isoformat() if self.not_after else None,
            "locations": list(self.locations),
        }


@dataclasses.dataclass(frozen=True)
class _About:
    """What every finding about one certificate shares."""

    subject: str
    names: tuple[str, ...]
    owner: str | None
    source: str
    not_after: datetime.datetime
    locations: tuple[str, ...] = ()

    @classmethod
    def ours(cls, row: CertRow | Certificate, locations: tuple[str, ...] = ()) -> _About:
        return cls(
            f"serial:{row.serial}",
            tuple(row.names.split()),
            row.owner,
            "ours",
            row.not_after,
            locations,
        )

    def finding(
        self, severity: str, code: str, message: str, locations: tuple[str, ...] | None = None
    ) -> Finding:
        return Finding(
            severity,
            code,
            self.subject,
            self.names,
            self.owner,
            message,
            self.source,
            self.not_after,
            self.locations if locations is None else locations,
        )


def severity_rank(severity: str) -> int:
    """0 for critical ... 4 for info; raises KeyError for an unknown name."""
    return _RANK[severity]


def at_or_above(findings: Iterable[Finding], severity: str) -> list[Finding]:
    limit = _RANK[severity]
    return [f for f in findings if _RANK[f.severity] <= limit]


def _days(delta: datetime.timedelta) -> str:
    days = delta.total_seconds() / 86400
    return f"{days:.1f} days" if days < 10 else f"{days:.0f} days"


@dataclasses.dataclass
class _Deployment:
    """Where a certificate is deployed, and the newest sighting anywhere."""

    live_locations: list[str] = dataclasses.field(default_factory=list)
    last_seen: datetime.datetime | None = None
    sightings: list[CertificateSighting] = dataclasses.field(default_factory=list)


def _deployments(
    session: Session, discovered_ids: Sequence[int], missing_after: int
) -> dict[int, _Deployment]:
    result: dict[int, _Deployment] = defaultdict(_Deployment)
    for start in range(0, len(discovered_ids), _CHUNK):
        chunk = discovered_ids[start : start + _CHUNK]
        for s in session.scalars(
            select(CertificateSighting).where(CertificateSighting.discovered_id.in_(chunk))
        ):
            d = result[s.discovered_id]
            d.sightings.append(s)
            if s.missed_scans < missing_after:
                d.live_locations.append(_location(s))
            if d.last_seen is None or s.last_seen > d.last_seen:
                d.last_seen = s.last_seen
    return result


def _location(s: CertificateSighting) -> str:
    return s.location if s.location_kind == "tls" else f"file:{s.location}"


def compute_findings(
    storage: Storage, config: Config, now: datetime.datetime | None = None
) -> list[Finding]:
    """Every finding over our certificates and the discovered ones, worst first."""
    now = now or storage.clock.now()
    warning = datetime.timedelta(days=float(config.get("findings", "expiring_warning_days")))
    critical = datetime.timedelta(days=float(config.get("findings", "expiring_critical_days")))
    missing_after = int(config.get("discovery", "missing_after_scans"))
    profiles = load_profiles(config.profiles)
    findings: list[Finding] = []
    with storage.transaction() as session:
        findings += _ours(session, now, warning, critical, missing_after)
        findings += _too_long(session, storage.dialect, now, profiles)
        findings += _discovered(session, now, warning, critical, missing_after)
    findings.sort(key=lambda f: (_RANK[f.severity], f.not_after or now, f.subject, f.code))
    return findings


# -- ours ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CertRow:
    """The columns of one of our certificates that findings and the monitor read (loading
    whole ORM objects costs several times more on large result sets)."""

    id: int
    serial: str
    names: str
    owner: str | None
    not_before: datetime.datetime
    not_after: datetime.datetime
    revoked_at: datetime.datetime | None

    COLUMNS = (
        Certificate.id,
        Certificate.serial,
        Certificate.names,
        Certificate.owner,
        Certificate.not_before,
        Certificate.not_after,
        Certificate.revoked_at,
    )

    @classmethod
    def load(cls, session: Session, *where: ColumnElement[bool]) -> list[CertRow]:
        return [cls(*row) for row in session.execute(select(*cls.COLUMNS).where(*where))]


def _ours_deployed(
    session: Session, certificate_ids: Sequence[int], missing_after: int
) -> dict[int, _Deployment]:
    """Deployments of our certificates, by certificate id (discovered rows link to ours)."""
    links: dict[int, int] = {}
    for start in range(0, len(certificate_ids), _CHUNK):
        chunk = certificate_ids[start : start + _CHUNK]
        for d_id, c_id in session.execute(
            select(DiscoveredCertificate.id, DiscoveredCertificate.certificate_id).where(
                DiscoveredCertificate.certificate_id.in_(chunk)
            )
        ):
            assert c_id is not None
            links[d_id] = c_id
    by_discovered = _deployments(session, list(links), missing_after)
    result: dict[int, _Deployment] = {}
    for d_id, dep in by_discovered.items():
        merged = result.setdefault(links[d_id], _Deployment())
        merged.live_locations += dep.live_locations
        merged.sightings += dep.sightings
        if dep.last_seen and (merged.last_seen is None or dep.last_seen > merged.last_seen):
            merged.last_seen = dep.last_seen
    return result


def successors(session: Session, rows: Sequence[CertRow], now: datetime.datetime) -> dict[int, str]:
    """For each of `rows` (ours) that a live certificate renewed, that renewal's serial.

    A renewal is a live certificate (issued, unexpired) whose `replaces` is the row's serial,
    or one with exactly the same set of names issued later.
    """
    if not rows:
        return {}
    found: dict[int, str] = {}
    by_serial = {r.serial: r for r in rows}
    serials = list(by_serial)
    # Each lookup goes by its own index (replaces, certificate_names.name, the primary key)
    # and liveness is checked here: given a status filter, a planner may prefer walking the
    # (status, not_after) index over all live certificates.
    for start in range(0, len(serials), _CHUNK):
        chunk = serials[start : start + _CHUNK]
        for replaces, serial, status, not_after in session.execute(
            select(
                Certificate.replaces, Certificate.serial, Certificate.status, Certificate.not_after
            ).where(Certificate.replaces.in_(chunk))
        ):
            if replaces is not None and status == "issued" and not_after > now:
                found[by_serial[replaces].id] = serial
    # Same exact name set, issued later: look up live holders of each row's first name.
    wanted = {r.id: frozenset(r.names.split()) for r in rows if r.id not in found and r.names}
    first_names = sorted({min(names) for names in wanted.values() if names})
    holders: dict[str, list[tuple[int, str, frozenset[str], datetime.datetime]]] = defaultdict(list)
    for start in range(0, len(first_names), _CHUNK):
        chunk = first_names[start : start + _CHUNK]
        pairs = session.execute(
            select(CertificateName.name, CertificateName.certificate_id).where(
                CertificateName.name.in_(chunk)
            )
        ).all()
        name_of: dict[int, list[str]] = defaultdict(list)
        for name, c_id in pairs:
            name_of[c_id].append(name)
        ids = sorted(name_of)
        for id_start in range(0, len(ids), _CHUNK):
            for c_id, serial, status, not_after, names_text, not_before in session.execute(
                select(
                    Certificate.id,
                    Certificate.serial,
                    Certificate.status,
                    Certificate.not_after,
                    Certificate.names,
                    Certificate.not_before,
                ).where(Certificate.id.in_(ids[id_start : id_start + _CHUNK]))
            ):
                if status != "issued" or not_after <= now:
                    continue
                for name in name_of[c_id]:
                    holders[name].append((c_id, serial, frozenset(names_text.split()), not_before))
    for row in rows:
        name_set = wanted.get(row.id)
        if not name_set:
            continue
        for c_id, serial, other_names, not_before in holders.get(min(name_set), []):
            later = (not_before, c_id) > (row.not_before, row.id)
            if c_id != row.id and other_names == name_set and later:
                found[row.id] = serial
                break
    return found


def _ours(
    session: Session,
    now: datetime.datetime,
    warning: datetime.timedelta,
    critical: datetime.timedelta,
    missing_after: int,
) -> list[Finding]:
    # Our certificates a scan saw: few next to the inventory, found from the sightings' side.
    seen = session.execute(
        select(
            DiscoveredCertificate.certificate_id,
            CertificateSighting.missed_scans,
            CertificateSighting.last_seen,
        )
        .join(CertificateSighting, CertificateSighting.discovered_id == DiscoveredCertificate.id)
        .where(DiscoveredCertificate.certificate_id.is_not(None))
    ).all()
    deployed_ids = {c for c, missed, _ in seen if c is not None and missed < missing_after}
    seen_ids = sorted({c for c, _, _ in seen if c is not None})
    # Live and expiring or recently expired: a range of the (status, not_after) index.
    expiring = CertRow.load(
        session,
        Certificate.status == "issued",
        Certificate.not_after <= now + warning,
        Certificate.not_after > now - EXPIRED_LOOKBACK,
    )
    revoked: list[CertRow] = []
    for start in range(0, len(seen_ids), _CHUNK):
        chunk = seen_ids[start : start + _CHUNK]
        deployed_chunk = [c for c in chunk if c in deployed_ids]
        if deployed_chunk:
            # Expired long ago but still deployed.
            expiring += CertRow.load(
                session,
                Certificate.id.in_(deployed_chunk),
                Certificate.status == "issued",
                Certificate.not_after <= now - EXPIRED_LOOKBACK,
            )
        revoked += CertRow.load(session, Certificate.id.in_(chunk), Certificate.status == "revoked")
    rows = list(expiring) + list(revoked)
    seen_set = set(seen_ids)
    deployments = _ours_deployed(session, [r.id for r in rows if r.id in seen_set], missing_after)
    renewed = successors(session, list(expiring), now)
    findings: list[Finding] = []
    for row in expiring:
        dep = deployments.get(row.id, _Deployment())
        where = tuple(sorted(dep.live_locations))
        base = _About.ours(row, where)
        successor = renewed.get(row.id)
        if row.not_after <= now:
            ago = _days(now - row.not_after)
            if where:
                severity, message = "critical", f"expired {ago} ago and still deployed"
            elif successor:
                severity, message = "info", f"expired {ago} ago; renewed by {successor}"
            else:
                severity, message = "low", f"expired {ago} ago (not seen deployed)"
            findings.append(base.finding(severity, "expired", message))
            continue
        left = row.not_after - now
        severity = "high" if left <= critical else "medium"
        message = f"expires in {_days(left)}"
        if successor and not where:
            severity, message = "low", f"{message}; renewed by {successor}"
        elif successor:
            message = f"{message}; renewed by {successor} but the old one is still deployed"
        findings.append(base.finding(severity, "expiring", message))
    for row in revoked:
        dep = deployments.get(row.id, _Deployment())
        assert row.revoked_at is not None
        revoked_at = row.revoked_at
        late = sorted(_location(s) for s in dep.sightings if s.last_seen > revoked_at)
        if not late:
            continue
        message = f"revoked {revoked_at:%Y-%m-%d %H:%M} UTC but seen since at {', '.join(late[:5])}"
        findings.append(
            _About.ours(row, tuple(late)).finding("high", "revoked-but-deployed", message)
        )
    return findings


def _too_long(
    session: Session,
    dialect: str,
    now: datetime.datetime,
    profiles: dict[str, Any],
) -> list[Finding]:
    """Live certificates of ours whose lifetime exceeds what their profile now allows."""
    findings: list[Finding] = []
    for name, profile in profiles.items():
        limit: datetime.timedelta = profile.max_validity
        # RFC 5280 validity is inclusive: a certificate of exactly the limit has
        # not_after - not_before = limit - 1 s, so "longer" is strictly more than that.
        if dialect == "sqlite":
            longer: ColumnElement[bool] = (
                func.julianday(Certificate.not_after) - func.julianday(Certificate.not_before)
            ) * 86400 > limit.total_seconds() - 0.5
        else:
            longer = (Certificate.not_after - Certificate.not_before) > limit - datetime.timedelta(
                seconds=1
            )
        for row in session.scalars(
            select(Certificate).where(
                Certificate.status == "issued",
                Certificate.not_after > now,
                Certificate.profile == name,
                longer,
            )
        ):
            span = row.not_after - row.not_before + datetime.timedelta(seconds=1)
            message = f"valid for {_days(span)}; profile {name} now allows at most {_days(limit)}"
            findings.append(_About.ours(row).finding("medium", "validity-too-long", message))
    return findings


# -- discovered ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _OurIssuers:
    names: tuple[x509.Name, ...]
    key_ids: frozenset[bytes]
    fingerprints: frozenset[str]


def _our_issuers(session: Session) -> _OurIssuers:
    names: list[x509.Name] = []
    key_ids: set[bytes] = set()
    fingerprints: set[str] = set()
    for (der,) in session.execute(select(Issuer.cert_der)):
        fingerprints.add(hashlib.sha256(der).hexdigest())
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            continue
        names.append(cert.subject)
        with contextlib.suppress(x509.ExtensionNotFound):
            key_ids.add(
                cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
            )
    return _OurIssuers(tuple(names), frozenset(key_ids), frozenset(fingerprints))


def _weak_key(cert: x509.Certificate) -> str | None:
    try:
        key = cert.public_key()
    except (ValueError, TypeError):  # an algorithm cryptography cannot load
        return "an unsupported public key algorithm"
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < RSA_MIN_BITS:
        return f"an RSA key of {key.key_size} bits (< {RSA_MIN_BITS})"
    if isinstance(key, dsa.DSAPublicKey):
        return f"a DSA key ({key.key_size} bits)"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in APPROVED_CURVES:
        return f"an EC key on unapproved curve {key.curve.name}"
    return None


def _signature_hash(cert: x509.Certificate, column: str) -> str | None:
    try:
        algorithm = cert.signature_hash_algorithm
        name = algorithm.name if algorithm else ""
    except Exception:  # an unsupported algorithm: fall back to the stored column
        name = column
    name = name.lower().replace("-", "")
    if "md5" in name:
        return "md5"
    if "sha1" in name:
        return "sha1"
    return None


def _issued_by_us(cert: x509.Certificate, ours: _OurIssuers) -> bool:
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        if aki.key_identifier is not None:
            return aki.key_identifier in ours.key_ids
    except (x509.ExtensionNotFound, ValueError):
        pass
    return cert.issuer in ours.names


def _discovered(
    session: Session,
    now: datetime.datetime,
    warning: datetime.timedelta,
    critical: datetime.timedelta,
    missing_after: int,
) -> list[Finding]:
    ours = _our_issuers(session)
    findings: list[Finding] = []
    rows = session.scalars(select(DiscoveredCertificate).order_by(DiscoveredCertificate.id)).all()
    deployments = _deployments(session, [r.id for r in rows], missing_after)
    for row in rows:
        dep = deployments.get(row.id, _Deployment())
        subject = f"sha256:{row.fingerprint_sha256}"
        names = tuple(row.names.split())
        where = tuple(sorted(dep.live_locations))
        base = _About(subject, names, row.owner, "discovered", row.not_after, where)
        for s in dep.sightings:
            if s.missed_scans >= missing_after:
                findings.append(
                    base.finding(
                        "low",
                        "missing",
                        f"not seen at {_location(s)} for {s.missed_scans} scans "
                        f"(last seen {s.last_seen:%Y-%m-%d %H:%M} UTC)",
                        (_location(s),),
                    )
                )
        if row.certificate_id is not None or row.fingerprint_sha256 in ours.fingerprints:
            continue  # ours: judged from our own records above
        if row.not_after <= now:
            ago = _days(now - row.not_after)
            if where:
                severity, message = "critical", f"expired {ago} ago and still deployed"
            else:
                severity, message = "info", f"expired {ago} ago (no longer seen deployed)"
            findings.append(base.finding(severity, "expired", message))
        elif row.not_after - now <= warning:
            left = row.not_after - now
            severity = "high" if left <= critical else "medium"
            findings.append(base.finding(severity, "expiring", f"expires in {_days(left)}"))
        try:
            cert = x509.load_der_x509_certificate(row.der)
        except ValueError:
            findings.append(base.finding("info", "unparseable", "stored DER does not parse"))
            continue
        weak = _weak_key(cert)
        if weak:
            findings.append(base.finding("high", "weak-key", f"uses {weak}"))
        digest = _signature_hash(cert, row.signature_algorithm)
        if digest == "md5":
            findings.append(base.finding("critical", "md5-signature", "signed with MD5"))
        elif digest == "sha1" and not (row.self_signed and row.is_ca):
            findings.append(base.finding("high", "sha1-signature", "signed with SHA-1"))
        if row.is_ca:
            continue  # lifetime and issuer rules below are for leaf certificates
        span = row.not_after - row.not_before + datetime.timedelta(seconds=1)
        if span > datetime.timedelta(days=DISCOVERED_LEAF_MAX_DAYS):
            findings.append(
                base.finding(
                    "medium",
                    "validity-too-long",
                    f"valid for {_days(span)} (leaf limit {DISCOVERED_LEAF_MAX_DAYS} days)",
                )
            )
        if row.self_signed:
            findings.append(base.finding("medium", "self-signed", "self-signed leaf certificate"))
        elif not _issued_by_us(cert, ours):
            findings.append(
                base.finding(
                    "medium",
                    "unknown-issuer",
                    f"issued by {row.issuer[:200]}, not by any of our issuers",
                )
            )
    return findings
