"""Home Assistant MQTT discovery, written once for every service that announces entities.

A service lists its entities (`Service.entities()`); the runtime announces them as retained
configs under `homeassistant/<component>/<device>/<object>/config` once the service is online,
again whenever Home Assistant says `online` on `homeassistant/status`, and sends an empty
retained config for each entity announced before but no longer listed, so Home Assistant
deletes it, with the retained topics the entity owned (its state, its device's status).
What was announced is remembered in `<state>/<service>/discovery.json`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.bus import registry
from appliance.bus.base import OFFLINE, ONLINE, Bus
from appliance.files import write_atomically

log = logging.getLogger("circles.discovery")

# The keys Home Assistant's MQTT integration requires per component (beyond the identity
# every config here carries: `unique_id`, `name`, `device`, `availability`).
REQUIRED: dict[str, frozenset[str]] = {
    "sensor": frozenset({"state_topic"}),
    "binary_sensor": frozenset({"state_topic"}),
    "switch": frozenset({"command_topic"}),
    "light": frozenset({"command_topic"}),
    "number": frozenset({"command_topic"}),
    "button": frozenset({"command_topic"}),
}
IDENTITY = frozenset({"unique_id", "name", "device", "availability"})

# The appliance itself, as a Home Assistant device; every device on the box hangs off it.
APPLIANCE_ID = "circles"
APPLIANCE = {"identifiers": [APPLIANCE_ID], "name": "Circles", "manufacturer": "Circles",
             "model": "home-server appliance"}
VALUE = "{{ value_json.value }}"  # reads `HomeState.value`


@dataclass(frozen=True)
class Entity:
    """One Home Assistant entity. `device` and `object` are topic levels (slugs) and make
    the stable `unique_id`; `config` holds the component's own keys (topics, units, classes).
    `owned` are retained topics that go with the entity when it is removed."""

    component: str
    device: str
    object: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    device_info: dict[str, Any] = field(default_factory=lambda: dict(APPLIANCE))
    availability: tuple[str, ...] = ()
    owned: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.component not in REQUIRED:
            raise ValueError(f"unknown Home Assistant component {self.component!r}")
        missing = REQUIRED[self.component] - set(self.config)
        if missing:
            raise ValueError(f"{self.component} {self.object!r} needs {sorted(missing)}")

    @property
    def unique_id(self) -> str:
        return f"{self.device}.{self.object}"  # '.' is in no slug: no two entities share one

    def topic(self) -> str:
        return str(registry.HA_DISCOVERY.topic(component=self.component, device=self.device,
                                               object=self.object))

    def payload(self, service: str) -> str:
        """The config's JSON. Available while the announcing service is online (and each
        extra status topic says `online`)."""
        topics = [str(registry.SERVICE_STATUS.topic(service=service)), *self.availability]
        doc = {
            "name": self.name,
            "unique_id": self.unique_id,
            "default_entity_id": f"{self.component}.{self.device}_{self.object}".replace("-", "_"),
            **self.config,
            "availability": [{"topic": t, "payload_available": ONLINE,
                              "payload_not_available": OFFLINE} for t in topics],
            "availability_mode": "all",
            "device": self.device_info,
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)


class Announcer:
    """Keeps one service's announced configs in step with what it lists."""

    def __init__(self, bus: Bus, service: str, state_file: Path) -> None:
        self.bus = bus
        self.service = service
        self.state_file = state_file

    def _previous(self) -> dict[str, list[str]]:
        try:
            kept = json.loads(self.state_file.read_text())
            return {str(k): [str(t) for t in v] for k, v in dict(kept).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as exc:
            log.warning("announced entities unreadable; none removed", extra={"error": str(exc)})
            return {}

    def _keep(self, current: dict[str, list[str]]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(current, indent=1, sort_keys=True).encode()
        write_atomically(self.state_file, lambda out: out.write(data))

    async def announce(self, entities: list[Entity]) -> None:
        """Send every config (retained, acknowledged) and remove those no longer listed."""
        current = {e.topic(): sorted(e.owned) for e in entities}
        if len(current) != len(entities):
            raise ValueError("two entities share a discovery topic")
        for entity in entities:
            await self.bus.publish(entity.topic(), entity.payload(self.service).encode(),
                                   qos=registry.HA_DISCOVERY.qos, retain=True, wait=True)
        previous = await asyncio.to_thread(self._previous)
        gone = sorted(set(previous) - set(current))
        still = {t for owned in current.values() for t in owned}
        orphans = sorted({t for topic in gone for t in previous[topic]} - still)
        for topic in [*gone, *orphans]:
            await self.bus.publish(topic, b"", qos=registry.HA_DISCOVERY.qos, retain=True,
                                   wait=True)
        if current != previous:
            await asyncio.to_thread(self._keep, current)
        log.info("Home Assistant discovery sent",
                 extra={"entities": len(current), "removed": gone})
