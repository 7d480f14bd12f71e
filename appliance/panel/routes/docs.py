"""The API's description, for logged-in people and tokens: the OpenAPI document and the
page at /api/docs (Swagger UI from the `swagger-ui-bundle` package, served by the box, no
CDN, started by a script file since the CSP allows no inline script)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from appliance.panel.deps import Viewer
from appliance.panel.pages import templates

router = APIRouter(include_in_schema=False)


@router.get("/api/openapi.json")
async def openapi(request: Request, _: Viewer) -> dict[str, Any]:
    return request.app.openapi()  # type: ignore[no-any-return]


@router.get("/api/docs")
async def docs(request: Request, _: Viewer) -> Response:
    return templates.TemplateResponse(request, "docs.html", {})
