"""Shared by the benchmarks: a private broker with service clients, and timing helpers."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from appliance.bus.admin import BrokerAdmin
from appliance.security.secrets import read_secret
from appliance.supervisor import Broker, free_port


@contextlib.contextmanager
def private_broker(clients: list[str]) -> Iterator[tuple[int, Path]]:
    """A Mosquitto with the project's config on a free port; yields (port, state dir)."""
    with tempfile.TemporaryDirectory(prefix="circles-bench-") as tmp:
        state = Path(tmp)
        port = free_port(21883)
        broker = Broker(state, port)

        async def sync() -> None:
            admin = await BrokerAdmin.connect("127.0.0.1", port, state)
            await admin.sync(clients, state)
            await admin.close()

        broker.start()
        try:
            asyncio.run(sync())
            yield port, state
        finally:
            broker.stop()


def password(state: Path, client: str) -> str:
    value = read_secret(f"mqtt-{client}", state)
    assert value
    return value


def run_pair(sub_cmd: list[str], pub_cmd: list[str]) -> float:
    """Start the subscriber, wait until it says READY, run the publisher; returns msg/s from
    the publisher's first send to the subscriber's last receive."""
    sub = subprocess.Popen([sys.executable, *sub_cmd], stdout=subprocess.PIPE, text=True)
    assert sub.stdout
    assert sub.stdout.readline().strip() == "READY"
    pub = subprocess.run([sys.executable, *pub_cmd], stdout=subprocess.PIPE, text=True, check=True)
    started = float(pub.stdout.split()[0])
    out, _ = sub.communicate(timeout=120)
    count, finished = out.split()
    return int(count) / (float(finished) - started)


def paho_publish(port: int, user: str, password: str, topic: str, payloads: Iterable[bytes],
                 window: int = 1000) -> float:
    """Publish QoS 1 with plain paho (the baseline client); returns the time of the first send."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-raw", protocol=mqtt.MQTTv5)
    client.username_pw_set(user, password)
    client.max_inflight_messages_set(window)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.time()
    info = None
    for payload in payloads:
        info = client.publish(topic, payload, qos=1)
    assert info is not None
    info.wait_for_publish(300)
    client.disconnect()
    client.loop_stop()
    return started


def paho_count(port: int, user: str, password: str, topic: str, n: int,
               weigh: Callable[[bytes], int] = lambda payload: 1) -> tuple[int, float]:
    """Subscribe QoS 1 with plain paho, print READY once subscribed, and count until `n`
    (each message counts `weigh(payload)`); returns (count, time of the last message)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    state: dict[str, Any] = {"count": 0, "last": 0.0}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-raw", protocol=mqtt.MQTTv5)
    client.username_pw_set(user, password)

    def on_message(c, u, msg):  # type: ignore[no-untyped-def]
        state["count"] += weigh(msg.payload)
        if state["count"] >= n:
            state["last"] = time.time()
            c.disconnect()

    client.on_message = on_message
    client.on_subscribe = lambda c, u, mid, rc, props: print("READY", flush=True)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.connect("127.0.0.1", port)
    client.loop_forever()
    return state["count"], state["last"]
