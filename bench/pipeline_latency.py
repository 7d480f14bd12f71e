"""Pipeline latency: a bar published → its fill committed in the ledger, through the real
broker and five services (alpha → ensemble → sizing → execution → trade-logger, with risk
holding the halt), against the broker's raw publish → receive round trip in the same run.

Each bar is made to trade: the price zigzags and one moving-average model (1 vs 2 bars)
flips its sign every bar, so sizing alternates between a long target and flat, and paper
execution fills at the bar's close (`fill_at = "close"`: the market order sent at once).
The benchmark publishes the bars as the `market` client, one at a time, and takes the time
until the trade logger confirms the fill that bar caused (its ack follows the commit).
The baseline is a QoS 1 publish to a topic the publisher subscribes to, one before each
bar, so both figures see the same moments of a noisy machine.

Prints `pipeline_p99_ms`, `raw_rtt_p99_ms`, and last `pipeline/raw_p99` (target ≤ 25).
Usage: python bench/pipeline_latency.py [--bars 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.bus import Filter, MqttBus, registry  # noqa: E402
from appliance.bus.trade_event import TradeEvent  # noqa: E402
from appliance.bus.trading import Bar  # noqa: E402
from appliance.supervisor import free_port  # noqa: E402
from tests.helpers import Collector, ServiceProcess, TestBroker  # noqa: E402

ACCOUNT = "bench"
SERVICES = ("trade-logger", "risk", "execution", "sizing", "ensemble", "alpha")
CONFIG = f"""
[alpha]
warmup_from_market = false
models = [{{ name = "zigzag", kind = "ma_cross", params = {{ fast = 1, slow = 2 }} }}]

[ensemble]
min_abs_exposure = 0.0

[sizing]
account = "{ACCOUNT}"

[execution]
account = "{ACCOUNT}"
fill_at = "close"

[risk]
accounts = ["{ACCOUNT}"]
require_clock_sync = false
max_orders_per_minute = false
max_daily_loss_pct = false
max_drawdown_pct = false

[log]
level = "WARN"
"""


def p99_ms(samples: list[float]) -> float:
    return float(np.percentile(np.array(samples) * 1000, 99))


async def round_trip(bus: MqttBus, topic: str) -> float:
    """One QoS 1 publish to a topic the client subscribes to, until it comes back."""
    began = time.perf_counter()
    await bus.publish(topic, b"x" * 200, qos=1)
    for message in await bus.receive(1, timeout=5):
        bus.ack(message)
    return time.perf_counter() - began


async def measure(broker: TestBroker, n: int) -> tuple[list[float], list[float]]:
    """Publish `n` bars one by one, each sample running to the ack of the fill of its bar;
    before each bar, one raw round trip, so both see the same moments of a noisy machine."""
    market, ledger, raw = broker.bus("market"), broker.bus(), broker.bus()
    rtt_topic = "circles/tester/rtt"
    for bus in (market, ledger, raw):
        await bus.connect()
    await raw.subscribe([(Filter(rtt_topic), 1)])
    await ledger.subscribe([(registry.TRADE_EVENT.filter(account=ACCOUNT), 1),
                            (registry.TRADE_ACK.filter(account=ACCOUNT), 1)])
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=n + 10)
    piped: list[float] = []
    rtts: list[float] = []
    try:
        for i in range(n + 2):
            bar = Bar(exchange="sim", symbol="BTC/USDT", timeframe="1m",
                      ts=start + timedelta(minutes=i), open=100.5, high=101.5, low=99.5,
                      close=100.0 if i % 2 else 101.0, volume=1e9)
            if i >= 2:
                rtts.append(await round_trip(raw, rtt_topic))
            began = time.perf_counter()
            await market.send(registry.MARKET_BAR, bar, **bar.topic_values())
            if i < 2:  # the model warms up: flat, nothing to fill
                await asyncio.sleep(1)
                continue
            await _until_confirmed(ledger, bar)
            piped.append(time.perf_counter() - began)
    finally:
        for bus in (market, ledger, raw):
            await bus.close()
    return piped, rtts


async def _until_confirmed(ledger: MqttBus, bar: Bar) -> None:
    """Return when the ack of the fill made at the bar's time arrives."""
    fills: set[str] = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for message in await ledger.receive(10, timeout=1):
            ledger.ack(message)
            if registry.TRADE_EVENT.parse(message.topic) is not None:
                event: TradeEvent = registry.TRADE_EVENT.decode(message.payload)
                if event.ts == bar.ts and event.kind == "fill":
                    fills.add(event.event_id)
            elif fills & {a.event_id for a in registry.TRADE_ACK.decode(message.payload).accepted}:
                return
    raise TimeoutError(f"no confirmed fill for the bar of {bar.ts}")


async def main(bars: int) -> None:
    with tempfile.TemporaryDirectory(prefix="circles-bench-") as tmp:
        state = Path(tmp)
        broker = TestBroker(state, free_port(21883))
        broker.start()
        processes: list[ServiceProcess] = []
        try:
            await broker.provision(list(SERVICES) + ["market"])
            config = state / "bench.toml"
            config.write_text(CONFIG)
            env = broker.env(CIRCLES_CONFIG=str(config),  # production intervals, not the tests'
                             CIRCLES_TRADE_LOGGER__METRICS_INTERVAL_S="5")
            watch = await Collector.start(broker, str(registry.SERVICE_STATUS.filter()),
                                          str(registry.TRADING_HALT.topic()))
            for name in SERVICES:
                processes.append(ServiceProcess(name, env, state))
            await watch.wait(lambda ms: {m.topic.split("/")[1] for m in ms
                                         if m.payload == b"online"} >= set(SERVICES), 60,
                             "every service online")
            await watch.wait(lambda ms: any(m.topic == str(registry.TRADING_HALT.topic())
                                            for m in ms), 15, "the trading halt state")
            await watch.close()
            piped, raw = await measure(broker, bars)
        finally:
            for process in processes:
                process.stop()
            broker.stop()
    pipe_p99, raw_p99 = p99_ms(piped), p99_ms(raw)
    print(f"pipeline_p99_ms = {pipe_p99:.2f}")
    print(f"raw_rtt_p99_ms = {raw_p99:.2f}")
    print(f"pipeline/raw_p99 = {pipe_p99 / raw_p99:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bars", type=int, default=1000)
    asyncio.run(main(parser.parse_args().bars))
