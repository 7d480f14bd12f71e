"""The panel's HTTP side against the real broker, trade logger, risk service and database:
every route for every role, CSRF, the login with TOTP, lockout per address, tokens, the
halt reaching the risk service and the audit log, headers, and no secret in any answer."""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import uuid
from collections.abc import Iterator
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
from tests.helpers import ServiceProcess
from tests.panel_box import PASSWORD, PanelBox, csrf_of, start_box
from tests.test_firmware import write_tls_files


@pytest.fixture(scope="module")
def box(broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PanelBox]:
    yield from start_box(broker, tmp_path_factory.mktemp("panel-api"))


@pytest.fixture(scope="module")
def clients(box: PanelBox) -> dict[Role, tuple[httpx.Client, str]]:
    return {role: box.login(person) for role, person in box.people.items()}


# -- every route, every role -------------------------------------------------------------------
VIEW, CONTROL, KEYS, SELF, PUBLIC, INGEST = "view", "control", "keys", "self", "public", "ingest"
ROLES_FOR = {VIEW: {Role.VIEWER, Role.OPERATOR, Role.ADMIN},
             SELF: {Role.VIEWER, Role.OPERATOR, Role.ADMIN},
             CONTROL: {Role.OPERATOR, Role.ADMIN}, KEYS: {Role.ADMIN}}
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
    # pages
    ("GET", "/"): (VIEW, "/", None),
    ("GET", "/live/{part}"): (VIEW, "/live/nothing", None),
    ("GET", "/trading"): (VIEW, "/trading", None),
    ("GET", "/trading/{action}"): (CONTROL, "/trading/halt", None),
    ("POST", "/trading/halt"): (CONTROL, "/trading/halt", {"form": {"reason": "table"}}),
    ("POST", "/trading/resume"): (CONTROL, "/trading/resume", {"form": {"force": "true"}}),
    ("GET", "/ledger"): (VIEW, "/ledger", None),
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
        assert all(route.startswith(("/api/v1/tokens", "/account")) for _, route in changed_state)
    _resume(clients)


def test_without_a_login_nothing_is_reached(box: PanelBox) -> None:
    client = box.client()
    for (method, route), (who, path, body) in ROUTES.items():
        if who in (PUBLIC, INGEST):
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
