"""The panel's HTTP side against the real broker, trade logger, risk service and database:
every route for every role, CSRF, the login with TOTP, lockout per address, tokens, the
halt reaching the risk service and the audit log, headers, and no secret in any answer."""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import text

from appliance.ledger import Entry, Ledger, Signer
from appliance.ledger_verify import verify_bundle
from appliance.panel.app import ROUTERS
from appliance.security import audit as events
from appliance.security.permissions import Role
from appliance.security.secrets import read_secret
from appliance.supervisor import port_open
from tests.fake_exchange import FakeExchange
from tests.helpers import ServiceProcess
from tests.panel_box import ACCOUNT, PASSWORD, PanelBox, csrf_of, start_box
from tests.test_firmware import write_tls_files


@pytest.fixture(scope="module")
def exchange() -> Iterator[FakeExchange]:
    """The fake Binance the box's execution service reaches when switched to live."""
    fake = FakeExchange().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def box(broker: Any, tmp_path_factory: pytest.TempPathFactory,
        exchange: FakeExchange) -> Iterator[PanelBox]:
    yield from start_box(broker, tmp_path_factory.mktemp("panel-api"),
                         CIRCLES_EXECUTION__EXCHANGE__URLS=json.dumps(exchange.urls()),
                         CIRCLES_EXECUTION__EXCHANGE__BACKOFF_S="0.05",
                         CIRCLES_EXECUTION__EXCHANGE__TIMEOUT_MS="3000",
                         CIRCLES_PANEL__MAX_UPLOAD_MB=str(MAX_UPLOAD_MB))


@pytest.fixture(scope="module")
def clients(box: PanelBox) -> dict[Role, tuple[httpx.Client, str]]:
    return {role: box.login(person) for role, person in box.people.items()}


# -- every route, every role -------------------------------------------------------------------
VIEW, CONTROL, KEYS, SELF, PUBLIC, INGEST = "view", "control", "keys", "self", "public", "ingest"
ROLES_FOR = {VIEW: {Role.VIEWER, Role.OPERATOR, Role.ADMIN},
             SELF: {Role.VIEWER, Role.OPERATOR, Role.ADMIN},
             CONTROL: {Role.OPERATOR, Role.ADMIN}, KEYS: {Role.ADMIN}}
# This machine (the loopback address, not forwarded) without credentials, or an API token:
# the table's clients are on this machine, so every role reaches it.
LOCAL = "local"
ROLES_FOR[LOCAL] = {Role.VIEWER, Role.OPERATOR, Role.ADMIN}
# Switching a home device (devices.operate); adding and removing devices (devices.manage).
OPERATE, MANAGE = "operate", "manage"
ROLES_FOR[OPERATE] = {Role.OPERATOR, Role.ADMIN}
ROLES_FOR[MANAGE] = {Role.ADMIN}
# Exchange API keys, paper or live (secrets.manage). Step-up bodies here are invalid (422):
# a valid one would use up an authenticator code.
SECRETS = "secrets"
ROLES_FOR[SECRETS] = {Role.ADMIN}
# Uploading, deleting and sharing files (files.write).
FILES = "files"
ROLES_FOR[FILES] = {Role.OPERATOR, Role.ADMIN}
MAX_UPLOAD_MB = 8  # panel.max_upload_mb of this box
# (method, route path) → (who may, the request made: path, JSON body or form).
ROUTES: dict[tuple[str, str], tuple[str, str, dict[str, Any] | None]] = {
    ("GET", "/api/v1/dashboard"): (VIEW, "/api/v1/dashboard", None),
    ("GET", "/api/v1/trading"): (VIEW, "/api/v1/trading", None),
    ("GET", "/api/v1/trading/accounts/{account}"): (VIEW, "/api/v1/trading/accounts/nobody", None),
    ("POST", "/api/v1/trading/halt"): (CONTROL, "/api/v1/trading/halt", {"reason": "table"}),
    ("POST", "/api/v1/trading/resume"): (CONTROL, "/api/v1/trading/resume", {"force": True}),
    ("GET", "/api/v1/ledger"): (VIEW, "/api/v1/ledger", None),
    ("GET", "/api/v1/ledger/verify"): (VIEW, "/api/v1/ledger/verify?chain=audit", None),
    ("GET", "/api/v1/ledger/export"): (VIEW, "/api/v1/ledger/export?chain=audit", None),
    ("GET", "/api/v1/ledger/keys"): (KEYS, "/api/v1/ledger/keys", None),
    ("POST", "/api/v1/ledger/keys"): (KEYS, "/api/v1/ledger/keys", {"account": "table-test"}),
    ("DELETE", "/api/v1/ledger/keys/{key_id}"): (KEYS, "/api/v1/ledger/keys/999999", None),
    ("GET", "/api/v1/me"): (SELF, "/api/v1/me", None),
    ("GET", "/api/v1/tokens"): (SELF, "/api/v1/tokens", None),
    ("POST", "/api/v1/tokens"): (SELF, "/api/v1/tokens", {"label": "table", "scope": "viewer"}),
    ("DELETE", "/api/v1/tokens/{token_id}"): (SELF, "/api/v1/tokens/999999", None),
    ("GET", "/api/openapi.json"): (VIEW, "/api/openapi.json", None),
    ("GET", "/api/docs"): (VIEW, "/api/docs", None),
    ("GET", "/api/docs/assets/{name}"): (PUBLIC, "/api/docs/assets/swagger-ui.css", None),
    ("POST", "/api/v1/trade_events"): (INGEST, "/api/v1/trade_events", {}),
    ("GET", "/api/v1/metrics"): (INGEST, "/api/v1/metrics?account=x", None),
    ("GET", "/api/v1/equity"): (INGEST, "/api/v1/equity?account=x", None),
    ("GET", "/api/v1/home"): (VIEW, "/api/v1/home", None),
    ("POST", "/api/v1/home/{device}/{entity}"): (OPERATE, "/api/v1/home/nowhere/switch",
                                                 {"command": "OFF"}),
    ("GET", "/api/v1/home/{device}/{entity}/history"): (
        VIEW, "/api/v1/home/box/temperature/history?hours=1", None),
    ("GET", "/api/v1/devices"): (VIEW, "/api/v1/devices", None),
    # Added here and removed by the next row: its password is in this one answer only.
    ("POST", "/api/v1/devices"): (MANAGE, "/api/v1/devices", {"name": "table-api",
                                                              "kind": "observer"}),
    ("DELETE", "/api/v1/devices/{name}"): (MANAGE, "/api/v1/devices/table-api", None),
    # Files: no such file (404), no file sent (422); the shared link needs no login.
    ("GET", "/api/v1/files"): (VIEW, "/api/v1/files", None),
    ("POST", "/api/v1/files"): (FILES, "/api/v1/files", {}),
    ("GET", "/api/v1/files/{path:path}"): (VIEW, "/api/v1/files/table/none.txt", None),
    ("DELETE", "/api/v1/files/{path:path}"): (FILES, "/api/v1/files/table/none.txt", None),
    ("POST", "/api/v1/files/{path:path}/share"): (FILES, "/api/v1/files/table/none.txt/share",
                                                  {"expires": "1h"}),
    ("GET", "/files"): (VIEW, "/files", None),
    ("POST", "/files"): (FILES, "/files", {"form": {}}),
    ("GET", "/files/remove"): (FILES, "/files/remove?path=table/none.txt", None),
    ("POST", "/files/remove"): (FILES, "/files/remove", {"form": {"path": "table/none.txt"}}),
    ("POST", "/files/share"): (FILES, "/files/share", {"form": {"path": "table/none.txt",
                                                                 "expires": "1h"}}),
    ("GET", "/files/shared/{token}"): (PUBLIC, "/files/shared/nothing", None),
    # pages
    ("GET", "/"): (VIEW, "/", None),
    ("GET", "/more"): (VIEW, "/more", None),
    ("GET", "/live/{part}"): (VIEW, "/live/nothing", None),
    ("GET", "/trading"): (VIEW, "/trading", None),
    ("GET", "/home"): (VIEW, "/home", None),
    ("POST", "/home/{device}/{entity}/set"): (OPERATE, "/home/nowhere/switch/set",
                                              {"form": {"command": "OFF"}}),
    ("GET", "/devices"): (VIEW, "/devices", None),
    ("POST", "/devices"): (MANAGE, "/devices", {"form": {"name": "table-page",
                                                          "kind": "observer"}}),
    ("GET", "/devices/{name}/remove"): (MANAGE, "/devices/table-page/remove", None),
    ("POST", "/devices/{name}/remove"): (MANAGE, "/devices/table-page/remove", {"form": {}}),
    ("GET", "/trading/{action}"): (CONTROL, "/trading/halt", None),
    ("POST", "/trading/halt"): (CONTROL, "/trading/halt", {"form": {"reason": "table"}}),
    ("POST", "/trading/resume"): (CONTROL, "/trading/resume", {"form": {"force": "true"}}),
    ("POST", "/trading/flatten"): (CONTROL, "/trading/flatten", {"form": {"reason": "table"}}),
    ("POST", "/api/v1/trading/flatten"): (CONTROL, "/api/v1/trading/flatten", {"reason": "table"}),
    ("GET", "/api/v1/trading/settings"): (SECRETS, "/api/v1/trading/settings", None),
    ("PUT", "/api/v1/trading/accounts/{account}/keys"): (
        SECRETS, "/api/v1/trading/accounts/panel-box/keys", {"totp": "1"}),
    ("POST", "/api/v1/trading/accounts/{account}/mode"): (
        SECRETS, "/api/v1/trading/accounts/panel-box/mode", {"mode": "table", "totp": "1"}),
    ("GET", "/trading/settings"): (SECRETS, "/trading/settings", None),
    ("POST", "/trading/settings/keys"): (SECRETS, "/trading/settings/keys",
                                         {"form": {"account": "panel-box"}}),
    ("POST", "/trading/settings/mode"): (SECRETS, "/trading/settings/mode", {"form": {
        "account": "panel-box", "mode": "table"}}),
    ("GET", "/api/v1/sessions"): (SELF, "/api/v1/sessions", None),
    ("DELETE", "/api/v1/sessions/{session_id}"): (SELF, "/api/v1/sessions/999999", None),
    ("POST", "/account/sessions/{session_id}/revoke"): (SELF, "/account/sessions/999999/revoke",
                                                        {"form": {}}),
    ("POST", "/account/backup-codes"): (SELF, "/account/backup-codes", {"form": {}}),
    ("GET", "/ledger"): (VIEW, "/ledger", None),
    ("GET", "/api/v1/logs"): (VIEW, "/api/v1/logs?limit=50", None),
    ("GET", "/logs"): (VIEW, "/logs", None),
    ("GET", "/logs/live"): (VIEW, "/logs/live?level=LOUD", None),  # 422: no endless stream
    ("GET", "/ledger/export"): (VIEW, "/ledger/export?chain=audit", None),
    ("POST", "/ledger/keys"): (KEYS, "/ledger/keys", {"form": {"account": "table-page"}}),
    ("POST", "/ledger/keys/{key_id}/revoke"): (KEYS, "/ledger/keys/999999/revoke", {"form": {}}),
    ("GET", "/account"): (SELF, "/account", None),
    ("POST", "/account/password"): (SELF, "/account/password", {"form": {
        "current": "x", "new": "one long passphrase", "again": "another passphrase"}}),
    ("POST", "/account/totp"): (SELF, "/account/totp", {"form": {}}),
    ("POST", "/account/totp/confirm"): (SELF, "/account/totp/confirm", {"form": {"code": "1"}}),
    ("POST", "/account/tokens"): (SELF, "/account/tokens", {"form": {"label": "page"}}),
    ("POST", "/account/tokens/{token_id}/revoke"): (SELF, "/account/tokens/999999/revoke",
                                                    {"form": {}}),
    ("GET", "/login"): (PUBLIC, "/login", None),
    ("POST", "/login"): (PUBLIC, "/login", None),
    ("GET", "/login/totp"): (PUBLIC, "/login/totp", None),
    ("POST", "/login/totp"): (PUBLIC, "/login/totp", None),
    ("POST", "/logout"): (PUBLIC, "/logout", None),
    ("GET", "/ca.crt"): (PUBLIC, "/ca.crt", None),
    ("GET", "/manifest.webmanifest"): (PUBLIC, "/manifest.webmanifest", None),
    ("GET", "/sw.js"): (PUBLIC, "/sw.js", None),
    ("GET", "/offline"): (PUBLIC, "/offline", None),
    ("GET", "/metrics"): (LOCAL, "/metrics", None),
}


def test_the_table_covers_every_route() -> None:
    found = {(method, route.path) for router in ROUTERS for route in router.routes
             for method in getattr(route, "methods", ()) if method != "HEAD"}
    assert found == set(ROUTES)


def _call(client: httpx.Client, csrf: str | None, method: str, path: str,
          body: dict[str, Any] | None, **headers: str) -> httpx.Response:
    if body is not None and "form" in body:
        form = dict(body["form"])
        if csrf:
            form["csrf"] = csrf
        return client.request(method, path, data=form, headers=headers)
    if csrf and method not in ("GET", "HEAD"):
        headers["x-csrf-token"] = csrf
    if method == "GET" and path.startswith("/live/"):
        return client.get(path, headers=headers)
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("role", list(Role))
def test_each_role_reaches_what_its_permissions_allow(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]], role: Role) -> None:
    client, csrf = clients[role]
    changed_state: list[tuple[str, str]] = []
    for (method, route), (who, path, body) in ROUTES.items():
        if who in (PUBLIC, INGEST):
            continue
        answer = _call(client, csrf, method, path, body)
        allowed = role in ROLES_FOR[who]
        if allowed:
            assert answer.status_code not in (401, 403) and answer.status_code < 500, (
                method, route, answer.status_code, answer.text[:300])
            if method != "GET":
                changed_state.append((method, route))
        else:
            assert answer.status_code == 403, (method, route, answer.status_code)
    if role is Role.VIEWER:  # a viewer changes nothing but their own account
        assert all(route.startswith(("/api/v1/tokens", "/api/v1/sessions", "/account"))
                   for _, route in changed_state)
    _resume(clients)


def test_without_a_login_nothing_is_reached(box: PanelBox) -> None:
    client = box.client()
    for (method, route), (who, path, body) in ROUTES.items():
        if who in (PUBLIC, INGEST):
            continue
        if who == LOCAL:  # this client is on the box: come through the proxy from the LAN
            answer = _call(client, None, method, path, body, **{"x-forwarded-for": "192.0.2.7"})
            assert answer.status_code == 401, (method, route)
            continue
        answer = _call(client, None, method, path, body)
        if path.startswith("/api/") and path != "/api/docs":
            assert answer.status_code == 401, (method, route)
        elif method == "GET":
            assert answer.status_code == 303 and answer.headers["location"].startswith(
                "/login?next="), (method, route)
        else:
            assert answer.status_code in (303, 401), (method, route)


# -- CSRF ----------------------------------------------------------------------------------------
def test_a_state_change_on_a_session_needs_its_csrf_token(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    client, csrf = clients[Role.ADMIN]
    body = {"account": "csrf-test"}
    assert client.post("/api/v1/ledger/keys", json=body).status_code == 403
    assert client.post("/api/v1/ledger/keys", json=body,
                       headers={"x-csrf-token": "0" * 64}).status_code == 403
    assert client.post("/trading/halt", data={"reason": "no token"}).status_code == 403
    other, other_csrf = clients[Role.OPERATOR]  # another session's token is not this one's
    assert client.post("/api/v1/ledger/keys", json=body,
                       headers={"x-csrf-token": other_csrf}).status_code == 403
    assert client.post("/api/v1/ledger/keys", json=body,
                       headers={"x-csrf-token": csrf}).status_code == 201
    # The login form has its own token, from the pre-login cookie.
    fresh = box.client()
    answer = fresh.post("/login", data={"username": "vera", "password": PASSWORD})
    assert answer.status_code == 403


def test_a_bearer_token_needs_no_csrf_and_acts_within_its_scope(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    client, csrf = clients[Role.OPERATOR]
    made = client.post("/api/v1/tokens", json={"label": "script", "scope": "operator"},
                       headers={"x-csrf-token": csrf})
    assert made.status_code == 201
    token = made.json()["token"]
    assert token.startswith("ct_") and token not in client.get("/api/v1/tokens").text
    assert client.post("/api/v1/tokens", json={"label": "x", "scope": "admin"},
                       headers={"x-csrf-token": csrf}).status_code == 422
    bearer = {"authorization": f"Bearer {token}"}
    _resume(clients)
    with box.client() as script:
        assert script.get("/api/v1/me", headers=bearer).json()["via"] == "token"
        halted = script.post("/api/v1/trading/halt", json={"reason": "by script"},
                             headers=bearer)
        assert halted.status_code == 200 and halted.json()["by"] == "user:otto"
        # A token cannot make more tokens.
        assert script.post("/api/v1/tokens", json={"label": "y"},
                           headers=bearer).status_code == 403
        viewer_only = client.post("/api/v1/tokens", json={"label": "ro"},
                                  headers={"x-csrf-token": csrf}).json()["token"]
        assert script.post("/api/v1/trading/resume", json={"force": True}, headers={
            "authorization": f"Bearer {viewer_only}"}).status_code == 403
        token_id = made.json()["id"]
        assert client.delete(f"/api/v1/tokens/{token_id}",
                             headers={"x-csrf-token": csrf}).status_code == 200
        # Revoked in this process: refused at once (the cache is cleared).
        assert script.get("/api/v1/me", headers=bearer).status_code == 401
    actions = [(e.action, e.actor) for e in box.audit()]
    assert (events.TOKEN_CREATE, "user:otto") in actions
    assert (events.TOKEN_REVOKE, "user:otto") in actions
    _resume(clients)


# -- the login -----------------------------------------------------------------------------------
def test_totp_is_required_for_an_enrolled_person(box: PanelBox) -> None:
    otto = box.people[Role.OPERATOR]
    client = box.client()
    csrf = csrf_of(client.get("/login").text)
    answer = client.post("/login", data={"username": "otto", "password": PASSWORD,
                                         "csrf": csrf})
    assert answer.status_code == 303 and answer.headers["location"].startswith("/login/totp")
    assert "circles_session" not in client.cookies
    assert client.get("/api/v1/me").status_code == 401
    wrong = client.post("/login/totp", data={"code": "000000", "csrf": csrf})
    assert wrong.status_code == 401 and "Wrong code" in wrong.text
    right = client.post("/login/totp", data={"code": box.code(otto), "csrf": csrf})
    assert right.status_code == 303
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    assert client.get("/api/v1/me").json()["username"] == "otto"
    # The TOTP step alone (without the password step) gets nowhere.
    stranger = box.client()
    stranger.cookies.set("circles_totp", "otto:made-up-challenge", path="/login")
    csrf = csrf_of(stranger.get("/login/totp").text)
    assert stranger.post("/login/totp", data={"code": otto.totp.now(),  # type: ignore[union-attr]
                                              "csrf": csrf}).status_code == 401


def test_lockout_is_per_person_and_address(box: PanelBox) -> None:
    box.users.add("lucy", PASSWORD, Role.VIEWER, actor="cli:test")

    def attempt(password: str, address: str) -> httpx.Response:
        client = box.client()
        headers = {"x-forwarded-for": address}
        csrf = csrf_of(client.get("/login", headers=headers).text)
        return client.post("/login", data={"username": "lucy", "password": password,
                                           "csrf": csrf}, headers=headers)

    answers = [attempt("not the password", "10.9.0.66") for _ in range(5)]
    assert [a.status_code for a in answers] == [401] * 4 + [429]
    assert "Too many failed attempts" in answers[-1].text
    assert attempt(PASSWORD, "10.9.0.66").status_code == 429  # locked from there
    assert attempt(PASSWORD, "10.9.0.7").status_code == 303  # the owner elsewhere is not
    lockouts = [e for e in box.audit() if e.action == events.LOCKOUT and e.target == "lucy"]
    assert lockouts and lockouts[-1].details["source"] == "10.9.0.66"
    # IPv6 addresses of one /64 count as one.
    for suffix in range(5):
        attempt("not the password", f"2001:db8:1:2::{suffix + 1}")
    assert attempt(PASSWORD, "2001:db8:1:2::99").status_code == 429
    assert attempt(PASSWORD, "2001:db8:1:3::1").status_code == 303


def test_a_first_login_must_change_the_password_then_enrol_totp(box: PanelBox) -> None:
    box.users.add("nina", PASSWORD, Role.OPERATOR, actor="cli:test", must_change_password=True)
    client = box.client()
    csrf = csrf_of(client.get("/login").text)
    answer = client.post("/login", data={"username": "nina", "password": PASSWORD,
                                         "csrf": csrf})
    assert answer.headers["location"] == "/account"
    me = client.get("/api/v1/me").json()
    assert me["restricted"] == "change_password"
    refused = client.get("/api/v1/dashboard")
    assert refused.status_code == 401 and "change_password" in refused.text
    assert client.get("/").headers["location"] == "/account"
    csrf = csrf_of(client.get("/account").text)
    new = "nina's own long passphrase"
    changed = client.post("/account/password", data={"current": PASSWORD, "new": new,
                                                      "again": new, "csrf": csrf})
    assert changed.status_code == 303
    assert client.get("/api/v1/me").json()["restricted"] == "enrol_totp"
    page = client.post("/account/totp", data={"csrf": csrf})
    secret = page.text.split('id="totp-secret">')[1].split("<")[0]
    done = client.post("/account/totp/confirm", data={"code": pyotp.TOTP(secret).now(),
                                                      "csrf": csrf})
    assert done.status_code == 200 and 'id="backup-codes"' in done.text
    assert client.get("/api/v1/dashboard").status_code == 200


def test_logout_ends_the_session(box: PanelBox) -> None:
    client, csrf = box.login(box.people[Role.VIEWER])
    assert client.get("/api/v1/me").status_code == 200
    assert client.post("/logout", data={"csrf": csrf}).headers["location"] == "/login"
    assert client.get("/api/v1/me").status_code == 401
    assert any(e.action == events.LOGOUT and e.actor == "user:vera" for e in box.audit())


# -- the halt ------------------------------------------------------------------------------------
def _resume(clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    client, csrf = clients[Role.ADMIN]
    answer = client.post("/api/v1/trading/resume", json={"force": True},
                         headers={"x-csrf-token": csrf})
    assert answer.status_code == 200 and answer.json()["halted"] is False, answer.text


def test_halt_and_resume_reach_the_risk_service_and_the_audit_log(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    _resume(clients)  # the halt is retained on the shared broker
    client, csrf = clients[Role.OPERATOR]
    reason = f"api test {uuid.uuid4().hex[:6]}"
    halted = client.post("/api/v1/trading/halt", json={"reason": reason},
                         headers={"x-csrf-token": csrf})
    assert halted.status_code == 200, halted.text
    assert halted.json()["halted"] is True and halted.json()["by"] == "user:otto"
    deadline = time.monotonic() + 10
    while (trading := client.get("/api/v1/dashboard").json()["trading"])["reason"] != reason:
        assert time.monotonic() < deadline, trading
        time.sleep(0.1)
    assert trading["halted"] and trading["by"] == "user:otto"
    resumed = client.post("/trading/resume", data={"csrf": csrf, "force": "true"})
    assert resumed.status_code == 303
    assert "trading resumed" in client.get("/trading").text
    audit = [(e.action, e.actor, e.details.get("reason")) for e in box.audit()]
    assert (events.TRADING_HALT, "user:otto", reason) in audit
    assert any(a == events.TRADING_RESUME and actor == "user:otto" for a, actor, _ in audit)


# -- the ledger ----------------------------------------------------------------------------------
def test_verify_names_the_first_bad_seq_and_export_checks_out(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    chain = f"trade:tamper-{uuid.uuid4().hex[:6]}"
    ledger = Ledger(box.users.engine, Signer.load_or_create(box.broker.state))
    ledger.append(chain, [Entry({"n": i}, f"k{i}") for i in range(4)])
    client, _ = clients[Role.VIEWER]
    verdict = client.get("/api/v1/ledger/verify", params={"chain": chain}).json()[0]
    assert verdict["ok"] and verdict["records"] == 4
    bundle = client.get("/api/v1/ledger/export", params={"chain": chain})
    assert bundle.status_code == 200 and "attachment" in bundle.headers["content-disposition"]
    assert verify_bundle(bundle.text.splitlines()).ok
    with box.users.engine.begin() as conn:
        conn.execute(text("UPDATE ledger_records SET data = :d WHERE chain = :c AND seq = 2"),
                     {"d": json.dumps({"n": 99}), "c": chain})
    verdict = client.get("/api/v1/ledger/verify", params={"chain": chain}).json()[0]
    assert not verdict["ok"] and verdict["first_bad_seq"] == 2
    page = client.get("/ledger", params={"check": "true"}).text
    assert 'class="first-bad">2<' in page
    assert any(e.action == events.LEDGER_EXPORT and e.target == chain for e in box.audit())


def test_ingest_keys_are_shown_once_and_audit_logged(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    client, csrf = clients[Role.ADMIN]
    made = client.post("/api/v1/ledger/keys", json={"account": "Key Test", "label": "ea"},
                       headers={"x-csrf-token": csrf})
    assert made.status_code == 201 and made.json()["account"] == "key-test"
    key = made.json()["key"]
    assert key.startswith("ck_") and key not in client.get("/api/v1/ledger/keys").text
    assert key not in client.get("/ledger").text
    key_id = made.json()["id"]
    assert client.delete(f"/api/v1/ledger/keys/{key_id}",
                         headers={"x-csrf-token": csrf}).status_code == 200
    assert client.delete(f"/api/v1/ledger/keys/{key_id}",
                         headers={"x-csrf-token": csrf}).status_code == 404
    actions = [(e.action, e.actor) for e in box.audit()]
    assert (events.API_KEY_CREATE, "user:ada") in actions
    assert (events.API_KEY_REVOKE, "user:ada") in actions


# -- what every answer carries, and never carries -------------------------------------------------
def test_security_headers_and_no_version_banner(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    client, _ = clients[Role.VIEWER]
    for path in ("/", "/login", "/api/v1/dashboard", "/static/panel.css", "/nowhere"):
        answer = client.get(path)
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert "server" not in answer.headers
    assert client.get("/").headers["cache-control"] == "no-store"


def test_no_answer_contains_a_secret(box: PanelBox,
                                     clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    secrets = [PASSWORD] + [box.broker.password(name) for name in ("panel", "risk",
                                                                   "trade-logger")]
    state: Path = box.broker.state
    secrets += [read_secret(p.name.removesuffix(".enc"), state) or ""
                for p in (state / "secrets").glob("mqtt-*")]
    for person in box.people.values():
        if person.totp is not None:
            secrets.append(person.totp.secret)
    secrets = [s for s in secrets if len(s) >= 12]
    client, csrf = clients[Role.ADMIN]
    cookie = client.cookies.get("circles_session")
    assert cookie
    secrets.append(cookie)
    for (method, route), (who, path, _) in ROUTES.items():
        if method != "GET" or who in (INGEST,) or route.startswith("/live"):
            continue
        body = client.get(path).text
        for secret in secrets:
            assert secret not in body, (route, secret[:4])


def test_an_account_shows_its_metrics_equity_and_recent_fills(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    from appliance.simulate import simulated_trades

    admin, csrf = clients[Role.ADMIN]
    account = f"acct-{uuid.uuid4().hex[:6]}"
    key = admin.post("/api/v1/ledger/keys", json={"account": account},
                     headers={"x-csrf-token": csrf}).json()["key"]
    sent = [json.loads(e.model_dump_json()) for e in simulated_trades(12, account, seed=3)]
    stored = box.client().post("/api/v1/trade_events", json=sent,
                               headers={"authorization": f"Bearer {key}"})
    assert stored.status_code == 200, stored.text
    viewer, _ = clients[Role.VIEWER]
    deadline = time.monotonic() + 10
    while account not in viewer.get("/api/v1/trading").json()["accounts"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    detail = viewer.get(f"/api/v1/trading/accounts/{account}", params={"fills": 5}).json()
    assert detail["metrics"]["events"] == 12
    assert [f["seq"] for f in detail["fills"]] == [12, 11, 10, 9, 8]
    assert [f["event"]["event_id"] for f in detail["fills"]] == [e["event_id"]
                                                                for e in sent[::-1][:5]]
    assert detail["equity"] and detail["equity"][-1]["equity"] == detail["metrics"]["equity"]
    page = viewer.get("/trading", params={"account": account}).text
    assert "<polyline" in page and sent[-1]["strategy_id"] in page


def test_a_token_cannot_touch_its_owners_credentials(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    client, csrf = clients[Role.ADMIN]
    token = client.post("/api/v1/tokens", json={"label": "creds", "scope": "admin"},
                        headers={"x-csrf-token": csrf}).json()["token"]
    bearer = {"authorization": f"Bearer {token}"}
    with box.client() as script:
        for path, form in (("/account/totp", {}), ("/account/password", {
                "current": PASSWORD, "new": "a stolen new passphrase",
                "again": "a stolen new passphrase"}), ("/account/tokens", {"label": "more"})):
            assert script.post(path, data=form, headers=bearer).status_code == 403, path
        assert script.get("/account", headers=bearer).status_code == 403
        # Nor type its owner's authenticator code: exchange keys and paper/live are a person's.
        for method, path, body in (
                ("PUT", f"/api/v1/trading/accounts/{ACCOUNT}/keys",
                 {"api_key": "k" * 16, "secret": "s" * 16, "totp": "123456"}),
                ("POST", f"/api/v1/trading/accounts/{ACCOUNT}/mode",
                 {"mode": "live", "totp": "123456"})):
            answer = script.request(method, path, json=body, headers=bearer)
            assert answer.status_code == 403, (path, answer.text)


def test_a_refused_body_is_not_echoed(
        clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    """A misspelt field names what is missing, and nothing of what was sent comes back:
    it may be an exchange secret."""
    client, csrf = clients[Role.ADMIN]
    sent = {"api_key": "an-api-key-never-echoed", "secret_key": "a-secret-never-echoed"}
    answer = client.put(f"/api/v1/trading/accounts/{ACCOUNT}/keys", json=sent,
                        headers={"x-csrf-token": csrf})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "secret"]
    assert "never-echoed" not in answer.text


def test_the_login_form_needs_its_own_cookie(box: PanelBox) -> None:
    """Without the pre-login cookie there is no token to forge: a cross-site form gets 403."""
    from appliance.panel.sessions import csrf_for

    client = box.client()
    answer = client.post("/login", data={"username": "vera", "password": PASSWORD,
                                         "csrf": csrf_for("")})
    assert answer.status_code == 403 and "circles_session" not in client.cookies


def test_a_live_page_ends_with_its_login(box: PanelBox) -> None:
    client, csrf = box.login(box.people[Role.VIEWER])
    with client.stream("GET", "/live/dashboard") as stream:
        lines = stream.iter_lines()
        assert next(lines) == "event: dashboard"
        with box.client() as other:
            other.cookies.update(client.cookies)
            assert other.post("/logout", data={"csrf": csrf}).status_code == 303
        rest = list(lines)  # ends at the next update or keepalive (≤ 15 s)
    assert rest  # it ended by itself, with the part it had sent


def test_a_restricted_session_can_log_in_again(box: PanelBox) -> None:
    box.users.add("rita", PASSWORD, Role.VIEWER, actor="cli:test", must_change_password=True)
    client = box.client()
    csrf = csrf_of(client.get("/login").text)
    client.post("/login", data={"username": "rita", "password": PASSWORD, "csrf": csrf})
    assert client.get("/api/v1/me").json()["restricted"] == "change_password"
    csrf = csrf_of(client.get("/login").text)
    again = client.post("/login", data={"username": "rita", "password": PASSWORD,
                                        "csrf": csrf})
    assert again.status_code == 303 and again.headers["location"] == "/account"


# -- the box's root certificate ------------------------------------------------------------------
def test_the_root_certificate_is_offered_without_a_login(box: PanelBox) -> None:
    client = box.client()
    answer = client.get("/ca.crt")
    assert answer.status_code == 200 and answer.content == box.ca_cert.read_bytes()
    assert answer.headers["content-type"] == "application/x-x509-ca-cert"
    assert answer.headers["content-disposition"] == 'attachment; filename="circles-ca.crt"'
    der = ssl.PEM_cert_to_DER_cert(answer.text)  # what a phone hashes for its fingerprint
    fingerprint = hashlib.sha256(der).digest().hex(":").upper()
    page = client.get("/login").text
    assert 'href="/ca.crt"' in page and fingerprint in page


# A second panel on the box's broker would take over the box panel's client id: these run on
# a broker of their own.
def test_without_a_root_certificate_there_is_none_to_download(own_broker: Any,
                                                              tmp_path: Path) -> None:
    env = own_broker.env()
    proc = ServiceProcess("panel", env, tmp_path)
    try:
        base = f"http://127.0.0.1:{env['CIRCLES_PANEL__PORT']}"
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", int(env["CIRCLES_PANEL__PORT"])):
            assert time.monotonic() < deadline and proc.process.poll() is None, proc.log
            time.sleep(0.1)
        answer = httpx.get(f"{base}/ca.crt")
        assert answer.status_code == 404 and "panel.ca_cert is not set" in answer.text
        assert "/ca.crt" not in httpx.get(f"{base}/login").text
    finally:
        proc.stop()


@pytest.mark.parametrize("given,why", [("missing", "no file"),
                                       ("key", "is not a PEM certificate"),
                                       ("leaf", "is not a CA's certificate")])
def test_a_bad_root_certificate_stops_the_panel_naming_the_key(
        own_broker: Any, tmp_path: Path, given: str, why: str) -> None:
    _, leaf, key = write_tls_files(tmp_path / "tls")
    path = {"missing": tmp_path / "nowhere.pem", "key": key, "leaf": leaf}[given]
    proc = ServiceProcess("panel", own_broker.env(CIRCLES_PANEL__CA_CERT=str(path)), tmp_path)
    assert proc.wait(15) == 78, proc.log
    assert any("panel.ca_cert" in line and why in line for line in proc.log.splitlines()), proc.log


# -- the installable app -------------------------------------------------------------------------
def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header (its IHDR chunk comes first)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_the_manifest_makes_an_installable_app(box: PanelBox) -> None:
    from urllib.parse import urljoin

    client = box.client()  # no cookie: some browsers fetch the manifest without one
    answer = client.get("/manifest.webmanifest")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/manifest+json")
    manifest = answer.json()
    for key in ("name", "short_name", "start_url", "scope", "display", "icons",
                "background_color", "theme_color"):
        assert manifest.get(key), key
    assert manifest["name"] == "Circles"
    base = box.base + "/manifest.webmanifest"
    assert urljoin(base, manifest["start_url"]).startswith(urljoin(base, manifest["scope"]))
    assert manifest["display"] in ("fullscreen", "standalone", "minimal-ui")
    css = client.get("/static/panel.css").text
    for key in ("background_color", "theme_color"):
        assert manifest[key].lower() in css.lower(), key
    sizes: dict[str, set[str]] = {}
    for icon in manifest["icons"]:
        got = client.get(urljoin(base, icon["src"]))
        assert got.status_code == 200, icon
        assert got.headers["content-type"].split(";")[0] == icon["type"], icon
        if icon["type"] == "image/png":
            width, height = _png_size(got.content)
            assert icon["sizes"] == f"{width}x{height}", icon
        for purpose in icon.get("purpose", "any").split():
            sizes.setdefault(purpose, set()).add(icon["sizes"])
    assert {"192x192", "512x512"} <= sizes["any"] and "512x512" in sizes["maskable"]
    # Every page names the manifest and the touch icon an iPhone puts on its home screen.
    page = client.get("/login").text
    assert '<link rel="manifest" href="/manifest.webmanifest">' in page
    touch = re.search(r'<link rel="apple-touch-icon" href="([^"]+)">', page)
    assert touch and _png_size(client.get(touch.group(1)).content) == (180, 180)
    assert 'name="theme-color"' in page


def test_the_service_worker_keeps_only_the_offline_shell(box: PanelBox) -> None:
    client = box.client()
    worker = client.get("/sw.js")
    assert worker.status_code == 200
    assert worker.headers["content-type"].startswith("text/javascript")
    assert worker.headers["cache-control"] == "no-cache"  # a new release is seen at once
    assert "{{" not in worker.text and re.search(r'var VERSION = "circles-[0-9a-f]{12}";',
                                                 worker.text)
    found = re.search(r"var SHELL = (\[.*?\]);", worker.text)
    assert found
    shell = json.loads(found.group(1))
    assert "/offline" in shell and "/static/panel.css" in shell
    for url in shell:  # what the worker fetches at install, without a cookie
        assert client.get(url).status_code == 200, url
    offline = client.get("/offline")
    assert offline.status_code == 200 and offline.headers["cache-control"] == "no-cache"
    assert "The box is unreachable right now" in offline.text
    assert "circles_session" not in offline.text and 'name="csrf"' not in offline.text
    # Within the CSP: no inline script or style; and it loads only what the worker keeps.
    html = offline.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and "<style" not in html
    assert not re.search(r"\sstyle=|\son[a-z]+=", html)
    loaded = re.findall(r'<(?:script|img)[^>]* src="([^"]+)"|<link[^>]* href="([^"]+)"', html)
    assert loaded and all((a or b) in shell for a, b in loaded), loaded


# -- Prometheus ----------------------------------------------------------------------------------
def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def test_metrics_for_a_scraper_on_the_box(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    viewer, _ = clients[Role.VIEWER]
    account = f"metrics-{uuid.uuid4().hex[:6]}"
    viewer.get(f"/api/v1/trading/accounts/{account}")
    assert box.client().get("/static/panel.css").status_code == 200
    answer = box.client().get("/metrics")  # from 127.0.0.1, no credentials
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    assert account not in answer.text  # the route's template, never the raw path
    samples = _samples(answer.text)
    requests = [(labels, value) for name, labels, value in samples
                if name == "circles_panel_requests_total"
                and labels["route"] == "/api/v1/trading/accounts/{account}"]
    assert requests and all(labels["method"] == "GET" for labels, _ in requests), requests
    assert sum(value for _, value in requests) >= 1
    assert any(name == "circles_panel_request_seconds_count"
               and labels["route"] == "/api/v1/trading/accounts/{account}"
               for name, labels, _ in samples)
    assert any(name == "circles_panel_requests_total" and value >= 1 and labels == {
        "method": "GET", "route": "/static/{path}", "status": "200"}
        for name, labels, value in samples), "a file is counted under its mount"
    assert ("circles_service_online", {"service": "risk"}, 1.0) in samples
    statuses = [value for name, labels, value in samples
                if name == "circles_bus_messages_total" and labels["topic"] == "service_status"]
    assert statuses and statuses[0] > 0
    sessions = [value for name, _, value in samples if name == "circles_panel_sessions"]
    assert sessions and sessions[0] >= 1  # the table's clients are logged in


def test_metrics_from_elsewhere_need_an_api_token(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    """Through the box's trusted proxy (127.0.0.1) for a client on the LAN: the request
    comes from loopback, yet it is not the box's own."""
    viewer, csrf = clients[Role.VIEWER]
    made = viewer.post("/api/v1/tokens", json={"label": "prometheus"},
                       headers={"x-csrf-token": csrf})
    assert made.status_code == 201
    token = made.json()["token"]
    try:
        with box.client() as lan:
            for forwarded in ("192.0.2.7", "127.0.0.1"):  # what a forwarded header claims
                refused = lan.get("/metrics", headers={"x-forwarded-for": forwarded})
                assert refused.status_code == 401, forwarded
                assert refused.headers["www-authenticate"] == "Bearer"
                assert "circles_panel_requests_total" not in refused.text
            away = {"x-forwarded-for": "192.0.2.7"}
            allowed = lan.get("/metrics", headers={**away, "authorization": f"Bearer {token}"})
            assert allowed.status_code == 200 and "circles_service_online" in allowed.text
            wrong = lan.get("/metrics", headers={**away,
                                                 "authorization": f"Bearer ct_{'x' * 43}"})
            assert wrong.status_code == 401
        # A logged-in browser's session is not a scraper's credential.
        assert viewer.get("/metrics", headers=away).status_code == 401
    finally:
        viewer.delete(f"/api/v1/tokens/{made.json()['id']}", headers={"x-csrf-token": csrf})


# -- the home and the devices ----------------------------------------------------------------------
def _entity(client: httpx.Client, device: str, entity: str) -> dict[str, Any]:
    found = [e for e in client.get("/api/v1/home").json()["entities"]
             if (e["device"], e["entity"]) == (device, entity)]
    assert len(found) == 1, (device, entity)
    return found[0]


def _until(what: str, check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return found


def _retained(box: PanelBox, topic: str) -> Any:
    """The retained message on `topic`, as a client of the broker receives it."""
    import asyncio

    from appliance.bus import Filter

    async def receive() -> Any:
        bus = box.broker.bus()
        await bus.connect()
        try:
            await bus.subscribe([(Filter(topic), 1)])
            (message,) = await bus.receive(1, timeout=5)
            return message
        finally:
            await bus.close()

    return asyncio.run(receive())


def test_a_relay_switched_through_the_api_shows_the_state_its_device_reported(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    from appliance.bus import registry

    client, csrf = clients[Role.OPERATOR]
    relay = _until("the demo relay reports a state",
                   lambda: (e := _entity(client, "hall-light", "switch"))["value"] and e)
    assert relay["writable"] and relay["kind"] == "switch" and relay["room"] == "Hall"
    assert relay["label"] == "Hall light" and relay["online"] is True
    wanted = "OFF" if relay["value"] == "ON" else "ON"
    sent = client.post("/api/v1/home/hall-light/switch", json={"command": wanted.lower()},
                       headers={"x-csrf-token": csrf})
    assert sent.status_code == 202 and sent.json()["command"] == wanted, sent.text
    now = _until(f"the relay reports {wanted}",
                 lambda: (e := _entity(client, "hall-light", "switch"))["value"] == wanted and e)
    # What the panel shows is what home-sensors published after driving the pin.
    message = _retained(box, str(registry.HOME_STATE.topic(device="hall-light",
                                                           entity="switch")))
    assert message.sender == "home-sensors"
    reported = json.loads(message.payload)
    assert (reported["value"], reported["ts"]) == (wanted, now["ts"])
    assert now["ts"] != relay["ts"]
    assert any(e.action == events.DEVICE_SWITCH and e.actor == "user:otto"
               and e.target == "hall-light/switch" and e.details["command"] == wanted
               for e in box.audit())
    # A dimmer takes a brightness; it too shows what it reported.
    assert client.post("/api/v1/home/desk-lamp/brightness", json={"command": 40},
                       headers={"x-csrf-token": csrf}).status_code == 202
    _until("the dimmer reports 40", lambda: _entity(client, "desk-lamp", "brightness")["value"]
           == 40)
    # JSON true and false are ON and OFF, not the brightness 1 and 0.
    for flag, word in ((False, "OFF"), (True, "ON")):
        sent = client.post("/api/v1/home/desk-lamp/brightness", json={"command": flag},
                           headers={"x-csrf-token": csrf})
        assert sent.status_code == 202 and sent.json()["command"] == word, sent.text
    for path, command, code in (("hall-light/switch", "BRIGHT", 422),
                                ("desk-lamp/brightness", 140, 422),
                                ("box/temperature", "ON", 409), ("nowhere/switch", "ON", 404)):
        answer = client.post(f"/api/v1/home/{path}", json={"command": command},
                             headers={"x-csrf-token": csrf})
        assert answer.status_code == code, (path, answer.text)
    viewer, viewer_csrf = clients[Role.VIEWER]
    assert viewer.post("/api/v1/home/hall-light/switch", json={"command": "ON"},
                       headers={"x-csrf-token": viewer_csrf}).status_code == 403


def test_a_sensors_history_has_points_and_the_home_page_charts_it(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    viewer, _ = clients[Role.VIEWER]
    history = _until("the garden light's history has points", lambda: (
        answer := viewer.get("/api/v1/home/garden-light/level/history").json())["points"]
        and answer, timeout=20)
    start, mean, low, high, readings = history["points"][-1]
    assert low <= mean <= high and readings >= 1 and start <= time.time()
    assert history["step_s"] >= 1
    page = viewer.get("/home").text
    assert 'data-entity="garden-light/level"' in page and 'class="chart spark"' in page
    assert "Garden light" in page and "Turn on" not in page  # a viewer gets no switches
    with viewer.stream("GET", "/live/home") as stream:
        lines = stream.iter_lines()
        assert next(lines) == "event: home"
        part = "\n".join(iter(lambda: next(lines), ""))  # up to the event's blank line
    assert 'data-entity="garden-light/level"' in part and "Turn on" not in part


def test_a_device_added_on_the_panel_connects_until_it_is_removed(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    import asyncio

    from appliance.bus import MqttBus, registry
    from appliance.errors import AuthError

    admin, csrf = clients[Role.ADMIN]
    operator, operator_csrf = clients[Role.OPERATOR]
    name = f"node-{uuid.uuid4().hex[:6]}"
    assert operator.post("/api/v1/devices", json={"name": name, "kind": "esp32"},
                         headers={"x-csrf-token": operator_csrf}).status_code == 403
    made = admin.post("/api/v1/devices", json={"name": name, "kind": "esp32"},
                      headers={"x-csrf-token": csrf})
    assert made.status_code == 201, made.text
    password = made.json()["password"]
    config = made.json()["config"]
    assert config["device"] == name and config["broker"]["username"] == name
    assert config["broker"]["password"] == password and config["broker"]["port"] == 1883
    assert admin.post("/api/v1/devices", json={"name": name, "kind": "esp32"},
                      headers={"x-csrf-token": csrf}).status_code == 409
    listed = {d["name"]: d for d in admin.get("/api/v1/devices").json()}
    assert listed[name]["kind"] == "esp32" and listed[name]["online"] is None
    for shown_again in (admin.get("/api/v1/devices").text, admin.get("/devices").text):
        assert name in shown_again and password not in shown_again
    with admin.stream("GET", "/live/devices") as stream:
        lines = stream.iter_lines()
        assert next(lines) == "event: devices"
        part = "\n".join(iter(lambda: next(lines), ""))
    assert f'data-device="{name}"' in part and "ESP32 node" in part and password not in part

    def node(client_id: str) -> MqttBus:
        return MqttBus(name, box.broker.address(name, password, reconnect_max_s=0.5),
                       status=False, persistent=False, client_id=f"{name}-{client_id}")

    async def connected_until_removed() -> None:
        esp32 = node("a")
        await esp32.connect(timeout=10)
        try:
            # Not retained: the status of a node that is about to go must not outlive it.
            await esp32.publish(str(registry.HOME_STATUS.topic(device=name)), b"online")
            deadline = time.monotonic() + 10
            while not ((row := {d["name"]: d for d in admin.get("/api/v1/devices").json()}
                        [name])["online"] and row["last_seen"]):
                assert time.monotonic() < deadline, row
                await asyncio.sleep(0.1)
            removed = admin.delete(f"/api/v1/devices/{name}", headers={"x-csrf-token": csrf})
            assert removed.status_code == 200, removed.text
            for _ in range(40):
                if not esp32.connected:
                    break
                await asyncio.sleep(0.05)
            assert not esp32.connected, "the removed node is still connected"
            with pytest.raises(AuthError):
                await node("b").connect(timeout=5)
        finally:
            await esp32.close()

    asyncio.run(connected_until_removed())
    assert name not in {d["name"] for d in admin.get("/api/v1/devices").json()}
    assert admin.delete(f"/api/v1/devices/{name}",
                        headers={"x-csrf-token": csrf}).status_code == 404
    actions = [(e.action, e.actor) for e in box.audit() if e.target == name]
    assert actions == [(events.DEVICE_ADD, "user:ada"), (events.DEVICE_REMOVE, "user:ada")]


# -- the logs ------------------------------------------------------------------------------------
def _log_lines(client: httpx.Client, until: Any, **params: str) -> list[dict[str, Any]]:
    """The lines of `GET /api/v1/logs?…` once `until(lines)` holds (a service writes its
    line a moment after the bus message it handled)."""
    deadline = time.monotonic() + 10
    while True:
        answer = client.get("/api/v1/logs", params=params)
        assert answer.status_code == 200, answer.text
        assert answer.json()["source"] == "files"
        lines: list[dict[str, Any]] = answer.json()["lines"]
        if until(lines):
            return lines
        assert time.monotonic() < deadline, (params, lines[:5])
        time.sleep(0.2)


def test_the_logs_follow_a_halt_across_services(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    """A halt asked through the panel is logged by the risk service under the request's id,
    and by the execution service, which obeys the halt that answer published: one request id
    gives the lines of both services, newest first; the level filter keeps the warning."""
    _resume(clients)
    client, csrf = clients[Role.OPERATOR]
    reason = f"logs test {uuid.uuid4().hex[:6]}"
    assert client.post("/api/v1/trading/halt", json={"reason": reason},
                       headers={"x-csrf-token": csrf}).status_code == 200
    try:
        viewer, _ = clients[Role.VIEWER]
        risk = _log_lines(viewer, lambda lines: any(
            line["message"] == "trading halted" and line["extra"].get("reason") == reason
            for line in lines), service="risk")
        assert {line["service"] for line in risk} == {"risk"}
        request_id = next(line["request_id"] for line in risk
                          if line["extra"].get("reason") == reason)
        assert request_id
        lines = _log_lines(viewer, lambda lines: {"risk", "execution"} <= {
            line["service"] for line in lines}, request_id=request_id)
        assert {line["request_id"] for line in lines} == {request_id}
        assert [line["timestamp"] for line in lines] == sorted(
            (line["timestamp"] for line in lines), reverse=True)
        assert set(lines[0]) == {"timestamp", "log_level", "service", "message", "request_id",
                                 "environment", "extra"}
        warnings = viewer.get("/api/v1/logs", params={"request_id": request_id,
                                                      "level": "warn"}).json()["lines"]
        assert warnings and {line["service"] for line in warnings} == {"execution"}
        assert all(line["log_level"] in ("WARN", "ERROR") for line in warnings)
        assert viewer.get("/api/v1/logs", params={"request_id": request_id, "limit": 1}
                          ).json()["lines"] == lines[:1]
        page = viewer.get("/logs", params={"request_id": request_id, "level": ""}).text
        assert f'href="/logs?request_id={request_id}"' in page and reason in page
    finally:
        _resume(clients)
    for params in ({"level": "LOUD"}, {"limit": "0"}, {"limit": "2001"},
                   {"service": "../panel"}, {"request_id": "a b"}):
        assert viewer.get("/api/v1/logs", params=params).status_code == 422, params


def test_an_expert_advisor_added_on_the_panel_is_seen_by_its_heartbeat(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    import asyncio

    from appliance.bus import MqttBus, registry
    from appliance.bus.mt5 import MT5Heartbeat
    from appliance.bus.payloads import utcnow

    admin, csrf = clients[Role.ADMIN]
    name = f"ea-{uuid.uuid4().hex[:6]}"
    made = admin.post("/api/v1/devices", json={"name": name, "kind": "mt5"},
                      headers={"x-csrf-token": csrf})
    assert made.status_code == 201, made.text
    password = made.json()["password"]
    inputs = dict(line.split("=", 1) for line in made.json()["mt5_inputs"].splitlines())
    assert inputs["InpUsername"] == inputs["InpAccount"] == name
    assert inputs["InpPassword"] == password and inputs["InpPort"] == "1883"

    def row() -> dict[str, Any]:
        return {d["name"]: d for d in admin.get("/api/v1/devices").json()}[name]

    assert row()["online"] is None and row()["last_seen"] is None

    async def terminal(status: bool) -> None:
        """The EA: a heartbeat, or its status (not retained, so nothing outlives the test)."""
        ea = MqttBus(name, box.broker.address(name, password), status=False, persistent=False,
                     client_id=f"{name}-terminal")
        await ea.connect(timeout=10)
        try:
            if status:
                await ea.publish(str(registry.MT5_STATUS.topic(account=name)), b"online",
                                 wait=True)
            else:
                await ea.send(registry.MT5_HEARTBEAT, MT5Heartbeat(ts=utcnow()), account=name,
                              wait=True)
        finally:
            await ea.close()

    asyncio.run(terminal(status=False))
    beaten = _until("the heartbeat is seen", lambda: (r := row())["last_seen"] and r)
    assert beaten["online"] is None  # a heartbeat says it is alive, not its status
    asyncio.run(terminal(status=True))
    online = _until("the status is seen", lambda: (r := row())["online"] and r)
    assert online["since"] and online["last_seen"] >= beaten["last_seen"]
    assert admin.delete(f"/api/v1/devices/{name}",
                        headers={"x-csrf-token": csrf}).status_code == 200


# -- step-up, exchange keys, paper or live, sessions, backup codes, flatten ---------------------
def _person_with_codes(box: PanelBox, name: str, role: Role) -> tuple[Any, list[str]]:
    """A person with an authenticator app, and the backup codes it came with."""
    from tests.panel_box import Person

    box.users.add(name, PASSWORD, role, actor="cli:test")
    person = Person(name, role, totp=pyotp.parse_uri(  # type: ignore[arg-type]
        box.users.totp.begin_enrolment(name).uri))
    codes = box.users.totp.confirm_enrolment(name, box.code(person), actor="cli:test")
    return person, codes


def _login_with(box: PanelBox, name: str, code: str) -> tuple[httpx.Client, str]:
    """Logged in with the password and `code` (a backup code keeps the app's codes free)."""
    client = box.client()
    csrf = csrf_of(client.get("/login").text)
    answer = client.post("/login", data={"username": name, "password": PASSWORD, "csrf": csrf})
    assert answer.headers.get("location", "").startswith("/login/totp"), answer.text[-800:]
    assert client.post("/login/totp", data={"code": code, "csrf": csrf}).status_code == 303
    return client, csrf_of(client.get("/account").text)


def _not_now(person: Any) -> str:
    """Six digits the person's authenticator does not show around now."""
    near = {person.totp.at(time.time() + k * 30) for k in range(-3, 4)}
    return next(c for c in (f"{d}" * 6 for d in range(10)) if c not in near)


def _execution(box: PanelBox, command: str, **args: Any) -> dict[str, Any]:
    """The box's execution service's answer, asked over the bus."""
    import asyncio

    async def ask() -> Any:
        bus = box.broker.bus()
        await bus.connect()
        try:
            return await bus.request("execution", command, args, timeout=10)
        finally:
            await bus.close()

    reply = asyncio.run(ask())
    assert reply.ok, reply.error
    result: dict[str, Any] = reply.result
    return result


def test_exchange_keys_need_a_code_are_stored_and_never_shown(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:

    kim, codes = _person_with_codes(box, "kim", Role.ADMIN)
    client, csrf = _login_with(box, "kim", codes[0])
    path = f"/api/v1/trading/accounts/{ACCOUNT}/keys"
    names = (f"exchange-{ACCOUNT}-api-key", f"exchange-{ACCOUNT}-secret")
    state: Path = box.broker.state
    before = [read_secret(n, state) for n in names]
    api_key, secret = f"key-{uuid.uuid4().hex}", f"secret-{uuid.uuid4().hex}"
    body = {"api_key": api_key, "secret": secret}
    for code, why in (("", "type the code"), (_not_now(kim), "wrong code")):
        refused = client.put(path, json=body | {"totp": code}, headers={"x-csrf-token": csrf})
        assert refused.status_code == 403 and why in refused.json()["detail"]
        assert [read_secret(n, state) for n in names] == before  # nothing changed
    operator, operator_csrf = clients[Role.OPERATOR]
    assert operator.put(path, json=body | {"totp": "123456"},  # secrets.manage: admins only
                        headers={"x-csrf-token": operator_csrf}).status_code == 403
    stored = client.put(path, json=body | {"totp": box.code(kim)}, headers={"x-csrf-token": csrf})
    assert stored.status_code == 200, stored.text
    assert stored.json()["keys"]["set"] and stored.json()["keys"]["names"] == list(names)
    assert [read_secret(n, state) for n in names] == [api_key, secret]
    # Replaced, with a backup code this time (a step-up code is good once, and so is this).
    api_key, secret = f"key-{uuid.uuid4().hex}", f"secret-{uuid.uuid4().hex}"
    page = client.post("/trading/settings/keys", data={
        "account": ACCOUNT, "api_key": api_key, "secret": secret, "code": codes[1],
        "csrf": csrf})
    assert page.status_code == 303 and "not shown again" in client.get("/trading/settings").text
    assert [read_secret(n, state) for n in names] == [api_key, secret]
    again = client.post("/trading/settings/keys", data={
        "account": ACCOUNT, "api_key": "x" * 20, "secret": "y" * 20, "code": codes[1],
        "csrf": csrf})
    assert again.status_code == 403 and "wrong code" in again.text  # the used backup code
    assert read_secret(names[0], state) == api_key
    # No answer shows them: not the settings, not any page or API answer of the table.
    for (method, route), (who, where, _) in ROUTES.items():
        if method != "GET" or who == INGEST or route.startswith("/live"):
            continue
        text_ = client.get(where).text
        for value in (api_key, secret, *codes):
            assert value not in text_, (route, value[:6])
    settings = client.get("/api/v1/trading/settings").json()
    mine = next(a for a in settings["accounts"] if a["account"] == ACCOUNT)
    assert settings["execution_account"] == ACCOUNT and mine["keys"]["set"]
    assert mine["keys"]["api_key_set_at"] and mine["switchable"]
    writes = [(e.actor, e.target) for e in box.audit() if e.action == events.SECRET_WRITE]
    assert ("user:kim", names[0]) in writes and ("user:kim", names[1]) in writes
    assert not any(api_key in json.dumps(e.details) for e in box.audit())


def test_going_live_needs_a_code_then_reaches_the_exchange_and_comes_back(
        box: PanelBox, exchange: FakeExchange) -> None:
    """Without a code nothing changes; with one, the execution service stores nothing new,
    reaches the (fake) exchange with the account's keys, reconciles, and answers live; back
    to paper the same way. Each switch is audit-logged by the panel."""
    from tests.fake_exchange import API_KEY, SECRET

    lee, codes = _person_with_codes(box, "lee", Role.ADMIN)
    client, csrf = _login_with(box, "lee", codes[0])
    assert client.put(f"/api/v1/trading/accounts/{ACCOUNT}/keys", json={
        "api_key": API_KEY, "secret": SECRET, "totp": codes[1]},
        headers={"x-csrf-token": csrf}).status_code == 200
    path = f"/api/v1/trading/accounts/{ACCOUNT}/mode"
    assert _execution(box, "positions")["mode"] == "paper"
    refused = client.post(path, json={"mode": "live"}, headers={"x-csrf-token": csrf})
    assert refused.status_code == 403 and "type the code" in refused.json()["detail"]
    page = client.post("/trading/settings/mode", data={"account": ACCOUNT, "mode": "live",
                                                       "code": "", "csrf": csrf})
    assert page.status_code == 403 and "type the code" in page.text
    assert _execution(box, "positions")["mode"] == "paper"
    assert exchange.calls("/api/v3/account") == 0
    elsewhere = client.post("/api/v1/trading/accounts/someone-else/mode",
                            json={"mode": "live", "totp": codes[2]}, headers={"x-csrf-token": csrf})
    assert elsewhere.status_code == 404  # the box's execution trades panel-box only
    try:
        live = client.post(path, json={"mode": "live", "totp": box.code(lee)},
                           headers={"x-csrf-token": csrf})
        assert live.status_code == 200, live.text
        assert live.json() | {"by": None} == {"account": ACCOUNT, "mode": "live",
                                              "reconciled": True, "discrepancies": [],
                                              "changed": True, "was": "paper", "by": None}
        assert exchange.calls("/api/v3/account") >= 1  # signed with the stored keys
        assert _execution(box, "positions")["mode"] == "live"
        deadline = time.monotonic() + 10
        while next(a for a in client.get("/api/v1/trading/settings").json()["accounts"]
                   if a["account"] == ACCOUNT)["mode"] != "live":
            assert time.monotonic() < deadline, "the retained positions never said live"
            time.sleep(0.1)
        assert 'id="go-paper"' in client.get("/trading/settings").text
    finally:
        back = client.post(path, json={"mode": "paper", "totp": codes[3]},
                           headers={"x-csrf-token": csrf})
        assert back.status_code == 200 and back.json()["mode"] == "paper", back.text
    assert _execution(box, "positions")["mode"] == "paper"
    switches = [(e.actor, e.target, e.details.get("before"), e.details.get("to"))
                for e in box.audit() if e.action == events.TRADING_MODE]
    assert ("user:lee", ACCOUNT, "paper", "live") in switches
    assert ("user:lee", ACCOUNT, "live", "paper") in switches


def test_sessions_are_listed_and_revoked(box: PanelBox,
                                         clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    from tests.panel_box import Person

    box.users.add("sam", PASSWORD, Role.VIEWER, actor="cli:test")
    sam = Person("sam", Role.VIEWER)
    phone, phone_csrf = box.login(sam)
    laptop, _ = box.login(sam)
    listed = phone.get("/api/v1/sessions").json()
    assert len(listed) == 2 and [s["current"] for s in listed].count(True) == 1
    assert set(listed[0]) == {"id", "created_at", "last_seen_at", "expires_at", "source",
                              "user_agent", "second_factor", "browser", "current"}
    assert laptop.cookies["circles_session"] not in json.dumps(listed)
    other = next(s["id"] for s in listed if not s["current"])
    this = next(s["id"] for s in listed if s["current"])
    admin, admin_csrf = clients[Role.ADMIN]
    assert admin.delete(f"/api/v1/sessions/{other}",  # someone else's: out of reach
                        headers={"x-csrf-token": admin_csrf}).status_code == 404
    assert laptop.get("/api/v1/me").status_code == 200
    page = phone.get("/account").text
    assert 'id="sessions"' in page and "this one" in page
    assert phone.delete(f"/api/v1/sessions/{other}",
                        headers={"x-csrf-token": phone_csrf}).json() == {"revoked": other,
                                                                         "current": False}
    assert laptop.get("/api/v1/me").status_code == 401  # ended at once
    assert [s["id"] for s in phone.get("/api/v1/sessions").json()] == [this]
    token = phone.post("/api/v1/tokens", json={"label": "s"},
                       headers={"x-csrf-token": phone_csrf}).json()["token"]
    assert box.client().get("/api/v1/sessions", headers={
        "authorization": f"Bearer {token}"}).status_code == 403  # a script sees none
    ended = phone.post(f"/account/sessions/{this}/revoke", data={"csrf": phone_csrf})
    assert ended.status_code == 303 and ended.headers["location"] == "/login"
    assert phone.get("/api/v1/me").status_code == 401
    revokes = [(e.actor, e.details.get("session_id"), e.details.get("current"))
               for e in box.audit() if e.action == events.SESSION_REVOKE]
    assert ("user:sam", other, False) in revokes and ("user:sam", this, True) in revokes


def test_new_backup_codes_need_a_code_and_replace_the_old_ones(box: PanelBox) -> None:
    bea, codes = _person_with_codes(box, "bea", Role.OPERATOR)
    client, csrf = _login_with(box, "bea", codes[0])
    page = client.get("/account").text
    assert "9 of 10 left" in page
    refused = client.post("/account/backup-codes", data={"code": _not_now(bea), "csrf": csrf})
    assert refused.status_code == 403 and "wrong code" in refused.text
    made = client.post("/account/backup-codes", data={"code": codes[1], "csrf": csrf})
    assert made.status_code == 200 and "the earlier ones no longer work" in made.text
    fresh = re.findall(r"<li><code>([a-z0-9]{5}-[a-z0-9]{5})</code></li>", made.text)
    assert len(fresh) == 10 and not set(fresh) & set(codes)
    assert not any(c in client.get("/account").text for c in fresh)  # shown once
    old = client.post("/account/backup-codes", data={"code": codes[2], "csrf": csrf})
    assert old.status_code == 403 and "wrong code" in old.text
    new = client.post("/account/backup-codes", data={"code": fresh[0], "csrf": csrf})
    assert new.status_code == 200 and 'id="backup-codes"' in new.text
    renewed = [e for e in box.audit() if e.action == events.BACKUP_CODES_RENEW
               and e.target == "bea"]
    assert len(renewed) == 2 and renewed[0].actor == "user:bea"
    # Without an authenticator there is nothing to renew: the step-up says so.
    viewer, viewer_csrf = box.login(box.people[Role.VIEWER])
    none = viewer.post("/account/backup-codes", data={"code": "123456", "csrf": viewer_csrf})
    assert none.status_code == 403 and "set up an authenticator app first" in none.text


def test_halt_and_flatten_reaches_risk_and_execution(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    _resume(clients)
    client, csrf = clients[Role.OPERATOR]
    assert 'id="flatten"' in client.get("/trading").text
    confirm = client.get("/trading/flatten")
    assert confirm.status_code == 200 and "Halt and flatten?" in confirm.text
    try:
        answer = client.post("/api/v1/trading/flatten", json={"reason": "api flatten"},
                             headers={"x-csrf-token": csrf})
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["halt"]["halted"] and result["halt"]["by"] == "user:otto"
        assert result["halt"]["reason"] == "halt and flatten requested by user:otto: api flatten"
        assert result["execution"] == {"orders": []}  # the paper account holds nothing
        page = client.post("/trading/flatten", data={"reason": "page flatten", "csrf": csrf})
        assert page.status_code == 303
        assert "flattened" in client.get("/trading").text
    finally:
        _resume(clients)
    flattens = [(e.actor, e.details.get("reason")) for e in box.audit()
                if e.action == events.TRADING_FLATTEN]
    assert ("user:otto", "halt and flatten requested by user:otto: api flatten") in flattens


def test_a_live_log_tail_ends_with_its_login(box: PanelBox) -> None:
    client, csrf = box.login(box.people[Role.VIEWER])
    # Silent for 8 s (no line, no keepalive yet) fails the read: the stream must end before.
    with client.stream("GET", "/logs/live", params={"level": "ERROR"},
                       timeout=httpx.Timeout(30, read=8)) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(lines) == "event: ready"
        with box.client() as other:
            other.cookies.update(client.cookies)
            assert other.post("/logout", data={"csrf": csrf}).status_code == 303
        rest = list(lines)  # ends within CHECK_S of the logout
    assert rest[0] == "data: following"


def test_the_logs_follow_a_trade_event_from_the_panel_to_the_ledger(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    """A trade event posted to the panel with an `X-Request-ID` is logged under that id by
    the panel, which received it, and by the trade logger, which stored it: the logs follow
    it from one to the other. Without the header the answer names the id it was given."""
    from appliance.simulate import simulated_trades

    admin, csrf = clients[Role.ADMIN]
    account = f"trail-{uuid.uuid4().hex[:6]}"
    key = admin.post("/api/v1/ledger/keys", json={"account": account},
                     headers={"x-csrf-token": csrf}).json()["key"]
    event = json.loads(next(iter(simulated_trades(1, account, seed=5))).model_dump_json())
    request_id = f"ea-{uuid.uuid4().hex}"
    stored = box.client().post("/api/v1/trade_events", json=event, headers={
        "authorization": f"Bearer {key}", "x-request-id": request_id})
    assert stored.status_code == 200, stored.text
    assert stored.headers["x-request-id"] == request_id
    viewer, _ = clients[Role.VIEWER]
    lines = _log_lines(viewer, lambda lines: {"panel", "trade-logger"} <= {
        line["service"] for line in lines}, request_id=request_id)
    by_service = {line["service"]: line for line in lines}
    assert by_service["panel"]["message"] == "trade events received"
    assert by_service["trade-logger"]["message"] == "trade event stored"
    assert by_service["trade-logger"]["extra"]["event_id"] == event["event_id"]
    assert by_service["trade-logger"]["extra"]["seq"] == stored.json()["seq"]
    fresh = viewer.get("/api/v1/me").headers["x-request-id"]
    assert len(fresh) == 32 and fresh != request_id
    for unusable in ("a b", "short", "x" * 65, "a/b/c/d/e"):
        assert viewer.get("/api/v1/me", headers={"x-request-id": unusable}
                          ).headers["x-request-id"] != unusable


def test_positions_and_open_orders_show_per_account(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    """What an execution service retains of an account (positions marked to the last price,
    open orders) is on the trading page, in `GET /api/v1/trading` and on the flatten
    confirmation."""
    import asyncio
    from decimal import Decimal

    from appliance.bus import registry
    from appliance.bus.trading import Order, Orders, Position, Positions

    account = f"shown-{uuid.uuid4().hex[:6]}"
    positions = Positions(account=account, mode="paper", positions=[Position(
        symbol="ETH/USDT", qty=Decimal("1.5"), avg_price=Decimal(3000),
        last_price=Decimal(2900), unrealized_pnl=Decimal(-150))])
    orders = Orders(account=account, mode="paper", orders=[Order(
        client_order_id="c-shown", intent_key="k", account=account, exchange="sim",
        symbol="ETH/USDT", side="sell", qty=Decimal("0.5"), status="open",
        created_at="2026-01-02T03:04:05+00:00")])

    async def retain(clear: bool = False) -> None:
        bus = box.broker.bus()
        await bus.connect()
        try:
            for spec, payload in ((registry.POSITIONS, positions), (registry.OPEN_ORDERS, orders)):
                topic = str(spec.topic(account=account))
                data = b"" if clear else payload.model_dump_json().encode()
                await bus.publish(topic, data, retain=True, wait=True)
        finally:
            await bus.close()

    asyncio.run(retain())
    try:
        client, _ = clients[Role.OPERATOR]
        deadline = time.monotonic() + 10
        while not (shown := [b for b in client.get("/api/v1/trading").json()["execution"]
                             if b["account"] == account and b["orders"]]):
            assert time.monotonic() < deadline, "the retained positions never showed"
            time.sleep(0.1)
        assert shown[0]["mode"] == "paper" and shown[0]["positions"][0]["qty"] == "1.5"
        page = client.get("/trading").text
        assert account in page and "ETH/USDT" in page and "-150.00" in page
        assert "sell ETH/USDT" in page and "2,900.00" in page
        assert "ETH/USDT" in client.get("/trading/flatten").text
    finally:
        asyncio.run(retain(clear=True))


# -- files -----------------------------------------------------------------------------------------
def _upload(client: httpx.Client, csrf: str, filename: str, data: bytes, folder: str = "",
            **fields: str) -> httpx.Response:
    return client.post("/api/v1/files", files={"file": (filename, data, "application/octet-stream")},
                       data={"folder": folder, **fields}, headers={"x-csrf-token": csrf})


def _listed(client: httpx.Client, folder: str) -> list[str]:
    answer = client.get("/api/v1/files", params={"folder": folder})
    assert answer.status_code == 200, answer.text
    return [f["path"] for f in answer.json()["files"]]


def test_a_file_goes_up_comes_down_is_shared_and_deleted(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    """Upload (a few MB, streamed) → listed → downloaded identical by a viewer → a share link
    fetched without a login → delete → gone, link and all; encrypted at rest; audit-logged
    with names and sizes, never a link's token."""
    from urllib.parse import quote

    from appliance.panel.files import PREFIX, link_token
    from appliance.storage import links
    from appliance.storage.fs import FileStore

    operator, csrf = clients[Role.OPERATOR]
    viewer, _ = clients[Role.VIEWER]
    folder, name = f"docs-{uuid.uuid4().hex[:6]}", "résumé 1.pdf"
    path = f"{folder}/{name}"
    data = os.urandom(3 * 1024 * 1024 + 17)
    made = _upload(operator, csrf, name, data, folder)
    assert made.status_code == 201, made.text
    assert made.json() | {"modified": None} == {
        "name": name, "path": path, "size": len(data), "content_type": "application/pdf",
        "replaced": False, "modified": None}
    assert _upload(operator, csrf, name, b"other", folder).status_code == 409
    assert _listed(viewer, folder) == [path]
    # A viewer's page lists and downloads; it offers no upload, share or delete.
    page = viewer.get("/files", params={"folder": folder}).text
    assert f'href="/api/v1/files/{quote(path)}"' in page
    assert 'id="upload"' not in page and "/files/remove" not in page and "/files/share" not in page
    assert 'id="upload"' in operator.get("/files").text
    top = viewer.get("/api/v1/files").json()
    assert {"name": folder, "path": f"{folder}/", "files": 1} in top["folders"]
    # At rest the bytes are encrypted (the box's storage default): not the file's.
    at_rest = FileStore(box.storage).get_bytes(PREFIX + path)
    assert data[:4096] not in at_rest

    url = f"/api/v1/files/{quote(path)}"
    with viewer.stream("GET", url) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-length"] == str(len(data))
        assert answer.headers["content-type"] == "application/pdf"
        disposition = answer.headers["content-disposition"]
        assert disposition.startswith("attachment;")
        assert "filename*=UTF-8''r%C3%A9sum%C3%A9%201.pdf" in disposition
        assert any(p.startswith("sandbox") for p in answer.headers.get_list("content-security-policy"))
        got = b"".join(answer.iter_bytes())
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()

    shared = operator.post(f"{url}/share", json={"expires": "1h"}, headers={"x-csrf-token": csrf})
    assert shared.status_code == 200, shared.text
    link = shared.json()
    assert link["kind"] == "signed" and link["url"].startswith(f"{box.base}/files/shared/")
    with httpx.Client(timeout=30) as stranger:  # no cookie, no token
        fetched = stranger.get(link["url"])
        assert fetched.status_code == 200 and fetched.content == data
        token = link["url"].rsplit("/", 1)[1]
        tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
        assert stranger.get(f"{box.base}/files/shared/{tampered}").status_code == 404
        secret, of = links.link_secret(box.broker.state), token.split(".")[0]
        past = datetime.now(UTC) - timedelta(minutes=1)
        expired = link_token(PREFIX + path, of, past, secret)
        gone = stranger.get(f"{box.base}/files/shared/{expired}")
        assert gone.status_code == 410 and "expired" in gone.text
        # A link made for something outside the files is no link to it.
        outside = link_token("backups/x", of, datetime.now(UTC) + timedelta(hours=1), secret)
        assert stranger.get(f"{box.base}/files/shared/{outside}").status_code == 404

        deleted = operator.delete(url, headers={"x-csrf-token": csrf})
        assert deleted.status_code == 200 and deleted.json() == {"deleted": path}
        assert viewer.get(url).status_code == 404
        assert stranger.get(link["url"]).status_code == 404
    assert _listed(viewer, folder) == []
    assert operator.delete(url, headers={"x-csrf-token": csrf}).status_code == 404

    done = [e for e in box.audit() if e.action.startswith("file.") and e.target == path]
    assert [(e.action, e.actor) for e in done] == [
        (events.FILE_UPLOAD, "user:otto"), (events.FILE_SHARE, "user:otto"),
        (events.FILE_DELETE, "user:otto")]
    assert done[0].details == {"size": len(data), "replaced": False}
    assert done[1].details["expires_at"] == link["expires_at"]
    assert token not in json.dumps([e.details for e in done])


def test_a_file_upload_is_refused_with_a_reason_and_nothing_kept(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    operator, csrf = clients[Role.OPERATOR]
    folder = f"refused-{uuid.uuid4().hex[:6]}"
    for name, where in (("../escape.txt", folder), ("a.txt", f"{folder}/../x"),
                        ("bell\x07.txt", folder), ("x" * 1100, folder), ("é" * 128, folder)):
        # The name as a field of its own: a client may change the file's own name on the way.
        answer = _upload(operator, csrf, "upload.bin", b"data", where, name=name)
        assert answer.status_code == 422 and "invalid name" in answer.json()["detail"], name
    # The file alone larger than panel.max_upload_mb, in a body within the limit (the plain
    # form, without script).
    big = os.urandom(MAX_UPLOAD_MB * 1024 * 1024 + 1)
    page = operator.post(f"/files?folder={folder}", data={"csrf": csrf, "folder": folder},
                         files={"file": ("big.bin", big)})
    assert page.status_code == 413 and "Not uploaded" in page.text and "panel.max_upload_mb" in page.text
    assert _listed(operator, folder) == []
    # The plain form stores a file and goes back to its folder, with a word of it.
    page = operator.post(f"/files?folder={folder}", data={"csrf": csrf, "folder": folder},
                         files={"file": ("note.txt", b"hello")})
    assert page.status_code == 303 and page.headers["location"] == f"/files?folder={folder}/"
    assert _listed(operator, folder) == [f"{folder}/note.txt"]
    shown = operator.get(page.headers["location"]).text
    assert "Uploaded" in shown and "note.txt" in shown
    assert operator.delete(f"/api/v1/files/{folder}/note.txt",
                           headers={"x-csrf-token": csrf}).status_code == 200


def _declared(box: PanelBox, path: str, length: int, client: httpx.Client, csrf: str = "",
              kind: str = "multipart/form-data; boundary=x") -> int:
    """The status answered to a POST whose headers declare `length` bytes of body, of which
    none is sent: an answer comes only if the box refuses it without waiting for the body
    (else the socket's timeout fails the test)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", box.port, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("content-type", kind)
        conn.putheader("content-length", str(length))
        conn.putheader("cookie", f"circles_session={client.cookies['circles_session']}")
        if csrf:
            conn.putheader("x-csrf-token", csrf)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def test_a_body_past_its_limit_or_its_senders_role_is_refused_before_it_is_read(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    operator, csrf = clients[Role.OPERATOR]
    viewer, viewer_csrf = clients[Role.VIEWER]
    huge = 100 * 1024 * 1024  # past panel.max_upload_mb
    # Whoever sends it, with the CSRF token or without (the form's field is never looked for).
    assert _declared(box, "/api/v1/files", huge, operator, csrf) == 413
    assert _declared(box, "/api/v1/files", huge, operator) == 413
    assert _declared(box, "/files", huge, viewer) == 413
    # Within the limit, a viewer is refused for the role before the body comes.
    assert _declared(box, "/api/v1/files", 5 * 1024 * 1024, viewer, viewer_csrf) == 403
    # Any other route takes far less than an upload: a form too.
    assert _declared(box, "/files/remove", 20 * 1024 * 1024, operator,
                     kind="application/x-www-form-urlencoded") == 413


def test_a_file_replaced_keeps_its_name_and_its_old_links_end(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    """overwrite=true replaces a file; a link made before serves nothing since (the new file
    is not what was shared); the page's share goes to a page that shows the link, and a
    reload of it makes no other."""
    operator, csrf = clients[Role.OPERATOR]
    folder = f"swap-{uuid.uuid4().hex[:6]}"
    path, url = f"{folder}/a.txt", f"/api/v1/files/{folder}/a.txt"

    def share() -> str:
        made = operator.post(f"{url}/share", json={"expires": "1h"}, headers={"x-csrf-token": csrf})
        assert made.status_code == 200, made.text
        return str(made.json()["url"])

    assert _upload(operator, csrf, "a.txt", b"first", folder).status_code == 201
    old = share()
    replaced = _upload(operator, csrf, "a.txt", b"second", folder, overwrite="true")
    assert replaced.status_code == 201, replaced.text
    assert (replaced.json()["replaced"], replaced.json()["size"]) == (True, 6)
    assert operator.get(url).content == b"second"
    with httpx.Client(timeout=30) as stranger:
        assert stranger.get(old).status_code == 404
        assert stranger.get(share()).content == b"second"

    answer = operator.post("/files/share", data={"csrf": csrf, "path": path, "expires": "1d"})
    assert answer.status_code == 303, answer.text
    shown = [re.findall(r'id="share-url">([^<]+)<', operator.get(answer.headers["location"]).text)
             for _ in range(2)]
    assert shown[0] == shown[1] and len(shown[0]) == 1
    assert [e.details.get("replaced") for e in box.audit()
            if e.action == events.FILE_UPLOAD and e.target == path] == [False, True]
    assert len([e for e in box.audit() if e.action == events.FILE_SHARE and e.target == path]) == 3
    assert operator.delete(url, headers={"x-csrf-token": csrf}).status_code == 200


def _retain(box: PanelBox, messages: list[tuple[str, bytes]]) -> None:
    """Publish retained messages (an empty payload clears one), as the backup service would."""
    import asyncio

    async def publish() -> None:
        bus = box.broker.bus()
        await bus.connect()
        try:
            for topic, data in messages:
                await bus.publish(topic, data, retain=True, wait=True)
        finally:
            await bus.close()

    asyncio.run(publish())


def test_the_backups_card_shows_local_only_jobs_drills_and_the_alert(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    from appliance.bus import registry
    from appliance.bus.payloads import BackupAlert, BackupResult

    job = f"nightly-{uuid.uuid4().hex[:6]}"
    success = (datetime.now(UTC) - timedelta(days=3, hours=1)).isoformat()
    result = BackupResult(job=job, ok=True, snapshot="s1", target="local:/srv/backups",
                          local_only=True, last_success=success)
    drill = BackupResult(job=job, kind="drill", ok=False, target="local:/srv/backups",
                         local_only=True, error="restored file differs: db/circles.db")
    alert = BackupAlert(alert=True, reason=f"the last restore drill of {job} failed", jobs=[job])
    topics = [str(registry.BACKUP_RESULT.topic(job=job)), str(registry.BACKUP_DRILL.topic(job=job)),
              str(registry.BACKUP_ALERT.topic())]
    _retain(box, [(t, m.model_dump_json().encode()) for t, m in zip(topics, (result, drill, alert), strict=True)])
    client, _ = clients[Role.VIEWER]
    try:
        shown = _until("the backup job on the dashboard", lambda: [
            j for j in client.get("/api/v1/dashboard").json()["backups"]["jobs"]
            if j["job"] == job and j["drill"]])
        assert shown[0] | {"ts": None} == {
            "job": job, "ok": True, "ts": None, "last_success": success,
            "target": "local:/srv/backups", "local_only": True, "snapshot": "s1", "error": None,
            "drill": {"ok": False, "ts": drill.ts, "error": "restored file differs: db/circles.db"}}
        backups = _until("the alert", lambda: (b := client.get("/api/v1/dashboard").json()["backups"])
                         ["alert"] and b)
        assert backups["alert"]["alert"] is True and backups["alert"]["jobs"] == [job]
        page = client.get("/").text
        card = page[page.index('id="backups"'):]
        assert "local only — not safe from a dead SD card" in card
        assert f"the last restore drill of {job} failed" in card and "restore drill failed" in card
        assert "last success 3 days ago" in " ".join(re.sub(r"<[^>]+>", " ", card).split())
    finally:
        _retain(box, [(t, b"") for t in topics])
    _until("the job cleared", lambda: not [
        j for j in client.get("/api/v1/dashboard").json()["backups"]["jobs"] if j["job"] == job])
    assert client.get("/api/v1/dashboard").json()["backups"]["alert"] is None


def test_the_dashboard_shows_the_last_alerts(
        box: PanelBox, clients: dict[Role, tuple[httpx.Client, str]]) -> None:
    from appliance.bus import registry
    from appliance.bus.payloads import NotifyAlert, NotifyRecent

    ts = datetime.now(UTC).isoformat(timespec="seconds")
    newest = NotifyAlert(ts=ts, rule="trading_halted", subject="", severity="critical", kind="alert",
                         title="Trading halted", text="Trading halted by risk: <daily loss>",
                         pending=["phone"])
    older = [NotifyAlert(ts=ts, rule="device_offline", subject=f"d{i}", severity="warning",
                         kind="resolved", title=f"Resolved: Device d{i} offline", text="back") for i in range(6)]
    topic = str(registry.NOTIFY_RECENT.topic())
    _retain(box, [(topic, NotifyRecent(alerts=[newest, *older], active=1, queued=1).model_dump_json().encode())])
    client, _ = clients[Role.VIEWER]
    try:
        alerts = _until("the alerts on the dashboard", lambda: (
            a := client.get("/api/v1/dashboard").json()["alerts"]) and a["alerts"][0]["rule"] == "trading_halted" and a)
        assert (alerts["active"], alerts["queued"], len(alerts["alerts"])) == (1, 1, 5)  # the last five
        assert alerts["alerts"][0] == newest.model_dump()
        page = client.get("/").text
        card = " ".join(re.sub(r"<[^>]+>", " ", page[page.index('id="alerts"'):]).split())
        assert "1 firing now · 1 waiting to be sent" in card and "waiting for phone" in card
        assert "Trading halted by risk: &lt;daily loss&gt;" in card and "Device d3 offline" in card
        assert "Device d4 offline" not in card
    finally:
        _retain(box, [(topic, b"")])
    _until("the alerts cleared", lambda: client.get("/api/v1/dashboard").json()["alerts"] is None)


def test_a_share_on_plain_s3_is_the_stores_presigned_url(
        own_broker: Any, s3_server: Any, tmp_path: Path) -> None:
    """A panel whose [storage] is S3 without the box's encryption shares a file by the
    store's own presigned URL, which gives the bytes to anyone until it expires."""
    import contextlib
    import urllib.request

    from tests.s3server import fresh_bucket

    settings = s3_server.settings(own_broker.state, fresh_bucket("files"))
    env = {"CIRCLES_STORAGE__BACKEND": "s3", "CIRCLES_STORAGE__ENDPOINT": settings.endpoint,
           "CIRCLES_STORAGE__BUCKET": settings.bucket, "CIRCLES_STORAGE__ENCRYPT": "false",
           "CIRCLES_STORAGE__SECURE": str(settings.secure).lower()}
    if settings.region:
        env["CIRCLES_STORAGE__REGION"] = settings.region
    with contextlib.contextmanager(start_box)(own_broker, tmp_path, ("panel",), **env) as s3_box:
        client, csrf = s3_box.login(s3_box.people[Role.OPERATOR])
        data = os.urandom(200_000)
        assert _upload(client, csrf, "photo.jpg", data, "album").status_code == 201
        link = client.post("/api/v1/files/album/photo.jpg/share", json={"expires": "7d"},
                           headers={"x-csrf-token": csrf}).json()
        scheme = "https" if settings.secure else "http"
        assert link["kind"] == "presigned"
        assert link["url"].startswith(f"{scheme}://{settings.endpoint}/{settings.bucket}/")
        with urllib.request.urlopen(link["url"], timeout=30) as answer:  # noqa: S310 - a test's own server
            assert answer.read() == data
        assert [e.action for e in s3_box.audit() if e.target == "album/photo.jpg"] == [
            events.FILE_UPLOAD, events.FILE_SHARE]


def test_files_whose_store_cannot_open_leave_the_panel_working(own_broker: Any,
                                                               tmp_path: Path) -> None:
    """[storage] set to S3 without an endpoint: the panel starts, says why on the Files page
    and in the API (503 naming the setting), and serves everything else; a stranger's
    genuine share link gets a bare 503 that says nothing of the store."""
    import contextlib

    from appliance.panel.files import link_token
    from appliance.storage import links

    with contextlib.contextmanager(start_box)(own_broker, tmp_path, ("panel",),
                                              CIRCLES_STORAGE__BACKEND="s3") as bad:
        client, _ = bad.login(bad.people[Role.VIEWER])
        answer = client.get("/api/v1/files")
        assert answer.status_code == 503 and "storage.endpoint" in answer.json()["detail"]
        page = client.get("/files")
        assert page.status_code == 200 and "storage.endpoint" in page.text
        assert client.get("/api/v1/dashboard").status_code == 200
        assert "storage.endpoint" in bad.procs[-1].log  # logged once, as an error
        token = link_token("files/a.txt", "0" * 16, datetime.now(UTC) + timedelta(hours=1),
                           links.link_secret(own_broker.state))
        with httpx.Client(timeout=30) as stranger:
            shared = stranger.get(f"{bad.base}/files/shared/{token}")
            assert shared.status_code == 503 and "cannot be served right now" in shared.text
            assert "storage" not in shared.text and "s3" not in shared.text.lower()
            assert stranger.get(f"{bad.base}/files/shared/{token[:-2]}xx").status_code == 404
