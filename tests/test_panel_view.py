"""The panel's view of the box, fed as the panel service feeds it: what devices publish is
kept within bounds, a device whose retained messages are all cleared is forgotten, and live
pages are told when a chart's history changed; each chart's history is asked for again as
it comes due, by a page load or, while the home page is watched live, by the service."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from appliance.panel.home import ASK_EVERY_S, keep_charts, refresh_history
from appliance.panel.view import MAX_DEVICE_ENTITIES, MAX_DEVICES, BoxView, ServiceSeen

STATE = {"value": 21.5, "unit": "°C", "ts": "2025-03-01T10:00:00.000+00:00"}


def test_entities_and_devices_are_bounded_with_one_warning_per_device(
        caplog: pytest.LogCaptureFixture) -> None:
    view = BoxView()

    async def feed() -> None:
        for n in range(MAX_DEVICE_ENTITIES + 10):
            await view.set_home_state("chatty", f"e{n}", STATE, live=True)
        await view.set_home_state("chatty", "e0", STATE | {"value": 22}, live=True)  # known
        for n in range(MAX_DEVICES + 5):
            await view.set_device_status("home", f"node-{n}", "online", None)
        await view.set_home_state("late", "temperature", STATE, live=True)
        for n in range(MAX_DEVICES + 5):
            await view.heartbeat(f"ea-{n}")

    with caplog.at_level(logging.WARNING, logger="circles.panel"):
        asyncio.run(feed())
    assert len(view.home["chatty"]) == MAX_DEVICE_ENTITIES
    assert view.home["chatty"]["e0"]["value"] == 22
    assert len(view.home_devices) == MAX_DEVICES and "late" not in view.home
    assert len(view.mt5) == MAX_DEVICES
    warned = [r.getMessage() for r in caplog.records]
    assert sum("chatty" in m for m in warned) == 1  # not one per dropped message
    assert any("device late:" in m for m in warned) and any("device ea-" in m for m in warned)
    assert len(view.home_entities()) == MAX_DEVICE_ENTITIES


def test_a_device_whose_retained_status_and_states_are_cleared_is_forgotten() -> None:
    view = BoxView()

    async def feed() -> None:
        await view.set_device_status("home", "porch", "online", None)
        await view.set_home_state("porch", "temperature", STATE, live=False)
        await view.set_home_state("porch", "humidity", STATE, live=False)
        await view.set_device_status("home", "porch", None, None)  # an empty retained payload
        assert view.home_devices["porch"].online is None  # its states are still there
        await view.set_home_state("porch", "temperature", None, live=False)
        assert "porch" in view.home_devices
        await view.set_home_state("porch", "humidity", None, live=False)
        await view.set_device_status("mt5", "ea-1", "online", None)
        await view.heartbeat("ea-1")
        await view.set_device_status("mt5", "ea-1", None, None)

    asyncio.run(feed())
    assert "porch" not in view.home_devices and "porch" not in view.home
    assert view.home_entities() == []
    assert "ea-1" not in view.mt5 and "ea-1" not in view._heartbeat_bumped


def test_new_history_tells_live_pages_and_a_chart_no_longer_shown_is_forgotten() -> None:
    view = BoxView()
    chart = [(1.0, 20.0), (2.0, 21.0)]

    async def feed() -> list[int]:
        versions = [view.version]
        view.home_history_at[("box", "temperature")] = 0.0
        await view.set_home_history({("box", "temperature"): chart},
                                    keep={("box", "temperature")})
        versions.append(view.version)
        await view.set_home_history({("box", "temperature"): list(chart)},
                                    keep={("box", "temperature")})  # the same: no news
        versions.append(view.version)
        await view.set_home_history({}, keep=set())
        return versions

    first, added, same = asyncio.run(feed())
    assert added > first and same == added
    assert view.home_history == {} and view.home_history_at == {}


class HomeSensors:
    """The panel as `appliance.panel.home` uses it: its view, and a home-sensors service
    that answers `history` with one reading a call (an odd answer when told to)."""

    def __init__(self) -> None:
        self.view = BoxView()
        self.view.services["home-sensors"] = ServiceSeen(True, None)
        self.asked: list[str] = []
        self.odd = False

    async def ask(self, service: str, command: str, args: dict[str, Any] | None = None) -> Any:
        assert (service, command) == ("home-sensors", "history") and args
        self.asked.append(args["entity"])
        if self.odd:
            return {"points": [["not a time", 1]]}
        return {"points": [[time.time(), 20.0 + len(self.asked), 19.0, 22.0, 3]]}


def test_each_chart_is_asked_for_again_once_it_is_due() -> None:
    panel = HomeSensors()

    async def run() -> None:
        await panel.view.set_home_state("box", "temperature", STATE, live=True)
        await refresh_history(panel)  # type: ignore[arg-type]
        await refresh_history(panel)  # type: ignore[arg-type]  # not due yet: not asked
        assert panel.asked == ["temperature"]
        await panel.view.set_home_state("box", "humidity", STATE, live=True)
        await refresh_history(panel)  # type: ignore[arg-type]  # a new chart: at once
        assert panel.asked == ["temperature", "humidity"]
        panel.view.home_history_at[("box", "temperature")] -= ASK_EVERY_S
        await refresh_history(panel)  # type: ignore[arg-type]
        assert panel.asked == ["temperature", "humidity", "temperature"]

    asyncio.run(run())
    assert set(panel.view.home_history) == {("box", "temperature"), ("box", "humidity")}


def test_the_charts_move_while_the_home_page_is_watched(
        caplog: pytest.LogCaptureFixture) -> None:
    panel = HomeSensors()

    async def run() -> tuple[int, int]:
        await panel.view.set_home_state("box", "temperature", STATE, live=True)
        keeping = asyncio.create_task(keep_charts(panel, tick_s=0.01))  # type: ignore[arg-type]
        try:
            await asyncio.sleep(0.1)
            assert panel.asked == []  # nobody watches
            panel.view.watchers["home"] += 1
            version = panel.view.version
            seen = await panel.view.changed(version, timeout=5)  # the new chart
            panel.odd = True  # a bad answer is logged; the task goes on
            panel.view.home_history_at[("box", "temperature")] -= ASK_EVERY_S
            for _ in range(500):
                if caplog.records:
                    break
                await asyncio.sleep(0.01)
            assert not keeping.done()
            return version, seen
        finally:
            keeping.cancel()

    with caplog.at_level(logging.ERROR, logger="circles.panel"):
        version, seen = asyncio.run(run())
    assert seen > version and panel.asked[0] == "temperature"
    assert "could not be refreshed" in caplog.records[0].getMessage()
