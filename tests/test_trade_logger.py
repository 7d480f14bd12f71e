"""The trade logger as systemd runs it, against the real broker and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from appliance import db
from appliance.bus import registry
from appliance.bus.message import Message
from appliance.bus.mqtt import MqttBus
from appliance.bus.payloads import DeadLetter
from appliance.bus.trade_event import AcceptedEvent, RejectedEvent, TradeAck, TradeMetrics, chain_for
from appliance.ledger import Ledger, Signer
from appliance.simulate import simulated_trades
from appliance.trade_sender import TradeSender
from tests.helpers import Collector, ServiceProcess, TestBroker

NAME = "trade-logger"


@dataclass
class Logger:
    broker: TestBroker
    tmp_path: Path
    url: str
    proc: ServiceProcess | None = None

    async def start(self) -> None:
        watch = await Collector.start(self.broker, str(registry.SERVICE_STATUS.topic(service=NAME)))
        try:
            watch.messages.clear()
            self.proc = ServiceProcess(NAME, self.broker.env(CIRCLES_DATABASE__URL=self.url),
                                       self.tmp_path)
            await watch.wait(lambda ms: any(m.payload == b"online" for m in ms), 20, "online")
        finally:
            await watch.close()

    def kill(self) -> None:
        assert self.proc
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(10)

    def ledger(self) -> Ledger:
        return Ledger(db.make_engine(self.url), Signer.load_or_create(self.broker.state))


@pytest.fixture
async def logger(broker: TestBroker, tmp_path: Path) -> AsyncIterator[Logger]:
    started = Logger(broker, tmp_path, f"sqlite:///{tmp_path / 'journal.db'}")
    await started.start()
    yield started
    assert started.proc
    started.proc.stop()


async def connected(broker: TestBroker) -> tuple[MqttBus, TradeSender, asyncio.Task[None]]:
    bus = broker.bus()
    await bus.connect()
    sender = TradeSender(bus, resend_after_s=3)
    return bus, sender, await sender.listen()


def account() -> str:
    return f"acct-{uuid.uuid4().hex[:8]}"


async def wait_for_count(ledger: Ledger, chain: str, n: int, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (count := await asyncio.to_thread(ledger.count, chain)) < n:
        assert asyncio.get_running_loop().time() < deadline, f"{count} of {n} stored"
        await asyncio.sleep(0.2)


async def test_stored_once_confirmed_with_seq_and_hash(logger: Logger) -> None:
    acct = account()
    events = list(simulated_trades(60, acct, seed=7))
    bus, sender, pump = await connected(logger.broker)
    try:
        first = await sender.send(events, timeout=30)
        again = await sender.send(events[:10], timeout=30)
    finally:
        pump.cancel()
        await bus.close()
    assert all(isinstance(o, AcceptedEvent) and not o.duplicate for o in first)
    assert all(isinstance(o, AcceptedEvent) and o.duplicate for o in again)
    ledger = logger.ledger()
    chain = chain_for(acct)
    assert ledger.count(chain) == 60 and ledger.verify(chain).ok
    records = {r["data"]["event_id"]: r for r in ledger.records(chain)}
    for outcome in first:
        assert isinstance(outcome, AcceptedEvent)
        assert (records[outcome.event_id]["seq"], records[outcome.event_id]["hash"]) == \
            (outcome.seq, outcome.hash)
    stored = records[events[5].event_id]["data"]
    assert Decimal(stored["qty"]) == events[5].qty and stored["qty"] == format(events[5].qty, "f")


async def test_bad_events_go_to_dlq_and_are_refused_on_the_ack_topic(logger: Logger) -> None:
    acct = account()
    topic = str(registry.TRADE_EVENT.topic(account=acct))
    watch = await Collector.start(logger.broker, str(registry.DLQ.topic(service=NAME)),
                                  str(registry.TRADE_ACK.topic(account=acct)))
    tester = logger.broker.bus()
    await tester.connect()
    good = next(simulated_trades(1, acct, seed=1))
    foreign = good.model_copy(update={"account_id": "someone-else"})
    bad = json.loads(good.model_dump_json()) | {"qty": "-1", "event_id": "neg"}
    try:
        for payload in (foreign.model_dump_json().encode(), json.dumps(bad).encode(), b"\xff{"):
            await tester.publish(topic, payload, qos=1, wait=True)
        def letters(ms: list[Message]) -> list[DeadLetter]:
            return [DeadLetter.model_validate_json(m.payload) for m in ms if m.topic.startswith("circles/dlq")]

        def refused(ms: list[Message]) -> list[RejectedEvent]:
            return [r for m in ms if m.topic.endswith("/ack")
                    for r in TradeAck.model_validate_json(m.payload).rejected]

        await watch.wait(lambda ms: len(letters(ms)) >= 3 and len(refused(ms)) >= 3, 15,
                         "three dead letters and three refusals")
        reasons = sorted(letter.reason for letter in letters(watch.messages))
        assert any("account_id 'someone-else'" in r for r in reasons), reasons
        assert any("qty: Input should be greater than 0" in r for r in reasons), reasons
        assert any("UTF-8" in r for r in reasons), reasons
        assert {r.event_id for r in refused(watch.messages)} == {good.event_id, "neg", None}
        reply = await tester.request(NAME, "ping", timeout=10)
        assert reply.ok
    finally:
        await tester.close()
        await watch.close()
    assert logger.ledger().count(chain_for(acct)) == 0


async def test_metrics_retained_and_on_request(logger: Logger) -> None:
    acct = account()
    bus, sender, pump = await connected(logger.broker)
    watch = await Collector.start(logger.broker, str(registry.TRADE_METRICS.topic(account=acct)))
    try:
        await sender.send(list(simulated_trades(200, acct, seed=3)), timeout=30)
        published = await watch.wait(lambda ms: [TradeMetrics.model_validate_json(m.payload)
                                                 for m in ms] or None, 15, "metrics")
        assert published[-1].account == acct and 0 < published[-1].seq <= 200
        reply = await bus.request(NAME, "metrics", {"account": acct}, timeout=15)
        assert reply.ok, reply.error
        assert reply.result["fills"] == 199 and reply.result["deposits"] == 10000
        curve = await bus.request(NAME, "equity", {"account": acct, "max_points": 50}, timeout=15)
        assert curve.ok and 2 <= len(curve.result) <= 50
        assert curve.result[0]["equity"] == 10000
        missing = await bus.request(NAME, "metrics", {"account": "nobody-here"}, timeout=15)
        assert not missing.ok and "no trade events" in (missing.error or "")
    finally:
        pump.cancel()
        await bus.close()
        await watch.close()


@pytest.mark.slow
async def test_kill_9_mid_stream_keeps_exactly_every_event(logger: Logger) -> None:
    """20,000 QoS 1 events; the logger is killed while they stream in and started again:
    each event is in the chain exactly once and the chain verifies."""
    acct, n = account(), 20_000
    topic = str(registry.TRADE_EVENT.topic(account=acct))
    ledger, chain = logger.ledger(), chain_for(acct)
    tester = logger.broker.bus()
    await tester.connect()
    try:
        events = simulated_trades(n, acct, seed=11)
        for i, event in enumerate(events):
            await tester.publish(topic, event.model_dump_json().encode(), qos=1, wait=(i % 500 == 0))
            if i == 6000:
                await wait_for_count(ledger, chain, 1000, 60)
                logger.kill()
        await logger.start()
        await wait_for_count(ledger, chain, n, 180)
    finally:
        await tester.close()
    verdict = ledger.verify(chain)
    assert verdict.ok and verdict.records == n, verdict
    ids = [r["data"]["event_id"] for r in ledger.records(chain)]
    assert len(set(ids)) == n


@pytest.mark.slow
async def test_broker_restart_mid_stream_loses_and_doubles_nothing(own_broker: TestBroker,
                                                                  tmp_path: Path) -> None:
    logger = Logger(own_broker, tmp_path, f"sqlite:///{tmp_path / 'journal.db'}")
    await logger.start()
    acct, n = account(), 5000
    bus, sender, pump = await connected(own_broker)
    try:
        sending = asyncio.create_task(sender.send(list(simulated_trades(n, acct, seed=5)),
                                                  timeout=120))
        await wait_for_count(logger.ledger(), chain_for(acct), 1500, 60)
        await asyncio.to_thread(own_broker.restart)
        outcomes = await sending
    finally:
        pump.cancel()
        await bus.close()
        assert logger.proc
        logger.proc.stop()
    assert len(outcomes) == n and all(isinstance(o, AcceptedEvent) for o in outcomes)
    ledger = logger.ledger()
    verdict = ledger.verify(chain_for(acct))
    assert verdict.ok and verdict.records == n, verdict
    assert len({r["data"]["event_id"] for r in ledger.records(chain_for(acct))}) == n
