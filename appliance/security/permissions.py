"""Roles and permissions: one table says what each role may do, and one function checks it.

Every check, whether a panel route, a CLI command or a library function, ends in
`authorize(principal, permission)`, so the table below is the whole policy:

- `viewer` reads everything the panel shows;
- `operator` also halts and resumes trading, switches devices (a relay, a heater) and
  uploads, deletes and shares files;
- `admin` also manages users, keys, secrets and devices (adds, removes, re-keys them).

`requires(permission)` guards a function whose first argument is the acting Principal;
`RequirePermission(permission)` is the same check as a FastAPI dependency, reading the
principal that the panel's authentication put on `request.state.principal`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Concatenate, ParamSpec, TypeVar

# Starlette, not FastAPI: the dependency needs only these two, and the CLI imports this
# module (for Role) without paying for FastAPI.
from starlette.exceptions import HTTPException
from starlette.requests import Request

from appliance.errors import AuthError

P = ParamSpec("P")
R = TypeVar("R")


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


class Permission(StrEnum):
    VIEW = "view"
    TRADING_CONTROL = "trading.control"  # halt / resume trading
    DEVICES_OPERATE = "devices.operate"  # switch a device (publish on its `set` topic)
    USERS_MANAGE = "users.manage"
    KEYS_MANAGE = "keys.manage"  # the keyring and API keys
    SECRETS_MANAGE = "secrets.manage"
    DEVICES_MANAGE = "devices.manage"  # add, remove, re-credential devices in the broker
    FILES_WRITE = "files.write"  # upload, delete and share the box's files


_OPERATE = frozenset({Permission.VIEW, Permission.TRADING_CONTROL, Permission.DEVICES_OPERATE,
                      Permission.FILES_WRITE})
PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.VIEW}),
    Role.OPERATOR: _OPERATE,
    Role.ADMIN: frozenset(Permission),
}
# Roles whose login needs a second factor once enrolled, and that the panel should push
# to enrol: they can move money or change who may log in.
TOTP_ROLES = frozenset({Role.ADMIN, Role.OPERATOR})


class NotAuthenticated(AuthError):
    """No one is logged in (HTTP 401)."""


class Forbidden(AuthError):
    """The acting person's role lacks the permission (HTTP 403)."""


@dataclass(frozen=True)
class Principal:
    """Who is acting: a person logged in to the panel (or the CLI acting as admin)."""

    name: str
    role: Role

    def can(self, permission: Permission) -> bool:
        return permission in PERMISSIONS[self.role]

    @property
    def actor(self) -> str:
        """How the audit log names this person."""
        return f"user:{self.name}"


def authorize(principal: Principal | None, permission: Permission) -> Principal:
    """Return `principal` if its role grants `permission`; raise NotAuthenticated when there
    is no principal and Forbidden when the role lacks the permission."""
    if principal is None:
        raise NotAuthenticated("not logged in")
    if not principal.can(permission):
        raise Forbidden(f"{principal.name} ({principal.role}) may not {permission}")
    return principal


def requires(permission: Permission) -> Callable[[Callable[Concatenate[Principal, P], R]],
                                                 Callable[Concatenate[Principal, P], R]]:
    """Decorate a function (sync or async) whose first argument is the acting Principal:
    each call is authorized before the function runs."""

    def decorate(func: Callable[Concatenate[Principal, P], R]) -> Callable[Concatenate[Principal, P], R]:
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def guarded_async(principal: Principal, *args: P.args, **kwargs: P.kwargs) -> Any:
                authorize(principal, permission)
                return await func(principal, *args, **kwargs)

            guarded_async.permission = permission  # type: ignore[attr-defined]
            return guarded_async  # type: ignore[return-value]

        @functools.wraps(func)
        def guarded(principal: Principal, *args: P.args, **kwargs: P.kwargs) -> R:
            authorize(principal, permission)
            return func(principal, *args, **kwargs)

        guarded.permission = permission  # type: ignore[attr-defined]
        return guarded

    return decorate


class RequirePermission:
    """A FastAPI dependency: `Depends(RequirePermission(Permission.USERS_MANAGE))` yields the
    Principal, or answers 401 when no one is logged in and 403 when the role lacks it.

    It reads `request.state.principal`, which the panel's authentication sets."""

    def __init__(self, permission: Permission) -> None:
        self.permission = permission

    async def __call__(self, request: Request) -> Principal:  # async: no thread per request
        principal = getattr(request.state, "principal", None)
        if principal is not None and not isinstance(principal, Principal):
            # Something else in the app used the name; treat it as no login, never as a role.
            principal = None
        try:
            return authorize(principal, self.permission)
        except NotAuthenticated as exc:
            raise HTTPException(401, str(exc)) from None
        except Forbidden as exc:
            raise HTTPException(403, str(exc)) from None

    def __repr__(self) -> str:
        return f"RequirePermission({self.permission.value!r})"
