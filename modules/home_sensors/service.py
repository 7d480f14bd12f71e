"""The `home-sensors` service: the sensors and relays wired to the box, on the bus.

Each configured device gets a driver (gpio or simulated, `drivers/`). Its value is published
retained on `circles/home/<device>/<entity>/state` every `interval_s`, and at once when an
input that can signal a change (a contact, a PIR) changes; `…/set` commands drive outputs and
the state published is the one the hardware reports after it. Every home entity's readings on
the bus (the ESP32 nodes' too) go into the history (`history.py`), which `history` answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from appliance.bus import OFFLINE, ONLINE, registry
from appliance.bus.message import Received
from appliance.bus.payloads import CommandRequest, HomeState, utcnow
from appliance.errors import ConfigError, TemporaryError, ValidationFailed
from appliance.ha_discovery import Entity
from appliance.runtime import Service, subscribe
from modules.home_sensors import discovery
from modules.home_sensors.drivers import DRIVERS
from modules.home_sensors.drivers.base import Context, Driver
from modules.home_sensors.history import History, numeric
from modules.home_sensors.settings import DeviceSettings, HomeSensorsSettings, demo_devices

log = logging.getLogger("circles.home_sensors")
MAINTAIN_EVERY_S = 3600.0


@dataclass
class Device:
    """One configured device while the service runs."""

    index: int
    settings: DeviceSettings
    driver_cls: type[Driver]
    driver: Driver | None = None
    value: Any = None
    online: bool | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # One read or write and its publication at a time: an older reading published after a
    # newer one would stand as the retained state until the next interval.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def entity(self) -> str:
        return self.settings.entity_name


def use_pin_factory(name: str) -> None:
    """Make gpiozero build every device with the named pin factory (its entry points)."""
    from importlib.metadata import entry_points

    found = list(entry_points(group="gpiozero_pin_factories", name=name))
    if not found:
        names = sorted(ep.name for ep in entry_points(group="gpiozero_pin_factories"))
        raise ConfigError(f"config: home_sensors.pin_factory: no gpiozero pin factory {name!r}; "
                          f"installed: {', '.join(names)}")
    from gpiozero import Device as GpioDevice

    GpioDevice.pin_factory = found[0].load()()


class HomeSensorsService(Service):
    name = "home-sensors"
    Settings = HomeSensorsSettings

    async def start(self) -> None:
        cfg: HomeSensorsSettings = self.config
        self.folder = self.settings.state_dir / self.name
        if cfg.hardware == "gpio" and cfg.pin_factory:
            use_pin_factory(cfg.pin_factory)
        self.context = Context(cfg.w1_path, cfg.thermal_file, cfg.seed)
        self.history = await asyncio.to_thread(
            History, self.folder / "history.sqlite", full_s=cfg.history_full_hours * 3600,
            keep_s=cfg.history_days * 86400)
        drivers = DRIVERS[cfg.hardware]
        configured = cfg.devices if cfg.devices is not None else (
            demo_devices() if self.settings.environment == "development" else [])
        self.devices = {(d.name, d.entity_name): Device(i, d, drivers[d.kind])
                        for i, d in enumerate(configured)}
        for device in self.devices.values():
            await self.open(device)

    async def open(self, device: Device) -> bool:
        """Open a device's driver; a device whose hardware is not there yet (a probe not
        found) is offline and tried again later, a wrong setting stops the service."""
        try:
            device.driver = await asyncio.to_thread(
                device.driver_cls, device.name, device.settings.options, self.context)
        except TemporaryError as exc:
            await self.set_online(device, False, str(exc))
            return False
        except Exception as exc:  # noqa: BLE001 - gpiozero's own errors name the pin
            raise ConfigError(f"config: home_sensors.devices.{device.index} ({device.name}): "
                              f"{type(exc).__name__}: {exc}") from None
        return True

    async def set_online(self, device: Device, online: bool, reason: str = "") -> None:
        if device.online == online:
            return
        device.online = online
        if online:
            log.info("device online", extra={"device": device.name})
        else:
            log.error("device offline", extra={"device": device.name, "reason": reason})
        await self.bus.send(registry.HOME_STATUS, ONLINE if online else OFFLINE,
                            device=device.name)

    def entities(self) -> list[Entity]:
        return [discovery.entity(d.settings, d.driver_cls) for d in self.devices.values()]

    # -- reading --------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as group:
            group.create_task(self.maintain())
            for device in self.devices.values():
                group.create_task(self.periodic(device))
                if device.driver_cls.shape.event:
                    group.create_task(self.on_change(device, loop))

    async def periodic(self, device: Device) -> None:
        interval = device.settings.interval_s or self.config.interval_s
        while True:
            if device.driver is not None or await self.open(device):
                await self.refresh(device, always=True)
            await asyncio.sleep(interval)

    async def on_change(self, device: Device, loop: asyncio.AbstractEventLoop) -> None:
        """Publish an input's changes at once: signalled by its driver, or polled."""
        while device.driver is None:
            await asyncio.sleep(self.config.poll_s)
        def changed() -> None:
            loop.call_soon_threadsafe(device.changed.set)

        signalled = await asyncio.to_thread(device.driver.watch, changed)
        while True:
            if signalled:
                await device.changed.wait()
                device.changed.clear()
            else:
                await asyncio.sleep(self.config.poll_s)
            await self.refresh(device)

    async def refresh(self, device: Device, *, always: bool = False) -> None:
        """Read a device; publish its value when it changed (or `always`)."""
        assert device.driver is not None
        async with device.lock:
            try:
                value = await asyncio.to_thread(device.driver.read)
            except Exception as exc:  # noqa: BLE001 - a sensor that fails is offline, not fatal
                await self.set_online(device, False, f"{type(exc).__name__}: {exc}")
                return
            await self.set_online(device, True)
            if always or value != device.value:
                await self.publish(device, value)

    async def publish(self, device: Device, value: Any) -> None:
        device.value = value
        state = HomeState(value=value, unit=device.driver_cls.shape.unit, ts=utcnow())
        await self.bus.send(registry.HOME_STATE, state, device=device.name, entity=device.entity)

    @subscribe(registry.HOME_SET)
    async def on_set(self, msg: Received) -> None:
        device = self.devices.get((msg.params["device"], msg.params["entity"]))
        if device is None:
            if any(name == msg.params["device"] for name, _ in self.devices):
                raise ValidationFailed(f"{msg.params['device']} has no entity "
                                       f"{msg.params['entity']!r}")
            return  # another device's command (an ESP32 node's)
        value = device.driver_cls.parse(msg.data)
        if device.driver is None:
            raise ValidationFailed(f"{device.name} is offline")
        async with device.lock:
            state = await asyncio.to_thread(device.driver.write, value)
            log.info("command applied", extra={"device": device.name, "command": msg.data,
                                               "state": state})
            await self.publish(device, state)

    # -- history --------------------------------------------------------------------------
    @subscribe(registry.HOME_STATE, batch=True)
    async def on_states(self, batch: list[Received]) -> None:
        rows = []
        for msg in batch:
            # A retained state delivered on subscribing was recorded when it was published.
            if msg.data is None or msg.message.retain:
                continue
            state: HomeState = msg.data
            value = numeric(state.value)
            if value is None:
                continue
            rows.append((f"{msg.params['device']}/{msg.params['entity']}",
                         state.time.timestamp(), value))
        if rows:
            await asyncio.to_thread(self.history.add, rows)

    async def maintain(self) -> None:
        while True:
            folded, pruned = await asyncio.to_thread(self.history.maintain, time.time())
            if folded or pruned:
                log.info("history folded and pruned", extra={"folded": folded, "pruned": pruned})
            await asyncio.sleep(MAINTAIN_EVERY_S)

    async def cmd_history(self, request: CommandRequest) -> dict[str, Any]:
        """`device`, `entity`; `since`/`until` (ISO 8601, default the last `hours`, 24) and
        `max_points` (500): means over equal steps, each [start, mean, min, max, readings]."""
        args = request.model_extra or {}
        device, entity = str(args.get("device", "")), str(args.get("entity", ""))
        if not device or not entity:
            raise ValidationFailed("history needs device and entity")
        until = _time(args.get("until")) or time.time()
        since = _time(args.get("since")) or until - float(args.get("hours", 24)) * 3600
        max_points = int(args.get("max_points", 500))
        if since >= until or not 1 <= max_points <= 5000:
            raise ValidationFailed("history needs since < until and 1 <= max_points <= 5000")
        step, points = await asyncio.to_thread(self.history.query, f"{device}/{entity}", since,
                                               until, max_points)
        return {"device": device, "entity": entity, "step_s": step, "points": points}

    async def cmd_devices(self, request: CommandRequest) -> list[dict[str, Any]]:
        """The configured devices with their last value."""
        return [{"device": d.name, "entity": d.entity, "kind": d.settings.kind,
                 "label": d.settings.label, "room": d.settings.room, "online": d.online,
                 "value": d.value, "unit": d.driver_cls.shape.unit,
                 "writable": d.driver_cls.write is not Driver.write}
                for d in self.devices.values()]

    async def stop(self) -> None:
        for device in self.devices.values():
            if device.driver is not None:
                await asyncio.to_thread(device.driver.close)
            if device.online:  # not a last will: a crash leaves it to the service's status
                await self.bus.send(registry.HOME_STATUS, OFFLINE, device=device.name)
        await asyncio.to_thread(self.history.close)

    def status_text(self) -> str:
        online = sum(bool(d.online) for d in self.devices.values())
        return f"{online}/{len(self.devices)} devices online"


def _time(value: Any) -> float | None:
    if value in (None, ""):
        return None
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        raise ValidationFailed(f"{value!r} is not an ISO 8601 time") from None

