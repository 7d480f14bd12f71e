"""The `execution` service (L4): order intents become orders, orders become fills, fills become
TRADE_EVENTs that are kept until the trade logger confirms them.

An intent is a target position: the service orders `target − (position + what open orders
still have to fill)`, so an intent handled twice orders nothing the second time; intents are
also deduplicated by key in the transaction that records them. Every step is planned first
(`Change`: the intent's outcome, the orders it makes or cancels, the fills of the bars already
seen), then committed as one database transaction before the message that caused it is
acknowledged, then published: its trade events first, from an outbox they leave only when
the trade logger confirmed them. A process killed at any point loses no fill and sends no
order twice.

Paper trading (the default) fills on the bars it sees (`paper.py`); live trading sends
orders to an exchange (`live.py`), only with `mode = "live"` and `live_confirmed = true`.
Trading obeys the retained halt: until it has been seen, nothing is sent and intents wait
(at most `halt_wait_s` after start, then they are refused); while halted, intents are
refused and open orders cancelled; a flatten still closes positions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from sqlalchemy.exc import OperationalError as DatabaseUnavailable

from appliance.bus import registry
from appliance.bus.base import Bus
from appliance.bus.message import Received
from appliance.bus.payloads import CommandRequest, TradingHalt
from appliance.bus.topics import slug
from appliance.bus.trade_event import TradeEvent
from appliance.bus.trading import TIMEFRAMES, Bar, OrderIntent, Orders, OrderStatus, Position, Positions
from appliance.config import CoreSettings
from appliance.db import open_database
from appliance.errors import CirclesError, OperationalError, TemporaryError, ValidationFailed
from appliance.runtime import Service, subscribe
from modules.trading.execution.orders import (
    ZERO,
    Change,
    Fill,
    OrderRow,
    PositionRow,
    client_order_id,
    signed,
)
from modules.trading.execution.outbox import Outbox
from modules.trading.execution.paper import BarMemory, PaperModel, decimal
from modules.trading.execution.settings import ExecutionSettings
from modules.trading.execution.store import ExecutionStore

if TYPE_CHECKING:
    from modules.trading.exchange import Exchange, ExchangeOrder

log = logging.getLogger("circles.execution")
T = TypeVar("T")
DEPOSIT_ID = "paper-start"
TICK_S = 0.5  # the run loop's turn: resends, live sends, the halt wait, position marks
MAX_PAUSE_S = 60.0  # the longest the live path waits after the exchange failed
DB_PATIENCE_S = 60.0  # then the step fails (its message goes to the dead letters)


class ExecutionService(Service):
    name = "execution"
    Settings = ExecutionSettings

    def __init__(self, settings: CoreSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        self.account = slug(self.config.account)
        # The account is a setting, so the subscriptions for it are narrowed per instance.
        self._handlers = [  # type: ignore[misc]
            (spec, {"account": self.account} if "account" in spec.params else params, batch, attr)
            for spec, params, batch, attr in type(self)._handlers]

    # -- start and stop -----------------------------------------------------------------------
    async def start(self) -> None:
        c: ExecutionSettings = self.config
        self.live = c.mode == "live"
        self.source: Literal["paper", "ccxt"] = "ccxt" if self.live else "paper"
        self.model = PaperModel(c.slippage_bps, c.fee_bps, c.fill_at, c.max_volume_fraction,
                                c.quote_currency, c.min_qty)
        self.bars = BarMemory(keep=c.max_intent_age_bars + 3)
        self.lock = asyncio.Lock()  # one change of orders and positions at a time
        self.halt: TradingHalt | None = None  # None: not seen yet
        self.started = time.monotonic()
        self.wake = asyncio.Event()  # live: an order waits to be sent or cancelled
        self.marked: dict[str, datetime] = {}  # symbol → bar of the last published mark
        self.positions_at = 0.0
        self.positions_dirty = True
        self.discrepancies: list[dict[str, str]] = []
        self.confirmed: dict[tuple[str, str], str] = {}  # by the trade logger, not yet marked
        self.exchange: Exchange | None = None
        self.absent: set[str] = set()  # live: new orders known not to be at the exchange
        self.reconciled = False  # live: orders and balances compared with the exchange's
        self.pause_until = 0.0  # live: no exchange call before this (it just failed)
        self.failures = 0
        self.credentials: tuple[str, str] | None = None
        if self.live:  # paper never touches the secret store
            from modules.trading.execution.live import credentials

            self.credentials = await asyncio.to_thread(credentials, self.account,
                                                       self.settings.state_dir)
        engine = await asyncio.to_thread(open_database, self.settings)
        self.store = ExecutionStore(engine, self.account)
        self.outbox = Outbox(self.bus, self.account, c.resend_after_s)
        self.open = {o.client_order_id: o for o in await self._db(self.store.open_orders)}
        self.positions = await self._db(self.store.positions)
        self.waiting = bool(await self._db(self.store.waiting_intents))
        self.deposited = self.live or not c.starting_balance or await self._db(
            self.store.has_event, "paper", DEPOSIT_ID)
        log.info("execution ready", extra={"mode": c.mode, "account": c.account,
                                           "open_orders": len(self.open),
                                           "positions": sum(1 for p in self.positions.values()
                                                            if p.qty)})

    async def stop(self) -> None:
        if self.exchange is not None:
            await self.exchange.close()

    async def _db(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` in a thread; a database that is locked or away is waited for (the
        transaction was rolled back, so trying again is safe), up to DB_PATIENCE_S."""
        delay, waited = 0.1, 0.0
        while True:
            try:
                return await asyncio.to_thread(call, *args)
            except DatabaseUnavailable as exc:
                if waited >= DB_PATIENCE_S:
                    raise TemporaryError(f"database unavailable: {exc.orig}") from exc
                log.warning("database unavailable, retrying", extra={
                    "error": str(exc.orig), "retry_in_s": delay})
                await asyncio.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)

    # -- the halt -----------------------------------------------------------------------------
    @subscribe(registry.TRADING_HALT)
    async def on_halt(self, msg: Received) -> None:
        halt: TradingHalt = msg.data
        async with self.lock:
            before, self.halt = self.halt, halt
            if before is None or before.halted != halt.halted:
                log.warning("trading halted" if halt.halted else "trading allowed",
                            extra={"by": halt.by, "reason": halt.reason})
            if halt.halted:
                change = Change()
                self._cancel_open(change, f"trading halted: {halt.reason}", keep_flatten=True)
                await self._commit(change)
            await self._settle_waiting()
            if not halt.halted and (before is None or before.halted):
                await self._fill_remembered()
                self.wake.set()

    def _halt_reason(self) -> str | None:
        """Why no new order may be made now (None: it may)."""
        if self.halt is None:
            return "trading halt state unknown: no retained circles/trading/halt seen yet"
        return f"trading halted: {self.halt.reason}" if self.halt.halted else None

    def _may_wait(self) -> bool:
        """Whether an intent may wait instead of being refused: the halt state has not been
        seen yet just after a start (the broker hands queued intents over before the
        retained halt), or the live exchange is still being reached."""
        if self.halt is None:
            return time.monotonic() - self.started < self.config.halt_wait_s
        return self.live and not self.halt.halted and not self.reconciled

    async def _settle_waiting(self) -> None:
        """Decide the intents that waited, in arrival order, if they can be decided now."""
        if not self.waiting or self._may_wait():
            return
        for intent in await self._db(self.store.waiting_intents):
            await self._decide(intent)
        self.waiting = False

    # -- intents ------------------------------------------------------------------------------
    @subscribe(registry.ORDER_INTENT)
    async def on_intent(self, msg: Received) -> None:
        intent: OrderIntent = msg.data
        if slug(intent.account) != self.account:
            raise ValidationFailed(f"account {intent.account!r} is not the account of the "
                                   f"topic ({self.account!r})")
        async with self.lock:
            await self._deposit(intent.bar_ts)
            # No look-up first: the store refuses an intent decided before, in the
            # transaction that would record it.
            if self._may_wait():
                if await self._commit(Change(intent=intent, outcome="waiting")):
                    self.waiting = True
                    log.info("intent waits for the halt state", extra={"key": intent.key})
                    return
            else:
                await self._settle_waiting()  # the older ones first
                if await self._decide(intent):
                    return
            log.info("intent seen before: nothing to do", extra={"key": intent.key})

    async def _decide(self, intent: OrderIntent) -> bool:
        """Order what `intent` asks for, or refuse it: planned first, then committed in one
        transaction with the cancels it makes and, on paper, the fills of the bars already
        seen; then published. False (nothing done) when the intent was decided before."""
        reason = self._halt_reason() or self._stale(intent) or self._foreign(intent)
        change = Change(intent=intent)
        delta = self._delta(change, intent.symbol, intent.target_qty, cancel=reason is None)
        qty, small = abs(delta), None
        if qty >= self.config.min_qty and reason is None and self.exchange is not None:
            try:
                qty, small = self._live_amount(intent.symbol, qty, intent.price)
            except CirclesError as exc:  # OrderRejected: a market the exchange does not have
                reason = str(exc)
        if qty < self.config.min_qty or small:
            change.outcome, change.reason = ("refused", reason) if reason else ("noop", small or "")
            if await self._commit(change):
                log.info("intent needs no order", extra={"key": intent.key, "refused": reason,
                                                         "reason": small})
                return True
            return False
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        order = change.put(OrderRow(
            client_order_id=client_order_id(self.account, intent.key), account=self.config.account,
            intent_key=intent.key, strategy_id=intent.strategy_id, exchange=intent.exchange,
            symbol=intent.symbol, side="buy" if delta > 0 else "sell", qty=qty,
            status="rejected" if reason else "new" if self.live else "open", reason=reason or "",
            fill_after=self.model.fill_after(intent.bar_ts),
            timeframe=self.bars.timeframe(intent.exchange, intent.symbol),
            created_at=now, updated_at=now), new=True)
        change.outcome, change.reason = ("refused", reason) if reason else ("ordered", "")
        if reason is None and not self.live:
            self._plan_paper(change, order, self.bars.bars(order.exchange, order.symbol,
                                                           order.timeframe, order.fill_after))
        if not await self._commit(change):
            return False
        log.info("intent refused" if reason else "order made", extra={
            "key": intent.key, "client_order_id": order.client_order_id, "side": order.side,
            "qty": str(qty), "reason": reason})
        return True

    def _stale(self, intent: OrderIntent) -> str | None:
        timeframe = self.bars.timeframe(intent.exchange, intent.symbol)
        newest = self.bars.newest(intent.exchange, intent.symbol, timeframe)
        if newest is None or timeframe is None:
            return None
        bars = (newest.ts - intent.bar_ts).total_seconds() / TIMEFRAMES[timeframe]
        if bars > self.config.max_intent_age_bars:
            return (f"stale intent: its bar {intent.bar_ts.isoformat()} is {bars:g} bars older "
                    f"than the newest {timeframe} bar of {intent.symbol}")
        return None

    def _foreign(self, intent: OrderIntent) -> str | None:
        if self.live and slug(intent.exchange) != slug(self.config.exchange.id):
            return (f"the intent is for exchange {intent.exchange!r}; this account trades on "
                    f"{self.config.exchange.id!r}")
        return None

    def _delta(self, change: Change, symbol: str, target: Decimal, *, cancel: bool) -> Decimal:
        """What to order to reach `target`, counting the position and what open orders still
        have to fill. Open orders pulling the other way are cancelled in `change` (when
        `cancel`): buying and selling at once would only pay fees twice."""
        position = self.positions.get(symbol)
        held = position.qty if position else ZERO
        working = [o for o in self.open.values() if o.symbol == symbol and not o.cancel_requested]
        delta = target - held - sum((o.signed_remaining for o in working), ZERO)
        against = [o for o in working if signed(o.side, Decimal(1)) * delta < 0]
        if cancel and against and abs(delta) >= self.config.min_qty:
            for order in against:
                change.put(self._cancelled(order, "replaced by a newer target"))
            working = [o for o in working if o.client_order_id not in change.orders]
            delta = target - held - sum((o.signed_remaining for o in working), ZERO)
        return delta

    # -- bars and paper fills -------------------------------------------------------------------
    @subscribe(registry.MARKET_BAR)
    async def on_bar(self, msg: Received) -> None:
        bar: Bar = msg.data
        if not self.bars.add(bar):
            return
        async with self.lock:
            await self._deposit(bar.ts)
            if not self.live:
                change = Change()
                for order in list(self.open.values()):
                    if (order.exchange, order.symbol) == (bar.exchange, bar.symbol) \
                            and self._may_fill(order):
                        self._plan_paper(change, order, [bar])
                await self._commit(change)
            position = self.positions.get(bar.symbol)
            if position is not None and position.qty and position.exchange == bar.exchange:
                newest, last = self.bars.newest(bar.exchange, bar.symbol), self.marked.get(bar.symbol)
                if newest is not None and (last is None or newest.ts > last):
                    self.marked[bar.symbol] = newest.ts
                    self.positions_dirty = True
                    if time.monotonic() - self.positions_at >= self.config.positions_interval_s:
                        await self._publish_positions()

    def _may_fill(self, order: OrderRow) -> bool:
        return order.is_open and not order.cancel_requested and (
            order.kind == "flatten" or self._halt_reason() is None)

    def _plan_paper(self, change: Change, order: OrderRow, bars: list[Bar]) -> None:
        """Add to `change` what `bars` fill of paper `order`."""
        for bar in bars:
            if not order.is_open:
                return
            if order.timeframe is not None and bar.timeframe != order.timeframe:
                continue
            fill = self.model.fill(order, bar)
            if fill is not None:
                order = self._plan_fill(change, order.changed(timeframe=bar.timeframe), fill,
                                        fill_after=bar.ts)

    async def _fill_remembered(self) -> None:
        """Trading became allowed: open paper orders catch up on the bars seen meanwhile."""
        if self.live:
            return
        change = Change()
        for order in list(self.open.values()):
            if self._may_fill(order):
                self._plan_paper(change, order, self.bars.bars(
                    order.exchange, order.symbol,
                    order.timeframe or self.bars.timeframe(order.exchange, order.symbol),
                    order.fill_after))
        await self._commit(change)

    # -- fills, orders, events ------------------------------------------------------------------
    def _plan_fill(self, change: Change, order: OrderRow, fill: Fill, *,
                   status: OrderStatus | None = None,
                   fill_after: datetime | None = None) -> OrderRow:
        """Add one fill of `order` to `change`; the order as it then stands."""
        position = self.positions.get(order.symbol) or PositionRow(
            account=self.account, symbol=order.symbol, exchange=order.exchange)
        return change.fill(order, fill, position, self.source, status=status,
                           fill_after=fill_after)

    async def _commit(self, change: Change) -> bool:
        """Write `change` in one transaction, take it into the view, then publish it: the
        trade events first (the ledger is what waits for them), then the orders' updates,
        the open orders and the positions, once each. False (nothing written or published)
        when its intent was decided before."""
        if change.intent is None and not change.orders:
            return True
        if not await self._db(self.store.commit, change):
            return False
        self.positions.update(change.positions)
        for order in change.orders.values():
            if order.is_open:
                self.open[order.client_order_id] = order
            else:
                self.open.pop(order.client_order_id, None)
            if self.live and order.client_order_id in change.made and order.is_open:
                self.absent.add(order.client_order_id)  # made here: it never left
        for event in change.events:
            await self.outbox.send(event)
            log.info("fill", extra={"client_order_id": event.order_id, "side": event.side,
                                    "qty": str(event.qty), "price": str(event.price),
                                    "status": change.orders[str(event.order_id)].status})
        for order in change.orders.values():
            await self.bus.send(registry.ORDER_UPDATE, order.payload(), account=self.account)
        if change.orders:
            await self._publish_orders()
        if change.positions:
            await self._publish_positions()
        if self.live and any(o.is_open and (o.status == "new" or o.cancel_requested)
                             for o in change.orders.values()):
            self.wake.set()  # the run loop sends or cancels it
        return True

    async def _save(self, order: OrderRow) -> None:
        change = Change()
        change.put(order)
        await self._commit(change)

    def _cancelled(self, order: OrderRow, reason: str) -> OrderRow:
        """`order` cancelled: at once on paper; live, asked to be (the run loop asks the
        exchange; an order that fills meanwhile keeps its fills)."""
        if self.live:
            return order.changed(cancel_requested=True, reason=reason)
        return order.changed(status="cancelled", reason=reason)

    def _cancel_open(self, change: Change, reason: str, *, keep_flatten: bool) -> None:
        """Cancel in `change` every open order (but flattens, when `keep_flatten`)."""
        for order in list(self.open.values()):
            if not order.cancel_requested and not (keep_flatten and order.kind == "flatten"):
                change.put(self._cancelled(order, reason))

    async def _deposit(self, ts: datetime) -> None:
        """The paper account's starting balance, once, dated by the first bar or intent seen
        (so a replay of old bars starts with its money)."""
        if self.deposited:
            return
        c: ExecutionSettings = self.config
        event = TradeEvent(event_id=DEPOSIT_ID, source="paper", account_id=c.account,
                           strategy_id="paper", symbol=c.quote_currency, kind="deposit",
                           qty=c.starting_balance, price=Decimal(1), ts=ts)
        if await self._db(self.store.add_event, event):
            await self.outbox.send(event)
        self.deposited = True

    @subscribe(registry.TRADE_ACK, batch=True)
    async def on_acks(self, items: list[Received]) -> None:
        # Marked in the database by the run loop, many at once: a confirmation lost to a
        # crash only makes the event be sent again, which the trade logger ignores.
        outcomes = self.outbox.outcomes([item.data for item in items])
        self.outbox.confirmed(outcomes)
        self.confirmed.update(outcomes)

    async def _resend(self) -> None:
        """Record the confirmations received, then re-send what is still unconfirmed."""
        if self.confirmed:
            confirmed, self.confirmed = self.confirmed, {}
            await self._db(self.store.mark_delivered, confirmed)
        await self.outbox.resend(await self._db(self.store.undelivered))

    # -- retained state -------------------------------------------------------------------------
    async def _publish_orders(self) -> None:
        await self.bus.send(registry.OPEN_ORDERS, Orders(
            account=self.config.account, mode=self.config.mode,
            orders=[o.payload() for o in self.open.values()]), account=self.account)

    def _marked_positions(self) -> list[Position]:
        marked = []
        for position in sorted(self.positions.values(), key=lambda p: p.symbol):
            if abs(position.qty) < self.config.min_qty:
                continue
            bar = self.bars.newest(position.exchange, position.symbol)
            last = decimal(bar.close) if bar else None
            marked.append(Position(
                symbol=position.symbol, qty=position.qty, avg_price=position.avg_price,
                last_price=last,
                unrealized_pnl=None if last is None else (last - position.avg_price) * position.qty))
        return marked

    async def _publish_positions(self) -> None:
        self.positions_at, self.positions_dirty = time.monotonic(), False
        await self.bus.send(registry.POSITIONS, Positions(
            account=self.config.account, mode=self.config.mode,
            positions=self._marked_positions()), account=self.account)

    # -- the run loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        await self._publish_orders()
        await self._publish_positions()
        await self._resend()
        if self.live:
            await self._open_exchange()
        polled = 0.0
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), TICK_S)
            except TimeoutError:
                pass
            self.wake.clear()
            async with self.lock:
                await self._settle_waiting()
            if self.reconciled and time.monotonic() >= self.pause_until:
                poll = time.monotonic() - polled >= self.config.poll_s
                if poll:
                    polled = time.monotonic()
                await self._live_pass(poll=poll)
            await self._resend()
            if self.positions_dirty and \
                    time.monotonic() - self.positions_at >= self.config.positions_interval_s:
                async with self.lock:
                    await self._publish_positions()

    # -- live -----------------------------------------------------------------------------------
    async def _open_exchange(self) -> None:
        """Reach the exchange (retrying while it is unavailable), then reconcile: every
        order that may be at the exchange is looked up, and the balances are compared with
        the positions. Refused credentials stop the service."""
        from modules.trading.exchange import Exchange
        from modules.trading.execution.live import base_balances

        assert self.credentials is not None
        api_key, secret = self.credentials
        self.exchange = await self._retrying("connect", lambda: Exchange.open(
            self.config.exchange, api_key=api_key, secret=secret))
        # Before anything is sent: learn what became of every order a crash may have left.
        while not await self._live_pass(poll=True):
            await asyncio.sleep(max(0.0, self.pause_until - time.monotonic()))
        balances = await self._retrying("balances", self.exchange.fetch_balance)
        async with self.lock:
            self.discrepancies = base_balances(
                balances, {s: p.qty for s, p in self.positions.items()}, self.config.min_qty)
            for found in self.discrepancies:
                log.warning("the exchange's balance differs from our position: not adopted; "
                            "check the account", extra=found)
            self.reconciled = True
            await self._settle_waiting()
        self.wake.set()

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` until it works, waiting longer after each temporary failure; refused
        credentials (ExchangeFailure) stop the service."""
        from modules.trading.exchange import ExchangeFailure

        delay = self.config.poll_s
        while True:
            try:
                return await call()
            except ExchangeFailure as exc:
                log.error("the exchange refused us; stopping", extra={"call": what,
                                                                      "error": str(exc)})
                raise OperationalError(f"execution: {exc}") from exc
            except TemporaryError as exc:
                delay = max(delay, getattr(exc, "retry_after_s", 0.0))
                log.warning("exchange unavailable, retrying", extra={
                    "call": what, "error": str(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_PAUSE_S)

    def _live_amount(self, symbol: str, qty: Decimal,
                     price: Decimal | None) -> tuple[Decimal, str | None]:
        """`qty` as the exchange accepts it, and why no order is made when it is too small
        (in amount, or in value at `price`): the exchange would only refuse it."""
        assert self.exchange is not None
        amount = self.exchange.amount_to_precision(symbol, qty)
        minimum = max(self.exchange.min_amount(symbol), self.config.min_qty)
        if amount < minimum:
            return amount, f"{qty} is below the exchange's minimum amount {minimum} of {symbol}"
        least = self.exchange.min_cost(symbol)
        if price is not None and amount * price < least:
            return amount, (f"{amount} {symbol} at {price} is worth less than the exchange's "
                            f"minimum order value {least}")
        return amount, None

    async def _live_pass(self, *, poll: bool) -> bool:
        """One turn over the open orders: send the new ones (when trading is allowed),
        cancel those asked to be, and look up the others (when `poll`). Exchange calls run
        without the lock; their answers are taken in under it. False when the exchange
        failed for now (the pass is resumed after a pause)."""
        from modules.trading.exchange import ExchangeFailure, OrderRejected

        for order in list(self.open.values()):
            try:
                if order.cancel_requested:
                    await self._live_cancel(order)
                elif order.status == "new":
                    if order.kind == "flatten" or self._halt_reason() is None:
                        await self._live_send(order)
                    elif order.client_order_id not in self.absent:
                        await self._live_lookup(order)
                elif poll:
                    await self._live_lookup(order)
            except OrderRejected as exc:
                log.warning("order rejected by the exchange", extra={
                    "client_order_id": order.client_order_id, "error": str(exc)})
                async with self.lock:
                    current = self.open.get(order.client_order_id)
                    if current is not None and current.status == "new":
                        await self._save(current.changed(status="rejected", reason=str(exc)))
            except ExchangeFailure as exc:
                log.error("the exchange refused us; stopping", extra={"error": str(exc)})
                raise OperationalError(f"execution: {exc}") from exc
            except TemporaryError as exc:
                self.failures += 1
                pause = min(self.config.poll_s * 2 ** self.failures, MAX_PAUSE_S)
                # A ban (HTTP 418) names its end: asking earlier would only prolong it.
                pause = max(pause, getattr(exc, "retry_after_s", 0.0))
                self.pause_until = time.monotonic() + pause
                log.warning("exchange unavailable; orders wait", extra={
                    "error": str(exc), "retry_in_s": pause})
                return False
        self.failures = 0
        return True

    async def _live_lookup(self, order: OrderRow) -> None:
        assert self.exchange is not None
        seen = await self.exchange.fetch_order(order.symbol, order.client_order_id)
        if seen is not None:
            await self._absorb(order.client_order_id, seen)
        elif order.status == "new":
            self.absent.add(order.client_order_id)
        else:
            log.warning("the exchange does not know an open order", extra={
                "client_order_id": order.client_order_id})
            async with self.lock:
                if (current := self.open.get(order.client_order_id)) is not None:
                    await self._save(current.changed(
                        status="cancelled", reason="the exchange does not know this order"))

    async def _live_send(self, order: OrderRow) -> None:
        """Send a new order, unless the exchange has it already (a send before a crash, or
        one whose answer was lost)."""
        assert self.exchange is not None
        coid = order.client_order_id
        if coid not in self.absent:
            await self._live_lookup(order)
            if coid not in self.absent:
                return
        async with self.lock:  # the order may have been cancelled, or trading halted, meanwhile
            current = self.open.get(coid)
            if current is None or current.status != "new" or current.cancel_requested or not (
                    current.kind == "flatten" or self._halt_reason() is None):
                return
        try:
            seen = await self.exchange.create_order(order.symbol, order.side, order.qty, coid)
        except TemporaryError:
            self.absent.discard(coid)  # its fate is unknown: look it up before sending again
            raise
        self.absent.discard(coid)
        await self._absorb(coid, seen)

    async def _live_cancel(self, order: OrderRow) -> None:
        assert self.exchange is not None
        coid = order.client_order_id
        if order.status == "new" and coid not in self.absent:
            await self._live_lookup(order)
        seen = None
        if not (order.status == "new" and coid in self.absent):
            seen = await self.exchange.cancel_order(order.symbol, coid)
        if seen is not None:
            await self._absorb(coid, seen)
            return
        async with self.lock:  # never reached the exchange, or unknown to it
            if (current := self.open.get(coid)) is not None and current.status == "new":
                await self._save(current.changed(status="cancelled"))

    async def _absorb(self, coid: str, seen: ExchangeOrder) -> None:
        """Take in the exchange's report of an order: a new fill (recorded once: the
        difference to what we recorded), a new status, its exchange id."""
        from modules.trading.execution.live import absorb

        async with self.lock:
            order = self.open.get(coid) or await self._db(self.store.order, coid)
            if order is None:
                return
            got = absorb(order, seen)
            change = Change()
            if got.fill is not None:
                final = got.status if got.status in ("filled", "cancelled", "rejected") else None
                self._plan_fill(change, order.changed(exchange_order_id=got.exchange_order_id),
                                got.fill, status=final)
            elif (got.status, got.exchange_order_id) != (order.status, order.exchange_order_id):
                change.put(order.changed(status=got.status,
                                         exchange_order_id=got.exchange_order_id))
            await self._commit(change)

    # -- commands -------------------------------------------------------------------------------
    async def cmd_positions(self, request: CommandRequest) -> dict[str, Any]:
        """The account's positions marked to the last bar; live: whether the start-up
        comparison with the exchange is done, and where its balances differed from them."""
        async with self.lock:
            return {"account": self.config.account, "mode": self.config.mode,
                    "positions": [p.model_dump(mode="json") for p in self._marked_positions()],
                    "reconciled": self.reconciled if self.live else None,
                    "discrepancies": self.discrepancies,
                    "halted": None if self.halt is None else self.halt.halted}

    async def cmd_orders(self, request: CommandRequest) -> dict[str, Any]:
        """{"limit": 50} → the open orders, and the last `limit` orders of any status."""
        limit = (request.model_extra or {}).get("limit", 50)
        if not isinstance(limit, int) or not 0 <= limit <= 1000:
            raise ValidationFailed("limit must be an integer from 0 to 1000")
        recent = await self._db(self.store.recent_orders, limit)
        return {"account": self.config.account, "mode": self.config.mode,
                "open": [o.payload().model_dump(mode="json") for o in self.open.values()],
                "recent": [o.payload().model_dump(mode="json") for o in recent]}

    async def cmd_flatten(self, request: CommandRequest) -> dict[str, Any]:
        """{"by": "…"} → cancel every open order and close every position with a market order,
        even while trading is halted (it only reduces risk); the orders made."""
        by = request.by or "unknown"
        change = Change()
        async with self.lock:
            self._cancel_open(change, f"flatten by {by}", keep_flatten=False)
            key = f"flatten-{int(time.time() * 1000)}"
            now = datetime.now(UTC).isoformat(timespec="milliseconds")
            made: list[OrderRow] = []
            for n, position in enumerate(sorted(self.positions.values(), key=lambda p: p.symbol)):
                qty = abs(position.qty)
                if qty < self.config.min_qty:
                    continue
                if self.exchange is not None:
                    qty, small = self._live_amount(position.symbol, qty, None)
                    if small:
                        log.warning("position too small to close", extra={"reason": small})
                        continue
                timeframe = self.bars.timeframe(position.exchange, position.symbol)
                newest = self.bars.newest(position.exchange, position.symbol, timeframe)
                made.append(change.put(OrderRow(
                    client_order_id=client_order_id(self.account, key, n + 1),
                    account=self.config.account, intent_key=key, kind="flatten",
                    strategy_id=position.strategy_id, exchange=position.exchange,
                    symbol=position.symbol, side="sell" if position.qty > 0 else "buy", qty=qty,
                    status="new" if self.live else "open", reason=f"flatten by {by}",
                    fill_after=self.model.fill_after(newest.ts) if newest else None,
                    timeframe=timeframe, created_at=now, updated_at=now), new=True))
            if not self.live:
                for order in made:
                    self._plan_paper(change, order, self.bars.bars(
                        order.exchange, order.symbol, order.timeframe, order.fill_after))
            await self._commit(change)
            log.warning("flatten", extra={"by": by, "orders": len(made)})
        return {"orders": [change.orders[o.client_order_id].payload().model_dump(mode="json")
                           for o in made]}

    def status_text(self) -> str:
        state = "halt unknown" if getattr(self, "halt", None) is None else (
            "halted" if self.halt and self.halt.halted else "trading")
        return (f"{self.config.mode} {self.config.account}, {state}: "
                f"{len(getattr(self, 'open', {}))} open orders")
