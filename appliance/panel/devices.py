"""How the panel manages devices in the broker: `DeviceAdmin`, which the `panel` service
builds and the devices routes use.

The broker work is `appliance.security.devices`, over a broker-admin connection opened for
each use (its password is read from the state directory then, never kept). The listing is
kept for `LIST_FOR_S`, so that pages and their live parts do not open a connection each;
adding or removing a device lists again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, status

from appliance.bus.admin import BrokerAdmin
from appliance.config import BusSettings
from appliance.errors import CirclesError
from appliance.security.audit import AuditLog
from appliance.security.devices import Device, DeviceError, Devices, Endpoint, lan_address
from appliance.security.secrets import SecretStore

LIST_FOR_S = 10.0  # a listing is this fresh at most (a device added by the CLI shows after)


@dataclass
class DeviceAdmin:
    """What the panel needs to manage devices: how to reach the broker as its admin, the
    secret store and audit log `Devices` writes to, the names the appliance keeps for
    itself, and where devices find the broker (`panel.device_host`, `panel.device_port`)."""

    bus: BusSettings
    state_dir: Path
    store: SecretStore
    audit: AuditLog
    reserved: frozenset[str]
    host: str | None = None
    port: int | None = None
    # The last listing and its monotonic time; one broker-admin connection at a time.
    _listed: tuple[float, list[Device]] | None = field(default=None, init=False, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Devices]:
        """`Devices` over a broker-admin connection for one use; 503 when the broker cannot
        be reached as its admin, 502 when it fails a command."""
        try:
            admin = await BrokerAdmin.connect(self.bus.host, self.bus.port, self.state_dir,
                                              tls=self.bus.tls, ca_file=self.bus.ca_file)
        except CirclesError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                f"the broker's admin connection: {exc}") from None
        try:
            yield Devices(admin, self.store, self.audit, reserved=set(self.reserved))
        except DeviceError:
            raise
        except CirclesError as exc:
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"broker: {exc}") from None
        finally:
            await admin.close()

    async def listing(self) -> list[Device]:
        """The devices in the broker, as listed at most LIST_FOR_S ago."""
        async with self._lock:
            if self._listed is not None and time.monotonic() - self._listed[0] < LIST_FOR_S:
                return self._listed[1]
            async with self.open() as devices:
                found = await devices.list()
            self._listed = (time.monotonic(), found)
            return found

    async def add(self, name: str, kind: str, *, actor: str) -> tuple[Device, list[Device]]:
        """Add a device (DeviceError when it cannot be); it and the devices now."""
        async with self._lock:
            self._listed = None
            async with self.open() as devices:
                device = await devices.add(name, kind, actor=actor)
                found = await devices.list()
            self._listed = (time.monotonic(), found)
            return device, found

    async def remove(self, name: str, *, actor: str) -> tuple[Device, list[Device]]:
        """Remove a device (DeviceError when there is none); it and the devices now."""
        async with self._lock:
            self._listed = None
            async with self.open() as devices:
                device = await devices.remove(name, actor=actor)
                found = await devices.list()
            self._listed = (time.monotonic(), found)
            return device, found

    def endpoint(self) -> Endpoint:
        """Where a device connects: the LAN listener, 8883 with TLS (as the bus is) else
        1883, unless the settings say otherwise. Blocking (it looks at the CA file)."""
        tls = self.bus.tls
        return Endpoint(self.host or lan_address(), self.port or (8883 if tls else 1883), tls,
                        self.bus.ca_file)
