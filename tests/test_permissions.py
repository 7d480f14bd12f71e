"""Roles and permissions: the table, `authorize`, the decorator and the FastAPI dependency."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI, Request, Response
from fastapi.testclient import TestClient

from appliance.errors import AuthError
from appliance.security.permissions import (
    PERMISSIONS,
    Forbidden,
    NotAuthenticated,
    Permission,
    Principal,
    RequirePermission,
    Role,
    authorize,
    requires,
)

viewer, operator, admin = (Principal("vera", Role.VIEWER), Principal("otto", Role.OPERATOR),
                           Principal("ada", Role.ADMIN))


def test_the_table() -> None:
    assert set(PERMISSIONS) == set(Role)
    assert PERMISSIONS[Role.VIEWER] == {Permission.VIEW}
    assert PERMISSIONS[Role.OPERATOR] == {Permission.VIEW, Permission.TRADING_CONTROL,
                                          Permission.DEVICES_OPERATE, Permission.FILES_WRITE}
    assert PERMISSIONS[Role.ADMIN] == set(Permission)
    # Each role can do at least what the one below it can.
    assert PERMISSIONS[Role.VIEWER] < PERMISSIONS[Role.OPERATOR] < PERMISSIONS[Role.ADMIN]


@pytest.mark.parametrize(("who", "permission", "allowed"), [
    (viewer, Permission.VIEW, True),
    (viewer, Permission.TRADING_CONTROL, False),  # a viewer cannot halt trading
    (viewer, Permission.DEVICES_OPERATE, False),
    (viewer, Permission.FILES_WRITE, False),  # a viewer may only list and download
    (operator, Permission.TRADING_CONTROL, True),
    (operator, Permission.DEVICES_OPERATE, True),
    (operator, Permission.FILES_WRITE, True),
    (operator, Permission.USERS_MANAGE, False),  # an operator cannot manage users
    (operator, Permission.KEYS_MANAGE, False),
    (operator, Permission.SECRETS_MANAGE, False),
    (operator, Permission.DEVICES_MANAGE, False),
    *[(admin, p, True) for p in Permission],
])
def test_authorize(who: Principal, permission: Permission, allowed: bool) -> None:
    assert who.can(permission) is allowed
    if allowed:
        assert authorize(who, permission) is who
    else:
        with pytest.raises(Forbidden, match=f"{who.name} \\({who.role}\\) may not {permission}"):
            authorize(who, permission)


def test_no_principal_is_not_authenticated() -> None:
    with pytest.raises(NotAuthenticated) as caught:
        authorize(None, Permission.VIEW)
    assert isinstance(caught.value, AuthError)
    assert issubclass(Forbidden, AuthError)


def test_requires_guards_sync_and_async_functions() -> None:
    calls: list[str] = []

    @requires(Permission.TRADING_CONTROL)
    def halt(by: Principal, reason: str) -> str:
        calls.append(reason)
        return f"halted by {by.name}"

    @requires(Permission.USERS_MANAGE)
    async def add_user(by: Principal, name: str) -> str:
        calls.append(name)
        return name

    assert halt(operator, "drawdown") == "halted by otto"
    with pytest.raises(Forbidden):
        halt(viewer, "bored")
    assert asyncio.run(add_user(admin, "bob")) == "bob"
    with pytest.raises(Forbidden):
        asyncio.run(add_user(operator, "eve"))
    assert calls == ["drawdown", "bob"]  # refused calls never ran
    assert halt.__name__ == "halt" and asyncio.iscoroutinefunction(add_user)


def app() -> FastAPI:
    """A tiny app whose 'authentication' takes the role from a header, as a stand-in for the
    panel's session middleware."""
    made = FastAPI()

    @made.middleware("http")
    async def login(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                    ) -> Response:
        role = request.headers.get("x-test-role")
        if role:
            request.state.principal = Principal("tester", Role(role))
        elif request.headers.get("x-test-bogus"):
            request.state.principal = {"name": "tester", "role": "admin"}
        return await call_next(request)

    @made.get("/state")
    def state(who: Annotated[Principal, Depends(RequirePermission(Permission.VIEW))]) -> dict[str, str]:
        return {"viewer": who.name}

    @made.post("/halt")
    def halt(who: Annotated[Principal, Depends(RequirePermission(Permission.TRADING_CONTROL))]
             ) -> dict[str, str]:
        return {"halted_by": who.name}

    @made.post("/users")
    async def users(who: Annotated[Principal, Depends(RequirePermission(Permission.USERS_MANAGE))]
                    ) -> dict[str, str]:
        return {"added_by": who.name}

    return made


@pytest.mark.parametrize(("method", "path", "role", "status"), [
    ("get", "/state", None, 401),
    ("get", "/state", "viewer", 200),
    ("post", "/halt", None, 401),
    ("post", "/halt", "viewer", 403),
    ("post", "/halt", "operator", 200),
    ("post", "/users", "operator", 403),
    ("post", "/users", "admin", 200),
])
def test_the_fastapi_dependency(method: str, path: str, role: str | None, status: int) -> None:
    with TestClient(app()) as client:
        headers = {"x-test-role": role} if role else {}
        response = client.request(method, path, headers=headers)
    assert response.status_code == status, response.text
    if status == 200:
        assert list(response.json().values()) == ["tester"]
    elif status == 403:
        assert f"tester ({role}) may not" in response.json()["detail"]


def test_something_else_on_request_state_is_not_a_login() -> None:
    with TestClient(app()) as client:
        assert client.post("/users", headers={"x-test-bogus": "1"}).status_code == 401
