"""The automation service: rules fire once per event and are gated by only_if and between,
timed actions revert by a clock moved by hand and survive a restart, schedules fire at their
cron times (crontab's weekdays), bad settings exit 78 naming the rule, and the process
commands a device under the trigger's request id over the real broker."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from appliance.bus import MemoryBroker, MemoryBus, registry
from appliance.bus.payloads import CommandRequest, HomeState
from appliance.config import settings_class
from appliance.logging import request_id
from appliance.runtime import Runner
from modules.automation.service import AutomationService
from modules.automation.settings import AutomationSettings, Condition, parse_duration
from tests.helpers import Collector, ServiceProcess, TestBroker, circles, circles_env, pump, until, watcher

BERLIN = ZoneInfo("Europe/Berlin")
T0 = datetime(2024, 6, 3, 20, 0, tzinfo=BERLIN)  # a Monday evening
MOTION = str(registry.HOME_STATE.topic(device="hall-motion", entity="motion"))
LEVEL = str(registry.HOME_STATE.topic(device="garden-light", entity="level"))
LIGHT_STATUS = str(registry.HOME_STATUS.topic(device="hall-light"))
LIGHT = str(registry.HOME_SET.topic(device="hall-light", entity="switch"))
BOILER = str(registry.HOME_SET.topic(device="boiler", entity="switch"))


class Clock:
    """The service's clock, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def hall_rule(**extra: Any) -> dict[str, Any]:
    return {"name": "hall light", "when": {"topic": MOTION, "is": "ON"},
            "then": {"topic": LIGHT, "payload": "ON"}, **extra}


async def start(broker: MemoryBroker, state: Path, clock: Clock, **config: Any) -> Runner:
    """The service on the in-memory bus with its state in `state`, started and subscribed."""
    config.setdefault("timezone", "Europe/Berlin")
    section = AutomationSettings(**config)
    settings = settings_class({"automation": AutomationSettings})(automation=section, state_dir=state)
    bus = MemoryBus("automation", broker)
    service = AutomationService(settings, bus)
    service.clock = clock
    runner = Runner(service, bus)
    await bus.connect()
    await service.start()
    await bus.subscribe(runner.filters())
    return runner


def of(runner: Runner) -> AutomationService:
    assert isinstance(runner.service, AutomationService)
    return runner.service


async def tell(home: MemoryBus, topic: str, value: Any, rid: str | None = None) -> None:
    """Publish a home state (retained, as devices do) under the request id `rid`."""
    params = registry.HOME_STATE.parse(topic)
    assert params is not None
    token = request_id.set(rid)
    try:
        await home.send(registry.HOME_STATE, HomeState(value=value), device=params["device"],
                        entity=params["entity"])
    finally:
        request_id.reset(token)


async def commands(home: MemoryBus) -> list[tuple[str, str]]:
    return [(m.topic, m.text) for m in await home.receive(1000, timeout=0)]


async def home_bus(broker: MemoryBroker) -> MemoryBus:
    return await watcher(broker, str(registry.HOME_SET.filter()))


async def test_a_rule_fires_once_per_matching_event(tmp_path: Path) -> None:
    broker = MemoryBroker()
    home = await home_bus(broker)
    await tell(home, MOTION, "ON")  # retained before the service starts
    auto = await start(broker, tmp_path, Clock(T0), rules=[hall_rule()])
    await pump([auto])
    assert await commands(home) == []  # how things were, not an event
    await tell(home, MOTION, "ON")
    await tell(home, MOTION, "OFF")
    await pump([auto])
    assert await commands(home) == []

    await tell(home, MOTION, "ON", rid="motion-1")
    await pump([auto])
    (sent,) = await home.receive(1000, timeout=0)
    assert (sent.topic, sent.text, sent.request_id, sent.sender) == (LIGHT, "ON", "motion-1", "automation")
    assert not sent.retain
    await tell(home, MOTION, "ON")  # published again: the same state, no new event
    await pump([auto])
    assert await commands(home) == []

    await tell(home, MOTION, "OFF")
    await tell(home, MOTION, "ON", rid="motion-2")
    await pump([auto])
    assert [(m.text, m.request_id) for m in await home.receive(1000, timeout=0)] == [("ON", "motion-2")]

    await home.publish(MOTION, b"", qos=1, retain=True)  # the sensor's state deleted: unknown
    await tell(home, MOTION, "ON")
    await pump([auto])
    assert await commands(home) == [(LIGHT, "ON")]
    assert of(auto).stats.fired == 3


async def test_an_old_state_fires_nothing(tmp_path: Path) -> None:
    """A node's buffered reading, or one queued while the service was down, arrives late:
    it sets what is known, but is no event to act on now."""
    broker = MemoryBroker()
    home = await home_bus(broker)
    clock = Clock(datetime.now(UTC))
    auto = await start(broker, tmp_path, clock, rules=[hall_rule()], max_event_age_s=60)
    for age_s, value in ((3600, "OFF"), (120, "ON"), (90, "OFF")):
        state = HomeState(value=value, ts=(clock.now - timedelta(seconds=age_s)).isoformat())
        await home.send(registry.HOME_STATE, state, device="hall-motion", entity="motion")
    await pump([auto])
    assert await commands(home) == [] and of(auto).stats.fired == 0
    await tell(home, MOTION, "ON")  # now
    await pump([auto])
    assert await commands(home) == [(LIGHT, "ON")]


async def test_demo_rule_only_in_development(tmp_path: Path) -> None:
    for environment, expected in (("development", 1), ("production", 0)):
        settings = settings_class({"automation": AutomationSettings})(
            automation=AutomationSettings(), state_dir=tmp_path, environment=environment)
        service = AutomationService(settings, MemoryBus("automation", MemoryBroker()))
        assert len(service.rules) == expected


async def test_only_if_and_between_gate_a_rule(tmp_path: Path) -> None:
    broker = MemoryBroker()
    home = await home_bus(broker)
    clock = Clock(T0)
    rule = hall_rule(only_if=[{"topic": LEVEL, "below": 30}, {"topic": LIGHT_STATUS, "is": "online"}],
                     between="18:00-07:00")
    auto = await start(broker, tmp_path, clock, rules=[rule])

    async def motion() -> list[tuple[str, str]]:
        await tell(home, MOTION, "OFF")
        await tell(home, MOTION, "ON")
        await pump([auto])
        return await commands(home)

    assert await motion() == []  # the light level is unknown
    await tell(home, LEVEL, 55.0)
    await home.send(registry.HOME_STATUS, "online", device="hall-light")
    assert await motion() == []  # not dark
    await tell(home, LEVEL, 20.0)
    await home.send(registry.HOME_STATUS, "offline", device="hall-light")
    assert await motion() == []  # the light is not there (a status topic's raw text)
    await home.send(registry.HOME_STATUS, "online", device="hall-light")
    assert await motion() == [(LIGHT, "ON")]

    clock.now = datetime(2024, 6, 4, 12, 0, tzinfo=BERLIN)
    assert await motion() == []  # outside 18:00-07:00
    clock.now = datetime(2024, 6, 4, 20, 0, tzinfo=BERLIN)
    await tell(home, MOTION, "ON")  # still ON since noon: no new event
    await pump([auto])
    assert await commands(home) == []
    clock.now = datetime(2024, 6, 5, 6, 59, 59, tzinfo=BERLIN)
    assert await motion() == [(LIGHT, "ON")]  # the window crosses midnight
    clock.now = datetime(2024, 6, 5, 7, 0, tzinfo=BERLIN)
    assert await motion() == []  # the end is not in the window
    clock.now = datetime(2024, 6, 5, 16, 0, tzinfo=UTC)  # 18:00 in Berlin: the zone counts
    assert await motion() == [(LIGHT, "ON")]


def test_conditions_compare_numbers_as_numbers_and_the_rest_as_text() -> None:
    def cond(**test: Any) -> Condition:
        return Condition.model_validate({"topic": LEVEL, **test})

    on = cond(**{"is": "ON"})
    assert on.holds("ON") and not on.holds("on") and not on.holds(True) and not on.holds(None)
    assert cond(**{"is": 21}).holds(21.0) and cond(**{"is": 21}).holds("21")
    assert cond(**{"is": True}).holds(True) and not cond(**{"is": True}).holds(1)
    assert cond(is_not="OFF").holds("ON") and not cond(is_not="OFF").holds("OFF")
    above = cond(above=25)
    assert above.holds(25.5) and above.holds("26") and not above.holds(25)
    assert not above.holds("high") and not above.holds(True) and not above.holds(None)
    band = cond(above=18, below=25)
    assert band.holds(20) and not band.holds(18) and not band.holds(25)


async def test_a_timed_action_reverts_after_its_duration_and_a_retrigger_extends_it(tmp_path: Path) -> None:
    broker = MemoryBroker()
    home = await home_bus(broker)
    clock = Clock(T0)
    auto = await start(broker, tmp_path, clock, rules=[hall_rule(**{"for": "5m"})])
    service = of(auto)

    await tell(home, MOTION, "ON", rid="motion-1")
    await pump([auto])
    assert await commands(home) == [(LIGHT, "ON")]
    (rule,) = (await service.cmd_rules(CommandRequest()))["rules"]
    assert rule["active_until"] == (T0 + timedelta(minutes=5)).isoformat()
    assert rule["last_fired"] == T0.isoformat() and rule["for_s"] == 300
    clock.advance(minutes=4, seconds=59)
    await service.tick()
    assert await commands(home) == []
    clock.advance(seconds=2)
    await service.tick()
    (revert,) = await home.receive(1000, timeout=0)
    assert (revert.topic, revert.text) == (LIGHT, "OFF")
    assert revert.request_id and revert.request_id != "motion-1"
    await service.tick()
    assert await commands(home) == []
    assert (await service.cmd_rules(CommandRequest()))["rules"][0]["active_until"] is None

    await tell(home, MOTION, "OFF")
    await tell(home, MOTION, "ON")
    await pump([auto])
    clock.advance(minutes=4)
    await tell(home, MOTION, "OFF")
    await tell(home, MOTION, "ON")  # motion again: the light stays on longer
    await pump([auto])
    assert await commands(home) == [(LIGHT, "ON"), (LIGHT, "ON")]
    clock.advance(minutes=2)  # 6 minutes after the first motion
    await service.tick()
    assert await commands(home) == []
    clock.advance(minutes=3, seconds=1)  # 5 minutes after the second
    await service.tick()
    await service.tick()
    assert await commands(home) == [(LIGHT, "OFF")]


async def test_a_revert_needs_its_own_payload_unless_on_or_off(tmp_path: Path) -> None:
    broker = MemoryBroker()
    home = await home_bus(broker)
    clock = Clock(T0)
    dim = hall_rule(then={"topic": LIGHT, "payload": 40}, revert="0", **{"for": "90s"})
    auto = await start(broker, tmp_path, clock, rules=[dim])
    await tell(home, MOTION, "ON")
    await pump([auto])
    clock.advance(seconds=91)
    await of(auto).tick()
    assert await commands(home) == [(LIGHT, "40"), (LIGHT, "0")]


async def test_a_schedule_fires_at_its_cron_time_and_once_after_a_jump(tmp_path: Path) -> None:
    broker = MemoryBroker()
    home = await home_bus(broker)
    clock = Clock(datetime(2024, 6, 3, 6, 29, tzinfo=BERLIN))  # Monday
    heating = {"name": "morning heating", "cron": "30 6 * * 1-5",
               "then": {"topic": BOILER, "payload": "ON"}}
    auto = await start(broker, tmp_path, clock, rules=[], schedules=[heating])
    service = of(auto)

    async def at(when: datetime) -> list[tuple[str, str]]:
        clock.now = when
        await service.tick()
        return await commands(home)

    assert await at(clock.now) == []
    assert await at(datetime(2024, 6, 3, 6, 29, 59, tzinfo=BERLIN)) == []
    assert await at(datetime(2024, 6, 3, 6, 30, tzinfo=BERLIN)) == [(BOILER, "ON")]
    assert await at(datetime(2024, 6, 3, 6, 30, 0, 500_000, tzinfo=BERLIN)) == []
    # Suspended from Monday to Thursday morning: three missed times fire once.
    assert await at(datetime(2024, 6, 6, 9, 0, tzinfo=BERLIN)) == [(BOILER, "ON")]
    assert await at(datetime(2024, 6, 6, 9, 0, 1, tzinfo=BERLIN)) == []
    assert await at(datetime(2024, 6, 7, 6, 30, tzinfo=BERLIN)) == [(BOILER, "ON")]  # Friday
    (schedule,) = (await service.cmd_rules(CommandRequest()))["schedules"]
    assert schedule["next_at"] == datetime(2024, 6, 10, 6, 30, tzinfo=BERLIN).isoformat()
    # Crontab's weekdays: 1-5 is Monday to Friday.
    assert await at(datetime(2024, 6, 8, 6, 30, tzinfo=BERLIN)) == []
    assert await at(datetime(2024, 6, 9, 6, 30, tzinfo=BERLIN)) == []
    assert await at(datetime(2024, 6, 10, 6, 30, tzinfo=BERLIN)) == [(BOILER, "ON")]
    # The clock set back an hour: the schedule counts from the new time.
    assert await at(datetime(2024, 6, 10, 5, 30, tzinfo=BERLIN)) == []
    assert await at(datetime(2024, 6, 10, 6, 30, tzinfo=BERLIN)) == [(BOILER, "ON")]


async def test_a_pending_revert_survives_a_restart(tmp_path: Path) -> None:
    broker = MemoryBroker()
    home = await home_bus(broker)
    clock = Clock(T0)
    config: dict[str, Any] = {"rules": [hall_rule(**{"for": "5m"})]}
    auto = await start(broker, tmp_path, clock, **config)
    await tell(home, MOTION, "ON")
    await pump([auto])
    assert await commands(home) == [(LIGHT, "ON")]
    assert (tmp_path / "automation" / "pending.json").is_file()

    assert isinstance(auto.bus, MemoryBus)
    auto.bus.crash()
    clock.advance(minutes=2)
    again = await start(broker, tmp_path, clock, **config)
    await pump([again])  # the retained ON: no firing
    await of(again).tick()
    assert await commands(home) == []  # not due yet
    clock.advance(minutes=3, seconds=1)
    await of(again).tick()
    assert await commands(home) == [(LIGHT, "OFF")]

    assert isinstance(again.bus, MemoryBus)
    again.bus.crash()
    third = await start(broker, tmp_path, clock, **config)
    clock.advance(minutes=10)
    await of(third).tick()
    assert await commands(home) == []  # sent once, not again after the next restart


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("5m", 300), ("1h30m", 5400), ("2d", 172800),
                                          ("1h 5s", 3605), (45, 45)])
def test_durations(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["5 minutes", "", "m", "1.5h", "5m1h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def _toml_rule(**fields: Any) -> str:
    doc = {"name": "hall light", "when": {"topic": MOTION, "is": "ON"},
           "then": {"topic": LIGHT, "payload": "ON"}, **fields}
    return "[[automation.rules]]\n" + "\n".join(f"{key} = {_toml(value)}" for key, value in doc.items())


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


HEATING = ('[[automation.schedules]]\nname = "morning heating"\ncron = "61 6 * * *"\n'
           f'then = {{ topic = "{BOILER}", payload = "ON" }}')


@pytest.mark.parametrize("config,fragments", [
    (_toml_rule(when={"topic": LIGHT, "is": "ON"}),
     ["automation.rules.0", "'hall light'", "when.topic", "is not a home state or status topic"]),
    (_toml_rule(then={"topic": MOTION, "payload": "ON"}),
     ["automation.rules.0", "'hall light'", "then.topic", "is not a home command topic"]),
    (_toml_rule(**{"for": "5 minutes"}), ["automation.rules.0", "'hall light'", "for", "5 minutes"]),
    (_toml_rule(between="25:00-07:00"), ["'hall light'", "between", "25:00-07:00"]),
    (_toml_rule(then={"topic": LIGHT, "payload": "50"}, **{"for": "5m"}),
     ["'hall light'", "revert: needed"]),
    (_toml_rule(when={"topic": MOTION, "is": "ON", "above": 3}), ["'hall light'", "when: give one test"]),
    (_toml_rule(whenn=1), ["'hall light'", "whenn", "Extra inputs"]),
    (_toml_rule(between="7-9", **{"for": "soon"}),
     ["automation.rules.0: rule 'hall light': ", "between: '7-9' is not a time window",
      " | for: 'soon' is not a duration"]),
    (HEATING, ["automation.schedules.0", "'morning heating'", "cron", "61"]),
    (HEATING.replace("61 6 * * *", "0 0 30 2 *"), ["'morning heating'", "cron", "never fires"]),
    (_toml_rule() + "\n" + HEATING.replace("morning heating", "hall light").replace("61 6", "0 6"),
     ["automation", "schedules.0", "'hall light'", "already used by rules.0"]),
    ('[automation]\ntimezone = "Mars/Olympus"', ["automation.timezone", "Mars/Olympus"]),
], ids=["when-not-a-state", "then-not-a-command", "duration", "window", "revert", "two-tests",
        "unknown-key", "two-mistakes", "cron", "cron-never", "same-name", "timezone"])
def test_bad_settings_exit_78_naming_the_rule(tmp_path: Path, config: str, fragments: list[str]) -> None:
    path = tmp_path / "circles.toml"
    path.write_text(config + "\n")
    done = circles(circles_env(tmp_path, CIRCLES_CONFIG=str(path)), "run", "automation", timeout=60)
    assert done.returncode == 78, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("config: automation")
    for fragment in fragments:
        assert fragment in line, line



async def test_process_commands_the_device_under_the_triggers_request_id(
        broker: TestBroker, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    sensor = str(registry.HOME_STATE.topic(device=f"motion-{tag}", entity="motion"))
    light = str(registry.HOME_SET.topic(device=f"light-{tag}", entity="switch"))
    path = tmp_path / "circles.toml"
    path.write_text(
        "[[automation.rules]]\n"
        'name = "test light"\n'
        f'when = {{ topic = "{sensor}", is = "ON" }}\n'
        f'then = {{ topic = "{light}", payload = "ON" }}\n'
        'for = "1s"\n')
    status = str(registry.SERVICE_STATUS.topic(service="automation"))
    watch = await Collector.start(broker, light, status)
    proc = ServiceProcess("automation", broker.env(CIRCLES_CONFIG=str(path)), tmp_path)
    tester = broker.bus()
    await tester.connect()
    rid = f"motion-{tag}"
    try:
        await watch.wait(lambda ms: any(m.topic == status and m.payload == b"online" and not m.retain
                                        for m in ms), 15, "automation online")
        token = request_id.set(rid)
        try:
            await tester.send(registry.HOME_STATE, HomeState(value="ON"), wait=True,
                              device=f"motion-{tag}", entity="motion")
        finally:
            request_id.reset(token)
        (on,) = await watch.wait(lambda ms: watch.on(light), 15, "the light's command")
        assert (on.payload, on.request_id, on.sender) == (b"ON", rid, "automation")
        on, off = await watch.wait(lambda ms: len(watch.on(light)) >= 2 and watch.on(light), 15,
                                   "the revert")
        assert off.payload == b"OFF" and off.request_id and off.request_id != rid

        def logged() -> list[dict[str, Any]]:
            lines = [json.loads(line) for line in proc.log.splitlines() if line.startswith("{")]
            return [doc for doc in lines if doc["message"] in ("rule fired", "timed action reverted")]

        fired, reverted = await until(lambda: len(logged()) >= 2 and logged(), 10, "two log lines")
        assert (fired["message"], fired["request_id"], fired["extra"]["rule"]) == ("rule fired", rid, "test light")
        assert fired["extra"]["topic"] == light and fired["extra"]["payload"] == "ON"
        assert reverted["request_id"] == off.request_id and reverted["extra"]["fired_by"] == rid
        reply = await tester.request("automation", "rules", timeout=10)
        assert reply.ok, reply.error
        (rule,) = reply.result["rules"]
        assert (rule["name"], rule["holds"], rule["active_until"]) == ("test light", True, None)
        assert rule["last_fired"] and reply.result["schedules"] == [] and reply.result["pending"] == []
        assert proc.process.poll() is None
    finally:
        proc.stop()
        await tester.publish(sensor, b"", qos=1, retain=True, wait=True)  # no retained leftovers
        await tester.close()
        await watch.close()
