"""The trading pipeline end to end over the real broker, every layer its own process:
replayed bars → signals → targets → intents → paper fills → TRADE_EVENTs in the ledger →
metrics; then the kill switch from the command line: halt, flatten, resume."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from appliance.bus import Message, registry
from appliance.bus.topics import TopicSpec
from appliance.bus.trade_event import TradeEvent, chain_for
from appliance.bus.trading import Bar, OrderIntent
from appliance.config import CoreSettings
from appliance.errors import TemporaryError
from appliance.ledger import open_ledger
from tests.helpers import Collector, ServiceProcess, TestBroker, circles

ACCOUNT = "e2e"
SERVICES = ("trade-logger", "risk", "execution", "sizing", "ensemble", "alpha")
BARS = 240
SLIPPAGE_BPS, FEE_BPS = Decimal(5), Decimal(10)
CONFIG = f"""
[alpha]
models = [{{ name = "trend", kind = "ma_cross", params = {{ fast = 5, slow = 20 }} }},
          {{ name = "breakout", kind = "breakout", params = {{ period = 20 }} }}]

[sizing]
account = "{ACCOUNT}"
fraction = 0.5

[execution]
account = "{ACCOUNT}"
slippage_bps = {SLIPPAGE_BPS}
fee_bps = {FEE_BPS}

[risk]
accounts = ["{ACCOUNT}"]
require_clock_sync = false
max_orders_per_minute = false
max_daily_loss_pct = false
max_drawdown_pct = false

[market]
source = "replay"
exchange = "sim"
symbols = ["BTC/USDT"]

[market.replay]
speed = 200
"""


def write_bars(path: Path) -> dict[datetime, dict[str, float]]:
    """A slow sine wave around 100 with a little noise, so the models buy and sell several
    times, ending in a steady rise, so the account ends long."""
    start = datetime(2026, 1, 5, tzinfo=UTC)
    rows: dict[datetime, dict[str, float]] = {}
    close = 100.0
    for i in range(BARS):
        open_ = close
        close = 100 + 8 * math.sin(i / 15) + 0.3 * math.sin(i * 1.7)
        if i >= BARS - 40:
            close = open_ + 0.4
        rows[start + timedelta(minutes=i)] = {
            "open": round(open_, 4), "high": round(max(open_, close) + 0.2, 4),
            "low": round(min(open_, close) - 0.2, 4), "close": round(close, 4), "volume": 1e6}
    lines = ["ts,open,high,low,close,volume"] + [
        ",".join([ts.isoformat(), *(str(r[k]) for k in ("open", "high", "low", "close", "volume"))])
        for ts, r in rows.items()]
    path.write_text("\n".join(lines) + "\n")
    return rows


def ledger_events(state: Path) -> list[TradeEvent]:
    ledger = open_ledger(CoreSettings(state_dir=state))
    return [TradeEvent.model_validate(r["data"]) for r in ledger.records(chain_for(ACCOUNT))]


def net(fills: list[TradeEvent]) -> Decimal:
    return sum((f.qty if f.side == "buy" else -f.qty for f in fills), Decimal(0))


def of(spec: TopicSpec, messages: list[Message]) -> list[Any]:
    """The payloads of the messages on `spec`'s topics, decoded, in arrival order."""
    return [spec.decode(m.payload) for m in messages if spec.parse(m.topic) is not None]


async def until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := await check()):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)
    return result


async def test_replayed_bars_become_fills_in_the_ledger_and_the_kill_switch_works(
        own_broker: TestBroker, tmp_path: Path) -> None:
    bars = write_bars(tmp_path / "bars.csv")
    config = tmp_path / "circles.toml"
    config.write_text(CONFIG + f'file = "{tmp_path / "bars.csv"}"\n')
    env = own_broker.env(CIRCLES_CONFIG=str(config))
    halt_topic = str(registry.TRADING_HALT.topic())
    watch = await Collector.start(
        own_broker, str(registry.SERVICE_STATUS.filter()), halt_topic,
        str(registry.ORDER_INTENT.filter(account=ACCOUNT)),
        str(registry.ORDER_UPDATE.filter(account=ACCOUNT)),
        str(registry.POSITIONS.filter(account=ACCOUNT)),
        str(registry.TRADE_METRICS.filter(account=ACCOUNT)))
    tester = own_broker.bus()
    await tester.connect()
    processes = [ServiceProcess(name, env, tmp_path) for name in SERVICES]
    try:
        await watch.wait(lambda ms: {registry.SERVICE_STATUS.parse(m.topic)["service"]
                                     for m in ms if m.payload == b"online"} >= set(SERVICES),
                         60, "the pipeline online")
        await watch.wait(lambda ms: of(registry.TRADING_HALT, ms), 15, "the halt state")
        processes.append(ServiceProcess("market", env, tmp_path))

        async def replayed() -> bool:
            try:
                feeds = (await tester.request("market", "feeds", timeout=2)).result
            except TemporaryError:
                return False  # not up yet
            return bool(feeds["phase"] == "finished" and feeds["published"] == BARS)

        await until(replayed, 90, "every bar replayed")

        # Settled: every fill execution made is in the ledger, and the metrics count them.
        async def settled() -> list[TradeEvent] | None:
            reply = await tester.request("execution", "positions", timeout=5)
            assert reply.ok, reply.error
            held = reply.result
            fills = [e for e in ledger_events(own_broker.state) if e.kind == "fill"]
            metrics = of(registry.TRADE_METRICS, watch.messages)
            position = sum((Decimal(p["qty"]) for p in held["positions"]), Decimal(0))
            return fills if (fills and net(fills) == position and metrics
                             and metrics[-1].metrics["fills"] == len(fills)) else None

        fills = await until(settled, 60, "the fills in the ledger and its metrics")
        events = ledger_events(own_broker.state)
        assert [e.kind for e in events if e.kind != "fill"] == ["deposit"]
        assert len(fills) >= 4 and {e.side for e in fills} == {"buy", "sell"}
        # Paper fills: at the next bar's open, moved against us by the slippage, fee charged.
        for fill in fills:
            bar = bars[fill.ts]
            direction = 1 if fill.side == "buy" else -1
            expected = Decimal(str(bar["open"])) * (1 + direction * SLIPPAGE_BPS / 10_000)
            assert abs(fill.price - expected) <= Decimal("1e-6") * expected, (fill, bar)
            assert abs(fill.fee - fill.qty * fill.price * FEE_BPS / 10_000) <= Decimal("1e-8")
            assert fill.source == "paper" and fill.account == ACCOUNT
        # Each fill follows the intent of the bar before it, and no order filled twice over.
        intents: list[OrderIntent] = of(registry.ORDER_INTENT, watch.messages)
        assert all(f.ts - timedelta(minutes=1) in {i.bar_ts for i in intents} for f in fills)
        held = net(fills)
        assert held > 0  # the series ends rising
        # What is held and still on order is the last target (an order made on the last bar
        # waits for a bar that has not come).
        reply = await tester.request("execution", "orders", timeout=5)
        on_order = sum((Decimal(o["qty"]) - Decimal(o["filled"])) * (1 if o["side"] == "buy" else -1)
                       for o in reply.result["open"])
        assert held + on_order == intents[-1].target_qty

        # The kill switch, as the owner uses it from the command line.
        result = circles(env, "trading", "halt", "--reason", "end of test")
        assert result.returncode == 0, result.stderr
        await watch.wait(lambda ms: [h for h in of(registry.TRADING_HALT, ms) if h.halted], 10,
                         "halted")
        late = intents[-1].model_copy(update={"key": "late-intent", "target_qty": held + 1})
        await tester.send(registry.ORDER_INTENT, late, account=ACCOUNT)
        refused = await watch.wait(lambda ms: [o for o in of(registry.ORDER_UPDATE, ms)
                                               if o.intent_key == "late-intent"], 10, "a refusal")
        assert refused[0].status == "rejected" and "halted" in refused[0].reason

        result = circles(env, "trading", "flatten", "--yes")
        assert result.returncode == 0, result.stderr + result.stdout
        # A paper order fills on the next bar: the market goes on.
        last = max(bars)
        after = Bar(exchange="sim", symbol="BTC/USDT", timeframe="1m",
                    ts=last + timedelta(minutes=1), **bars[last])
        await tester.send(registry.MARKET_BAR, after, **after.topic_values())

        async def flat() -> list[TradeEvent] | None:
            fills = await settled()
            return fills if fills and net(fills) == 0 else None

        flattened = await until(flat, 30, "the flattening fill in the ledger")
        assert flattened[-1].side == "sell" and flattened[-1].ts == after.ts
        result = circles(env, "trading", "resume")
        assert result.returncode == 0, result.stderr
        await watch.wait(lambda ms: [h for h in of(registry.TRADING_HALT, ms)
                                     if not h.halted and h.by != "risk"], 10, "resumed")
        tail = circles(env, "audit", "tail", "--action", "trading.halt")
        assert "end of test" in tail.stdout
    finally:
        for process in processes:
            process.stop()
        await tester.close()
        await watch.close()
