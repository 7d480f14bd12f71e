"""The MT5 expert advisor simulator against the real broker, with a real mt5 device's
credentials: deals, store and forward through a broker outage and a restart of the
simulator, snapshots and resends, the trading halt, and `circles simulate mt5`.

The box's side is a small stand-in here (record each deal, acknowledge it on the account's
ack topic), as the tester client may publish anything."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from appliance.bus import MqttBus, registry
from appliance.bus.mqtt311 import Address
from appliance.bus.mt5 import MT5Ack, MT5Deal, MT5Heartbeat, MT5Resend, MT5Snapshot
from appliance.bus.payloads import TradingHalt
from appliance.mt5_sim import Simulator, TradingHalted
from appliance.mt5_terminal import FIRST_TICKET, Terminal, deal_json
from appliance.security.devices import Device
from tests.helpers import TESTER, TestBroker, circles
from tests.test_mt5_wire import add_ea_device


class StandIn:
    """The box's side of the protocol, as much as these tests need: each deal that arrives is
    recorded (every arrival, duplicates too) and, while `acking`, acknowledged at once."""

    def __init__(self, broker: TestBroker, account: str, *, persistent: bool = False) -> None:
        self.account = account
        self.bus: MqttBus = broker.bus(
            TESTER, persistent=persistent, reconnect_max_s=0.5,
            client_id=f"standin-{account}" if persistent else None)
        self.acking = True
        self.arrivals: list[int] = []
        self.raw: dict[int, bytes] = {}
        self.snapshots: list[MT5Snapshot] = []
        self.heartbeats: list[MT5Heartbeat] = []
        self.statuses: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> StandIn:
        await self.bus.connect()
        await self.bus.subscribe([
            (registry.MT5_DEAL.filter(account=self.account), 1),
            (registry.MT5_SNAPSHOT.filter(account=self.account), 1),
            (registry.MT5_HEARTBEAT.filter(account=self.account), 0),
            (registry.MT5_STATUS.filter(account=self.account), 1)])
        self._task = asyncio.create_task(self._pump())
        return self

    async def _pump(self) -> None:
        while True:
            for message in await self.bus.receive(100, timeout=1):
                if registry.MT5_DEAL.parse(message.topic):
                    deal: MT5Deal = registry.MT5_DEAL.decode(message.payload)  # validates it
                    self.arrivals.append(deal.ticket)
                    self.raw[deal.ticket] = message.payload
                    if self.acking:
                        await self.ack([deal.ticket])
                elif registry.MT5_SNAPSHOT.parse(message.topic):
                    self.snapshots.append(registry.MT5_SNAPSHOT.decode(message.payload))
                elif registry.MT5_HEARTBEAT.parse(message.topic):
                    self.heartbeats.append(registry.MT5_HEARTBEAT.decode(message.payload))
                else:
                    self.statuses.append(message.payload)
                self.bus.ack(message)

    async def ack(self, tickets: list[int]) -> None:
        await self.bus.send(registry.MT5_ACK, MT5Ack(accepted=tickets), account=self.account)

    def first_arrivals(self) -> list[int]:
        return list(dict.fromkeys(self.arrivals))

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.bus.close()


async def until(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return result


def queued_tickets(path: Path) -> list[int]:
    """The tickets in a queue file, as the simulator (or the EA) wrote it."""
    if not path.exists():
        return []
    return [MT5Deal.model_validate_json(line).ticket for line in path.read_text().splitlines() if line.strip()]


def simulator(broker: TestBroker, device: Device, queue: Path, **kw: Any) -> Simulator:
    assert device.password
    options: dict[str, Any] = dict(seed=11, resend_after_s=1.0, reconnect_max_s=1.0,
                                   heartbeat_s=0.3, snapshot_every_s=3600)
    options.update(kw)
    return Simulator(device.name, Address("127.0.0.1", broker.port, device.name,
                                          device.password), queue, **options)


@pytest.fixture
async def ea(broker: TestBroker) -> AsyncIterator[Device]:
    yield await add_ea_device(broker)


@pytest.fixture
async def stand_in(broker: TestBroker, ea: Device) -> AsyncIterator[StandIn]:
    started = await StandIn(broker, ea.name).start()
    yield started
    await started.close()


# -- the deals themselves -----------------------------------------------------------------------
def test_generated_deals_are_realistic_and_the_same_for_the_same_seed() -> None:
    clock_values = [1_763_740_800 + 7 * i for i in range(400)]  # one reading per deal

    def run() -> list[MT5Deal]:
        ticks = iter(clock_values)
        terminal = Terminal(seed=5, clock=lambda: next(ticks))
        return [d for d in (terminal.step() for _ in range(300)) if d is not None]

    deals = run()
    assert deals == run()
    deposit = deals[0]
    assert (deposit.type, deposit.profit, deposit.symbol, deposit.volume, deposit.price,
            deposit.currency) == ("balance", Decimal("10000.00"), "", 0, 0, "USD")
    tickets = [d.ticket for d in deals]
    assert tickets == list(range(FIRST_TICKET, FIRST_TICKET + len(deals)))
    assert all(a.time_msc < b.time_msc for a, b in zip(deals, deals[1:], strict=False))
    assert deals[1].time_msc // 1000 - deals[1].gmt_offset_s == clock_values[1]  # server time
    trades = [d for d in deals if d.type in ("buy", "sell")]
    assert {d.symbol for d in trades} == {"EURUSD", "XAUUSD", "#US30"}
    assert {d.entry for d in trades} == {"in", "out", "inout"}
    assert {d.magic for d in trades} == {1001, 1002}
    assert any(d.swap for d in trades)
    assert any(d.type == "balance" and d.profit < 0 for d in deals[1:]), "no withdrawal"
    # Commission on entry only; profit on exits only; positions opened before they change.
    opened: dict[int, str] = {}
    for d in trades:
        if d.entry == "in":
            assert d.profit == 0 and (d.commission < 0 or d.symbol == "#US30")
            assert opened.setdefault(d.position, d.symbol) == d.symbol
        else:
            assert opened.get(d.position) == d.symbol, f"deal {d.ticket} on an unknown position"
            if d.entry == "out":
                assert d.commission == 0
    eurusd = next(d for d in trades if d.symbol == "EURUSD" and d.entry == "in")
    assert eurusd.commission == -(Decimal("7.00") * eurusd.volume)  # 0.10 lot: -0.70
    # Written with each number's decimals, and read back exactly.
    line = deal_json(eurusd)
    assert re.search(r'"price": \d\.\d{5},', line) and re.search(r'"volume": \d+\.\d\d,', line)
    assert MT5Deal.model_validate_json(line) == eurusd and deal_json(MT5Deal.model_validate_json(line)) == line


def test_an_open_deal_is_written_as_the_protocol_shows_it() -> None:
    ticks = iter([1_763_733_000.0, 1_763_733_600.123])
    terminal = Terminal(seed=1, clock=lambda: next(ticks))
    terminal.deposit(Decimal(10000))
    deal = terminal.open("EURUSD", "buy", "0.10", magic=1001)
    line = deal_json(deal)
    for text in ('"entry": "in"', '"volume": 0.10', '"commission": -0.70', '"profit": 0.00',
                 '"magic": 1001', '"gmt_offset_s": 7200', '"time_msc": 1763740800123',
                 '"currency": "USD"', f'"position": {deal.order}'):
        assert text in line
    assert MT5Deal.model_validate_json(line).ticket == FIRST_TICKET + 1


# -- against the broker ------------------------------------------------------------------------
async def test_deals_arrive_valid_and_leave_the_queue_once_acked(
        broker: TestBroker, ea: Device, stand_in: StandIn, tmp_path: Path) -> None:
    queue = tmp_path / f"{ea.name}.queue"
    stand_in.acking = False
    sim = simulator(broker, ea, queue)
    await sim.start()
    try:
        await until(lambda: b"online" in stand_in.statuses, "status online")
        made = [await sim.deposit(), await sim.open("EURUSD", "buy", "0.10", magic=1001)]
        made += [d for d in [await sim.step() for _ in range(6)] if d is not None]
        tickets = [d.ticket for d in made]
        await until(lambda: set(tickets) <= set(stand_in.arrivals), "every deal at the box")
        assert queued_tickets(queue) == tickets  # kept until acknowledged, PUBACK or not
        await until(lambda: all(stand_in.arrivals.count(t) >= 2 for t in tickets),
                    "each deal sent again, having no ack")
        for deal in made:
            assert stand_in.raw[deal.ticket].decode() == deal_json(deal)
        raw_open = stand_in.raw[made[1].ticket].decode()
        assert '"volume": 0.10' in raw_open and '"commission": -0.70' in raw_open
        deposit = MT5Deal.model_validate_json(stand_in.raw[made[0].ticket])
        assert (deposit.type, deposit.profit, deposit.currency) == ("balance", 10000, "USD")
        utc_s = deposit.time_msc / 1000 - deposit.gmt_offset_s
        assert deposit.gmt_offset_s == 7200 and abs(utc_s - time.time()) < 120

        await stand_in.ack(tickets[:2])
        await until(lambda: queued_tickets(queue) == tickets[2:], "the first two out of the file")
        stand_in.acking = True
        await stand_in.ack(tickets[2:])
        await sim.wait_acked(timeout=15)
        assert queued_tickets(queue) == [] and sim.queue == {}
        await until(lambda: any(h.queue == 0 for h in stand_in.heartbeats), "a heartbeat")
    finally:
        await sim.stop()
    await until(lambda: stand_in.statuses and stand_in.statuses[-1] == b"offline",
                "status offline after stop")


async def test_deals_made_while_the_broker_is_down_all_arrive_in_order(
        own_broker: TestBroker, tmp_path: Path) -> None:
    device = await add_ea_device(own_broker)
    queue = tmp_path / "ea.queue"
    # A persistent session: deals the simulator re-sends before the stand-in is back are
    # kept for it by the broker, so arrivals are in the order they were sent.
    stand_in = await StandIn(own_broker, device.name, persistent=True).start()
    sim = simulator(own_broker, device, queue, reconnect_min_s=0.2)
    await sim.start()
    making = asyncio.Event()
    making.set()

    async def keep_making() -> None:
        while making.is_set():
            await sim.step()
            await asyncio.sleep(0.05)

    maker = asyncio.create_task(keep_making())
    try:
        await until(lambda: len(stand_in.first_arrivals()) >= 3, "deals before the outage")
        await asyncio.to_thread(own_broker.stop)
        down_from = sim.next_ticket
        made_while_down = set(await until(
            lambda: len(ts := [t for t in queued_tickets(queue) if t >= down_from]) >= 5 and ts,
            "deals queued while the broker is down"))
        # A deal reaches the queue file a moment before the in-memory queue (file first).
        await until(lambda: made_while_down <= set(sim.queue), "queued deals in memory too")
        assert not sim.connected and made_while_down <= set(sim.queue)
        await asyncio.to_thread(own_broker.start)
        back_from = sim.next_ticket
        await until(lambda: sim.connected and len(
            [t for t in stand_in.arrivals if t >= back_from]) >= 3, "deals after the restart",
            timeout=30)
        making.clear()
        await maker
        await sim.wait_acked(timeout=30)
        history = sorted(sim.history)
        first = stand_in.first_arrivals()
        assert set(first) == set(history), f"missing: {sorted(set(history) - set(first))}"
        assert first == history  # in ticket order, re-sends aside
        assert made_while_down <= set(stand_in.arrivals)
        assert queued_tickets(queue) == [] and sim.queue == {}
    finally:
        making.clear()
        await asyncio.gather(maker, return_exceptions=True)
        await sim.stop()
        await stand_in.close()


async def test_a_skipped_deal_shows_in_the_snapshot_and_arrives_on_resend(
        broker: TestBroker, ea: Device, stand_in: StandIn, tmp_path: Path) -> None:
    sim = simulator(broker, ea, tmp_path / "ea.queue")
    await sim.start()
    try:
        await until(lambda: stand_in.snapshots, "the snapshot after connecting")
        skipped = sim.next_ticket + 1
        sim.skip.add(skipped)
        made = [await sim.deposit(), await sim.open("XAUUSD", "sell", "0.05"),
                await sim.close("XAUUSD")]
        assert [d.ticket for d in made] == [skipped - 1, skipped, skipped + 1]
        await until(lambda: {skipped - 1, skipped + 1} <= set(stand_in.arrivals), "the others")
        await sim.wait_acked(timeout=15)
        stand_in.acking = False
        waiting = await sim.open("EURUSD", "buy", "0.20")
        await until(lambda: waiting.ticket in stand_in.arrivals, "an unacknowledged deal")
        await sim.send_snapshot()
        snap = await until(lambda: len(stand_in.snapshots) >= 2 and stand_in.snapshots[-1],
                           "the second snapshot")
        assert {skipped - 1, skipped, skipped + 1, waiting.ticket} <= set(snap.tickets)
        assert snap.pending == [waiting.ticket]
        assert snap.from_msc < made[0].time_msc <= snap.to_msc
        assert snap.to_msc - snap.from_msc == 7 * 86_400_000 and snap.gmt_offset_s == 7200
        assert skipped not in stand_in.arrivals

        stand_in.acking = True
        await stand_in.ack([waiting.ticket])
        await stand_in.bus.send(registry.MT5_RESEND, MT5Resend(tickets=[skipped]),
                                account=ea.name)
        await until(lambda: skipped in stand_in.arrivals, "the skipped deal, resent")
        assert stand_in.raw[skipped].decode() == deal_json(sim.history[skipped])
        await sim.wait_acked(timeout=15)
    finally:
        await sim.stop()


async def test_a_halt_reaches_the_simulator_and_it_refuses_an_open(
        own_broker: TestBroker, tmp_path: Path) -> None:
    device = await add_ea_device(own_broker)
    stand_in = await StandIn(own_broker, device.name).start()
    queue = tmp_path / "ea.queue"
    sim = simulator(own_broker, device, queue)
    await sim.start()

    async def halt(halted: bool) -> None:
        await stand_in.bus.send(registry.TRADING_HALT, TradingHalt(
            halted=halted, by="test", reason="daily loss" if halted else "resumed"), wait=True)

    try:
        assert sim.may_open()
        await sim.deposit()
        await sim.open("EURUSD", "buy", "0.20")
        await halt(True)
        await until(lambda: not sim.may_open(), "the halt at the simulator")
        assert sim.halted and sim.halt and sim.halt.by == "test"
        before = len(sim.history)
        with pytest.raises(TradingHalted, match="halted by test"):
            await sim.open("XAUUSD", "buy", "0.10")
        with pytest.raises(TradingHalted):
            await sim.reverse("EURUSD", "0.10")
        assert len(sim.history) == before
        reduced = await sim.close("EURUSD", "0.10")  # reducing stays allowed
        assert reduced.entry == "out"
        made = [d for d in [await sim.step() for _ in range(30)] if d is not None]
        assert all(d.entry == "out" for d in made if d.type in ("buy", "sell"))
        await until(lambda: any(h.halted for h in stand_in.heartbeats), "a heartbeat: halted")

        await halt(False)
        await until(sim.may_open, "the resume at the simulator")
        assert (await sim.open("XAUUSD", "buy", "0.10")).entry == "in"

        # Retained: a simulator started later obeys the halt as soon as it has subscribed.
        await halt(True)
        await until(lambda: sim.halted, "the second halt")
        await sim.stop()
        sim = simulator(own_broker, device, queue)
        await sim.start()
        await until(lambda: sim.halted, "the retained halt at a new simulator")
        with pytest.raises(TradingHalted):
            await sim.open("EURUSD")
    finally:
        await sim.stop()
        await stand_in.close()


async def test_the_queue_survives_a_restart_of_the_simulator(
        broker: TestBroker, ea: Device, stand_in: StandIn, tmp_path: Path) -> None:
    queue = tmp_path / "ea.queue"
    stand_in.acking = False
    first = simulator(broker, ea, queue, resend_after_s=60)
    await first.start()
    try:
        made = [await first.deposit(), await first.open("#US30", "buy", "1.00")]
        made += [d for d in [await first.step() for _ in range(3)] if d is not None]
        tickets = [d.ticket for d in made]
        await until(lambda: set(tickets) <= set(stand_in.arrivals), "the deals, unacknowledged")
    finally:
        await first.stop()
    assert queued_tickets(queue) == tickets
    arrived = len(stand_in.arrivals)

    stand_in.acking = True
    second = simulator(broker, ea, queue, resend_after_s=60)
    await second.start()
    try:
        await until(lambda: set(tickets) <= set(stand_in.arrivals[arrived:]),
                    "the queued deals, sent by the new instance")
        await second.wait_acked(timeout=15)
        assert queued_tickets(queue) == []
        assert set(second.history) >= set(tickets)
        later = await second.close("#US30")  # the history goes on: position and tickets
        assert later.ticket == max(tickets) + 1 and later.position == made[1].position
    finally:
        await second.stop()


async def test_circles_simulate_mt5_runs_until_every_deal_is_acked(
        broker: TestBroker, ea: Device, stand_in: StandIn) -> None:
    skipped = FIRST_TICKET + 2
    done = await asyncio.to_thread(
        circles, broker.env(), "simulate", "mt5", "--account", ea.name, "--deals", "5",
        "--every", "0.1", "--seed", "3", "--skip", str(skipped), "--resend-after", "1",
        "--reconnect-max", "1", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    sent = sorted(set(range(FIRST_TICKET, FIRST_TICKET + 5)) - {skipped})
    assert stand_in.first_arrivals() == sent
    assert "5 deals made" in done.stdout and f"deal {FIRST_TICKET}:" in done.stdout
    assert queued_tickets(broker.state / "mt5-sim" / f"{ea.name}.queue") == []
    await until(lambda: stand_in.statuses and stand_in.statuses[-1] == b"offline",
                "status offline at the end")


def test_circles_simulate_mt5_without_a_password_says_how_to_get_one(
        broker: TestBroker) -> None:
    name = f"nobody-{uuid.uuid4().hex[:6]}"
    done = circles(broker.env(), "simulate", "mt5", "--account", name, "--deals", "1")
    assert done.returncode == 1
    assert f"no secret mqtt-{name}" in done.stderr and "circles device add" in done.stderr
