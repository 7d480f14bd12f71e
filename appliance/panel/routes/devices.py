"""Devices in the broker (ESP32 nodes, MT5 expert advisors, Home Assistant, observers):
listed with their status and when they were last heard; added by an admin (the password
shown once, an ESP32 node's `config.json` as a QR code, an expert advisor's input values)
and removed (the broker disconnects it at once).

The broker work is `appliance.panel.devices.DeviceAdmin`'s (a broker-admin connection for
each use, the listing kept a few seconds).
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Annotated, Any

import segno
from fastapi import APIRouter, Form, HTTPException, Request, Response, status
from pydantic import BaseModel, Field

from appliance.bus.roles import DEVICE_KINDS
from appliance.panel.deps import DevicesManager, Panel, PanelDep, Viewer
from appliance.panel.devices import DeviceAdmin
from appliance.panel.pages import redirect, render, templates
from appliance.security.devices import Device, DeviceError, esp32_config, mt5_inputs
from appliance.security.permissions import Permission, Principal

api = APIRouter(prefix="/api/v1/devices", tags=["devices"])
pages = APIRouter(prefix="/devices", include_in_schema=False)
KIND_NAMES = {"esp32": "ESP32 node", "mt5": "MT5 expert advisor",
              "homeassistant": "Home Assistant", "observer": "observer (read only)"}


class DeviceBody(BaseModel):
    name: str = Field(min_length=1, max_length=63,
                      description="its username and topic level: a-z, 0-9, '-', '_'")
    kind: str = Field(description=f"one of {', '.join(DEVICE_KINDS)}")


def _admin(panel: Panel) -> DeviceAdmin:
    if panel.devices is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "devices are not managed by this panel")
    return panel.devices


def _refused(exc: DeviceError) -> HTTPException:
    text = str(exc)
    code = (status.HTTP_404_NOT_FOUND if text.startswith("no device")
            else status.HTTP_409_CONFLICT if "already exists" in text
            else status.HTTP_422_UNPROCESSABLE_ENTITY)
    return HTTPException(code, text)


async def _shown(panel: Panel, found: list[Device]) -> list[dict[str, Any]]:
    """`found` kept in the view (for the live list), as rows with what the bus says."""
    await panel.view.set_devices([(d.name, d.kind) for d in found])
    return panel.view.device_rows(panel.view.devices or [])


async def listing(panel: Panel) -> list[dict[str, Any]]:
    """Every device in the broker with its status and when it was last heard."""
    return await _shown(panel, await _admin(panel).listing())


async def add(panel: Panel, by: Principal, name: str, kind: str) -> dict[str, Any]:
    """Add a device; the answer holds its password, shown this once, and what the device
    reads: an ESP32 node's `config.json`, an expert advisor's input values."""
    admin = _admin(panel)
    try:
        # Before the device exists: a bad setting leaves nothing.
        endpoint = await asyncio.to_thread(admin.endpoint)
        device, found = await admin.add(name.strip(), kind, actor=by.actor)
    except DeviceError as exc:
        raise _refused(exc) from None
    await _shown(panel, found)
    made: dict[str, Any] = {
        "name": device.name, "kind": device.kind, "username": device.name,
        "password": device.password,
        "broker": {"host": endpoint.host, "port": endpoint.port, "tls": endpoint.tls}}
    if device.kind == "esp32":
        made["config"] = await asyncio.to_thread(esp32_config, device, endpoint)
    elif device.kind == "mt5":
        made["mt5_inputs"] = mt5_inputs(device, endpoint).replace("\r\n", "\n")
    return made


async def remove(panel: Panel, by: Principal, name: str) -> Device:
    """Remove a device: the broker disconnects it at once and refuses it after."""
    try:
        device, found = await _admin(panel).remove(name, actor=by.actor)
    except DeviceError as exc:
        raise _refused(exc) from None
    await _shown(panel, found)
    return device


def qr_svg(text: str, title: str) -> str | None:
    """An SVG QR code of `text`, sized by the page (a viewBox, no width); None when `text`
    is too long for one."""
    try:
        code = segno.make_qr(text, error="l")
    except segno.DataOverflowError:
        return None
    out = io.BytesIO()
    code.save(out, kind="svg", scale=4, xmldecl=False, svgclass="device-qr", title=title,
              omitsize=True)
    return out.getvalue().decode()


def seen(row: dict[str, Any]) -> str:
    """What the bus said of a device, in words: its status and since when, when it was last
    heard; a kind that never says (Home Assistant, an observer) gets a dash."""
    when = templates.env.filters["when"]
    said = []
    if row["online"] is not None:
        said.append(("online" if row["online"] else "offline")
                    + (f" since {when(row['since'])}" if row["since"] else ""))
    if row["last_seen"]:
        said.append(f"last seen {when(row['last_seen'])}")
    if not said:
        return "not heard from yet" if row["kind"] in ("esp32", "mt5") else "—"
    return " · ".join(said)


def devices_context(panel: Panel) -> dict[str, Any]:
    """The live list: the devices as last listed, with what the bus says of each."""
    rows = panel.view.device_rows(panel.view.devices or [])
    return {"rows": [row | {"seen": seen(row)} for row in rows], "kinds": KIND_NAMES}


# -- API ---------------------------------------------------------------------------------------
@api.get("")
async def devices_api(_: Viewer, panel: PanelDep) -> list[dict[str, Any]]:
    """Every device in the broker: kind, online (None when the device never says: Home
    Assistant, observers), since when, and when it was last heard."""
    return await listing(panel)


@api.post("", status_code=201)
async def device_add_api(body: DeviceBody, by: DevicesManager,
                         panel: PanelDep) -> dict[str, Any]:
    """Add a device; it may connect at once. `password` is in this answer and never again
    (the box keeps it as the secret `mqtt-<name>`); `config` is an ESP32 node's
    `config.json`, `mt5_inputs` an expert advisor's input values. Audit-logged."""
    return await add(panel, by, body.name, body.kind)


@api.delete("/{name}")
async def device_remove_api(name: str, by: DevicesManager, panel: PanelDep) -> dict[str, Any]:
    """Remove a device: disconnected at once, refused after. Audit-logged."""
    device = await remove(panel, by, name)
    return {"removed": device.name, "kind": device.kind}


# -- pages -------------------------------------------------------------------------------------
async def _page(request: Request, user: Principal, panel: Panel, status_code: int = 200,
                *, listed: bool = False, **context: Any) -> Response:
    """The devices page; `listed`: the view holds the listing an add just made."""
    error = context.pop("error", None)
    try:
        if not listed:
            await listing(panel)
    except HTTPException as exc:
        error = error or exc.detail
    return render(request, "devices.html", status_code, **devices_context(panel),
                  manage=user.can(Permission.DEVICES_MANAGE), error=error,
                  kind_choices=DEVICE_KINDS, **context)


@pages.get("")
async def devices_page(request: Request, user: Viewer, panel: PanelDep) -> Response:
    return await _page(request, user, panel)


@pages.post("")
async def device_add_page(request: Request, by: DevicesManager, panel: PanelDep,
                          name: Annotated[str, Form(max_length=63)],
                          kind: Annotated[str, Form(max_length=32)]) -> Response:
    try:
        made = await add(panel, by, name, kind)
    except HTTPException as exc:
        return await _page(request, by, panel, exc.status_code, error=f"Not added: {exc.detail}",
                           asked={"name": name, "kind": kind})
    # The QR code holds the very text shown, which the node's config.json may be a copy of.
    config = json.dumps(made["config"], indent=2) if "config" in made else None
    qr = qr_svg(config, f"config.json of {made['name']}") if config else None
    return await _page(request, by, panel, listed=True, added=made, config=config, qr=qr)


@pages.get("/{name}/remove")
async def remove_confirm_page(request: Request, name: str, _: DevicesManager,
                              panel: PanelDep) -> Response:
    kinds = dict(panel.view.devices or [])
    return render(request, "device_remove.html", device=name,
                  kind=KIND_NAMES.get(kinds.get(name, ""), ""))


@pages.post("/{name}/remove")
async def remove_page(name: str, by: DevicesManager, panel: PanelDep) -> Response:
    try:
        device = await remove(panel, by, name)
    except HTTPException as exc:
        return redirect("/devices", f"Not removed: {exc.detail}")
    return redirect("/devices", f"Device {device.name} ({KIND_NAMES.get(device.kind, device.kind)})"
                                " removed and disconnected.")

