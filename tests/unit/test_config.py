from __future__ import annotations

from pathlib import Path

import pytest

from ca.config import load_config
from ca.errors import CAError, Kind
from ca.profiles import load_profiles

EXAMPLE = Path(__file__).parent.parent.parent / "config" / "certwright.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "certwright.toml"
    path.write_text(text)
    return path


def test_example_config_loads_and_its_profiles_validate() -> None:
    config = load_config(EXAMPLE, environ={})
    profiles = load_profiles(config.profiles)
    assert {"tls-server", "tls-client", "tls-server-client"} <= set(profiles)
    assert config.get("acme", "http01_port") == 80


def test_environment_overrides_any_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "[ca]\ncrl_shards = 4\n[profiles.tls-server]\nmax_validity_days = 30\n")
    config = load_config(
        path,
        environ={
            "CERTWRIGHT_CA__CRL_SHARDS": "8",
            "CERTWRIGHT_DATABASE__URL": "sqlite:///other.db",
            "CERTWRIGHT_PROFILES__TLS_SERVER__DEFAULT_VALIDITY_DAYS": "7",
            "CERTWRIGHT_PROFILES__TLS_SERVER__ALLOWED_DNS_SUFFIXES": '["corp"]',
        },
    )
    assert config.crl_shards == 8
    assert config.database_url() == f"sqlite:///{tmp_path / 'other.db'}"
    profile = load_profiles(config.profiles)["tls-server"]
    assert profile.max_validity.days == 30
    assert profile.default_validity.days == 7
    assert profile.allowed_dns_suffixes == ("corp",)


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, '[ca]\ndefault_issuer = "x"\n')
    config = load_config(None, environ={"CERTWRIGHT_CONFIG": str(path)})
    assert config.get("ca", "default_issuer") == "x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[ca]\ncrl_shard = 3\n", "unknown configuration key ca.crl_shard"),
        ("[nope]\nx = 1\n", "unknown configuration section [nope]"),
        ("[ca\n", "not valid TOML"),
        ("[profiles.x]\nmax_days = 3\n", "unknown key profiles.x.max_days"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(CAError) as exc:
        load_config(_write(tmp_path, text), environ={})
    assert exc.value.kind is Kind.CONFIG
    assert message in exc.value.detail


def test_unknown_environment_override_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="unknown key"):
        load_config(_write(tmp_path, ""), environ={"CERTWRIGHT_CA__NOPE": "1"})


def test_secrets_come_from_environment_or_file(tmp_path: Path) -> None:
    (tmp_path / "pin").write_text("from-file\n")
    (tmp_path / "dbpass").write_text("s3cret\n")
    path = _write(
        tmp_path,
        '[hsm]\npin_file = "pin"\n[database]\nurl = "postgresql://ca@db.internal/ca"\n'
        'password_file = "dbpass"\n',
    )
    config = load_config(path, environ={})
    assert config.hsm_pin() == "from-file"
    assert config.database_url() == "postgresql://ca:s3cret@db.internal/ca"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CERTWRIGHT_HSM_PIN", "from-env")
        assert config.hsm_pin() == "from-env"


def test_missing_pin_is_a_clear_error(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""), environ={})
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CERTWRIGHT_HSM_PIN", raising=False)
        with pytest.raises(CAError, match="no HSM PIN"):
            config.hsm_pin()
        (tmp_path / "missing").exists()
        config2 = load_config(_write(tmp_path, '[hsm]\npin_file = "missing"\n'), environ={})
        with pytest.raises(CAError, match="cannot read the HSM PIN file"):
            config2.hsm_pin()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})
