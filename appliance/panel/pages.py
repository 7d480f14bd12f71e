"""Server-rendered pages: the templates, a flash message across a redirect, and what every
page is given (who is logged in, the CSRF token, the navigation)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from fastapi.templating import Jinja2Templates

from appliance.bus.payloads import epoch
from appliance.panel.auth import login_of
from appliance.panel.charts import money
from appliance.panel.sessions import csrf_for
from appliance.security.permissions import Permission

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["money"] = money
templates.env.filters["when"] = lambda ts: (ts or "")[:19].replace("T", " ")


def ago(ts: str | None) -> str:
    """How long ago `ts` (ISO 8601) was, as people say it: "just now", "5 min ago", "3 h
    ago", "2 days ago"; "never" for None."""
    when = epoch(ts)
    if when is None:
        return "never"
    seconds = max(0.0, time.time() - when)
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if unit == 'day' and count > 1 else ''} ago"
    return "just now"


templates.env.filters["ago"] = ago
FLASH_COOKIE = "circles_flash"
# The tab bar: five tabs fit a phone; each is current on the pages it lists.
NAV = [("/", "Dashboard", ("/",)), ("/home", "Home", ("/home",)),
       ("/trading", "Trading", ("/trading",)), ("/logs", "Logs", ("/logs",)),
       ("/more", "More", ("/more", "/devices", "/files", "/ledger", "/account", "/api/docs"))]
# What "More" lists: (path, label, what it is for, the permission it needs or None).
MORE = [("/devices", "Devices", "ESP32 nodes, MT5 expert advisors: add, remove, online", None),
        ("/files", "Files", "the box's shared files: upload, download, share a link", None),
        ("/ledger", "Ledger", "the hash-chained journal: verify, export, ingest keys", None),
        ("/trading/settings", "Trading settings", "exchange keys, paper or live",
         Permission.SECRETS_MANAGE),
        ("/account", "Account", "password, authenticator, sessions, API tokens", None),
        ("/api/docs", "API", "the JSON API for scripts", None)]


def current_tab(path: str) -> str:
    """The tab whose pages include `path` (the longest match)."""
    matches = [(len(prefix), href) for href, _, prefixes in NAV for prefix in prefixes
               if path == prefix or (prefix != "/" and path.startswith(prefix + "/"))]
    return max(matches, default=(0, ""))[1]


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    login = login_of(request)
    flash = unquote(request.cookies.get(FLASH_COOKIE, "")) or None
    response = templates.TemplateResponse(request, name, {
        "login": login, "user": getattr(request.state, "principal", None),
        "csrf": csrf_for(login.secret) if login and login.session_id else "",
        "nav": NAV, "tab": current_tab(request.url.path), "path": request.url.path,
        "flash": flash, **context},
        status_code=status_code)
    if flash:
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


def redirect(to: str, flash: str | None = None) -> RedirectResponse:
    """303 to `to`, with a message the next page shows once."""
    response = RedirectResponse(to, status_code=303)
    if flash:
        response.set_cookie(FLASH_COOKIE, quote(flash[:300], safe=" :,.()'-/"), max_age=60,
                            httponly=True, samesite="strict", path="/")
    return response
