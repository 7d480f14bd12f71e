"""The execution service's durable state (tables of migration 0005), one transaction per step.

Every method is blocking: the service calls them in a thread. A step is one transaction
(`commit`): an intent with what it decided (the orders it made or cancelled and, on paper,
their fills); a fill with its order, its position and its trade event in the outbox. Only
this process writes these rows of its account, so the service may keep what it committed as
its in-memory view.

Rows are keyed by the account's slug (`main` for the account named `Main`); order rows read
back carry the account's name, as the payloads show it. A database that is locked or away
raises DatabaseUnavailable (a TemporaryError): the one place sqlalchemy's errors are known.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.exc import OperationalError as SqlOperationalError

from appliance.bus.payloads import utcnow
from appliance.bus.trade_event import TradeEvent
from appliance.bus.trading import OrderIntent
from appliance.errors import TemporaryError
from modules.trading.execution.orders import OPEN_STATUSES, Change, OrderRow, PositionRow, text

P = ParamSpec("P")
R = TypeVar("R")
metadata = MetaData()
intents = Table(
    "execution_intents", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account", String(64)), Column("key", String(64)), Column("symbol", String(64)),
    Column("bar_ts", String(40)), Column("status", String(16)), Column("reason", Text),
    Column("data", Text), Column("received_at", String(40)))
orders = Table(
    "execution_orders", metadata,
    Column("client_order_id", String(36), primary_key=True), Column("account", String(64)),
    Column("intent_key", String(64)), Column("kind", String(16)),
    Column("strategy_id", String(128)), Column("exchange", String(64)),
    Column("symbol", String(64)), Column("timeframe", String(8)), Column("side", String(4)),
    Column("qty", String(80)), Column("filled", String(80)), Column("avg_price", String(80)),
    Column("fee", String(80)), Column("fee_currency", String(32)), Column("fills", Integer),
    Column("status", String(16)), Column("reason", Text),
    Column("exchange_order_id", String(128)), Column("cancel_requested", Boolean),
    Column("fill_after", String(40)), Column("created_at", String(40)),
    Column("updated_at", String(40)))
positions = Table(
    "execution_positions", metadata,
    Column("account", String(64), primary_key=True), Column("symbol", String(64), primary_key=True),
    Column("exchange", String(64)), Column("qty", String(80)), Column("avg_price", String(80)),
    Column("strategy_id", String(128)), Column("updated_at", String(40)))
outbox = Table(
    "execution_outbox", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True), Column("account", String(64)),
    Column("source", String(16)), Column("event_id", String(128)),
    Column("client_order_id", String(36)), Column("data", Text), Column("delivered", Boolean),
    Column("outcome", Text), Column("created_at", String(40)), Column("delivered_at", String(40)))

# The statements of a commit, built once: the values come with each execution.
_INTENT_STATUS = select(intents.c.status).where(intents.c.account == bindparam("b_account"),
                                                intents.c.key == bindparam("b_key"))
_SETTLE_INTENT = update(intents).where(intents.c.account == bindparam("b_account"),
                                       intents.c.key == bindparam("b_key"))
_SAVE_ORDER = update(orders).where(orders.c.client_order_id == bindparam("b_id"))
_SAVE_POSITION = update(positions).where(positions.c.account == bindparam("b_account"),
                                         positions.c.symbol == bindparam("b_symbol"))


class DatabaseUnavailable(TemporaryError):
    """The database is locked or cannot be reached; the transaction was rolled back, so the
    call may be tried again."""


def _translated(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except SqlOperationalError as exc:
            raise DatabaseUnavailable(f"database unavailable: {exc.orig}") from exc
    return call


@dataclass(frozen=True)
class Pending:
    """A trade event in the outbox, not yet confirmed by the trade logger."""

    event_id: str
    source: str
    data: str


def _order_values(account: str, order: OrderRow) -> dict[str, Any]:
    return {
        "client_order_id": order.client_order_id, "account": account,
        "intent_key": order.intent_key, "kind": order.kind, "strategy_id": order.strategy_id,
        "exchange": order.exchange, "symbol": order.symbol, "timeframe": order.timeframe,
        "side": order.side, "qty": text(order.qty), "filled": text(order.filled),
        "avg_price": None if order.avg_price is None else text(order.avg_price),
        "fee": text(order.fee), "fee_currency": order.fee_currency, "fills": order.fills,
        "status": order.status, "reason": order.reason,
        "exchange_order_id": order.exchange_order_id,
        "cancel_requested": order.cancel_requested,
        "fill_after": order.fill_after.isoformat() if order.fill_after else None,
        "created_at": order.created_at, "updated_at": order.updated_at or order.created_at}


def _order(name: str, row: Any) -> OrderRow:
    return OrderRow(
        client_order_id=row.client_order_id, account=name, intent_key=row.intent_key,
        strategy_id=row.strategy_id, exchange=row.exchange, symbol=row.symbol, side=row.side,
        qty=Decimal(row.qty), status=row.status, kind=row.kind, filled=Decimal(row.filled),
        avg_price=None if row.avg_price is None else Decimal(row.avg_price),
        fee=Decimal(row.fee), fee_currency=row.fee_currency, fills=row.fills,
        reason=row.reason, exchange_order_id=row.exchange_order_id,
        cancel_requested=bool(row.cancel_requested),
        fill_after=datetime.fromisoformat(row.fill_after) if row.fill_after else None,
        timeframe=row.timeframe, created_at=row.created_at, updated_at=row.updated_at)


def _position(row: Any) -> PositionRow:
    return PositionRow(account=row.account, symbol=row.symbol, exchange=row.exchange,
                       qty=Decimal(row.qty), avg_price=Decimal(row.avg_price),
                       strategy_id=row.strategy_id, updated_at=row.updated_at)


class ExecutionStore:
    """The rows of one account: `account` its slug (the key of every row), `name` as
    configured (default: the slug)."""

    def __init__(self, engine: Engine, account: str, name: str | None = None) -> None:
        self.engine = engine
        self.account = account
        self.name = name or account
        # Order rows written before they were keyed by the slug carry the name.
        self._mine = orders.c.account.in_(sorted({account, self.name}))

    # -- reading ----------------------------------------------------------------------------
    @_translated
    def open_orders(self) -> list[OrderRow]:
        """Orders still new, open or partially filled, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(orders).where(self._mine, orders.c.status.in_(OPEN_STATUSES))
                                .order_by(orders.c.created_at, orders.c.client_order_id))
            return [_order(self.name, r) for r in rows]

    @_translated
    def recent_orders(self, limit: int) -> list[OrderRow]:
        """The last `limit` orders of any status, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(orders).where(self._mine)
                                .order_by(orders.c.created_at.desc(),
                                          orders.c.client_order_id.desc()).limit(limit))
            return [_order(self.name, r) for r in rows]

    @_translated
    def order(self, client_order_id: str) -> OrderRow | None:
        """The order of that id, of any account (ids are derived from the account)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(orders).where(
                orders.c.client_order_id == client_order_id)).first()
            return _order(self.name, row) if row is not None else None

    @_translated
    def positions(self) -> dict[str, PositionRow]:
        """Every position of the account by symbol, flat ones included."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(positions).where(positions.c.account == self.account))
            return {r.symbol: _position(r) for r in rows}

    @_translated
    def waiting_intents(self) -> list[OrderIntent]:
        """Intents that arrived before the halt state was known, in arrival order."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(intents.c.data).where(
                intents.c.account == self.account, intents.c.status == "waiting")
                .order_by(intents.c.id))
            return [OrderIntent.model_validate_json(r.data) for r in rows]

    @_translated
    def undelivered(self, limit: int = 1000) -> list[Pending]:
        """Trade events the trade logger has not confirmed yet, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(outbox.c.event_id, outbox.c.source, outbox.c.data).where(
                outbox.c.account == self.account, outbox.c.delivered.is_(False))
                .order_by(outbox.c.id).limit(limit))
            return [Pending(r.event_id, r.source, r.data) for r in rows]

    @_translated
    def has_event(self, source: str, event_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(outbox.c.id).where(
                outbox.c.account == self.account, outbox.c.source == source,
                outbox.c.event_id == event_id)).first() is not None

    # -- writing ----------------------------------------------------------------------------
    @_translated
    def commit(self, change: Change) -> bool:
        """Write `change` whole, in one transaction: its intent with the outcome, the orders
        it makes (inserted) and changes (updated), the positions, and the trade events into
        the outbox (undelivered). False, and nothing written, when an intent of the same key
        was decided before; an intent that was `waiting` is settled instead."""
        with self.engine.begin() as conn:
            if change.intent is not None and not self._record_intent(
                    conn, change.intent, change.outcome, change.reason):
                return False
            made, saved = [], []
            for order in change.orders.values():
                values = _order_values(self.account, order)
                if order.client_order_id in change.made:
                    made.append(values)
                else:
                    values["b_id"] = values.pop("client_order_id")
                    saved.append(values)
            if made:
                conn.execute(insert(orders), made)
            if saved:
                conn.execute(_SAVE_ORDER, saved)
            for position in change.positions.values():
                self._save_position(conn, position)
            if change.events:
                conn.execute(insert(outbox), [self._event_row(e) for e in change.events])
        return True

    def _record_intent(self, conn: Connection, intent: OrderIntent, status: str,
                       reason: str) -> bool:
        which = {"b_account": self.account, "b_key": intent.key}
        row = conn.execute(_INTENT_STATUS, which).first()
        if row is not None and row.status != "waiting":
            return False
        if row is None:
            conn.execute(insert(intents), {
                "account": self.account, "key": intent.key, "symbol": intent.symbol,
                "bar_ts": intent.bar_ts.isoformat(), "data": intent.model_dump_json(),
                "received_at": utcnow(), "status": status, "reason": reason})
        else:
            conn.execute(_SETTLE_INTENT, {**which, "status": status, "reason": reason})
        return True

    def _save_position(self, conn: Connection, position: PositionRow) -> None:
        values = {"exchange": position.exchange, "qty": text(position.qty),
                  "avg_price": text(position.avg_price), "strategy_id": position.strategy_id,
                  "updated_at": position.updated_at or utcnow()}
        done = conn.execute(_SAVE_POSITION, {
            "b_account": self.account, "b_symbol": position.symbol, **values})
        if not done.rowcount:
            conn.execute(insert(positions), {"account": self.account,
                                             "symbol": position.symbol, **values})

    @_translated
    def add_event(self, event: TradeEvent) -> bool:
        """Put an event without an order (the paper deposit) in the outbox; False when one of
        the same id is there already."""
        with self.engine.begin() as conn:
            found = conn.execute(select(outbox.c.id).where(
                outbox.c.account == self.account, outbox.c.source == event.source,
                outbox.c.event_id == event.event_id)).first()
            if found is None:
                conn.execute(insert(outbox), self._event_row(event))
        return found is None

    def _event_row(self, event: TradeEvent) -> dict[str, Any]:
        return {"account": self.account, "source": event.source, "event_id": event.event_id,
                "client_order_id": event.order_id, "data": event.model_dump_json(),
                "delivered": False, "outcome": None, "created_at": utcnow(),
                "delivered_at": None}

    @_translated
    def mark_delivered(self, outcomes: dict[tuple[str, str], str]) -> int:
        """Mark events confirmed by the trade logger ((source, event_id) → outcome); returns
        how many were still undelivered."""
        now, marked = utcnow(), 0
        with self.engine.begin() as conn:
            for (source, event_id), outcome in outcomes.items():
                done = conn.execute(update(outbox).where(
                    outbox.c.account == self.account, outbox.c.source == source,
                    outbox.c.event_id == event_id, outbox.c.delivered.is_(False))
                    .values(delivered=True, outcome=outcome, delivered_at=now))
                marked += done.rowcount
        return marked
