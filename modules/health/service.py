"""The `health` service: the box's vital signs and which services are online.

Publishes retained `circles/health/state` every `interval_s` seconds. It is the worked
example of docs/architecture.md: settings, a handler, a periodic task, a command.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psutil
from pydantic import Field

from appliance.bus import OFFLINE, ONLINE, registry
from appliance.bus.message import Received
from appliance.bus.payloads import CommandRequest, HealthState, ServiceState, utcnow
from appliance.config import Section
from appliance.errors import ValidationFailed
from appliance.ha_discovery import Entity
from appliance.runtime import Service, subscribe
from modules.health import discovery, probes


class HealthSettings(Section):
    interval_s: float = Field(10.0, gt=0, description="seconds between two published states")
    disk_path: Path = Path("/")


class HealthService(Service):
    name = "health"
    Settings = HealthSettings

    async def start(self) -> None:
        self.services: dict[str, ServiceState] = {}
        self.last: HealthState | None = None
        psutil.cpu_percent(interval=None)  # the first call only sets the baseline

    @subscribe(registry.SERVICE_STATUS)
    async def on_status(self, msg: Received) -> None:
        if msg.data is None:  # the retained status was deleted: the service is gone
            self.services.pop(msg.params["service"], None)
            return
        if msg.data not in (ONLINE, OFFLINE):
            raise ValidationFailed(f"status must be {ONLINE!r} or {OFFLINE!r}, not {msg.data!r}")
        online = msg.data == ONLINE
        previous = self.services.get(msg.params["service"])
        if previous is None or previous.online != online:
            self.services[msg.params["service"]] = ServiceState(online=online, since=utcnow())

    async def run(self) -> None:
        while True:
            await self.publish_state()
            await asyncio.sleep(self.config.interval_s)

    async def publish_state(self) -> HealthState:
        self.last = await asyncio.to_thread(probes.sample, self.config.disk_path, self.services)
        await self.bus.send(registry.HEALTH_STATE, self.last)
        return self.last

    async def cmd_state(self, request: CommandRequest) -> dict[str, Any]:
        """The current state, sampled now."""
        return (await self.publish_state()).model_dump()

    def entities(self) -> list[Entity]:
        return discovery.entities()

    def status_text(self) -> str:
        online = sum(s.online for s in self.services.values())
        return f"{online}/{len(self.services)} services online"
