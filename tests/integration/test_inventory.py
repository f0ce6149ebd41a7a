"""The certificate inventory (issue #5 point 1): owners, tags, deployments, lineage, ARI checks,
filters and exports, through the real `certwright` CLI and in-process on SQLite and PostgreSQL.

Certificates are issued for real (the session's SoftHSM token); sightings of deployed
certificates are rows inserted with the models, as a discovery scan would record them.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flask.testing import FlaskClient
from sqlalchemy import select, text

from acme.service import ari_cert_id
from ca.config import load_config
from ca.errors import CAError, Kind
from ca.issuance import CertificateAuthority, IssuanceRequest, IssuedCertificate
from ca.policy import Identifier
from ca.runtime import Runtime
from ca.storage import CertificateFilter, Storage
from ca.storage.inventory import (
    InventoryFilter,
    InventoryItem,
    count_inventory,
    get_item,
    list_inventory,
    set_owner_and_tags,
)
from ca.storage.models import (
    AuditEvent,
    Certificate,
    CertificateSighting,
    DiscoveredCertificate,
)
from ca.web import create_app
from tests.conftest import ONLINE_PIN, ONLINE_TOKEN, SessionPKI, run_cli

pytestmark = pytest.mark.integration

_KEY = ec.generate_private_key(ec.SECP256R1()).public_key()


def _issue(
    authority: CertificateAuthority,
    *names: str,
    days: float = 60,
    issuer: str | None = None,
    owner: str | None = None,
    tags: tuple[str, ...] = (),
    replaces: str | None = None,
) -> IssuedCertificate:
    return authority.issue(
        IssuanceRequest(
            _KEY,
            tuple(Identifier("dns", n) for n in names),
            "tls-server",
            validity=datetime.timedelta(days=days),
            issuer=issuer,
            owner=owner,
            tags=tags,
            replaces=replaces,
        )
    )


def _serials(items: list[InventoryItem]) -> list[str]:
    return [i.serial for i in items]


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def cli_env(storage: Storage, pki: SessionPKI, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A config for `certwright` on the test's database and the session's online token."""
    config = tmp_path / "certwright.toml"
    config.write_text(
        "\n".join(
            [
                "[ca]",
                'public_base_url = "http://ca.test:8080"',
                'default_issuer = "issuing-ec"',
                "[database]",
                f"url = {json.dumps(storage.url)}",
                "[hsm]",
                f"token_label = {json.dumps(ONLINE_TOKEN)}",
            ]
        )
        + "\n"
    )
    yield {
        "CERTWRIGHT_CONFIG": str(config),
        "CERTWRIGHT_HSM_PIN": ONLINE_PIN,
        "SOFTHSM2_CONF": str(pki.softhsm_conf),
    }


def _ok(env: dict[str, str], *args: str) -> str:
    result = run_cli(*args, env=env)
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return result.stdout


def _refused(env: dict[str, str], *args: str, expect: str) -> None:
    result = run_cli(*args, env=env)
    assert result.returncode != 0, f"{args}: {result.stdout}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("certwright: error: ")
    assert expect in lines[0], lines[0]


def test_cli_owners_tags_filters_and_exports(
    cli_env: dict[str, str], storage: Storage, tmp_path: Path
) -> None:
    def issue(name: str, *extra: str) -> dict[str, object]:
        out = tmp_path / name
        record: dict[str, object] = json.loads(
            _ok(cli_env, "issue", "--name", name, "--out-dir", str(out), "--json", *extra)
        )
        return record

    web = issue("web.inv.test", "--owner", "team-web", "--tag", "prod", "--tag", "web")
    api = issue("api.inv.test", "--owner", "team-api", "--tag", "prod")
    dev = issue("dev.other.test")
    with storage.transaction() as session:
        stored = {s: t for s, t in session.execute(select(Certificate.serial, Certificate.tags))}
    assert stored[str(web["serial"])] == ",prod,web,"
    assert stored[str(dev["serial"])] == ""

    listed = json.loads(_ok(cli_env, "inventory", "--json"))
    assert {i["serial"] for i in listed} == {web["serial"], api["serial"], dev["serial"]}
    by_serial = {i["serial"]: i for i in listed}
    assert by_serial[web["serial"]]["owner"] == "team-web"
    assert by_serial[web["serial"]]["tags"] == ["prod", "web"]
    assert by_serial[web["serial"]]["kind"] == "issued"
    assert by_serial[web["serial"]]["source"].startswith("cli:")

    def serials(*filters: str) -> set[str]:
        return {i["serial"] for i in json.loads(_ok(cli_env, "inventory", "--json", *filters))}

    assert serials("--owner", "team-api") == {api["serial"]}
    assert serials("--tag", "prod") == {web["serial"], api["serial"]}
    assert serials("--name", "*.inv.test") == {web["serial"], api["serial"]}
    assert serials("--name", "dev.other.test") == {dev["serial"]}
    assert serials("--issuer", "issuing-ec", "--status", "issued", "--kind", "issued") == {
        web["serial"],
        api["serial"],
        dev["serial"],
    }
    assert serials("--expiring-within", "1d") == set()
    assert serials("--source", "acme:*") == set()
    assert len(serials("--limit", "2")) == 2

    # Editing: owner, tags added and removed, each with an audit event.
    edited = json.loads(
        _ok(
            cli_env,
            "inventory",
            "set",
            str(dev["serial"]),
            "--owner",
            "team-dev",
            "--tag",
            "staging",
            "--json",
        )
    )
    assert edited["owner"] == "team-dev" and edited["tags"] == ["staging"]
    _ok(cli_env, "inventory", "set", str(web["serial"]), "--untag", "web", "--tag", "edge")
    assert serials("--tag", "web") == set()
    assert serials("--tag", "edge") == {web["serial"]}
    assert serials("--owner", "team-dev") == {dev["serial"]}
    with storage.transaction() as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "inventory.set").order_by(AuditEvent.seq)
        ).all()
    assert [e.subject for e in events] == [f"serial:{dev['serial']}", f"serial:{web['serial']}"]
    assert json.loads(events[1].detail)["removed"] == ["web"]

    # Exports: CSV and JSON into files, with the same content as the listing.
    _ok(cli_env, "inventory", "--csv", "--output", str(tmp_path / "inv.csv"))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "inv.csv").read_text())))
    assert {r["serial"]: (r["owner"], r["tags"]) for r in rows} == {
        web["serial"]: ("team-web", "edge prod"),
        api["serial"]: ("team-api", "prod"),
        dev["serial"]: ("team-dev", "staging"),
    }
    assert [r["not_after"] for r in rows] == sorted(r["not_after"] for r in rows)
    _ok(cli_env, "inventory", "--json", "--tag", "prod", "--output", str(tmp_path / "inv.json"))
    exported = json.loads((tmp_path / "inv.json").read_text())
    assert {i["serial"] for i in exported} == {web["serial"], api["serial"]}
    table = _ok(cli_env, "inventory", "--owner", "team-web")
    assert str(web["serial"]) in table and "team-web" in table and "web.inv.test" in table

    # Bad input: one line, non-zero, nothing changed.
    _refused(cli_env, "inventory", "set", "abcdef0123", "--owner", "x", expect="no certificate")
    _refused(cli_env, "inventory", "set", "not-hex", "--owner", "x", expect="hexadecimal")
    _refused(cli_env, "inventory", "set", str(web["serial"]), "--tag", "Bad Tag", expect="Bad Tag")
    _refused(cli_env, "inventory", "set", "sha256:" + "ab" * 32, "--tag", "x", expect="sha256:")
    _refused(cli_env, "inventory", "set", str(web["serial"]), expect="nothing to change")
    _refused(cli_env, "inventory", "--expiring-within", "soon", expect="not a duration")
    _refused(cli_env, "inventory", "--tag", "UPPER", expect="UPPER")
    _refused(
        cli_env,
        "issue",
        "--name",
        "bad.inv.test",
        "--out-dir",
        str(tmp_path / "bad"),
        "--tag",
        "x" * 65,
        expect="bad tag",
    )
    assert not (tmp_path / "bad").exists()
    assert count_inventory(storage, InventoryFilter()) == 3


# -- in-process -------------------------------------------------------------------------------


def test_lineage_from_acme_replaces_and_same_names(authority: CertificateAuthority) -> None:
    storage = authority.storage
    old = _issue(authority, "a.lineage.test", "b.lineage.test")
    other_set = _issue(authority, "a.lineage.test")  # a subset of the names: not a renewal
    # Same name set, issued later, by another issuer: a same-names renewal.
    new = _issue(authority, "b.lineage.test", "a.lineage.test", issuer="issuing-rsa")
    acme_old = _issue(authority, "c.lineage.test")
    acme_new = _issue(authority, "d.lineage.test", replaces=acme_old.record.serial)
    items = {i.serial: i for i in list_inventory(storage, InventoryFilter(name="*.lineage.test"))}
    assert len(items) == 5
    assert items[old.record.serial].replaced_by == new.record.serial
    assert items[new.record.serial].replaces == old.record.serial
    assert items[new.record.serial].replaced_by is None
    assert items[other_set.record.serial].replaced_by is None
    assert items[other_set.record.serial].replaces is None
    assert items[acme_old.record.serial].replaced_by == acme_new.record.serial
    assert items[acme_new.record.serial].replaces == acme_old.record.serial
    # Lineage is computed for the displayed rows whatever filter chose them.
    only_old = list_inventory(storage, InventoryFilter(name="c.lineage.test"))
    assert [(i.serial, i.replaced_by) for i in only_old] == [
        (acme_old.record.serial, acme_new.record.serial)
    ]
    assert get_item(storage, old.record.serial).replaced_by == new.record.serial


def _discovered(
    storage: Storage,
    *,
    der: bytes,
    names: str,
    issuer: str,
    not_after: datetime.datetime,
    certificate_id: int | None,
    sightings: list[tuple[str, str]],
) -> str:
    now = storage.clock.now()
    fingerprint = hashlib.sha256(der).hexdigest()
    with storage.transaction() as session:
        row = DiscoveredCertificate(
            fingerprint_sha256=fingerprint,
            der=der,
            subject=f"CN={names.split()[0]}",
            issuer=issuer,
            serial=fingerprint[:16],
            common_name=names.split()[0],
            names=names,
            key_type="ec-p256",
            signature_algorithm="ecdsa-with-SHA256",
            not_before=now - datetime.timedelta(days=1),
            not_after=not_after,
            self_signed=False,
            certificate_id=certificate_id,
            first_seen=now,
            last_seen=now,
        )
        session.add(row)
        session.flush()
        for kind, location in sightings:
            session.add(
                CertificateSighting(
                    discovered_id=row.id,
                    location_kind=kind,
                    location=location,
                    first_seen=now,
                    last_seen=now,
                    missed_scans=1 if kind == "file" else 0,
                )
            )
    return fingerprint


def test_discovered_certificates_deployments_and_editing(
    authority: CertificateAuthority,
) -> None:
    storage = authority.storage
    ours = _issue(authority, "deployed.inv.test", owner="team-a")
    idle = _issue(authority, "idle.inv.test")
    with storage.transaction() as session:
        our_id = session.scalar(
            select(Certificate.id).where(Certificate.serial == ours.record.serial)
        )
    der = ours.certificate.public_bytes(serialization.Encoding.DER)
    linked = _discovered(
        storage,
        der=der,
        names="deployed.inv.test",
        issuer="CN=certwright test issuing-ec,O=certwright tests",
        not_after=ours.record.not_after,
        certificate_id=our_id,
        sightings=[("tls", "10.1.2.3:443"), ("file", "/etc/ssl/deployed.pem")],
    )
    shadow = _discovered(
        storage,
        der=b"not ours",
        names="shadow.example.com www.shadow.example.com",
        issuer="CN=Some Other CA",
        not_after=storage.clock.now() + datetime.timedelta(days=5),
        certificate_id=None,
        sightings=[("file", "/srv/app/shadow.pem")],
    )

    everything = list_inventory(storage, InventoryFilter())
    assert len(everything) == 3  # the linked discovered copy is shown as ours, once
    by_ref = {i.ref: i for i in everything}
    mine = by_ref[ours.record.serial]
    assert [(d.kind, d.location, d.missed_scans) for d in mine.deployments] == [
        ("file", "/etc/ssl/deployed.pem", 1),
        ("tls", "10.1.2.3:443", 0),
    ]
    theirs = by_ref[f"sha256:{shadow}"]
    assert theirs.kind == "discovered" and theirs.status == "discovered"
    assert theirs.fingerprint == shadow and theirs.issuer == "CN=Some Other CA"
    assert theirs.names == ("shadow.example.com", "www.shadow.example.com")
    assert [d.location for d in theirs.deployments] == ["/srv/app/shadow.pem"]
    assert by_ref[idle.record.serial].deployments == ()
    assert everything[0].ref == f"sha256:{shadow}"  # soonest expiry first

    def refs(**kwargs: object) -> set[str]:
        return {i.ref for i in list_inventory(storage, InventoryFilter(**kwargs))}  # type: ignore[arg-type]

    assert refs(found_where="*:443") == {ours.record.serial}
    assert refs(found_where="/etc/ssl/*") == {ours.record.serial}
    assert refs(found_where="/srv/*") == {f"sha256:{shadow}"}
    assert refs(kind="discovered") == {f"sha256:{shadow}"}
    assert refs(status="discovered") == {f"sha256:{shadow}"}
    assert refs(source="discovery") == {f"sha256:{shadow}"}
    assert refs(name="www.shadow.example.com") == {f"sha256:{shadow}"}
    assert refs(name="*.shadow.example.com") == {f"sha256:{shadow}"}
    assert refs(issuer="CN=Some*") == {f"sha256:{shadow}"}
    assert refs(expiring_within=datetime.timedelta(days=30)) == {f"sha256:{shadow}"}
    assert (
        count_inventory(storage, InventoryFilter(expiring_within=datetime.timedelta(days=30))) == 1
    )

    # Editing a discovered certificate by fingerprint; the linked copy edits our own record.
    edited = set_owner_and_tags(
        storage, f"sha256:{shadow.upper()}", actor="tests", owner="team-shadow", add_tags=["x"]
    )
    assert (edited.owner, edited.tags) == ("team-shadow", ("x",))
    assert refs(owner="team-shadow", tag="x") == {f"sha256:{shadow}"}
    via_copy = set_owner_and_tags(storage, f"sha256:{linked}", actor="tests", owner="team-b")
    assert via_copy.ref == ours.record.serial and via_copy.owner == "team-b"
    cleared = set_owner_and_tags(storage, ours.record.serial, actor="tests", owner="")
    assert cleared.owner is None
    with pytest.raises(CAError) as bad:
        set_owner_and_tags(storage, f"sha256:{'0' * 64}", actor="tests", owner="x")
    assert bad.value.kind is Kind.NOT_FOUND


def test_expiring_within_and_bad_tags(authority: CertificateAuthority) -> None:
    storage = authority.storage
    soon = _issue(authority, "soon.inv.test", days=10, tags=("a", "b"))
    _issue(authority, "later.inv.test", days=60)
    revoked = _issue(authority, "revoked.inv.test", days=5)
    authority.revoke(revoked.record.serial, "superseded", "tests")
    within = InventoryFilter(expiring_within=datetime.timedelta(days=30))
    assert _serials(list_inventory(storage, within)) == [soon.record.serial]
    assert count_inventory(storage, within) == 1
    assert _serials(list_inventory(storage, InventoryFilter(status="revoked"))) == [
        revoked.record.serial
    ]
    assert list_inventory(storage, InventoryFilter(tag="b"))[0].tags == ("a", "b")
    with pytest.raises(CAError) as bad:
        _issue(authority, "bad.inv.test", tags=("ok", "No!"))
    assert bad.value.kind is Kind.BAD_REQUEST and "No!" in bad.value.detail
    # A policy refusal: on record with its rule, and no serial reserved for it.
    refusal = storage.audit_events(1)[0]
    assert (refusal["outcome"], refusal["detail"]["rule"]) == ("refused", "tags.syntax")
    assert not [c for c in storage.list_certificates(CertificateFilter()) if "bad" in c.names[0]]
    with pytest.raises(CAError):
        list_inventory(storage, InventoryFilter(kind="other"))


@contextlib.contextmanager
def _acme_app(storage: Storage, tmp_path: Path) -> Iterator[FlaskClient]:
    """The real HTTPS app (ACME included) over a real Runtime on the test's database."""
    config = tmp_path / "acme.toml"
    config.write_text(
        "\n".join(
            [
                "[ca]",
                'public_base_url = "http://ca.test:8080"',
                'default_issuer = "issuing-ec"',
                "[database]",
                f"url = {json.dumps(storage.url)}",
                "auto_migrate = false",
                "[hsm]",
                f"token_label = {json.dumps(ONLINE_TOKEN)}",
            ]
        )
        + "\n"
    )
    runtime = Runtime(load_config(config, environ={}))
    try:
        yield create_app(runtime, "https").test_client()
    finally:
        runtime.close()


def test_renewal_info_request_sets_ari_checked_at(
    authority: CertificateAuthority,
    pki: SessionPKI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = authority.storage
    issued = _issue(authority, "ari.inv.test")
    assert get_item(storage, issued.record.serial).ari_checked_at is None
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
    with _acme_app(storage, tmp_path) as client:
        response = client.get(
            f"/acme/renewal-info/{ari_cert_id(issued.certificate)}", base_url="https://ca.test"
        )
        assert response.status_code == 200, response.get_data(as_text=True)
    checked = get_item(storage, issued.record.serial).ari_checked_at
    assert checked is not None
    assert abs(checked - storage.clock.now()) < datetime.timedelta(minutes=5)
    shown = list_inventory(storage, InventoryFilter(name="ari.inv.test"))
    assert shown[0].ari_checked_at == checked


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_renewal_info_still_answers_when_recording_the_check_fails(
    authority: CertificateAuthority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = authority.storage
    issued = _issue(authority, "ari-fails.inv.test")
    # A real database refusal of the UPDATE (a trigger), not a stand-in for the database.
    with storage.transaction() as session:
        session.execute(
            text(
                "CREATE TRIGGER refuse_ari BEFORE UPDATE OF ari_checked_at ON certificates "
                "BEGIN SELECT RAISE(ABORT, 'refused by test trigger'); END"
            )
        )
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
    with _acme_app(storage, tmp_path) as client:
        response = client.get(
            f"/acme/renewal-info/{ari_cert_id(issued.certificate)}", base_url="https://ca.test"
        )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert "suggestedWindow" in response.get_json()
    assert get_item(storage, issued.record.serial).ari_checked_at is None
