"""Configuration: one TOML file, overridable key by key from the environment.

- The file's path comes from `--config` or `CERTWRIGHT_CONFIG`.
- Any key can be overridden by `CERTWRIGHT_<SECTION>__<KEY>` (two underscores between levels),
  e.g. `CERTWRIGHT_DATABASE__URL` or `CERTWRIGHT_PROFILES__TLS_SERVER__MAX_VALIDITY_DAYS`
  (inside a name a single `_` stands for `-` where the key has one). Values are read as TOML
  values when they parse as such (`90`, `true`, `["a", "b"]`), otherwise as strings.
- Secrets never come from argv: the HSM PIN comes from `CERTWRIGHT_HSM_PIN` or `hsm.pin_file`,
  the database password from `CERTWRIGHT_DATABASE_PASSWORD` or `database.password_file`.
- Relative paths are relative to `ca.data_dir`, itself relative to the config file's folder.
- The root's token is deliberately absent: only `certwright ceremony` commands reach it, from
  their own options.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from ca.errors import CAError, Kind

ENV_PREFIX = "CERTWRIGHT_"
DEFAULT_SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"

# Every section and key the file may hold, with its default. A key not listed here is an error,
# so a typo never silently leaves a default in force.
DEFAULTS: dict[str, dict[str, Any]] = {
    "ca": {
        "data_dir": ".",
        # Base of the plain-HTTP URLs written into certificates (AIA, CRL distribution points).
        "public_base_url": "http://127.0.0.1:8080",
        "default_issuer": "",
        "crl_shards": 16,
        "lint": True,
    },
    "database": {
        "url": "sqlite:///certwright.db",
        "password_file": "",
        "auto_migrate": True,
    },
    "hsm": {
        "module": DEFAULT_SOFTHSM_MODULE,
        "token_label": "certwright-online",
        "pin_file": "",
        # SoftHSM only: its config file, exported as SOFTHSM2_CONF before the module loads.
        "softhsm2_conf": "",
    },
    "server": {
        "http_listen": "127.0.0.1:8080",
        "https_listen": "127.0.0.1:8443",
        "workers": 2,
        # "auto": when a listener has at least a worker per CPU the process may use, each of its
        # workers runs on a CPU of its own; "off": wherever the kernel puts them.
        "cpu_affinity": "auto",
        # Names the HTTPS listener's own certificate carries (plus https_listen's host).
        "tls_names": ["127.0.0.1"],
    },
    "crl": {
        # Leaf CRL shards: nextUpdate this long after thisUpdate (BR 4.9.7: at most 10 days),
        # re-signed at refresh_hours, and within one job interval of any revocation.
        "validity_hours": 168,
        "refresh_hours": 84,
    },
    "ocsp": {
        # "delegated": a responder certificate per issuer (key in the HSM, OCSPSigning EKU,
        # id-pkix-ocsp-nocheck); "issuer": the issuing CA signs responses itself.
        "signer": "delegated",
        "validity_hours": 96,
        "responder_validity_days": 30,
    },
    "acme": {
        "http01_port": 80,
        # Stands for port 443 when an http-01 responder redirects to https.
        "http01_https_port": 443,
        "tlsalpn01_port": 443,
        "dns_resolver": "",
        "validation_timeout_seconds": 10.0,
        # How long a challenge POST waits for its validation before answering `processing`.
        "challenge_wait_seconds": 2.0,
        "terms_of_service": "",
        "website": "",
        "caa_identities": ["certwright.internal"],
        "external_account_required": False,
        "order_lifetime_hours": 24,
        "authorization_lifetime_hours": 24,
        # A valid authorization is reused for new orders of the same account this long.
        "authorization_reuse_hours": 720,
        "default_profile": "tls-server",
        # Rate limits (0 turns one off); counted in the database, so shared by every process.
        "orders_per_account_per_hour": 1000,
        "certificates_per_domain_per_week": 50000,
        "failed_validations_per_account_per_hour": 30,
        "accounts_per_ip_per_hour": 100,
    },
    # -- lifecycle: discovery, findings, expiry alerts, dashboard, metrics --------------------
    "discovery": {
        "timeout_seconds": 5.0,
        "concurrency": 64,
        # A certificate not seen at a location this many scans in a row is flagged missing.
        "missing_after_scans": 3,
    },
    "findings": {
        "expiring_warning_days": 30,
        "expiring_critical_days": 7,
    },
    "monitor": {
        # The expiry monitor runs inside `serve` (and as `certwright monitor --once`).
        "enabled": True,
        "interval_seconds": 300,
        "thresholds_days": [30, 14, 7, 1],
        "include_discovered": True,
        # Webhooks: JSON POST signed with HMAC-SHA256 of the body (secret from
        # CERTWRIGHT_MONITOR_WEBHOOK_SECRET or webhook_secret_file), retried with backoff.
        "webhook_urls": [],
        "webhook_secret_file": "",
        "webhook_timeout_seconds": 5.0,
        "max_attempts": 8,
        # Email over SMTP; owners that are email addresses get their own mail, everything
        # also goes to email_to. smtp_host "" turns email off.
        "smtp_host": "",
        "smtp_port": 25,
        "smtp_starttls": False,
        "smtp_username": "",
        "smtp_password_file": "",
        "smtp_from": "certwright@localhost",
        "email_to": [],
    },
    "dashboard": {
        # Read-only admin page at /dashboard on the HTTPS listener; a bearer token (from
        # CERTWRIGHT_DASHBOARD_TOKEN or token_file) is required. No token, no dashboard.
        "enabled": True,
        "token_file": "",
    },
    "metrics": {
        # Prometheus metrics at /metrics on the plain-HTTP listener.
        "enabled": True,
    },
}
PROFILE_KEYS = {
    "description",
    "ekus",
    "max_validity_days",
    "default_validity_days",
    "allowed_dns_suffixes",
    "denied_dns_suffixes",
    "allowed_ip_ranges",
    "key_types",
    "issuer",
}


@dataclasses.dataclass(frozen=True)
class Config:
    path: Path | None
    data_dir: Path
    values: Mapping[str, Mapping[str, Any]]
    profiles: Mapping[str, Mapping[str, Any]]

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.data_dir / path

    # -- derived settings -------------------------------------------------------------------

    @property
    def public_base_url(self) -> str:
        return str(self.get("ca", "public_base_url")).rstrip("/")

    @property
    def crl_shards(self) -> int:
        shards = int(self.get("ca", "crl_shards"))
        if not 1 <= shards <= 4096:
            raise CAError(Kind.CONFIG, "ca.crl_shards must be between 1 and 4096")
        return shards

    def database_url(self) -> str:
        raw = str(self.get("database", "url"))
        try:
            url = make_url(raw)
        except Exception:
            raise CAError(Kind.CONFIG, "database.url is not a valid database URL") from None
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            url = url.set(database=str(self.resolve_path(url.database)))
        password = os.environ.get(ENV_PREFIX + "DATABASE_PASSWORD")
        password_file = str(self.get("database", "password_file"))
        if password is None and password_file:
            password = _read_secret(self.resolve_path(password_file), "database password")
        if password is not None:
            url = url.set(password=password)
        return url.render_as_string(hide_password=False)

    def hsm_module(self) -> str:
        conf = str(self.get("hsm", "softhsm2_conf"))
        if conf:
            # SoftHSM reads this at C_Initialize; set it before the module is first loaded.
            os.environ["SOFTHSM2_CONF"] = str(self.resolve_path(conf))
        return str(self.get("hsm", "module"))

    def hsm_pin(self) -> str:
        pin = os.environ.get(ENV_PREFIX + "HSM_PIN")
        if pin:
            return pin
        pin_file = str(self.get("hsm", "pin_file"))
        if not pin_file:
            raise CAError(
                Kind.CONFIG, "no HSM PIN: set CERTWRIGHT_HSM_PIN or hsm.pin_file in the config"
            )
        return _read_secret(self.resolve_path(pin_file), "HSM PIN")


def _read_secret(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CAError(Kind.CONFIG, f"cannot read the {what} file {path}: {exc.strerror}") from None


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(
    environ: Mapping[str, str], profiles: dict[str, dict[str, Any]]
) -> dict[tuple[str, ...], Any]:
    overrides: dict[tuple[str, ...], Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if parts[0] == "profiles" and len(parts) == 3:
            known = {p.replace("-", "_"): p for p in profiles}
            profile = known.get(parts[1], parts[1].replace("_", "-"))
            overrides[("profiles", profile, parts[2])] = _parse_env_value(raw)
        elif len(parts) == 2:
            overrides[(parts[0], parts[1])] = _parse_env_value(raw)
        else:
            raise CAError(Kind.CONFIG, f"environment variable {name} names no configuration key")
    return overrides


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Load and validate the configuration; `path` None means defaults plus environment."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_PREFIX + "CONFIG"):
        path = environ[ENV_PREFIX + "CONFIG"]
    raw: dict[str, Any] = {}
    config_path: Path | None = None
    if path is not None:
        config_path = Path(path).expanduser().resolve()
        try:
            raw = tomllib.loads(config_path.read_text())
        except FileNotFoundError:
            raise CAError(Kind.CONFIG, f"configuration file {config_path} does not exist") from None
        except OSError as exc:
            raise CAError(Kind.CONFIG, f"cannot read {config_path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise CAError(Kind.CONFIG, f"{config_path} is not valid TOML: {exc}") from None

    values: dict[str, dict[str, Any]] = {s: dict(keys) for s, keys in DEFAULTS.items()}
    profiles: dict[str, dict[str, Any]] = {}
    for section, content in raw.items():
        if section == "profiles":
            if not isinstance(content, dict):
                raise CAError(Kind.CONFIG, "[profiles] must be a table of profile tables")
            for name, fields in content.items():
                if not isinstance(fields, dict):
                    raise CAError(Kind.CONFIG, f"[profiles.{name}] must be a table")
                profiles[name] = dict(fields)
            continue
        if section not in values or not isinstance(content, dict):
            raise CAError(Kind.CONFIG, f"unknown configuration section [{section}]")
        for key, value in content.items():
            if key not in values[section]:
                raise CAError(Kind.CONFIG, f"unknown configuration key {section}.{key}")
            values[section][key] = value

    for key_path, value in _env_overrides(environ, profiles).items():
        if key_path[0] == "profiles":
            profiles.setdefault(key_path[1], {})[key_path[2]] = value
        elif key_path[0] in values and key_path[1] in values[key_path[0]]:
            values[key_path[0]][key_path[1]] = value
        else:
            raise CAError(
                Kind.CONFIG, f"environment override names unknown key {'.'.join(key_path)}"
            )
    for name, fields in profiles.items():
        unknown = set(fields) - PROFILE_KEYS
        if unknown:
            raise CAError(Kind.CONFIG, f"unknown key profiles.{name}.{sorted(unknown)[0]}")

    base = config_path.parent if config_path else Path.cwd()
    data_dir = Path(str(values["ca"]["data_dir"])).expanduser()
    if not data_dir.is_absolute():
        data_dir = (base / data_dir).resolve()
    return Config(path=config_path, data_dir=data_dir, values=values, profiles=profiles)
