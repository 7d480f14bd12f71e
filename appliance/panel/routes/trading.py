"""Trading: the halt (asked of the risk service, which alone writes it), halt and flatten,
each account's open positions and orders (from the execution service's retained topics),
equity curve, metrics, per-strategy figures and recent fills (from the trade logger); and
the trading settings (admins): each account's exchange API keys, and paper or live.

Storing keys and switching an account's mode ask for the person's authenticator code again
(step-up, `stepup.py`), show a warning first and are audit-logged: the keys by the secret
store (`secret.write`, the name only), the switch as `trading.mode`. A key is never shown
again, only whether it is stored and since when.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field, SecretStr

from appliance.bus.topics import slug
from appliance.panel.charts import equity_svg
from appliance.panel.deps import (
    Panel,
    PanelDep,
    SecretsManager,
    SessionLogin,
    TradingControl,
    Viewer,
)
from appliance.panel.pages import redirect, render
from appliance.panel.routes.trades import TRADE_LOGGER
from appliance.panel.sessions import Login
from appliance.panel.stepup import step_up
from appliance.security import audit as events
from appliance.security.permissions import Principal
from appliance.trading_secrets import exchange_secret_names

api = APIRouter(prefix="/api/v1/trading", tags=["trading"])
pages = APIRouter(prefix="/trading", include_in_schema=False)
RISK = "risk"
EXECUTION = "execution"  # the box runs one execution service, for one account
MAX_REASON = 200
MAX_KEY = 512
Mode = Literal["paper", "live"]
CONFIRM_ACTIONS = ("halt", "resume", "flatten")


class HaltBody(BaseModel):  # also the body of a flatten
    reason: str = Field("", max_length=MAX_REASON, description="why (goes to the audit log)")


class ResumeBody(BaseModel):
    force: bool = Field(False, description="resume although a loss limit is breached")


class KeysBody(BaseModel):
    api_key: SecretStr = Field(description="the exchange's API key (trading, no withdrawals)")
    secret: SecretStr = Field(description="the exchange's API secret")
    totp: str = Field("", max_length=32, description="a current code of your authenticator")


class ModeBody(BaseModel):
    mode: Mode
    totp: str = Field("", max_length=32, description="a current code of your authenticator")


async def halt(panel: Panel, by: Principal, reason: str) -> dict[str, Any]:
    """Ask the risk service to halt trading; its answer is the halt in force."""
    result: dict[str, Any] = await panel.ask(RISK, "halt", {"by": by.actor,
                                                           "reason": reason.strip()})
    return result


async def resume(panel: Panel, by: Principal, force: bool) -> dict[str, Any]:
    result: dict[str, Any] = await panel.ask(RISK, "resume", {"by": by.actor, "force": force})
    return result


async def flatten(panel: Panel, by: Principal, reason: str) -> dict[str, Any]:
    """Ask the risk service to halt trading and have every position closed; its answer (the
    halt, and the execution service's closing orders). Audit-logged by the risk service."""
    result: dict[str, Any] = await panel.ask(RISK, "flatten", {"by": by.actor,
                                                              "reason": reason.strip()})
    return result


def _account(panel: Panel, account: str) -> str:
    name = _slug(account)
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


def books(panel: Panel) -> list[dict[str, Any]]:
    """Each execution account's mode, open positions (qty, average price, mark, unrealised
    PnL) and open orders, as last published."""
    view = panel.view
    out = []
    for account in view.execution_accounts():
        positions, orders = view.positions.get(account) or {}, view.orders.get(account) or {}
        out.append({"account": account, "mode": positions.get("mode") or orders.get("mode"),
                    "positions": [p for p in positions.get("positions", []) if p.get("qty")],
                    "orders": orders.get("orders", []),
                    "ts": positions.get("ts") or orders.get("ts")})
    return out


@api.get("")
async def trading(_: Viewer, panel: PanelDep) -> dict[str, Any]:
    """The halt, the risk state (figures, limits, breaches), each account's metrics, and each
    execution account's mode, open positions and open orders."""
    return {"halt": panel.view.halt, "risk": panel.view.risk,
            "accounts": {name: m.get("metrics", {}) for name, m in panel.view.metrics.items()},
            "execution": books(panel)}


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


@api.post("/flatten")
async def flatten_api(body: HaltBody, by: TradingControl, panel: PanelDep) -> dict[str, Any]:
    """Halt and flatten: the risk service halts trading, then the execution service cancels
    every open order and closes every position with a market order. The answer: the halt
    and the closing orders. Audit-logged by the risk service."""
    return await flatten(panel, by, body.reason)


# -- the trading settings: exchange keys, paper or live -------------------------------------------
def _slug(account: str) -> str:
    try:
        return slug(account)
    except ValueError as exc:
        raise HTTPException(422, f"account: {exc}") from None


def keys_status(panel: Panel, account: str) -> dict[str, Any]:
    """Whether the account's API key and secret are in the secret store, and since when;
    never their values."""
    found: dict[str, Any] = {"names": list(exchange_secret_names(account))}
    for what, name in zip(("api_key", "secret"), found["names"], strict=True):
        try:
            stored = panel.secrets.path(name).stat().st_mtime if panel.secrets else None
        except FileNotFoundError:
            stored = None
        found[f"{what}_set_at"] = None if stored is None else \
            datetime.fromtimestamp(stored, UTC).isoformat(timespec="seconds")
    found["set"] = bool(found["api_key_set_at"] and found["secret_set_at"])
    return found


async def execution_state(panel: Panel) -> dict[str, Any]:
    """What the box's execution service says of itself: its account and the mode in force."""
    answer: dict[str, Any] = await panel.ask(EXECUTION, "positions")
    return answer


async def settings_of(panel: Panel) -> dict[str, Any]:
    """Each account's mode and keys; which account the box's execution service trades (the
    one whose mode can be switched), or why it is not known."""
    served, error = None, None
    try:
        served = _slug((await execution_state(panel))["account"])
    except HTTPException as exc:
        error = exc.detail
    modes = {b["account"]: b["mode"] for b in books(panel)}
    names = sorted(set(modes) - {served})
    accounts = [{"account": name, "mode": modes.get(name), "switchable": name == served,
                 "keys": await asyncio.to_thread(keys_status, panel, name)}
                for name in ([served] if served else []) + names]
    return {"execution_account": served, "execution_error": error, "accounts": accounts}


async def store_keys(panel: Panel, login: Login, request: Request, account: str,
                     api_key: str, secret: str, code: str) -> dict[str, Any]:
    """Store the account's API key and secret, after the person's code; the keys' status."""
    name = _slug(account)
    api_key, secret = api_key.strip(), secret.strip()
    if not api_key or not secret or len(api_key) > MAX_KEY or len(secret) > MAX_KEY:
        raise HTTPException(422, f"the API key and the secret are each 1 to {MAX_KEY} "
                                 "characters")
    if panel.secrets is None:
        raise HTTPException(503, "the secret store is not available to the panel")
    await step_up(panel, login, code, request)
    by = login.principal.actor
    for key, value in zip(exchange_secret_names(name), (api_key, secret), strict=True):
        await asyncio.to_thread(panel.secrets.set, key, value, actor=by)
    return {"account": name, "keys": await asyncio.to_thread(keys_status, panel, name)}


async def switch_mode(panel: Panel, login: Login, request: Request, account: str, mode: Mode,
                      code: str) -> dict[str, Any]:
    """Ask the box's execution service to trade `account` in `mode`, after the person's code;
    its answer. The switch, or its refusal, is audit-logged as `trading.mode`."""
    name = _slug(account)
    state = await execution_state(panel)
    served = _slug(state["account"])
    if name != served:
        raise HTTPException(404, f"the box's execution service trades account {served!r}, "
                                 f"not {name!r}")
    await step_up(panel, login, code, request)
    by = login.principal.actor
    try:
        # Carried out only until we stop waiting: never by a late delivery, unnoticed.
        not_after = datetime.fromtimestamp(datetime.now(UTC).timestamp()
                                           + panel.request_timeout_s, UTC)
        answer: dict[str, Any] = await panel.ask(EXECUTION, "mode", {
            "mode": mode, "by": by, "not_after": not_after.isoformat()})
    except HTTPException as exc:  # 503: no answer in time, whether it switched is unknown
        await asyncio.to_thread(panel.audit.record, events.TRADING_MODE, actor=by, target=name,
                                outcome="unknown" if exc.status_code == 503 else "refused",
                                before=state.get("mode"), to=mode,
                                error=str(exc.detail))
        raise
    await asyncio.to_thread(panel.audit.record, events.TRADING_MODE, actor=by, target=name,
                            before=answer.get("was", state.get("mode")), to=answer["mode"],
                            changed=bool(answer.get("changed")))
    return answer


@api.get("/settings")
async def settings_api(_: SecretsManager, panel: PanelDep) -> dict[str, Any]:
    """Each account's mode and whether its exchange keys are stored (never the keys)."""
    return await settings_of(panel)


@api.put("/accounts/{account}/keys")
async def keys_api(account: str, body: KeysBody, login: SessionLogin, _: SecretsManager,
                   request: Request, panel: PanelDep) -> dict[str, Any]:
    """Store (or replace) the account's exchange API key and secret in the box's encrypted
    secret store, where live execution reads them. Needs `totp`, a current code of your
    authenticator app. The answer says whether they are stored, never what they are."""
    return await store_keys(panel, login, request, account, body.api_key.get_secret_value(),
                            body.secret.get_secret_value(), body.totp)


@api.post("/accounts/{account}/mode")
async def mode_api(account: str, body: ModeBody, login: SessionLogin, _: SecretsManager,
                   request: Request, panel: PanelDep) -> dict[str, Any]:
    """Switch the account between paper and live, at once and across restarts. `live` sends
    real orders with real money. Needs `totp`; refused while the account holds positions or
    open orders, and for live without its keys. The answer: the mode in force."""
    return await switch_mode(panel, login, request, account, body.mode, body.totp)


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
                  chosen=chosen, detail=detail, error=error, chart=chart, risk=panel.view.risk,
                  books=books(panel))


async def _settings_page(request: Request, panel: Panel, code: int = 200,
                         **context: Any) -> Response:
    return render(request, "trading_settings.html", code, s=await settings_of(panel), **context)


@pages.get("/settings")
async def settings_page(request: Request, _: SecretsManager, panel: PanelDep) -> Response:
    return await _settings_page(request, panel)


@pages.post("/settings/keys")
async def keys_submit(request: Request, login: SessionLogin, _: SecretsManager, panel: PanelDep,
                      account: Annotated[str, Form(max_length=64)],
                      api_key: Annotated[str, Form()], secret: Annotated[str, Form()],
                      code: Annotated[str, Form(max_length=32)] = "") -> Response:
    try:
        done = await store_keys(panel, login, request, account, api_key, secret, code)
    except HTTPException as exc:
        return await _settings_page(request, panel, exc.status_code, failed=account,
                                    keys_error=exc.detail)
    return redirect("/trading/settings", f"Keys of {done['account']} stored, encrypted; "
                                         "they are not shown again.")


@pages.post("/settings/mode")
async def mode_submit(request: Request, login: SessionLogin, _: SecretsManager, panel: PanelDep,
                      account: Annotated[str, Form(max_length=64)],
                      mode: Annotated[Mode, Form()],
                      code: Annotated[str, Form(max_length=32)] = "") -> Response:
    try:
        answer = await switch_mode(panel, login, request, account, mode, code)
    except HTTPException as exc:
        return await _settings_page(request, panel, exc.status_code, failed=account,
                                    mode_error=exc.detail)
    done = "is now" if answer.get("changed") else "already was"
    return redirect("/trading/settings", f"Execution: {answer['account']} {done} "
                                         f"{answer['mode']}.")


@pages.get("/{action}")
async def confirm_page(request: Request, action: str, _: TradingControl,
                       panel: PanelDep) -> Response:
    if action not in CONFIRM_ACTIONS:
        raise HTTPException(404, "no such page")
    return _confirm(request, panel, action)


def _confirm(request: Request, panel: Panel, action: str, code: int = 200,
             error: Any = None) -> Response:
    """The confirmation page of `action`, again with the error when the service refused."""
    return render(request, "confirm.html", code, action=action, d=panel.view.dashboard(),
                  books=books(panel), error=error)


async def _confirmed(request: Request, panel: Panel, action: str,
                     asking: Awaitable[dict[str, Any]],
                     said: Callable[[dict[str, Any]], str]) -> Response:
    """Back to /trading saying what the service answered; the confirmation page again with
    its error when it refused."""
    try:
        answer = await asking
    except HTTPException as exc:
        return _confirm(request, panel, action, exc.status_code, exc.detail)
    return redirect("/trading", said(answer))


def _halted(answer: dict[str, Any]) -> str:
    already = "" if answer.get("changed", True) else " (it already was)"
    return f"Risk service: trading halted{already} by {answer.get('by')} — {answer.get('reason')}"


def _flattened(answer: dict[str, Any]) -> str:
    orders = (answer.get("execution") or {}).get("orders") or []
    closing = f"{len(orders)} closing order{'s' if len(orders) != 1 else ''} working" \
        if orders else "nothing was open"
    return (f"Risk service: trading halted and flattened — {closing}. "
            f"{(answer.get('halt') or {}).get('reason', '')}")


@pages.post("/halt")
async def halt_submit(request: Request, by: TradingControl, panel: PanelDep,
                      reason: Annotated[str, Form(max_length=MAX_REASON)] = "") -> Response:
    return await _confirmed(request, panel, "halt", halt(panel, by, reason), _halted)


@pages.post("/resume")
async def resume_submit(request: Request, by: TradingControl, panel: PanelDep,
                        force: Annotated[bool, Form()] = False) -> Response:
    return await _confirmed(request, panel, "resume", resume(panel, by, force),
                            lambda _: "Risk service: trading resumed.")


@pages.post("/flatten")
async def flatten_submit(request: Request, by: TradingControl, panel: PanelDep,
                         reason: Annotated[str, Form(max_length=MAX_REASON)] = "") -> Response:
    return await _confirmed(request, panel, "flatten", flatten(panel, by, reason), _flattened)
