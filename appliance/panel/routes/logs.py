"""Logs: the recent lines of each service, every line of one request id across services,
filtered by level, and a live tail (Server-Sent Events, as the dashboard's live parts).

The lines come from the panel's log source (`appliance/panel/logs.py`): the journal under
systemd, else the JSON lines files of `circles up`. The page works without script; with
it, "Live" adds each new line that matches the filters to the top of the list.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from appliance.errors import TemporaryError
from appliance.panel.auth import login_of
from appliance.panel.deps import Panel, PanelDep, Viewer
from appliance.panel.logs import (
    DEFAULT_LIMIT,
    LEVELS,
    MAX_LIMIT,
    LogLine,
    LogQuery,
    LogSource,
    TooManyTails,
    parse_level,
)
from appliance.panel.pages import render, templates
from appliance.panel.routes.dashboard import KEEPALIVE_S, event_stream, sse, watching

api = APIRouter(prefix="/api/v1", tags=["logs"])
pages = APIRouter(prefix="/logs", include_in_schema=False)
CHECK_S = 2.0  # how often a live tail asks whether its login still holds
MAX_SHOWN = 300  # characters of a line's extra fields on the page

ServiceQ = Annotated[str | None, Query(description="one service (e.g. risk); all if empty")]
LevelQ = Annotated[str | None, Query(description="at or above: DEBUG, INFO, WARN, ERROR")]
RequestQ = Annotated[str | None, Query(description="every line of this request id")]
LimitQ = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="at most this many lines")]


def _source(panel: Panel) -> LogSource:
    if panel.logs is None:
        raise HTTPException(503, "this panel reads no logs")
    return panel.logs


def _query(service: str | None, level: str | None, request_id: str | None,
           limit: int = DEFAULT_LIMIT) -> LogQuery:
    """The filters as given (an empty one is no filter); 422 naming a bad one."""
    try:
        return LogQuery(service=(service or "").strip() or None, level=parse_level(level),
                        request_id=(request_id or "").strip() or None, limit=limit)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def shown(line: LogLine) -> dict[str, Any]:
    """A line as the page lists it: a short time, and the extra fields as `key=value`."""
    ts = line.timestamp or ""
    parts = []
    for key, value in line.extra.items():
        text = value if isinstance(value, str) else repr(value)
        if key == "exception":  # the traceback's last line says what went wrong
            text = text.strip().splitlines()[-1] if text.strip() else text
        parts.append(f"{key}={text[:120]}")
    extra = " ".join(parts)
    return {"timestamp": ts, "time": f"{ts[5:10]} {ts[11:23]}" if len(ts) >= 19 else ts,
            "service": line.service, "level": line.log_level, "message": line.message,
            "request_id": line.request_id,
            "extra": extra if len(extra) <= MAX_SHOWN else extra[:MAX_SHOWN - 1] + "…"}


@api.get("/logs")
async def logs(_: Viewer, panel: PanelDep, service: ServiceQ = None, level: LevelQ = None,
               request_id: RequestQ = None, limit: LimitQ = DEFAULT_LIMIT) -> dict[str, Any]:
    """The services' log lines, newest first, as records of the JSON log schema: the most
    recent of one service or of all, at or above a level, or every line of one request id
    across services. `source` says where they were read: `journal` or `files`."""
    source = _source(panel)
    try:
        lines = await source.recent(_query(service, level, request_id, limit))
    except TemporaryError as exc:
        raise HTTPException(503, f"logs: {exc}") from None
    return {"source": source.name, "lines": [line.record() for line in lines]}


@pages.get("")
async def logs_page(request: Request, _: Viewer, panel: PanelDep, service: str | None = None,
                    level: str | None = None, request_id: str | None = None,
                    limit: LimitQ = DEFAULT_LIMIT) -> Response:
    source = _source(panel)
    query = _query(service, level, request_id, limit)
    error, lines, known = None, [], set(panel.view.services)
    try:
        lines = await source.recent(query)
        known.update(await source.services())
    except TemporaryError as exc:
        error = f"The logs cannot be read now: {exc}"
    filters = {"service": query.service, "level": query.level, "request_id": query.request_id}
    given = urlencode({k: v for k, v in filters.items() if v})
    return render(request, "logs.html", q=query, lines=[shown(line) for line in lines],
                  services=sorted(known | ({query.service} if query.service else set())),
                  levels=LEVELS, source=source.name, error=error,
                  tail="/logs/live" + (f"?{given}" if given else ""))


@pages.get("/live")
async def logs_live(request: Request, _: Viewer, panel: PanelDep, service: str | None = None,
                    level: str | None = None,
                    request_id: str | None = None) -> StreamingResponse:
    """Each new line that matches the filters, as the page's list item (event `line`),
    until the page goes or its login ends. The event `ready` says that the stream follows:
    any line logged from then on comes. 429 when the source follows as many as it may."""
    source = _source(panel)
    query = _query(service, level, request_id)
    login = login_of(request)
    assert login is not None  # Viewer passed
    template = templates.get_template("_log_line.html")
    try:
        tail = source.tail(query)
    except TooManyTails as exc:
        raise HTTPException(429, str(exc)) from None

    async def events() -> AsyncIterator[str]:
        checked = sent = time.monotonic()
        ready = False
        async with contextlib.aclosing(tail) as batches:
            async for batch in batches:
                if not ready:  # the first batch comes once the source follows
                    ready = True
                    yield sse("ready", "following")
                for line in batch:
                    yield sse("line", template.render(line=shown(line)))
                now = time.monotonic()
                if batch:
                    sent = now
                elif now - sent >= KEEPALIVE_S:
                    sent = now
                    yield ": keepalive\n\n"
                if now - checked >= CHECK_S:
                    if not await watching(request, panel, login):
                        return
                    checked = now

    return event_stream(events())
