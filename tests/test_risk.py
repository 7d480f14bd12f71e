"""The risk service: the only writer of the trading halt. Breaches halt trading, people
resume it (never risk by itself), Home Assistant has a switch, and the command line drives
it; everything is audit-logged with who asked."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from appliance.bus import Filter, Message, MqttBus, registry
from appliance.bus.payloads import CommandReply, HealthState, TradingHalt, utcnow
from appliance.bus.trade_event import TradeMetrics
from appliance.bus.trading import FeedState, Order, Position, Positions, RiskState
from appliance.config import CoreSettings
from appliance.security import audit as events
from appliance.security.audit import AuditEvent, AuditLog
from modules.trading.risk import discovery
from modules.trading.risk.book import RiskBook
from modules.trading.risk.service import state_file
from modules.trading.risk.settings import RiskSettings
from tests.helpers import Collector, ServiceProcess, TestBroker, circles, unique_topic

HALT = str(registry.TRADING_HALT.topic())
RISK_STATE = str(registry.RISK_STATE.topic())
SWITCH_CONFIG = discovery.entities()[0].topic()
SWITCH_CMD = str(registry.HA_CMD.topic(command=discovery.HA_COMMAND))
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


# -- the book, without a bus -----------------------------------------------------------------
def _metrics(equity: float, net_pnl: float, ratio: float | None = 0.0) -> dict[str, Any]:
    return {"equity": equity, "net_pnl": net_pnl, "max_drawdown_ratio": ratio}


def _pos(symbol: str, qty: str, price: str, last: str | None = None) -> Position:
    last_price = Decimal(last) if last else None
    pnl = (last_price - Decimal(price)) * Decimal(qty) if last_price else None
    return Position(symbol=symbol, qty=Decimal(qty), avg_price=Decimal(price),
                    last_price=last_price, unrealized_pnl=pnl)


def _limits(book: RiskBook) -> list[str]:
    return [b.limit for b in book.assess(NOW).breaches]


def test_daily_loss_counts_trading_pnl_not_cash_flows() -> None:
    book = RiskBook(RiskSettings())
    book.on_metrics("a", _metrics(10_000, 0))
    book.roll(NOW)
    book.on_metrics("a", _metrics(5_000, 0))  # a withdrawal of half: no loss
    book.roll(NOW)
    assert book.assess(NOW).figures["daily_loss_pct"] == 0 and _limits(book) == []
    book.on_positions("a", [_pos("BTC/USDT", "0.01", "50000", "11000")])  # −390 unrealized
    assessment = book.assess(NOW)
    assert assessment.figures["daily_loss_pct"] == pytest.approx(3.9)
    book.on_metrics("a", _metrics(4_800, -200))  # and −200 realized: 5.9 % of 10 000
    (breach,) = book.assess(NOW).breaches
    assert breach.text == "max_daily_loss_pct: lost 5.9 % today (limit 5 %), account a"
    assert breach.loss
    book.roll(NOW + timedelta(days=1))  # a new UTC day starts from the current equity
    assert _limits(book) == []


def test_drawdown_from_the_peak_moves_with_cash_and_is_accepted_by_acknowledge() -> None:
    book = RiskBook(RiskSettings(max_daily_loss_pct=None))
    book.on_metrics("a", _metrics(10_000, 0))
    book.roll(NOW)
    book.on_metrics("a", _metrics(12_000, 2_000))
    book.roll(NOW)
    book.on_metrics("a", _metrics(7_000, 1_000))  # −1 000 of PnL, and 4 000 withdrawn
    book.roll(NOW)
    assert book.assess(NOW).figures["drawdown_pct"] == pytest.approx(1000 / 8000 * 100)
    book.on_metrics("a", _metrics(5_000, -1_000))
    book.roll(NOW)
    (breach,) = book.assess(NOW).breaches
    assert breach.text.startswith("max_drawdown_pct: equity 5000.00 is 37.5 % below its peak "
                                  "8000.00 (limit 20 %)")
    book.acknowledge([breach])
    assert _limits(book) == [] and book.assess(NOW).figures["drawdown_pct"] == 0


def test_the_ledgers_drawdown_counts_when_it_grows_past_the_limit() -> None:
    book = RiskBook(RiskSettings(max_daily_loss_pct=None))
    book.on_metrics("a", _metrics(10_000, 0, ratio=0.3))  # history before risk saw it
    book.roll(NOW)
    assert _limits(book) == []
    book.on_metrics("a", _metrics(10_000, 0, ratio=0.31))
    book.roll(NOW)
    (breach,) = book.assess(NOW).breaches
    assert breach.text == ("max_drawdown_pct: the ledger's max drawdown reached 31.0 % "
                           "(limit 20 %), account a")
    book.acknowledge([breach])
    assert _limits(book) == []


def test_exposure_per_symbol_and_in_total() -> None:
    book = RiskBook(RiskSettings())
    book.on_metrics("a", _metrics(10_000, 0))
    book.on_positions("a", [_pos("BTC/USDT", "0.1", "50000", "50000"),
                            _pos("ETH/USDT", "-2", "2000", "2500")])  # short, −1 000
    assessment = book.assess(NOW)
    assert assessment.figures["symbol_exposure"] == pytest.approx(5000 / 9000)
    assert assessment.figures["total_exposure"] == pytest.approx(10000 / 9000)
    assert assessment.breaches == []
    book.on_positions("a", [_pos("BTC/USDT", "0.2", "50000", "50000"),
                            _pos("ETH/USDT", "-2", "2000", "2500")])
    texts = [b.text for b in book.assess(NOW).breaches]
    assert texts == ["max_symbol_exposure: BTC/USDT is 1.11 × equity (limit 1), account a",
                     "max_total_exposure: positions are 1.67 × equity (limit 1.5), account a"]
    book.on_metrics("a", _metrics(0, -10_000))
    assert _limits(book) == ["max_total_exposure"]  # no equity at all


def test_orders_per_minute_count_each_new_order_once_at_its_creation() -> None:
    book = RiskBook(RiskSettings(max_orders_per_minute=2))
    for n, age in enumerate((5, 10, 10, 90)):
        order = _order(f"c{n}", NOW - timedelta(seconds=age), status="open" if n else "new")
        book.on_order(order, NOW)
        book.on_order(order.model_copy(update={"status": "filled"}), NOW)  # the same order
    (breach,) = book.assess(NOW).breaches
    assert breach.text == "max_orders_per_minute: 3 new orders in the last minute (limit 2)"
    assert _limits(book) == ["max_orders_per_minute"]
    assert book.assess(NOW + timedelta(seconds=51)).breaches == []


def test_orders_refused_by_execution_are_not_counted() -> None:
    book = RiskBook(RiskSettings(max_orders_per_minute=2))
    for n in range(5):  # intents refused while halted: orders that never left
        book.on_order(_order(f"r{n}", NOW - timedelta(seconds=n), status="rejected"), NOW)
    assert book.assess(NOW).figures["orders_per_minute"] == 0 and _limits(book) == []
    sent = _order("live", NOW - timedelta(seconds=1))  # written `new`, then sent
    book.on_order(sent, NOW)
    book.on_order(sent.model_copy(update={"status": "rejected"}), NOW)  # by the exchange
    assert book.assess(NOW).figures["orders_per_minute"] == 1


def test_a_feed_is_stale_when_no_bar_closed_within_stale_after_bars() -> None:
    book = RiskBook(RiskSettings())
    # The market said all is well (and then said nothing more): the bar closed at 11:57.
    book.on_feed("t", FeedState(exchange="binance", symbol="BTC/USDT", timeframe="1m",
                                last_bar_ts=NOW - timedelta(minutes=4)))
    book.on_feed("h", FeedState(exchange="binance", symbol="BTC/USDT", timeframe="1h",
                                last_bar_ts=NOW - timedelta(minutes=4)))
    book.on_feed("new", FeedState(exchange="binance", symbol="ETH/USDT", timeframe="1m"))
    assert _limits(book) == []  # three timeframes exactly, not more
    later = NOW + timedelta(seconds=1)
    (breach,) = book.assess(later).breaches
    assert breach.text == ("halt_on_stale_market: the feed binance BTC/USDT 1m is stale (no bar "
                           "closed since 2026-03-02T11:57:00+00:00, more than 3 timeframes ago)")
    assert book.assess(later).figures["stale_feeds"] == 1
    book.limits = RiskSettings(stale_after_bars=4)
    assert book.assess(later).breaches == []
    book.limits = RiskSettings(halt_on_stale_market=False)
    assert book.assess(later).breaches == [] and book.assess(later).figures["stale_feeds"] == 1
    book.limits = RiskSettings()
    book.on_feed("t", FeedState(exchange="binance", symbol="BTC/USDT", timeframe="1m",
                                last_bar_ts=NOW - timedelta(minutes=1)))
    assert book.assess(later).breaches == []


def test_a_replayed_feed_is_not_judged_by_the_wall_clock_and_a_cleared_one_is_forgotten() -> None:
    book = RiskBook(RiskSettings())
    long_ago = NOW - timedelta(days=400)
    replay = FeedState(exchange="sim", symbol="BTC/USDT", timeframe="1m", last_bar_ts=long_ago,
                       live=False)
    book.on_feed("replay", replay)
    assert _limits(book) == [] and book.assess(NOW).figures["stale_feeds"] == 0
    book.on_feed("replay", replay.model_copy(update={"stale": True, "reason": "the market says"}))
    assert _limits(book) == ["halt_on_stale_market"]  # its market's word still counts
    # A state from before `live` existed is a live feed.
    old = FeedState.model_validate_json(b'{"exchange": "sim", "symbol": "ETH/USDT", '
                                        b'"timeframe": "1m", "last_bar_ts": "2025-01-30T00:00:00Z"}')
    assert old.live
    book.on_feed("old", old)
    assert book.assess(NOW).figures["stale_feeds"] == 2
    book.on_feed("old", None)  # cleared by the market: the feed is gone
    book.on_feed("replay", None)
    book.on_feed("never seen", None)
    assert book.feeds == {} and _limits(book) == []


def test_conditions_of_the_box_and_the_market() -> None:
    book = RiskBook(RiskSettings())
    book.on_health(_health(disk=50, clock=None))
    assert _limits(book) == []  # unknown is no breach
    book.on_health(_health(disk=96.5, clock=False))
    book.on_feed("t", FeedState(exchange="binance", symbol="BTC/USDT", timeframe="1m", stale=True,
                                reason="no bar for 180 s"))
    assert [b.text for b in book.assess(NOW).breaches] == [
        "halt_on_stale_market: the feed binance BTC/USDT 1m is stale (no bar for 180 s)",
        "max_disk_percent: the disk is 96.5 % full (limit 95 %)",
        "require_clock_sync: the clock is not synchronised (NTP)"]
    book.limits = RiskSettings(halt_on_stale_market=False, max_disk_percent=None,
                               require_clock_sync=False)
    assert _limits(book) == []


@pytest.mark.parametrize("raw", ["off", "null", "false", "none"])
def test_a_limit_is_switched_off(raw: str) -> None:
    assert RiskSettings.model_validate({"max_drawdown_pct": raw}).max_drawdown_pct is None
    assert RiskSettings.model_validate({"max_drawdown_pct": False}).limits()["max_drawdown_pct"] is None


def test_a_bad_limit_stops_the_service_with_78_naming_the_key(broker: TestBroker) -> None:
    done = circles(broker.env(CIRCLES_RISK__MAX_DAILY_LOSS_PCT="-1"), "run", "risk", timeout=60)
    assert done.returncode == 78
    assert "risk.max_daily_loss_pct" in done.stderr


# -- the service, as a process on the real broker ------------------------------------------
def _order(oid: str, created: datetime, account: str = "a", status: str = "new") -> Order:
    return Order(client_order_id=oid, intent_key=f"k-{oid}", account=account, exchange="paper",
                 symbol="BTC/USDT", side="buy", qty=Decimal("0.01"), status=status,  # type: ignore[arg-type]
                 created_at=created.isoformat())


def _health(disk: float = 40.0, clock: bool | None = True) -> HealthState:
    return HealthState(ts=utcnow(), hostname="test", cpu_percent=1, load=(0, 0, 0),
                       memory_percent=10, memory_used_mb=100, memory_total_mb=1000,
                       disk_percent=disk, disk_free_gb=10, uptime_s=1,
                       clock_synchronized=clock)


def _halts(messages: list[Message]) -> list[TradingHalt]:
    return [TradingHalt.model_validate_json(m.payload) for m in messages
            if m.topic == HALT and m.payload]


@dataclass
class Risk:
    """A running risk service, a tester client to drive it and a collector watching it."""

    broker: TestBroker
    tmp: Path
    env: dict[str, str]
    tester: MqttBus
    watch: Collector
    accounts: list[str]
    marker: str
    proc: ServiceProcess | None = None
    feeds: list[str] = field(default_factory=list)

    async def start(self) -> None:
        online = await Collector.start(self.broker, str(registry.SERVICE_STATUS.topic(service="risk")))
        try:
            self.proc = ServiceProcess("risk", self.env, self.tmp)
            await online.wait(lambda ms: any(m.payload == b"online" and not m.retain for m in ms),
                              20, "risk online")
        finally:
            await online.close()

    async def stop(self) -> None:
        assert self.proc is not None
        self.proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(self.proc.wait, 10) == 0, self.proc.log
        self.proc = None

    def halts(self) -> list[TradingHalt]:
        return _halts(self.watch.messages)

    async def halt_where(self, check: Callable[[TradingHalt], bool], what: str) -> TradingHalt:
        found = await self.watch.wait(lambda ms: [h for h in _halts(ms) if check(h)], 15, what)
        return found[-1]  # type: ignore[no-any-return]

    async def halted_by(self, limit: str) -> TradingHalt:
        return await self.halt_where(lambda h: h.halted and h.by == "risk" and limit in h.reason,
                                     f"a halt naming {limit}")

    async def ask(self, command: str, timeout: float = 15, **args: Any) -> CommandReply:
        return await self.tester.request("risk", command, args, timeout=timeout)

    async def state(self) -> dict[str, Any]:
        reply = await self.ask("state")
        assert reply.ok, reply.error
        return reply.result  # type: ignore[no-any-return]

    async def state_where(self, check: Callable[[dict[str, Any]], Any], what: str) -> dict[str, Any]:
        """The answer of `state` once `check` holds for it (asked again until it does)."""
        for _ in range(100):
            state = await self.state()
            if check(state):
                return state
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last state: {state}")

    async def settled(self) -> None:
        """Return once risk has handled what was sent to it before, and the watcher holds
        what risk published meanwhile: the `state` request is handled by the same loop as
        every message, after those that came before it (and `state` assesses, as the run
        loop's tick does); risk publishes before it answers, so a marker published after the
        answer reaches the watcher after all of it (the broker keeps a client's queue in order)."""
        await self.state()
        count = len(self.watch.on(self.marker))
        await self.tester.publish(self.marker, b"settled", wait=True)
        await self.watch.wait(lambda ms: len([m for m in ms if m.topic == self.marker]) > count,
                              10, "the marker")

    async def metrics(self, account: str, equity: float, net_pnl: float) -> None:
        await self.tester.send(registry.TRADE_METRICS, TradeMetrics(
            account=account, seq=1, ts=utcnow(), metrics=_metrics(equity, net_pnl)),
            account=account, wait=True)

    async def positions(self, account: str, *positions: Position) -> None:
        await self.tester.send(registry.POSITIONS, Positions(
            account=account, mode="paper", positions=list(positions)), account=account, wait=True)

    async def feed(self, stale: bool, last_bar_ts: datetime | None = None) -> None:
        feed = FeedState(exchange="testex", symbol=f"T{uuid.uuid4().hex[:4]}/USDT", timeframe="1m",
                         stale=stale, reason="no bar for 3 timeframes" if stale else "",
                         last_bar_ts=last_bar_ts)
        if not self.feeds:
            self.feeds.append(str(registry.MARKET_FEED.topic(
                exchange=feed.exchange, symbol=feed.symbol, timeframe=feed.timeframe)))
        topic = self.feeds[0]
        await self.tester.publish(topic, registry.MARKET_FEED.encode(feed), retain=True, wait=True)

    async def resume_when_allowed(self, by: str = "tester:ops", **args: Any) -> CommandReply:
        """Resume, retrying while the breach that was just cleared is still in flight."""
        for _ in range(100):
            reply = await self.ask("resume", by=by, **args)
            if reply.ok:
                return reply
            await asyncio.sleep(0.2)
        raise AssertionError(f"resume still refused: {reply.error}")


async def _clear_retained(tester: MqttBus, broker: TestBroker, *filters: str) -> None:
    seen = await Collector.start(broker, *filters)
    await asyncio.sleep(0.5)
    await seen.close()
    for topic in {m.topic for m in seen.messages if m.retain and m.payload}:
        await tester.publish(topic, b"", retain=True, wait=True)


async def _fresh(broker: TestBroker, tester: MqttBus) -> None:
    """No risk session, no halt and no health or feed state left by other tests."""
    wipe = broker.bus(client_id="circles-risk")  # a clean start ends the service's session
    await wipe.connect()
    await wipe.close()
    await _clear_retained(tester, broker, HALT, str(registry.HEALTH_STATE.topic()),
                          registry.MARKET_FEED.filter().value, RISK_STATE)
    state_file(broker.state).unlink(missing_ok=True)


@pytest.fixture
async def risk(broker: TestBroker, tmp_path: Path) -> AsyncIterator[Risk]:
    accounts = [f"risk-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    env = broker.env(CIRCLES_RISK__ACCOUNTS=",".join(accounts), CIRCLES_RISK__START_WAIT_S="1",
                     CIRCLES_RISK__MAX_ORDERS_PER_MINUTE="3", CIRCLES_RISK__FLATTEN_TIMEOUT_S="2",
                     CIRCLES_RISK__MAX_DAILY_LOSS_PCT="30")
    tester = broker.bus()
    await tester.connect()
    await _fresh(broker, tester)
    marker = unique_topic()
    watch = await Collector.start(broker, HALT, RISK_STATE, SWITCH_CONFIG,
                                  str(registry.DLQ.topic(service="risk")), marker)
    ctx = Risk(broker, tmp_path, env, tester, watch, accounts, marker)
    try:
        yield ctx
    finally:
        if ctx.proc is not None:
            ctx.proc.stop()
        # Leave no halt, feed or positions behind for the tests that come after.
        for account in accounts:
            for spec in (registry.TRADE_METRICS, registry.POSITIONS):
                await tester.publish(str(spec.topic(account=account)), b"", retain=True, wait=True)
        await _clear_retained(tester, broker, HALT, str(registry.HEALTH_STATE.topic()),
                              registry.MARKET_FEED.filter().value, RISK_STATE)
        state_file(broker.state).unlink(missing_ok=True)
        await watch.close()
        await tester.close()


def _audit(broker: TestBroker, since: datetime) -> list[AuditEvent]:
    log = AuditLog.open(CoreSettings(state_dir=broker.state))
    return list(log.events(action="trading.", since=since))


async def test_initial_state_once_then_a_halt_survives_restarts(risk: Risk) -> None:
    began = datetime.now(UTC) - timedelta(seconds=1)
    await risk.start()
    first = await risk.halt_where(lambda h: True, "the initial state")
    assert (first.halted, first.by, first.reason) == (False, "risk", "initial state")
    state = RiskState.model_validate_json((await risk.watch.wait(
        lambda ms: [m for m in ms if m.topic == RISK_STATE], 10, "risk state"))[-1].payload)
    assert state.limits["max_drawdown_pct"] == 20 and state.halted is False
    await risk.settled()
    assert len(risk.halts()) == 1  # published once

    reply = await risk.ask("halt", by="tester:anna", reason="broker maintenance")
    assert reply.ok and reply.result["changed"] is True
    assert (await risk.halt_where(lambda h: h.halted, "the halt")).reason == "broker maintenance"
    assert (await risk.ask("halt", by="tester:bob")).result["changed"] is False

    # Restored from the retained halt (the kept file is gone): never lifted on start.
    await risk.stop()
    state_file(risk.broker.state).unlink()
    risk.watch.messages.clear()
    await risk.start()
    restored = await risk.state_where(lambda s: s["halt"], "the halt restored")
    assert restored["halt"]["reason"] == "broker maintenance"
    await risk.settled()
    assert all(h.halted for h in risk.halts())  # restored, not published as lifted

    # Restored from the kept file when the broker lost its retained halt.
    await risk.stop()
    await risk.tester.publish(HALT, b"", retain=True, wait=True)
    risk.watch.messages.clear()
    await risk.start()
    again = await risk.halt_where(lambda h: True, "the halt published again")
    assert again.halted and again.reason == "broker maintenance" and again.by == "tester:anna"
    assert (await risk.state())["halt"]["halted"] is True

    actions = [(e.action, e.actor, e.details.get("reason")) for e in _audit(risk.broker, began)]
    assert actions == [(events.TRADING_RESUME, "risk", "initial state"),
                       (events.TRADING_HALT, "tester:anna", "broker maintenance")]


async def test_every_kind_of_breach_halts_and_only_a_person_resumes(risk: Risk) -> None:
    began = datetime.now(UTC) - timedelta(seconds=1)
    exposed, daily, drawn = risk.accounts
    await risk.start()
    await risk.halt_where(lambda h: not h.halted, "the initial state")
    for account in risk.accounts:
        await risk.metrics(account, 10_000, 0)
    await risk.tester.send(registry.HEALTH_STATE, _health(), wait=True)

    async def breach_then_clear(limit: str, breach: Any, clear: Any) -> None:
        await breach()
        halt = await risk.halted_by(limit)
        refused = await risk.ask("resume", by="tester:ops")
        assert not refused.ok and limit in (refused.error or ""), refused
        await risk.settled()
        assert risk.halts()[-1].halted  # risk never resumes by itself
        await clear()
        assert (await risk.resume_when_allowed()).result["changed"] is True
        await risk.halt_where(lambda h: not h.halted and h.ts > halt.ts, f"resumed after {limit}")

    btc = "BTC/USDT"
    await breach_then_clear(
        "max_symbol_exposure",
        lambda: risk.positions(exposed, _pos(btc, "0.3", "50000", "50000")),
        lambda: risk.positions(exposed, _pos(btc, "0.1", "50000", "50000")))
    old = datetime.now(UTC) - timedelta(seconds=50)  # they leave the sliding minute in 10 s

    async def burst() -> None:
        for _ in range(4):
            await risk.tester.send(registry.ORDER_UPDATE, _order(f"c{uuid.uuid4().hex[:10]}", old,
                                                                 exposed), account=exposed)

    await breach_then_clear("max_orders_per_minute", burst, lambda: asyncio.sleep(0))
    await breach_then_clear("halt_on_stale_market", lambda: risk.feed(True), lambda: risk.feed(False))
    await breach_then_clear(
        "max_disk_percent",
        lambda: risk.tester.send(registry.HEALTH_STATE, _health(disk=97.5)),
        lambda: risk.tester.send(registry.HEALTH_STATE, _health()))
    await breach_then_clear(
        "require_clock_sync",
        lambda: risk.tester.send(registry.HEALTH_STATE, _health(clock=False)),
        lambda: risk.tester.send(registry.HEALTH_STATE, _health()))

    # Losses stay until a person accepts them (force), or the next UTC day.
    await risk.metrics(daily, 6_000, -4_000)
    halt = await risk.halted_by("max_daily_loss_pct: lost 40.0 % today (limit 30 %)")
    refused = await risk.ask("resume", by="tester:ops")
    assert not refused.ok and "force" in (refused.error or "")
    assert (await risk.ask("resume", by="tester:ops", force=True)).ok
    await risk.halt_where(lambda h: not h.halted and h.ts > halt.ts, "resumed with force")

    await risk.metrics(drawn, 12_000, 2_000)
    await risk.state()  # handled: a new peak, and no daily loss (a gain today)
    await risk.metrics(drawn, 9_500, -500)
    halt = await risk.halted_by("max_drawdown_pct: equity 9500.00 is 20.8 % below its peak 12000.00")
    assert "max_daily_loss_pct" not in halt.reason  # 25 % < 30 %
    state = await risk.state()
    assert state["risk"]["figures"]["drawdown_pct"] == pytest.approx(2500 / 12000 * 100)
    assert (await risk.ask("resume", by="tester:ops", force=True)).ok

    trail = _audit(risk.broker, began)
    halts = [e for e in trail if e.action == events.TRADING_HALT]
    assert [e.actor for e in halts] == ["risk"] * 7
    for limit, event in zip(["max_symbol_exposure", "max_orders_per_minute", "halt_on_stale_market",
                             "max_disk_percent", "require_clock_sync", "max_daily_loss_pct",
                             "max_drawdown_pct"], halts, strict=True):
        assert event.details["reason"].startswith(limit), event
    resumes = [e for e in trail if e.action == events.TRADING_RESUME]
    assert [e.actor for e in resumes] == ["risk"] + ["tester:ops"] * 7
    assert [e.details["forced"] for e in resumes[1:]] == [False] * 5 + [True] * 2
    assert "max_daily_loss_pct" in resumes[-2].details["reason"]


async def test_a_market_that_died_is_stale_to_risk_without_another_message(risk: Risk) -> None:
    await risk.start()
    await risk.halt_where(lambda h: not h.halted, "the initial state")
    # The market's last word: all well, a 1m bar that closes three timeframes before now + 5 s.
    closes = datetime.now(UTC) - timedelta(minutes=3) + timedelta(seconds=5)
    await risk.feed(False, last_bar_ts=closes - timedelta(minutes=1))
    state = await risk.state()  # handled after the feed state
    assert state["risk"]["figures"]["stale_feeds"] == 0 and not state["halt"]["halted"]
    halt = await risk.halted_by("halt_on_stale_market")  # by the run loop's own assessment
    assert f"no bar closed since {closes.isoformat()}" in halt.reason, halt
    refused = await risk.ask("resume", by="tester:ops")
    assert not refused.ok and "halt_on_stale_market" in (refused.error or "")
    await risk.feed(False, last_bar_ts=datetime.now(UTC) - timedelta(minutes=1))  # back
    await risk.resume_when_allowed()


async def test_a_replay_is_not_stale_and_a_feed_no_longer_served_is_forgotten(risk: Risk) -> None:
    """No `halt_on_stale_market = false` for a replay; and the state of a feed the market no
    longer serves, left on the broker by an earlier run, is cleared when the market starts,
    and risk forgets it (an empty retained payload is no dead letter)."""
    exchange = f"ex{uuid.uuid4().hex[:6]}"
    long_ago = datetime.now(UTC) - timedelta(days=30)

    async def feed(symbol: str, **values: Any) -> str:
        await risk.tester.send(registry.MARKET_FEED, FeedState(
            exchange=exchange, symbol=symbol, timeframe="1m", last_bar_ts=long_ago, **values),
            exchange=exchange, symbol=symbol, timeframe="1m", wait=True)
        return str(registry.MARKET_FEED.topic(exchange=exchange, symbol=symbol, timeframe="1m"))

    await risk.start()
    await risk.halt_where(lambda h: not h.halted, "the initial state")
    await feed("REPLAY/USDT", live=False, reason="replay finished")
    state = await risk.state()
    assert state["risk"]["figures"]["stale_feeds"] == 0 and not state["halt"]["halted"]

    left_over = await feed("OLD/USDT")  # an earlier market's symbol, a month old
    await risk.halted_by("halt_on_stale_market: the feed " + exchange + " OLD/USDT 1m is stale")
    market = ServiceProcess("market", risk.broker.env(
        CIRCLES_MARKET__EXCHANGE=exchange, CIRCLES_MARKET__SYMBOLS='["NEW/USDT"]',
        CIRCLES_MARKET__HISTORY_BARS="10"), risk.tmp)
    try:
        await risk.resume_when_allowed()  # refused until risk forgot the feed
        state = await risk.state()
        assert state["risk"]["figures"]["stale_feeds"] == 0 and not state["halt"]["halted"]
        kept = await Collector.start(risk.broker, registry.MARKET_FEED.filter(exchange=exchange).value)
        try:
            await kept.wait(lambda ms: any("new-usdt" in m.topic for m in ms), 10, "the served feed")
            await asyncio.sleep(0.3)
            assert left_over not in {m.topic for m in kept.messages}  # gone from the broker
            # The replay's state is left over too (this market replays nothing).
            assert all("replay-usdt" not in m.topic for m in kept.messages)
        finally:
            await kept.close()
        await risk.settled()
        assert risk.watch.on(str(registry.DLQ.topic(service="risk"))) == []
    finally:
        market.stop()


async def test_commands_need_who_asks(risk: Risk) -> None:
    await risk.start()
    for command in ("halt", "resume", "flatten"):
        reply = await risk.ask(command)
        assert not reply.ok and '"by"' in (reply.error or ""), reply


async def test_home_assistant_switch(risk: Risk) -> None:
    began = datetime.now(UTC) - timedelta(seconds=1)
    await risk.start()
    await risk.halt_where(lambda h: not h.halted, "the initial state")
    configs = await risk.watch.wait(lambda ms: [m for m in ms if m.topic == SWITCH_CONFIG], 10,
                                    "the discovery config")
    config = json.loads(configs[-1].payload)
    assert config["command_topic"] == SWITCH_CMD and config["state_topic"] == HALT
    assert config["availability"][0]["topic"] == str(registry.SERVICE_STATUS.topic(service="risk"))
    assert config["unique_id"] == "circles.trading_halt" and config["device"]["identifiers"]
    assert "value_json.halted" in config["value_template"]

    # It is retained: a Home Assistant that connects later finds it.
    late = await Collector.start(risk.broker, SWITCH_CONFIG)
    try:
        await late.wait(lambda ms: [m for m in ms if m.retain], 5, "the retained config")
    finally:
        await late.close()
    count = len(risk.watch.on(SWITCH_CONFIG))
    await risk.tester.publish(str(registry.HA_STATUS.topic()), b"online", wait=True)
    await risk.watch.wait(lambda ms: len([m for m in ms if m.topic == SWITCH_CONFIG]) > count, 10,
                          "the config announced again")

    await risk.tester.publish(SWITCH_CMD, b"ON", wait=True)
    on = await risk.halt_where(lambda h: h.halted, "halted by the switch")
    assert on.by == "homeassistant"
    await risk.tester.publish(SWITCH_CMD, b"OFF", wait=True)
    await risk.halt_where(lambda h: not h.halted and h.ts > on.ts, "resumed by the switch")

    # OFF while a limit is breached: refused, and the switch is told it is still ON.
    await risk.tester.send(registry.HEALTH_STATE, _health(disk=99), wait=True)
    breach = await risk.halted_by("max_disk_percent")
    count = len(risk.halts())
    await risk.tester.publish(SWITCH_CMD, b"OFF", wait=True)
    await risk.watch.wait(lambda ms: len(_halts(ms)) > count, 10, "the halt told again")
    assert risk.halts()[-1] == breach
    await risk.tester.publish(SWITCH_CMD, b"maybe", wait=True)
    dlq = str(registry.DLQ.topic(service="risk"))
    await risk.watch.wait(lambda ms: [m for m in ms if m.topic == dlq and b"ON or OFF" in m.payload],
                          10, "a dead letter for a bad switch command")

    trail = [(e.action, e.actor) for e in _audit(risk.broker, began)]
    assert trail == [(events.TRADING_RESUME, "risk"), (events.TRADING_HALT, "homeassistant"),
                     (events.TRADING_RESUME, "homeassistant"), (events.TRADING_HALT, "risk")]


async def _execution(broker: TestBroker, answer: CommandReply | None,
                     asked: list[dict[str, Any]]) -> tuple[MqttBus, asyncio.Task[None]]:
    """A stand-in for the execution service's flatten command: the tester may subscribe to it."""
    fake = broker.bus()
    await fake.connect()
    await fake.subscribe([(Filter(str(registry.SERVICE_CMD.topic(service="execution",
                                                                 command="flatten"))), 1)])

    async def serve() -> None:
        while True:
            for message in await fake.receive(10, timeout=1):
                fake.ack(message)
                asked.append(json.loads(message.payload))
                if answer is not None:
                    await fake.reply(message, answer)

    return fake, asyncio.create_task(serve())


async def test_flatten_halts_then_relays_the_execution_services_answer(risk: Risk) -> None:
    began = datetime.now(UTC) - timedelta(seconds=1)
    await risk.start()
    await risk.halt_where(lambda h: not h.halted, "the initial state")
    asked: list[dict[str, Any]] = []
    fake, task = await _execution(risk.broker, CommandReply(ok=True, result={"closed": 2}), asked)
    try:
        reply = await risk.ask("flatten", by="tester:anna")
    finally:
        task.cancel()
        await fake.close()
    assert reply.ok, reply.error
    assert reply.result["execution"] == {"closed": 2} and asked == [{"by": "tester:anna"}]
    halt = risk.halts()[-1]
    assert halt.halted and halt.reason == "halt and flatten requested by tester:anna"

    # Nobody answers: the halt stays and the reply says so.
    reply = await risk.ask("flatten", by="tester:bob")
    assert not reply.ok and "flatten not confirmed" in (reply.error or "")
    assert risk.halts()[-1].halted and (await risk.state())["halt"]["halted"]

    # Execution refuses: its reason comes back.
    fake, task = await _execution(risk.broker, CommandReply(ok=False, error="exchange down"), asked)
    try:
        reply = await risk.ask("flatten", by="tester:carl")
    finally:
        task.cancel()
        await fake.close()
    assert not reply.ok and "exchange down" in (reply.error or "")

    trail = [(e.action, e.actor, e.outcome) for e in _audit(risk.broker, began)]
    assert trail == [(events.TRADING_RESUME, "risk", "ok"), (events.TRADING_HALT, "tester:anna", "ok"),
                     (events.TRADING_FLATTEN, "tester:anna", "ok"),
                     (events.TRADING_FLATTEN, "tester:bob", "unconfirmed"),
                     (events.TRADING_FLATTEN, "tester:carl", "refused")]


async def test_the_command_line(risk: Risk) -> None:
    env = risk.broker.env()

    async def cli(*args: str, stdin: str | None = None) -> Any:
        return await asyncio.to_thread(circles, env, "trading", *args, stdin=stdin, timeout=60)

    began = datetime.now(UTC) - timedelta(seconds=1)
    await risk.start()
    await risk.halt_where(lambda h: not h.halted, "the initial state")
    done = await cli("halt", "--reason", "end of the quarter")
    assert done.returncode == 0, done.stderr
    assert "trading halted: end of the quarter" in done.stdout
    halt = risk.halts()[-1]
    assert halt.halted and halt.by.startswith("cli:")
    status = await cli("status")
    assert status.returncode == 0 and "HALTED" in status.stdout and "end of the quarter" in status.stdout
    assert "max_drawdown_pct" in status.stdout and "breaches: none" in status.stdout
    as_json = json.loads((await cli("status", "--json")).stdout)
    assert as_json["halt"]["reason"] == "end of the quarter"

    await risk.tester.send(registry.HEALTH_STATE, _health(disk=99), wait=True)
    await risk.watch.wait(lambda ms: [m for m in ms if m.topic == RISK_STATE and b"max_disk" in m.payload],
                          10, "the breach in the risk state")
    refused = await cli("resume")
    assert refused.returncode == 1
    assert "max_disk_percent: the disk is 99.0 % full" in refused.stderr
    await risk.tester.send(registry.HEALTH_STATE, _health(), wait=True)
    await risk.state_where(lambda s: not s["risk"]["breaches"], "the breach cleared")
    done = await cli("resume")
    assert done.returncode == 0 and "trading resumed" in done.stdout, done.stderr
    await risk.halt_where(lambda h: not h.halted and h.by.startswith("cli:"), "resumed")

    no = await cli("flatten", stdin="n\n")
    assert no.returncode == 1 and "nothing done" in no.stderr
    assert not (await risk.state())["halt"]["halted"]
    asked: list[dict[str, Any]] = []
    fake, task = await _execution(risk.broker, CommandReply(ok=True, result={"closed": 0}), asked)
    try:
        done = await cli("flatten", "--yes")
    finally:
        task.cancel()
        await fake.close()
    assert done.returncode == 0 and "confirmed the flatten" in done.stdout, done.stderr
    assert asked and asked[0]["by"].startswith("cli:")

    tail = circles(env, "audit", "tail", "--action", "trading.").stdout
    mine = [line for line in tail.splitlines() if "cli:" in line]
    assert [line.split()[2] for line in mine] == ["trading.halt", "trading.resume", "trading.halt",
                                                  "trading.flatten"]
    assert len([e for e in _audit(risk.broker, began) if e.actor.startswith("cli:")]) == 4

    await risk.stop()
    silent = await cli("status")
    assert silent.returncode == 1 and "did not answer" in silent.stderr
