"""Trading: the halt (asked of the risk service, which alone writes it), each account's
equity curve, metrics, per-strategy figures and recent fills (from the trade logger)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from appliance.bus.topics import slug
from appliance.panel.charts import equity_svg
from appliance.panel.deps import Panel, PanelDep, TradingControl, Viewer
from appliance.panel.pages import redirect, render
from appliance.panel.routes.trades import TRADE_LOGGER
from appliance.security.permissions import Principal

api = APIRouter(prefix="/api/v1/trading", tags=["trading"])
pages = APIRouter(prefix="/trading", include_in_schema=False)
RISK = "risk"
MAX_REASON = 200


class HaltBody(BaseModel):
    reason: str = Field("", max_length=MAX_REASON, description="why (goes to the audit log)")


class ResumeBody(BaseModel):
    force: bool = Field(False, description="resume although a loss limit is breached")


async def halt(panel: Panel, by: Principal, reason: str) -> dict[str, Any]:
    """Ask the risk service to halt trading; its answer is the halt in force."""
    result: dict[str, Any] = await panel.ask(RISK, "halt", {"by": by.actor,
                                                           "reason": reason.strip()})
    return result


async def resume(panel: Panel, by: Principal, force: bool) -> dict[str, Any]:
    result: dict[str, Any] = await panel.ask(RISK, "resume", {"by": by.actor, "force": force})
    return result


def _account(panel: Panel, account: str) -> str:
    try:
        name = slug(account)
    except ValueError as exc:
        raise HTTPException(422, f"account: {exc}") from None
    if name not in panel.view.metrics:
        raise HTTPException(404, f"no trade events for account {name!r}")
    return name


async def account_detail(panel: Panel, account: str, points: int = 200,
                         fills: int = 20) -> dict[str, Any]:
    """The account's metrics, equity curve and most recent events, asked at once."""
    account = _account(panel, account)
    args = {"account": account}
    metrics, equity, recent = await asyncio.gather(
        panel.ask(TRADE_LOGGER, "metrics", args),
        panel.ask(TRADE_LOGGER, "equity", args | {"max_points": points}),
        panel.ask(TRADE_LOGGER, "fills", args | {"limit": fills}))
    return {"account": account, "metrics": metrics, "equity": equity, "fills": recent}


@api.get("")
async def trading(_: Viewer, panel: PanelDep) -> dict[str, Any]:
    """The halt, the risk state (figures, limits, breaches) and each account's metrics."""
    return {"halt": panel.view.halt, "risk": panel.view.risk,
            "accounts": {name: m.get("metrics", {}) for name, m in panel.view.metrics.items()}}


@api.get("/accounts/{account}")
async def account(account: str, _: Viewer, panel: PanelDep,
                  points: Annotated[int, Query(ge=2, le=5000)] = 200,
                  fills: Annotated[int, Query(ge=1, le=500)] = 20) -> dict[str, Any]:
    """One account: metrics (docs/metrics.md), equity curve, most recent ledger events."""
    return await account_detail(panel, account, points, fills)


@api.post("/halt")
async def halt_api(body: HaltBody, by: TradingControl, panel: PanelDep) -> dict[str, Any]:
    """Halt trading: every order path stops opening positions. Audit-logged by the risk
    service with who asked and why."""
    return await halt(panel, by, body.reason)


@api.post("/resume")
async def resume_api(body: ResumeBody, by: TradingControl, panel: PanelDep) -> dict[str, Any]:
    """Lift the halt; refused while a limit is breached unless `force` (losses only)."""
    return await resume(panel, by, body.force)


# -- pages -------------------------------------------------------------------------------------
@pages.get("")
async def trading_page(request: Request, _: Viewer, panel: PanelDep,
                       account: str | None = None) -> Response:
    accounts = sorted(panel.view.metrics)
    chosen = account if account in accounts else (accounts[0] if accounts else None)
    detail, error = None, None
    if chosen:
        try:
            detail = await account_detail(panel, chosen)
        except HTTPException as exc:
            error = exc.detail
    chart = equity_svg(detail["equity"] if detail else [], label=f"equity of {chosen}")
    return render(request, "trading.html", d=panel.view.dashboard(), accounts=accounts,
                  chosen=chosen, detail=detail, error=error, chart=chart, risk=panel.view.risk)


@pages.get("/{action}")
async def confirm_page(request: Request, action: str, _: TradingControl,
                       panel: PanelDep) -> Response:
    if action not in ("halt", "resume"):
        raise HTTPException(404, "no such page")
    return render(request, "confirm.html", action=action, d=panel.view.dashboard())


@pages.post("/halt")
async def halt_submit(request: Request, by: TradingControl, panel: PanelDep,
                      reason: Annotated[str, Form(max_length=MAX_REASON)] = "") -> Response:
    try:
        answer = await halt(panel, by, reason)
    except HTTPException as exc:
        return render(request, "confirm.html", exc.status_code, action="halt",
                      d=panel.view.dashboard(), error=exc.detail)
    already = "" if answer.get("changed", True) else " (it already was)"
    return redirect("/trading", f"Risk service: trading halted{already} by {answer.get('by')}"
                                f" — {answer.get('reason')}")


@pages.post("/resume")
async def resume_submit(request: Request, by: TradingControl, panel: PanelDep,
                        force: Annotated[bool, Form()] = False) -> Response:
    try:
        await resume(panel, by, force)
    except HTTPException as exc:
        return render(request, "confirm.html", exc.status_code, action="resume",
                      d=panel.view.dashboard(), error=exc.detail)
    return redirect("/trading", "Risk service: trading resumed.")
