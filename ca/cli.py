"""`certwright`: the admin command line.

Every failure is one line on stderr (`certwright: error: ...`) and a non-zero exit status:
1 for a refusal or a failure the CA reported, 2 for a usage error, 70 for an unexpected error
(its traceback only with CERTWRIGHT_DEBUG=1). Every listing command takes `--json`.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca import ceremony, certs, policy
from ca.config import load_config
from ca.errors import CAError, Kind
from ca.hsm import KeySpec, Token
from ca.issuance import IssuanceRequest, IssuedCertificate, revocation_reason_code
from ca.runtime import Runtime
from ca.storage import CertificateFilter, CertificateRecord

F = TypeVar("F", bound=Callable[..., Any])

EXIT_REFUSED = 1
EXIT_INTERNAL = 70

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 86400}


def parse_duration(text: str) -> datetime.timedelta:
    """`30d`, `12h`, `2w`, `90m`, `45s`; a bare number means days."""
    match = _DURATION.match(text)
    if not match:
        raise CAError(Kind.BAD_REQUEST, f"{text!r} is not a duration (examples: 30d, 12h, 2w)")
    return datetime.timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def fail(message: str, code: int = EXIT_REFUSED) -> NoReturn:
    click.echo(f"certwright: error: {message}", err=True)
    sys.exit(code)


class CertwrightGroup(click.Group):
    """Turns every error into one line on stderr and an exit status; never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CAError as exc:
            fail(exc.detail)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as exc:
            if os.environ.get("CERTWRIGHT_DEBUG"):
                traceback.print_exc()
            fail(f"internal error ({type(exc).__name__}: {str(exc)[:200]})", EXIT_INTERNAL)


def _runtime(ctx: click.Context) -> Runtime:
    obj = ctx.ensure_object(dict)
    if "runtime" not in obj:
        obj["runtime"] = Runtime(load_config(obj.get("config_path")))
        ctx.call_on_close(obj["runtime"].close)
    runtime: Runtime = obj["runtime"]
    return runtime


def with_runtime(fn: F) -> F:
    @functools.wraps(fn)
    @click.pass_context
    def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
        return fn(_runtime(ctx), *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _actor() -> str:
    return f"cli:{os.environ.get('SUDO_USER') or os.environ.get('USER') or os.getuid()}"


@click.group(cls=CertwrightGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Configuration file (default: $CERTWRIGHT_CONFIG).",
)
@click.version_option(package_name="certwright")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """certwright: a private PKI certificate authority."""
    ctx.ensure_object(dict)["config_path"] = config_path


# -- setup ----------------------------------------------------------------------------------


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False), default="data", show_default=True)
@click.option(
    "--base-url",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="Plain-HTTP base URL for OCSP, CRLs and issuer certificates.",
)
def init(data_dir: str, base_url: str) -> None:
    """Create a demo CA (SoftHSM tokens, root, intermediates) unless DATA_DIR has one."""
    from ca import demo

    existed = (Path(data_dir) / demo.CONFIG_NAME).exists()
    config_path = demo.init_demo(Path(data_dir), base_url=base_url)
    click.echo(("demo CA already present\n" if existed else "") + demo.describe(config_path))


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@with_runtime
def db_upgrade(runtime: Runtime) -> None:
    """Apply every pending migration."""
    runtime.storage.migrate()
    click.echo("database schema is up to date")


# -- ceremony -------------------------------------------------------------------------------


def _root_token(
    module: str | None, token_label: str, pin_file: str | None, runtime: Runtime
) -> Token:
    pin = os.environ.get("CERTWRIGHT_ROOT_PIN")
    if not pin and pin_file:
        try:
            pin = Path(pin_file).read_text().strip()
        except OSError as exc:
            raise CAError(
                Kind.CONFIG, f"cannot read root PIN file {pin_file}: {exc.strerror}"
            ) from None
    if not pin:
        raise CAError(Kind.CONFIG, "no root PIN: set CERTWRIGHT_ROOT_PIN or pass --root-pin-file")
    return Token(module or runtime.config.hsm_module(), token_label, pin)


def root_options(fn: F) -> F:
    fn = click.option(
        "--root-pin-file",
        type=click.Path(dir_okay=False),
        help="File holding the root token's PIN (or set CERTWRIGHT_ROOT_PIN).",
    )(fn)
    fn = click.option("--root-key-label", default="root-key", show_default=True)(fn)
    fn = click.option("--root-token", required=True, help="Label of the root's own token.")(fn)
    fn = click.option("--module", help="PKCS#11 module for the root token (default: hsm.module).")(
        fn
    )
    return fn


def _load_root_cert(path: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as exc:
        raise CAError(Kind.BAD_REQUEST, f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise CAError(Kind.BAD_REQUEST, f"{path} is not a PEM certificate") from None


def _root_key(
    runtime: Runtime,
    module: str | None,
    root_token: str,
    root_pin_file: str | None,
    root_key_label: str,
    root_cert: str,
) -> ceremony.RootKey:
    """The offline root's key on its token, checked against its certificate (the root options)."""
    return ceremony.load_root(
        _root_token(module, root_token, root_pin_file, runtime),
        root_key_label,
        _load_root_cert(root_cert),
    )


@main.group(name="ceremony")
def ceremony_group() -> None:
    """Root key ceremony: the only commands that use the offline root's token."""


@ceremony_group.command("root")
@root_options
@click.option(
    "--id", "root_id", default="root", show_default=True, help="Name of the root in the inventory."
)
@click.option("--key-type", default="ec-p384", show_default=True)
@click.option(
    "--subject", required=True, help="RFC 4514 name, e.g. 'CN=Example Root CA,O=Example'."
)
@click.option("--days", type=int, default=3650, show_default=True)
@click.option("--path-length", type=int, default=1, show_default=True)
@click.option(
    "--out", type=click.Path(dir_okay=False), required=True, help="Where to write the root PEM."
)
@with_runtime
def ceremony_root(
    runtime: Runtime,
    module: str | None,
    root_token: str,
    root_key_label: str,
    root_pin_file: str | None,
    root_id: str,
    key_type: str,
    subject: str,
    days: int,
    path_length: int,
    out: str,
) -> None:
    """Generate the root key on its token and self-sign the root certificate."""
    if Path(out).exists():
        raise CAError(Kind.CONFLICT, f"{out} exists; refusing to overwrite a root certificate")
    token = _root_token(module, root_token, root_pin_file, runtime)
    root = ceremony.create_root(
        token,
        key_label=root_key_label,
        spec=KeySpec.parse(key_type),
        subject=certs.parse_name(subject),
        validity=datetime.timedelta(days=days),
        path_length=path_length,
        clock=runtime.clock,
    )
    Path(out).write_bytes(root.certificate.public_bytes(serialization.Encoding.PEM))
    ceremony.register_root(runtime.storage, root_id, root.certificate, _actor())
    click.echo(f"root {root_id} written to {out}: {root.certificate.subject.rfc4514_string()}")


@ceremony_group.command("intermediate")
@root_options
@click.option("--root-cert", type=click.Path(dir_okay=False), required=True)
@click.option("--id", "issuer_id", required=True, help="Name of the new intermediate.")
@click.option("--key-type", default="ec-p256", show_default=True)
@click.option("--key-label", help="Label of the key on the online token (default: ID-key).")
@click.option("--subject", required=True)
@click.option("--days", type=int, default=1825, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the certificate here.")
@with_runtime
def ceremony_intermediate(
    runtime: Runtime,
    module: str | None,
    root_token: str,
    root_key_label: str,
    root_pin_file: str | None,
    root_cert: str,
    issuer_id: str,
    key_type: str,
    key_label: str | None,
    subject: str,
    days: int,
    out: str | None,
) -> None:
    """Create an online intermediate: key on the online token, certificate from the root."""
    root = _root_key(runtime, module, root_token, root_pin_file, root_key_label, root_cert)
    certificate = ceremony.create_intermediate(
        runtime.storage,
        root,
        runtime.token,
        issuer_id=issuer_id,
        key_label=key_label or f"{issuer_id}-key",
        spec=KeySpec.parse(key_type),
        subject=certs.parse_name(subject),
        validity=datetime.timedelta(days=days),
        public_base_url=runtime.config.public_base_url,
        actor=_actor(),
        clock=runtime.clock,
    )
    if out:
        Path(out).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    click.echo(f"intermediate {issuer_id} created: {certificate.subject.rfc4514_string()}")


@ceremony_group.command("cross-sign")
@root_options
@click.argument("issuer_id")
@click.option(
    "--root-cert",
    type=click.Path(dir_okay=False),
    required=True,
    help="The signing root's certificate: a registered root other than the issuer's parent.",
)
@click.option("--days", type=int, default=1825, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the certificate here.")
@with_runtime
def ceremony_cross_sign(
    runtime: Runtime,
    module: str | None,
    root_token: str,
    root_key_label: str,
    root_pin_file: str | None,
    issuer_id: str,
    root_cert: str,
    days: int,
    out: str | None,
) -> None:
    """Have another root certify an existing intermediate (same subject and key)."""
    root = _root_key(runtime, module, root_token, root_pin_file, root_key_label, root_cert)
    certificate = ceremony.cross_sign(
        runtime.storage,
        root,
        issuer_id=issuer_id,
        validity=datetime.timedelta(days=days),
        public_base_url=runtime.config.public_base_url,
        actor=_actor(),
        clock=runtime.clock,
    )
    if out:
        Path(out).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    click.echo(
        f"intermediate {issuer_id} cross-signed by {certificate.issuer.rfc4514_string()}, "
        f"serial {certificate.serial_number:x}, until {certificate.not_valid_after_utc:%Y-%m-%d}"
    )


@ceremony_group.command("revoke-intermediate")
@click.argument("issuer_id")
@click.option("--reason", default="cessationOfOperation", show_default=True)
@with_runtime
def ceremony_revoke_intermediate(runtime: Runtime, issuer_id: str, reason: str) -> None:
    """Mark an intermediate revoked; the next `ceremony crl` lists it in the root's ARL."""
    runtime.storage.revoke_issuer(issuer_id, revocation_reason_code(reason, leaf=False), _actor())
    click.echo(
        f"intermediate {issuer_id} revoked; sign a new root CRL with `certwright ceremony crl`"
    )


@ceremony_group.command("crl")
@root_options
@click.option("--root-cert", type=click.Path(dir_okay=False), required=True)
@click.option(
    "--days", type=int, default=365, show_default=True, help="nextUpdate after thisUpdate."
)
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the DER CRL here.")
@with_runtime
def ceremony_crl(
    runtime: Runtime,
    module: str | None,
    root_token: str,
    root_key_label: str,
    root_pin_file: str | None,
    root_cert: str,
    days: int,
    out: str | None,
) -> None:
    """Sign the root's CRL (ARL) listing revoked intermediates."""
    root = _root_key(runtime, module, root_token, root_pin_file, root_key_label, root_cert)
    crl = ceremony.sign_root_crl(
        runtime.storage,
        root,
        validity=datetime.timedelta(days=days),
        public_base_url=runtime.config.public_base_url,
        actor=_actor(),
        clock=runtime.clock,
    )
    if out:
        Path(out).write_bytes(crl.public_bytes(serialization.Encoding.DER))
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    click.echo(f"root CRL number {number} signed, next update {crl.next_update_utc}")


@ceremony_group.command("retire")
@click.argument("issuer_id")
@with_runtime
def ceremony_retire(runtime: Runtime, issuer_id: str) -> None:
    """Stop issuing from an intermediate; it keeps signing CRLs/OCSP for what it issued."""
    runtime.storage.set_issuer_status(issuer_id, "retired", _actor())
    click.echo(f"intermediate {issuer_id} retired")


# -- issuers and profiles -------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True)
@with_runtime
def issuers(runtime: Runtime, as_json: bool) -> None:
    """List the root(s) and intermediates."""
    records = runtime.storage.list_issuers()
    if as_json:
        _echo_json(
            [
                {
                    "id": r.id,
                    "kind": r.kind,
                    "parent": r.parent_id,
                    "key_type": r.key_type,
                    "subject": r.subject,
                    "status": r.status,
                    "not_after": r.not_after.isoformat(),
                }
                for r in records
            ]
        )
        return
    for r in records:
        click.echo(
            f"{r.id:20} {r.kind:12} {r.key_type:9} {r.status:8} {r.not_after:%Y-%m-%d}  {r.subject}"
        )


@main.command()
@click.option("--json", "as_json", is_flag=True)
@with_runtime
def profiles(runtime: Runtime, as_json: bool) -> None:
    """List the certificate profiles."""
    if as_json:
        _echo_json([p.to_json() for p in runtime.profiles.values()])
        return
    for p in runtime.profiles.values():
        days = p.max_validity / datetime.timedelta(days=1)
        click.echo(f"{p.name:20} max {days:g}d  {','.join(p.ekus):22} {p.description}")


# -- issuance -------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def _generate_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    spec = KeySpec.parse(key_type)
    if spec.algorithm == "ec":
        curve = ec.SECP256R1() if spec.bits == 256 else ec.SECP384R1()
        return ec.generate_private_key(curve)
    return rsa.generate_private_key(65537, spec.bits)


def _identifiers(names: Sequence[str]) -> tuple[policy.Identifier, ...]:
    out = []
    for name in names:
        try:
            import ipaddress

            ipaddress.ip_address(name)
            out.append(policy.Identifier("ip", name))
        except ValueError:
            out.append(policy.Identifier("dns", name))
    return tuple(out)


@main.command()
@click.option(
    "--csr", "csr_path", type=click.Path(dir_okay=False), help="PEM or DER PKCS#10 request."
)
@click.option(
    "--name",
    "names",
    multiple=True,
    help="DNS name or IP (repeatable) for a locally generated key.",
)
@click.option("--key-type", default="ec-p256", show_default=True, help="For a generated key.")
@click.option("--profile", default="tls-server", show_default=True)
@click.option("--days", type=float, help="Validity in days (default: the profile's).")
@click.option("--issuer", help="Intermediate to sign with (default: the profile's or config's).")
@click.option("--owner", help="Team or person who owns the certificate.")
@click.option("--tag", "tags", multiple=True, help="Inventory tag (repeatable).")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False),
    help="Certificate PEM (with --csr; default stdout).",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    help="With --name: where key.pem, cert.pem, chain.pem, fullchain.pem go.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the inventory record as JSON.")
@with_runtime
def issue(
    runtime: Runtime,
    csr_path: str | None,
    names: tuple[str, ...],
    key_type: str,
    profile: str,
    days: float | None,
    issuer: str | None,
    owner: str | None,
    tags: tuple[str, ...],
    out_path: str | None,
    out_dir: str | None,
    as_json: bool,
) -> None:
    """Issue a certificate from a CSR, or for --name with a key generated here."""
    validity = datetime.timedelta(days=days) if days is not None else None
    if bool(csr_path) == bool(names):
        raise click.UsageError("give either --csr FILE or at least one --name")
    authority = runtime.authority
    issued: IssuedCertificate
    if csr_path:
        try:
            data = Path(csr_path).read_bytes()
        except OSError as exc:
            raise CAError(Kind.BAD_REQUEST, f"cannot read {csr_path}: {exc.strerror}") from None
        issued = authority.issue_from_csr(
            data,
            profile,
            validity=validity,
            issuer=issuer,
            owner=owner,
            source=_actor(),
            tags=tags,
        )
        if out_path:
            _write(Path(out_path), issued.fullchain_pem().encode())
        elif not as_json:
            click.echo(issued.fullchain_pem(), nl=False)
    else:
        if not out_dir:
            raise click.UsageError("--name needs --out-dir for the key and certificate files")
        target = Path(out_dir)
        key = _generate_key(key_type)
        request = IssuanceRequest(
            public_key=key.public_key(),
            identifiers=_identifiers(names),
            profile=profile,
            validity=validity,
            issuer=issuer,
            owner=owner,
            source=_actor(),
            tags=tags,
        )
        authority.check(request)  # refuse before creating files for a request that cannot pass
        issued = authority.issue(request)
        target.mkdir(parents=True, exist_ok=True)
        _write(
            target / "key.pem",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            0o600,
        )
        _write(target / "cert.pem", issued.pem().encode())
        _write(target / "chain.pem", issued.chain_pem().encode())
        _write(target / "fullchain.pem", issued.fullchain_pem().encode())
    if as_json:
        _echo_json(issued.record.to_json())
    elif out_dir or out_path:
        click.echo(
            f"issued {issued.record.serial} for {' '.join(issued.record.names)} "
            f"(expires {issued.record.not_after:%Y-%m-%d %H:%M}Z)"
        )


@main.command()
@click.argument("serial")
@click.option(
    "--reason",
    default="unspecified",
    show_default=True,
    help="RFC 5280 reason: " + ", ".join(certs.REVOCATION_REASONS),
)
@with_runtime
def revoke(runtime: Runtime, serial: str, reason: str) -> None:
    """Revoke a certificate by serial number (hex)."""
    record = runtime.authority.revoke(serial, reason, _actor())
    click.echo(f"revoked {record.serial} ({certs.REASON_NAMES[record.revocation_reason or 0]})")


# -- inventory ------------------------------------------------------------------------------


def _table(records: Sequence[CertificateRecord]) -> None:
    for r in records:
        click.echo(
            f"{r.serial:34} {r.status:8} {r.not_after:%Y-%m-%d %H:%M}  {r.issuer_id:12} "
            f"{r.profile:16} {' '.join(r.names)}"
        )


@main.command(name="list")
@click.option("--status", type=click.Choice(["pending", "issued", "revoked", "failed"]))
@click.option("--name", help="Exact name or glob (*.example.internal).")
@click.option("--profile")
@click.option("--issuer")
@click.option("--owner")
@click.option("--expiring-within", help="Only unexpired certificates expiring within, e.g. 30d.")
@click.option("--limit", type=int, default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@with_runtime
def list_(
    runtime: Runtime,
    status: str | None,
    name: str | None,
    profile: str | None,
    issuer: str | None,
    owner: str | None,
    expiring_within: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List certificates in the inventory."""
    before = runtime.clock.now() + parse_duration(expiring_within) if expiring_within else None
    records = runtime.storage.list_certificates(
        CertificateFilter(
            status=status,
            name=name,
            profile=profile,
            issuer=issuer,
            owner=owner,
            expiring_before=before,
            limit=limit,
        )
    )
    if as_json:
        _echo_json([r.to_json() for r in records])
    else:
        _table(records)


@main.command()
@click.option("--within", default="30d", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@with_runtime
def expiring(runtime: Runtime, within: str, as_json: bool) -> None:
    """Issued certificates that expire within a duration, soonest first."""
    records = runtime.storage.list_certificates(
        CertificateFilter(
            status="issued",
            expiring_before=runtime.clock.now() + parse_duration(within),
        )
    )
    if as_json:
        _echo_json([r.to_json() for r in records])
    else:
        _table(records)


@main.command()
@click.argument("serial")
@click.option("--json", "as_json", is_flag=True)
@click.option("--pem", is_flag=True, help="Print the certificate PEM.")
@with_runtime
def show(runtime: Runtime, serial: str, as_json: bool, pem: bool) -> None:
    """Show one certificate."""
    record = runtime.storage.get_certificate(certs.parse_serial(serial))
    if pem:
        if record.der is None:
            raise CAError(
                Kind.NOT_FOUND, f"certificate {record.serial} was never issued ({record.status})"
            )
        click.echo(
            x509.load_der_x509_certificate(record.der)
            .public_bytes(serialization.Encoding.PEM)
            .decode(),
            nl=False,
        )
    elif as_json:
        _echo_json(record.to_json())
    else:
        for key, value in record.to_json().items():
            click.echo(f"{key:18} {' '.join(value) if isinstance(value, list) else value}")


@main.command()
@click.option("--listen", help="host:port of the plain-HTTP listener (server.http_listen).")
@click.option("--https-listen", help="host:port of the ACME HTTPS listener (server.https_listen).")
@click.option("--workers", type=int, help="gunicorn workers per listener (server.workers).")
@click.option(
    "--gunicorn-config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="gunicorn settings file for both listeners (see config/gunicorn.conf.py).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    listen: str | None,
    https_listen: str | None,
    workers: int | None,
    gunicorn_config: Path | None,
) -> None:
    """Serve ACME over HTTPS and OCSP/CRLs over HTTP under gunicorn."""
    from ca.server import serve as run_server

    config = load_config(ctx.obj.get("config_path"))
    runtime = Runtime(config)
    runtime.storage.migrate()  # once, here, rather than racing in every worker
    runtime.record_config(_actor())  # a changed configuration or profile is on record
    runtime.close()
    run_server(
        config,
        listen or str(config.get("server", "http_listen")),
        https_listen or str(config.get("server", "https_listen")),
        workers or int(config.get("server", "workers")),
        gunicorn_config,
    )


@main.group()
def eab() -> None:
    """External Account Binding keys for ACME (RFC 8555 §7.3.4)."""


@eab.command("create")
@click.option("--owner", help="Team or person the key is for.")
@click.option(
    "--allow",
    "allowed",
    multiple=True,
    help="DNS suffix or IP range the bound account may request (repeatable).",
)
@click.option("--json", "as_json", is_flag=True)
@with_runtime
def eab_create(
    runtime: Runtime, owner: str | None, allowed: tuple[str, ...], as_json: bool
) -> None:
    """Make an EAB key id and HMAC key for one ACME account to bind with."""
    import base64

    from ca.storage.acme_store import AcmeStore

    key = AcmeStore(runtime.storage).create_eab_key(owner, allowed, _actor())
    hmac_b64 = base64.urlsafe_b64encode(key.hmac_key).decode().rstrip("=")
    if as_json:
        _echo_json(
            {
                "key_id": key.key_id,
                "hmac_key": hmac_b64,
                "owner": owner,
                "allowed_names": list(key.allowed_names),
            }
        )
    else:
        click.echo(f"key id:   {key.key_id}\nhmac key: {hmac_b64}")


def _register_subcommands() -> None:
    from ca import cli_audit, cli_discovery, cli_inventory, cli_monitor, cli_revocation

    for module in (cli_revocation, cli_inventory, cli_discovery, cli_monitor, cli_audit):
        module.register(main)


_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    main()
