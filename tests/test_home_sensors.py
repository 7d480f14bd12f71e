"""The home-sensors service on the real broker, with gpiozero's mock pins as the hardware."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from gpiozero import Device as GpioDevice
from gpiozero.pins.mock import MockFactory, MockPWMPin, MockSPIDevice, MockTriggerPin

from appliance.bus import Message, registry
from appliance.bus.payloads import DeadLetter, HomeState
from appliance.ha_discovery import IDENTITY, REQUIRED
from modules.home_sensors.history import History
from modules.home_sensors.service import HomeSensorsService
from modules.home_sensors.settings import HomeSensorsSettings, demo_devices
from tests.helpers import Collector, ServiceProcess, TestBroker, circles, serving

# DistanceSensor warns that mock pins time echoes less precisely than pigpio would.
pytestmark = pytest.mark.filterwarnings("ignore::gpiozero.PWMSoftwareFallback")
W1_ID = "28-00000a1b2c3d"
SERVICE = "home-sensors"


def state_topic(device: str, entity: str) -> str:
    return str(registry.HOME_STATE.topic(device=device, entity=entity))


def set_topic(device: str, entity: str) -> str:
    return str(registry.HOME_SET.topic(device=device, entity=entity))


class MockMCP3008(MockSPIDevice):
    """The ADC's side of the SPI conversation (start bit, single/diff, channel, then 10 bits)."""

    def __init__(self) -> None:
        super().__init__(11, 10, 9, 8)
        self.channels = [0.0] * 8  # volts, of 3.3
        self.state = "idle"

    def on_start(self) -> None:
        super().on_start()
        self.state = "idle"

    def on_bit(self) -> None:
        if self.state == "idle" and self.rx_buf[-1]:
            self.state, self.rx_buf = "mode", []
        elif self.state == "mode":
            self.state, self.rx_buf = "channel", []
        elif self.state == "channel" and len(self.rx_buf) == 3:
            volts = min(3.3, max(0.0, self.channels[self.rx_word()]))
            self.tx_word(round(volts / 3.3 * 1023), 12)
            self.state = "result"
        elif self.state == "result" and not self.tx_buf:
            self.state, self.rx_buf = "idle", []


class Pins(MockFactory):
    """gpiozero's mock pins, PWM-capable where the dimmer is (a factory gives one class of
    pin by default, and the SPI pins must not be PWM ones)."""

    PWM = {"GPIO18", "18"}

    def pin(self, name: Any, pin_class: Any = None, **kwargs: Any) -> Any:
        if pin_class is None and str(name) in self.PWM:
            pin_class = MockPWMPin
        return super().pin(name, pin_class, **kwargs)


@pytest.fixture
def pins() -> Iterator[MockFactory]:
    """gpiozero's mock pins as the box's hardware, with an echo for the ultrasonic sensor's
    trigger (which would otherwise wait forever); the tests add an MCP3008 on SPI."""
    factory = Pins()
    GpioDevice.pin_factory = factory
    factory.pin(23, pin_class=MockTriggerPin, echo_pin=factory.pin(24), echo_time=0.004)
    yield factory
    GpioDevice.pin_factory = None
    factory.reset()


def hardware(tmp_path: Path) -> dict[str, Any]:
    w1 = tmp_path / "w1"
    (w1 / W1_ID).mkdir(parents=True)
    (w1 / W1_ID / "w1_slave").write_text("72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n"
                                         "72 01 4b 46 7f ff 0e 10 57 t=23125\n")
    thermal = tmp_path / "thermal"
    thermal.write_text("51234\n")
    return {"hardware": "gpio", "w1_path": w1, "thermal_file": thermal, "interval_s": 1.0,
            "devices": [
                # Read periodically only once an hour: their changes must come by themselves.
                {"name": "front-door", "kind": "contact", "pin": 17, "bounce_s": 0,
                 "device_class": "door", "room": "Hall", "interval_s": 3600},
                {"name": "hall-motion", "kind": "motion", "pin": 4, "interval_s": 3600},
                {"name": "living-room", "kind": "ds18b20"},
                {"name": "garden-light", "kind": "mcp3008", "channel": 2, "entity": "light"},
                {"name": "water-tank", "kind": "ultrasonic", "echo": 24, "trigger": 23},
                {"name": "box", "kind": "cpu_temperature"},
                {"name": "hall-light", "kind": "switch", "pin": 27},
                {"name": "desk-lamp", "kind": "pwm", "pin": 18},
            ]}


@pytest.fixture
async def watch(broker: TestBroker) -> AsyncIterator[Collector]:
    collector = await Collector.start(broker, "circles/home/#", "homeassistant/#",
                                      str(registry.DLQ.topic(service=SERVICE)))
    yield collector
    await collector.close()


def states(watch: Collector, device: str, entity: str) -> list[HomeState]:
    return [HomeState.model_validate_json(m.payload) for m in watch.on(state_topic(device, entity))
            if m.payload]


async def value_becomes(watch: Collector, device: str, entity: str, wanted: Any,
                        what: str) -> HomeState:
    found = await watch.wait(lambda ms: [s for s in states(watch, device, entity)
                                         if s.value == wanted], 10, what)
    return found[-1]


async def test_inputs_reach_the_bus_and_commands_drive_the_pins(
        broker: TestBroker, pins: MockFactory, watch: Collector, tmp_path: Path) -> None:
    adc = MockMCP3008()
    adc.channels[2] = 3.3 * 0.4
    tester = broker.bus()
    await tester.connect()
    try:
        async with serving(broker, HomeSensorsService, tmp_path, **hardware(tmp_path)):
            await value_becomes(watch, "front-door", "contact", "OFF", "the door closed at start")
            # A press on the contact's pin (pulled up: pressed = low) is published at once,
            # not at the next periodic reading.
            pins.pin(17).drive_low()
            await value_becomes(watch, "front-door", "contact", "ON", "the contact closed")
            watch.messages.clear()
            pins.pin(17).drive_high()
            await value_becomes(watch, "front-door", "contact", "OFF", "the contact open again")
            pins.pin(4).drive_high()
            await value_becomes(watch, "hall-motion", "motion", "ON", "motion")

            # Readings of the kernel's w1 file, the thermal zone, the ADC and the echo.
            temperature = await value_becomes(watch, "living-room", "temperature", 23.12,
                                              "the probe's 23.125 °C")
            assert temperature.unit == "°C"
            await value_becomes(watch, "box", "temperature", 51.2, "the CPU's 51.234 °C")
            await value_becomes(watch, "garden-light", "light", 40.0, "40 % of the ADC's range")
            distance = await watch.wait(lambda ms: states(watch, "water-tank", "distance"), 10,
                                        "a distance")
            assert 30 < distance[-1].value < 200 and distance[-1].unit == "cm"

            # A command drives the relay's pin; the state published is the pin's.
            relay = pins.pin(27)
            assert relay.state is False
            await tester.publish(set_topic("hall-light", "switch"), b"ON", wait=True)
            await value_becomes(watch, "hall-light", "switch", "ON", "the relay on")
            assert relay.state is True
            watch.messages.clear()  # from here, an OFF can only come from the toggle
            await tester.publish(set_topic("hall-light", "switch"), b"toggle", wait=True)
            await value_becomes(watch, "hall-light", "switch", "OFF", "the relay toggled off")
            assert relay.state is False

            lamp = pins.pin(18)
            await tester.publish(set_topic("desk-lamp", "brightness"), b"30", wait=True)
            await value_becomes(watch, "desk-lamp", "brightness", 30, "the lamp at 30 %")
            assert lamp.state == pytest.approx(0.3)
            await tester.publish(set_topic("desk-lamp", "brightness"), b"OFF", wait=True)
            await value_becomes(watch, "desk-lamp", "brightness", 0, "the lamp off")
            watch.messages.clear()
            await tester.publish(set_topic("desk-lamp", "brightness"), b"ON", wait=True)
            await value_becomes(watch, "desk-lamp", "brightness", 30, "ON: the last brightness")
            assert lamp.state == pytest.approx(0.3)

            # Bad commands go to the dead letters with the reason; the pins do not move.
            dlq = str(registry.DLQ.topic(service=SERVICE))
            await tester.publish(set_topic("desk-lamp", "brightness"), b"150", wait=True)
            await tester.publish(set_topic("living-room", "temperature"), b"ON", wait=True)
            await tester.publish(set_topic("hall-light", "nothing"), b"ON", wait=True)
            letters = await watch.wait(lambda ms: [DeadLetter.model_validate_json(m.payload)
                                                   for m in ms if m.topic == dlq][:3]
                                       if len(watch.on(dlq)) >= 3 else None, 10, "dead letters")
            reasons = [letter.reason for letter in letters]
            assert "not within 0-100" in reasons[0]
            assert "takes no commands" in reasons[1]
            assert "no entity 'nothing'" in reasons[2]
            assert lamp.state == pytest.approx(0.3)
    finally:
        await tester.close()
        adc.close()


async def test_a_probe_that_fails_makes_its_device_unavailable(
        broker: TestBroker, pins: MockFactory, watch: Collector, tmp_path: Path) -> None:
    config = hardware(tmp_path)
    config["devices"] = [{"name": "cellar", "kind": "ds18b20"}]
    slave = config["w1_path"] / W1_ID / "w1_slave"
    status = str(registry.HOME_STATUS.topic(device="cellar"))
    async with serving(broker, HomeSensorsService, tmp_path, **config):
        await watch.wait(lambda ms: [m for m in watch.on(status) if m.payload == b"online"], 10,
                         "the probe online")
        slave.write_text("72 01 4b 46 7f ff 0e 10 57 : crc=57 NO\n72 01 t=99999\n")
        await watch.wait(lambda ms: [m for m in watch.on(status) if m.payload == b"offline"], 10,
                         "the probe offline on a CRC error")
        assert all(s.value == 23.12 for s in states(watch, "cellar", "temperature"))
        slave.write_text("72 01 : crc=57 YES\n72 01 t=19500\n")
        await value_becomes(watch, "cellar", "temperature", 19.5, "a good reading again")
        assert watch.on(status)[-1].payload == b"online"


def live_config(message: Message) -> bool:
    """A discovery config published now by the service (not one retained from before)."""
    return message.topic.startswith("homeassistant/") and bool(message.payload) \
        and message.sender == SERVICE and not message.retain


async def test_discovery_announces_removes_and_answers_home_assistant(
        broker: TestBroker, pins: MockFactory, watch: Collector, tmp_path: Path) -> None:
    config = hardware(tmp_path)
    async with serving(broker, HomeSensorsService, tmp_path, **config):
        configs = await watch.wait(
            lambda ms: [m for m in ms if live_config(m)]
            if len({m.topic for m in ms if live_config(m)}) >= 8 else None, 10, "eight configs")
        by_topic = {m.topic: m for m in configs}
        for topic, message in by_topic.items():
            component = registry.HA_DISCOVERY.parse(topic)["component"]
            doc = json.loads(message.payload)
            assert REQUIRED[component] | IDENTITY <= set(doc), (topic, doc)
            assert [a["topic"] for a in doc["availability"]][0] == "circles/home-sensors/status"
        door = json.loads(by_topic["homeassistant/binary_sensor/front-door/contact/config"].payload)
        assert door["device_class"] == "door" and door["device"]["suggested_area"] == "Hall"
        assert door["state_topic"] == state_topic("front-door", "contact")
        temp = json.loads(by_topic["homeassistant/sensor/living-room/temperature/config"].payload)
        assert (temp["unit_of_measurement"], temp["device_class"], temp["state_class"]) == \
            ("°C", "temperature", "measurement")
        lamp = json.loads(by_topic["homeassistant/light/desk-lamp/brightness/config"].payload)
        assert lamp["brightness_command_topic"] == set_topic("desk-lamp", "brightness")
        relay = json.loads(by_topic["homeassistant/switch/hall-light/switch/config"].payload)
        assert relay["command_topic"] == set_topic("hall-light", "switch")
        assert len({json.loads(m.payload)["unique_id"] for m in configs}) == len(by_topic)
        # Retained: a Home Assistant that connects later finds them all.
        late = await Collector.start(broker, *by_topic)
        try:
            await late.wait(lambda ms: {m.topic for m in ms if m.retain} == set(by_topic), 10,
                            "every config retained")
        finally:
            await late.close()

        # Home Assistant restarted: it says so, and gets every config again.
        before = len([m for m in watch.messages if live_config(m)])
        tester = broker.bus()
        await tester.connect()
        await tester.publish(str(registry.HA_STATUS.topic()), b"online", wait=True)
        await tester.close()
        await watch.wait(lambda ms: len([m for m in ms if live_config(m)]) >= before + 8, 10,
                         "every config again")

    # The motion sensor is taken out of the config: its entity and retained state go.
    config["devices"] = [d for d in config["devices"] if d["name"] != "hall-motion"]
    removed = "homeassistant/binary_sensor/hall-motion/motion/config"
    watch.messages.clear()
    async with serving(broker, HomeSensorsService, tmp_path, **config):
        await watch.wait(lambda ms: [m for m in ms if m.topic == removed and m.payload == b""
                                     and m.retain is False], 10, "the empty config")
        await watch.wait(lambda ms: [m for m in watch.on(state_topic("hall-motion", "motion"))
                                     if m.payload == b""], 10, "the state deleted")
    late = await Collector.start(broker, removed, state_topic("hall-motion", "motion"))
    try:
        await asyncio.sleep(1.0)  # what is retained arrives on subscribing; nothing should
        assert late.messages == []
    finally:
        await late.close()


async def test_history_keeps_what_the_bus_carried_and_answers_requests(
        broker: TestBroker, watch: Collector, tmp_path: Path) -> None:
    """Readings of any home entity (here a node's, with their own times) are kept; retained
    ones seen again at a restart are not counted twice."""
    node = "attic-node"
    now = datetime.now(UTC)
    tester = broker.bus()
    await tester.connect()
    try:
        async with serving(broker, HomeSensorsService, tmp_path, devices=[]):
            for minutes in range(10, 0, -1):
                state = HomeState(value=20 + minutes, unit="°C",
                                  ts=(now - timedelta(minutes=minutes)).isoformat())
                await tester.send(registry.HOME_STATE, state, device=node, entity="temperature",
                                  wait=True)
            await tester.publish(state_topic(node, "temperature"), b"{broken", wait=True)
            # A node without a set clock sends no time: the reading is stamped on arrival.
            await tester.publish(state_topic(node, "humidity"), b'{"value": 55}', qos=1,
                                 retain=True, wait=True)
            reply = None
            for _ in range(50):
                reply = await tester.request(SERVICE, "history", {
                    "device": node, "entity": "temperature", "hours": 1, "max_points": 3600})
                if reply.ok and len(reply.result["points"]) == 10:
                    break
                await asyncio.sleep(0.2)
            assert reply and reply.ok, reply
            points = reply.result["points"]
            assert [p[1] for p in points] == [float(20 + m) for m in range(10, 0, -1)]
            letters = watch.on(str(registry.DLQ.topic(service=SERVICE)))
            assert any("JSON" in DeadLetter.model_validate_json(m.payload).reason for m in letters)
            bad = await tester.request(SERVICE, "history", {"device": node})
            assert not bad.ok and "device and entity" in (bad.error or "")

            humidity = await tester.request(SERVICE, "history", {
                "device": node, "entity": "humidity", "hours": 1, "max_points": 3600})
            assert [p[4] for p in humidity.result["points"]] == [1]

        # Again after a restart: the retained last readings came back, and were not counted
        # (the one without a time would be stamped anew).
        async with serving(broker, HomeSensorsService, tmp_path, devices=[]):
            reply = await tester.request(SERVICE, "history", {
                "device": node, "entity": "temperature", "hours": 1, "max_points": 3600})
            assert reply.ok and len(reply.result["points"]) == 10
            humidity = await tester.request(SERVICE, "history", {
                "device": node, "entity": "humidity", "hours": 1, "max_points": 3600})
            assert [p[4] for p in humidity.result["points"]] == [1]
    finally:
        await tester.close()


def test_history_folds_old_readings_into_five_minute_means(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite", full_s=86400, keep_s=365 * 86400)
    t0 = 1_800_000_000.0  # a multiple of 300 s
    rows = [("a/t", t0 + i * 60, float(i)) for i in range(10)]  # two 5-minute buckets
    assert history.add(rows) == 10 and history.add(rows[:3]) == 0
    assert history.maintain(t0 + 86400 - 1) == (0, 0)  # all still within 24 h
    assert history.maintain(t0 + 86400 + 600) == (10, 0)
    later = t0 + 86400 + 600
    step, points = history.query("a/t", t0, t0 + 600, max_points=600, now=later)
    assert step == 300
    assert [(p[0], p[1], p[2], p[3], p[4]) for p in points] == [
        (t0, 2.0, 0.0, 4.0, 5), (t0 + 300, 7.0, 5.0, 9.0, 5)]
    # A late reading for a folded bucket merges into its mean.
    history.add([("a/t", t0 + 30, 14.0)])
    history.maintain(t0 + 86400 + 600)
    _, points = history.query("a/t", t0, t0 + 300, max_points=600, now=later)
    assert points[0][1:] == (4.0, 0.0, 14.0, 6)
    # A year later the means are pruned.
    assert history.maintain(t0 + 366 * 86400) == (0, 2)
    assert history.query("a/t", t0, t0 + 600, now=later)[1] == []
    history.close()


def test_settings_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"devices\.0[\s\S]*contact: pin: Field required"):
        HomeSensorsSettings(devices=[{"name": "door", "kind": "contact"}])
    with pytest.raises(ValueError, match="not a topic level"):
        HomeSensorsSettings(devices=[{"name": "Front Door", "kind": "contact", "pin": 3}])
    with pytest.raises(ValueError, match="devices: list the devices"):
        HomeSensorsSettings(hardware="gpio")
    with pytest.raises(ValueError, match=r"devices\.1: a/switch is also devices\.0"):
        HomeSensorsSettings(devices=[{"name": "a", "kind": "switch", "pin": 3},
                                     {"name": "a", "kind": "switch", "pin": 4}])


async def test_bad_config_stops_the_process_with_78(broker: TestBroker, tmp_path: Path) -> None:
    config = tmp_path / "circles.toml"
    config.write_text('[home_sensors]\nhardware = "gpio"\npin_factory = "nonesuch"\n'
                      '[[home_sensors.devices]]\nname = "door"\nkind = "contact"\npin = 17\n')
    proc = ServiceProcess(SERVICE, broker.env(CIRCLES_CONFIG=str(config)), tmp_path)
    assert await asyncio.to_thread(proc.wait, 20) == 78
    assert "home_sensors.pin_factory" in proc.log and "nonesuch" in proc.log

    config.write_text('[[home_sensors.devices]]\nname = "door"\nkind = "contact"\npin = "x"\n'
                      '[home_sensors]\nhardware = "gpio"\npin_factory = "mock"\n')
    proc = ServiceProcess(SERVICE, broker.env(CIRCLES_CONFIG=str(config)), tmp_path)
    assert await asyncio.to_thread(proc.wait, 20) == 78
    assert "home_sensors.devices.0 (door)" in proc.log, proc.log


async def test_the_command_line_lists_commands_and_charts(
        broker: TestBroker, watch: Collector, tmp_path: Path) -> None:
    async with serving(broker, HomeSensorsService, tmp_path, devices=demo_devices()):
        env = broker.env()
        listed = await asyncio.to_thread(circles, env, "home", "devices")
        assert listed.returncode == 0, listed.stderr
        lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
        assert set(lines) == {d.name for d in demo_devices()}
        assert "online" in lines["hall-light"] and "OFF" in lines["hall-light"]

        sent = await asyncio.to_thread(circles, env, "home", "set", "hall-light", "switch", "on")
        assert sent.returncode == 0, sent.stderr
        await value_becomes(watch, "hall-light", "switch", "ON", "the simulated relay on")
        for _ in range(50):  # the history records what it saw on the bus
            history = await asyncio.to_thread(circles, env, "home", "history", "hall-light",
                                              "switch", "--json")
            assert history.returncode == 0, history.stderr
            if any(p[2] <= 1.0 <= p[3] for p in json.loads(history.stdout)["points"]):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"ON (1.0) not in the history: {history.stdout}")
        refused = await asyncio.to_thread(circles, env, "home", "history", "hall-light", "x",
                                          "--hours", "0")
        assert refused.returncode == 1 and "home-sensors refused history" in refused.stderr
