"""The API's description, for logged-in people and tokens: the OpenAPI document and the
page at /api/docs (Swagger UI from the `swagger-ui-bundle` package, served by the box, no
CDN, started by a script file since the CSP allows no inline script)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from appliance.panel.deps import Viewer
from appliance.panel.pages import templates

router = APIRouter(include_in_schema=False)
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}


@router.get("/api/openapi.json")
async def openapi(request: Request, _: Viewer) -> dict[str, Any]:
    return request.app.openapi()  # type: ignore[no-any-return]


@router.get("/api/docs/assets/{name}")
async def asset(name: str) -> FileResponse:
    """The two files of the package the page needs (not its demo page)."""
    if name not in ASSETS:
        raise HTTPException(404, "no such asset")
    return FileResponse(Path(swagger_ui_path) / name, media_type=ASSETS[name],
                        headers={"cache-control": "public, max-age=86400"})


@router.get("/api/docs")
async def docs(request: Request, _: Viewer) -> Response:
    return templates.TemplateResponse(request, "docs.html", {})
