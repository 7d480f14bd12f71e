from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from appliance.config import Section, load, settings_class
from appliance.errors import ConfigError


class DemoSettings(Section):
    interval_s: float = Field(10.0, gt=0)
    name: str = "demo"


Settings = settings_class({"demo-service": DemoSettings})


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import os

    for key in list(os.environ):
        if key.startswith("CIRCLES_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)
    config = tmp_path / "circles.toml"
    config.write_text("")
    monkeypatch.setenv("CIRCLES_CONFIG", str(config))
    return config


def test_defaults() -> None:
    settings = load(Settings)
    assert settings.bus.port == 1883 and settings.environment == "production"
    assert settings.demo_service.interval_s == 10.0  # type: ignore[attr-defined]


def test_file_then_env_then_credentials(clean_env: Path, monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    clean_env.write_text('[bus]\nport = 1884\nhost = "broker.lan"\n[demo_service]\ninterval_s = 2\n')
    settings = load(Settings)
    assert (settings.bus.port, settings.bus.host) == (1884, "broker.lan")
    assert settings.demo_service.interval_s == 2  # type: ignore[attr-defined]
    monkeypatch.setenv("CIRCLES_BUS__PORT", "1885")
    monkeypatch.setenv("CIRCLES_DEMO_SERVICE__INTERVAL_S", "3")
    settings = load(Settings)
    assert settings.bus.port == 1885 and settings.bus.host == "broker.lan"
    assert settings.demo_service.interval_s == 3  # type: ignore[attr-defined]
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "bus__password").write_text("from-systemd\n")
    (creds / "unrelated-credential").write_text("ignored")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load(Settings)
    assert settings.bus.password and settings.bus.password.get_secret_value() == "from-systemd"
    assert "from-systemd" not in repr(settings)


def test_bad_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIRCLES_BUS__PORT", "99999")
    with pytest.raises(ConfigError, match=r"bus\.port: .*less than or equal to 65535 \(got '99999'\)"):
        load(Settings)


def test_unknown_key_in_a_section_is_an_error(clean_env: Path) -> None:
    clean_env.write_text("[bus]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"bus\.prot: Extra inputs are not permitted"):
        load(Settings)


def test_secret_values_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIRCLES_BUS__PASSWORD", "x" * 5)
    monkeypatch.setenv("CIRCLES_BUS__KEEPALIVE_S", "1")
    with pytest.raises(ConfigError) as caught:
        load(Settings)
    assert "xxxxx" not in str(caught.value) and "bus.keepalive_s" in str(caught.value)


def test_invalid_toml_names_the_file(clean_env: Path) -> None:
    clean_env.write_text("[bus\nport = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(Settings)


def test_missing_config_file_named_by_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CIRCLES_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load(Settings)


def test_config_check_prints_every_error(clean_env: Path) -> None:
    clean_env.write_text('environment = "prod"\n[bus]\nport = "x"\n[nosuch]\na = 1\n'
                         '[health]\ninterval_s = -1\n')
    done = subprocess.run([sys.executable, "-m", "appliance.cli", "config", "check", str(clean_env)],
                          capture_output=True, text=True)
    assert done.returncode == 78
    errors = done.stdout.splitlines()
    for key in ("environment", "bus.port", "nosuch", "health.interval_s"):
        assert any(line.startswith(f"error: {key}") for line in errors), errors
    clean_env.write_text("[health]\ninterval_s = 5\n")
    done = subprocess.run([sys.executable, "-m", "appliance.cli", "config", "check", str(clean_env)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok")
