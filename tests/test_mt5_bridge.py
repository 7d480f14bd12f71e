"""The mt5-bridge service: MT5 deals normalised into the ledger, confirmed end to end, gaps
found from snapshots, terminals tracked (real broker, real trade logger, real SQLite)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from appliance.bus import MqttBus, registry
from appliance.bus.mqtt311 import Address
from appliance.bus.mt5 import MT5Ack, MT5Deal, MT5Gaps, MT5Resend, MT5Snapshot
from appliance.bus.payloads import DeadLetter
from appliance.bus.trade_event import TradeEvent
from appliance.errors import TemporaryError, ValidationFailed
from appliance.mt5_sim import Simulator
from modules.mt5_bridge.normalise import to_event
from tests.helpers import Collector, ServiceProcess, TestBroker
from tests.test_mt5_wire import add_ea_device

OFFSET = 7200  # the trade server is two hours ahead of UTC
T0 = 1_763_740_800_000  # ms, server time


def deal(ticket: int, type_: str, **fields: Any) -> dict[str, Any]:
    """A deal as the EA sends it (docs/mt5_protocol.md), one second per ticket."""
    return {"ticket": ticket, "order": ticket, "position": fields.pop("position", ticket),
            "symbol": "", "type": type_, "entry": "in", "volume": 0, "price": 0, "profit": 0,
            "commission": 0, "swap": 0, "fee": 0, "magic": 0, "reason": "expert",
            "time_msc": T0 + ticket * 1000, "gmt_offset_s": OFFSET, "currency": "USD",
            "comment": "", "login": 5001234, **fields}


# A recorded session: a deposit; EURUSD bought in one go and closed in two parts (commission
# on entry only); a gold short reversed by an `inout` deal and closed; a withdrawal; then two
# deals the ledger does not keep.
SESSION = [
    deal(1, "balance", profit=10000, comment="deposit"),
    deal(2, "buy", symbol="EURUSD", volume=0.30, price=1.08500, commission=-2.10, magic=1001),
    deal(3, "sell", entry="out", position=2, symbol="EURUSD", volume=0.10, price=1.08700,
         profit=20.00, swap=-0.30, magic=1001, reason="tp"),
    deal(4, "sell", entry="out", position=2, symbol="EURUSD", volume=0.20, price=1.08400,
         profit=-20.00, swap=-0.60, magic=1001, reason="sl"),
    deal(5, "sell", symbol="XAUUSD", volume=1.00, price=2000.00, commission=-5.00, magic=1002),
    deal(6, "buy", entry="inout", position=5, symbol="XAUUSD", volume=2.00, price=1990.00,
         profit=1000.00, commission=-5.00, magic=1002),
    deal(7, "sell", entry="out", position=5, symbol="XAUUSD", volume=1.00, price=1995.00,
         profit=500.00, magic=1002),
    deal(8, "balance", profit=-500, comment="withdrawal"),
]
NOT_KEPT = [deal(9, "commission", profit=-3.00), deal(10, "buy_canceled", symbol="EURUSD",
                                                      volume=0.1, price=1.1)]
# By hand: gross = (20 − 0.30) + (−20 − 0.60) + 1000 + 500 = 1499.10; fees = 2.10 + 5 + 5;
# net = 1487.00; equity = 10000 − 500 + 1487.
BY_HAND = {"gross_pnl": 1499.10, "fees": 12.10, "net_pnl": 1487.00, "deposits": 10000.0,
           "withdrawals": 500.0, "equity": 10987.00}


def test_deals_normalise_to_trade_events() -> None:
    events = [to_event("ea-1", MT5Deal.model_validate(d)) for d in SESSION]
    deposit, buy, part, rest, short, reverse, close, withdrawal = events
    assert (deposit.kind, deposit.symbol, deposit.qty, deposit.price) == \
        ("deposit", "USD", Decimal(10000), Decimal(1))
    assert deposit.event_id == "ea-1:1" and deposit.source == "mt5" and deposit.account_id == "ea-1"
    assert deposit.ts == datetime.fromtimestamp(T0 / 1000 + 1 - OFFSET, UTC)  # server → UTC
    assert (buy.kind, buy.side, buy.symbol, buy.qty, buy.price) == \
        ("fill", "buy", "EURUSD", Decimal("0.3"), Decimal("1.085"))
    assert (buy.fee, buy.realized_pnl, buy.strategy_id, buy.position_id) == \
        (Decimal("2.1"), Decimal(0), "magic-1001", "2")
    assert (part.side, part.realized_pnl, part.fee, part.position_id) == \
        ("sell", Decimal("19.7"), Decimal(0), "2")
    assert rest.realized_pnl == Decimal("-20.6")
    assert (reverse.side, reverse.qty, reverse.realized_pnl, reverse.fee) == \
        ("buy", Decimal(2), Decimal(1000), Decimal(5))
    assert reverse.extra["entry"] == "inout" and close.extra["ticket"] == 7
    assert (withdrawal.kind, withdrawal.qty) == ("withdrawal", Decimal(500))
    # The ledger's net of every fill is MT5's profit + commission + swap + fee.
    for raw, event in zip(SESSION, events, strict=True):
        if event.kind == "fill":
            net = Decimal(str(raw["profit"])) + Decimal(str(raw["commission"])) \
                + Decimal(str(raw["swap"])) + Decimal(str(raw["fee"]))
            assert event.realized_pnl - event.fee == net  # type: ignore[operator]


# Lines as the EA's CbDealJson writes them: each number with its own digits.
RECORDED = [
    '{"ticket":50012,"order":61020,"position":61020,"symbol":"EURUSD","type":"buy","entry":"in",'
    '"volume":0.10,"price":1.08512,"profit":0.00,"commission":-0.70,"swap":0.00,"fee":0.00,'
    '"magic":1001,"reason":"expert","time_msc":1763740800123,"gmt_offset_s":7200,'
    '"currency":"USD","comment":"","login":5001234}',
    '{"ticket":50013,"order":61021,"position":61020,"symbol":"EURUSD","type":"sell",'
    '"entry":"out_by","volume":0.10,"price":1.08530,"profit":1.80,"commission":-0.00,'
    '"swap":-0.00,"fee":0.00,"magic":1001,"reason":"expert","time_msc":1763740860456,'
    '"gmt_offset_s":7200,"currency":"USD","comment":"close by #61019","login":5001234,'
    '"spread":3}',
]


def test_recorded_ea_lines_normalise_with_their_digits() -> None:
    opened, closed_by = (to_event("ea-1", MT5Deal.model_validate_json(line)) for line in RECORDED)
    assert str(opened.qty) == "0.10" and str(opened.price) == "1.08512"
    assert (opened.fee, opened.realized_pnl, opened.fee_currency) == \
        (Decimal("0.70"), Decimal("0.00"), None)
    assert opened.ts == datetime(2025, 11, 21, 14, 0, 0, 123000, tzinfo=UTC)
    # `out_by` (closed by an opposite position) is a fill like any other; a key the EA added
    # (`spread`) is ignored, never a reason to refuse the deal.
    assert (closed_by.side, closed_by.realized_pnl, closed_by.fee) == \
        ("sell", Decimal("1.80"), Decimal(0))
    assert closed_by.extra["entry"] == "out_by" and closed_by.extra["comment"] == "close by #61019"


def test_a_deal_ahead_of_the_box_clock_is_not_refused() -> None:
    ahead = deal(1, "buy", symbol="EURUSD", volume=0.1, price=1.1,
                 time_msc=int((datetime.now(UTC).timestamp() + OFFSET + 3600) * 1000))
    with pytest.raises(TemporaryError, match="ahead of this box's clock"):
        to_event("a", MT5Deal.model_validate(ahead))


def test_a_rebate_is_profit_and_odd_deals_are_refused() -> None:
    rebate = to_event("a", MT5Deal.model_validate(deal(
        1, "sell", entry="out", symbol="EURUSD", volume=0.1, price=1.1, profit=10,
        commission=0.50)))
    assert (rebate.fee, rebate.realized_pnl) == (Decimal(0), Decimal("10.5"))
    for raw, reason in ((NOT_KEPT[0], "neither a trade nor a balance"),
                        (NOT_KEPT[1], "neither a trade nor a balance"),
                        (deal(3, "buy", symbol="EURUSD", volume=0, price=1.1), "qty"),
                        (deal(4, "balance", profit=0), "operation of 0")):
        with pytest.raises(ValidationFailed, match=reason):
            to_event("a", MT5Deal.model_validate(raw))


@dataclass
class Desk:
    broker: TestBroker
    account: str
    ea: MqttBus  # publishes as the EA would (the tester may publish anything)
    watch: Collector

    def topic(self, spec: Any) -> str:
        return str(spec.topic(account=self.account))

    async def send(self, spec: Any, payload: Any) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.ea.publish(self.topic(spec), body, qos=1, wait=True)

    def acks(self) -> list[MT5Ack]:
        return [MT5Ack.model_validate_json(m.payload) for m in self.watch.on(self.topic(registry.MT5_ACK))]

    def acked(self) -> set[int]:
        return {t for a in self.acks() for t in a.accepted}

    def refused(self) -> dict[int, str]:
        return {r.ticket: r.reason for a in self.acks() for r in a.rejected}


@pytest.fixture
async def desk(broker: TestBroker, tmp_path: Path) -> AsyncIterator[Desk]:
    account = f"ea-{uuid.uuid4().hex[:6]}"
    names = ("trade-logger", "mt5-bridge")
    status = [str(registry.SERVICE_STATUS.topic(service=n)) for n in names]
    watch = await Collector.start(broker, f"circles/mt5/{account}/#", *status,
                                  str(registry.DLQ.topic(service="mt5-bridge")),
                                  str(registry.TRADE_EVENT.topic(account=account)))
    procs = [ServiceProcess(name, broker.env(), tmp_path) for name in names]
    ea = broker.bus()
    await ea.connect()
    try:
        await watch.wait(lambda ms: {m.sender for m in ms if m.payload == b"online"} >= set(names),
                         20, "both services online")
        yield Desk(broker, account, ea, watch)
    finally:
        await ea.close()
        for proc in procs:
            proc.stop()
        await watch.close()


async def test_deals_reach_the_ledger_and_are_confirmed_end_to_end(desk: Desk) -> None:
    for raw in SESSION + NOT_KEPT:
        await desk.send(registry.MT5_DEAL, raw)
    await desk.send(registry.MT5_DEAL, b'{"ticket": 11, "type": "buy"}')  # not a deal payload
    await desk.send(registry.MT5_DEAL, SESSION[3])  # sent twice: stored once
    await desk.watch.wait(lambda ms: desk.acked() >= set(range(1, 9)) and
                          set(desk.refused()) >= {9, 10, 11}, 30, "every deal answered")
    refused = desk.refused()
    assert "neither a trade nor a balance" in refused[9] and "time_msc" in refused[11]
    assert desk.acked().isdisjoint(refused)
    letters = [DeadLetter.model_validate_json(m.payload)
               for m in desk.watch.on(str(registry.DLQ.topic(service="mt5-bridge")))]
    assert {json.loads(letter.payload)["ticket"] for letter in letters
            if letter.topic == desk.topic(registry.MT5_DEAL)} >= {9, 10, 11}

    # The account is the topic's: what reached the ledger names it, with the ticket.
    events = [TradeEvent.model_validate_json(m.payload)
              for m in desk.watch.on(str(registry.TRADE_EVENT.topic(account=desk.account)))]
    assert {e.event_id for e in events} == {f"{desk.account}:{t}" for t in range(1, 9)}
    assert all(e.account_id == desk.account and e.source == "mt5" for e in events)

    tester = desk.ea
    reply = None
    for _ in range(50):
        reply = await tester.request("trade-logger", "metrics", {"account": desk.account},
                                     timeout=10)
        if reply.ok and reply.result.get("fills") == 6:
            break
        await asyncio.sleep(0.2)
    assert reply is not None and reply.ok, reply
    metrics = reply.result
    for key, value in BY_HAND.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


async def test_a_snapshot_finds_the_missing_deal_and_asks_for_it(desk: Desk) -> None:
    for raw in SESSION[:3]:
        await desk.send(registry.MT5_DEAL, raw)
    await desk.watch.wait(lambda ms: desk.acked() >= {1, 2, 3}, 30, "three deals kept")
    # The terminal has deals 1–5; 4 is still in its queue, 5 never reached the box.
    snapshot = MT5Snapshot(from_msc=T0, to_msc=T0 + 10_000, tickets=[1, 2, 3, 4, 5], pending=[4])
    await desk.send(registry.MT5_SNAPSHOT, snapshot.model_dump())
    resend = await desk.watch.wait(lambda ms: desk.watch.on(desk.topic(registry.MT5_RESEND)), 20,
                                   "a resend command")
    assert MT5Resend.model_validate_json(resend[-1].payload).tickets == [5]
    gaps = MT5Gaps.model_validate_json(desk.watch.on(desk.topic(registry.MT5_GAPS))[-1].payload)
    assert (gaps.missing, gaps.checked) == ([5], 4)

    await desk.send(registry.MT5_DEAL, NOT_KEPT[0])  # refused for good: no gap after
    await desk.watch.wait(lambda ms: 9 in desk.refused(), 30, "deal 9 refused")
    await desk.send(registry.MT5_DEAL, SESSION[4])  # the EA sends it again
    await desk.send(registry.MT5_DEAL, SESSION[3])
    await desk.watch.wait(lambda ms: desk.acked() >= {4, 5}, 30, "the gap filled")
    desk.watch.messages.clear()
    await desk.send(registry.MT5_SNAPSHOT, snapshot.model_copy(
        update={"pending": [], "tickets": [*snapshot.tickets, 9]}).model_dump())
    found = await desk.watch.wait(lambda ms: desk.watch.on(desk.topic(registry.MT5_GAPS)), 20,
                                  "the next comparison")
    assert MT5Gaps.model_validate_json(found[-1].payload).missing == []
    assert desk.watch.on(desk.topic(registry.MT5_RESEND)) == []


async def test_terminals_are_tracked_by_status_and_heartbeat(desk: Desk) -> None:
    await desk.ea.publish(desk.topic(registry.MT5_STATUS), b"online", retain=True, wait=True)
    await desk.send(registry.MT5_HEARTBEAT, {"ts": "2026-11-21T18:00:00Z", "queue": 2,
                                             "halted": True, "version": "1.0"})

    async def terminal() -> dict[str, Any] | None:
        reply = await desk.ea.request("mt5-bridge", "terminals", timeout=10)
        assert reply.ok, reply
        return next((t for t in reply.result if t["account"] == desk.account), None)

    found = None
    for _ in range(50):
        found = await terminal()
        if found and found["online"] and found["queue"] == 2:
            break
        await asyncio.sleep(0.2)
    assert found and found["online"] and found["halted"] is True, found
    await desk.ea.publish(desk.topic(registry.MT5_STATUS), b"offline", retain=True, wait=True)
    for _ in range(50):
        found = await terminal()
        if found and not found["online"]:
            break
        await asyncio.sleep(0.2)
    assert found and not found["online"] and found["status"] == "offline"
    await desk.ea.publish(desk.topic(registry.MT5_STATUS), b"", retain=True, wait=True)


async def test_the_simulated_ea_through_the_bridge_into_the_ledger(
        broker: TestBroker, desk: Desk, tmp_path: Path) -> None:
    """The EA's protocol end to end: deals confirmed by the ledger leave the EA's queue; a
    deal that never left the terminal is found by the snapshot and recovered."""
    device = await add_ea_device(broker)
    assert device.password
    # A halt left retained on the session's broker by another test would refuse the opens.
    await desk.ea.publish(str(registry.TRADING_HALT.topic()), b"", retain=True, wait=True)
    watch = await Collector.start(broker, f"circles/mt5/{device.name}/#")
    sim = Simulator(device.name, Address("127.0.0.1", broker.port, device.name, device.password),
                    tmp_path / "ea.queue", seed=3, resend_after_s=2.0, reconnect_max_s=1.0,
                    snapshot_every_s=3600)
    try:
        await sim.start()
        skipped = sim.next_ticket + 2
        sim.skip.add(skipped)
        made = [await sim.deposit(), await sim.open("EURUSD", "buy", "0.10"),
                await sim.open("XAUUSD", "sell", "0.05"), await sim.close("EURUSD")]
        assert made[2].ticket == skipped
        await sim.wait_acked(timeout=30)
        assert not sim.queue

        watch.messages.clear()  # the snapshot sent at connect found nothing missing
        await sim.send_snapshot()
        gaps = await watch.wait(lambda ms: [g for m in ms if m.topic.endswith("/gaps") and m.payload
                                            and (g := MT5Gaps.model_validate_json(m.payload)).missing],
                                20, "the gap found")
        assert gaps[-1].missing == [skipped]
        tickets = [d.ticket for d in made]
        for _ in range(100):  # resent by the EA, committed, confirmed
            reply = await desk.ea.request("trade-logger", "known", {
                "account": device.name, "source": "mt5",
                "event_ids": [f"{device.name}:{t}" for t in tickets]}, timeout=10)
            if reply.ok and len(reply.result["known"]) == len(tickets):
                break
            await asyncio.sleep(0.2)
        assert reply.ok and len(reply.result["known"]) == len(tickets), reply
        await sim.wait_acked(timeout=30)
    finally:
        await sim.stop()
        await watch.close()
