"""The execution service in live mode: the real ccxt library in the service's process, against
the fake Binance of tests/fake_exchange.py, on the real broker and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from appliance import db
from appliance.bus import registry
from appliance.bus.payloads import TradingHalt
from appliance.bus.trade_event import TradeEvent
from appliance.bus.trading import Order, OrderIntent
from appliance.security.secrets import write_secret
from modules.trading.execution.orders import Change, OrderRow, PositionRow, client_order_id
from modules.trading.execution.store import ExecutionStore, intents, orders, outbox, positions
from tests.fake_exchange import API_KEY, SECRET, FakeExchange, fake_exchange_fixture  # noqa: F401
from tests.helpers import Collector, ServiceProcess, TestBroker, account_rows

NAME = "execution"
BTC = "BTC/USDT"


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


class LiveDesk:
    def __init__(self, broker: TestBroker, tmp_path: Path, fake: FakeExchange) -> None:
        self.broker, self.tmp_path, self.fake = broker, tmp_path, fake
        self.account = f"live{uuid.uuid4().hex[:8]}"
        self.url = f"sqlite:///{tmp_path / 'box.db'}"
        self.proc: ServiceProcess | None = None
        self.bar_ts = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)
        fake.prices["BTCUSDT"] = Decimal("60000")

    def config(self, exchange_id: str = "binance", **execution: Any) -> Path:
        settings = {"mode": "live", "live_confirmed": True, "account": self.account,
                    "poll_s": 0.5, "resend_after_s": 1, **execution}
        exchange = {"id": exchange_id, "urls": self.fake.urls(), "backoff_s": 0.05,
                    "timeout_ms": 3000, "breaker_reset_s": 1,
                    # a lost send is known not to have been taken once its signed request expired
                    "options": {"recvWindow": 1500}}
        path = self.tmp_path / "circles.toml"
        path.write_text("[execution]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items())
                        + "[execution.exchange]\n"
                        + "".join(f"{k} = {toml_value(v)}\n" for k, v in exchange.items()))
        return path

    def credentials(self, api_key: str = API_KEY, secret: str = SECRET) -> None:
        write_secret(f"exchange-{self.account}-api-key", api_key, self.broker.state)
        write_secret(f"exchange-{self.account}-secret", secret, self.broker.state)

    async def connect(self) -> None:
        self.tester = self.broker.bus()
        await self.tester.connect()
        await self.tester.send(registry.TRADING_HALT,
                               TradingHalt(halted=False, by="tester", reason=""), wait=True)
        self.watch = await Collector.start(self.broker, *(str(spec.topic(account=self.account))
                                                          for spec in (registry.ORDER_UPDATE,
                                                                       registry.TRADE_EVENT)))

    def launch(self, **execution: Any) -> ServiceProcess:
        self.proc = ServiceProcess(NAME, self.broker.env(
            CIRCLES_CONFIG=str(self.config(**execution)), CIRCLES_DATABASE__URL=self.url),
            self.tmp_path)
        return self.proc

    async def start(self, **execution: Any) -> None:
        status = await Collector.start(self.broker, str(registry.SERVICE_STATUS.topic(service=NAME)))
        try:
            status.messages.clear()
            self.launch(**execution)
            await status.wait(lambda ms: any(m.payload == b"online" for m in ms), 20, "online")
        finally:
            await status.close()

    async def close(self) -> None:
        if self.proc:
            self.proc.stop()
        await self.watch.close()
        await self.tester.close()

    def intent(self, key: str, target: str, *, bar_ts: datetime | None = None,
               timeframe: str | None = "1m") -> OrderIntent:
        return OrderIntent(key=key, account=self.account, exchange="binance", symbol=BTC,
                           target_qty=Decimal(target), price=Decimal(60000),
                           bar_ts=bar_ts or self.bar_ts, timeframe=timeframe)

    async def send_intent(self, key: str, target: str, **kw: Any) -> str:
        await self.tester.send(registry.ORDER_INTENT, self.intent(key, target, **kw),
                               account=self.account, wait=True)
        return client_order_id(self.account, key)

    async def decided(self, key: str) -> str:
        """The intent's outcome, once its row says it was decided."""
        def outcome() -> str | None:
            found = [r.status for r in self.rows(intents) if r.key == key and r.status != "waiting"]
            return found[0] if found else None

        return str(await self.watch.wait(lambda ms: outcome(), 20, f"intent {key} decided"))

    async def reconciled(self) -> dict[str, Any]:
        """The positions command's answer once the start-up comparison is done."""
        deadline = time.monotonic() + 15
        while not (reply := await self.tester.request(NAME, "positions", timeout=10)).result["reconciled"]:
            assert time.monotonic() < deadline, "no reconciliation"
            await asyncio.sleep(0.2)
        result: dict[str, Any] = reply.result
        return result

    def seed(self, change: Change) -> None:
        """Commit `change` as a crash would have left it, before the service starts."""
        engine = db.make_engine(self.url)
        db.migrate(engine)
        try:
            ExecutionStore(engine, self.account).commit(change)
        finally:
            engine.dispose()

    def resting(self, key: str, qty: str = "0.01", price: str = "50000") -> tuple[OrderIntent, OrderRow]:
        """An intent and its buy order, open and resting at the exchange (a limit below the
        market, as one left from before a restart)."""
        intent = self.intent(key, "0.01")
        coid = client_order_id(self.account, key)
        now = datetime.now(UTC).isoformat()
        with self.fake.lock:
            self.fake._create({"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "quantity": qty,
                               "price": price, "newClientOrderId": coid})
        return intent, OrderRow(client_order_id=coid, account=self.account, intent_key=key,
                                strategy_id="ens", exchange="binance", symbol=BTC, side="buy",
                                qty=Decimal(qty), status="open", created_at=now, updated_at=now)

    def updates(self, coid: str) -> list[Order]:
        return [o for o in (Order.model_validate_json(m.payload) for m in self.watch.on(
            str(registry.ORDER_UPDATE.topic(account=self.account)))) if o.client_order_id == coid]

    def fills(self) -> list[TradeEvent]:
        return [TradeEvent.model_validate_json(m.payload) for m in self.watch.on(
            str(registry.TRADE_EVENT.topic(account=self.account)))]

    async def status(self, coid: str, status: str, timeout: float = 20) -> Order:
        await self.watch.wait(lambda ms: any(u.status == status for u in self.updates(coid)),
                              timeout, f"{coid} {status}")
        return next(u for u in self.updates(coid) if u.status == status)

    def at_exchange(self, coid: str) -> int:
        with self.fake.lock:
            return sum(1 for o in self.fake.orders if o.client_order_id == coid)

    def rows(self, table: Any) -> list[Any]:
        return account_rows(self.url, table, self.account)

    def kill(self) -> None:
        assert self.proc
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
async def desk(broker: TestBroker, tmp_path: Path, fake_exchange: FakeExchange) -> AsyncIterator[LiveDesk]:
    made = LiveDesk(broker, tmp_path, fake_exchange)
    made.credentials()
    await made.connect()
    yield made
    await made.close()


async def test_live_order_fills_once_under_its_client_order_id(desk: LiveDesk) -> None:
    await desk.start()
    coid = await desk.send_intent(f"{desk.account}-1", "0.01")
    filled = await desk.status(coid, "filled")
    assert filled.exchange_order_id and filled.avg_price == 60000 and filled.filled == Decimal("0.01")
    assert [u.status for u in desk.updates(coid)] == ["new", "filled"]
    assert desk.fake.created[coid] == 1 and desk.at_exchange(coid) == 1
    (fill,) = desk.fills()
    assert (fill.source, fill.event_id, fill.order_id) == ("ccxt", f"{coid}-f1", coid)
    assert (fill.side, fill.qty, fill.price) == ("buy", Decimal("0.01"), 60000)
    assert fill.fee == Decimal("0.6") and fill.fee_currency == "USDT"
    # The same target again orders nothing.
    again = await desk.send_intent(f"{desk.account}-2", "0.01")
    assert await desk.decided(f"{desk.account}-2") == "noop"
    assert desk.updates(again) == [] and len(desk.fake.orders) == 1
    # A restart finds the exchange's BTC as ours; BTC from elsewhere is reported, not adopted.
    assert desk.proc
    desk.proc.signal(signal.SIGTERM)
    assert desk.proc.wait(10) == 0
    with desk.fake.lock:
        desk.fake.balances["BTC"] += Decimal("0.5")
    await desk.start()
    result = await desk.reconciled()
    (position,) = result["positions"]
    assert Decimal(position["qty"]) == Decimal("0.01")
    assert result["discrepancies"] == [{"kind": "balance", "symbol": BTC, "currency": "BTC",
                                        "ours": "0.01", "exchange": "0.51", "difference": "0.5"}]
    assert "the exchange differs from our records" in desk.proc.log


async def test_kill_9_while_the_exchange_answers_sends_nothing_twice(desk: LiveDesk) -> None:
    await desk.start()
    # The exchange takes the order but its answer comes late: the process dies meanwhile.
    desk.fake.fail_next("/api/v3/order", method="POST", status=None, delay_s=5, taken=True)
    coid = await desk.send_intent(f"{desk.account}-1", "0.02")
    deadline = time.monotonic() + 15
    while desk.fake.created[coid] == 0:
        assert time.monotonic() < deadline, "the order was never sent"
        await asyncio.sleep(0.05)
    desk.kill()
    (row,) = desk.rows(orders)
    assert row.status == "new"  # written before the send
    await desk.start()
    await desk.status(coid, "filled")
    assert desk.fake.created[coid] == 1 and desk.at_exchange(coid) == 1
    await desk.watch.wait(lambda ms: desk.fills(), 10, "the fill")
    assert [r.event_id for r in desk.rows(outbox)] == [f"{coid}-f1"]


async def test_an_order_that_never_left_is_sent_after_a_restart(desk: LiveDesk) -> None:
    """The process died between writing the order and sending it."""
    intent = desk.intent(f"{desk.account}-1", "0.03")
    coid = client_order_id(desk.account, intent.key)
    now = datetime.now(UTC).isoformat()
    change = Change(intent=intent, outcome="ordered")
    change.put(OrderRow(
        client_order_id=coid, account=desk.account, intent_key=intent.key, strategy_id="ens",
        exchange="binance", symbol=BTC, side="buy", qty=Decimal("0.03"), status="new",
        created_at=now, updated_at=now), new=True)
    desk.seed(change)
    await desk.start()
    await desk.status(coid, "filled")
    assert desk.fake.created[coid] == 1
    assert desk.fake.calls("/api/v3/order", "GET") >= 1  # looked up before it was sent


async def test_rate_limits_server_errors_and_timeouts(desk: LiveDesk) -> None:
    await desk.start()
    cases = [
        ("429", dict(status=429, retry_after=0.5)),
        ("5xx", dict(status=503, times=9)),  # more than the boundary's retries: the order waits
        ("timeout", dict(status=None, delay_s=4, taken=True)),  # longer than timeout_ms
    ]
    target = Decimal(0)
    for name, failure in cases:
        desk.fake.fail_next("/api/v3/order", method="POST", **failure)  # type: ignore[arg-type]
        target += Decimal("0.01")
        coid = await desk.send_intent(f"{desk.account}-{name}", str(target))
        order = await desk.status(coid, "filled", timeout=40)
        assert order.filled == Decimal("0.01"), name
        assert desk.at_exchange(coid) == 1, name
    assert desk.proc and desk.proc.process.poll() is None
    assert len(desk.rows(outbox)) == 3


async def test_insufficient_funds_rejects_the_order_and_the_service_goes_on(desk: LiveDesk) -> None:
    await desk.start()
    big = await desk.send_intent(f"{desk.account}-big", "1")  # 60000 USDT; it has 10000
    rejected = await desk.status(big, "rejected")
    assert "insufficient" in rejected.reason.lower()
    small = await desk.send_intent(f"{desk.account}-small", "0.01")
    await desk.status(small, "filled")
    assert desk.proc and desk.proc.process.poll() is None


async def test_halt_refuses_intents_and_cancels_open_live_orders(desk: LiveDesk) -> None:
    # An order resting at the exchange from before a restart (a limit below the market).
    intent, row = desk.resting(f"{desk.account}-resting")
    resting = row.client_order_id
    change = Change(intent=intent, outcome="ordered")
    change.put(row, new=True)
    desk.seed(change)
    await desk.start()
    await desk.tester.send(registry.TRADING_HALT,
                           TradingHalt(halted=True, by="tester", reason="stop"), wait=True)
    cancelled = await desk.status(resting, "cancelled")
    assert cancelled.reason == "trading halted: stop" and cancelled.filled == 0
    assert [o.status for o in desk.fake.orders if o.client_order_id == resting] == ["CANCELED"]
    coid = await desk.send_intent(f"{desk.account}-1", "0.01")
    refused = await desk.status(coid, "rejected")
    assert refused.reason == "trading halted: stop" and desk.fake.created[coid] == 0
    assert desk.fills() == []


async def test_bad_credentials_exit_78_so_systemd_does_not_log_in_again(desk: LiveDesk) -> None:
    """A restart loop would repeat the refused login until the exchange bans the address."""
    desk.credentials(api_key="wrong-key")
    proc = desk.launch()
    code = await asyncio.to_thread(proc.wait, 30)
    assert code == 78
    assert '"log_level": "ERROR"' in proc.log and "Invalid API-key" in proc.log
    assert desk.fake.calls("/api/v3/account") == 1


async def test_an_exchange_without_client_id_lookups_exits_78_before_any_call(desk: LiveDesk) -> None:
    proc = desk.launch(exchange_id="kucoin")
    assert await asyncio.to_thread(proc.wait, 20) == 78
    assert "execution.exchange.id" in proc.log and "'kucoin' cannot be traded live" in proc.log


async def test_missing_credentials_exit_78_naming_the_secret(desk: LiveDesk) -> None:
    desk.account = f"nokey{uuid.uuid4().hex[:6]}"
    proc = desk.launch()
    assert await asyncio.to_thread(proc.wait, 20) == 78
    assert f"exchange-{desk.account}-api-key" in proc.log


def test_exchange_reports_become_one_fill_per_new_quantity() -> None:
    """The exchange's figures are cumulative: each report adds only what is new, at the
    price that makes the total cost right; a report without fees lowers nothing."""
    from modules.trading.exchange import ExchangeOrder
    from modules.trading.execution.live import absorb
    from modules.trading.execution.orders import after_fill

    order = OrderRow(client_order_id="c1", account="a", intent_key="k", strategy_id="s",
                     exchange="binance", symbol=BTC, side="buy", qty=Decimal(3), status="open")

    def report(filled: str, average: str | None, fee: str, status: str = "open") -> ExchangeOrder:
        return ExchangeOrder(id="9", client_order_id="c1", symbol=BTC, side="buy",
                             amount=Decimal(3), filled=Decimal(filled),
                             average=None if average is None else Decimal(average),
                             status=status, fee=Decimal(fee), fee_currency="USDT",
                             timestamp_ms=1_700_000_000_000)

    first = absorb(order, report("1", "100", "0.1"))
    assert first.status == "partial" and first.fill is not None
    assert (first.fill.qty, first.fill.price, first.fill.fee) == (1, 100, Decimal("0.1"))
    order = after_fill(order, first.fill)
    assert absorb(order, report("1", "100", "0")).fill is None  # the same quantity again
    second = absorb(order, report("3", "110", "0", "closed"))  # 2 more at 115; fee unknown
    assert second.status == "filled" and second.fill is not None
    assert (second.fill.qty, second.fill.price, second.fill.fee) == (2, 115, 0)
    waiting = absorb(order, report("2", None, "0"))  # filled more, but no price yet: wait
    assert waiting.fill is None and waiting.status == order.status == "partial"


def test_positions_average_and_cross_zero() -> None:
    from modules.trading.execution.orders import Fill, PositionRow, position_after

    def fill(side: str, qty: str, price: str, fee: str = "0", currency: str = "USDT") -> tuple[OrderRow, Fill]:
        order = OrderRow(client_order_id="c", account="a", intent_key="k", strategy_id="s",
                         exchange="binance", symbol=BTC, side=side, qty=Decimal(qty),  # type: ignore[arg-type]
                         status="open")
        return order, Fill(Decimal(qty), Decimal(price), Decimal(fee), currency,
                           datetime.now(UTC))

    position = PositionRow(account="a", symbol=BTC, exchange="binance")
    for step, (qty, avg) in [(fill("buy", "1", "100"), ("1", "100")),
                             (fill("buy", "1", "110"), ("2", "105")),
                             (fill("sell", "1", "130"), ("1", "105")),  # shrinking keeps it
                             (fill("sell", "3", "90"), ("-2", "90")),  # crossing restarts it
                             (fill("buy", "2", "80"), ("0", "0")),
                             (fill("buy", "1", "100", "0.001", "BTC"), ("0.999", "100"))]:
        position = position_after(position, *step)
        assert (position.qty, position.avg_price) == (Decimal(qty), Decimal(avg)), step


async def test_a_live_intent_whose_bar_is_old_by_the_clock_is_refused(desk: LiveDesk) -> None:
    """Right after a start no bar has been seen: an intent that waited in the broker for hours
    is judged by the wall clock (and one naming no timeframe cannot be judged at all)."""
    await desk.start()
    old = await desk.send_intent(f"{desk.account}-old", "0.01",
                                 bar_ts=desk.bar_ts - timedelta(hours=3))
    unknown = await desk.send_intent(f"{desk.account}-untimed", "0.01", timeframe=None)
    fresh = await desk.send_intent(f"{desk.account}-fresh", "0.01")
    await desk.status(fresh, "filled")
    (refused,) = desk.updates(old)
    assert refused.status == "rejected" and "stale intent" in refused.reason
    (untimed,) = desk.updates(unknown)
    assert untimed.status == "rejected" and "no timeframe" in untimed.reason
    assert desk.fake.created[old] == desk.fake.created[unknown] == 0


async def test_open_orders_of_ours_unknown_to_the_database_are_reported(desk: LiveDesk) -> None:
    """An order at the exchange under one of our client order ids that our database does not
    hold (a database restored from a backup, say) is reported, not adopted; others' orders
    are none of our business."""
    _, lost = desk.resting(f"{desk.account}-lost")
    with desk.fake.lock:
        desk.fake._create({"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT",
                           "quantity": "0.01", "price": "49000", "newClientOrderId": "web_42"})
    await desk.start()
    result = await desk.reconciled()
    (found,) = result["discrepancies"]
    assert found["kind"] == "order" and found["client_order_id"] == lost.client_order_id
    assert (found["symbol"], found["side"], Decimal(found["qty"])) == (BTC, "buy", Decimal("0.01"))
    assert "unknown to our database" in found["problem"]
    answer = await desk.tester.request(NAME, "orders", timeout=10)
    assert answer.result["discrepancies"] == [found] and answer.result["open"] == []
    assert desk.proc and "the exchange differs from our records" in desk.proc.log
    assert desk.fake.calls("/api/v3/openOrders", "GET") >= 1


async def test_flatten_counts_an_order_whose_cancel_is_not_confirmed(desk: LiveDesk) -> None:
    """Long 0.01 with a buy of 0.01 resting at the exchange: the flatten asks for its cancel,
    but it may fill first (here it does), so the flatten sells both."""
    intent, row = desk.resting(f"{desk.account}-resting")
    change = Change(intent=intent, outcome="ordered")
    change.put(row, new=True)
    change.positions[BTC] = PositionRow(account=desk.account, symbol=BTC, exchange="binance",
                                        qty=Decimal("0.01"), avg_price=Decimal(60000))
    desk.seed(change)
    with desk.fake.lock:
        desk.fake.balances["BTC"] = Decimal("0.01")
    await desk.start()
    assert (await desk.reconciled())["discrepancies"] == []
    desk.fake.fail_next("/api/v3/order", method="DELETE", status=503, delay_s=2)  # a slow cancel
    reply = await desk.tester.request(NAME, "flatten", {"by": "tester"}, timeout=10)
    (flatten,) = reply.result["orders"]
    assert (flatten["side"], Decimal(flatten["qty"])) == ("sell", Decimal("0.02"))
    with desk.fake.lock:  # the resting buy fills before the cancel gets through
        order = next(o for o in desk.fake.orders if o.client_order_id == row.client_order_id)
        order.status, order.executed, order.quote = "FILLED", order.qty, order.qty * order.price
        desk.fake.locked["USDT"] -= order.qty * order.price * (1 + desk.fake.fee_rate)
        desk.fake.balances["BTC"] += order.qty
        desk.fake.balances["USDT"] -= order.qty * order.price
    await desk.status(row.client_order_id, "filled")
    await desk.status(flatten["client_order_id"], "filled")
    assert desk.fake.balances["BTC"] == 0 and Decimal(desk.rows(positions)[0].qty) == 0


async def test_kill_9_with_several_orders_in_flight_creates_each_once(desk: LiveDesk) -> None:
    """Three orders written as new; the exchange takes the first but answers late, and the
    process dies meanwhile. After the restart each is looked up before it is sent: every one
    reaches the exchange exactly once (the second again with a late answer)."""
    await desk.start()
    desk.fake.fail_next("/api/v3/order", times=2, method="POST", status=None, delay_s=4, taken=True)
    coids = [await desk.send_intent(f"{desk.account}-{n}", str(Decimal("0.01") * n))
             for n in (1, 2, 3)]
    await desk.watch.wait(lambda ms: desk.fake.created[coids[0]] == 1 and len(desk.rows(orders)) == 3,
                          15, "three orders written, the first sent")
    desk.kill()
    assert sorted(r.status for r in desk.rows(orders)) == ["new", "new", "new"]
    await desk.start()
    for coid in coids:
        await desk.status(coid, "filled", timeout=40)
    assert [desk.fake.created[c] for c in coids] == [1, 1, 1]
    assert [desk.at_exchange(c) for c in coids] == [1, 1, 1]
    await desk.watch.wait(lambda ms: len(desk.rows(outbox)) == 3, 10, "three fills")
    assert sorted(r.event_id for r in desk.rows(outbox)) == sorted(f"{c}-f1" for c in coids)
    assert Decimal(desk.rows(positions)[0].qty) == Decimal("0.03")
