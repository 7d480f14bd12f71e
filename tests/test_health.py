from __future__ import annotations

from pathlib import Path

from appliance.bus import registry
from appliance.bus.payloads import HealthState
from tests.helpers import Collector, ServiceProcess, TestBroker


async def test_health_publishes_state_and_tracks_services(broker: TestBroker, tmp_path: Path) -> None:
    state_topic = str(registry.HEALTH_STATE.topic())
    watch = await Collector.start(broker, state_topic)
    tester = broker.bus(name="tester")
    await tester.connect()
    proc = ServiceProcess("health", broker.env(), tmp_path)
    try:
        # Another service comes and goes: health reports it.
        await tester.publish(str(registry.SERVICE_STATUS.topic(service="demo-svc")), b"online",
                             retain=True, wait=True)

        def sees_demo(ms: list) -> HealthState | None:
            for m in reversed(ms):
                if m.retain:  # left in the store by an earlier health process
                    continue
                state = HealthState.model_validate_json(m.payload)
                if "demo-svc" in state.services and "health" in state.services:
                    return state
            return None

        state = await watch.wait(sees_demo, 15, "health state listing demo-svc")
        assert state.services["demo-svc"].online and state.services["health"].online
        assert 0 <= state.cpu_percent <= 100 and state.memory_total_mb > 0
        assert 0 < state.disk_percent < 100 and state.uptime_s > 0
        assert state.clock_synchronized in (True, False, None)
        await tester.publish(str(registry.SERVICE_STATUS.topic(service="demo-svc")), b"offline",
                             retain=True, wait=True)
        watch.messages.clear()
        await watch.wait(lambda ms: any(
            not HealthState.model_validate_json(m.payload).services["demo-svc"].online for m in ms),
            15, "demo-svc offline")
        reply = await tester.request("health", "state", timeout=10)
        assert reply.ok and HealthState.model_validate(reply.result).hostname
    finally:
        await tester.publish(str(registry.SERVICE_STATUS.topic(service="demo-svc")), b"",
                             retain=True, wait=True)
        proc.stop()
        await tester.close()
        await watch.close()
