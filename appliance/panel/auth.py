"""Who is asking, and the headers every answer carries.

`PanelMiddleware` (pure ASGI, so live streams pass through untouched) finds the login of
each request, from the session cookie or an `Authorization: Bearer ct_…` token, puts it on
`request.state.login` and, unless the session is restricted to one first step, its
Principal on `request.state.principal` (which `RequirePermission` reads); and it adds the
security headers to every response. Every request gets a request id (the client's
`X-Request-ID` when it is a usable one: 8 to 64 letters, digits, `.`, `_`, `:` or `-`;
else a new one), set for its log lines and the bus messages it leads to, and echoed in the
answer's `X-Request-ID`: the logs page follows it across services.

CSRF: a request that changes state and rides on the session cookie must carry the token of
that session (the form field `csrf` or the header `X-CSRF-Token`); bearer tokens are not
sent by a browser on its own and need none. The login forms use a pre-login cookie instead.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import secrets

from fastapi import HTTPException, Request, status
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.bus.base import REQUEST_ID, new_request_id
from appliance.logging import request_id
from appliance.panel.sessions import TOKEN_PREFIX, Login, Logins, csrf_for

SESSION_COOKIE = "circles_session"
PRE_COOKIE = "circles_pre"  # before the login: what the login forms' CSRF token comes from
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'; manifest-src 'self'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), interest-cohort=()"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
HSTS = (b"strict-transport-security", b"max-age=31536000")


def client_address(request: Request) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of the connection's client, an IPv4 one as such also when a dual-stack
    socket reports it IPv4-mapped (`::ffff:192.0.2.7`); None when it is no address."""
    try:
        address = ipaddress.ip_address(request.client.host if request.client else "")
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_source(request: Request) -> str:
    """The client's address as the lockout counts it: an IPv6 address by its /64 (one home
    gets a whole /64, and may pick any address in it)."""
    address = client_address(request)
    if address is None:
        return (request.client.host if request.client else "unknown")[:64]
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class PanelMiddleware:
    def __init__(self, app: ASGIApp, logins: Logins, *, tls: bool) -> None:
        self.app, self.logins, self.tls = app, logins, tls
        self.headers = HEADERS + ([HSTS] if tls else [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        rid = given if REQUEST_ID.fullmatch(given) else new_request_id()
        token = request_id.set(rid)
        try:
            login = await self._login(Request(scope))
            state = scope.setdefault("state", {})
            state["login"] = login
            state["principal"] = login.principal if login and not login.restricted else None

            async def send_with_headers(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = [(k, v) for k, v in message.get("headers", [])
                               if k.lower() != b"server"]
                    headers += [*self.headers, (b"x-request-id", rid.encode())]
                    if not any(k.lower() == b"cache-control" for k, _ in headers):
                        headers.append((b"cache-control", b"no-store"))
                    message = {**message, "headers": headers}
                await send(message)

            await self.app(scope, receive, send_with_headers)
        finally:
            request_id.reset(token)

    async def _login(self, request: Request) -> Login | None:
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
            if token.startswith(TOKEN_PREFIX):
                return await self._lookup("token", token)
        cookie = request.cookies.get(SESSION_COOKIE)
        return await self._lookup("session", cookie) if cookie else None

    async def _lookup(self, kind: str, token: str) -> Login | None:
        """From the cache on the loop; from the database in a thread."""
        found, login = self.logins.cached(kind, token)
        if not found:
            login = await asyncio.to_thread(getattr(self.logins, kind), token)
        return login


def login_of(request: Request) -> Login | None:
    return getattr(request.state, "login", None)


async def csrf_protect(request: Request) -> None:
    """An app-wide dependency: a state-changing request on a session must carry its token."""
    login = login_of(request)
    if request.method in SAFE_METHODS or login is None or login.session_id is None \
            or request.url.path.startswith("/login"):  # the login forms check their own
        return
    await check_csrf(request, csrf_for(login.secret))


async def check_csrf(request: Request, expected: str) -> None:
    given = request.headers.get("x-csrf-token")
    if given is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get("csrf")
        given = value if isinstance(value, str) else None
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "missing or wrong CSRF token: reload the page and try again")


def pre_login_secret(request: Request) -> tuple[str, bool]:
    """The pre-login cookie's value, and whether it must be set (it was not there)."""
    value = request.cookies.get(PRE_COOKIE)
    if value and len(value) >= 32:
        return value, False
    return secrets.token_urlsafe(32), True
