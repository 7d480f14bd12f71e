"""Typed settings: defaults < TOML file < CIRCLES_* environment < systemd credentials.

The file is `/etc/circles/circles.toml` unless `CIRCLES_CONFIG` names another.
Each service has one section named after it (`[health]`, `[trade_logger]`);
the environment spells nested keys with a double underscore
(`CIRCLES_BUS__PORT=1884`, `CIRCLES_HEALTH__INTERVAL_S=5`). Credentials that
systemd passes in `$CREDENTIALS_DIRECTORY` (`LoadCredential=bus__password:…`)
win over everything, so secrets never need to sit in the file or environment.
Settings are built in the entry point and passed down, never at import time.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from appliance.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/circles/circles.toml")
_SECRET_WORDS = ("password", "secret", "token", "key")


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, so typos are caught."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BusSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    tls: bool = False
    ca_file: Path | None = None
    # Default username is the service name; default password is read from the
    # secret `mqtt-<service>` (credentials directory, then the state directory).
    username: str | None = None
    password: SecretStr | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    # How many unacknowledged QoS 1 messages the broker may hand us (MQTT v5
    # Receive Maximum); must exceed the largest batch a handler commits at once.
    receive_maximum: int = Field(1000, ge=1, le=65535)
    session_expiry_s: int = Field(7 * 86400, ge=0)
    batch_max: int = Field(500, ge=1, le=65535)
    reconnect_max_s: float = Field(10.0, gt=0)


class LogSettings(Section):
    level: Literal["DEBUG", "INFO", "WARN", "ERROR"] = "INFO"
    journal_socket: Path = Path("/run/systemd/journal/socket")


class DatabaseSettings(Section):
    # Default: SQLite (WAL) at <state_dir>/circles.db; or e.g. postgresql+psycopg://…
    url: str | None = None


class SecuritySettings(Section):
    """Logins to the panel: lockout, password expiry, reset tokens, TOTP (docs/users.md)."""

    # Failed attempts in a row (password or TOTP code) before the account is locked.
    lockout_threshold: int = Field(5, ge=1, le=100)
    # The first lockout lasts this long; each further lockout in a row doubles it.
    lockout_minutes: int = Field(15, ge=1)
    lockout_max_minutes: int = Field(24 * 60, ge=1)
    # Off by default: forced rotation pushes people to weaker passwords (NIST SP 800-63B).
    password_max_age_days: int | None = Field(None, ge=1)
    reset_token_minutes: int = Field(30, ge=1, le=24 * 60)
    totp_issuer: str = Field("Circles", min_length=1, max_length=60)


class StoreSettings(Section):
    """One object store (appliance/storage, docs/storage.md): the `[storage]` section (the
    personal cloud) and every backup target. `local` keeps objects under `path` on a disk of
    the box (or a USB disk mounted there); `s3` uses MinIO or any S3 at `endpoint`, with its
    access and secret keys read from the secret store under the names given here."""

    backend: Literal["local", "s3"] = "local"
    path: Path | None = None  # local: default <state_dir>/storage
    endpoint: str | None = None  # s3: host:port, e.g. nas.lan:9000
    bucket: str = Field("circles", min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+$")
    secure: bool = True  # s3: HTTPS
    region: str | None = None
    access_key_secret: str = "s3-access-key"
    secret_key_secret: str = "s3-secret-key"
    encrypt: bool = True  # envelope-encrypt every object under the keyring


class CoreSettings(BaseSettings):
    """What every process needs; a service's own section is added by `settings_class`."""

    model_config = SettingsConfigDict(
        env_prefix="CIRCLES_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    environment: Literal["production", "staging", "development"] = "production"
    state_dir: Path = Path("/var/lib/circles")
    bus: BusSettings = BusSettings()
    log: LogSettings = LogSettings()
    database: DatabaseSettings = DatabaseSettings()
    security: SecuritySettings = SecuritySettings()
    storage: StoreSettings = StoreSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            CredentialsSource(settings_cls),
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=config_path()),
        )


class CredentialsSource(PydanticBaseSettingsSource):
    """systemd credentials: a file `bus__password` becomes `bus.password`."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole mapping

    def __call__(self) -> dict[str, Any]:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory or not Path(directory).is_dir():
            return {}
        found: dict[str, Any] = {}
        for entry in sorted(Path(directory).iterdir()):
            parts = entry.name.split("__")
            if parts[0] not in self.settings_cls.model_fields or not entry.is_file():
                continue
            node = found
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = entry.read_text().strip()
        return found


def config_path() -> Path:
    return Path(os.environ.get("CIRCLES_CONFIG", DEFAULT_CONFIG))


def section_name(service: str) -> str:
    """The settings section of a service: `trade-logger` → `trade_logger`."""
    return service.replace("-", "_")


def settings_class(
    sections: dict[str, type[Section]], *, forbid_unknown: bool = False
) -> type[CoreSettings]:
    """CoreSettings plus one section per service; `forbid_unknown` also refuses unknown keys
    at the top level (used by `circles config check`, which sees every service)."""
    fields: dict[str, Any] = {
        section_name(name): (model, model()) for name, model in sections.items()
    }
    config = SettingsConfigDict(extra="forbid") if forbid_unknown else None
    base: type[CoreSettings] = CoreSettings
    if config:
        base = type("StrictCoreSettings", (CoreSettings,), {"model_config": {
            **CoreSettings.model_config, **config}})
    return create_model("Settings", __base__=base, **fields)


def load(cls: type[CoreSettings]) -> CoreSettings:
    """Build settings or raise ConfigError with one line naming every bad key."""
    path = config_path()
    if "CIRCLES_CONFIG" in os.environ and not path.is_file():
        raise ConfigError(f"config: CIRCLES_CONFIG names {path}, which does not exist")
    try:
        return cls()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path}: invalid TOML: {exc}") from None
    except ValidationError as exc:
        raise ConfigError("config: " + "; ".join(describe_errors(exc))) from None


def from_mapping(cls: type[CoreSettings], data: dict[str, Any], source: str) -> CoreSettings:
    """Settings from `data` (a parsed TOML file) alone: no environment, no credentials and
    no /etc/circles file, so the same file gives the same settings on any machine (the
    backtest). ConfigError names `source` and every bad key."""
    isolated = type(cls.__name__, (cls,), {"settings_customise_sources": classmethod(
        lambda _cls, settings_cls, init_settings, **_others: (init_settings,))})
    try:
        return isolated(**data)
    except ValidationError as exc:
        raise ConfigError(f"config: {source}: " + "; ".join(describe_errors(exc))) from None


def describe_errors(exc: ValidationError) -> list[str]:
    """One entry per error: `bus.port: <reason> (got '<input>')`; secret inputs are not shown."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        shown = ""
        if err["type"] != "missing" and not any(word in key for word in _SECRET_WORDS):
            value = err.get("input")
            if not isinstance(value, dict):
                shown = f" (got {value!r})"
        lines.append(f"{key}: {err['msg']}{shown}")
    return lines
