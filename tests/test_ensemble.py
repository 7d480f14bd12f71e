"""The ensemble service: the weighted combination by hand, the deadband, hit-rate weighting on
a hand-made sequence, and the service on the in-memory bus and as a real process."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from appliance.bus import Filter, MemoryBroker, MemoryBus, registry
from appliance.bus.trading import Bar, ModelSignal, Signals, Target
from appliance.config import settings_class
from appliance.runtime import Runner
from modules.trading.ensemble.service import EnsembleService, EnsembleSettings, combine, deadband
from tests.helpers import Collector, ServiceProcess, TestBroker

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def bar(i: int, close: float, symbol: str = "BTC/USDT") -> Bar:
    return Bar(exchange="binance", symbol=symbol, timeframe="1m", ts=T0 + timedelta(minutes=i),
               open=close, high=close, low=close, close=close, volume=1.0)


def sig(model: str, value: float, confidence: float = 1.0) -> ModelSignal:
    return ModelSignal(model=model, value=value, confidence=confidence)


def test_combine_by_hand() -> None:
    signals = [sig("a", 0.5, 1.0), sig("b", -1.0, 0.5), sig("c", 1.0, 1.0)]
    # (3·0.5·1 + 1·(−1)·0.5) / (3 + 1); c is not taking part.
    assert combine(signals, {"a": 3.0, "b": 1.0}) == pytest.approx(0.25)
    assert combine(signals, {"a": 1.0, "b": 1.0, "c": 1.0}) == pytest.approx((0.5 - 0.5 + 1) / 3)
    assert combine(signals, {}) == 0.0
    assert combine([sig("a", 1.0), sig("a", 1.0)], {"a": 2.0}) == 1.0  # never beyond ±1
    assert combine([sig("a", 1.0, 0.0)], {"a": 1.0}) == 0.0  # no confidence, no exposure
    assert deadband(0.04, 0.05) == 0.0 and deadband(-0.05, 0.05) == -0.05 and deadband(0.3, 0) == 0.3


async def wire(broker: MemoryBroker, **config: Any) -> Runner:
    settings = settings_class({"ensemble": EnsembleSettings})(ensemble=EnsembleSettings(**config))
    bus = MemoryBus("ensemble", broker)
    runner = Runner(EnsembleService(settings, bus), bus)
    await bus.connect()
    await runner.service.start()
    await bus.subscribe(runner.filters())
    return runner


async def targets_for(sequence: list[Signals], **config: Any) -> list[Target]:
    broker = MemoryBroker()
    ensemble = await wire(broker, **config)
    watch = MemoryBus("watch", broker, status=False)
    await watch.connect()
    await watch.subscribe([(Filter(str(registry.ENSEMBLE_TARGET.filter())), 1)])
    for signals in sequence:
        b = signals.bar
        await watch.send(registry.ALPHA_SIGNALS, signals, exchange=b.exchange, symbol=b.symbol,
                         timeframe=b.timeframe)
    await ensemble.handle(await ensemble.bus.receive(1000, timeout=1))
    return [Target.model_validate_json(m.payload) for m in await watch.receive(1000, timeout=0.1)]


async def test_weights_default_weight_exclusion_and_deadband() -> None:
    signals = Signals(bar=bar(0, 100), signals=[sig("a", 0.5), sig("b", -1.0, 0.5), sig("c", 0.2)])
    (target,) = await targets_for([signals], weights={"a": 3, "c": 0}, min_abs_exposure=0)
    assert target.exposure == pytest.approx(0.25) and target.weights == {"a": 3.0, "b": 1.0}
    (target,) = await targets_for([signals], weights={"a": 3, "c": 0}, default_weight=0.5,
                                  min_abs_exposure=0)
    assert target.exposure == pytest.approx((1.5 - 0.25) / 3.5)
    (target,) = await targets_for([signals], weights={"a": 3, "c": 0}, min_abs_exposure=0.3)
    assert target.exposure == 0.0 and target.bar == signals.bar
    (target,) = await targets_for([Signals(bar=bar(0, 100), signals=[])])
    assert target.exposure == 0.0 and target.weights == {}


async def test_hit_rate_weighting_on_a_hand_made_sequence() -> None:
    # Closes 100, 101, 102, 101, 102, 103: returns +, +, −, +, +. Model "up" always says +1,
    # "down" always −1. Each bar's signal is scored against the next return.
    closes = [100, 101, 102, 101, 102, 103]
    sequence = [Signals(bar=bar(i, c), signals=[sig("up", 1.0), sig("down", -1.0)])
                for i, c in enumerate(closes)]
    targets = await targets_for(sequence, hit_rate_window=3, min_observations=2, min_abs_exposure=0)
    weights = [t.weights for t in targets]
    assert weights[0] == weights[1] == {"up": 0.5, "down": 0.5}  # 0 then 1 evaluated: the prior
    assert weights[2] == {"up": 1.0, "down": 0.0}  # up: ++ down: −−
    assert weights[3] == {"up": pytest.approx(2 / 3), "down": pytest.approx(1 / 3)}  # after +, +, −
    assert weights[4] == {"up": pytest.approx(2 / 3), "down": pytest.approx(1 / 3)}  # window: +, −, +
    assert weights[5] == {"up": pytest.approx(2 / 3), "down": pytest.approx(1 / 3)}  # −, +, +
    assert targets[2].exposure == 1.0
    assert targets[3].exposure == pytest.approx((2 / 3 - 1 / 3) / 1.0)


async def test_hit_rate_skips_missing_bars_flat_returns_and_silent_models() -> None:
    sequence = [Signals(bar=bar(0, 100), signals=[sig("m", 1.0), sig("quiet", 0.0)]),
                Signals(bar=bar(1, 101), signals=[sig("m", 1.0), sig("quiet", 0.0)]),  # hit
                Signals(bar=bar(2, 101), signals=[sig("m", 1.0), sig("quiet", 0.0)]),  # flat
                Signals(bar=bar(5, 90), signals=[sig("m", 1.0), sig("quiet", 0.0)]),  # a gap
                Signals(bar=bar(6, 89), signals=[sig("m", 1.0), sig("quiet", 0.0)])]  # miss
    targets = await targets_for(sequence, hit_rate_window=10, min_observations=2, min_abs_exposure=0)
    assert [t.weights["m"] for t in targets] == [0.5, 0.5, 0.5, 0.5, 0.5]  # 1 evaluated < 2
    targets = await targets_for(sequence, hit_rate_window=10, min_observations=1, min_abs_exposure=0)
    assert [t.weights["m"] for t in targets] == [0.5, 1.0, 1.0, 1.0, 0.5]
    assert [t.weights["quiet"] for t in targets] == [0.5] * 5  # never evaluated


async def test_redelivered_or_older_signals_give_no_second_target() -> None:
    sequence = [Signals(bar=bar(i, 100), signals=[sig("a", 0.5)]) for i in (0, 1, 1, 0, 2)]
    sequence.append(Signals(bar=bar(0, 100, symbol="ETH/USDT"), signals=[sig("a", -0.5)]))
    targets = await targets_for(sequence)
    assert [(t.bar.symbol, t.bar.ts.minute, t.exposure) for t in targets] == [
        ("BTC/USDT", 0, 0.5), ("BTC/USDT", 1, 0.5), ("BTC/USDT", 2, 0.5), ("ETH/USDT", 0, -0.5)]


def test_settings_name_the_bad_key() -> None:
    with pytest.raises(ValidationError, match=r"weights\.a\n.*greater than or equal to 0"):
        EnsembleSettings(weights={"a": -1})
    with pytest.raises(ValidationError, match=r"min_observations\n.*must not exceed hit_rate_window \(5\)"):
        EnsembleSettings(hit_rate_window=5)
    assert EnsembleSettings(hit_rate_window=5, min_observations=5).min_observations == 5


async def test_ensemble_process_turns_signals_into_targets(broker: TestBroker, tmp_path: Path) -> None:
    symbol = f"E{tmp_path.name[-6:]}/USDT".replace("_", "")
    target_topic = str(registry.ENSEMBLE_TARGET.topic(exchange="binance", symbol=symbol, timeframe="1m"))
    watch = await Collector.start(broker, target_topic, str(registry.SERVICE_STATUS.topic(service="ensemble")))
    env = broker.env(CIRCLES_ENSEMBLE__WEIGHTS=json.dumps({"a": 3}), CIRCLES_ENSEMBLE__MIN_ABS_EXPOSURE="0")
    proc = ServiceProcess("ensemble", env, tmp_path)
    publisher = broker.bus(name="tester")
    try:
        await watch.wait(lambda ms: any(m.payload == b"online" and not m.retain for m in ms), 15,
                         "ensemble online")
        await publisher.connect()
        signals = Signals(bar=bar(0, 100, symbol), signals=[sig("a", 0.5), sig("b", -1.0, 0.5)])
        await publisher.send(registry.ALPHA_SIGNALS, signals, wait=True, exchange="binance",
                             symbol=symbol, timeframe="1m")
        (message,) = await watch.wait(lambda ms: watch.on(target_topic), 15, "a target")
        target = Target.model_validate_json(message.payload)
        assert target.exposure == pytest.approx(0.25) and target.weights == {"a": 3.0, "b": 1.0}
        assert target.bar == signals.bar
    finally:
        proc.stop()
        await publisher.close()
        await watch.close()


def test_ensemble_negative_weight_exits_78_naming_the_key(broker: TestBroker, tmp_path: Path) -> None:
    env = broker.env(CIRCLES_ENSEMBLE__WEIGHTS=json.dumps({"ma_cross": -2}))
    proc = ServiceProcess("ensemble", env, tmp_path)
    assert proc.wait(15) == 78
    (line,) = proc.log.strip().splitlines()
    assert "ensemble.weights.ma_cross" in line
