"""The panel as an installable app: the web manifest ("Add to Home Screen" gives an app
icon that opens the panel without the browser's bars), the service worker, and the page it
shows when the box is unreachable.

All three are public: a phone fetches the manifest and the worker without cookies, and the
offline page holds nothing of anyone. The service worker keeps only the offline page and
the files it needs (`SHELL`), fetched without cookies; pages and API answers are never
kept, so a phone holds no stale private data. It is served from the root so that its
scope is the whole panel, with a version derived from the shell's files: a release that
changes any of them installs a new worker, which replaces the old cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from appliance.panel.pages import templates

router = APIRouter(tags=["app"], include_in_schema=False)
HERE = Path(__file__).parents[1]
STATIC, TEMPLATES = HERE / "static", HERE / "templates"
OFFLINE = "/offline"
# What the service worker keeps: the offline page and what it loads.
SHELL = (OFFLINE, "/static/panel.css", "/static/offline.js", "/static/icon.svg",
         "/static/icon-192.png", "/static/icon-512.png", "/static/icon-maskable-512.png",
         "/static/apple-touch-icon.png")
REVALIDATE = {"cache-control": "no-cache"}
# The colours of static/panel.css (light): the page's background, the header's.
BACKGROUND, THEME = "#f4f6f8", "#ffffff"

MANIFEST: dict[str, Any] = {
    "id": "/",
    "name": "Circles",
    "short_name": "Circles",
    "description": "The box's control panel: services, trading, ledger, home.",
    "lang": "en",
    "start_url": "/",
    "scope": "/",
    "display": "standalone",
    "background_color": BACKGROUND,
    "theme_color": THEME,
    "icons": [
        {"src": "/static/icon-192.png", "sizes": "192x192", "type": "image/png",
         "purpose": "any"},
        {"src": "/static/icon-512.png", "sizes": "512x512", "type": "image/png",
         "purpose": "any"},
        {"src": "/static/icon-maskable-512.png", "sizes": "512x512", "type": "image/png",
         "purpose": "maskable"},
        {"src": "/static/icon.svg", "sizes": "any", "type": "image/svg+xml", "purpose": "any"},
    ],
}


@functools.cache
def worker_script() -> str:
    """static/sw.js with its version and shell filled in."""
    digest = hashlib.sha256()
    for path in (STATIC / "sw.js", TEMPLATES / "offline.html",
                 *(STATIC / url.removeprefix("/static/") for url in SHELL if url != OFFLINE)):
        digest.update(path.read_bytes())
    script = (STATIC / "sw.js").read_text()
    return script.replace('"{{ version }}"', json.dumps(f"circles-{digest.hexdigest()[:12]}")) \
        .replace("{{ shell }}", json.dumps(list(SHELL)))


@router.get("/manifest.webmanifest")
async def manifest() -> JSONResponse:
    return JSONResponse(MANIFEST, media_type="application/manifest+json", headers=REVALIDATE)


@router.get("/sw.js")
async def service_worker() -> Response:
    return Response(worker_script(), media_type="text/javascript", headers=REVALIDATE)


@router.api_route(OFFLINE, methods=["GET", "HEAD"])  # HEAD: the offline page asks if the box is back
async def offline(request: Request) -> Response:
    return templates.TemplateResponse(request, "offline.html", {}, headers=REVALIDATE)
