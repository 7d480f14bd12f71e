"""Devices in the broker: `circles device add|remove|list`.

A device is a client of Mosquitto's dynamic-security plugin with the role of its kind
(DESIGN §3: an ESP32 node, an MT5 expert advisor, Home Assistant, an observer). Adding one
takes effect at once; removing one disconnects it at once. Its password is random, shown
once, and kept in the secret store as `mqtt-<name>`, like a service's.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.bus import registry
from appliance.bus.admin import CLI_CLIENT, BrokerAdmin, client_secret
from appliance.bus.broker import ADMIN_USER
from appliance.bus.roles import DEVICE_KINDS, role_name
from appliance.errors import CirclesError
from appliance.files import write_atomically
from appliance.ha_discovery import APPLIANCE_ID
from appliance.security import audit as events

if TYPE_CHECKING:
    from appliance.security.audit import AuditLog
    from appliance.security.secrets import SecretStore

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class DeviceError(CirclesError):
    """A device name or kind that cannot be used, or a device that is not there."""


@dataclass(frozen=True)
class Device:
    name: str
    kind: str
    password: str | None = field(default=None, repr=False)  # only right after `add`


def _kind_of(client: dict[str, Any]) -> str | None:
    roles = {r.get("rolename") for r in client.get("roles", [])}
    for kind in DEVICE_KINDS:
        if role_name(kind, client.get("username")) in roles:
            return kind
    return None


def check_name(name: str, reserved: set[str]) -> None:
    if not _NAME.match(name):
        raise DeviceError(f"device name {name!r}: use 1-63 characters a-z, 0-9, '-' and '_', "
                          "starting with a letter or digit (it becomes a topic level)")
    # The appliance's own Home Assistant device too: a node of that name could rewrite its
    # discovery configs (the trading-halt switch among them).
    if name in reserved | {ADMIN_USER, CLI_CLIENT, APPLIANCE_ID}:
        raise DeviceError(f"device name {name!r} is taken by the appliance itself")


class Devices:
    """Add, remove and list devices through the broker-admin client; every change is
    audit-logged as `actor`. The secret store and the audit log are files and a database:
    they are written in a thread, off the event loop (the panel's, or `asyncio.run`'s)."""

    def __init__(self, admin: BrokerAdmin, store: SecretStore, audit: AuditLog | None,
                 *, reserved: set[str]) -> None:
        self.admin, self.store, self.audit, self.reserved = admin, store, audit, reserved

    async def add(self, name: str, kind: str, *, actor: str) -> Device:
        if kind not in DEVICE_KINDS:
            raise DeviceError(f"kind {kind!r}: one of {', '.join(DEVICE_KINDS)}")
        check_name(name, self.reserved)
        if await self.admin.get_client(name) is not None:
            raise DeviceError(f"a client called {name!r} already exists; remove it first")
        password = secrets.token_urlsafe(24)
        # Kept before the broker knows it: a crash in between leaves a spare secret, never a
        # device whose password nobody has.
        await asyncio.to_thread(self.store.set, client_secret(name), password)
        await self.admin.ensure_client(kind, name, password)
        if self.audit:
            await asyncio.to_thread(self.audit.record, events.DEVICE_ADD, actor=actor,
                                    target=name, kind=kind)
        return Device(name, kind, password)

    async def remove(self, name: str, *, actor: str) -> Device:
        found = await self.admin.get_client(name)
        kind = _kind_of(found) if found else None
        if found is None or kind is None:
            raise DeviceError(f"no device called {name!r}")
        await self.admin.delete_client(name, kind)
        await asyncio.to_thread(self.store.delete, client_secret(name))
        if self.audit:
            await asyncio.to_thread(self.audit.record, events.DEVICE_REMOVE, actor=actor,
                                    target=name, kind=kind)
        return Device(name, kind)

    async def list(self) -> list[Device]:
        (result,) = await self.admin.execute({"command": "listClients", "verbose": True,
                                              "count": -1})
        devices = []
        for client in result["data"]["clients"]:
            if isinstance(client, dict) and (kind := _kind_of(client)):
                devices.append(Device(str(client["username"]), kind))
        return sorted(devices, key=lambda d: (d.kind, d.name))


@dataclass(frozen=True)
class Endpoint:
    """Where a device finds the broker: the box's LAN address and listener."""

    host: str
    port: int
    tls: bool = False
    ca_file: Path | None = None

    def __post_init__(self) -> None:
        if self.tls and not (self.ca_file and self.ca_file.is_file()):
            raise DeviceError("TLS needs the box's CA certificate (--ca-file): the device must "
                              "know whom to trust")


def lan_address() -> str:
    """This box's address on its LAN (the interface of the default route); no packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed, only used to pick a source
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def esp32_config(device: Device, endpoint: Endpoint) -> dict[str, Any]:
    """The `config.json` an ESP32 node's firmware reads (firmware/, docs/devices.md).
    Blocking (it reads the CA certificate): the panel calls it in a thread."""
    ca = endpoint.ca_file.read_text() if endpoint.tls and endpoint.ca_file else None
    d = device.name
    return {
        "version": 1,
        "device": d,
        "broker": {"host": endpoint.host, "port": endpoint.port, "tls": endpoint.tls,
                   "ca_cert": ca, "username": d, "password": device.password, "client_id": d,
                   "keepalive_s": 30},
        "topics": {
            "state": registry.HOME_STATE.partial(device=d),
            "set": registry.HOME_SET.partial(device=d),
            "status": str(registry.HOME_STATUS.topic(device=d)),
            "discovery": registry.HA_DISCOVERY.partial(device=d),
            "ha_status": str(registry.HA_STATUS.topic()),
        },
    }


def mt5_inputs(device: Device, endpoint: Endpoint) -> str:
    """The expert advisor's input values as an MT5 preset (`.set`: `name=value` lines), to
    load in the EA's Inputs tab."""
    values = {"InpHost": endpoint.host, "InpPort": endpoint.port,
              "InpTls": "true" if endpoint.tls else "false", "InpUsername": device.name,
              "InpPassword": device.password, "InpAccount": device.name}
    return "".join(f"{k}={v}\r\n" for k, v in values.items())


def _esp32_file(device: Device, endpoint: Endpoint) -> bytes:
    return (json.dumps(esp32_config(device, endpoint), indent=2) + "\n").encode()


def _mt5_file(device: Device, endpoint: Endpoint) -> bytes:
    return b"\xff\xfe" + mt5_inputs(device, endpoint).encode("utf-16-le")  # MT5 presets: UTF-16


# The kinds that read a file made by `circles device add --out`, and how it is made.
DEVICE_FILES: dict[str, Callable[[Device, Endpoint], bytes]] = {"esp32": _esp32_file,
                                                               "mt5": _mt5_file}


def device_file(kind: str) -> Callable[[Device, Endpoint], bytes]:
    """What makes the file a device of `kind` reads; DeviceError for a kind that reads none."""
    if kind not in DEVICE_FILES:
        raise DeviceError(f"--out is for {' and '.join(DEVICE_FILES)} devices, not {kind}")
    return DEVICE_FILES[kind]


def write_device_file(device: Device, endpoint: Endpoint, out: Path) -> None:
    """Write the file the device reads: 0600 (it holds the password), complete or not at all,
    and replacing whatever is at `out` (a symlink too) rather than writing through it."""
    data = device_file(device.kind)(device, endpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda f: f.write(data))

