"""The person's own account: password, TOTP enrolment and backup codes, the sessions they
are logged in with, API tokens for scripts.

These are open to every role (a viewer changes their own password too) and to a session
restricted to its first step, which is one of them, but never to an API token: a script
does not get to change its owner's credentials, see or end their sessions, or make more
tokens. New backup codes ask for a current code first (step-up, `stepup.py`).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Annotated, Any
from urllib.parse import parse_qs, urlparse

from fastapi import APIRouter, Form, HTTPException, Request, Response, status
from pydantic import BaseModel, Field

from appliance.errors import AuthError, ValidationFailed
from appliance.panel.auth import SESSION_COOKIE, client_source
from appliance.panel.deps import LoginDep, Panel, PanelDep, SessionLogin, Viewer
from appliance.panel.pages import redirect, render
from appliance.panel.sessions import CHANGE_PASSWORD, ENROL_TOTP, RANK, Login, SessionInfo
from appliance.panel.stepup import step_up
from appliance.security import audit as events
from appliance.security.permissions import TOTP_ROLES, Principal, Role
from appliance.security.users import UnknownUser

api = APIRouter(prefix="/api/v1", tags=["account"])
pages = APIRouter(prefix="/account", include_in_schema=False)
FormStr = Annotated[str, Form()]


class TokenBody(BaseModel):
    label: str = Field(min_length=1, max_length=200)
    scope: Role = Field(Role.VIEWER, description="what the token may do: at most your role")


async def create_token(panel: Panel, by: Principal, label: str,
                       scope: Role) -> tuple[dict[str, Any], str]:
    try:
        info, token = await asyncio.to_thread(panel.logins.create_token, by, label, scope)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None
    await asyncio.to_thread(panel.audit.record, events.TOKEN_CREATE, actor=by.actor,
                            target=by.name, token_id=info.id, label=label, scope=scope.value)
    return asdict(info), token


async def revoke_token(panel: Panel, by: Principal, token_id: int) -> bool:
    if not await asyncio.to_thread(panel.logins.revoke_token, by.name, token_id):
        return False
    await asyncio.to_thread(panel.audit.record, events.TOKEN_REVOKE, actor=by.actor,
                            target=by.name, token_id=token_id)
    return True


@api.get("/me")
async def me(login: LoginDep, panel: PanelDep) -> dict[str, Any]:
    """Who is logged in, with which role, and what must come first."""
    info = await asyncio.to_thread(panel.users.get, login.principal.name)
    return {"username": login.principal.name, "role": login.principal.role.value,
            "restricted": login.restricted, "totp_enrolled": bool(info and info.totp_enrolled),
            "via": "session" if login.session_id is not None else "token"}


@api.get("/tokens")
async def tokens(by: Viewer, panel: PanelDep) -> list[dict[str, Any]]:
    """My API tokens (never the tokens themselves)."""
    return [asdict(t) for t in await asyncio.to_thread(panel.logins.tokens_of, by.name)]


@api.post("/tokens", status_code=201)
async def token_create(body: TokenBody, _: SessionLogin, by: Viewer,
                       panel: PanelDep) -> dict[str, Any]:
    """A token for a script (`Authorization: Bearer ct_…`); shown in this answer only. From
    a logged-in session (a token cannot make tokens)."""
    info, token = await create_token(panel, by, body.label, body.scope)
    return info | {"token": token}


@api.delete("/tokens/{token_id}")
async def token_revoke(token_id: int, _: SessionLogin, by: Viewer,
                       panel: PanelDep) -> dict[str, Any]:
    if not await revoke_token(panel, by, token_id):
        raise HTTPException(404, f"no live token {token_id} of yours")
    return {"revoked": token_id}


# -- sessions ----------------------------------------------------------------------------------
BROWSERS = (("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"),
            ("Chromium/", "Chromium"), ("Chrome/", "Chrome"), ("Safari/", "Safari"))
SYSTEMS = (("Android", "Android"), ("iPhone", "iOS"), ("iPad", "iPadOS"),
           ("Windows", "Windows"), ("Mac OS X", "macOS"), ("CrOS", "ChromeOS"),
           ("Linux", "Linux"))


def browser_of(agent: str) -> str:
    """A short name for a User-Agent ("Chrome on Android"); else its first word."""
    browser = next((name for mark, name in BROWSERS if mark in agent), None)
    system = next((name for mark, name in SYSTEMS if mark in agent), None)
    if browser is None:
        return (agent.split(" ", 1)[0] or "unknown")[:60]
    return f"{browser} on {system}" if system else browser


def session_row(info: SessionInfo, current: int | None) -> dict[str, Any]:
    return asdict(info) | {"browser": browser_of(info.user_agent), "current": info.id == current}


async def close_session(panel: Panel, by: Login, session_id: int) -> bool:
    """End one of `by`'s own sessions (the current one too: that is logging out)."""
    name = by.principal.name
    if not await asyncio.to_thread(panel.logins.close_own, name, session_id):
        return False
    await asyncio.to_thread(panel.audit.record, events.SESSION_REVOKE, actor=by.principal.actor,
                            target=name, session_id=session_id,
                            current=session_id == by.session_id)
    return True


@api.get("/sessions")
async def sessions(login: SessionLogin, _: Viewer, panel: PanelDep) -> list[dict[str, Any]]:
    """My live sessions: created, last used, from which address and browser, and which is
    this one (`current`). From a logged-in session (a token sees no sessions)."""
    listed = await asyncio.to_thread(panel.logins.sessions_of, login.principal.name)
    return [session_row(s, login.session_id) for s in listed]


@api.delete("/sessions/{session_id}")
async def session_revoke(session_id: int, login: SessionLogin, _: Viewer,
                         panel: PanelDep) -> dict[str, Any]:
    """End one of my sessions at once (this one too: a logout). Audit-logged."""
    if not await close_session(panel, login, session_id):
        raise HTTPException(404, f"no live session {session_id} of yours")
    return {"revoked": session_id, "current": session_id == login.session_id}


# -- pages -------------------------------------------------------------------------------------
async def _page(request: Request, panel: Panel, login: Login, code: int = 200,
                **context: Any) -> Response:
    name = login.principal.name
    info = await asyncio.to_thread(panel.users.get, name)
    listed, live, left = [], [], None
    if not login.restricted:
        listed = await asyncio.to_thread(panel.logins.tokens_of, name)
        live = [session_row(s, login.session_id)
                for s in await asyncio.to_thread(panel.logins.sessions_of, name)]
        if info and info.totp_enrolled:
            left = await asyncio.to_thread(panel.users.totp.backup_codes_left, name)
    return render(request, "account.html", code, info=info, tokens=listed, sessions=live,
                  backup_left=left,
                  scopes=[r for r in Role if RANK[r] <= RANK[login.principal.role]], **context)


@pages.get("")
async def account_page(request: Request, login: SessionLogin, panel: PanelDep) -> Response:
    return await _page(request, panel, login)


def _next_step(panel: Panel, login: Login, enrolled: bool) -> str | None:
    if panel.require_totp and login.principal.role in TOTP_ROLES and not enrolled:
        return ENROL_TOTP
    return None


@pages.post("/password")
async def password_submit(request: Request, login: SessionLogin, panel: PanelDep,
                          current: FormStr, new: FormStr, again: FormStr) -> Response:
    if new != again:
        return await _page(request, panel, login, 422, password_error="The new passwords differ.")
    name = login.principal.name
    try:
        await asyncio.to_thread(panel.users.change_password, name, current, new,
                                source=client_source(request))
    except (AuthError, ValidationFailed, UnknownUser) as exc:
        return await _page(request, panel, login, 422, password_error=str(exc))
    assert login.session_id is not None
    await asyncio.to_thread(panel.logins.close_others, name, login.session_id)
    if login.restricted == CHANGE_PASSWORD:
        enrolled = await asyncio.to_thread(panel.users.totp.is_enrolled, name)
        await asyncio.to_thread(panel.logins.restrict, login.session_id,
                                _next_step(panel, login, enrolled))
    return redirect("/account", "Password changed; your other sessions were logged out.")


@pages.post("/totp")
async def totp_begin(request: Request, login: SessionLogin, panel: PanelDep) -> Response:
    if login.restricted == CHANGE_PASSWORD:
        return redirect("/account")
    if await asyncio.to_thread(panel.users.totp.is_enrolled, login.principal.name):
        return await _page(request, panel, login, 409, totp_error=(
            "An app is set up already. To move to another, an admin runs "
            f"`circles user totp-reset {login.principal.name}`, then you set up the new one."))
    enrolment = await asyncio.to_thread(panel.users.totp.begin_enrolment, login.principal.name)
    secret = parse_qs(urlparse(enrolment.uri).query).get("secret", [""])[0]
    return await _page(request, panel, login, enrolment=enrolment, secret=secret)


@pages.post("/totp/confirm")
async def totp_confirm(request: Request, login: SessionLogin, panel: PanelDep,
                       code: FormStr) -> Response:
    if login.restricted == CHANGE_PASSWORD:
        return redirect("/account")
    try:
        codes = await asyncio.to_thread(panel.users.totp.confirm_enrolment,
                                        login.principal.name, code,
                                        actor=login.principal.actor)
    except AuthError as exc:
        return await _page(request, panel, login, 422, totp_error=str(exc))
    if login.restricted == ENROL_TOTP and login.session_id is not None:
        await asyncio.to_thread(panel.logins.restrict, login.session_id, None)
    return await _page(request, panel, login, backup_codes=codes)


@pages.post("/backup-codes")
async def backup_codes_page(request: Request, login: SessionLogin, by: Viewer, panel: PanelDep,
                            code: Annotated[str, Form(max_length=32)]) -> Response:
    """New backup codes in place of all earlier ones, shown once; asks for a current code."""
    try:
        await step_up(panel, login, code, request)
        codes = await asyncio.to_thread(panel.users.totp.regenerate_backup_codes, by.name,
                                        actor=by.actor)
    except HTTPException as exc:
        return await _page(request, panel, login, exc.status_code, backup_error=exc.detail)
    except AuthError as exc:
        return await _page(request, panel, login, 409, backup_error=str(exc))
    return await _page(request, panel, login, backup_codes=codes, renewed=True)


@pages.post("/sessions/{session_id}/revoke")
async def session_revoke_page(session_id: int, login: SessionLogin, _: Viewer,
                              panel: PanelDep) -> Response:
    if not await close_session(panel, login, session_id):
        return redirect("/account", f"No live session {session_id} of yours.")
    if session_id != login.session_id:
        return redirect("/account", f"Session {session_id} ended.")
    response = redirect("/login", "This session ended: logged out.")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@pages.post("/tokens")
async def token_create_page(request: Request, login: SessionLogin, by: Viewer,
                            panel: PanelDep,
                            label: Annotated[str, Form(min_length=1, max_length=200)],
                            scope: Annotated[Role, Form()] = Role.VIEWER) -> Response:
    try:
        info, token = await create_token(panel, by, label, scope)
    except HTTPException as exc:
        return await _page(request, panel, login, exc.status_code, token_error=exc.detail)
    return await _page(request, panel, login, new_token=token, new_token_info=info)


@pages.post("/tokens/{token_id}/revoke")
async def token_revoke_page(token_id: int, _: SessionLogin, by: Viewer,
                            panel: PanelDep) -> Response:
    done = await revoke_token(panel, by, token_id)
    return redirect("/account", f"Token {token_id} revoked." if done
                    else f"No live token {token_id} of yours.")
