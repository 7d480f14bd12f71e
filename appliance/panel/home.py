"""What the panel asks the home-sensors service, for the home page and its live part: the
configured devices (labels, rooms) and each measuring sensor's last 24 hours (the charts).

The answers are kept in the view. A page asks when it loads; while the home page is open
live, `keep_charts` asks for each chart again as it comes due, so that the charts move
with the clock and show new readings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import HTTPException

from appliance.panel.deps import Panel
from appliance.panel.view import Chart

log = logging.getLogger("circles.panel")
HOME_SENSORS = "home-sensors"
ASK_EVERY_S = 60.0  # labels and charts change slowly: asked at most this often
CHARTS_TICK_S = 10.0  # how often an open home page's charts are checked for one that is due
DAY_S = 86400.0
CHART_POINTS = 288  # 5-minute steps over a day
MAX_CHARTS = 24


def charted(entity: dict[str, Any]) -> bool:
    """A sensor that measures (a number), not a switch or a door."""
    value = entity["value"]
    return not entity["writable"] and isinstance(value, int | float) \
        and not isinstance(value, bool)


def home_sensors_online(panel: Panel) -> bool:
    seen = panel.view.services.get(HOME_SENSORS)
    return bool(seen and seen.online)


async def refresh_catalog(panel: Panel, *, force: bool = False) -> str | None:
    """Ask the home-sensors service for its configured devices (at most every ASK_EVERY_S
    unless `force`); why it could not, or None. The last answer stays in the view."""
    view = panel.view
    if not force and view.home_catalog_at is not None \
            and time.monotonic() - view.home_catalog_at < ASK_EVERY_S:
        return None
    if not home_sensors_online(panel):
        return "the home-sensors service is not running: labels and rooms may be missing"
    try:
        view.home_catalog = list(await panel.ask(HOME_SENSORS, "devices"))
    except HTTPException as exc:
        return str(exc.detail)
    view.home_catalog_at = time.monotonic()
    return None


async def refresh_history(panel: Panel) -> None:
    """Each measuring sensor's last 24 hours, from the home-sensors' history: a chart is
    asked for again once it is ASK_EVERY_S old (a new one at once); a sensor it cannot
    answer for keeps its last chart until the next time."""
    view = panel.view
    if not home_sensors_online(panel):
        return
    charts = [(e["device"], e["entity"]) for e in view.home_entities() if charted(e)]
    charts = charts[:MAX_CHARTS]
    now = time.monotonic()
    due = [key for key in charts
           if key not in view.home_history_at or now - view.home_history_at[key] >= ASK_EVERY_S]
    for key in due:  # before asking: a page loaded meanwhile does not ask the same again
        view.home_history_at[key] = now

    async def one(device: str, entity: str) -> Chart | None:
        try:
            answer = await panel.ask(HOME_SENSORS, "history", {
                "device": device, "entity": entity, "hours": DAY_S / 3600,
                "max_points": CHART_POINTS})
        except HTTPException:
            return None
        return [(float(p[0]), float(p[1])) for p in answer.get("points", [])]

    answers = await asyncio.gather(*(one(*key) for key in due))
    await view.set_home_history(
        {key: chart for key, chart in zip(due, answers, strict=True) if chart is not None},
        keep=set(charts))


async def keep_charts(panel: Panel, tick_s: float = CHARTS_TICK_S) -> None:
    """While a home page is open live, ask for its charts' history as they come due (the
    page's own load asks by itself). Runs until cancelled; a failure is logged and the
    next tick tries again."""
    while True:
        await asyncio.sleep(tick_s)
        if not panel.view.watchers["home"]:
            continue
        try:
            await refresh_history(panel)
        except Exception:  # noqa: BLE001 - an odd answer must not end the charts for good
            log.exception("the home page's charts: their history could not be refreshed")
