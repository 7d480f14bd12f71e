"""TRADE_EVENT v1: what is accepted, what is refused and why, and that numbers stay exact."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from appliance.bus import registry
from appliance.bus.trade_event import MAX_EVENT_BYTES, TradeEvent, chain_for
from appliance.errors import ValidationFailed
from appliance.ledger_verify import canonical


def event(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"event_id": "deal-1", "source": "mt5", "account_id": "Main #1",
                           "strategy_id": "ea-1", "symbol": "#US30", "side": "buy",
                           "qty": "0.10", "price": "38000.5", "fee": "0.7",
                           "fee_currency": "USD", "ts": "2026-01-02T03:04:05.123Z",
                           "order_id": "o-1", "position_id": "p-1"}
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not ...}


def decode(doc: Any) -> TradeEvent:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    result: TradeEvent = registry.TRADE_EVENT.decode(raw)
    return result


def test_a_valid_event_is_kept_exactly() -> None:
    raw = (b'{"event_id":"1","source":"sim","account_id":"demo","symbol":"BTC/USDT","side":"sell",'
           b'"qty":0.1000,"price":64000.10,"fee":1E-2,"ts":"2026-01-02T05:04:05+02:00"}')
    e = decode(raw)
    assert e.qty == Decimal("0.1000") and e.price == Decimal("64000.10")
    assert e.ts == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC) and e.kind == "fill"
    stored = canonical(e.stored()).decode()
    assert '"qty":"0.1000"' in stored and '"price":"64000.10"' in stored and '"fee":"0.01"' in stored
    assert '"ts":"2026-01-02T03:04:05.000000Z"' in stored


def test_identity_and_chain() -> None:
    e = decode(event())
    assert e.account == "main-1" and chain_for(e.account_id) == "trade:main-1"
    assert e.key == "mt5|main-1|deal-1"


def test_cash_flows_need_no_side_or_price() -> None:
    e = decode(event(kind="deposit", side=..., price=..., symbol="USD", qty="5000"))
    assert e.price == 1 and e.side is None


@pytest.mark.parametrize("changes,reason", [
    ({"qty": "NaN"}, "qty"),
    ({"price": "Infinity"}, "price"),
    ({"qty": "0"}, "greater than 0"),
    ({"price": "-1"}, "greater than 0"),
    ({"fee": "-0.01"}, "greater than or equal to 0"),
    ({"qty": "1e400"}, "qty: Decimal input should have no more than 60 digits"),
    ({"price": "1e-31"}, "price: Decimal input should have no more than 30 decimal places"),
    ({"side": "hold"}, "side"),
    ({"side": ...}, "needs a side"),
    ({"kind": "dividend"}, "kind"),
    ({"source": "excel"}, "source"),
    ({"event_id": ...}, "event_id: Field required"),
    ({"ts": ...}, "ts: Field required"),
    ({"ts": "2026-01-02T03:04:05"}, "ts: Input should have timezone info"),
    ({"ts": (datetime.now(UTC) + timedelta(hours=6)).isoformat()}, "future"),
    ({"extra": {"x": {"y": {"z": {"a": {"b": {"c": {"d": {"e": {"f": {}}}}}}}}}}}, "nested"),
    ({"unknown": 1}, "unknown: Extra inputs are not permitted"),
    ({"qty": True}, "qty"),
    ({"fee": "0E-10000000"}, "fee: 0E-10000000 has more than 30 decimal places"),
    ({"realized_pnl": "-0E-999"}, "realized_pnl"),
    ({"ts": "0001-01-01T00:00:00+01:00"}, "out of range in UTC"),
])
def test_refused_with_a_reason(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationFailed, match=reason):
        decode(event(**changes))


def test_near_future_is_fine_but_not_far() -> None:
    decode(event(ts=(datetime.now(UTC) + timedelta(minutes=4)).isoformat()))


@pytest.mark.parametrize("raw,reason", [
    (b'{"qty": NaN}', "invalid JSON"),
    (b"[]", "JSON object"),
    (b"\xff", "UTF-8"),
    (b"[" * 10_000, "nested too deeply"),
    (json.dumps(event(extra={"pad": "x" * MAX_EVENT_BYTES})).encode(), "exceeds"),
    (json.dumps(event(extra={"z": "@"})).encode().replace(b'"@"', b"0E-99999"), "extra.z"),
])
def test_refused_payloads(raw: bytes, reason: str) -> None:
    with pytest.raises(ValidationFailed, match=reason):
        decode(raw)


def test_json_numbers_never_pass_through_a_float() -> None:
    e = decode(b'{"event_id":"1","source":"sim","account_id":"a","symbol":"X","side":"buy",'
               b'"qty":0.30000000000000000001,"price":1,"ts":"2026-01-01T00:00:00Z",'
               b'"extra":{"px":0.1}}')
    assert e.qty == Decimal("0.30000000000000000001")
    assert canonical(e.stored()).count(b'"0.1"') == 1
