"""The sizing service: the three methods by hand, shorts, rounding, when an intent is sent, the
intent key; the service on the in-memory bus and as a real process; and alpha → ensemble →
sizing on the in-memory bus giving the same messages twice (determinism)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from appliance.bus import MemoryBroker, MemoryBus, registry
from appliance.bus.trade_event import TradeMetrics
from appliance.bus.trading import Bar, OrderIntent, Position, Positions, Target
from modules.trading.alpha.service import AlphaService
from modules.trading.ensemble.service import EnsembleService
from modules.trading.sizing.service import (
    KellyStats,
    SizingService,
    SizingSettings,
    decimal_price,
    equity_from,
    intent_key,
    kelly_fraction,
    kelly_stats,
    plan,
    round_qty,
    worth_sending,
)
from tests.helpers import Collector, ServiceProcess, TestBroker, pump, watcher, wire

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def cfg(**kw: Any) -> SizingSettings:
    return SizingSettings(**kw)


# -- arithmetic ------------------------------------------------------------------------------
def test_fixed_fractional() -> None:
    sized = plan(cfg(), 0.42, 10_000, 100.0, None, None, "ma_cross+rsi")
    assert sized.qty == Decimal("4.2") and str(sized.qty) == "4.20000000"  # 0.42 · 0.1 · 10000 / 100
    assert sized.reason == "ma_cross+rsi → 0.42 of 0.1 × equity"
    assert plan(cfg(fraction=0.5), 1.0, 10_000, 100.0, None, None, "m").qty == 50
    assert str(plan(cfg(), 0.0, 10_000, 100.0, None, None, "m").qty) == "0"


def test_volatility_targeting() -> None:
    config = cfg(method="volatility", target_risk=0.01)
    # ATR 2 on a price of 100 is 2 %: 0.5 · 10000 · 0.01 / 0.02 = 2500 notional.
    sized = plan(config, 0.5, 10_000, 100.0, 2.0, None, "m")
    assert sized.notional == pytest.approx(2500) and sized.qty == 25
    assert sized.reason == "m → 0.50 × 0.01 risk / ATR 2.000% of price"
    capped = plan(config, 1.0, 10_000, 100.0, 0.5, None, "m")  # 20000 wanted, 1 × equity allowed
    assert capped.qty == 100 and capped.reason.endswith("capped at 1 × equity")
    assert plan(cfg(method="volatility", max_leverage=2), 1.0, 10_000, 100.0, 0.5, None, "m").qty == 200
    assert plan(config, -1.0, 10_000, 100.0, 0.0, None, "m").qty == 0  # no short anyway
    assert plan(config, 0.3, 10_000, 100.0, 0.0, None, "m").qty == 100  # no range at all: the cap
    warming = plan(config, 0.5, 10_000, 100.0, None, None, "m")
    assert warming.qty == 0 and "ATR warming up" in warming.reason


def test_kelly() -> None:
    stats = KellyStats(round_trips=30, win_rate=0.6, avg_win=100.0, avg_loss=-50.0)
    # R = 2: f* = 0.6 − 0.4 / 2 = 0.4, capped at 0.25 by default.
    assert kelly_fraction(stats, 1.0) == pytest.approx(0.4)
    assert kelly_fraction(stats, 0.25) == 0.25
    assert kelly_fraction(KellyStats(30, 0.3, 50.0, -50.0), 1.0) == 0.0  # 0.3 − 0.7 < 0
    assert kelly_fraction(KellyStats(30, 1.0, 50.0, None), 0.25) == 0.25  # never lost
    assert kelly_fraction(KellyStats(30, 0.0, None, -50.0), 0.25) == 0.0  # never won
    sized = plan(cfg(method="kelly", kelly_cap=0.5), 0.5, 10_000, 100.0, None, stats, "m")
    assert sized.qty == 20 and sized.reason == "m → 0.50 of kelly 0.4 × equity"  # 0.5 · 0.4 · 10000
    few = KellyStats(round_trips=19, win_rate=0.6, avg_win=100.0, avg_loss=-50.0)
    fallback = plan(cfg(method="kelly"), 0.5, 10_000, 100.0, None, few, "m")
    assert fallback.qty == 5 and "kelly after 20 round trips" in fallback.reason  # 0.5 · 0.1 · 10000
    assert plan(cfg(method="kelly"), 0.5, 10_000, 100.0, None, None, "m").qty == 5


def test_shorts_only_when_allowed_and_rounding_toward_zero() -> None:
    flat = plan(cfg(), -0.5, 10_000, 100.0, None, None, "m")
    assert flat.qty == 0 and flat.reason == "m → -0.50: no shorts, flat"
    assert plan(cfg(allow_short=True), -0.5, 10_000, 100.0, None, None, "m").qty == -5
    step = Decimal("0.001")
    assert round_qty(1.23456, step) == Decimal("1.234") and round_qty(-1.23456, step) == Decimal("-1.234")
    assert round_qty(0.0009, step) == 0 and str(round_qty(-0.0009, step)) == "0"
    assert str(round_qty(0.1 + 0.2, Decimal("1e-8"))) == "0.30000000"
    assert round_qty(0.6 - 0.4 / 2, Decimal("1e-8")) == Decimal("0.4")  # float noise is not a step
    assert round_qty(7.9, Decimal("5")) == 5 and round_qty(-7.9, Decimal("0.5")) == Decimal("-7.5")
    config = cfg(qty_step="0.01", allow_short=True)
    assert plan(config, -0.333, 10_000, 30.0, None, None, "m").qty == Decimal("-11.1")  # −11.1 exactly
    assert plan(cfg(), 0.5, 0.0, 100.0, None, None, "m").qty == 0  # no equity


def test_when_an_intent_is_sent() -> None:
    assert worth_sending(None, Decimal(0), 100.0, 10_000, 0.01)  # first after a start
    assert not worth_sending(Decimal(1), Decimal(1), 100.0, 10_000, 0.01)
    assert not worth_sending(Decimal(1), Decimal(2), 100.0, 10_000, 0.01)  # 100 is not > 100
    assert worth_sending(Decimal(1), Decimal("2.01"), 100.0, 10_000, 0.01)
    assert worth_sending(Decimal("0.001"), Decimal(0), 100.0, 10_000, 0.01)  # to 0: always
    assert not worth_sending(Decimal(0), Decimal(0), 100.0, 10_000, 0.0)


def test_intent_key_is_deterministic_short_and_safe() -> None:
    ts = T0 + timedelta(minutes=5)
    key = intent_key("paper", "ensemble", "binance", "BTC/USDT", "1m", ts)
    assert key == "paper-btc-usdt-" + key.split("-")[3] + "-1704067500"
    assert key == intent_key("paper", "ensemble", "binance", "BTC/USDT", "1m", ts)
    assert key == "paper-btc-usdt-9a69e0d88e5a-1704067500"  # a restart re-sends the same key
    others = {intent_key("paper", "ensemble", "binance", "BTC/USDT", "5m", ts),
              intent_key("paper", "other", "binance", "BTC/USDT", "1m", ts),
              intent_key("paper", "ensemble", "kraken", "BTC/USDT", "1m", ts),
              intent_key("live", "ensemble", "binance", "BTC/USDT", "1m", ts),
              intent_key("paper", "ensemble", "binance", "BTC/USDT", "1m", ts + timedelta(minutes=1))}
    assert len(others) == 5 and key not in others
    long = intent_key("a" * 64, "s" * 64, "e" * 64, "#" + "X/" * 31 + "Y", "1m",
                      datetime(9999, 12, 31, tzinfo=UTC))
    assert len(long) <= 64 and re.fullmatch(r"[A-Za-z0-9_-]+", long)
    OrderIntent(key=long, account="a", exchange="e", symbol="s", target_qty=Decimal(0),
                price=Decimal(1), bar_ts=ts)  # the payload's own rule accepts it


def test_prices_equity_and_kelly_stats_from_metrics() -> None:
    assert decimal_price(0.1) == Decimal("0.1") and decimal_price(65000.5) == Decimal("65000.5")
    assert decimal_price(1.2345678901234567e-05) == Decimal("0.000012345678901235")
    assert equity_from({"equity": 12_000.0, "deposits": 10_000.0}, 5_000) == 12_000
    assert equity_from({"equity": -12.5, "deposits": 0}, 10_000) == 9_987.5  # paper: PnL only
    assert equity_from({"equity": None}, 10_000) is None
    metrics = {"round_trips": 50, "win_rate": 0.2, "avg_win": 1.0, "avg_loss": -1.0,
               "by_strategy": {"ensemble": {"round_trips": 25, "win_rate": 0.6, "avg_win": 3,
                                            "avg_loss": -1.5}}}
    assert kelly_stats(metrics, "ensemble") == KellyStats(25, 0.6, 3.0, -1.5)
    assert kelly_stats(metrics, "other") == KellyStats(50, 0.2, 1.0, -1.0)
    assert kelly_stats({}, "x") == KellyStats()


def test_settings_name_the_bad_key() -> None:
    from pydantic import ValidationError

    for bad, key in [({"fraction": -0.1}, "fraction"), ({"fraction": 2}, "fraction"),
                     ({"qty_step": "1e-20"}, "qty_step"), ({"method": "martingale"}, "method"),
                     ({"account": "///"}, "account"), ({"kelly_cap": 1.5}, "kelly_cap")]:
        with pytest.raises(ValidationError) as caught:
            SizingSettings(**bad)
        assert caught.value.errors()[0]["loc"] == (key,)
    assert SizingSettings(fraction=2, max_leverage=2).fraction == 2


# -- the service on the in-memory bus --------------------------------------------------------
def bar(i: int, close: float, *, high: float | None = None, low: float | None = None,
        symbol: str = "BTC/USDT", timeframe: str = "1m") -> Bar:
    return Bar(exchange="binance", symbol=symbol, timeframe=timeframe,  # type: ignore[arg-type]
               ts=T0 + timedelta(minutes=i), open=close, high=high or close, low=low or close,
               close=close, volume=1.0)


def metrics(account: str, **figures: Any) -> TradeMetrics:
    return TradeMetrics(account=account, seq=1, ts="2024-01-01T00:00:00+00:00", metrics=figures)


def positions(account: str, held: dict[str, str]) -> Positions:
    return Positions(account=account, mode="paper", positions=[
        Position(symbol=symbol, qty=Decimal(qty), avg_price=Decimal(100))
        for symbol, qty in held.items()])


async def send_target(bus: MemoryBus, exposure: float, b: Bar) -> None:
    target = Target(bar=b, exposure=exposure, weights={"a": 1.0, "off": 0.0})
    await bus.send(registry.ENSEMBLE_TARGET, target, exchange=b.exchange, symbol=b.symbol,
                   timeframe=b.timeframe)


async def test_intents_follow_targets_by_enough_and_once_per_bar() -> None:
    broker = MemoryBroker()
    sizing = await wire(broker, SizingService)
    watch = await watcher(broker, str(registry.ORDER_INTENT.filter()))
    plan_ = [(0, 0.0), (1, 0.5), (2, 0.505), (2, 0.9), (1, 0.9), (3, 0.7), (4, 0.0), (5, 0.0)]
    for i, exposure in plan_:  # the second bar 2 and the later bar 1 are redeliveries
        await send_target(watch, exposure, bar(i, 100.0))
    await watch.send(registry.TRADE_METRICS, metrics("other", equity=1.0, deposits=1.0), account="other")
    await send_target(watch, 1.0, bar(6, 100.0))
    await pump([sizing])
    got = await watch.receive(100, timeout=0)
    intents = [OrderIntent.model_validate_json(m.payload) for m in got]
    assert got[0].topic == str(registry.ORDER_INTENT.topic(account="paper"))
    # 0 (first after start), 5 (0.5 · 0.1 · 10000 / 100), 0.505 → 5.05 is a change of
    # 5 < 100 notional: none; 0.7 → 7; back to 0; 0 again: none; 1.0 with equity 10000 → 10.
    assert [(i.bar_ts.minute, i.target_qty) for i in intents] == [
        (0, 0), (1, 5), (3, 7), (4, 0), (6, 10)]
    first = intents[1]
    assert first.account == "paper" and first.strategy_id == "ensemble" and first.symbol == "BTC/USDT"
    assert first.price == Decimal("100.0") and first.reason == "a → 0.50 of 0.1 × equity"
    assert first.key == intent_key("paper", "ensemble", "binance", "BTC/USDT", "1m", first.bar_ts)
    assert first.ts == "2024-01-01T00:02:00.000+00:00"  # the bar's close, not the wall clock


async def test_equity_from_the_accounts_metrics_and_atr_from_the_bars() -> None:
    broker = MemoryBroker()
    sizing = await wire(broker, SizingService, method="volatility", atr_period=3, min_change=0)
    watch = await watcher(broker, str(registry.ORDER_INTENT.filter()))
    await watch.send(registry.TRADE_METRICS, metrics("paper", equity=20_000.0, deposits=20_000.0),
                     account="paper")
    # True ranges: 2 (its own range), then max(h − l, |h − c₋₁|, |l − c₋₁|) = 4, then 3.
    await send_target(watch, 0.5, bar(0, 100.0, high=101, low=99))
    await send_target(watch, 0.5, bar(1, 103.0, high=104, low=102))
    await send_target(watch, 0.5, bar(2, 100.0, high=101, low=100))
    await pump([sizing])
    intents = [OrderIntent.model_validate_json(m.payload) for m in await watch.receive(10, timeout=0)]
    assert [i.target_qty for i in intents] == [0, Decimal("33.33333333")]  # 0.5 · 20000 · 0.01 / 3 %, / 100
    assert "ATR warming up" in intents[0].reason


async def test_the_target_is_sent_again_while_the_account_does_not_hold_it() -> None:
    """An intent refused by execution (halted, stale) or undone by a flatten leaves the account
    away from the target sizing sent last: the next bar sends it again. Only this account's
    positions count."""
    broker = MemoryBroker()
    sizing = await wire(broker, SizingService)
    watch = await watcher(broker, str(registry.ORDER_INTENT.filter()))

    async def step(i: int, exposure: float, *held: tuple[str, dict[str, str]]) -> list[Decimal]:
        for account, qty in held:
            await watch.send(registry.POSITIONS, positions(account, qty), account=account)
        await send_target(watch, exposure, bar(i, 100.0))
        await pump([sizing])
        return [OrderIntent.model_validate_json(m.payload).target_qty
                for m in await watch.receive(10, timeout=0)]

    assert await step(0, 0.5) == [5]  # 0.5 · 0.1 · 10000 / 100
    assert await step(1, 0.5) == []  # no positions seen: what was sent is all sizing knows
    assert await step(2, 0.52, ("paper", {"BTC/USDT": "5"})) == []  # held; 5.2 is no change
    # Flattened: back to the target sent, not to 5.2 (a fill on its way would otherwise
    # make every small move of the target an order).
    assert await step(3, 0.52, ("paper", {})) == [5]
    assert await step(4, 0.52, ("paper", {})) == [5]  # refused (halted): asked again
    assert await step(5, 0.5, ("paper", {"BTC/USDT": "4.5"})) == []  # 50: not > 1 % of equity
    assert await step(6, 0.5, ("other", {})) == []  # another account's positions
    assert await step(7, 0.0, ("paper", {"BTC/USDT": "5"})) == [0]
    assert await step(8, 0.0, ("paper", {"BTC/USDT": "0.5"})) == [0]  # to 0: always


# -- the whole chain, twice ------------------------------------------------------------------
def series(n: int) -> list[Bar]:
    """Waves with a drift and some wiggle: enough for every model to speak, both ways."""
    bars, previous = [], 100.0
    for i in range(n):
        close = 100 + 8 * math.sin(2 * math.pi * i / 60) + 0.02 * i + 0.6 * math.sin(i * 1.7)
        high, low = max(previous, close) + 0.15 + 0.1 * (i % 3), min(previous, close) - 0.15
        bars.append(Bar(exchange="binance", symbol="BTC/USDT", timeframe="1m",
                        ts=T0 + timedelta(minutes=i), open=previous, high=high, low=low,
                        close=close, volume=10.0 + i % 7))
        previous = close
    return bars


async def run_chain(bars: list[Bar], **sizing: Any) -> list[tuple[str, bytes]]:
    broker = MemoryBroker()
    runners = [await wire(broker, AlphaService, warmup_from_market=False),
               await wire(broker, EnsembleService, hit_rate_window=20, min_observations=5),
               await wire(broker, SizingService, **sizing)]
    watch = await watcher(broker, str(registry.ALPHA_SIGNALS.filter()),
                          str(registry.ENSEMBLE_TARGET.filter()), str(registry.ORDER_INTENT.filter()))
    await watch.send(registry.TRADE_METRICS, metrics("paper", equity=12_000.0, deposits=10_000.0,
                                                     round_trips=40, win_rate=0.55, avg_win=30.0,
                                                     avg_loss=-20.0), account="paper")
    for b in bars:
        await watch.send(registry.MARKET_BAR, b, exchange=b.exchange, symbol=b.symbol, timeframe=b.timeframe)
        await pump(runners)
    return [(m.topic, m.payload) for m in await watch.receive(100_000, timeout=0)]


@pytest.mark.parametrize("method", ["fixed_fractional", "volatility", "kelly"])
async def test_alpha_ensemble_sizing_give_the_same_messages_twice(method: str) -> None:
    bars = series(400)
    first = await run_chain(bars, method=method, allow_short=True)
    second = await run_chain(bars, method=method, allow_short=True)
    assert first == second
    kinds = [topic.split("/")[-1] for topic, _ in first]
    assert kinds.count("signals") == 400 and kinds.count("target") == 400
    intents = [OrderIntent.model_validate_json(p) for t, p in first
               if registry.ORDER_INTENT.parse(t) is not None]
    assert len(intents) > 10
    assert any(i.target_qty > 0 for i in intents) and any(i.target_qty < 0 for i in intents)
    assert len({i.key for i in intents}) == len(intents)


# -- as a process on the real broker ---------------------------------------------------------
async def test_sizing_process_turns_targets_into_intents(broker: TestBroker, tmp_path: Path) -> None:
    account = f"t{tmp_path.name[-8:]}".replace("_", "-")
    other = f"{account}-other"
    intent_topic = str(registry.ORDER_INTENT.topic(account=account))
    metrics_topic = str(registry.TRADE_METRICS.topic(account=account))
    watch = await Collector.start(broker, intent_topic, str(registry.SERVICE_STATUS.topic(service="sizing")))
    publisher = broker.bus(name="tester")
    await publisher.connect()
    await publisher.send(registry.TRADE_METRICS, metrics(account, equity=20_000.0, deposits=20_000.0),
                         wait=True, account=account)
    proc = ServiceProcess("sizing", broker.env(CIRCLES_SIZING__ACCOUNT=account), tmp_path)
    try:
        await watch.wait(lambda ms: any(m.payload == b"online" and not m.retain for m in ms), 15,
                         "sizing online")
        b = bar(0, 100.0, symbol="ETH/USDT")
        target = Target(bar=b, exposure=0.5, weights={"ma_cross": 1.0})
        for _ in range(2):  # the second is a redelivery: no second intent
            await publisher.send(registry.ENSEMBLE_TARGET, target, wait=True, exchange="binance",
                                 symbol="ETH/USDT", timeframe="1m")
        (message,) = await watch.wait(lambda ms: watch.on(intent_topic), 15, "an intent")
        intent = OrderIntent.model_validate_json(message.payload)
        assert intent.target_qty == 10  # 0.5 · 0.1 · 20000 (from the metrics) / 100
        assert intent.account == account and intent.bar_ts == b.ts
        await publisher.send(registry.ENSEMBLE_TARGET, Target(bar=bar(1, 100.0, symbol="ETH/USDT"),
                                                              exposure=-0.2),
                             wait=True, exchange="binance", symbol="ETH/USDT", timeframe="1m")
        await watch.wait(lambda ms: len(watch.on(intent_topic)) == 2, 15, "the intent to go flat")
        assert OrderIntent.model_validate_json(watch.on(intent_topic)[1].payload).target_qty == 0
        # That intent was refused (trading halted): the account still holds 10, and the
        # next bar asks for flat again. Another account's positions are not this one's.
        await publisher.send(registry.POSITIONS, positions(account, {"ETH/USDT": "10"}),
                             wait=True, account=account)
        await publisher.send(registry.POSITIONS, positions(other, {}), wait=True, account=other)
        await publisher.send(registry.ENSEMBLE_TARGET, Target(bar=bar(2, 100.0, symbol="ETH/USDT"),
                                                              exposure=-0.2),
                             wait=True, exchange="binance", symbol="ETH/USDT", timeframe="1m")
        await watch.wait(lambda ms: len(watch.on(intent_topic)) == 3, 15, "the flat intent again")
        again = OrderIntent.model_validate_json(watch.on(intent_topic)[2].payload)
        assert again.target_qty == 0 and again.bar_ts == bar(2, 100.0).ts
        assert again.reason == "the account holds 10, not the target 0: asked again"
    finally:
        proc.stop()
        await publisher.publish(metrics_topic, b"", retain=True, wait=True)
        for name in (account, other):
            await publisher.publish(str(registry.POSITIONS.topic(account=name)), b"", retain=True,
                                    wait=True)
        await publisher.close()
        await watch.close()


def test_sizing_negative_fraction_exits_78_naming_the_key(broker: TestBroker, tmp_path: Path) -> None:
    proc = ServiceProcess("sizing", broker.env(CIRCLES_SIZING__FRACTION="-0.1"), tmp_path)
    assert proc.wait(15) == 78
    (line,) = proc.log.strip().splitlines()
    assert "sizing.fraction" in line
