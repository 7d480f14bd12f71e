"""What the panel knows of the box, kept from the bus: every service's status (and since
when), the health figures, the trading halt, the risk state, each account's metrics (and
positions and open orders), each backup job's last run and drill, each home entity's
reported state, and when each device (ESP32 node, MT5 expert advisor) was last heard.

The panel service feeds it from retained topics; pages and the JSON API read `dashboard()`,
and live pages wait on `changed()` for the next version.

Devices choose their own topic levels (`circles/home/<device>/<anything>/state`), so what
is kept of them is bounded: MAX_DEVICES devices of each sort, MAX_DEVICE_ENTITIES entities
each; more are dropped, with one warning per device. A device whose retained status and
states are all cleared is forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from appliance.bus import ONLINE
from appliance.bus.payloads import epoch, utcnow

log = logging.getLogger("circles.panel")
OTHER_ROOM = "Other"  # where a home entity no configuration places goes
HEARTBEAT_BUMP_S = 30.0
MAX_DEVICES = 256  # home devices (and, apart, MT5 expert advisors) kept
MAX_DEVICE_ENTITIES = 64  # entities kept of one home device
Chart = list[tuple[float, float]]  # (epoch seconds, value), oldest first


@dataclass
class DeviceSeen:
    """A device as the bus told of it: its status (None: it never said) and since when, and
    the latest time anything was heard from it."""

    online: bool | None = None
    since: str | None = None
    last: str | None = None

    def heard(self, ts: str | None) -> None:
        when = epoch(ts)
        if when is not None and (self.last is None or when > (epoch(self.last) or 0.0)):
            self.last = ts


@dataclass
class ServiceSeen:
    online: bool
    since: str | None  # when the status changed to this, as its sender said (or when seen)


class BoxView:
    def __init__(self) -> None:
        self.services: dict[str, ServiceSeen] = {}
        self.health: dict[str, Any] | None = None
        self.halt: dict[str, Any] | None = None
        self.risk: dict[str, Any] | None = None
        self.metrics: dict[str, dict[str, Any]] = {}
        # Each execution account's open positions and open orders (retained; with its mode).
        self.positions: dict[str, dict[str, Any]] = {}
        self.orders: dict[str, dict[str, Any]] = {}
        # Each backup job's last run and last restore drill (retained), and the alert.
        self.backups: dict[str, dict[str, Any]] = {}
        self.drills: dict[str, dict[str, Any]] = {}
        self.backup_alert: dict[str, Any] | None = None
        # The notify service's last alerts (retained circles/notify/recent).
        self.alerts: dict[str, Any] | None = None
        # The home: each entity's reported state (by device, then entity), each device's
        # status and when it was last heard (ESP32 nodes and the home-sensors' devices, MT5
        # expert advisors apart).
        self.home: dict[str, dict[str, dict[str, Any]]] = {}
        self.home_devices: dict[str, DeviceSeen] = {}
        self.mt5: dict[str, DeviceSeen] = {}
        # What services answered when asked, kept for the live parts (which cannot ask):
        # the home-sensors' configured devices, each sensor's recent history, the devices
        # in the broker. Each with the monotonic time it was asked.
        self.home_catalog: list[dict[str, Any]] = []
        self.home_catalog_at: float | None = None
        self.home_history: dict[tuple[str, str], Chart] = {}
        self.home_history_at: dict[tuple[str, str], float] = {}
        self.devices: list[tuple[str, str]] | None = None  # (name, kind)
        self.watchers: Counter[str] = Counter()  # live parts open now, by name
        self._heartbeat_bumped: dict[str, float] = {}
        self._dropped: set[str] = set()  # devices warned of as over a bound
        self.version = 0
        self._changed = asyncio.Condition()

    async def _bump(self) -> None:
        async with self._changed:
            self.version += 1
            self._changed.notify_all()

    async def changed(self, version: int, timeout: float) -> int:
        """Wait until the view is newer than `version` (or `timeout`); the version now."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.version > version),
                                       timeout)
            except TimeoutError:
                pass
            return self.version

    async def set_status(self, service: str, text: str | None, sent_at: str | None) -> None:
        if text is None:  # the retained status was cleared: the service is gone
            self.services.pop(service, None)
        else:
            online = text.strip() == ONLINE
            seen = self.services.get(service)
            if seen is None or seen.online != online:
                self.services[service] = ServiceSeen(online, sent_at or utcnow())
        await self._bump()

    async def set(self, what: str, value: dict[str, Any] | None) -> None:
        setattr(self, what, value)
        await self._bump()

    async def set_metrics(self, account: str, value: dict[str, Any] | None) -> None:
        if value is None:
            self.metrics.pop(account, None)
        else:
            self.metrics[account] = value
        await self._bump()

    async def set_account_state(self, what: str, account: str,
                                value: dict[str, Any] | None) -> None:
        """A retained state kept by name (None: cleared): an execution account's `positions`
        or `orders`, a backup job's last run (`backups`) or restore drill (`drills`)."""
        kept: dict[str, dict[str, Any]] = getattr(self, what)
        if value is None:
            kept.pop(account, None)
        else:
            kept[account] = value
        await self._bump()

    def execution_accounts(self) -> list[str]:
        """The accounts an execution service reported positions or open orders of."""
        return sorted(set(self.positions) | set(self.orders))

    def pnl_today(self) -> float | None:
        figures = (self.risk or {}).get("figures") or {}
        value = figures.get("pnl_today")
        return float(value) if isinstance(value, int | float) else None

    def dashboard(self) -> dict[str, Any]:
        """The dashboard, as the JSON API gives it and the page shows it."""
        health = self.health or {}
        return {
            "services": [{"name": name, "online": seen.online, "since": seen.since}
                         for name, seen in sorted(self.services.items())],
            "health": {key: health.get(key) for key in (
                "ts", "hostname", "cpu_percent", "memory_percent", "memory_used_mb",
                "memory_total_mb", "disk_percent", "disk_free_gb", "cpu_temp_c",
                "clock_synchronized", "uptime_s")} if self.health else None,
            "trading": {
                "known": self.halt is not None,
                "halted": bool(self.halt and self.halt.get("halted")),
                "by": (self.halt or {}).get("by"),
                "reason": (self.halt or {}).get("reason"),
                "since": (self.halt or {}).get("ts"),
                "breaches": (self.risk or {}).get("breaches", []),
                "pnl_today": self.pnl_today(),
            },
            "accounts": sorted(self.metrics),
            "alerts": self.last_alerts(),
            "backups": self.backup_status(),
        }

    def backup_status(self) -> dict[str, Any]:
        """Each backup job's last run (ok, when, its target, `local_only`, the error), when it
        last succeeded, its last restore drill; and the backup service's alert."""
        jobs = []
        for job in sorted(set(self.backups) | set(self.drills)):
            run, drill = self.backups.get(job) or {}, self.drills.get(job)
            jobs.append({key: run.get(key) for key in (
                "ok", "ts", "last_success", "target", "local_only", "snapshot", "error")}
                | {"job": job, "drill": {key: drill.get(key) for key in ("ok", "ts", "error")}
                   if drill else None})
        return {"jobs": jobs, "alert": self.backup_alert}

    def last_alerts(self, count: int = 5) -> dict[str, Any] | None:
        """The notify service's last `count` alerts, newest first (title, text, severity, kind,
        when, channels still waited for), how many fire now and how many deliveries wait;
        None before it said anything."""
        if self.alerts is None:
            return None
        return {"alerts": self.alerts.get("alerts", [])[:count], "active": self.alerts.get("active", 0),
                "queued": self.alerts.get("queued", 0)}

    # -- the home and the devices ------------------------------------------------------------
    async def set_home_state(self, device: str, entity: str, state: dict[str, Any] | None,
                             *, live: bool) -> None:
        """An entity's state as its device reported it (None: the retained state was
        cleared). The panel never guesses one: a switch shows what came back. The device was
        heard now if the state is `live`, else (a retained state) when it says it was taken."""
        if state is None:
            self.home.get(device, {}).pop(entity, None)
            self._forget_home(device)
        elif self._room_for(self.home_devices, device, entity):
            self.home.setdefault(device, {})[entity] = state
            self.home_devices.setdefault(device, DeviceSeen()).heard(
                utcnow() if live else state.get("ts"))
        else:
            return
        await self._bump()

    async def set_device_status(self, kind: str, name: str, text: str | None,
                                sent_at: str | None) -> None:
        """A device's retained status: `kind` "home" (an ESP32 node, a home-sensors device)
        or "mt5" (an expert advisor). None: the status was cleared."""
        devices = self.mt5 if kind == "mt5" else self.home_devices
        if text is None:
            if kind == "mt5":  # an expert advisor retains nothing else: it is gone
                self.mt5.pop(name, None)
                self._heartbeat_bumped.pop(name, None)
            else:
                if (seen := self.home_devices.get(name)) is not None:
                    seen.online = seen.since = None
                self._forget_home(name)
        elif self._room_for(devices, name):
            seen = devices.setdefault(name, DeviceSeen())
            online = text.strip() == ONLINE
            if seen.online != online:
                seen.online, seen.since = online, sent_at or utcnow()
            if online:
                seen.heard(sent_at or utcnow())
        else:
            return
        await self._bump()

    def _room_for(self, devices: dict[str, DeviceSeen], device: str,
                  entity: str | None = None) -> bool:
        """Whether `device` (and its `entity`) may be kept in `devices` (and `home`): the
        first warning of one that may not is logged, not every message of it."""
        if device not in devices and len(devices) >= MAX_DEVICES:
            why = f"more than {MAX_DEVICES} devices"
        elif entity is not None and entity not in (states := self.home.get(device, {})) \
                and len(states) >= MAX_DEVICE_ENTITIES:
            why = f"more than {MAX_DEVICE_ENTITIES} entities"
        else:
            return True
        if device not in self._dropped and len(self._dropped) < MAX_DEVICES:
            self._dropped.add(device)
            log.warning(f"device {device}: {why}; what is over is not shown",
                        extra={"device": device})
        return False

    def _forget_home(self, device: str) -> None:
        """Forget a home device once its retained status and states are all cleared."""
        seen = self.home_devices.get(device)
        if not self.home.get(device) and (seen is None or seen.online is None):
            self.home.pop(device, None)
            self.home_devices.pop(device, None)
            self._dropped.discard(device)

    async def heartbeat(self, account: str) -> None:
        """An expert advisor's heartbeat: heard now (the terminal's clock is not trusted).
        Live pages are told at most every HEARTBEAT_BUMP_S, not at every beat."""
        if not self._room_for(self.mt5, account):
            return
        self.mt5.setdefault(account, DeviceSeen()).heard(utcnow())
        now = time.monotonic()
        last = self._heartbeat_bumped.get(account)
        if last is None or now - last >= HEARTBEAT_BUMP_S:
            self._heartbeat_bumped[account] = now
            await self._bump()

    async def set_home_history(self, charts: dict[tuple[str, str], Chart], *,
                               keep: Collection[tuple[str, str]]) -> None:
        """Sensors' recent history as the home-sensors answered; a sensor not in `keep` (no
        longer charted) is forgotten. Live pages are told when a chart changed."""
        for key in [key for key in self.home_history_at if key not in keep]:
            self.home_history.pop(key, None)
            self.home_history_at.pop(key, None)
        changed = {key: chart for key, chart in charts.items()
                   if self.home_history.get(key) != chart}
        self.home_history.update(changed)
        if changed:
            await self._bump()

    async def set_devices(self, devices: list[tuple[str, str]]) -> None:
        """The devices in the broker (name, kind), as the panel last listed them."""
        if devices != self.devices:
            self.devices = devices
            await self._bump()

    def device_seen(self, kind: str, name: str) -> DeviceSeen | None:
        """What the bus told of a device in the broker: ESP32 nodes and MT5 expert advisors
        say it; Home Assistant and observers do not (None)."""
        if kind == "esp32":
            return self.home_devices.get(name)
        if kind == "mt5":
            return self.mt5.get(name)
        return None

    def device_rows(self, devices: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """The devices (name, kind) with their status and when they were last heard."""
        rows = []
        for name, kind in devices:
            seen = self.device_seen(kind, name)
            rows.append({"name": name, "kind": kind,
                         "online": seen.online if seen else None,
                         "since": seen.since if seen else None,
                         "last_seen": seen.last if seen else None})
        return rows

    def home_entities(self) -> list[dict[str, Any]]:
        """Every home entity known: the home-sensors' configured ones first, as it listed
        them (label, room, kind, unit, writable), then any other the bus reported (an ESP32
        node's: named by its device, in the room "Other"); each with its reported value and
        time, and whether its device is online (None: it never said)."""
        listed: dict[tuple[str, str], dict[str, Any]] = {}
        for info in self.home_catalog:
            listed.setdefault((str(info.get("device")), str(info.get("entity"))), info)
        reported = {(device, entity) for device, states in self.home.items()
                    for entity in states}
        keys = list(listed) + sorted(reported - set(listed))
        out = []
        for device, entity in keys:
            info = listed.get((device, entity), {})
            state = self.home.get(device, {}).get(entity) or {}
            seen = self.home_devices.get(device)
            online = seen.online if seen and seen.online is not None else info.get("online")
            out.append({
                "device": device, "entity": entity,
                "label": info.get("label") or (device if info else f"{device} · {entity}"),
                "room": info.get("room") or OTHER_ROOM, "kind": info.get("kind"),
                "unit": state.get("unit") or info.get("unit"),
                "writable": bool(info.get("writable")),
                "value": state.get("value"), "ts": state.get("ts"), "online": online})
        return out
