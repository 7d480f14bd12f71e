"""What the panel knows of the box, kept from the bus: every service's status (and since
when), the health figures, the trading halt, the risk state and each account's metrics.

The panel service feeds it from retained topics; pages and the JSON API read `dashboard()`,
and live pages wait on `changed()` for the next version.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from appliance.bus import ONLINE
from appliance.bus.payloads import utcnow


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
        }
