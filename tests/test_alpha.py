"""The alpha service: its models on series computed by hand, its settings, and the service on
the in-memory bus and as a real process."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from appliance.bus import MemoryBroker, MemoryBus, registry
from appliance.bus.payloads import CommandRequest
from appliance.bus.trading import Bar, Signals
from appliance.runtime import Service
from modules.trading.alpha.history import FeedHistory
from modules.trading.alpha.models import REGISTRY, History
from modules.trading.alpha.models.breakout import Breakout, BreakoutParams
from modules.trading.alpha.models.ma_cross import MaCross, MaCrossParams, efficiency_ratio, ema
from modules.trading.alpha.models.rsi_reversion import RsiReversion, RsiReversionParams, rsi
from modules.trading.alpha.service import AlphaService, AlphaSettings, ModelConfig
from tests.helpers import Collector, ServiceProcess, TestBroker, watcher, wire

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def closes_only(closes: list[float], volume: float = 10.0) -> History:
    return History.of(closes, closes, closes, closes, [volume] * len(closes))


def bar(i: int, close: float, *, symbol: str = "BTC/USDT", exchange: str = "binance",
        high: float | None = None, low: float | None = None, volume: float = 10.0) -> Bar:
    return Bar(exchange=exchange, symbol=symbol, timeframe="1m", ts=T0 + timedelta(minutes=i),
               open=close, high=high or close * 1.001, low=low or close * 0.999, close=close,
               volume=volume)


# -- models ----------------------------------------------------------------------------------
def test_ma_cross_is_positive_on_a_rising_series_and_negative_on_a_falling_one() -> None:
    model = MaCross("m", MaCrossParams(fast=2, slow=4))
    rising = closes_only([100.0 + i for i in range(10)])
    signal = model.signal(rising)
    # Last four closes 106..109: slow = 107.5, fast = 108.5; a straight line is fully efficient.
    assert signal.value == pytest.approx(math.tanh(100 * 1.0 / 107.5))
    assert signal.confidence == 1.0 and signal.model == "m"
    falling = model.signal(closes_only([100.0 - i for i in range(10)]))
    # 94..91: slow = 92.5, fast = 91.5.
    assert falling.value == pytest.approx(math.tanh(-100 / 92.5)) and falling.value < 0


def test_ma_cross_ema_and_efficiency_by_hand() -> None:
    assert ema(np.array([1.0, 2.0, 3.0]), 3) == pytest.approx(2.25)  # α = 0.5: 1 → 1.5 → 2.25
    assert efficiency_ratio(np.array([1.0, 2.0, 1.0, 2.0])) == pytest.approx(1 / 3)
    assert efficiency_ratio(np.array([5.0, 5.0])) == 0.0
    model = MaCross("m", MaCrossParams(fast=2, slow=3, average="ema", scale=10))
    assert model.warmup == 9
    closes = [10.0] * 8 + [13.0]
    fast, slow = ema(np.array(closes), 2), ema(np.array(closes), 3)
    assert fast == pytest.approx(10 + 3 * 2 / 3) and slow == pytest.approx(10 + 3 * 0.5)
    signal = model.signal(closes_only(closes))
    assert signal.value == pytest.approx(math.tanh(10 * (fast - slow) / slow))
    assert signal.confidence == 1.0  # the last 3 closes 10, 10, 13 move one way


def test_a_model_is_silent_until_warmed_up() -> None:
    model = MaCross("m", MaCrossParams(fast=2, slow=4))
    signal = model.signal(closes_only([100.0, 101.0, 102.0]))
    assert (signal.value, signal.confidence) == (0.0, 0.0)


def test_rsi_reversion_by_hand() -> None:
    assert rsi(np.array([10.0, 9, 8, 9, 8, 7])) == pytest.approx(20.0)  # gains 1, losses 4
    model = RsiReversion("r", RsiReversionParams(period=5, oversold=30, overbought=70))
    oversold = model.signal(closes_only([10.0, 9, 8, 9, 8, 7]))
    assert oversold.value == pytest.approx((30 - 20) / 30) and oversold.confidence == 1.0
    overbought = model.signal(closes_only([10.0, 11, 12, 11, 12, 13]))
    assert rsi(np.array([10.0, 11, 12, 11, 12, 13])) == pytest.approx(80.0)
    assert overbought.value == pytest.approx(-(80 - 70) / 30)
    assert model.signal(closes_only([10.0, 11, 10, 11, 10, 11])).value == 0.0  # RSI 60
    assert rsi(np.array([5.0] * 6)) == 50.0 and rsi(np.array([1.0, 2, 3])) == 100.0
    # Only the last period + 1 closes count.
    assert model.signal(closes_only([50.0, 1.0, 10, 9, 8, 9, 8, 7])).value == oversold.value


def breakout_history(last: list[tuple[float, float, float, float]]) -> History:
    """Six quiet bars (close 100, high 101, low 99, volume 10), then `last` as
    (close, high, low, volume)."""
    rows = [(100.0, 101.0, 99.0, 10.0)] * 6 + last
    close, high, low, volume = zip(*rows, strict=True)
    return History.of(close, high, low, close, volume)


def test_breakout_above_the_channel_is_long_and_fades() -> None:
    model = Breakout("b", BreakoutParams(period=3, fade_bars=4))
    assert model.warmup == 7
    fresh = model.signal(breakout_history([(105.0, 106.0, 104.0, 5.0)]))
    assert fresh.value == 1.0
    assert fresh.confidence == pytest.approx(0.5)  # half the channel's mean volume
    # One bar later, still above the broken level (101) but inside the new channel (106).
    aged = model.signal(breakout_history([(105.0, 106.0, 104.0, 20.0), (104.0, 105.0, 103.0, 10.0)]))
    assert aged.value == pytest.approx(0.75) and aged.confidence == 1.0
    failed = model.signal(breakout_history([(105.0, 106.0, 104.0, 20.0), (100.5, 105.0, 100.0, 10.0)]))
    assert failed.value == 0.0
    gone = breakout_history([(105.0, 106.0, 104.0, 20.0)] + [(105.5, 106.0, 105.0, 10.0)] * 4)
    assert model.signal(gone).value == 0.0  # four bars old: faded out
    down = model.signal(breakout_history([(95.0, 99.5, 94.0, 30.0)]))
    assert down.value == -1.0 and down.confidence == 1.0
    assert model.signal(breakout_history([(100.0, 101.0, 99.0, 10.0)])).value == 0.0


ohlcv = st.lists(st.tuples(st.floats(1e-3, 1e6), st.floats(0, 0.2), st.floats(0, 0.2),
                           st.floats(0, 1), st.floats(0, 1e6)), min_size=1, max_size=90)
param_sets: list[tuple[str, dict[str, Any]]] = [
    ("ma_cross", {}), ("ma_cross", {"fast": 1, "slow": 2, "average": "ema", "scale": 1e6}),
    ("rsi_reversion", {}), ("rsi_reversion", {"period": 2, "oversold": 1, "overbought": 99}),
    ("breakout", {}), ("breakout", {"period": 1, "fade_bars": 1}),
]


@settings(max_examples=150, deadline=None)
@given(rows=ohlcv)
def test_every_model_stays_within_bounds(rows: list[tuple[float, ...]]) -> None:
    close = [r[0] for r in rows]
    high = [c * (1 + r[1]) for c, r in zip(close, rows, strict=True)]
    low = [c * (1 - r[2]) for c, r in zip(close, rows, strict=True)]
    opens = [lo + (hi - lo) * r[3] for lo, hi, r in zip(low, high, rows, strict=True)]
    history = History.of(opens, high, low, close, [r[4] for r in rows])
    for kind, params in param_sets:
        model = REGISTRY[kind].build(kind, params)
        signal = model.signal(history)
        assert -1 <= signal.value <= 1 and 0 <= signal.confidence <= 1
        # A model reads its last `warmup` bars only.
        assert model.signal(history.tail(model.warmup)) == signal


def test_feed_history_keeps_the_last_bars_in_order() -> None:
    history = FeedHistory(4)
    for i in range(11):
        history.append(bar(i, 100.0 + i))
        assert len(history) == min(i + 1, 4)
    view = history.view()
    assert list(view.close) == [107.0, 108.0, 109.0, 110.0]
    assert history.last_ts == T0 + timedelta(minutes=10)
    with pytest.raises(ValueError):
        view.close[0] = 1.0  # models read, never write


# -- settings --------------------------------------------------------------------------------
def errors(**kw: Any) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        AlphaSettings(**kw)
    return [".".join(map(str, e["loc"])) + ": " + e["msg"] for e in caught.value.errors()]


def test_settings_name_the_bad_key() -> None:
    assert len(AlphaSettings().models) == 3
    assert {m.kind for m in AlphaSettings().models} == set(REGISTRY)
    found = errors(models=[{"name": "a", "kind": "ma_cross"},
                           {"name": "b", "kind": "ma_cross", "params": {"fast": 5, "slow": 3}},
                           {"name": "c", "kind": "nope"},
                           {"name": "d", "kind": "breakout", "params": {"periods": 3}}])
    assert found[0].startswith("models.1.params.slow: Value error, must be longer than fast (5)")
    assert found[1].startswith("models.2.kind: Value error, unknown model kind 'nope'")
    assert found[2].startswith("models.3.params.periods: Extra inputs are not permitted")
    assert errors(models=[{"name": "a", "kind": "rsi_reversion"}] * 2)[0].startswith(
        "models: Value error, two models are named 'a'")
    assert errors(models=[{"name": "a", "kind": "ma_cross", "params": {"slow": 400}}])[0] \
        .startswith("history_bars: Value error, model 'a' needs 400 bars")
    # A default is checked against the given values too.
    assert errors(models=[{"name": "a", "kind": "ma_cross", "params": {"fast": 50}}])[0].startswith(
        "models.0.params.slow: Value error, must be longer than fast (50)")
    assert errors(models=[{"name": "a", "kind": "rsi_reversion", "params": {"oversold": 80}}])[0] \
        .startswith("models.0.params.overbought: Value error, must be above oversold (80.0)")
    config = ModelConfig(name="x", kind="ma_cross", params={"fast": 3})
    assert config.params == {"fast": 3, "slow": 30, "average": "sma", "scale": 100.0}


# -- the service on the in-memory bus --------------------------------------------------------
class FakeMarket(Service):
    """Answers `history` like the market service: the bars before `before`, oldest first."""

    name = "market"

    async def start(self) -> None:
        self.asked: list[dict[str, Any]] = []

    async def cmd_history(self, request: CommandRequest) -> list[dict[str, Any]]:
        args = request.model_extra or {}
        self.asked.append(args)
        before = datetime.fromisoformat(args["before"])
        bars = [bar(i, 200.0 + i) for i in range(-100, 0)]
        bars = [b for b in bars if b.ts < before][-args["limit"]:]
        return [b.model_dump(mode="json") for b in bars]


async def publish_bar(bus: MemoryBus, b: Bar) -> None:
    await bus.send(registry.MARKET_BAR, b, exchange=b.exchange, symbol=b.symbol, timeframe=b.timeframe)


async def test_one_signals_message_per_bar_and_redelivery_ignored() -> None:
    broker = MemoryBroker()
    alpha = await wire(broker, AlphaService, warmup_from_market=False, models=[
        {"name": "fast", "kind": "ma_cross", "params": {"fast": 2, "slow": 4}},
        {"name": "eth_only", "kind": "rsi_reversion", "params": {"period": 3}, "symbols": ["ETH/USDT"]}])
    watch = await watcher(broker, str(registry.ALPHA_SIGNALS.filter()))
    for i in (0, 1, 2, 3, 3, 1, 4):  # 3 and 1 again: redelivered, not new
        await publish_bar(watch, bar(i, 100.0 + i))
    await publish_bar(watch, bar(0, 50.0, symbol="ETH/USDT"))
    await alpha.handle(await alpha.bus.receive(100, timeout=1))
    got = await watch.receive(100, timeout=0.1)
    signals = [Signals.model_validate_json(m.payload) for m in got if "signals" in m.topic]
    assert [s.bar.ts.minute for s in signals] == [0, 1, 2, 3, 4, 0]
    assert got[0].topic == "circles/alpha/binance/btc-usdt/1m/signals"
    assert [[x.model for x in s.signals] for s in signals][-2:] == [["fast"], ["fast", "eth_only"]]
    assert [s.signals[0].confidence for s in signals[:5]] == [0, 0, 0, 1, 1]  # warm from the 4th
    assert signals[3].signals[0].value == pytest.approx(math.tanh(100 * 1.0 / 101.5))


async def test_first_bar_of_a_feed_is_warmed_up_from_market() -> None:
    broker = MemoryBroker()
    market = await wire(broker, FakeMarket)
    serving = asyncio.create_task(market.receive_loop())
    alpha = await wire(broker, AlphaService, history_bars=50)
    watch = await watcher(broker, str(registry.ALPHA_SIGNALS.filter()))
    try:
        await publish_bar(watch, bar(0, 200.0))
        await publish_bar(watch, bar(1, 201.0))
        await alpha.handle(await alpha.bus.receive(100, timeout=1))
        await asyncio.gather(*alpha.service.tasks)  # type: ignore[attr-defined]
    finally:
        market.stopping.set()
        await serving
    (asked,) = market.service.asked  # type: ignore[attr-defined]
    assert asked == {"exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1m", "limit": 49,
                     "before": T0.isoformat()}
    first, second = (Signals.model_validate_json(m.payload) for m in await watch.receive(10, 0.1))
    assert {s.model: s.confidence > 0 for s in first.signals} == {
        "ma_cross": True, "rsi": True, "breakout": True}  # all warm on the very first bar
    # The 49 bars before, 151..199, then 200: the breakout model sees a fresh high.
    assert first.signals[2].value == 1.0 and second.signals[2].value == 1.0
    history = alpha.service.feeds[("binance", "BTC/USDT", "1m")]  # type: ignore[attr-defined]
    assert len(history) == 50 and list(history.view().close[-3:]) == [199.0, 200.0, 201.0]


async def test_without_market_the_stream_is_used_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    alpha = await wire(broker, AlphaService, warmup_timeout_s=0.05)
    watch = await watcher(broker, str(registry.ALPHA_SIGNALS.filter()))
    with caplog.at_level(logging.WARNING, "circles.alpha"):
        for i in range(3):
            await publish_bar(watch, bar(i, 100.0))
        await alpha.handle(await alpha.bus.receive(100, timeout=1))
        await asyncio.gather(*alpha.service.tasks)  # type: ignore[attr-defined]
    assert len(await watch.receive(10, 0.1)) == 3
    assert [r.message for r in caplog.records] == ["no warm-up from market; starting from the stream"]


async def test_a_command_is_answered_while_a_warm_up_waits_for_market() -> None:
    """Asking market for a feed's earlier bars runs beside the receive loop: a silent market
    holds up neither commands nor the order of that feed's bars."""
    broker = MemoryBroker()
    alpha = await wire(broker, AlphaService, warmup_timeout_s=30)
    watch = await watcher(broker, str(registry.ALPHA_SIGNALS.filter()))
    for i in range(3):
        await publish_bar(watch, bar(i, 100.0 + i))
    await alpha.handle(await alpha.bus.receive(100, timeout=1))
    asking = asyncio.create_task(watch.request("alpha", "ping", timeout=5))
    await asyncio.sleep(0)  # the request is published before the loop below reads it
    await alpha.handle(await alpha.bus.receive(100, timeout=1))
    assert (await asking).ok
    assert alpha.service.warming  # type: ignore[attr-defined]
    for task in alpha.service.tasks:  # type: ignore[attr-defined]
        task.cancel()


async def test_a_bar_on_another_feed_topic_is_a_dead_letter() -> None:
    broker = MemoryBroker()
    alpha = await wire(broker, AlphaService, warmup_from_market=False)
    watch = await watcher(broker, str(registry.ALPHA_SIGNALS.filter()), "circles/dlq/#")
    b = bar(0, 100.0)
    await watch.send(registry.MARKET_BAR, b, exchange=b.exchange, symbol="ETH/USDT", timeframe="1m")
    await alpha.handle(await alpha.bus.receive(10, timeout=1))
    (letter,) = await watch.receive(10, 0.1)
    assert letter.topic == "circles/dlq/alpha" and b"not the feed of its topic" in letter.payload


# -- as a process on the real broker ---------------------------------------------------------
async def test_alpha_process_warms_up_from_market_and_signals_each_bar(
        broker: TestBroker, tmp_path: Path) -> None:
    symbol = f"T{tmp_path.name[-6:]}/USDT".replace("_", "")
    signals_topic = str(registry.ALPHA_SIGNALS.topic(exchange="binance", symbol=symbol, timeframe="1m"))
    watch = await Collector.start(broker, signals_topic, str(registry.SERVICE_STATUS.topic(service="alpha")))
    market = broker.bus(name="tester")
    await market.connect()
    await market.subscribe([(registry.SERVICE_CMD.filter(service="market", command="history"), 1)])
    asked: list[dict[str, Any]] = []

    async def answer() -> None:
        from appliance.bus.payloads import CommandReply

        while True:
            for message in await market.receive(10, timeout=1):
                args = json.loads(message.payload)
                asked.append(args)
                before = datetime.fromisoformat(args["before"])
                older = [bar(i, 100.0 + i, symbol=symbol) for i in range(-60, 0)]
                result = [b.model_dump(mode="json") for b in older if b.ts < before]
                await market.reply(message, CommandReply(ok=True, result=result))
                market.ack(message)

    answering = asyncio.create_task(answer())
    proc = ServiceProcess("alpha", broker.env(), tmp_path)
    try:
        await watch.wait(lambda ms: any(m.payload == b"online" and not m.retain for m in ms), 15,
                         "alpha online")
        publisher = broker.bus(name="tester")
        await publisher.connect()
        for i in (0, 0, 1):  # the second 0 is a redelivery
            await publisher.send(registry.MARKET_BAR, bar(i, 100.0 + i, symbol=symbol), wait=True,
                                 exchange="binance", symbol=symbol, timeframe="1m")
        await publisher.close()
        got = await watch.wait(lambda ms: (s := watch.on(signals_topic)) and len(s) >= 2 and s, 20,
                               "two signals")
        await asyncio.sleep(0.3)
        assert len(watch.on(signals_topic)) == 2, proc.log
        first = Signals.model_validate_json(got[0].payload)
        assert first.bar.symbol == symbol and [s.model for s in first.signals] == ["ma_cross", "rsi", "breakout"]
        assert all(s.confidence > 0 for s in first.signals)  # warmed by the 60 bars from "market"
        assert len(asked) == 1 and asked[0]["symbol"] == symbol and asked[0]["limit"] == 299
    finally:
        answering.cancel()
        proc.stop()
        await market.close()
        await watch.close()


def test_alpha_unknown_model_kind_exits_78_naming_the_key(broker: TestBroker, tmp_path: Path) -> None:
    models = json.dumps([{"name": "a", "kind": "ma_cross"}, {"name": "b", "kind": "astrology"}])
    proc = ServiceProcess("alpha", broker.env(CIRCLES_ALPHA__MODELS=models), tmp_path)
    assert proc.wait(15) == 78
    (line,) = proc.log.strip().splitlines()
    assert "alpha.models.1.kind" in line and "astrology" in line
