"""The home: every sensor's value live, grouped by room; a switch for each relay and dimmer;
each sensor's last 24 hours as a small chart.

Values come from the bus (each entity's retained state, each device's status), labels and
rooms from the home-sensors service (`devices`), charts from its history (`history`), as
`appliance/panel/home.py` asks for them. A switch publishes the command on the entity's
`set` topic and shows nothing new until the device reports the state it took: the panel
never guesses one.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from appliance.bus import registry
from appliance.panel.charts import SPARK_HEIGHT, line_svg
from appliance.panel.deps import DevicesOperate, Panel, PanelDep, Viewer
from appliance.panel.home import (
    DAY_S,
    HOME_SENSORS,
    charted,
    refresh_catalog,
    refresh_history,
)
from appliance.panel.pages import redirect, render
from appliance.panel.view import OTHER_ROOM
from appliance.security import audit as events
from appliance.security.permissions import Principal

api = APIRouter(prefix="/api/v1/home", tags=["home"])
pages = APIRouter(prefix="/home", include_in_schema=False)
DIMMER_LEVELS = (0, 25, 50, 75, 100)
# How a two-state entity's ON/OFF reads, by kind.
WORDS = {"contact": ("Open", "Closed"), "motion": ("Motion", "Clear")}
# Strict: JSON true stays a bool (ON), not the number 1, and "40" stays a string.
Command = StrictBool | StrictInt | StrictFloat | StrictStr


class SwitchBody(BaseModel):
    command: Command = Field(
        description='"ON", "OFF" or "TOGGLE" (true and false: ON and OFF); a dimmer also '
                    "takes a brightness 0-100")


def number(value: float) -> str:
    return f"{value:,.1f}".removesuffix(".0")


def on_off(value: Any) -> bool | None:
    """A two-state value: True for ON, False for OFF (any case), None for anything else."""
    if isinstance(value, str) and value.strip().upper() in ("ON", "OFF"):
        return value.strip().upper() == "ON"
    return None


def shown(entity: dict[str, Any]) -> str:
    """An entity's value as people read it."""
    value, unit = entity["value"], entity.get("unit")
    if value is None:
        return "–"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{number(value)} {unit}" if unit else number(value)
    if (state := on_off(value)) is not None:
        on, off = WORDS.get(entity.get("kind") or "", ("On", "Off"))
        return on if state else off
    return str(value)


def _chart(panel: Panel, entity: dict[str, Any], now: float) -> str | None:
    if not charted(entity):
        return None
    unit = entity.get("unit")
    return line_svg(panel.view.home_history.get((entity["device"], entity["entity"]), []),
                    label=f"{entity['label']}, last 24 hours", empty="no history yet",
                    height=SPARK_HEIGHT, span=(now - DAY_S, now), kind="chart spark",
                    fmt=lambda v: f"{number(v)} {unit}" if unit else number(v))


def home_context(panel: Panel) -> dict[str, Any]:
    """The home page's live part: rooms in the order configured ("Other" last), each with
    its entities, their values as people read them and their charts."""
    now = time.time()
    rooms: dict[str, list[dict[str, Any]]] = {}
    for entity in panel.view.home_entities():
        rooms.setdefault(entity["room"], []).append(
            entity | {"shown": shown(entity), "is_on": on_off(entity["value"]) is True,
                      "chart": _chart(panel, entity, now)})
    if OTHER_ROOM in rooms:
        rooms[OTHER_ROOM] = rooms.pop(OTHER_ROOM)
    return {"rooms": list(rooms.items()), "levels": DIMMER_LEVELS}


def command_for(kind: str | None, command: Command) -> str:
    """The `set` payload for an entity of `kind` (as the home-sensors service parses it);
    422 when that kind would refuse it."""
    if isinstance(command, bool):
        word = "ON" if command else "OFF"
    elif isinstance(command, int | float):
        word = f"{command:g}"
    else:
        word = command.strip().upper()
    if word in ("ON", "OFF") or (word == "TOGGLE" and kind != "pwm"):
        return word
    if kind == "pwm":
        try:
            level = float(word)
        except ValueError:
            level = -1.0
        if 0 <= level <= 100:
            return f"{round(level)}"
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                            f"a dimmer takes ON, OFF or a brightness 0-100, not {command!r}")
    raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                        f"a switch takes ON, OFF or TOGGLE, not {command!r}")


async def switch(panel: Panel, by: Principal, device: str, entity: str,
                 command: Command) -> dict[str, Any]:
    """Publish a command on a writable entity's `set` topic, audit-logged. The state it
    leads to is what the device reports next, on the entity's state topic."""
    error = await refresh_catalog(panel)
    info = next((e for e in panel.view.home_entities()
                 if e["device"] == device and e["entity"] == entity), None)
    if error and (info is None or info["kind"] is None):  # what it is, only home-sensors knows
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, error)
    if info is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no home entity {device}/{entity}")
    if not info["writable"]:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"{info['label']} takes no commands from the panel")
    payload = command_for(info["kind"], command)
    await panel.bus.send(registry.HOME_SET, payload, device=device, entity=entity)
    await asyncio.to_thread(panel.audit.record, events.DEVICE_SWITCH, actor=by.actor,
                            target=f"{device}/{entity}", command=payload)
    return {"device": device, "entity": entity, "label": info["label"], "command": payload}


# -- API ---------------------------------------------------------------------------------------
@api.get("")
async def home(_: Viewer, panel: PanelDep) -> dict[str, Any]:
    """Every home entity: label, room, kind, unit, whether it takes commands, its value and
    when its device reported it, whether the device is online (null: it never said)."""
    error = await refresh_catalog(panel)
    return {"entities": panel.view.home_entities(), "error": error}


@api.post("/{device}/{entity}", status_code=202)
async def switch_api(device: str, entity: str, body: SwitchBody, by: DevicesOperate,
                     panel: PanelDep) -> dict[str, Any]:
    """Send a relay or dimmer a command. Accepted is all this says: the state it took
    shows in `GET /api/v1/home` once the device reports it. Audit-logged."""
    return await switch(panel, by, device, entity, body.command)


@api.get("/{device}/{entity}/history")
async def history(device: str, entity: str, _: Viewer, panel: PanelDep,
                  hours: Annotated[float, Query(gt=0, le=24 * 366)] = 24,
                  points: Annotated[int, Query(ge=1, le=5000)] = 500) -> dict[str, Any]:
    """An entity's readings over the last `hours`, from the home-sensors' history: means
    over equal steps (`step_s`), each `[start (epoch s), mean, min, max, readings]`; ON/OFF
    count as 1/0."""
    answer: dict[str, Any] = await panel.ask(HOME_SENSORS, "history", {
        "device": device, "entity": entity, "hours": hours, "max_points": points})
    return answer


# -- pages -------------------------------------------------------------------------------------
@pages.get("")
async def home_page(request: Request, _: Viewer, panel: PanelDep) -> Response:
    error = await refresh_catalog(panel)
    await refresh_history(panel)
    return render(request, "home.html", error=error, **home_context(panel))


@pages.post("/{device}/{entity}/set")
async def switch_page(device: str, entity: str, by: DevicesOperate, panel: PanelDep,
                      command: Annotated[str, Form(max_length=32)]) -> Response:
    try:
        sent = await switch(panel, by, device, entity, command)
    except HTTPException as exc:
        return redirect("/home", f"Not sent: {exc.detail}")
    return redirect("/home", f"Sent {sent['command']} to {sent['label']}; its state shows "
                             "here when it reports back.")
