"""Wiring: from a Config to the storage, token and certificate authority a process uses.

Everything is built lazily, so a command that needs only the database never opens the HSM, and
a forked server worker opens its own PKCS#11 session (DESIGN.md §6).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from sqlalchemy.engine import make_url

from ca.clock import Clock, SystemClock
from ca.config import Config
from ca.hsm import Token
from ca.issuance import CertificateAuthority
from ca.profiles import Profile, load_profiles
from ca.storage import Storage


class Runtime:
    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()

    @functools.cached_property
    def storage(self) -> Storage:
        storage = Storage(self.config.database_url(), clock=self.clock)
        if self.config.get("database", "auto_migrate"):
            storage.migrate()
        return storage

    @functools.cached_property
    def token(self) -> Token:
        return Token(
            self.config.hsm_module(),
            str(self.config.get("hsm", "token_label")),
            self.config.hsm_pin(),
        )

    @functools.cached_property
    def profiles(self) -> dict[str, Profile]:
        return load_profiles(self.config.profiles)

    @functools.cached_property
    def authority(self) -> CertificateAuthority:
        from ca import crl, ocsp_signing

        authority = self._authority()
        self.__dict__["authority"] = authority  # install() below reads it back
        # Revocations re-sign OCSP at once and mark CRL shards due, in every process.
        ocsp_signing.install(self)
        crl.install(self)
        return authority

    def _authority(self) -> CertificateAuthority:
        return CertificateAuthority(
            self.storage,
            lambda: self.token,
            self.profiles,
            public_base_url=self.config.public_base_url,
            crl_shards=self.config.crl_shards,
            default_issuer=str(self.config.get("ca", "default_issuer")) or None,
            clock=self.clock,
            lint_enabled=bool(self.config.get("ca", "lint")),
        )

    def effective_settings(self) -> dict[str, Any]:
        """The configuration in force (profiles included), without secrets: what a
        `config.change` audit record describes."""
        values = {section: dict(keys) for section, keys in self.config.values.items()}
        database = dict(values["database"])
        database["url"] = make_url(str(database["url"])).render_as_string(hide_password=True)
        values["database"] = database
        values["profiles"] = {name: p.to_json() for name, p in sorted(self.profiles.items())}
        return values

    def record_config(self, actor: str) -> bool:
        """Append a `config.change` audit record when the settings in force differ from the
        last recorded ones (the first start records them all). True when one was written."""
        settings = json.loads(json.dumps(self.effective_settings(), sort_keys=True, default=str))
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        previous = self.storage.last_audit_detail("config.change")
        if previous is not None and previous.get("sha256") == digest:
            return False
        before = previous.get("settings", {}) if previous else {}
        changed = sorted(
            f"{section}.{key}"
            for section in set(before) | set(settings)
            for key in set(before.get(section, {})) | set(settings.get(section, {}))
            if before.get(section, {}).get(key) != settings.get(section, {}).get(key)
        )
        self.storage.audit(
            actor,
            "config.change",
            str(self.config.path or "defaults"),
            "success",
            {"sha256": digest, "changed": changed, "settings": settings},
        )
        return True

    def close(self) -> None:
        if "token" in self.__dict__:
            self.token.close()
        if "storage" in self.__dict__:
            self.storage.dispose()
