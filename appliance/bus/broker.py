"""`circles broker init`: the Mosquitto configuration and the dynamic-security file.

Writes `<state>/broker/mosquitto.conf` (rewritten only when its content changes) and,
the first time, `<state>/broker/dynamic-security.json` holding the broker-admin client
and the shared roles. After that the file belongs to Mosquitto: clients and roles change
at run time through `appliance.bus.admin`, never by editing it.
"""

from __future__ import annotations

import base64
import getpass
import glob
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.bus.roles import ADMIN_ROLE, KINDS, role
from appliance.errors import ConfigError
from appliance.files import write_atomically
from appliance.security.secrets import ensure_secret, read_secret

ADMIN_USER = "broker-admin"
ADMIN_SECRET = "mqtt-broker-admin"
_PLUGIN_GLOBS = ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so",
                 "/usr/local/lib/mosquitto_dynamic_security.so")


@dataclass(frozen=True)
class BrokerFiles:
    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def dynsec(self) -> Path:
        return self.root / "dynamic-security.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @classmethod
    def under(cls, state_dir: Path) -> BrokerFiles:
        return cls(state_dir / "broker")


@dataclass(frozen=True)
class Listener:
    port: int
    bind: str | None = None  # None: every interface
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None

    def render(self) -> list[str]:
        lines = [f"listener {self.port}" + (f" {self.bind}" if self.bind else "")]
        if self.certfile:
            lines += [f"certfile {self.certfile}", f"keyfile {self.keyfile}"]
            if self.cafile:
                lines.append(f"cafile {self.cafile}")
        return lines


def find_plugin() -> Path:
    for pattern in _PLUGIN_GLOBS:
        for found in sorted(glob.glob(pattern)):
            return Path(found)
    raise ConfigError("broker: mosquitto_dynamic_security.so not found; install mosquitto 2.x")


def render_config(files: BrokerFiles, listeners: list[Listener], *, user: str,
                  plugin: Path) -> str:
    lines = [
        "# Written by `circles broker init`; run it again instead of editing this file.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"user {user}",
        # Persistence with a short autosave: the default (30 min) loses acknowledged
        # messages on a power cut.
        "persistence true",
        f"persistence_location {files.data}/",
        "autosave_interval 5",
        # Past max_queued_messages Mosquitto drops QoS 1 messages silently; the default is 1000.
        "max_queued_messages 1000000",
        "max_queued_bytes 0",
        # Consumers acknowledge after a group commit, so many messages are in flight at once.
        "max_inflight_messages 1000",
        "persistent_client_expiration 14d",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"plugin {plugin}",
        f"plugin_opt_config_file {files.dynsec}",
    ]
    for listener in listeners:
        lines += [""] + listener.render()
    return "\n".join(lines) + "\n"


def password_entry(password: str) -> dict[str, Any]:
    """The plugin's stored form: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return {"password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": 101}


def initial_dynsec(admin_password: str) -> dict[str, Any]:
    shared = [role(kind) for kind, k in KINDS.items() if not k.identity]
    return {
        "clients": [{"username": ADMIN_USER, "textName": "Circles broker admin",
                     **password_entry(admin_password), "roles": [{"rolename": ADMIN_ROLE["rolename"]}]}],
        "roles": [ADMIN_ROLE, *shared],
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True,
                             "subscribe": False, "unsubscribe": True},
    }


def _write_if_changed(path: Path, text: str, mode: int) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    write_atomically(path, lambda out: out.write(text.encode()))
    os.chmod(path, mode)  # whatever the umask: Mosquitto re-reads its config as its own user
    return True


def init(state_dir: Path, *, port: int = 1883, bind: str = "127.0.0.1",
         lan: list[Listener] | None = None, user: str | None = None,
         plugin: Path | None = None) -> list[str]:
    """Write the broker files; returns the names of those that changed (empty on a re-run
    with the same settings)."""
    files = BrokerFiles.under(state_dir)
    files.data.mkdir(parents=True, exist_ok=True)
    changed = []
    text = render_config(files, [Listener(port, bind), *(lan or [])],
                         user=user or getpass.getuser(), plugin=plugin or find_plugin())
    if _write_if_changed(files.conf, text, 0o640):
        changed.append(str(files.conf))
    if files.dynsec.exists():
        if read_secret(ADMIN_SECRET, state_dir) is None:
            raise ConfigError(f"broker: {files.dynsec} exists but the secret {ADMIN_SECRET} is "
                              "missing; restore it or remove the file to start over")
    else:
        admin_password = ensure_secret(ADMIN_SECRET, state_dir)
        _write_if_changed(files.dynsec, json.dumps(initial_dynsec(admin_password), indent=2), 0o600)
        changed.append(str(files.dynsec))
    return changed
