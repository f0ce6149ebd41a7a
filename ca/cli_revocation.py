"""CLI commands for revocation publishing: CRLs and OCSP responses.

`certwright crl sign|publish` and `certwright ocsp sign|publish`. `publish` writes what the HTTP
listener serves into a directory so nginx or a CDN can serve the same URLs as static files
(layout in ocsp/README.md).
"""

from __future__ import annotations

import base64
import os
import tempfile
from pathlib import Path

import click
from cryptography import x509

from ca import crl as crls
from ca import ocsp_signing
from ca.runtime import Runtime
from ca.storage import revocation as store


def write_atomically(path: Path, data: bytes) -> None:
    """Readers (nginx) see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def get_request_path(request_der: bytes) -> str:
    """The file a GET for this request maps to under DIR/ocsp/: its standard base64 with `/`
    as the directory separator. Runs of `/` become one, because a filesystem (and nginx's
    merge_slashes) sees `a//b` as `a/b`."""
    text = base64.b64encode(request_der).decode()
    while "//" in text:
        text = text.replace("//", "/")
    return text


def published_file(request_der: bytes) -> str:
    """Where under DIR/ocsp/ the answer to this request is written: its GET path, or, for a
    path that ends in `/` (the base64 ended in `/`), `index.der` inside that directory, which
    nginx serves for such a URI with `index index.der;` (see ocsp/README.md)."""
    path = get_request_path(request_der)
    return path + "index.der" if path.endswith("/") else path


def register(main: click.Group) -> None:
    """Add the revocation commands to the `certwright` group."""
    from ca.cli import with_runtime

    @main.group(name="crl")
    def crl_group() -> None:
        """Leaf CRLs, one per (issuer, shard)."""

    @crl_group.command("sign")
    @click.option("--issuer", help="Only this intermediate (default: every online one).")
    @click.option("--force", is_flag=True, help="Sign every shard, even those not due.")
    @with_runtime
    def crl_sign(runtime: Runtime, issuer: str | None, force: bool) -> None:
        """Sign the shard CRLs that are due (new revocations, past half-life, none yet)."""
        signed = crls.refresh_crls(
            runtime.storage,
            runtime.token,
            public_base_url=runtime.config.public_base_url,
            crl_shards=runtime.config.crl_shards,
            settings=crls.settings_from_config(runtime.config),
            clock=runtime.clock,
            issuer=issuer,
            force=force,
            actor="cli",
        )
        for c in signed:
            click.echo(
                f"{c.issuer_id} shard {c.shard}: CRL number {c.number}, {c.entries} entries, "
                f"next update {c.next_update:%Y-%m-%d %H:%M}Z"
            )
        click.echo(f"{len(signed)} CRL(s) signed")

    @crl_group.command("publish")
    @click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
    @with_runtime
    def crl_publish(runtime: Runtime, out_dir: str) -> None:
        """Write DIR/crl/<issuer>/<shard>.crl and DIR/crl/<issuer>.crl (the root's ARL)."""
        count = 0
        for issuer_id, shard, der in crls.latest_for_publishing(runtime.storage):
            name = f"{issuer_id}.crl" if shard < 0 else f"{issuer_id}/{shard}.crl"
            write_atomically(Path(out_dir) / "crl" / name, der)
            count += 1
        click.echo(f"{count} CRL(s) written under {Path(out_dir) / 'crl'}")

    @main.group(name="ocsp")
    def ocsp_group() -> None:
        """Pre-signed OCSP responses."""

    @ocsp_group.command("sign")
    @with_runtime
    def ocsp_sign(runtime: Runtime) -> None:
        """Pre-sign every response that is missing or past half-life; renew responders."""
        signer = ocsp_signing.OcspSigner(
            runtime.storage,
            runtime.token,
            ocsp_signing.settings_from_config(runtime.config),
            runtime.clock,
        )
        result = ocsp_signing.refresh_ocsp(signer)
        click.echo(f"{result.signed} OCSP response(s) signed, {result.pruned} pruned")

    @ocsp_group.command("publish")
    @click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
    @with_runtime
    def ocsp_publish(runtime: Runtime, out_dir: str) -> None:
        """Write DIR/ocsp/<GET path> and DIR/ocsp-by-serial/<issuer>/<serial>.der."""
        base = Path(out_dir)
        issuers: dict[str, ocsp_signing.CertIdKeys] = {}
        count = 0
        for issuer_id, serial, der in store.ocsp_responses(runtime.storage):
            ids = issuers.get(issuer_id)
            if ids is None:
                record = runtime.storage.get_issuer(issuer_id)
                ids = ocsp_signing.cert_id_keys(
                    issuer_id, x509.load_der_x509_certificate(record.cert_der)
                )
                issuers[issuer_id] = ids
            request = ocsp_signing.canonical_request(ids, int(serial, 16))
            write_atomically(base / "ocsp" / published_file(request), der)
            write_atomically(base / "ocsp-by-serial" / issuer_id / f"{serial}.der", der)
            count += 1
        click.echo(f"{count} OCSP response(s) written under {base}")

    @main.command()
    @click.option("--serial", "serials", multiple=True, help="A serial to revoke (repeatable).")
    @click.option(
        "--serials-file",
        type=click.Path(dir_okay=False, exists=True),
        help="A file of serials, one per line.",
    )
    @click.option(
        "--account", "account_id", type=int, help="Every certificate of this ACME account."
    )
    @click.option("--issuer", help="Every certificate this intermediate issued.")
    @click.option("--key-sha256", help="Every certificate for this public key (SPKI SHA-256, hex).")
    @click.option("--reason", default="keyCompromise", show_default=True)
    @click.option("--dry-run", is_flag=True, help="List what would be revoked; change nothing.")
    @click.option("--json", "as_json", is_flag=True)
    @with_runtime
    def incident(
        runtime: Runtime,
        serials: tuple[str, ...],
        serials_file: str | None,
        account_id: int | None,
        issuer: str | None,
        key_sha256: str | None,
        reason: str,
        dry_run: bool,
        as_json: bool,
    ) -> None:
        """Revoke many certificates at once: by serial list, ACME account, issuer or key.

        Each revocation re-signs its OCSP response at once and marks its CRL shard due; ARI
        (RFC 9773) answers a window in the past for every revoked certificate, so ARI-aware
        clients renew at their next check.
        """
        import json

        from ca import certs
        from ca.cli import _actor
        from ca.errors import CAError, Kind
        from ca.issuance import revocation_reason_code
        from ca.storage import CertificateFilter

        code = revocation_reason_code(reason)
        wanted = [certs.parse_serial(s) for s in serials]
        if serials_file:
            lines = Path(serials_file).read_text().split()
            wanted += [certs.parse_serial(s) for s in lines if s.strip()]
        selectors = [
            CertificateFilter(status="issued", acme_account_id=account_id, limit=10**9)
            if account_id is not None
            else None,
            CertificateFilter(status="issued", issuer=issuer, limit=10**9) if issuer else None,
            CertificateFilter(status="issued", spki_sha256=key_sha256.lower(), limit=10**9)
            if key_sha256
            else None,
        ]
        if not wanted and not any(selectors):
            raise CAError(
                Kind.BAD_REQUEST,
                "name what to revoke: --serial, --serials-file, --account, --issuer "
                "or --key-sha256",
            )
        for selector in selectors:
            if selector is not None:
                wanted += [r.serial for r in runtime.storage.list_certificates(selector)]
        targets = sorted(set(wanted))
        revoked, skipped = [], []
        for serial in targets:
            if dry_run:
                revoked.append(serial)
                continue
            try:
                runtime.authority.revoke(serial, code, f"{_actor()}:incident")
                revoked.append(serial)
            except CAError as exc:
                skipped.append({"serial": serial, "why": exc.detail})
        if as_json:
            click.echo(json.dumps({"revoked": revoked, "skipped": skipped, "dry_run": dry_run}))
            return
        verb = "would revoke" if dry_run else "revoked"
        click.echo(f"{verb} {len(revoked)} certificate(s) ({certs.REASON_NAMES[code]})")
        for item in skipped:
            click.echo(f"skipped {item['serial']}: {item['why']}")
