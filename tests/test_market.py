"""The `market` service: synthetic, replayed and exchange bars, feed states and history."""

from __future__ import annotations

import asyncio
import csv
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.bus import Filter, MemoryBroker, MemoryBus, registry
from appliance.bus.trading import Bar, FeedState
from appliance.config import CoreSettings, load, settings_class
from appliance.errors import ConfigError
from appliance.runtime import Runner
from modules.trading.exchange import ExchangeSettings
from modules.trading.market.replay import BadFile, ReplayFile
from modules.trading.market.service import MarketService
from modules.trading.market.settings import MarketSettings, SyntheticSettings
from modules.trading.market.synthetic import SyntheticSource, SyntheticWalk
from tests.fake_exchange import FakeExchange, fake_exchange_fixture  # noqa: F401
from tests.helpers import Collector, ServiceProcess, TestBroker, until

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_699_999_980  # a minute boundary


class ManualClock:
    """A clock the test moves; sleepers wake when it passes their time."""

    def __init__(self, now: float) -> None:
        self._now = now
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def sleep_until(self, when: float) -> None:
        if when <= self._now:
            await asyncio.sleep(0)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((when, waiter))
        await waiter

    def waits(self) -> list[float]:
        """The times the sleepers wait for."""
        return [when for when, _ in self._sleepers]

    def advance(self, seconds: float) -> None:
        self._now += seconds
        due = [(w, f) for w, f in self._sleepers if w <= self._now]
        self._sleepers = [(w, f) for w, f in self._sleepers if w > self._now]
        for _, waiter in due:
            if not waiter.done():
                waiter.set_result(None)



@dataclass
class Running:
    service: MarketService
    tester: MemoryBus
    received: list[Any]
    cleared: list[str]  # topics whose retained message was deleted

    def bars(self) -> list[Bar]:
        return [m for m in self.received if isinstance(m, Bar)]

    def states(self) -> list[FeedState]:
        return [m for m in self.received if isinstance(m, FeedState)]

    async def request(self, command: str, **args: Any) -> Any:
        reply = await self.tester.request("market", command, args, timeout=5)
        assert reply.ok, reply.error
        return reply.result


@asynccontextmanager
async def running(config: MarketSettings, clock: ManualClock,
                  broker: MemoryBroker | None = None) -> AsyncIterator[Running]:
    """The service on the in-memory bus, driven by `clock`, as `serve` would run it."""
    broker = broker or MemoryBroker()
    bus = MemoryBus("market", broker)
    settings = settings_class({"market": MarketSettings})(market=config)
    service = MarketService(settings, bus)
    service.clock = clock
    runner = Runner(service, bus)
    tester = MemoryBus("tester", broker)
    await tester.connect()
    await tester.subscribe([(Filter("circles/market/#"), 1)])
    received: list[Any] = []
    cleared: list[str] = []

    async def pump() -> None:
        while True:
            for message in await tester.receive(100, timeout=1):
                spec = registry.spec_for(message.topic)
                assert spec is not None
                if message.payload:
                    received.append(spec.decode(message.payload))
                else:
                    cleared.append(message.topic)
                tester.ack(message)

    await bus.connect()
    await service.start()
    await bus.subscribe(runner.filters())
    tasks = [asyncio.create_task(runner.receive_loop()), asyncio.create_task(service.run()),
             asyncio.create_task(pump())]
    try:
        yield Running(service, tester, received, cleared)
    finally:
        runner.stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await service.stop()


# -- synthetic ---------------------------------------------------------------------------------

def test_the_same_seed_gives_the_same_valid_bars() -> None:
    key = ("sim", "BTC/USDT", "5m")
    walk_a, walk_b = SyntheticWalk(SyntheticSettings(seed=7), key, T0), \
        SyntheticWalk(SyntheticSettings(seed=7), key, T0)
    a, b = [walk_a.next() for _ in range(300)], [walk_b.next() for _ in range(300)]
    assert a == b
    other = SyntheticWalk(SyntheticSettings(seed=8), key, T0)
    assert [other.next() for _ in range(300)] != a
    eth = SyntheticWalk(SyntheticSettings(seed=7), ("sim", "ETH/USDT", "5m"), T0)
    assert [bar.close for bar in (eth.next() for _ in range(5))] != [bar.close for bar in a[:5]]
    for previous, bar in zip(a, a[1:], strict=False):
        assert (bar.ts - previous.ts) == timedelta(minutes=5)
        assert bar.open == previous.close
    for bar in a:
        assert 0 < bar.low <= min(bar.open, bar.close) <= max(bar.open, bar.close) <= bar.high
        assert bar.volume >= 0 and bar.gap == 0
    assert a[0].open == 60000.0 and len({bar.close for bar in a}) > 250  # it moves


async def test_synthetic_history_then_a_bar_at_each_close() -> None:
    clock = ManualClock(T0 + 15)
    config = MarketSettings(history_bars=50, symbols=["BTC/USDT", "ETH/USDT"])
    source = SyntheticSource(config, clock)
    await source.open()
    history = await source.history(("sim", "BTC/USDT", "1m"))
    assert len(history) == 50 and history[-1].close_time.timestamp() == T0
    async with running(config, clock) as run:
        await until(lambda: run.service.phase == "running", what="history kept")
        await until(lambda: len(run.states()) >= 2, what="initial feed states")
        assert not any(s.stale for s in run.states())
        assert all(s.live for s in run.states())  # risk may judge them by the wall clock
        assert run.bars() == []  # history is kept, not published
        clock.advance(60)
        bars = await until(lambda: run.bars() if len(run.bars()) == 2 else None, what="2 bars")
        assert {(b.symbol, b.ts.timestamp()) for b in bars} == {("BTC/USDT", T0), ("ETH/USDT", T0)}
        kept = await run.request("history", symbol="BTC/USDT", timeframe="1m", limit=3)
        assert [Bar.model_validate(b).ts.timestamp() for b in kept] == [T0 - 120, T0 - 60, T0]
        assert (await run.request("history", symbol="btc-usdt", limit=1000,
                                  before=datetime.fromtimestamp(T0 - 60, UTC).isoformat()))[-1]["ts"] \
            == datetime.fromtimestamp(T0 - 120, UTC).isoformat().replace("+00:00", "Z")


async def test_feed_states_left_over_are_cleared_at_start() -> None:
    """The market is the only publisher of feed states: at start it clears the retained
    states of the feeds it does not serve now (a symbol since removed, another timeframe,
    another exchange), which risk would otherwise judge stale for ever."""
    clock = ManualClock(T0 + 15)
    broker = MemoryBroker()
    earlier = MemoryBus("earlier-market", broker)
    await earlier.connect()
    served = ("sim", "BTC/USDT", "1m")
    gone = [("sim", "DOGE/USDT", "1m"), ("sim", "BTC/USDT", "5m"), ("binance", "BTC/USDT", "1m")]

    def topic(key: tuple[str, str, str]) -> str:
        return str(registry.MARKET_FEED.topic(exchange=key[0], symbol=key[1], timeframe=key[2]))

    for exchange, symbol, timeframe in [served, *gone]:
        state = FeedState(exchange=exchange, symbol=symbol, timeframe=timeframe,  # type: ignore[arg-type]
                          last_bar_ts=datetime.fromtimestamp(T0 - 86_400, UTC))
        await earlier.send(registry.MARKET_FEED, state, exchange=exchange, symbol=symbol,
                           timeframe=timeframe)
    assert set(broker.retained) == {topic(k) for k in [served, *gone]}
    async with running(MarketSettings(), clock, broker) as run:
        await until(lambda: len(run.cleared) == len(gone), what="the states left over cleared")
        assert sorted(run.cleared) == sorted(topic(k) for k in gone)
        assert set(broker.retained) == {topic(served)}
        await until(lambda: broker.retained[topic(served)].sender == "market", what="our state")
        ours = FeedState.model_validate_json(broker.retained[topic(served)].payload)
        assert ours.last_bar_ts == datetime.fromtimestamp(T0 - 60, UTC)  # not the old one
        clock.advance(60)
        await until(lambda: len(run.bars()) == 1, what="a bar")
        assert sorted(run.cleared) == sorted(topic(k) for k in gone)  # ours are left alone


def test_the_market_service_does_not_import_ccxt_for_synthetic_data() -> None:
    code = ("import sys, json, modules.trading.market.service; "
            "print(json.dumps('ccxt' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) is False


# -- replay ------------------------------------------------------------------------------------

def rows(n: int, *, start: int = T0, step: int = 60, skip: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        if i in skip:
            continue
        price = 100 + i
        out.append({"ts": datetime.fromtimestamp(start + i * step, UTC).isoformat().replace("+00:00", "Z"),
                    "open": price, "high": price + 2, "low": price - 1, "close": price + 1,
                    "volume": 10 + i})
    return out


def write_csv(path: Path, data: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
    return path


def write_parquet(path: Path, data: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list[Any]] = {k: [row[k] for row in data] for k in data[0]}
    columns["ts"] = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t in columns["ts"]]
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("kind", ["csv", "parquet"])
async def test_replay_publishes_every_bar_in_order(
        broker: TestBroker, tmp_path: Path, kind: str) -> None:
    symbol = f"R{kind.upper()}/USDT"
    data = rows(41, skip=(20,))  # 40 bars, one missing
    path = (write_csv if kind == "csv" else write_parquet)(tmp_path / f"bars.{kind}", data)
    bar_topic = str(registry.MARKET_BAR.topic(exchange="sim", symbol=symbol, timeframe="1m"))
    feed_topic = str(registry.MARKET_FEED.topic(exchange="sim", symbol=symbol, timeframe="1m"))
    watch = await Collector.start(broker, bar_topic, feed_topic)
    proc = ServiceProcess("market", broker.env(
        CIRCLES_MARKET__SOURCE="replay", CIRCLES_MARKET__REPLAY__FILE=str(path),
        CIRCLES_MARKET__REPLAY__SYMBOL=symbol), tmp_path)
    tester = broker.bus()
    await tester.connect()
    try:
        await watch.wait(lambda ms: len([m for m in ms if m.topic == bar_topic]) >= 40, 30,
                         "40 replayed bars")
        bars = [Bar.model_validate_json(m.payload) for m in watch.on(bar_topic)]
        assert len(bars) == 40
        assert [b.ts.isoformat().replace("+00:00", "Z") for b in bars] == [r["ts"] for r in data]
        assert [(b.open, b.high, b.low, b.close, b.volume) for b in bars] == \
            [(r["open"], r["high"], r["low"], r["close"], r["volume"]) for r in data]
        assert [b.gap for b in bars] == [0] * 20 + [1] + [0] * 19
        assert {(b.exchange, b.symbol, b.timeframe) for b in bars} == {("sim", symbol, "1m")}
        final = await watch.wait(lambda ms: [s for s in (FeedState.model_validate_json(m.payload)
                                                         for m in ms if m.topic == feed_topic)
                                             if s.reason == "replay finished"], 10, "finished")
        assert final[-1].gaps == 1 and not final[-1].stale
        states = [FeedState.model_validate_json(m.payload) for m in watch.on(feed_topic)]
        assert states and not any(s.live for s in states)  # old times: not for the wall clock
        assert final[-1].last_bar_ts == bars[-1].ts
        reply = await tester.request("market", "feeds", timeout=10)
        assert reply.ok and reply.result["phase"] == "finished" and reply.result["published"] == 40
        reply = await tester.request("market", "history", {"symbol": symbol, "limit": 5}, timeout=10)
        assert [Bar.model_validate(b) for b in reply.result] == bars[-5:]
        assert proc.process.poll() is None  # the replay ended; the service did not
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0, proc.log
    finally:
        proc.stop()
        await tester.publish(feed_topic, b"", retain=True, wait=True)  # leave no feed behind
        await tester.close()
        await watch.close()


def test_a_corrupted_replay_file_exits_78_naming_the_line(broker: TestBroker, tmp_path: Path) -> None:
    data = rows(10)
    data[3]["close"] = "12,5"  # the 4th data row: line 5 of the file
    path = write_csv(tmp_path / "bad.csv", data)
    proc = ServiceProcess("market", broker.env(CIRCLES_MARKET__SOURCE="replay",
                                               CIRCLES_MARKET__REPLAY__FILE=str(path)), tmp_path)
    assert proc.wait(20) == 78, proc.log
    assert "market.replay.file" in proc.log and "line 5" in proc.log and str(path) in proc.log
    assert "'12,5' is not a number" in proc.log


@pytest.mark.parametrize("change,problem", [
    (lambda d: d.insert(6, dict(d[2])), "line 8: time 2023-11-14T22:15:00+00:00 is before"),
    (lambda d: d.insert(6, dict(d[5])), "line 8: duplicate time"),
    (lambda d: d[4].update(low=500), "line 6: low 500.0 > high"),
    (lambda d: d[4].update(open=-1), "line 6: prices must be positive"),
    (lambda d: d[1].update(ts="yesterday"), "line 3: Invalid isoformat string"),
    (lambda d: d[2].update(open=200), "line 4: open 200.0 and close"),
])
def test_replay_file_errors_name_the_line(tmp_path: Path, change: Callable[[list[dict[str, Any]]], None],
                                          problem: str) -> None:
    data = rows(10)
    change(data)
    with pytest.raises(BadFile) as raised:
        ReplayFile(write_csv(tmp_path / "f.csv", data), "BTC/USDT", None).check()
    assert problem in str(raised.value) and "market.replay.file" in str(raised.value)


def test_replay_file_errors_in_parquet_name_the_row_and_times_may_be_epoch_ms(tmp_path: Path) -> None:
    data = rows(5)
    data[2]["high"] = 1.0
    with pytest.raises(BadFile, match="row 3: low"):
        ReplayFile(write_parquet(tmp_path / "f.parquet", data), "BTC/USDT", None).check()
    epoch = rows(6, step=300)
    for row in epoch:
        row["ts"] = int(datetime.fromisoformat(row["ts"].replace("Z", "+00:00")).timestamp() * 1000)
    checked = ReplayFile(write_csv(tmp_path / "ms.csv", epoch), "BTC/USDT", None)
    checked.check()
    assert (checked.timeframe, checked.rows, checked.symbols) == ("5m", 6, ["BTC/USDT"])
    with pytest.raises(BadFile, match="line 3: 600 s after the previous row: not a multiple"):
        ReplayFile(write_csv(tmp_path / "ms2.csv", rows(4, step=600)), "X", "15m").check()
    with pytest.raises(BadFile, match="missing column"):
        (tmp_path / "empty.csv").write_text("time,open\n1,2\n")
        ReplayFile(tmp_path / "empty.csv", "X", None).check()
    with pytest.raises(BadFile, match="does not exist"):
        ReplayFile(tmp_path / "nope.csv", "X", None).check()


def test_a_parquet_replay_without_pyarrow_exits_78_saying_what_to_install(
        broker: TestBroker, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "bars.parquet", rows(5))  # a good file
    # The service as `circles run market` starts it, in a Python where pyarrow cannot be imported.
    code = ("import runpy, sys; sys.modules['pyarrow'] = None; sys.argv = ['circles', 'run', 'market']; "
            "runpy.run_module('appliance.cli', run_name='__main__', alter_sys=True)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=broker.env(CIRCLES_MARKET__SOURCE="replay",
                                         CIRCLES_MARKET__REPLAY__FILE=str(path)))
    output = done.stdout + done.stderr
    assert done.returncode == 78, output
    assert "market.replay.file" in output and str(path) in output
    assert "needs pyarrow" in output and "pip install 'circles[parquet]'" in output
    assert "Traceback" not in output


def test_replay_without_a_file_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[market]\nsource = "replay"\n')
    monkeypatch.setenv("CIRCLES_CONFIG", str(tmp_path / "c.toml"))
    with pytest.raises(ConfigError, match="market.replay.file: required"):
        load(settings_class({"market": MarketSettings}))


# -- exchange ----------------------------------------------------------------------------------

def exchange_config(fake: FakeExchange, **overrides: Any) -> MarketSettings:
    values: dict[str, Any] = {
        "source": "exchange", "history_bars": 20, "poll_delay_s": 2,
        "ccxt": ExchangeSettings(urls=fake.urls(), retries=1, backoff_s=0.01), **overrides}
    return MarketSettings(**values)


async def test_exchange_bars_closed_only_with_gaps_and_staleness(fake_exchange: FakeExchange) -> None:
    clock = ManualClock(T0 + 10)
    fake_exchange.clock = clock.now
    key = ("BTCUSDT", "1m")
    async with running(exchange_config(fake_exchange), clock) as run:
        await until(lambda: run.service.phase == "running", what="history from the exchange")
        kept = [Bar.model_validate(b) for b in await run.request("history", limit=100)]
        assert len(kept) == 20 and kept[-1].ts.timestamp() == T0 - 60  # not the forming one
        assert kept[-1].close == float(fake_exchange.kline(*key, (T0 - 60) * 1000, T0)[4])
        assert run.bars() == []
        assert run.service.feeds[("binance", "BTC/USDT", "1m")].state().last_bar_ts == kept[-1].ts

        clock.advance(60)  # T0 closed, T0+60 forming
        (bar,) = await until(lambda: run.bars() or None, what="the bar that closed")
        final = fake_exchange.kline(*key, T0 * 1000, T0 + 1000)
        assert (bar.exchange, bar.ts.timestamp(), bar.close, bar.volume) == \
            ("binance", T0, float(final[4]), float(final[5]))

        fake_exchange.missing.add((*key, (T0 + 120) * 1000))
        for _ in range(3):
            clock.advance(60)
            await asyncio.sleep(0.3)
        await until(lambda: len(run.bars()) == 3, what="the bar after the missing one")
        ts = [b.ts.timestamp() for b in run.bars()]
        assert ts == [T0, T0 + 60, T0 + 180] and [b.gap for b in run.bars()] == [0, 0, 1]
        assert all(b.close_time.timestamp() <= T0 + 250 for b in run.bars())
        assert any(s.gaps == 1 for s in run.states())

        fake_exchange.freeze_klines()
        for _ in range(4):
            clock.advance(60)
            await asyncio.sleep(0.3)
        stale = await until(lambda: [s for s in run.states() if s.stale], what="a stale feed")
        assert "no new bar since" in stale[-1].reason and stale[-1].gaps == 1
        # The candle forming when the exchange froze is the last one it ever closed.
        assert [b.ts.timestamp() for b in run.bars()][3:] == [T0 + 240]

        fake_exchange.resume_klines()
        clock.advance(60)
        await until(lambda: not run.states()[-1].stale, what="fresh again")
        assert [b.gap for b in run.bars()[3:]] == [0] * len(run.bars()[3:])
        assert fake_exchange.calls("/api/v3/klines") >= 9
        reply = await run.request("feeds")
        assert reply["feeds"][0]["stale"] is False and reply["phase"] == "running"


async def test_a_failed_poll_is_tried_again_soon_not_at_the_next_close(fake_exchange: FakeExchange) -> None:
    start = T0 - T0 % 300  # a 5m boundary
    clock = ManualClock(start + 10)
    fake_exchange.clock = clock.now
    ccxt = ExchangeSettings(urls=fake_exchange.urls(), retries=0, backoff_s=0.01,
                            breaker_failures=100)  # the breaker counts real seconds, not the clock's
    async with running(exchange_config(fake_exchange, timeframes=["5m"], ccxt=ccxt), clock) as run:
        await until(lambda: run.service.phase == "running", what="history from the exchange")
        fake_exchange.fail_next("/api/v3/klines", times=8, status=503)
        before = fake_exchange.calls("/api/v3/klines")
        # The bar closing at +300 is asked for at +302 (poll_delay_s); it fails, and is asked
        # for again 5, 10, 20, 40 s later, then every 60 s — but no later than the next
        # regular poll (+602), which fetches both bars.
        polls = [302, 307, 317, 337, 377, 437, 497, 557, 602]

        async def poll(n: int, due: float) -> None:
            """Once the feed sleeps until `due`, move the clock there and see it ask."""
            await until(lambda: due in clock.waits(), what=f"a poll due at +{due - start:g}")
            clock.advance(due - clock.now())
            await until(lambda: fake_exchange.calls("/api/v3/klines") == before + n, what=f"poll {n}")

        for n, offset in enumerate(polls, 1):
            await poll(n, start + offset)
            if n == 1:
                feed = await until(lambda: run.service.source.problem(("binance", "BTC/USDT", "5m")),
                                   what="the reason the feed is behind")
                (state,) = (await run.request("feeds"))["feeds"]
                assert state["reason"] == feed and "bars not fetched" in feed and "503" in feed
                assert state["stale"] is False
        bars = await until(lambda: run.bars() if len(run.bars()) == 2 else None, what="both bars")
        assert [(b.ts.timestamp() - start, b.gap) for b in bars] == [(0, 0), (300, 0)]
        assert [t - start for t in fake_exchange.times("/api/v3/klines")[before:]] == polls
        (state,) = (await run.request("feeds"))["feeds"]
        assert state["reason"] == ""


@pytest.mark.parametrize("overrides,key", [({"symbols": ["NOPE/USDT"]}, "market.symbols"),
                                           ({"timeframes": ["1m", "3m"]}, None),
                                           ({"ccxt": {"id": "no-such-exchange"}}, "market.ccxt.id")])
async def test_an_unknown_symbol_or_exchange_stops_the_exchange_source(
        fake_exchange: FakeExchange, overrides: dict[str, Any], key: str | None) -> None:
    config = exchange_config(fake_exchange, **overrides)
    service = MarketService(settings_class({"market": MarketSettings})(market=config),
                            MemoryBus("market", MemoryBroker()))
    await service.bus.connect()
    await service.start()
    try:
        if key is None:  # binance offers 3m: nothing to refuse
            await service.source.open()
            return
        with pytest.raises(ConfigError, match=key):
            await service.run()
    finally:
        await service.stop()


async def test_the_exchange_source_as_a_process(
        broker: TestBroker, fake_exchange: FakeExchange, tmp_path: Path) -> None:
    feed_topic = str(registry.MARKET_FEED.topic(exchange="binance", symbol="ETH/USDT", timeframe="5m"))
    watch = await Collector.start(broker, feed_topic)
    proc = ServiceProcess("market", broker.env(
        CIRCLES_MARKET__SOURCE="exchange", CIRCLES_MARKET__SYMBOLS='["ETH/USDT"]',
        CIRCLES_MARKET__TIMEFRAMES='["5m"]', CIRCLES_MARKET__HISTORY_BARS="30",
        CIRCLES_MARKET__CCXT__URLS=json.dumps(fake_exchange.urls())), tmp_path)
    tester = broker.bus()
    await tester.connect()
    try:
        await watch.wait(lambda ms: [m for m in ms if FeedState.model_validate_json(m.payload)
                                     .last_bar_ts is not None], 30, "a feed state with bars")
        reply = await tester.request("market", "history", {"exchange": "binance", "symbol": "ETH/USDT",
                                                           "timeframe": "5m"}, timeout=10)
        assert reply.ok, reply.error
        bars = [Bar.model_validate(b) for b in reply.result]
        assert len(bars) == 30 and bars[-1].close_time <= datetime.now(UTC)
        assert all(b.ts - a.ts == timedelta(minutes=5) for a, b in zip(bars, bars[1:], strict=False))
        assert fake_exchange.calls("/api/v3/exchangeInfo") == 1
        assert fake_exchange.calls("/api/v3/klines") >= 1
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0, proc.log
    finally:
        proc.stop()
        await tester.publish(feed_topic, b"", retain=True, wait=True)  # leave no feed behind
        await tester.close()
        await watch.close()


def test_core_settings_start_empty() -> None:
    settings = settings_class({"market": MarketSettings})()
    assert isinstance(settings, CoreSettings)
    config: MarketSettings = settings.market  # type: ignore[attr-defined]
    assert (config.source, config.feed_exchange, config.symbols, config.timeframes) == \
        ("synthetic", "sim", ["BTC/USDT"], ["1m"])
    assert MarketSettings(source="exchange").feed_exchange == "binance"
