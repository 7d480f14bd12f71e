"""`GET /metrics` for Prometheus (`appliance/panel/metrics.py` says what it holds).

It answers a scraper on the box itself without credentials: a client whose own connection
comes from the loopback address and that no proxy forwarded (a reverse proxy on the box
connects from loopback too, so a forwarded request counts as the client it names, and a
proxy in front must add `X-Forwarded-For`). Anyone else needs an API token of the panel
(`Authorization: Bearer ct_…`; Prometheus: `authorization: {credentials: ct_…}` in the
scrape config), else 401.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST

from appliance.panel.auth import client_address, login_of
from appliance.panel.deps import PanelDep
from appliance.security.permissions import Permission

router = APIRouter(tags=["metrics"], include_in_schema=False)
FORWARDED = ("x-forwarded-for", "forwarded", "x-real-ip")


def from_loopback(request: Request) -> bool:
    """Whether the request comes straight from this machine (not through a proxy)."""
    if any(name in request.headers for name in FORWARDED):
        return False
    address = client_address(request)
    return address is not None and address.is_loopback


def by_token(request: Request) -> bool:
    """Whether the request carries a live API token (a session cookie does not count)."""
    login = login_of(request)
    return login is not None and login.session_id is None and login.restricted is None \
        and login.principal.can(Permission.VIEW)


@router.get("/metrics")
async def metrics(request: Request, panel: PanelDep) -> Response:
    if not (from_loopback(request) or by_token(request)):
        # An answer, not an HTTPException: pages' 401s turn into a redirect to the login.
        return Response("metrics: from this machine, or with an API token "
                        "(Authorization: Bearer ct_…)\n", status.HTTP_401_UNAUTHORIZED,
                        media_type="text/plain", headers={"www-authenticate": "Bearer"})
    await asyncio.to_thread(panel.metrics.count_sessions, panel.logins)
    return Response(panel.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
