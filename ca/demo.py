"""`certwright init`: a complete demo CA in one data directory, created on first run.

It makes a SoftHSM token directory with two tokens (the root's and the online one), random
PINs in files readable by the owner only, a configuration file, and runs the ceremony: an
EC P-384 root, an EC P-256 and an RSA-2048 intermediate, and the root's first ARL.

The root's token and PIN file sit beside the online ones only because this is a demo on one
machine; the generated configuration still never names them.
"""

from __future__ import annotations

import datetime
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca import ceremony, certs
from ca.config import DEFAULT_SOFTHSM_MODULE, load_config
from ca.errors import CAError, Kind
from ca.hsm import KeySpec, Token
from ca.runtime import Runtime

ROOT_TOKEN = "certwright-root"  # noqa: S105 - a token label, not a secret
ONLINE_TOKEN = "certwright-online"  # noqa: S105 - a token label
ROOT_KEY_LABEL = "root-key"
ROOT_ID = "root"
CONFIG_NAME = "certwright.toml"

CONFIG_TEMPLATE = """\
# certwright demo configuration, written by `certwright init`.
# See config/certwright.example.toml in the source tree for every key, commented.
[ca]
data_dir = "."
public_base_url = "{base_url}"
default_issuer = "issuing-ec"

[database]
url = "sqlite:///certwright.db"

[hsm]
module = "{module}"
token_label = "{online_token}"
pin_file = "secrets/online.pin"
softhsm2_conf = "softhsm2.conf"
"""


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")


def init_softhsm_token(softhsm_conf: Path, label: str, pin: str) -> None:
    """Initialise a free SoftHSM slot as token `label` (softhsm2-util; demo and tests only)."""
    tool = shutil.which("softhsm2-util")
    if tool is None:
        raise CAError(Kind.HSM, "softhsm2-util not found: install the softhsm2 package")
    env = dict(os.environ, SOFTHSM2_CONF=str(softhsm_conf))
    # softhsm2-util only takes PINs as arguments; this runs once, on the demo's own machine.
    result = subprocess.run(
        [
            tool,
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            pin,
            "--so-pin",
            secrets.token_hex(8),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise CAError(
            Kind.HSM, f"softhsm2-util could not create token {label!r}: {result.stderr.strip()}"
        )


def write_softhsm_conf(data_dir: Path) -> Path:
    tokens = data_dir / "tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = data_dir / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    return conf


def init_demo(data_dir: Path, *, base_url: str, module: str = DEFAULT_SOFTHSM_MODULE) -> Path:
    """Create the demo CA in `data_dir` unless it exists; return the config file's path."""
    data_dir = data_dir.resolve()
    config_path = data_dir / CONFIG_NAME
    if config_path.exists():
        return config_path
    if not Path(module).exists():
        raise CAError(Kind.HSM, f"PKCS#11 module {module} not found: install the softhsm2 package")
    if (data_dir / "tokens").exists() and any((data_dir / "tokens").iterdir()):
        raise CAError(
            Kind.CONFIG,
            f"{data_dir} holds tokens but no {CONFIG_NAME}: an earlier init stopped half-way; "
            "move the directory aside and run init again",
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    softhsm_conf = write_softhsm_conf(data_dir)
    os.environ["SOFTHSM2_CONF"] = str(softhsm_conf)
    root_pin, online_pin = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    _write_secret(data_dir / "secrets" / "root.pin", root_pin)
    _write_secret(data_dir / "secrets" / "online.pin", online_pin)
    init_softhsm_token(softhsm_conf, ROOT_TOKEN, root_pin)
    init_softhsm_token(softhsm_conf, ONLINE_TOKEN, online_pin)

    # Written last but one: a half-made directory has no config and is made again next time.
    text = CONFIG_TEMPLATE.format(base_url=base_url, module=module, online_token=ONLINE_TOKEN)
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(text)
    runtime = Runtime(load_config(tmp))
    try:
        root_token = Token(module, ROOT_TOKEN, root_pin)
        root = ceremony.create_root(
            root_token,
            key_label=ROOT_KEY_LABEL,
            spec=KeySpec.parse("ec-p384"),
            subject=certs.parse_name("CN=certwright demo root CA,O=certwright demo"),
            validity=datetime.timedelta(days=3650),
            path_length=1,
        )
        (data_dir / "root.pem").write_bytes(
            root.certificate.public_bytes(serialization.Encoding.PEM)
        )
        ceremony.register_root(runtime.storage, ROOT_ID, root.certificate, "init")
        for issuer_id, spec in (("issuing-ec", "ec-p256"), ("issuing-rsa", "rsa-2048")):
            ceremony.create_intermediate(
                runtime.storage,
                root,
                runtime.token,
                issuer_id=issuer_id,
                key_label=f"{issuer_id}-key",
                spec=KeySpec.parse(spec),
                subject=certs.parse_name(f"CN=certwright demo {issuer_id},O=certwright demo"),
                validity=datetime.timedelta(days=1825),
                public_base_url=base_url,
                actor="init",
            )
        ceremony.sign_root_crl(
            runtime.storage,
            root,
            validity=datetime.timedelta(days=365),
            public_base_url=base_url,
            actor="init",
        )
    finally:
        runtime.close()
    tmp.replace(config_path)
    return config_path


def describe(config_path: Path) -> str:
    root = x509.load_pem_x509_certificate((config_path.parent / "root.pem").read_bytes())
    return (
        f"demo CA ready in {config_path.parent}\n"
        f"  config: {config_path}\n"
        f"  root:   {config_path.parent / 'root.pem'} ({root.subject.rfc4514_string()})"
    )
