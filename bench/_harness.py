"""Shared by the benchmarks: a private broker with service clients, and timing helpers."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from appliance.bus.admin import BrokerAdmin
from appliance.secrets import read_secret
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
