"""The execution service in paper mode, as systemd runs it: a real broker, a real SQLite file,
bars, intents and the halt published by the tester, the trade logger confirming fills."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from appliance import db
from appliance.bus import registry
from appliance.bus.message import Message
from appliance.bus.mqtt import MqttBus
from appliance.bus.payloads import TradingHalt
from appliance.bus.topics import slug
from appliance.bus.trade_event import TradeEvent, chain_for
from appliance.bus.trading import Bar, Order, OrderIntent, Positions
from appliance.ledger import Ledger, Signer
from modules.trading.execution.orders import client_order_id
from modules.trading.execution.store import intents, orders, outbox, positions
from tests.fake_exchange import fake_exchange_fixture  # noqa: F401
from tests.helpers import Collector, ServiceProcess, TestBroker, account_rows

NAME = "execution"
EXCHANGE = "sim"


def hour_ago() -> datetime:
    """Where a test's bars start: whole minutes, an hour ago (fills are never in the future)."""
    return datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)


def make_bar(symbol: str, ts: datetime, open_: float, close: float | None = None,
             volume: float = 1000.0) -> Bar:
    close = open_ if close is None else close
    return Bar(exchange=EXCHANGE, symbol=symbol, timeframe="1m", ts=ts, open=open_,
               high=max(open_, close) * 1.01, low=min(open_, close) * 0.99, close=close,
               volume=volume)


def make_intent(account: str, symbol: str, key: str, target: str, bar_ts: datetime) -> OrderIntent:
    return OrderIntent(key=key, account=account, strategy_id="ens", exchange=EXCHANGE,
                       symbol=symbol, target_qty=Decimal(target), price=Decimal(100),
                       bar_ts=bar_ts)


@dataclass
class Desk:
    """One test's account and symbol, the tester's bus, and the execution process. `name` is
    the account as configured, `account` its slug (topics, rows, client order ids)."""

    broker: TestBroker
    tmp_path: Path
    name: str = field(default_factory=lambda: f"acct{uuid.uuid4().hex[:8]}")
    symbol: str = field(default_factory=lambda: f"T{uuid.uuid4().hex[:6].upper()}/USDT")
    t0: datetime = field(default_factory=hour_ago)
    proc: ServiceProcess | None = None
    logger: ServiceProcess | None = None
    env: dict[str, str] = field(default_factory=dict)
    tester: MqttBus | None = None
    watch: Collector | None = None

    @property
    def account(self) -> str:
        return slug(self.name)

    def at(self, n: int) -> datetime:
        """The open time of bar n."""
        return self.t0 + timedelta(minutes=n)

    @property
    def url(self) -> str:
        return f"sqlite:///{self.tmp_path / 'box.db'}"

    async def connect(self) -> None:
        self.tester = self.broker.bus()
        await self.tester.connect()
        self.watch = await Collector.start(self.broker, *(str(spec.topic(account=self.account)) for spec in (
            registry.ORDER_UPDATE, registry.TRADE_EVENT, registry.POSITIONS, registry.OPEN_ORDERS)))

    async def start(self, *, halted: bool | None = False, **env: str) -> None:
        """Start the service after publishing the retained halt (None: with no retained halt)."""
        if halted is None:
            await self.no_halt()
        else:
            await self.halt(halted)
        status = await Collector.start(self.broker, str(registry.SERVICE_STATUS.topic(service=NAME)))
        try:
            status.messages.clear()
            self.env = {"CIRCLES_DATABASE__URL": self.url, "CIRCLES_EXECUTION__ACCOUNT": self.name,
                        "CIRCLES_EXECUTION__RESEND_AFTER_S": "1", **env}
            self.proc = ServiceProcess(NAME, self.broker.env(**self.env), self.tmp_path)
            await status.wait(lambda ms: any(m.payload == b"online" for m in ms), 20, "online")
        finally:
            await status.close()

    async def start_logger(self) -> None:
        status = await Collector.start(self.broker,
                                       str(registry.SERVICE_STATUS.topic(service="trade-logger")))
        try:
            status.messages.clear()
            self.logger = ServiceProcess("trade-logger", self.broker.env(
                CIRCLES_DATABASE__URL=self.url), self.tmp_path)
            await status.wait(lambda ms: any(m.payload == b"online" for m in ms), 20, "online")
        finally:
            await status.close()

    def kill(self) -> None:
        assert self.proc
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(10)

    async def restart(self) -> None:
        assert self.proc
        self.proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(self.proc.wait, 10) == 0
        await self.start()

    async def close(self) -> None:
        for proc in (self.proc, self.logger):
            if proc is not None:
                proc.stop()
        if self.watch:
            await self.watch.close()
        if self.tester:
            await self.tester.close()

    # -- what the tester publishes -------------------------------------------------------------
    async def halt(self, halted: bool, reason: str = "test") -> None:
        assert self.tester
        await self.tester.send(registry.TRADING_HALT,
                               TradingHalt(halted=halted, by="tester", reason=reason), wait=True)

    async def no_halt(self) -> None:
        """No retained halt at all (as on a box whose risk service never ran)."""
        assert self.tester
        await self.tester.publish(str(registry.TRADING_HALT.topic()), b"", retain=True, wait=True)

    def bar(self, n: int, open_: float, close: float | None = None, volume: float = 1000.0) -> Bar:
        return make_bar(self.symbol, self.at(n), open_, close, volume)

    async def send_bar(self, n: int, open_: float, close: float | None = None,
                       volume: float = 1000.0) -> Bar:
        assert self.tester
        bar = self.bar(n, open_, close, volume)
        await self.tester.send(registry.MARKET_BAR, bar, exchange=EXCHANGE, symbol=self.symbol,
                               timeframe="1m", wait=True)
        return bar

    def intent(self, n: int, target: str, key: str | None = None) -> OrderIntent:
        return make_intent(self.name, self.symbol, key or f"{self.account}-{n}", target,
                           self.at(n))

    async def send_intent(self, n: int, target: str, key: str | None = None) -> OrderIntent:
        assert self.tester
        intent = self.intent(n, target, key)
        await self.tester.send(registry.ORDER_INTENT, intent, account=self.account, wait=True)
        return intent

    # -- what the service published ------------------------------------------------------------
    def on(self, spec: Any) -> list[Message]:
        assert self.watch
        return self.watch.on(str(spec.topic(account=self.account)))

    def updates(self) -> list[Order]:
        return [Order.model_validate_json(m.payload) for m in self.on(registry.ORDER_UPDATE)]

    def events(self) -> list[TradeEvent]:
        return [TradeEvent.model_validate_json(m.payload) for m in self.on(registry.TRADE_EVENT)]

    def fills(self) -> dict[str, TradeEvent]:
        return {e.event_id: e for e in self.events() if e.kind == "fill"}

    async def wait(self, predicate: Any, what: str, timeout: float = 15.0) -> Any:
        assert self.watch
        return await self.watch.wait(lambda ms: predicate(), timeout, what)

    def last_status(self, coid: str) -> str | None:
        found = [u.status for u in self.updates() if u.client_order_id == coid]
        return found[-1] if found else None

    def coid(self, n: int, key: str | None = None) -> str:
        return client_order_id(self.account, key or f"{self.account}-{n}")

    def rows(self, table: Any) -> list[Any]:
        return account_rows(self.url, table, self.account)

    async def request(self, command: str, **args: Any) -> Any:
        assert self.tester
        reply = await self.tester.request(NAME, command, args, timeout=10)
        assert reply.ok, reply.error
        return reply.result


@asynccontextmanager
async def opened(made: Desk) -> AsyncIterator[Desk]:
    await made.connect()
    try:
        yield made
    finally:
        await made.close()
    if made.proc is not None and "Traceback" in made.proc.log:
        pytest.fail(f"the service logged a traceback:\n{made.proc.log[-3000:]}")


@pytest.fixture
async def desk(broker: TestBroker, tmp_path: Path) -> AsyncIterator[Desk]:
    async with opened(Desk(broker, tmp_path)) as made:
        yield made


BPS = Decimal("0.0001")


async def test_paper_fills_at_next_open_partially_and_the_ledger_confirms(desk: Desk) -> None:
    await desk.start_logger()
    await desk.start()
    await desk.send_bar(0, 99, 100)
    await desk.send_intent(0, "2")
    # Nothing fills on the intent's own bar: the next bar's open (with slippage) does. (A
    # fill would be published before the order's update of the same step.)
    await desk.wait(lambda: desk.last_status(desk.coid(0)) == "open", "the order made")
    assert not desk.fills()
    await desk.send_bar(1, 100, 101, volume=100)
    await desk.wait(lambda: desk.last_status(desk.coid(0)) == "filled", "first order filled")
    (fill,) = desk.fills().values()
    assert fill.side == "buy" and fill.qty == 2 and fill.ts == desk.at(1)
    assert fill.price == Decimal(100) * (1 + 5 * BPS)
    assert fill.fee == fill.qty * fill.price * 10 * BPS and fill.fee_currency == "USDT"
    assert fill.source == "paper" and fill.strategy_id == "ens" and fill.symbol == desk.symbol
    assert fill.order_id == desk.coid(0) and fill.event_id == f"{desk.coid(0)}-f1"

    # 30 more, with bars of volume 100 filling at most 10 each: three partial fills.
    await desk.send_intent(1, "32")
    for n in (2, 3, 4):
        await desk.send_bar(n, 100 + n, volume=100)
    await desk.wait(lambda: desk.last_status(desk.coid(1)) == "filled", "second order filled")
    second = [u for u in desk.updates() if u.client_order_id == desk.coid(1)]
    assert [u.status for u in second] == ["open", "partial", "partial", "filled"]
    assert [u.filled for u in second] == [0, 10, 20, 30]
    parts = [e for e in desk.fills().values() if e.order_id == desk.coid(1)]
    assert [(e.qty, e.price, e.ts) for e in parts] == [
        (10, Decimal(100 + n) * (1 + 5 * BPS), desk.at(n)) for n in (2, 3, 4)]
    assert second[-1].avg_price == sum(e.price for e in parts) / 3

    positions = await desk.request("positions")
    (position,) = positions["positions"]
    assert Decimal(position["qty"]) == 32 and Decimal(position["last_price"]) == 104
    retained = Positions.model_validate_json(desk.on(registry.POSITIONS)[-1].payload)
    assert retained.positions[0].qty == 32

    # The deposit and the four fills reach the ledger and are marked delivered.
    ledger = Ledger(db.make_engine(desk.url), Signer.load_or_create(desk.broker.state))

    def all_delivered() -> bool:
        rows = desk.rows(outbox)
        return len(rows) == 5 and all(r.delivered for r in rows)

    await desk.wait(all_delivered, "five confirmed events")
    records = [r["data"] for r in ledger.records(chain_for(desk.account))]
    assert sorted(r["event_id"] for r in records) == sorted(["paper-start", *desk.fills()])
    deposit = next(r for r in records if r["kind"] == "deposit")
    assert Decimal(deposit["qty"]) == 10000 and deposit["symbol"] == "USDT"
    assert all(r.outcome.startswith("accepted") for r in desk.rows(outbox))


async def test_intent_after_its_next_bar_fills_the_same(desk: Desk) -> None:
    """A fast replay: the next bar is seen before the intent; the fill is the same."""
    await desk.start()
    await desk.send_bar(0, 99, 100)
    await desk.send_bar(1, 100, 101)
    await desk.send_intent(0, "-3")
    await desk.wait(lambda: desk.last_status(desk.coid(0)) == "filled", "filled")
    (fill,) = desk.fills().values()
    assert (fill.side, fill.qty, fill.ts) == ("sell", 3, desk.at(1))
    assert fill.price == Decimal(100) * (1 - 5 * BPS)


async def test_fill_at_close_fills_at_once_at_the_intent_bar_close(desk: Desk) -> None:
    await desk.start(CIRCLES_EXECUTION__FILL_AT="close", CIRCLES_EXECUTION__SLIPPAGE_BPS="0",
                     CIRCLES_EXECUTION__FEE_BPS="0")
    await desk.send_bar(0, 99, 100.5)
    await desk.send_intent(0, "1.5")
    await desk.wait(lambda: desk.last_status(desk.coid(0)) == "filled", "filled")
    (fill,) = desk.fills().values()
    assert (fill.qty, fill.price, fill.fee, fill.ts) == (Decimal("1.5"), Decimal("100.5"), 0, desk.at(0))


async def test_the_same_intent_twice_orders_once(desk: Desk) -> None:
    await desk.start()
    await desk.send_bar(0, 100)
    await desk.send_intent(0, "5")
    await desk.send_intent(0, "5")  # redelivered
    await desk.send_intent(0, "5", key=f"{desk.account}-again")  # re-sent under a new key
    await desk.send_bar(1, 100)
    await desk.wait(lambda: desk.last_status(desk.coid(0)) == "filled", "filled")
    await desk.wait(lambda: len(desk.rows(intents)) == 2, "both keys decided")
    assert {r.key: r.status for r in desk.rows(intents)} == {
        f"{desk.account}-0": "ordered", f"{desk.account}-again": "noop"}
    assert [r.client_order_id for r in desk.rows(orders)] == [desk.coid(0)]
    assert len(desk.fills()) == 1
    answer = await desk.request("orders")
    assert answer["open"] == [] and [o["status"] for o in answer["recent"]] == ["filled"]


async def test_stale_intent_is_refused(desk: Desk) -> None:
    await desk.start()
    for n in range(5):
        await desk.send_bar(n, 100)
    await desk.send_intent(1, "1")  # three bars behind the newest: more than 2
    await desk.wait(lambda: desk.last_status(desk.coid(1)) == "rejected", "refused")
    assert "stale" in desk.updates()[-1].reason
    await desk.send_intent(3, "1")
    await desk.wait(lambda: desk.last_status(desk.coid(3)) == "filled", "a recent one fills")


async def test_halt_unknown_then_halted_then_resumed(desk: Desk) -> None:
    await desk.start(halted=None, CIRCLES_EXECUTION__HALT_WAIT_S="1")
    await desk.send_bar(0, 100)
    # Unknown: treated as halted once the short wait after start is over.
    await desk.send_intent(0, "1")
    await desk.wait(lambda: desk.last_status(desk.coid(0)) == "rejected", "refused: unknown")
    assert "halt state unknown" in desk.updates()[-1].reason
    await desk.halt(True, "drawdown")
    await desk.send_intent(1, "1")
    await desk.wait(lambda: desk.last_status(desk.coid(1)) == "rejected", "refused: halted")
    assert desk.updates()[-1].reason == "trading halted: drawdown"
    # A redelivered refused intent is not retried once trading resumes.
    await desk.halt(False)
    await desk.send_intent(1, "1")
    await desk.send_intent(2, "1")
    await desk.send_bar(3, 100, volume=5)  # fills 0.5 of 1: the rest stays open
    await desk.wait(lambda: desk.last_status(desk.coid(2)) == "partial", "accepted, partly filled")
    await desk.halt(True, "manual")
    await desk.wait(lambda: desk.last_status(desk.coid(2)) == "cancelled", "open order cancelled")
    assert desk.updates()[-1].reason == "trading halted: manual"
    assert {r.client_order_id: r.status for r in desk.rows(orders)} == {
        desk.coid(0): "rejected", desk.coid(1): "rejected", desk.coid(2): "cancelled"}
    assert json.loads(desk.on(registry.OPEN_ORDERS)[-1].payload)["orders"] == []


async def test_intents_wait_for_the_halt_state_after_a_start(desk: Desk) -> None:
    """Queued intents reach a restarted service before the retained halt does: they wait
    for it instead of being refused."""
    await desk.start(halted=None, CIRCLES_EXECUTION__HALT_WAIT_S="30")
    await desk.send_bar(0, 100)
    await desk.send_intent(0, "1")
    await desk.wait(lambda: [r.status for r in desk.rows(intents)] == ["waiting"], "it waits")
    assert desk.updates() == []
    await desk.halt(False)
    await desk.wait(lambda: desk.last_status(desk.coid(0)) == "open", "ordered once known")
    await desk.send_bar(1, 100)
    await desk.wait(lambda: desk.last_status(desk.coid(0)) == "filled", "filled")


async def test_flatten_closes_positions_even_while_halted(desk: Desk) -> None:
    await desk.start()
    await desk.send_bar(0, 100)
    await desk.send_intent(0, "4")
    await desk.send_bar(1, 100)
    await desk.wait(lambda: desk.last_status(desk.coid(0)) == "filled", "long 4")
    await desk.halt(True, "going flat")
    answer = await desk.request("flatten", by="alice")
    (order,) = answer["orders"]
    assert (order["side"], Decimal(order["qty"]), order["status"]) == ("sell", 4, "open")
    # Asked again (a retry, Home Assistant and the command line both): the same order, not
    # a second one that would leave the account short once both filled.
    again = await desk.request("flatten", by="bob")
    assert [o["client_order_id"] for o in again["orders"]] == [order["client_order_id"]]
    await desk.send_bar(2, 90)
    await desk.wait(lambda: desk.last_status(order["client_order_id"]) == "filled", "flat")
    closing = next(e for e in desk.fills().values() if e.order_id == order["client_order_id"])
    assert closing.price == Decimal(90) * (1 - 5 * BPS) and closing.strategy_id == "ens"
    assert (await desk.request("positions"))["positions"] == []
    assert Decimal(desk.rows(positions)[0].qty) == 0
    assert sorted(r.intent_key.startswith("flatten") for r in desk.rows(orders)) == [False, True]


async def test_a_deleted_halt_makes_the_state_unknown_and_stops_new_orders(desk: Desk) -> None:
    await desk.start(CIRCLES_EXECUTION__HALT_WAIT_S="0")
    await desk.send_bar(0, 100)
    await desk.send_intent(0, "1")
    await desk.wait(lambda: desk.last_status(desk.coid(0)) == "open", "ordered")
    await desk.no_halt()  # MQTT's deletion of the retained halt: an empty payload
    await desk.send_intent(1, "2")
    await desk.wait(lambda: desk.last_status(desk.coid(1)) == "rejected", "refused")
    assert "halt state unknown" in desk.updates()[-1].reason
    await desk.send_bar(1, 100)
    answer = await desk.request("orders")  # handled after the bar: nothing filled on it
    assert [(o["client_order_id"], Decimal(o["filled"])) for o in answer["open"]] == [(desk.coid(0), 0)]
    assert (await desk.request("positions"))["halted"] is None
    await desk.halt(False)  # known again: the open order catches up on the bar it missed
    await desk.wait(lambda: desk.last_status(desk.coid(0)) == "filled", "filled")


async def test_an_account_named_with_capitals_finds_its_orders_after_a_restart(
        broker: TestBroker, tmp_path: Path) -> None:
    """Rows are keyed by the account's slug: `Main…` writes and finds `main…`, so an open order
    is still counted after a restart and the same target orders nothing more."""
    async with opened(Desk(broker, tmp_path, name=f"Main{uuid.uuid4().hex[:8]}")) as desk:
        await desk.start()
        await desk.send_bar(0, 100)
        await desk.send_intent(0, "2")  # next_open: the order waits for the next bar
        await desk.wait(lambda: desk.last_status(desk.coid(0)) == "open", "ordered")
        await desk.restart()
        answer = await desk.request("orders")
        assert [(o["client_order_id"], o["account"]) for o in answer["open"]] == [
            (desk.coid(0), desk.name)]
        assert [o["client_order_id"] for o in answer["recent"]] == [desk.coid(0)]
        await desk.send_intent(1, "2")  # the same target: held + on order already
        await desk.wait(lambda: len(desk.rows(intents)) == 2, "decided")
        assert [r.status for r in sorted(desk.rows(intents), key=lambda r: r.id)] == ["ordered", "noop"]
        await desk.send_bar(1, 100)
        await desk.wait(lambda: desk.last_status(desk.coid(0)) == "filled", "filled")
        assert [r.client_order_id for r in desk.rows(orders)] == [desk.coid(0)]
        assert Decimal(desk.rows(positions)[0].qty) == 2


async def test_kill_9_loses_no_fill_and_orders_nothing_twice(desk: Desk) -> None:
    await desk.start_logger()
    await desk.start()
    targets = ["3", "-2", "0", "5", "1", "4", "-4", "2", "0", "6"] * 3

    async def stream(ns: range) -> None:
        for n in ns:
            await desk.send_bar(n, 100 + n % 7, volume=20)  # 2 per bar: partial fills
            await desk.send_intent(n, targets[n])

    await stream(range(0, 12))
    await desk.wait(lambda: len(desk.fills()) >= 2, "some fills")
    desk.kill()  # mid-stream: intents and bars queue in the broker meanwhile
    await stream(range(12, 24))
    await desk.start()
    await stream(range(24, 30))
    for n in range(30, 40):  # bars only: let the last orders fill
        await desk.send_bar(n, 100, volume=20)

    def settled() -> bool:
        decided = [r for r in desk.rows(intents) if r.status != "waiting"]
        return len(decided) == 30 and not any(
            r.status in ("new", "open", "partial") for r in desk.rows(orders)) and all(
            r.delivered for r in desk.rows(outbox))

    await desk.wait(settled, "every intent decided, every order settled, every event confirmed", 40)
    order_rows = desk.rows(orders)
    events = desk.rows(outbox)
    by_order: dict[str, int] = {}
    for row in events:
        if row.client_order_id:
            by_order[row.client_order_id] = by_order.get(row.client_order_id, 0) + 1
    assert {r.client_order_id: r.fills for r in order_rows if r.fills} == by_order
    ledger = Ledger(db.make_engine(desk.url), Signer.load_or_create(desk.broker.state))
    records = [r["data"] for r in ledger.records(chain_for(desk.account))]
    assert sorted(r["event_id"] for r in records) == sorted(r.event_id for r in events)
    net = sum(Decimal(r["qty"]) * (1 if r["side"] == "buy" else -1)
              for r in records if r["kind"] == "fill")
    (position,) = desk.rows(positions)
    assert Decimal(position.qty) == net == Decimal(targets[29])
    for row in order_rows:  # each order's fills add up to what it says it filled
        mine = [r for r in records if r.get("order_id") == row.client_order_id]
        assert sum(Decimal(r["qty"]) for r in mine) == Decimal(row.filled)


async def test_paper_mode_never_opens_the_secret_store(broker: TestBroker, tmp_path: Path) -> None:
    state = tmp_path / "state"
    secrets = state / "secrets"
    secrets.mkdir(parents=True)
    account = f"acct{uuid.uuid4().hex[:8]}"
    (secrets / f"exchange-{account}-api-key.enc").write_bytes(b"not a ciphertext")
    secrets.chmod(0)
    env = broker.env(CIRCLES_STATE_DIR=str(state), CIRCLES_EXECUTION__ACCOUNT=account,
                     CIRCLES_BUS__PASSWORD=broker.password(NAME),
                     CIRCLES_DATABASE__URL=f"sqlite:///{tmp_path / 'box.db'}")
    status = await Collector.start(broker, str(registry.SERVICE_STATUS.topic(service=NAME)))
    status.messages.clear()
    proc = ServiceProcess(NAME, env, tmp_path)
    try:
        await status.wait(lambda ms: any(m.payload == b"online" for m in ms), 20, "online")
        tester = broker.bus()
        await tester.connect()
        try:
            reply = await tester.request(NAME, "positions", timeout=10)
        finally:
            await tester.close()
        assert reply.ok and reply.result["mode"] == "paper"
        assert not (state / "keys").exists()  # no keyring was even created
    finally:
        secrets.chmod(0o700)
        proc.stop()
        await status.close()


def test_live_without_confirmation_exits_78_naming_the_key(broker: TestBroker, tmp_path: Path) -> None:
    proc = ServiceProcess(NAME, broker.env(CIRCLES_EXECUTION__MODE="live"), tmp_path)
    assert proc.wait(15) == 78
    lines = proc.log.strip().splitlines()
    assert len(lines) == 1 and "execution.live_confirmed" in lines[0], lines


PUBLISHED = {"event": registry.TRADE_EVENT, "order": registry.ORDER_UPDATE,
             "orders": registry.OPEN_ORDERS, "positions": registry.POSITIONS}


def kinds(published: list[Message]) -> list[str]:
    """What each message is (`event`, `order`, `orders`, `positions`), in order."""
    return [next(k for k, spec in PUBLISHED.items() if spec.parse(m.topic) is not None)
            for m in published]


@dataclass
class MemoryDesk:
    """The service on the in-memory bus (as the backtest runs it) over a real SQLite file,
    handling one message at a time; `watch` sees what it publishes, in order."""

    service: Any
    runner: Any
    bus: Any
    tester: Any
    watch: Any
    url: str
    account: str = "replay"

    async def send(self, item: Bar | OrderIntent) -> list[Message]:
        """Publish `item` and let the service handle it; what the service published."""
        if isinstance(item, Bar):
            await self.tester.send(registry.MARKET_BAR, item, exchange=item.exchange,
                                   symbol=item.symbol, timeframe=item.timeframe)
        else:
            await self.tester.send(registry.ORDER_INTENT, item, account=self.account)
        await self.runner.handle(await self.bus.receive(100, timeout=0.5))
        return await self.watch.receive(1000, timeout=0.05)

    def rows(self, table: Any) -> list[Any]:
        return account_rows(self.url, table, self.account)


@asynccontextmanager
async def in_memory(tmp_path: Path, **execution: Any) -> AsyncIterator[MemoryDesk]:
    from appliance.bus.memory import MemoryBroker, MemoryBus
    from appliance.bus.topics import Filter
    from appliance.config import DatabaseSettings, settings_class
    from appliance.runtime import Runner
    from modules.trading.execution.service import ExecutionService

    tmp_path.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path / 'box.db'}"
    settings = settings_class({NAME: ExecutionService.Settings})(
        state_dir=tmp_path, database=DatabaseSettings(url=url),
        execution={"account": "replay", **execution})
    broker = MemoryBroker()
    bus = MemoryBus(NAME, broker)
    tester, watch = MemoryBus("tester", broker), MemoryBus("watch", broker)
    for client in (bus, tester, watch):
        await client.connect()
    await watch.subscribe([(Filter(str(spec.filter(account="replay"))), 1)
                           for spec in PUBLISHED.values()])
    await tester.send(registry.TRADING_HALT, TradingHalt(halted=False, by="t", reason=""))
    service = ExecutionService(settings, bus)
    runner = Runner(service, bus)
    await service.start()
    await bus.subscribe(runner.filters())
    await runner.handle(await bus.receive(100, timeout=0.5))  # the halt
    try:
        yield MemoryDesk(service, runner, bus, tester, watch, url)
    finally:
        await service.stop()


async def replay(tmp_path: Path, stream: list[Bar | OrderIntent]) -> list[TradeEvent]:
    """Run the service on the in-memory bus over `stream`; its fills."""
    published: list[Message] = []
    async with in_memory(tmp_path) as box:
        for item in stream:
            published += await box.send(item)
    events = [TradeEvent.model_validate_json(m.payload) for m in published
              if registry.TRADE_EVENT.parse(m.topic) is not None]
    return [e for e in events if e.kind == "fill"]


async def test_a_replay_fills_the_same_whenever_the_intent_arrives(tmp_path: Path) -> None:
    """Whether an intent arrives before or after the bars that fill it, the fills are the
    same: a fast replay (bars far ahead of the pipeline) gives the live result."""
    t0 = hour_ago()
    bars = [make_bar("BTC/USDT", t0 + timedelta(minutes=n), 100 + n, volume=30)
            for n in range(5)]  # 3 fill per bar
    intent = make_intent("replay", "BTC/USDT", "replay-0", "7", t0)
    early = await replay(tmp_path / "early", [bars[0], intent, *bars[1:]])
    # Two bars after its own: as late as an intent may come (max_intent_age_bars = 2).
    late = await replay(tmp_path / "late", [*bars[:3], intent, *bars[3:]])
    assert [(e.event_id, e.qty, e.price, e.ts) for e in early] == \
        [(e.event_id, e.qty, e.price, e.ts) for e in late]
    assert [e.qty for e in early] == [3, 3, 1] and early[0].ts == bars[1].ts


async def test_an_intent_filled_at_once_is_one_transaction_and_its_event_goes_first(
        tmp_path: Path) -> None:
    """fill_at = close: the intent, its order and its fill are written whole or not at all
    (here the outbox refuses the write, as a crash inside the transaction would end it), a
    redelivery fills it once, and the trade event is published before the rest."""
    t0 = hour_ago()
    async with in_memory(tmp_path, fill_at="close") as box:
        await box.send(make_bar("BTC/USDT", t0, 100))
        first = await box.send(make_intent("replay", "BTC/USDT", "k1", "2", t0))
        assert kinds(first) == ["event", "order", "orders", "positions"]
        assert Order.model_validate_json(first[1].payload).status == "filled"

        engine = db.make_engine(box.url)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TRIGGER fail BEFORE INSERT ON execution_outbox "
                                 "BEGIN SELECT RAISE(ABORT, 'the disk went away'); END")
        before = {t.name: box.rows(t) for t in (intents, orders, positions, outbox)}
        closing = make_intent("replay", "BTC/USDT", "k2", "0", t0)
        assert await box.send(closing) == []  # the handler failed: nothing published
        assert {t.name: box.rows(t) for t in (intents, orders, positions, outbox)} == before

        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER fail")
        engine.dispose()
        again = await box.send(closing)  # redelivered
        assert kinds(again) == ["event", "order", "orders", "positions"]
        assert await box.send(closing) == []  # and once more: decided, nothing to do
    assert [(r.intent_key, r.status, r.fills) for r in box.rows(orders)] == [
        ("k1", "filled", 1), ("k2", "filled", 1)]
    assert Decimal(box.rows(positions)[0].qty) == 0
    assert [r.event_id for r in box.rows(outbox)] == [
        "paper-start", *(f"{client_order_id('replay', k)}-f1" for k in ("k1", "k2"))]


async def test_a_redelivered_intent_cancels_nothing(tmp_path: Path) -> None:
    """A newer target cancels the open order pulling the other way, in the transaction that
    records it; the older intent redelivered afterwards changes nothing."""
    t0 = hour_ago()
    async with in_memory(tmp_path) as box:  # next_open: orders wait for the next bar
        await box.send(make_bar("BTC/USDT", t0, 100))
        buy = make_intent("replay", "BTC/USDT", "k1", "5", t0)
        assert kinds(await box.send(buy)) == ["order", "orders"]
        turned = await box.send(make_intent("replay", "BTC/USDT", "k2", "-3", t0))
        assert kinds(turned) == ["order", "order", "orders"]
        assert [(o.intent_key, o.status) for o in
                (Order.model_validate_json(m.payload) for m in turned[:2])] == [
            ("k1", "cancelled"), ("k2", "open")]
        assert await box.send(buy) == []
        assert [o.intent_key for o in box.service.open.values()] == ["k2"]
    assert {r.intent_key: (r.side, r.qty, r.status) for r in box.rows(orders)} == {
        "k1": ("buy", "5", "cancelled"), "k2": ("sell", "3", "open")}
    assert [r.status for r in box.rows(intents)] == ["ordered", "ordered"]


async def test_subscriptions_are_narrowed_to_the_account_by_topic_values(tmp_path: Path) -> None:
    async with in_memory(tmp_path) as box:
        assert box.service.topic_values() == {"account": "replay"}
        assert "_handlers" not in vars(box.service)  # the class's list, narrowed by the runner
        filters = {str(f) for f, _ in box.runner.filters()}
        assert {str(registry.ORDER_INTENT.filter(account="replay")),
                str(registry.TRADE_ACK.filter(account="replay"))} <= filters


def test_database_errors_are_translated_at_the_store(tmp_path: Path) -> None:
    """The store raises TemporaryError (the service waits and retries); the service itself
    knows nothing of sqlalchemy."""
    from appliance.errors import TemporaryError
    from modules.trading.execution import service
    from modules.trading.execution.store import ExecutionStore

    engine = db.make_engine(f"sqlite:///{tmp_path / 'no such directory' / 'box.db'}")
    try:
        with pytest.raises(TemporaryError, match="database unavailable"):
            ExecutionStore(engine, "paper").open_orders()
    finally:
        engine.dispose()
    assert "sqlalchemy" not in Path(service.__file__).read_text()


def test_order_rows_are_keyed_by_the_slug_and_rows_of_the_name_still_found(tmp_path: Path) -> None:
    """`Main` writes its rows as `main`; rows a version before wrote under `Main` are found
    too (else their orders, live at the exchange, would be neither polled nor counted)."""
    from sqlalchemy import update

    from modules.trading.execution.orders import Change, OrderRow
    from modules.trading.execution.store import ExecutionStore

    engine = db.make_engine(f"sqlite:///{tmp_path / 'box.db'}")
    db.migrate(engine)
    store = ExecutionStore(engine, "main", "Main")
    change = Change()
    for coid in ("c-new", "c-old"):
        change.put(OrderRow(client_order_id=coid, account="Main", intent_key=coid,
                            strategy_id="s", exchange="sim", symbol="BTC/USDT", side="buy",
                            qty=Decimal(1), status="open", created_at=coid), new=True)
    assert store.commit(change)
    with engine.begin() as conn:
        assert [r.account for r in conn.execute(select(orders))] == ["main", "main"]
        conn.execute(update(orders).where(orders.c.client_order_id == "c-old").values(account="Main"))
    try:
        assert [(o.client_order_id, o.account) for o in store.open_orders()] == [
            ("c-new", "Main"), ("c-old", "Main")]
        assert len(store.recent_orders(10)) == 2
    finally:
        engine.dispose()


# -- switching between paper and live at run time ------------------------------------------------
def live_exchange(fake: Any) -> dict[str, Any]:
    """`[execution.exchange]` pointing at the fake Binance of tests/fake_exchange.py."""
    return {"id": "binance", "urls": fake.urls(), "backoff_s": 0.05, "timeout_ms": 3000,
            "breaker_reset_s": 1}


async def switch(box: MemoryDesk, mode: str, *, wait_s: float = 10) -> dict[str, Any]:
    """The `mode` command as the panel sends it: carried out only within `wait_s`."""
    from appliance.bus.payloads import CommandRequest

    not_after = (datetime.now(UTC) + timedelta(seconds=wait_s)).isoformat()
    result: dict[str, Any] = await box.service.cmd_mode(
        CommandRequest(mode=mode, by="user:ada", not_after=not_after))
    return result


async def test_going_live_needs_the_keys_and_a_flat_account(tmp_path: Path) -> None:
    """Without the account's API key and secret, going live is refused naming them; with a
    position, it is refused before anything else (flatten first). Nothing changes either way:
    still paper, no mode kept."""
    from appliance.errors import CirclesError
    from modules.trading.execution.mode import mode_file

    t0 = hour_ago()
    async with in_memory(tmp_path, fill_at="close") as box:
        with pytest.raises(CirclesError, match="exchange-replay-api-key"):
            await switch(box, "live")
        with pytest.raises(CirclesError, match='mode must be "paper" or "live"'):
            await switch(box, "real")
        assert (await switch(box, "paper"))["changed"] is False
        await box.send(make_bar("BTC/USDT", t0, 100))
        await box.send(make_intent("replay", "BTC/USDT", "k1", "2", t0))
        with pytest.raises(CirclesError, match="flatten first"):
            await switch(box, "live")
        assert box.service.mode == "paper" and box.service.paper is not None
    assert not mode_file(tmp_path, "replay").exists()


async def test_the_mode_switch_takes_effect_at_once_and_survives_a_restart(
        tmp_path: Path, fake_exchange: Any) -> None:
    """Paper → live with the keys in the secret store: the exchange is reached and reconciled
    before the answer, the retained positions say live, and a restart with `mode = paper` in
    the configuration comes back live; live → paper the same way. A key the exchange refuses
    leaves the account on paper."""
    from appliance.bus.payloads import CommandRequest
    from appliance.errors import CirclesError
    from appliance.security.secrets import write_secret
    from modules.trading.execution.mode import chosen_mode
    from tests.fake_exchange import API_KEY, SECRET

    exchange = live_exchange(fake_exchange)
    write_secret("exchange-replay-api-key", "not-the-key", tmp_path)
    write_secret("exchange-replay-secret", SECRET, tmp_path)
    async with in_memory(tmp_path, exchange=exchange) as box:
        with pytest.raises(CirclesError, match="still paper: .*refused"):
            await switch(box, "live")
        assert box.service.mode == "paper" and chosen_mode(tmp_path, "replay") is None

        write_secret("exchange-replay-api-key", API_KEY, tmp_path)
        answer = await switch(box, "live")
        assert answer == {"account": "replay", "mode": "live", "reconciled": True,
                          "discrepancies": [], "changed": True, "was": "paper",
                          "by": "user:ada"}
        assert box.service.paper is None and fake_exchange.calls("/api/v3/account") >= 1
        published = await box.watch.receive(100, timeout=0.2)
        assert [Positions.model_validate_json(m.payload).mode for m in published
                if registry.POSITIONS.parse(m.topic) is not None] == ["live"]
        positions_now = await box.service.cmd_positions(CommandRequest())
        assert positions_now["mode"] == "live" and positions_now["reconciled"] is True
        chosen = chosen_mode(tmp_path, "replay")
        assert chosen is not None and (chosen.mode, chosen.by) == ("live", "user:ada")

    async with in_memory(tmp_path, exchange=exchange) as again:  # the configuration says paper
        assert again.service.mode == "live" and again.service.driver is not None
        assert (await switch(again, "paper"))["mode"] == "paper"
        assert again.service.driver is None and again.service.paper is not None

    async with in_memory(tmp_path, exchange=exchange) as third:
        assert third.service.mode == "paper"


async def test_a_stale_or_undated_switch_to_live_is_refused(tmp_path: Path,
                                                            fake_exchange: Any) -> None:
    """A `mode` command delivered after its `not_after` (the broker kept it while the service
    restarted; the panel stopped waiting long ago) changes nothing, and one going live must
    say until when it may be carried out; going to paper without it is fine."""
    from appliance.bus.payloads import CommandRequest
    from appliance.errors import ValidationFailed
    from appliance.security.secrets import write_secret
    from modules.trading.execution.mode import mode_file
    from tests.fake_exchange import API_KEY, SECRET

    write_secret("exchange-replay-api-key", API_KEY, tmp_path)
    write_secret("exchange-replay-secret", SECRET, tmp_path)
    async with in_memory(tmp_path, exchange=live_exchange(fake_exchange)) as box:
        with pytest.raises(ValidationFailed, match=r"still paper: the switch to live was asked "
                                                   r"to be done by .* and is stale.*ask again"):
            await switch(box, "live", wait_s=-3 * 3600)
        with pytest.raises(ValidationFailed, match="needs not_after"):
            await box.service.cmd_mode(CommandRequest(mode="live", by="user:ada"))
        with pytest.raises(ValidationFailed, match="ISO 8601 time with its time zone"):
            await box.service.cmd_mode(CommandRequest(mode="live", not_after="2030-01-01T00:00"))
        assert box.service.mode == "paper" and box.service.driver is None
        assert fake_exchange.calls("/api/v3/account") == 0  # the exchange never reached
        assert not mode_file(tmp_path, "replay").exists()
        assert (await box.service.cmd_mode(CommandRequest(mode="paper")))["changed"] is False


async def test_an_intent_during_a_switch_is_refused_and_nothing_is_cancelled(
        tmp_path: Path, fake_exchange: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """While going live waits for the exchange, an intent is refused naming the switch (not
    ordered on paper, then found missing at the exchange and cancelled by the live side);
    the switch then completes, the account still flat."""
    from appliance.security.secrets import write_secret
    from modules.trading.execution.live import LiveDriver
    from tests.fake_exchange import API_KEY, SECRET

    reaching, gate = asyncio.Event(), asyncio.Event()
    real_open = LiveDriver.open

    async def slow_open(driver: LiveDriver) -> None:
        reaching.set()
        await gate.wait()
        await real_open(driver)

    monkeypatch.setattr(LiveDriver, "open", slow_open)
    write_secret("exchange-replay-api-key", API_KEY, tmp_path)
    write_secret("exchange-replay-secret", SECRET, tmp_path)
    t0 = hour_ago()
    async with in_memory(tmp_path, exchange=live_exchange(fake_exchange)) as box:
        await box.send(make_bar("BTC/USDT", t0, 100))
        switching = asyncio.create_task(switch(box, "live"))
        await asyncio.wait_for(reaching.wait(), 10)
        refused = await box.send(make_intent("replay", "BTC/USDT", "k1", "2", t0))
        assert kinds(refused) == ["order", "orders"]  # a rejected order, no open one
        order = Order.model_validate_json(refused[0].payload)
        assert order.status == "rejected" and "mode switch in progress" in (order.reason or "")
        assert box.service.mode == "paper" and box.service.open == {}
        gate.set()
        answer = await asyncio.wait_for(switching, 20)
        assert answer["mode"] == "live" and answer["changed"] is True
        assert box.service.switching_to is None and box.service.open == {}
        assert fake_exchange.calls("/api/v3/order") == 0  # no order looked up, none cancelled
    assert [(r.key, r.status) for r in box.rows(intents)] == [("k1", "refused")]
    assert "mode switch in progress (paper to live)" in box.rows(intents)[0].reason
    assert [(r.intent_key, r.status) for r in box.rows(orders)] == [("k1", "rejected")]


async def test_a_corrupt_mode_file_refuses_the_start_naming_it(tmp_path: Path) -> None:
    """A mode file this service did not write is not guessed at (it could mean live): the
    start fails, saying which file to fix or delete."""
    from appliance.errors import OperationalError
    from modules.trading.execution.mode import mode_file

    path = mode_file(tmp_path, "replay")
    path.parent.mkdir(parents=True)
    path.write_text('{"mode": "lvie"}')
    with pytest.raises(OperationalError, match=rf"{re.escape(str(path))}.*fix or delete it"):
        async with in_memory(tmp_path):
            pass
    path.write_text("{not json")
    with pytest.raises(OperationalError, match=rf"{re.escape(str(path))} is not a chosen mode"):
        async with in_memory(tmp_path):
            pass
