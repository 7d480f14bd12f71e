"""Logging in and out: the password form, the TOTP step for enrolled people, logout.

The security core counts every attempt per name and client address and answers LOCKED
after too many; the page says until when. A login that must first change its password or
enrol TOTP gets a session restricted to that step.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, Response, status
from fastapi.responses import RedirectResponse

from appliance.panel.auth import (
    PRE_COOKIE,
    SESSION_COOKIE,
    check_csrf,
    client_source,
    login_of,
    pre_login_secret,
)
from appliance.panel.deps import PanelDep
from appliance.panel.pages import redirect, templates
from appliance.panel.sessions import CHANGE_PASSWORD, ENROL_TOTP, csrf_for
from appliance.security import audit as events
from appliance.security.login import LoginResult, Outcome
from appliance.security.permissions import TOTP_ROLES

router = APIRouter(tags=["login"], include_in_schema=False)
TOTP_COOKIE = "circles_totp"  # between the two steps: the name and the one-time challenge
FormStr = Annotated[str, Form()]


def safe_next(target: str | None) -> str:
    """Where to go after the login: a path on this box only."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"


def _form(request: Request, name: str, *, error: str | None = None, code: int = 200,
          **context: object) -> Response:
    secret, new = pre_login_secret(request)
    response = templates.TemplateResponse(request, name, {
        "csrf": csrf_for(secret), "error": error, "login": None, "user": None, "nav": [],
        "next": safe_next(request.query_params.get("next")), "ca": request.app.state.panel.ca,
        **context}, status_code=code)
    if new:
        response.set_cookie(PRE_COOKIE, secret, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
    return response


async def _check_pre_csrf(request: Request) -> None:
    secret, missing = pre_login_secret(request)
    if missing:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "reload the login page and try again")
    await check_csrf(request, csrf_for(secret))


@router.get("/login")
async def login_page(request: Request) -> Response:
    if getattr(request.state, "principal", None) is not None:
        return RedirectResponse("/", status_code=303)
    return _form(request, "login.html")


def _refused(request: Request, result: LoginResult, page: str, **context: object) -> Response:
    if result.outcome is Outcome.LOCKED and result.locked_until:
        until = result.locked_until.strftime("%H:%M UTC")
        return _form(request, "login.html", code=status.HTTP_429_TOO_MANY_REQUESTS,
                     error=f"Too many failed attempts: try again after {until}.")
    what = "code" if page == "totp.html" else "username or password"
    return _form(request, page, code=status.HTTP_401_UNAUTHORIZED, error=f"Wrong {what}.",
                 **context)


async def _start_session(request: Request, panel: PanelDep, result: LoginResult,
                         target: str) -> Response:
    assert result.username and result.role
    restricted = None
    if result.outcome in (Outcome.MUST_CHANGE_PASSWORD, Outcome.EXPIRED):
        restricted = CHANGE_PASSWORD
    elif panel.require_totp and result.role in TOTP_ROLES and result.must_enrol_totp:
        restricted = ENROL_TOTP
    token = await asyncio.to_thread(
        panel.logins.open, result.username, source=client_source(request),
        user_agent=request.headers.get("user-agent", ""), restricted=restricted,
        second_factor=result.second_factor.value if result.second_factor else None)
    response = redirect("/account" if restricted else target)
    response.set_cookie(SESSION_COOKIE, token, max_age=int(panel.logins.max_age.total_seconds()),
                        httponly=True, samesite="strict", secure=panel.tls, path="/")
    response.delete_cookie(TOTP_COOKIE, path="/login")
    return response


@router.post("/login")
async def login_submit(request: Request, panel: PanelDep, username: FormStr, password: FormStr,
                       next: Annotated[str, Form()] = "/") -> Response:
    await _check_pre_csrf(request)
    result = await asyncio.to_thread(panel.users.authenticate, username, password,
                                     source=client_source(request))
    if result.outcome is Outcome.NEEDS_TOTP:
        response = redirect(f"/login/totp?next={safe_next(next)}")
        response.set_cookie(TOTP_COOKIE, f"{result.username}:{result.challenge}", max_age=300,
                            httponly=True, samesite="strict", secure=panel.tls, path="/login")
        return response
    if result.username is None:
        return _refused(request, result, "login.html", username=username)
    return await _start_session(request, panel, result, safe_next(next))


@router.get("/login/totp")
async def totp_page(request: Request) -> Response:
    if TOTP_COOKIE not in request.cookies:
        return RedirectResponse("/login", status_code=303)
    return _form(request, "totp.html")


@router.post("/login/totp")
async def totp_submit(request: Request, panel: PanelDep, code: FormStr,
                      next: Annotated[str, Form()] = "/") -> Response:
    await _check_pre_csrf(request)
    username, _, challenge = request.cookies.get(TOTP_COOKIE, "").partition(":")
    if not challenge:
        return redirect("/login", "The login took too long: start again.")
    result = await asyncio.to_thread(panel.users.authenticate_totp, username, challenge, code,
                                     source=client_source(request))
    if result.username is None:
        if result.outcome is Outcome.LOCKED:
            return _refused(request, result, "login.html")
        return _refused(request, result, "totp.html")
    return await _start_session(request, panel, result, safe_next(next))


@router.post("/logout")
async def logout(request: Request, panel: PanelDep) -> Response:
    login = login_of(request)
    if login is not None and login.session_id is not None:  # its CSRF token: csrf_protect
        await asyncio.to_thread(panel.logins.close, login.session_id)
        await asyncio.to_thread(panel.audit.record, events.LOGOUT, actor=login.principal.actor,
                                target=login.principal.name)
    response = redirect("/login", "Logged out.")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
