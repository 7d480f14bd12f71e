"""The panel's FastAPI app factory. The `panel` service gives it everything it uses (the
bus, the users, the sessions, the view of the box); nothing is created at import time."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.bus.trade_event import MAX_EVENT_BYTES
from appliance.panel.auth import PanelMiddleware, csrf_protect, login_of
from appliance.panel.deps import Panel
from appliance.panel.metrics import RequestMetrics
from appliance.panel.pages import render
from appliance.panel.routes import (
    account,
    app_shell,
    dashboard,
    devices,
    docs,
    files,
    home,
    ledger,
    login,
    logs,
    prometheus,
    trades,
    trading,
    trust,
)

STATIC = Path(__file__).with_name("static")
ROUTERS = (login.router, dashboard.api, dashboard.pages, trading.api, trading.pages, ledger.api,
           ledger.pages, account.api, account.pages, trades.router, docs.router, trust.router,
           app_shell.router, prometheus.router, home.api, home.pages, devices.api, devices.pages,
           logs.api, logs.pages, files.api, files.pages, files.uploads)
# The largest request body the app takes, checked as it comes (a body declared larger is
# refused before any of it is read, also before a form's CSRF field is looked for): a full
# batch of trade events. Only the uploads of files may be larger (panel.max_upload_mb).
MAX_BODY = MAX_EVENT_BYTES * trades.MAX_EVENTS


class CachedStatic(StaticFiles):
    """Assets change only with a new release: a phone may keep them a day."""

    async def get_response(self, path: str, scope: dict) -> Response:  # type: ignore[override]
        response = await super().get_response(path, scope)
        response.headers["cache-control"] = "public, max-age=86400"
        return response


def create_app(panel: Panel) -> FastAPI:
    app = FastAPI(title="Circles", summary="The control panel's API: session or bearer token.",
                  docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(csrf_protect)], max_body_size=MAX_BODY)
    app.state.panel = panel
    uploads = panel.files.max_body if panel.files else None
    for router in ROUTERS:
        app.include_router(router, max_body_size=uploads if router is files.uploads else None)
    app.mount("/static", CachedStatic(directory=STATIC), name="static")
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_middleware(PanelMiddleware, logins=panel.logins, tls=panel.tls)
    app.add_middleware(RequestMetrics, metrics=panel.metrics)  # outermost: it times it all
    panel.metrics.follow(panel.view)
    return app


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """The API answers JSON; a page sends the person where they can go on."""
    path, login = request.url.path, login_of(request)
    restricted = exc.status_code == 401 and login is not None and login.restricted
    if path.startswith("/api/") and path != "/api/docs":
        if restricted:
            exc = HTTPException(401, f"finish this first, on the panel's account page: "
                                     f"{login.restricted}")  # type: ignore[union-attr]
        return await http_exception_handler(request, exc)
    if exc.status_code == 401:
        if restricted:
            return RedirectResponse("/account", status_code=303)
        return RedirectResponse(f"/login?next={quote(path)}", status_code=303)
    return render(request, "error.html", exc.status_code, detail=exc.detail)


async def _invalid(request: Request, exc: RequestValidationError) -> Response:
    """422 naming each field that is wrong and why, never echoing what was sent: a body
    with a misspelt field may hold an exchange secret or a password."""
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)
