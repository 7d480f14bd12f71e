"""The dashboard: services, health, trading running or halted, today's PnL; live.

Live pages hold a Server-Sent Events stream (`/live/<part>`) whose every event is the part
rendered again as HTML; `static/panel.js` swaps it in. Without script the page still shows
the state as of its loading.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse

from appliance.panel.auth import login_of
from appliance.panel.deps import Panel, PanelDep, Viewer
from appliance.panel.pages import MORE, render, templates
from appliance.panel.routes.devices import devices_context
from appliance.panel.routes.home import home_context
from appliance.panel.sessions import Login, csrf_for

api = APIRouter(prefix="/api/v1", tags=["dashboard"])
pages = APIRouter(include_in_schema=False)
KEEPALIVE_S = 15.0
MIN_GAP_S = 0.25  # at most four updates a second, however busy the bus


@api.get("/dashboard")
async def dashboard(_: Viewer, panel: PanelDep) -> dict[str, Any]:
    """Services online/offline and since when, health, the trading halt, today's PnL."""
    return panel.view.dashboard()


@pages.get("/")
async def dashboard_page(request: Request, _: Viewer, panel: PanelDep) -> Response:
    return render(request, "dashboard.html", d=panel.view.dashboard())


@pages.get("/more")
async def more_page(request: Request, by: Viewer) -> Response:
    """The pages the tab bar has no room for, as far as the person may use them."""
    links = [(href, label, what) for href, label, what, permission in MORE
             if permission is None or by.can(permission)]
    return render(request, "more.html", links=links)


# The parts a live page may stream: a template and what it is given.
PARTS: dict[str, tuple[str, Callable[[PanelDep], dict[str, Any]]]] = {
    "dashboard": ("_dashboard.html", lambda panel: {"d": panel.view.dashboard()}),
    "halt": ("_halt.html", lambda panel: {"d": panel.view.dashboard()}),
    "home": ("_home.html", home_context),
    "devices": ("_devices.html", devices_context),
}


def sse(event: str, text: str) -> str:
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in text.splitlines()) + "\n"


async def watching(request: Request, panel: Panel, login: Login) -> bool:
    """Whether a live stream goes on: its page is still open, and its login still holds (not
    logged out, revoked, expired or demoted)."""
    return not await request.is_disconnected() and await asyncio.to_thread(
        panel.logins.still, login)


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


@pages.get("/live/{part}")
async def live(part: str, request: Request, _: Viewer, panel: PanelDep) -> StreamingResponse:
    if part not in PARTS:
        raise HTTPException(404, f"no live part {part!r}")
    name, context = PARTS[part]
    template = templates.get_template(name)

    login = login_of(request)
    assert login is not None  # Viewer passed

    async def events() -> AsyncIterator[str]:
        version = -1
        panel.view.watchers[part] += 1  # the home page's charts are kept fresh while watched
        try:
            while await watching(request, panel, login):
                seen = await panel.view.changed(version, KEEPALIVE_S)
                if seen == version:
                    yield ": keepalive\n\n"
                    continue
                version = seen
                # The page's own forms come back with the part (a switch, a remove link).
                yield sse(part, template.render(
                    request=request, user=login.principal,
                    csrf=csrf_for(login.secret) if login.session_id else "", **context(panel)))
                await asyncio.sleep(MIN_GAP_S)
        finally:
            panel.view.watchers[part] -= 1

    return event_stream(events())
