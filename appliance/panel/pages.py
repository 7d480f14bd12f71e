"""Server-rendered pages: the templates, a flash message across a redirect, and what every
page is given (who is logged in, the CSRF token, the navigation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from fastapi.templating import Jinja2Templates

from appliance.panel.auth import login_of
from appliance.panel.charts import money
from appliance.panel.sessions import csrf_for

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["money"] = money
templates.env.filters["when"] = lambda ts: (ts or "")[:19].replace("T", " ")
FLASH_COOKIE = "circles_flash"
NAV = [("/", "Dashboard"), ("/trading", "Trading"), ("/ledger", "Ledger"),
       ("/account", "Account")]


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    login = login_of(request)
    flash = unquote(request.cookies.get(FLASH_COOKIE, "")) or None
    response = templates.TemplateResponse(request, name, {
        "login": login, "user": getattr(request.state, "principal", None),
        "csrf": csrf_for(login.secret) if login and login.session_id else "",
        "nav": NAV, "path": request.url.path, "flash": flash, **context},
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
