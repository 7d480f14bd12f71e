"""Orders and positions as the execution service keeps them, the arithmetic of a fill, and
the change one step makes to them.

Pure: no database, no bus. Quantities are signed where a position is meant (negative is
short) and unsigned on an order (its `side` gives the direction). Everything is `Decimal`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Context, Decimal
from typing import Literal

from appliance.bus.payloads import utcnow
from appliance.bus.trade_event import TradeEvent
from appliance.bus.trading import Order, OrderIntent, OrderStatus, Side

ZERO = Decimal(0)
OPEN_STATUSES: tuple[OrderStatus, ...] = ("new", "open", "partial")
Kind = Literal["intent", "flatten"]
PLACES = 18  # decimals kept of a price, quantity or fee (a TRADE_EVENT holds up to 30)
_WIDE = Context(prec=80)  # quantizing a large number to 18 places needs more than 28 digits
_CLIENT_ORDER_ID = re.compile(r"c[0-9a-f]{20}(-[0-9]+)?")


def rounded(value: Decimal, *, down: bool = False) -> Decimal:
    """`value` with at most PLACES decimals (rounded half-even, or down for a quantity that
    must not exceed what is available)."""
    return value.quantize(Decimal(1).scaleb(-PLACES), ROUND_DOWN if down else ROUND_HALF_EVEN,
                          context=_WIDE)


def text(value: Decimal) -> str:
    """A decimal as stored: plain notation, no trailing zeros after the point."""
    plain = format(value, "f")
    return plain.rstrip("0").rstrip(".") if "." in plain else plain


def client_order_id(account: str, intent_key: str, n: int = 0) -> str:
    """The client order id of the `n`-th order made for an intent: `c` + 20 hex digits of
    SHA-256(account|key), `-n` for n > 0. Deterministic, so a re-handled intent names the
    same order; at most 36 characters of `[A-Za-z0-9_-]`, as Binance (and ccxt) allow."""
    digest = hashlib.sha256(f"{account}|{intent_key}".encode()).hexdigest()[:20]
    return f"c{digest}" if n == 0 else f"c{digest}-{n}"


def is_client_order_id(value: str) -> bool:
    """Whether `value` has the form of `client_order_id`'s ids (an order Circles made)."""
    return _CLIENT_ORDER_ID.fullmatch(value) is not None


def fill_event_id(client_order_id: str, n: int) -> str:
    """The TRADE_EVENT id of an order's `n`-th fill (from 1)."""
    return f"{client_order_id}-f{n}"


def signed(side: Side, qty: Decimal) -> Decimal:
    return qty if side == "buy" else -qty


def base_currency(symbol: str) -> str:
    """`BTC` of `BTC/USDT` (and of `BTC/USDT:USDT`)."""
    return symbol.split("/")[0].split(":")[0]


@dataclass(frozen=True)
class OrderRow:
    client_order_id: str
    account: str
    intent_key: str
    strategy_id: str
    exchange: str
    symbol: str
    side: Side
    qty: Decimal
    status: OrderStatus
    kind: Kind = "intent"
    filled: Decimal = ZERO
    avg_price: Decimal | None = None
    fee: Decimal = ZERO
    fee_currency: str | None = None
    fills: int = 0
    reason: str = ""
    exchange_order_id: str | None = None
    cancel_requested: bool = False
    # Paper: bars with an open time after this one may fill the order.
    fill_after: datetime | None = None
    timeframe: str | None = None
    created_at: str = ""
    updated_at: str = ""

    @property
    def remaining(self) -> Decimal:
        return self.qty - self.filled

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def signed_remaining(self) -> Decimal:
        return signed(self.side, self.remaining) if self.is_open else ZERO

    def changed(self, **changes: object) -> OrderRow:
        return replace(self, **changes, updated_at=utcnow())  # type: ignore[arg-type]

    def payload(self) -> Order:
        return Order(client_order_id=self.client_order_id, intent_key=self.intent_key,
                     account=self.account, exchange=self.exchange, symbol=self.symbol,
                     side=self.side, qty=self.qty, filled=self.filled, avg_price=self.avg_price,
                     status=self.status, reason=self.reason,
                     exchange_order_id=self.exchange_order_id, created_at=self.created_at,
                     updated_at=self.updated_at or self.created_at)


@dataclass(frozen=True)
class PositionRow:
    account: str
    symbol: str
    exchange: str
    qty: Decimal = ZERO
    avg_price: Decimal = ZERO
    strategy_id: str = "default"  # of the last order that traded it: a flatten closes it there
    updated_at: str = ""


@dataclass(frozen=True)
class Fill:
    """One execution of (part of) an order: the quantity of this fill alone, its price, and
    its fee (in `fee_currency`)."""

    qty: Decimal
    price: Decimal
    fee: Decimal
    fee_currency: str | None
    ts: datetime


def after_fill(order: OrderRow, fill: Fill, *, status: OrderStatus | None = None,
               fill_after: datetime | None = None) -> OrderRow:
    """The order once `fill` is added: filled, average price, fees, count, status."""
    filled = order.filled + fill.qty
    avg = fill.price if order.avg_price is None or not order.filled else \
        rounded((order.avg_price * order.filled + fill.price * fill.qty) / filled)
    return order.changed(
        filled=filled, avg_price=avg, fee=order.fee + fill.fee,
        fee_currency=fill.fee_currency or order.fee_currency, fills=order.fills + 1,
        status=status or ("filled" if filled >= order.qty else "partial"),
        fill_after=fill_after if fill_after is not None else order.fill_after)


def position_after(position: PositionRow, order: OrderRow, fill: Fill) -> PositionRow:
    """The position once `fill` of `order` is added. The average price is that of the open
    quantity: it moves when the position grows, stays when it shrinks, and restarts at the
    fill's price when the position crosses zero. A fee paid in the symbol's base currency
    (spot exchanges take a buyer's fee from what was bought) reduces the quantity held."""
    delta = signed(order.side, fill.qty)
    if fill.fee_currency and fill.fee_currency == base_currency(order.symbol):
        delta -= fill.fee
    old, new = position.qty, position.qty + delta
    if not new:
        avg = ZERO
    elif not old or (old > 0) != (new > 0):
        avg = fill.price
    elif abs(new) > abs(old):
        avg = rounded((position.avg_price * abs(old) + fill.price * (abs(new) - abs(old)))
                      / abs(new))
    else:
        avg = position.avg_price
    return replace(position, qty=new, avg_price=avg, strategy_id=order.strategy_id,
                   exchange=order.exchange, updated_at=utcnow())


def fill_event(order: OrderRow, fill: Fill, n: int, source: Literal["paper", "ccxt"]) -> TradeEvent:
    """The TRADE_EVENT of `order`'s `n`-th fill."""
    return TradeEvent(event_id=fill_event_id(order.client_order_id, n), source=source,
                      account_id=order.account, strategy_id=order.strategy_id,
                      symbol=order.symbol, side=order.side, qty=fill.qty, price=fill.price,
                      fee=fill.fee, fee_currency=fill.fee_currency, ts=fill.ts,
                      order_id=order.client_order_id,
                      extra={"intent_key": order.intent_key, "exchange": order.exchange})


@dataclass
class Change:
    """What one step does, planned before anything is written: the intent it decides (with
    its outcome), the orders it makes or changes, the positions and the trade events of its
    fills. The store writes it in one transaction; then the service takes it into its view
    and publishes it."""

    intent: OrderIntent | None = None
    outcome: str = ""  # the intent's status: waiting, ordered, refused or noop
    reason: str = ""
    orders: dict[str, OrderRow] = field(default_factory=dict)  # by id, as the step leaves them
    made: set[str] = field(default_factory=set)  # the ids of those it makes
    positions: dict[str, PositionRow] = field(default_factory=dict)  # by symbol
    events: list[TradeEvent] = field(default_factory=list)

    def put(self, order: OrderRow, *, new: bool = False) -> OrderRow:
        """`order` as this step leaves it (`new`: made by it)."""
        self.orders[order.client_order_id] = order
        if new:
            self.made.add(order.client_order_id)
        return order

    def fill(self, order: OrderRow, fill: Fill, position: PositionRow,
             source: Literal["paper", "ccxt"], *, status: OrderStatus | None = None,
             fill_after: datetime | None = None) -> OrderRow:
        """Add `fill` of `order` (the position before it is this step's, or `position`):
        the order's next state, the position's, and the trade event; the order returned."""
        after = self.put(after_fill(order, fill, status=status, fill_after=fill_after))
        held = self.positions.get(order.symbol, position)
        self.positions[order.symbol] = position_after(held, after, fill)
        self.events.append(fill_event(after, fill, after.fills, source))
        return after
