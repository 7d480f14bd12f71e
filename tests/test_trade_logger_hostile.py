"""Thousands of malformed or hostile TRADE_EVENT payloads against the running trade logger:
every one lands in the dead-letter topic with a reason, the service stays up, and the
ledger does not change."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.bus import registry
from appliance.bus.payloads import DeadLetter
from appliance.bus.trade_event import MAX_EVENT_BYTES, chain_for
from appliance.simulate import simulated_trades
from tests.helpers import Collector, TestBroker
from tests.test_trade_logger import NAME, Logger

REQUIRED = ["event_id", "source", "account_id", "symbol", "side", "qty", "ts"]
SCALARS = ["event_id", "source", "account_id", "strategy_id", "symbol", "side", "qty", "price",
           "fee", "ts", "kind"]


def hostile(account: str) -> st.SearchStrategy[bytes]:
    """Payloads that are each wrong in at least one way the model must refuse."""
    fill = list(simulated_trades(2, account, seed=1))[1]  # the first one is a deposit
    good: dict[str, Any] = json.loads(fill.model_dump_json())

    def with_(key: str, value: Any) -> bytes:
        return json.dumps(good | {key: value}).encode()

    def without(key: str) -> bytes:
        return json.dumps({k: v for k, v in good.items() if k != key}).encode()

    def nested(depth: int) -> bytes:
        return json.dumps(good | {"extra": 0}).encode().replace(
            b'"extra": 0', b'"extra": {"a": ' + b"[" * depth + b"]" * depth + b"}")

    def bad_utf8(byte: int) -> bytes:  # a continuation byte with no lead byte
        raw = json.dumps(good).encode()
        at = raw.index(b'"symbol": "') + 11
        return raw[:at] + bytes([byte]) + raw[at:]

    containers = st.one_of(st.lists(st.integers(), max_size=3),
                           st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                               lambda inner: st.lists(inner, max_size=4), max_leaves=10)
    return st.one_of(
        st.sampled_from(REQUIRED).map(without),
        st.tuples(st.sampled_from(SCALARS), containers).map(lambda kv: with_(*kv)),
        st.tuples(st.sampled_from(["qty", "price"]),
                  st.sampled_from(["0", "-1", "NaN", "Infinity", "-Infinity", "1e31", "1e-40"]))
        .map(lambda kv: with_(*kv)),
        st.sampled_from(["-0.01", "NaN", "1e99", "0E-1000000"]).map(lambda v: with_("fee", v)),
        st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
        .map(lambda ts: with_("ts", ts)),
        st.integers(4400, 9000).map(lambda n: with_("qty", 0).replace(b'"qty": 0', b'"qty": 1' + b"0" * n)),
        st.integers(9, 3000).map(nested),
        st.integers(0x80, 0xBF).map(bad_utf8),
        st.text(min_size=1, max_size=8).map(lambda s: with_("side", "x" + s)),
        st.sampled_from(["2999-01-01T00:00:00Z", "2026-01-01T00:00:00", "yesterday", ""])
        .map(lambda ts: with_("ts", ts)),
        st.just(with_("account_id", "another-account")),
        st.just(with_("extra", {"pad": "x" * MAX_EVENT_BYTES})),
        json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=64).map(lambda b: b"\xff" + b),
        st.binary(max_size=64).map(lambda b: b"{" + b),
    )


@pytest.fixture(scope="module")
def running(broker: TestBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logger]:
    tmp: Path = tmp_path_factory.mktemp("hostile")
    logger = Logger(broker, tmp, f"sqlite:///{tmp / 'journal.db'}")
    asyncio.run(logger.start())
    yield logger
    assert logger.proc
    logger.proc.stop()


async def publish_and_collect(logger: Logger, account: str, payloads: list[bytes]) -> list[DeadLetter]:
    topic = str(registry.TRADE_EVENT.topic(account=account))
    watch = await Collector.start(logger.broker, str(registry.DLQ.topic(service=NAME)))
    tester = logger.broker.bus()
    await tester.connect()
    try:
        for payload in payloads:
            await tester.publish(topic, payload, qos=1)
        await tester.publish(topic, b"", qos=1, wait=True)  # one more (empty) and wait for it

        def mine(ms: list[Any]) -> list[DeadLetter]:
            letters = (DeadLetter.model_validate_json(m.payload) for m in ms)
            return [letter for letter in letters if letter.topic == topic]

        letters = await watch.wait(lambda ms: mine(ms) if len(mine(ms)) > len(payloads) else None,
                                   60, f"{len(payloads) + 1} dead letters")
        assert (await tester.request(NAME, "ping", timeout=10)).ok
        return letters
    finally:
        await tester.close()
        await watch.close()


ACCOUNT = f"fuzz-{uuid.uuid4().hex[:6]}"


@settings(max_examples=10, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(payloads=st.lists(hostile(ACCOUNT), min_size=150, max_size=300))
def test_every_hostile_payload_is_a_dead_letter_with_a_reason(running: Logger,
                                                               payloads: list[bytes]) -> None:
    letters = asyncio.run(publish_and_collect(running, ACCOUNT, payloads))
    assert len(letters) == len(payloads) + 1
    assert all(letter.reason for letter in letters)
    assert running.proc and running.proc.process.poll() is None
    assert running.ledger().count(chain_for(ACCOUNT)) == 0
