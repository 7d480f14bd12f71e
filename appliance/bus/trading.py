"""Payloads of the trading pipeline (docs/trading.md): bars, signals, targets, order intents,
positions and orders. Each layer publishes one of these and reads the one before it.

Market data and model outputs are floats (statistics); what becomes money — quantities and
prices of intents, orders, positions — is `Decimal`, as in a TRADE_EVENT.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal

from pydantic import AwareDatetime, Field, field_validator, model_validator

from appliance.bus.payloads import Payload, utcnow
from appliance.bus.topics import slug
from appliance.errors import ValidationFailed

TIMEFRAMES: dict[str, int] = {
    "1m": 60, "3m": 180, "5m": 300, "15m": 900, "30m": 1800,
    "1h": 3600, "2h": 7200, "4h": 14400, "6h": 21600, "12h": 43200, "1d": 86400,
}
Timeframe = Literal["1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "12h", "1d"]
Side = Literal["buy", "sell"]
Money = Field(max_digits=40, decimal_places=18)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


class Bar(Payload):
    """One closed OHLCV bar; `ts` is the bar's open time. `gap` counts the bars missing
    between the previous bar of this feed and this one (0 when none)."""

    exchange: str = Field(min_length=1, max_length=64)
    symbol: str = Field(min_length=1, max_length=64)
    timeframe: Timeframe
    ts: AwareDatetime
    open: float = Field(gt=0)
    high: float = Field(gt=0)
    low: float = Field(gt=0)
    close: float = Field(gt=0)
    volume: float = Field(ge=0)
    gap: int = Field(0, ge=0)

    @field_validator("ts")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        return _utc(value)

    @model_validator(mode="after")
    def _consistent(self) -> Bar:
        if not self.low <= min(self.open, self.close) <= max(self.open, self.close) <= self.high:
            raise ValueError("a bar needs low <= open, close <= high")
        return self

    @property
    def close_time(self) -> datetime:
        return self.ts + timedelta(seconds=TIMEFRAMES[self.timeframe])

    @property
    def feed(self) -> tuple[str, str, str]:
        return self.exchange, self.symbol, self.timeframe

    def topic_values(self) -> dict[str, str]:
        """The topic levels of this bar's feed (`exchange`, `symbol`, `timeframe`)."""
        return {"exchange": self.exchange, "symbol": self.symbol, "timeframe": self.timeframe}


def check_feed(params: dict[str, str], bar: Bar) -> None:
    """ValidationFailed unless the topic a message came on names the feed of the bar it
    carries: the topic is the publisher's identity, the payload only a claim."""
    if any(params.get(level) != slug(value) for level, value in bar.topic_values().items()):
        raise ValidationFailed(f"the bar is of {bar.exchange} {bar.symbol} {bar.timeframe}, "
                               "not the feed of its topic")


class FeedState(Payload):
    """Retained per feed: is the data current? `stale` when no new bar came within the
    configured number of timeframes; `gaps` counts missing bars since the service started.
    `live` is false for a replay: its bars carry old times, so the wall clock says nothing
    about its staleness. An empty retained payload on the topic says the feed is gone."""

    exchange: str
    symbol: str
    timeframe: Timeframe
    last_bar_ts: AwareDatetime | None = None
    stale: bool = False
    live: bool = True
    gaps: int = 0
    reason: str = ""
    ts: str = Field(default_factory=utcnow)


class ModelSignal(Payload):
    model: str = Field(min_length=1, max_length=64)
    value: float = Field(ge=-1, le=1)
    confidence: float = Field(ge=0, le=1)


class Signals(Payload):
    """Every model's signal for one bar; the bar travels along, so the next layers need
    no second subscription."""

    bar: Bar
    signals: list[ModelSignal]


class Target(Payload):
    """The ensemble's target exposure for one symbol after one bar: -1 (all short) … 1 (all
    long), as a fraction of what sizing may commit. `weights` are the weights used."""

    bar: Bar
    exposure: float = Field(ge=-1, le=1)
    weights: dict[str, float] = {}


class OrderIntent(Payload):
    """Sizing's wish: hold `target_qty` (signed; negative is short) of `symbol` in
    `account`. Execution orders the difference to what it holds and has in flight, so
    an intent handled twice orders nothing the second time. `key` is the idempotency key
    (client order ids are derived from it)."""

    key: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    account: str = Field(min_length=1, max_length=64)
    strategy_id: str = Field("ensemble", min_length=1, max_length=64)
    exchange: str
    symbol: str
    target_qty: Decimal = Money
    price: Decimal = Field(gt=0, max_digits=40, decimal_places=18,
                           description="the price sizing used (the bar's close)")
    bar_ts: AwareDatetime
    timeframe: Timeframe | None = Field(None, description="the timeframe of the intent's bar")
    reason: str = ""
    ts: str = Field(default_factory=utcnow)

    @field_validator("bar_ts")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        return _utc(value)


OrderStatus = Literal["new", "open", "partial", "filled", "cancelled", "rejected"]


class Order(Payload):
    """One order of the execution service, as it stands."""

    client_order_id: str
    intent_key: str
    account: str
    exchange: str
    symbol: str
    side: Side
    qty: Decimal
    filled: Decimal = Decimal(0)
    avg_price: Decimal | None = None
    status: OrderStatus
    reason: str = ""
    exchange_order_id: str | None = None
    created_at: str
    updated_at: str = Field(default_factory=utcnow)


class Orders(Payload):
    """Retained: the account's open orders."""

    account: str
    mode: Literal["paper", "live"]
    orders: list[Order]
    ts: str = Field(default_factory=utcnow)


class Position(Payload):
    symbol: str
    qty: Decimal
    avg_price: Decimal
    last_price: Decimal | None = None
    unrealized_pnl: Decimal | None = None


class Positions(Payload):
    """Retained: the account's open positions, marked to the last price seen."""

    account: str
    mode: Literal["paper", "live"]
    positions: list[Position]
    ts: str = Field(default_factory=utcnow)


class RiskState(Payload):
    """Retained by the risk service: the figures it watches against their limits, and
    the breaches it found (empty when all is well)."""

    halted: bool
    breaches: list[str]
    figures: dict[str, float | None]
    limits: dict[str, float | None]
    ts: str = Field(default_factory=utcnow)
