"""The trading pipeline end to end over the real broker, every layer its own process:
replayed bars → signals → targets → intents → paper fills → TRADE_EVENTs in the ledger →
metrics; then the kill switch from the command line: halt, flatten, resume."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from appliance.bus import registry
from appliance.bus.trade_event import TradeEvent, chain_for
from appliance.bus.trading import OrderIntent, Positions
from appliance.config import CoreSettings
from appliance.ledger import open_ledger
from tests.helpers import Collector, ServiceProcess, TestBroker, circles

ACCOUNT = "e2e"
SERVICES = ("trade-logger", "risk", "execution", "sizing", "ensemble", "alpha")
BARS = 240
SLIPPAGE_BPS, FEE_BPS = Decimal(5), Decimal(10)
CONFIG = f"""
[alpha]
models = [{{ name = "trend", kind = "ma_cross", params = {{ fast = 5, slow = 20 }} }},
          {{ name = "rsi", kind = "rsi_reversion", params = {{ period = 14 }} }}]

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


def write_bars(path: Path) -> list[dict[str, float | str]]:
    """A slow sine wave around 100 with a little noise: trends up and down, so the models
    buy and sell several times."""
    start = datetime(2026, 1, 5, tzinfo=UTC)
    rows: list[dict[str, float | str]] = []
    close = 100.0
    for i in range(BARS):
        open_ = close
        close = 100 + 8 * math.sin(i / 15) + 0.3 * math.sin(i * 1.7)
        rows.append({"ts": (start + timedelta(minutes=i)).isoformat(), "open": round(open_, 4),
                     "high": round(max(open_, close) + 0.2, 4),
                     "low": round(min(open_, close) - 0.2, 4), "close": round(close, 4),
                     "volume": 1e6})
    lines = ["ts,open,high,low,close,volume"]
    lines += [",".join(str(r[k]) for k in ("ts", "open", "high", "low", "close", "volume"))
              for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return rows


def ledger_events(state: Path) -> list[TradeEvent]:
    ledger = open_ledger(CoreSettings(state_dir=state))
    return [TradeEvent.model_validate(r["data"]) for r in ledger.records(chain_for(ACCOUNT))]


async def test_replayed_bars_become_fills_in_the_ledger_and_the_kill_switch_works(
        own_broker: TestBroker, tmp_path: Path) -> None:
    rows = write_bars(tmp_path / "bars.csv")
    config = tmp_path / "circles.toml"
    config.write_text(CONFIG + f'file = "{tmp_path / "bars.csv"}"\n')
    env = own_broker.env(CIRCLES_CONFIG=str(config))
    watch = await Collector.start(
        own_broker, str(registry.SERVICE_STATUS.filter()), str(registry.TRADING_HALT.topic()),
        str(registry.ORDER_INTENT.filter(account=ACCOUNT)),
        str(registry.ORDER_UPDATE.filter(account=ACCOUNT)),
        str(registry.POSITIONS.filter(account=ACCOUNT)),
        str(registry.TRADE_METRICS.filter(account=ACCOUNT)))
    processes = [ServiceProcess(name, env, tmp_path) for name in SERVICES]
    try:
        await watch.wait(lambda ms: {m.topic.split("/")[1] for m in ms if m.payload == b"online"}
                         >= set(SERVICES), 60, "the pipeline online")
        await watch.wait(lambda ms: any(m.topic == "circles/trading/halt" for m in ms), 15,
                         "the halt state")
        processes.append(ServiceProcess("market", env, tmp_path))

        # Every bar replayed; the fills confirmed in the ledger; the metrics computed from them.
        def settled(ms: list) -> bool:
            updates = [json.loads(m.payload) for m in ms if m.topic.endswith("/order")]
            return (len([m for m in ms if m.topic.endswith("/intent")]) >= 4
                    and all(u["status"] in ("filled", "open") for u in updates[-3:]))

        await watch.wait(settled, 90, "intents and orders")
        await asyncio.sleep(3)
        intents = [OrderIntent.model_validate_json(m.payload) for m in watch.messages
                   if m.topic.endswith("/intent")]
        by_ts = {datetime.fromisoformat(str(r["ts"])).replace(tzinfo=UTC): r for r in rows}
        metrics = await watch.wait(lambda ms: [json.loads(m.payload)["metrics"] for m in ms
                                               if m.topic.endswith("/metrics")
                                               and json.loads(m.payload)["metrics"]["fills"]
                                               >= 4][-1:], 30, "metrics with fills")
        events = ledger_events(own_broker.state)
        fills = [e for e in events if e.kind == "fill"]
        assert [e.kind for e in events if e.kind != "fill"] == ["deposit"]
        assert len(fills) >= 4 and {e.side for e in fills} == {"buy", "sell"}
        # Paper fills: at the next bar's open, moved against us by the slippage, fee charged.
        for fill in fills:
            bar = by_ts[fill.ts]
            direction = 1 if fill.side == "buy" else -1
            expected = Decimal(str(bar["open"])) * (1 + direction * SLIPPAGE_BPS / 10_000)
            assert abs(fill.price - expected) <= Decimal("1e-6") * expected, (fill, bar)
            assert abs(fill.fee - fill.qty * fill.price * FEE_BPS / 10_000) <= Decimal("1e-8")
            assert fill.source == "paper" and fill.account == ACCOUNT
        # Each fill follows the intent of the bar before it, and no intent was filled twice.
        intent_bars = {i.bar_ts for i in intents}
        assert all(f.ts - timedelta(minutes=1) in intent_bars for f in fills)
        assert len({f.order_id for f in fills}) == len(fills)
        assert metrics[-1]["fills"] == len(fills)
        held = sum((f.qty if f.side == "buy" else -f.qty) for f in fills)
        positions = Positions.model_validate_json(
            [m for m in watch.messages if m.topic.endswith("/positions")][-1].payload)
        assert sum((p.qty for p in positions.positions), Decimal(0)) == held

        # The kill switch, as the owner uses it from the command line.
        result = circles(env, "trading", "halt", "--reason", "end of test")
        assert result.returncode == 0, result.stderr
        await watch.wait(lambda ms: [m for m in ms if m.topic == "circles/trading/halt"
                                     and json.loads(m.payload)["halted"]], 10, "halted")
        tester = own_broker.bus()
        await tester.connect()
        late = intents[-1].model_copy(update={"key": "late-intent", "target_qty": held + 1})
        await tester.send(registry.ORDER_INTENT, late, account=ACCOUNT)
        refused = await watch.wait(lambda ms: [json.loads(m.payload) for m in ms
                                               if m.topic.endswith("/order")
                                               and json.loads(m.payload)["intent_key"]
                                               == "late-intent"], 10, "the refusal")
        assert refused[0]["status"] == "rejected" and "halted" in refused[0]["reason"]
        await tester.close()

        result = circles(env, "trading", "flatten", "--yes")
        assert result.returncode == 0, result.stderr + result.stdout
        if held:
            await watch.wait(lambda ms: [m for m in ms if m.topic.endswith("/positions") and all(
                Decimal(p["qty"]) == 0 for p in json.loads(m.payload)["positions"])], 30, "flat")
        result = circles(env, "trading", "resume")
        assert result.returncode == 0, result.stderr
        await watch.wait(lambda ms: [m for m in ms if m.topic == "circles/trading/halt"
                                     and not json.loads(m.payload)["halted"]
                                     and json.loads(m.payload)["by"] != "risk"], 10, "resumed")
        tail = circles(env, "audit", "tail", "--action", "trading.halt")
        assert "end of test" in tail.stdout
    finally:
        for process in processes:
            process.stop()
        await watch.close()
