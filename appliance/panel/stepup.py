"""Step-up: an action that can move money or hands out a second factor (exchange API keys,
paper ↔ live, new backup codes) asks the person for their authenticator code again, however
fresh their login.

A code is good once: the TOTP store keeps the last step used and accepts only later ones, so
a code seen over a shoulder, or the one that opened the session, does not pass again. A
backup code passes too (and is used up), as at the login. A wrong code counts as a failed
login of the person (the lockout of `docs/users.md`, on the person's own row as the login's
code step does), so codes cannot be guessed here either.
"""

from __future__ import annotations

import asyncio

from fastapi import HTTPException, Request, status

from appliance.panel.auth import client_source
from appliance.panel.deps import Panel
from appliance.panel.sessions import Login
from appliance.security.login import Outcome

NO_APP = "set up an authenticator app first (Account page): this asks for its code"
NO_CODE = "type the code your authenticator app shows now: this asks for it again"
WRONG = "wrong code: type the code your authenticator app shows now (each code works once)"


async def step_up(panel: Panel, login: Login, code: str | None, request: Request) -> None:
    """Pass when `code` is a good, unused code of the logged-in person now (TOTP or backup
    code); otherwise HTTP 403 with what to do: no authenticator set up, no code, a wrong one
    (counted), or a person locked by wrong codes."""
    name, code = login.principal.name, (code or "").strip()
    if not await asyncio.to_thread(panel.users.totp.is_enrolled, name):
        raise HTTPException(status.HTTP_403_FORBIDDEN, NO_APP)
    if not code:
        raise HTTPException(status.HTTP_403_FORBIDDEN, NO_CODE)
    result = await asyncio.to_thread(panel.users.login.step_up, name, code,
                                     source=client_source(request))
    if result.outcome is Outcome.LOCKED:
        until = result.locked_until
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"too many wrong codes: {name} is "
                            f"locked until {until:%Y-%m-%d %H:%M} UTC" if until else
                            f"too many wrong codes: {name} is locked")
    if result.outcome is not Outcome.OK:
        raise HTTPException(status.HTTP_403_FORBIDDEN, WRONG)
