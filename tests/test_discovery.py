"""Home Assistant discovery of the appliance's own entities, through the one helper."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.bus import MemoryBroker, MemoryBus, registry
from appliance.ha_discovery import IDENTITY, REQUIRED, Announcer, Entity
from tests.helpers import Collector, ServiceProcess, TestBroker, watcher

# The appliance's entities, by the service that announces them.
APPLIANCE = {
    "health": {"sensor/circles/cpu_temp_c", "sensor/circles/cpu_percent",
               "sensor/circles/memory_percent", "sensor/circles/disk_percent",
               "binary_sensor/circles/clock_synchronized"},
    "risk": {"switch/circles/trading_halt", "binary_sensor/circles/trading_halted",
             "sensor/circles/pnl_today"},
}


def config_topic(short: str) -> str:
    component, device, obj = short.split("/")
    return str(registry.HA_DISCOVERY.topic(component=component, device=device, object=obj))


async def test_the_appliance_announces_its_entities_retained_and_again_when_asked(
        broker: TestBroker, tmp_path: Path) -> None:
    topics = {config_topic(t) for entities in APPLIANCE.values() for t in entities}
    watch = await Collector.start(broker, *topics)
    procs = [ServiceProcess(name, broker.env(), tmp_path) for name in APPLIANCE]
    try:
        await watch.wait(lambda ms: {m.topic for m in ms} == topics, 20, "every config")
        for message in watch.messages:
            doc = json.loads(message.payload)
            component = registry.HA_DISCOVERY.parse(message.topic)["component"]
            assert REQUIRED[component] | IDENTITY <= set(doc), doc
            assert doc["device"]["identifiers"] == ["circles"]
            assert doc["availability"][0]["topic"] == str(
                registry.SERVICE_STATUS.topic(service=message.sender))
            assert set(APPLIANCE[message.sender]) >= {
                message.topic.removeprefix("homeassistant/").removesuffix("/config")}
        pnl = json.loads(watch.on(config_topic("sensor/circles/pnl_today"))[-1].payload)
        assert pnl["state_topic"] == str(registry.RISK_STATE.topic())
        halted = json.loads(watch.on(config_topic("binary_sensor/circles/trading_halted"))[-1]
                            .payload)
        assert halted["state_topic"] == str(registry.TRADING_HALT.topic())

        late = await Collector.start(broker, *topics)
        try:
            await late.wait(lambda ms: {m.topic for m in ms if m.retain} == topics, 10,
                            "every config retained")
        finally:
            await late.close()

        watch.messages.clear()
        tester = broker.bus()
        await tester.connect()
        await tester.publish(str(registry.HA_STATUS.topic()), b"online", wait=True)
        await tester.close()
        await watch.wait(lambda ms: {m.topic for m in ms} == topics, 10, "every config again")
    finally:
        for proc in procs:
            proc.stop()
        await watch.close()


async def test_an_entity_no_longer_listed_is_removed_once(tmp_path: Path) -> None:
    broker = MemoryBroker()
    watch = await watcher(broker, "homeassistant/#", "circles/home/#")
    bus = MemoryBus("svc", broker, status=False)
    await bus.connect()
    state = tmp_path / "svc" / "discovery.json"
    a = Entity("sensor", "box", "a", "A", {"state_topic": "circles/home/box/a/state"})
    b = Entity("binary_sensor", "box", "b", "B", {"state_topic": "circles/home/box/b/state"},
               owned=("circles/home/box/b/state", "circles/home/box/status"))
    a = Entity(a.component, a.device, a.object, a.name, a.config,
               owned=("circles/home/box/a/state", "circles/home/box/status"))

    await Announcer(bus, "svc", state).announce([a, b])
    first = await watch.receive(10, timeout=1)
    assert sorted(m.topic for m in first) == sorted([a.topic(), b.topic()])
    assert all(m.payload for m in first)

    await Announcer(bus, "svc", state).announce([a])  # b was taken out of the config
    second = await watch.receive(10, timeout=1)
    # Its config and its state go; the device's status stays, a still owns it.
    assert [m.topic for m in second if not m.payload] == [b.topic(), "circles/home/box/b/state"]
    assert json.loads(state.read_text()) == {
        a.topic(): ["circles/home/box/a/state", "circles/home/box/status"]}

    await Announcer(bus, "svc", state).announce([a])
    third = await watch.receive(10, timeout=1)
    assert [m.topic for m in third] == [a.topic()]  # b is not removed a second time
