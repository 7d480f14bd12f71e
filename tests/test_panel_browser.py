"""The phone control panel in a real browser: Debian's Chromium (never a downloaded one),
driven by Playwright at 390×844 with touch, against the panel, risk service and trade
logger running as their own processes on the session broker.

Logging in with password and TOTP, a health report published on the bus appearing on the
dashboard without a reload (Server-Sent Events), halting trading through the confirm page
and seeing the halt and its reason on the dashboard. Every page is screenshotted (full
page, PNG) into `test-output/screenshots/` at the repository's root, and no page may report
a Content-Security-Policy violation or an uncaught script error.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.bus import registry
from appliance.bus.payloads import HealthState
from appliance.security.permissions import Role
from tests.helpers import TestBroker
from tests.panel_box import PASSWORD, PanelBox, Person, start_box

_MISSING: str | None = None  # why these tests cannot run here
try:
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        ConsoleMessage,
        Page,
        expect,
        sync_playwright,
    )
except ImportError:  # pragma: no cover - the dev extra installs it
    Browser = BrowserContext = ConsoleMessage = Page = Any  # type: ignore[misc,assignment]
    _MISSING = "the browser tests need playwright: pip install -e '.[dev]'"

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
PHONE: dict[str, Any] = {"viewport": {"width": 390, "height": 844}, "is_mobile": True,
                         "has_touch": True}
SHOTS = Path(__file__).parents[1] / "test-output" / "screenshots"
LIVE_S = 10  # how long a live update may take here; latency belongs in the benchmark
CSP_WORDS = ("content security policy", "content-security-policy")
# Records every CSP violation the page sees (an init script runs before the page's own and
# is not subject to its policy).
WATCH_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__csp.push(e.violatedDirective + " " + (e.blockedURI || "inline") + " " +
                    (e.sourceFile || "") + ":" + (e.lineNumber || 0));
});
"""

if _MISSING is None and not CHROMIUM.exists():
    _MISSING = f"the browser tests need Debian's Chromium at {CHROMIUM}: apt-get install chromium"
if _MISSING:  # CI installs both: only a machine that says so may skip these tests
    if os.environ.get("CIRCLES_ALLOW_SKIP"):
        pytest.skip(_MISSING, allow_module_level=True)
    pytest.fail(_MISSING, pytrace=False)


def in_thread(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to its end on a thread of its own: Playwright's sync API keeps an
    event loop running on this thread, so `asyncio.run` may not be called here."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run, name="bus-publish")
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the bus coroutine did not finish in 60 s"
    if "error" in result:
        raise result["error"]
    return result.get("value")


@dataclass
class Tab:
    """A page of a phone-sized context, with what its console said."""

    context: BrowserContext
    page: Page
    base: str
    errors: list[str] = field(default_factory=list)

    def goto(self, path: str) -> None:
        answer = self.page.goto(self.base + path)
        assert answer is not None and answer.ok, f"{path}: {answer and answer.status}"

    def shot(self, name: str) -> Path:
        """A full-page screenshot; and the page must not have met a CSP violation."""
        self.check_clean(name)
        path = SHOTS / f"panel-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def check_clean(self, where: str) -> None:
        violations = self.page.evaluate("window.__csp || []")
        csp = [e for e in self.errors if any(w in e.lower() for w in CSP_WORDS)]
        thrown = [e for e in self.errors if e.startswith("pageerror:")]
        assert not (violations or csp or thrown), \
            f"{where}: CSP violations {violations}, console {csp}, script errors {thrown}"

    def close(self) -> None:
        self.check_clean("last page")
        for error in self.errors:  # e.g. the 401 of a refused login: told, not failed
            print(f"browser {error}")
        self.context.close()


def open_tab(browser: Browser, box: PanelBox, *, storage: Any = None, **options: Any) -> Tab:
    context = browser.new_context(**PHONE, storage_state=storage, **options)
    context.set_default_timeout(15_000)
    context.add_init_script(WATCH_CSP)
    page = context.new_page()
    tab = Tab(context, page, box.base)

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            tab.errors.append(f"console: {message.text}")

    page.on("console", console)
    page.on("pageerror", lambda exc: tab.errors.append(f"pageerror: {exc}"))
    return tab


def brightness(page: Page) -> float:
    """The mean of the body's background red, green and blue (0 black … 255 white)."""
    color = page.evaluate("getComputedStyle(document.body).backgroundColor")
    channels = [float(c) for c in re.findall(r"[\d.]+", color)[:3]]
    assert len(channels) == 3, color
    return sum(channels) / 3


def wrong_code(person: Person) -> str:
    """Six digits the authenticator does not show around now."""
    assert person.totp is not None
    now = time.time()
    near = {person.totp.at(now + k * 30) for k in range(-3, 4)}
    return next(c for c in (f"{d}" * 6 for d in range(10)) if c not in near)


def log_in(tab: Tab, box: PanelBox, person: Person, *, shots: bool = False,
           try_wrong: bool = False) -> None:
    """The password step, then the TOTP step: as a person does it, on the phone."""
    page = tab.page
    tab.goto("/login")
    expect(page.locator("h1")).to_have_text("Log in")
    page.fill("input[name=username]", person.name)
    page.fill("input[name=password]", PASSWORD)
    if shots:
        tab.shot("login")
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_url(re.compile(r"/login/totp"))
    expect(page.locator("h1")).to_have_text("Authenticator code")
    if shots:
        tab.shot("totp")
    if try_wrong:
        page.fill("input[name=code]", wrong_code(person))
        page.click("form[action='/login/totp'] button[type=submit]")
        expect(page.locator("p.error")).to_contain_text("Wrong code")
        expect(page.locator("h1")).to_have_text("Authenticator code")
        if shots:
            tab.shot("totp-wrong-code")
    page.fill("input[name=code]", box.code(person))
    page.click("form[action='/login/totp'] button[type=submit]")
    page.wait_for_url(box.base + "/")
    expect(page.locator("header .who")).to_have_text(f"{person.name} · {person.role.value}")
    expect(page.locator("#live-dashboard")).to_be_visible()


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def box(broker: TestBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PanelBox]:
    yield from start_box(broker, tmp_path_factory.mktemp("panel-browser"))


@pytest.fixture(scope="module")
def browser(box: PanelBox) -> Iterator[Browser]:
    """Debian's Chromium. After `box` on purpose: the box is started with `asyncio.run`,
    which may not be called once Playwright's sync API holds this thread's loop."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=FLAGS)
        yield launched
        launched.close()


_sessions: dict[str, Any] = {}  # a logged-in browser's storage state, per person


@pytest.fixture
def admin_tab(box: PanelBox, browser: Browser) -> Iterator[Tab]:
    """A phone logged in as the admin: with the session the login test left, else by
    logging in (a TOTP step is good once, so a second login may wait for the next one)."""
    person = box.people[Role.ADMIN]
    if person.name not in _sessions:
        tab = open_tab(browser, box)
        log_in(tab, box, person)
        _sessions[person.name] = tab.context.storage_state()
        tab.close()
    tab = open_tab(browser, box, storage=_sessions[person.name])
    yield tab
    tab.close()


# -- tests ----------------------------------------------------------------------------------
def test_login_with_password_and_totp(box: PanelBox, browser: Browser) -> None:
    """Password, then a wrong code (refused, still on the code step), then the right code:
    the dashboard, with the admin named in the header and the tabs at the bottom."""
    tab = open_tab(browser, box)
    page = tab.page
    tab.goto("/")
    page.wait_for_url(re.compile(r"/login"))  # not logged in: sent to the login
    person = box.people[Role.ADMIN]
    log_in(tab, box, person, shots=True, try_wrong=True)
    expect(page.locator("nav.tabs a")).to_have_text(["Dashboard", "Home", "Trading", "Logs", "More"])
    expect(page.locator("nav.tabs a[aria-current=page]")).to_have_text("Dashboard")
    assert page.viewport_size == {"width": 390, "height": 844}
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, \
        "the dashboard is wider than the phone"
    tab.shot("dashboard")
    _sessions[person.name] = tab.context.storage_state()
    tab.close()


def test_wrong_password_is_refused(box: PanelBox, browser: Browser) -> None:
    tab = open_tab(browser, box)
    page = tab.page
    tab.goto("/login")
    page.fill("input[name=username]", box.people[Role.VIEWER].name)
    page.fill("input[name=password]", "not the password at all")
    page.click("form[action='/login'] button[type=submit]")
    expect(page.locator("p.error")).to_contain_text("Wrong username or password")
    expect(page.locator("input[name=username]")).to_have_value(box.people[Role.VIEWER].name)
    tab.shot("login-wrong-password")
    tab.close()


def test_published_health_appears_live(box: PanelBox, broker: TestBroker,
                                       admin_tab: Tab) -> None:
    """A health report published on the bus shows on the open dashboard within 10 s,
    without the page being loaded again."""
    page = admin_tab.page
    admin_tab.goto("/")
    host = f"browser-{uuid.uuid4().hex[:8]}"
    expect(page.locator("#live-dashboard")).not_to_contain_text(host)
    page.evaluate("window.__same_page = true")  # gone if the page were loaded again
    state = HealthState(ts=f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())}+00:00",
                        hostname=host, cpu_percent=12.0, load=(0.1, 0.2, 0.3),
                        memory_percent=34.0, memory_used_mb=1300.0, memory_total_mb=3800.0,
                        disk_percent=56.0, disk_free_gb=20.0, uptime_s=3600.0,
                        cpu_temp_c=47.3, clock_synchronized=True)

    async def publish() -> None:
        # The health topic's publisher is the health service: publish as it does.
        bus = broker.bus("health", name="health")
        await bus.connect()
        try:
            await bus.send(registry.HEALTH_STATE, state, wait=True)
        finally:
            await bus.close()

    in_thread(publish())
    live = page.locator("#live-dashboard")
    expect(live).to_contain_text(host, timeout=LIVE_S * 1000)
    expect(live).to_contain_text("47.3 °C", timeout=LIVE_S * 1000)
    expect(live).to_contain_text("synchronised")
    assert page.evaluate("window.__same_page === true"), "the page was loaded again"
    admin_tab.shot("dashboard-live-health")

    dark = open_tab(admin_tab.context.browser, box,  # type: ignore[arg-type]
                    storage=admin_tab.context.storage_state(), color_scheme="dark")
    dark.goto("/")
    expect(dark.page.locator("#live-dashboard")).to_contain_text("47.3 °C")
    light_bg, dark_bg = (brightness(t.page) for t in (admin_tab, dark))
    assert light_bg > 200 and dark_bg < 60, f"page brightness light {light_bg}, dark {dark_bg}"
    dark.shot("dashboard-dark")
    dark.close()


def _resume_if_halted(tab: Tab) -> None:
    """The shared broker keeps the halt retained; an earlier test may have left it halted."""
    page = tab.page
    tab.goto("/trading")
    if page.locator("#resume").count() == 0:
        return
    page.click("#resume")
    page.wait_for_url(re.compile(r"/trading/resume$"))
    with page.expect_navigation():
        page.click("#confirm-resume")
    # Refused (a loss limit is breached): the confirm page again, with the error; accept it.
    if page.url.endswith("/trading/resume") and page.locator("p.error").count():
        page.check("input[name=force]")
        with page.expect_navigation():
            page.click("#confirm-resume")
    page.wait_for_url(re.compile(r"/trading(\?.*)?$"))
    expect(page.locator("p.flash")).to_contain_text("trading resumed")


def _trading_until(tab: Tab, selector: str) -> None:
    """/trading until it offers `selector`: the page reads the panel's view of the halt,
    which follows the risk service's retained answer a moment later."""
    deadline = time.monotonic() + LIVE_S
    while True:
        tab.goto("/trading")
        if tab.page.locator(selector).count():
            return
        assert time.monotonic() < deadline, f"/trading never offered {selector}"
        time.sleep(0.2)


def test_halt_from_the_phone_shows_on_dashboard(box: PanelBox, browser: Browser) -> None:
    """An operator logs in, presses halt, confirms with a reason; the dashboard shows
    trading halted with that reason. Resumed afterwards, as the broker was found."""
    tab = open_tab(browser, box)
    page = tab.page
    log_in(tab, box, box.people[Role.OPERATOR])
    _resume_if_halted(tab)
    _trading_until(tab, "#halt")
    expect(page.locator("#live-halt")).to_contain_text("Trading running", timeout=LIVE_S * 1000)
    tab.shot("trading")

    reason = f"browser test {uuid.uuid4().hex[:8]}"
    page.click("#halt")
    page.wait_for_url(re.compile(r"/trading/halt$"))
    expect(page.locator("h1")).to_have_text("Halt trading?")
    page.fill("input[name=reason]", reason)
    tab.shot("halt-confirm")
    page.click("#confirm-halt")
    page.wait_for_url(re.compile(r"/trading(\?.*)?$"))
    flash = page.locator("p.flash")
    expect(flash).to_contain_text("trading halted")
    expect(flash).to_contain_text(reason)
    expect(page.locator("#live-halt")).to_contain_text("Trading halted", timeout=LIVE_S * 1000)
    tab.shot("trading-halted")

    try:
        page.click("nav.tabs a[href='/']")
        page.wait_for_url(box.base + "/")
        halted = page.locator("#live-dashboard .state.halted")
        expect(halted).to_contain_text("Trading halted", timeout=LIVE_S * 1000)
        expect(halted).to_contain_text(reason, timeout=LIVE_S * 1000)
        expect(halted).to_contain_text(f"by user:{box.people[Role.OPERATOR].name}")
        tab.shot("dashboard-halted")
    finally:
        _trading_until(tab, "#resume")
        page.click("#resume")
        page.wait_for_url(re.compile(r"/trading/resume$"))
        expect(page.locator("h1")).to_have_text("Resume trading?")
        tab.shot("resume-confirm")
        _resume_if_halted(tab)
        _trading_until(tab, "#halt")
    tab.close()


def test_ledger_verify(admin_tab: Tab) -> None:
    """The ledger, reached through "More", lists its chains; "Verify now" says each is
    intact."""
    page = admin_tab.page
    admin_tab.goto("/more")
    expect(page.locator("ul.links a")).to_have_count(6)  # the admin also sees trading settings
    admin_tab.shot("more")
    page.click("ul.links a[href='/ledger']")
    expect(page.locator("h1")).to_have_text("Ledger")
    expect(page.locator("table tbody tr").first).to_be_visible()
    admin_tab.shot("ledger")
    page.click("#verify")
    page.wait_for_url(re.compile(r"/ledger\?check=true"))
    verdicts = page.locator("ul.verdicts li")
    expect(verdicts.first).to_contain_text("intact")
    expect(page.locator("ul.verdicts li.bad")).to_have_count(0)
    admin_tab.shot("ledger-verified")


def test_account_page(box: PanelBox, admin_tab: Tab) -> None:
    page = admin_tab.page
    admin_tab.goto("/account")
    expect(page.locator("h1")).to_have_text(box.people[Role.ADMIN].name)
    expect(page.locator("main")).to_contain_text("Role: admin")
    expect(page.locator("main")).to_contain_text("Enrolled.")
    expect(page.locator("nav.tabs a[aria-current=page]")).to_have_text("More")
    admin_tab.shot("account")


def test_csp_violations_are_caught(box: PanelBox, browser: Browser) -> None:
    """The watch the other tests rely on: an inline script, which the panel's policy
    forbids, is blocked, and the tab reports it."""
    tab = open_tab(browser, box)
    page = tab.page
    tab.goto("/login")
    tab.check_clean("login")
    page.evaluate("""() => { const s = document.createElement("script");
                             s.textContent = "window.__ran = true"; document.body.append(s); }""")
    expect(page.locator("body")).to_be_visible()
    page.wait_for_function("window.__csp.length > 0")
    assert not page.evaluate("window.__ran === true"), "an inline script ran"
    with pytest.raises(AssertionError, match="script-src"):
        tab.check_clean("after an inline script")
    assert any(w in e.lower() for e in tab.errors for w in CSP_WORDS), tab.errors
    tab.context.close()


def test_the_installed_app_says_when_the_box_is_unreachable(box: PanelBox, admin_tab: Tab) -> None:
    """After a logged-in page load the service worker controls the page. Offline, a page of
    the panel is the offline page (kept by the worker), which loads the page again by itself
    once the box answers."""
    page = admin_tab.page
    admin_tab.goto("/")
    page.wait_for_function("() => navigator.serviceWorker.controller !== null")
    assert page.evaluate("navigator.serviceWorker.controller.scriptURL") == box.base + "/sw.js"
    assert page.evaluate("document.querySelector('link[rel=manifest]').href") \
        == box.base + "/manifest.webmanifest"
    admin_tab.context.set_offline(True)
    try:
        page.goto(box.base + "/")
        expect(page.locator("#offline-message")).to_contain_text(
            "The box is unreachable right now")
        assert page.url == box.base + "/"  # the address is still the page that was wanted
        expect(page.locator("#offline img")).to_have_js_property("naturalWidth", 192)
        admin_tab.shot("offline")
    finally:
        admin_tab.context.set_offline(False)
    expect(page.locator("#live-dashboard")).to_be_visible(timeout=LIVE_S * 1000)


def _node_reported(broker: TestBroker, device: str, readings: list[tuple[float, float]]) -> None:
    """An ESP32 node's temperature readings (time, °C) on the bus, oldest first; not retained,
    so nothing outlives the test."""
    from datetime import UTC, datetime

    from appliance.bus.payloads import HomeState

    topic = str(registry.HOME_STATE.topic(device=device, entity="temperature"))

    async def publish() -> None:
        bus = broker.bus()
        await bus.connect()
        try:
            for ts, value in readings:
                state = HomeState(value=value, unit="°C",
                                  ts=datetime.fromtimestamp(ts, UTC).isoformat())
                await bus.publish(topic, state.model_dump_json().encode(), wait=True)
        finally:
            await bus.close()

    in_thread(publish())


def test_a_relay_switched_on_the_home_page_shows_the_state_it_reported(
        box: PanelBox, broker: TestBroker, admin_tab: Tab) -> None:
    """The demo relay (a simulated pin of the home-sensors service) switched from the home
    page: the page shows the new state once the service reports it, without a reload. An
    ESP32 node's readings of the last day show as its chart, in the room "Other"."""
    page = admin_tab.page
    now = time.time()
    # Every 15 minutes for a day: 14 °C now, 18 °C at the warmest, 10 °C at the coldest.
    day = [(now - k * 900, round(14 + 4 * math.sin(math.pi * k / 48), 1))
           for k in range(95, -1, -1)]
    _node_reported(broker, "shed", day)
    history = f"{box.base}/api/v1/home/shed/temperature/history"
    deadline = time.monotonic() + LIVE_S
    while len(page.request.get(history).json()["points"]) < 90:  # kept by home-sensors
        assert time.monotonic() < deadline, "the node's readings are not in the history"
        time.sleep(0.2)
    admin_tab.goto("/home")
    shed = page.locator("li[data-entity='shed/temperature']")
    expect(shed).to_contain_text("shed · temperature")
    expect(shed).to_contain_text("14 °C")
    expect(shed.locator("svg.spark polyline")).to_have_count(1)
    expect(shed.locator("svg.spark")).to_contain_text("18 °C")  # the day's highest
    expect(shed.locator("svg.spark")).to_contain_text("10 °C")  # and lowest
    expect(page.locator("section.card", has=shed).locator("h2")).to_have_text("Other")
    expect(page.locator("h1")).to_have_text("Home")
    relay = page.locator("li[data-entity='hall-light/switch']")
    expect(relay).to_contain_text("Hall light")
    value = relay.locator(".value")
    expect(value).to_have_text(re.compile(r"^(On|Off)$"), timeout=LIVE_S * 1000)
    before = value.inner_text()
    wanted = "Off" if before == "On" else "On"
    with page.expect_navigation():
        relay.locator("form.switch button").click()
    expect(page.locator("p.flash")).to_contain_text("Sent")
    page.evaluate("window.__same_page = true")  # gone if the page were loaded again
    expect(page.locator("li[data-entity='hall-light/switch'] .value")).to_have_text(
        wanted, timeout=LIVE_S * 1000)
    button = page.locator("li[data-entity='hall-light/switch'] form.switch button")
    expect(button).to_have_text("Turn off" if wanted == "On" else "Turn on")
    assert page.evaluate("window.__same_page === true"), "the page was loaded again"
    expect(page.locator("li[data-entity='garden-light/level'] svg.spark")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, \
        "the home page is wider than the phone"
    admin_tab.shot("home")
    # The switch as the live stream rendered it again works too (it carries the CSRF token).
    with page.expect_navigation():
        button.click()
    expect(page.locator("p.flash")).to_contain_text("Sent")
    expect(page.locator("li[data-entity='hall-light/switch'] .value")).to_have_text(
        before, timeout=LIVE_S * 1000)


def test_an_esp32_node_added_on_the_phone_gets_its_config_as_a_qr_code(admin_tab: Tab) -> None:
    """Devices: add an ESP32 node (its password and config.json shown once, the file as a
    QR code), then remove it through the confirm page."""
    page = admin_tab.page
    admin_tab.goto("/devices")
    expect(page.locator("h1")).to_have_text("Devices")
    name = f"porch-{uuid.uuid4().hex[:6]}"
    page.fill("input[name=name]", name)
    page.select_option("select[name=kind]", "esp32")
    with page.expect_navigation():
        page.click("#add-device")
    expect(page.locator("#device-added h1")).to_have_text(f"{name} added")
    expect(page.locator("#device-qr svg")).to_be_visible()
    box = page.locator("#device-qr svg").bounding_box()
    assert box and 200 <= box["width"] <= 390 and abs(box["width"] - box["height"]) < 1, box
    password = page.locator("#device-password").inner_text()
    assert len(password) >= 24 and password in page.locator("#device-config").inner_text()
    expect(page.locator(f"li[data-device='{name}']")).to_contain_text("ESP32 node")
    admin_tab.shot("device-added")

    admin_tab.goto("/devices")
    assert password not in page.content()
    admin_tab.shot("devices")
    page.click(f"li[data-device='{name}'] a.danger")
    expect(page.locator("h1")).to_have_text(f"Remove {name}?")
    with page.expect_navigation():
        page.click("#confirm-remove")
    expect(page.locator("p.flash")).to_contain_text(f"Device {name} (ESP32 node) removed")
    expect(page.locator(f"li[data-device='{name}']")).to_have_count(0)


def _api(tab: Tab, path: str, body: dict[str, Any]) -> Any:
    """A POST to the API with the phone's own session (its cookie and CSRF token), as a
    script on the page would; its answer."""
    csrf = tab.page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    answer = tab.page.request.post(f"{tab.base}/api/v1/{path}", data=body,
                                   headers={"x-csrf-token": csrf})
    assert answer.ok, answer.text()
    return answer.json()


def _trading_api(tab: Tab, action: str, body: dict[str, Any]) -> None:
    """Halt or resume, as the phone's session."""
    _api(tab, f"trading/{action}", body)


def _logs_until(tab: Tab, path: str, selector: str, text: str) -> None:
    """`path` until it lists `selector` with `text`: a service writes its line a moment
    after it handled what the page asked."""
    deadline = time.monotonic() + LIVE_S
    while True:
        tab.goto(path)
        if tab.page.locator(selector, has_text=text).count():
            return
        assert time.monotonic() < deadline, f"{path} never listed {text!r}"
        time.sleep(0.2)


def test_logs_follow_a_request_across_services(admin_tab: Tab) -> None:
    """A halt asked from the phone is in the risk service's lines on the Logs page; its
    request id leads to every line of that request, across services: the risk service's
    and the execution service's, which obeyed the halt. The level filter keeps the
    execution's warning. "Live" then adds a new line to the top without a reload."""
    page = admin_tab.page
    admin_tab.goto("/logs")
    expect(page.locator("h1")).to_have_text("Logs")
    _trading_api(admin_tab, "resume", {"force": True})
    reason = f"browser logs {uuid.uuid4().hex[:8]}"
    _trading_api(admin_tab, "halt", {"reason": reason})
    try:
        _logs_until(admin_tab, "/logs?service=risk", "ol.logs li", reason)
        expect(page.locator("select[name=service]")).to_have_value("risk")
        halted = page.locator("ol.logs li", has_text=reason).first
        expect(halted).to_contain_text("trading halted")
        with page.expect_navigation():
            halted.locator("a.rid").click()
        request_id = page.url.split("request_id=", 1)[1]
        expect(page.locator("input[name=request_id]")).to_have_value(request_id)
        _logs_until(admin_tab, f"/logs?request_id={request_id}", "ol.logs .svc", "execution")
        services = set(page.locator("ol.logs .svc").all_inner_texts())
        assert services == {"risk", "execution"}, services
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, \
            "the logs page is wider than the phone"
        admin_tab.shot("logs-request")

        page.select_option("select[name=level]", "WARN")
        with page.expect_navigation():
            page.click("form.filters button[type=submit]")
        expect(page.locator("ol.logs .svc")).to_have_text(["execution"])
        expect(page.locator("ol.logs .lvl")).to_have_text(["WARN"])
        expect(page.locator("ol.logs li").first).to_contain_text("trading halted")
        admin_tab.shot("logs")

        admin_tab.goto("/logs?service=risk")
        page.evaluate("window.__same_page = true")  # gone if the page were loaded again
        page.click("#live-toggle")
        expect(page.locator("#live-toggle")).to_have_attribute("aria-pressed", "true")
        expect(page.locator("#log-lines[data-following]")).to_have_count(1)
    finally:
        _trading_api(admin_tab, "resume", {"force": True})
    newest = page.locator("ol.logs li").first
    expect(newest).to_contain_text("trading resumed", timeout=LIVE_S * 1000)
    expect(newest.locator(".svc")).to_have_text("risk")
    assert page.evaluate("window.__same_page === true"), "the page was loaded again"
    admin_tab.shot("logs-live")


def test_logs_follow_a_trade_event_to_the_ledger(admin_tab: Tab) -> None:
    """A trade event sent to the panel's ingest API (as an expert advisor's script does) is
    on the Logs page among the panel's lines; its request id leads to the trade logger's
    line that stored it, with the event's id and its place in the ledger."""
    from appliance.simulate import simulated_trades

    page = admin_tab.page
    admin_tab.goto("/logs")
    account = f"browser-{uuid.uuid4().hex[:6]}"
    key = _api(admin_tab, "ledger/keys", {"account": account})["key"]
    event = json.loads(next(iter(simulated_trades(1, account, seed=9))).model_dump_json())
    sent = httpx.post(f"{admin_tab.base}/api/v1/trade_events", json=event,  # not the phone
                      headers={"authorization": f"Bearer {key}"})
    assert sent.status_code == 200, sent.text
    request_id = sent.headers["x-request-id"]
    _logs_until(admin_tab, "/logs?service=panel", f"ol.logs li a.rid[href$='{request_id}']",
                "")
    received = page.locator("ol.logs li", has=page.locator(f"a.rid[href$='{request_id}']"))
    expect(received.first).to_contain_text("trade events received")
    with page.expect_navigation():
        received.first.locator("a.rid").click()
    _logs_until(admin_tab, f"/logs?request_id={request_id}", "ol.logs .svc", "trade-logger")
    stored = page.locator("ol.logs li", has_text="trade event stored")
    expect(stored).to_contain_text(event["event_id"])
    assert set(page.locator("ol.logs .svc").all_inner_texts()) == {"panel", "trade-logger"}
    admin_tab.shot("logs-trade-event")


# -- the account's authenticator and sessions, the trading settings, halt and flatten -----------
def test_enrol_totp_on_the_phone_then_log_in_with_it(box: PanelBox, browser: Browser) -> None:
    """Someone new to the box logs in with the password, sets up an authenticator app on the
    account page (the key read off the page, the code computed by pyotp), gets ten backup
    codes, logs out, and logs in again with the password and a code; the account page then
    lists the session as this one."""
    import pyotp

    name = f"tess{uuid.uuid4().hex[:4]}"
    box.users.add(name, PASSWORD, Role.VIEWER, actor="cli:test")
    tab = open_tab(browser, box)
    page = tab.page
    tab.goto("/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_url(box.base + "/")
    tab.goto("/account")
    expect(page.locator("main")).to_contain_text("Not set up.")
    page.click("#enrol")
    expect(page.locator(".qr svg")).to_be_visible()
    secret = page.locator("#totp-secret").inner_text().strip()
    tab.shot("account-totp-enrol")
    person = Person(name, Role.VIEWER, totp=pyotp.TOTP(secret))
    page.fill("form[action='/account/totp/confirm'] input[name=code]", box.code(person))
    page.click("form[action='/account/totp/confirm'] button[type=submit]")
    expect(page.locator("#backup-codes li")).to_have_count(10)
    page.click("header form.logout button[type=submit]")
    page.wait_for_url(re.compile(r"/login"))

    log_in(tab, box, person)  # password, then a code of the app just set up
    tab.goto("/account")
    expect(page.locator("main")).to_contain_text("Enrolled.")
    expect(page.locator("main")).to_contain_text("10 of 10 left")
    sessions = page.locator("#sessions li")
    expect(sessions).to_have_count(1)  # the first one ended at the logout
    expect(sessions).to_contain_text("this one")
    expect(sessions).to_contain_text("Chrome")
    page.locator("#sessions").scroll_into_view_if_needed()
    tab.shot("account-sessions")
    tab.close()


def _execution_mode(broker: TestBroker) -> str:
    async def ask() -> Any:
        bus = broker.bus()
        await bus.connect()
        try:
            return await bus.request("execution", "positions", {}, timeout=10)
        finally:
            await bus.close()

    reply = in_thread(ask())
    assert reply.ok, reply.error
    return str(reply.result["mode"])


def test_going_live_without_the_code_is_refused(box: PanelBox, broker: TestBroker,
                                                admin_tab: Tab) -> None:
    """The trading settings warn before going live; the switch sent without the
    authenticator code (the browser's own check taken away) is refused by the box, the page
    says so, and the account stays on paper."""
    from tests.panel_box import ACCOUNT

    page = admin_tab.page
    admin_tab.goto("/trading/settings")
    expect(page.locator("h1")).to_have_text("Trading settings")
    card = page.locator(f"#account-{ACCOUNT}")
    expect(card.locator("dd.mode")).to_have_text("paper")
    expect(card.locator("p.flash.warn").first).to_contain_text("real orders with real money")
    expect(card.locator("details.keys input[name=secret]")).to_have_attribute("type", "password")
    expect(card.locator("details.keys input[name=api_key]")).to_have_attribute(
        "autocomplete", "off")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, \
        "the trading settings are wider than the phone"
    admin_tab.shot("trading-settings")

    card.locator("form.mode input[name=code]").evaluate("input => input.removeAttribute('required')")
    with page.expect_navigation():
        card.locator("#go-live").click()
    expect(page.locator("#mode-error")).to_contain_text("type the code")
    expect(page.locator(f"#account-{ACCOUNT} dd.mode")).to_have_text("paper")
    admin_tab.shot("trading-settings-refused")
    assert _execution_mode(broker) == "paper"


def test_halt_and_flatten_asks_first(box: PanelBox, admin_tab: Tab) -> None:
    """"Halt and flatten" on the trading page leads to a confirmation with a warning and a
    reason; confirmed, the page shows what the risk service answered. Resumed afterwards."""
    page = admin_tab.page
    _resume_if_halted(admin_tab)
    _trading_until(admin_tab, "#halt")
    expect(page.locator("#positions h2")).to_have_text("Positions and open orders")
    page.click("#flatten")
    page.wait_for_url(re.compile(r"/trading/flatten$"))
    expect(page.locator("h1")).to_have_text("Halt and flatten?")
    expect(page.locator("p.flash.warn")).to_contain_text("market orders")
    reason = f"browser flatten {uuid.uuid4().hex[:6]}"
    page.fill("input[name=reason]", reason)
    admin_tab.shot("flatten-confirm")
    try:
        with page.expect_navigation():
            page.click("#confirm-flatten")
        page.wait_for_url(re.compile(r"/trading(\?.*)?$"))
        flash = page.locator("p.flash")
        expect(flash).to_contain_text("halted and flattened")
        expect(flash).to_contain_text(reason)
    finally:
        _trading_until(admin_tab, "#resume")
        _resume_if_halted(admin_tab)
        _trading_until(admin_tab, "#halt")


def test_files_from_the_phone(box: PanelBox, admin_tab: Tab, tmp_path: Path) -> None:
    """Files, opened from More: a file uploaded with the progress bar filling, listed,
    downloaded with the same bytes, shared by a link that a browser without a login opens,
    and deleted after a confirmation (its link gone with it)."""
    page = admin_tab.page
    admin_tab.goto("/more")
    with page.expect_navigation():
        page.click("a[href='/files']")
    expect(page.locator("h1")).to_have_text("Files")
    expect(page.locator("nav.tabs a[aria-current=page]")).to_have_text("More")
    name = f"holiday-{uuid.uuid4().hex[:6]}.bin"
    data = os.urandom(2 * 1024 * 1024)
    (tmp_path / name).write_bytes(data)
    page.set_input_files("#upload input[type=file]", str(tmp_path / name))
    page.click("#upload-button")
    expect(page.locator("#upload-status")).to_have_text(f"Uploaded {name}.")
    bar = page.locator("#upload-progress")
    expect(bar).to_be_visible()
    # The bar's end is the whole request as the browser sent it (more than the file): set by
    # the upload's progress events, and reached.
    value, end = bar.evaluate("b => [b.value, b.max]")
    assert value == end > len(data), (value, end)
    row = page.locator(f"li[data-file='{name}']")
    expect(row).to_contain_text("2.0 MB")

    with page.expect_download() as download:
        row.locator("a[download]").click()
    assert download.value.suggested_filename == name
    assert Path(download.value.path()).read_bytes() == data

    row.locator("details.share summary").click()
    expect(row.locator("button[value='7d']")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "wider than the phone"
    admin_tab.shot("files")
    with page.expect_navigation():
        row.locator("button[value='1d']").click()
    expect(page.locator("#shared h2")).to_have_text(f"Share link for {name}")
    link = page.locator("#share-url").inner_text()
    admin_tab.shot("files-shared")
    stranger = admin_tab.context.browser.new_context(**PHONE)  # type: ignore[union-attr]
    try:
        fetched = stranger.request.get(link)
        assert fetched.status == 200 and fetched.body() == data
        assert "attachment" in fetched.headers["content-disposition"]

        page.locator(f"li[data-file='{name}'] a.danger").click()
        expect(page.locator("h1")).to_have_text(f"Delete {name}?")
        with page.expect_navigation():
            page.click("#confirm-delete")
        expect(page.locator("p.flash")).to_have_text(f"Deleted {name}.")
        expect(page.locator(f"li[data-file='{name}']")).to_have_count(0)
        assert stranger.request.get(link).status == 404
    finally:
        stranger.close()


def test_the_dashboard_warns_of_a_local_only_backup(box: PanelBox, broker: TestBroker,
                                                    admin_tab: Tab) -> None:
    """A backup job whose target is the box's own disk, and the backup alert, as the backup
    service retains them, on the dashboard."""
    from appliance.bus.payloads import BackupAlert, BackupResult

    job = f"phone-{uuid.uuid4().hex[:6]}"
    ago = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 5 * 3600))
    sent = [(registry.BACKUP_RESULT.topic(job=job), BackupResult(
                job=job, ok=True, target="local:/var/lib/circles/backups", local_only=True,
                last_success=ago)),
            (registry.BACKUP_ALERT.topic(), BackupAlert(
                alert=True, reason=f"{job} has no backup off the box", jobs=[job]))]

    async def retain(clear: bool) -> None:
        bus = broker.bus()
        await bus.connect()
        try:
            for topic, payload in sent:
                await bus.publish(str(topic), b"" if clear else payload.model_dump_json().encode(),
                                  retain=True, wait=True)
        finally:
            await bus.close()

    in_thread(retain(False))
    try:
        page = admin_tab.page
        admin_tab.goto("/")
        card = page.locator("#backups")
        expect(card.locator(f"li[data-job='{job}']")).to_contain_text("last success 5 h ago",
                                                                       timeout=LIVE_S * 1000)
        expect(card.locator(f"li[data-job='{job}'] .badge.warn")).to_have_text(
            "local only — not safe from a dead SD card")
        expect(card.locator("#backup-alert")).to_contain_text(f"{job} has no backup off the box")
        admin_tab.shot("dashboard-backups")
    finally:
        in_thread(retain(True))
