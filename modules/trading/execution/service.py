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

This file is the bus side. Paper trading (the default) fills on the bars it sees
(`PaperDriver`, `paper.py`); live trading (`mode = "live"` and `live_confirmed = true`) hands
orders to the `LiveDriver` of `live.py`, which talks to the exchange. Trading obeys the
retained halt: until it has been seen (or after it was deleted), nothing is sent and intents
wait (at most `halt_wait_s` after start, then they are refused); while halted, intents are
refused and open orders cancelled; a flatten still closes positions.

The `mode` command switches a flat account between paper and live while the service runs
(the panel asks it, after the person's authenticator code): the live side is reached and
reconciled first, then takes over; the choice is kept in the state directory and wins over
`execution.mode` at the next start (mode.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from appliance.bus import registry
from appliance.bus.base import Bus
from appliance.bus.message import Received
from appliance.bus.payloads import CommandRequest, TradingHalt
from appliance.bus.topics import slug
from appliance.bus.trading import Bar, OrderIntent, Orders, Position, Positions
from appliance.config import CoreSettings
from appliance.db import open_database
from appliance.errors import CirclesError, ConfigError, OperationalError, ValidationFailed
from appliance.runtime import Service, subscribe
from modules.trading.execution.mode import MODES, Mode, choose_mode, chosen_mode
from modules.trading.execution.orders import ZERO, Change, OrderRow, PositionRow, client_order_id, signed
from modules.trading.execution.outbox import Outbox
from modules.trading.execution.paper import DEPOSIT_ID, BarMemory, PaperDriver, PaperModel
from modules.trading.execution.settings import ExecutionSettings
from modules.trading.execution.store import DatabaseUnavailable, ExecutionStore

if TYPE_CHECKING:
    from modules.trading.execution.live import LiveDriver

log = logging.getLogger("circles.execution")
T = TypeVar("T")
TICK_S = 0.5  # the run loop's turn: resends, live sends, the halt wait, position marks
DB_PATIENCE_S = 60.0  # then the step fails (its message goes to the dead letters)


class ExecutionService(Service):
    name = "execution"
    Settings = ExecutionSettings

    def __init__(self, settings: CoreSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        self.account = slug(self.config.account)

    def topic_values(self) -> dict[str, str]:
        return {"account": self.account}  # intents and acks of this account only

    # -- start and stop -----------------------------------------------------------------------
    async def start(self) -> None:
        c: ExecutionSettings = self.config
        # A mode chosen at run time (the `mode` command) wins over the configuration.
        chosen = await asyncio.to_thread(chosen_mode, self.settings.state_dir, self.account)
        self.mode: Mode = chosen.mode if chosen is not None else c.mode
        self.switching = asyncio.Lock()  # one mode switch at a time
        self.switching_to: Mode | None = None  # a switch in progress: intents are refused
        # Paper never touches the secret store, nor the exchange boundary.
        self.driver: LiveDriver | None = await self._live_driver() if self.live else None
        self.model = PaperModel(c.slippage_bps, c.fee_bps, c.fill_at, c.max_volume_fraction,
                                c.quote_currency, c.min_qty)
        self.paper: PaperDriver | None = None
        self.bars = BarMemory(keep=c.max_intent_age_bars + 3)
        self.lock = asyncio.Lock()  # one change of orders and positions at a time
        self.halt: TradingHalt | None = None  # None: not seen yet (or deleted)
        self.started = time.monotonic()
        self.wake = asyncio.Event()  # live: an order waits to be sent or cancelled
        self.marked: dict[str, datetime] = {}  # symbol → bar of the last published mark
        self.positions_at = 0.0
        self.positions_dirty = True
        self.confirmed: dict[tuple[str, str], str] = {}  # by the trade logger, not yet marked
        engine = await asyncio.to_thread(open_database, self.settings)
        self.store = ExecutionStore(engine, self.account, c.account)
        self.outbox = Outbox(self.bus, self.account, c.resend_after_s)
        self.open = {o.client_order_id: o for o in await self.db(self.store.open_orders)}
        self.positions = await self.db(self.store.positions)
        self.waiting = bool(await self.db(self.store.waiting_intents))
        if not self.live:
            self.paper = await self._paper_driver()
        log.info("execution ready", extra={"mode": self.mode, "account": c.account,
                                           "mode_chosen_by": chosen.by if chosen else None,
                                           "open_orders": len(self.open),
                                           "positions": sum(1 for p in self.positions.values()
                                                            if p.qty)})

    @property
    def live(self) -> bool:
        return self.mode == "live"

    async def _live_driver(self) -> LiveDriver:
        """The live side, with the account's credentials; ConfigError when the exchange may
        not be traded live or a credential is missing. Made in a thread: the first one
        imports ccxt (~0.5 s), which would stall the event loop (a switch to live at run
        time: intents, bars, acks)."""
        return await asyncio.to_thread(self._make_live_driver)

    def _make_live_driver(self) -> LiveDriver:
        from modules.trading.exchange import import_ccxt, require_live_ready
        from modules.trading.execution.live import LiveDriver, credentials

        require_live_ready(self.config.exchange.id)
        api_key, secret = credentials(self.account, self.settings.state_dir)
        import_ccxt()  # here rather than in Exchange.open, on the event loop
        return LiveDriver(self, api_key, secret)

    async def _paper_driver(self) -> PaperDriver:
        paper = PaperDriver(self, self.model)
        paper.deposited = not self.config.starting_balance or await self.db(
            self.store.has_event, "paper", DEPOSIT_ID)
        return paper

    async def stop(self) -> None:
        if (driver := getattr(self, "driver", None)) is not None:
            await driver.close()

    async def db(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` (a store method) in a thread; a database that is locked or away is
        waited for (the transaction was rolled back, so trying again is safe), up to
        DB_PATIENCE_S, then its DatabaseUnavailable (a TemporaryError) is raised."""
        delay, waited = 0.1, 0.0
        while True:
            try:
                return await asyncio.to_thread(call, *args)
            except DatabaseUnavailable as exc:
                if waited >= DB_PATIENCE_S:
                    raise
                log.warning("database unavailable, retrying", extra={
                    "error": str(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)

    # -- the halt -----------------------------------------------------------------------------
    @subscribe(registry.TRADING_HALT)
    async def on_halt(self, msg: Received) -> None:
        halt: TradingHalt | None = msg.data
        async with self.lock:
            before, self.halt = self.halt, halt
            if halt is None:
                # The retained halt was deleted: the state is unknown again, which stops new
                # orders as a halt does (open ones are left as they are, as at a start).
                log.warning("trading halt state unknown: the retained halt was deleted")
            elif before is None or before.halted != halt.halted:
                log.warning("trading halted" if halt.halted else "trading allowed",
                            extra={"by": halt.by, "reason": halt.reason})
            if halt is not None and halt.halted:
                change = Change()
                self._cancel_open(change, f"trading halted: {halt.reason}", keep_flatten=True)
                await self.commit(change)
            await self.settle_waiting()
            if halt is not None and not halt.halted and (before is None or before.halted):
                if self.paper is not None:
                    await self.paper.catch_up()
                self.wake.set()

    def halt_reason(self) -> str | None:
        """Why no new order may be made now (None: it may)."""
        if self.halt is None:
            return "trading halt state unknown: no retained circles/trading/halt (not seen " \
                   "since the start, or deleted)"
        return f"trading halted: {self.halt.reason}" if self.halt.halted else None

    def switch_reason(self) -> str | None:
        """Why no intent is decided now but refused (None: none is): a mode switch is in
        progress (the `mode` command), which needs the account to stay flat throughout."""
        if self.switching_to is None:
            return None
        return (f"mode switch in progress ({self.mode} to {self.switching_to}): intents are "
                "refused until it is done")

    def _may_wait(self) -> bool:
        """Whether an intent may wait instead of being refused: the halt state has not been
        seen yet just after a start (the broker hands queued intents over before the
        retained halt), or the live exchange is still being reached. Never during a mode
        switch: intents are refused then (`switch_reason`), none is left waiting."""
        if self.switching_to is not None:
            return False
        if self.halt is None:
            return time.monotonic() - self.started < self.config.halt_wait_s
        return self.driver is not None and not self.halt.halted and not self.driver.reconciled

    async def settle_waiting(self) -> None:
        """Decide the intents that waited, in arrival order, if they can be decided now."""
        if not self.waiting or self._may_wait():
            return
        for intent in await self.db(self.store.waiting_intents):
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
            if self.paper is not None:
                await self.paper.deposit(intent.bar_ts)
            # No look-up first: the store refuses an intent decided before, in the
            # transaction that would record it.
            if self._may_wait():
                if await self.commit(Change(intent=intent, outcome="waiting")):
                    self.waiting = True
                    log.info("intent waits for the halt state", extra={"key": intent.key})
                    return
            else:
                await self.settle_waiting()  # the older ones first
                if await self._decide(intent):
                    return
            log.info("intent seen before: nothing to do", extra={"key": intent.key})

    async def _decide(self, intent: OrderIntent) -> bool:
        """Order what `intent` asks for, or refuse it: planned first, then committed in one
        transaction with the cancels it makes and, on paper, the fills of the bars already
        seen; then published. False (nothing done) when the intent was decided before."""
        reason = self.halt_reason() or self.switch_reason() or self._foreign(intent) or \
            self.bars.stale(intent, self.config.max_intent_age_bars,
                            datetime.now(UTC) if self.live else None)
        change = Change(intent=intent)
        delta = self._delta(change, intent.symbol, intent.target_qty, cancel=reason is None)
        qty, small = abs(delta), None
        if qty >= self.config.min_qty and reason is None and self.driver is not None \
                and self.driver.exchange is not None:
            try:
                qty, small = self.driver.amount(intent.symbol, qty, intent.price)
            except CirclesError as exc:  # OrderRejected: a market the exchange does not have
                reason = str(exc)
        if qty < self.config.min_qty or small:
            change.outcome, change.reason = ("refused", reason) if reason else ("noop", small or "")
            if await self.commit(change):
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
            timeframe=intent.timeframe or self.bars.timeframe(intent.exchange, intent.symbol),
            created_at=now, updated_at=now), new=True)
        change.outcome, change.reason = ("refused", reason) if reason else ("ordered", "")
        if reason is None and self.paper is not None:
            self.paper.plan(change, order)
        if not await self.commit(change):
            return False
        log.info("intent refused" if reason else "order made", extra={
            "key": intent.key, "client_order_id": order.client_order_id, "side": order.side,
            "qty": str(qty), "reason": reason})
        return True

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

    # -- bars -----------------------------------------------------------------------------------
    @subscribe(registry.MARKET_BAR)
    async def on_bar(self, msg: Received) -> None:
        bar: Bar = msg.data
        if not self.bars.add(bar):
            return
        async with self.lock:
            if self.paper is not None:
                await self.paper.deposit(bar.ts)
                await self.paper.bar(bar)
            position = self.positions.get(bar.symbol)
            if position is not None and position.qty and position.exchange == bar.exchange:
                newest, last = self.bars.newest(bar.exchange, bar.symbol), self.marked.get(bar.symbol)
                if newest is not None and (last is None or newest.ts > last):
                    self.marked[bar.symbol] = newest.ts
                    self.positions_dirty = True
                    if time.monotonic() - self.positions_at >= self.config.positions_interval_s:
                        await self._publish_positions()

    # -- orders and their changes ---------------------------------------------------------------
    def position_of(self, order: OrderRow) -> PositionRow:
        """The position `order` trades, as committed (a flat one when there is none yet)."""
        return self.positions.get(order.symbol) or PositionRow(
            account=self.account, symbol=order.symbol, exchange=order.exchange)

    async def commit(self, change: Change) -> bool:
        """Write `change` in one transaction, take it into the view, then publish it: the
        trade events first (the ledger is what waits for them), then the orders' updates,
        the open orders and the positions, once each. False (nothing written or published)
        when its intent was decided before."""
        if change.intent is None and not change.orders:
            return True
        if not await self.db(self.store.commit, change):
            return False
        self.positions.update(change.positions)
        for order in change.orders.values():
            if order.is_open:
                self.open[order.client_order_id] = order
            else:
                self.open.pop(order.client_order_id, None)
        if self.driver is not None and self.driver.committed(change):
            self.wake.set()  # the run loop sends or cancels it
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
        return True

    async def save(self, order: OrderRow) -> None:
        change = Change()
        change.put(order)
        await self.commit(change)

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

    # -- trade events -----------------------------------------------------------------------------
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
            await self.db(self.store.mark_delivered, confirmed)
        await self.outbox.resend(await self.db(self.store.undelivered))

    # -- retained state -------------------------------------------------------------------------
    async def _publish_orders(self) -> None:
        await self.bus.send(registry.OPEN_ORDERS, Orders(
            account=self.config.account, mode=self.mode,
            orders=[o.payload() for o in self.open.values()]), account=self.account)

    def _marks(self) -> list[Position]:
        return self.bars.marks(self.positions.values(), self.config.min_qty)

    async def _publish_positions(self) -> None:
        self.positions_at, self.positions_dirty = time.monotonic(), False
        await self.bus.send(registry.POSITIONS, Positions(
            account=self.config.account, mode=self.mode,
            positions=self._marks()), account=self.account)

    # -- the run loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        await self._publish_orders()
        await self._publish_positions()
        await self._resend()
        if self.driver is not None:
            await self.driver.open()
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), TICK_S)
            except TimeoutError:
                pass
            self.wake.clear()
            async with self.lock:
                await self.settle_waiting()
            if self.driver is not None:
                await self.driver.turn()
            await self._resend()
            if self.positions_dirty and \
                    time.monotonic() - self.positions_at >= self.config.positions_interval_s:
                async with self.lock:
                    await self._publish_positions()

    # -- commands -------------------------------------------------------------------------------
    def _discrepancies(self) -> list[dict[str, str]]:
        return self.driver.discrepancies if self.driver is not None else []

    def _reconciled(self) -> bool | None:
        """Live: whether the comparison with the exchange is done; paper: None."""
        return self.driver.reconciled if self.driver is not None else None

    async def cmd_positions(self, request: CommandRequest) -> dict[str, Any]:
        """The account's positions marked to the last bar; live: whether the start-up
        comparison with the exchange is done, and where the exchange differed from our
        records (balances, and open orders under our ids that we do not have open)."""
        async with self.lock:
            return {"account": self.config.account, "mode": self.mode,
                    "positions": [p.model_dump(mode="json") for p in self._marks()],
                    "reconciled": self._reconciled(), "discrepancies": self._discrepancies(),
                    "halted": None if self.halt is None else self.halt.halted}

    async def cmd_orders(self, request: CommandRequest) -> dict[str, Any]:
        """{"limit": 50} → the open orders, the last `limit` orders of any status, and (live)
        the start-up comparison's discrepancies."""
        limit = (request.model_extra or {}).get("limit", 50)
        if not isinstance(limit, int) or not 0 <= limit <= 1000:
            raise ValidationFailed("limit must be an integer from 0 to 1000")
        recent = await self.db(self.store.recent_orders, limit)
        return {"account": self.config.account, "mode": self.mode,
                "open": [o.payload().model_dump(mode="json") for o in self.open.values()],
                "recent": [o.payload().model_dump(mode="json") for o in recent],
                "discrepancies": self._discrepancies()}

    async def cmd_flatten(self, request: CommandRequest) -> dict[str, Any]:
        """{"by": "…"} → cancel every open order and close every position with a market order,
        even while trading is halted (it only reduces risk); the flatten orders working.
        A symbol's closing order is sized from its position and every order still open (one
        whose cancel the exchange has not confirmed may still fill); where a flatten order
        is open already (a retried flatten), it is returned instead of a second one."""
        by = request.by or "unknown"
        change = Change()
        async with self.lock:
            self._cancel_open(change, f"flatten by {by}", keep_flatten=True)
            working = [o for o in (change.orders.get(c, o) for c, o in self.open.items())
                       if o.is_open]
            kept = [o for o in working if o.kind == "flatten"]
            key = f"flatten-{int(time.time() * 1000)}"
            now = datetime.now(UTC).isoformat(timespec="milliseconds")
            made: list[OrderRow] = []
            held: dict[str, PositionRow | OrderRow] = {o.symbol: o for o in working}
            held.update(self.positions)
            for n, (symbol, like) in enumerate(sorted(held.items())):
                net = (self.positions[symbol].qty if symbol in self.positions else ZERO) + sum(
                    (o.signed_remaining for o in working if o.symbol == symbol), ZERO)
                qty, small = abs(net), None
                if qty < self.config.min_qty or any(o.symbol == symbol for o in kept):
                    continue
                if self.driver is not None and self.driver.exchange is not None:
                    qty, small = self.driver.amount(symbol, qty, None)
                if small:
                    log.warning("position too small to close", extra={"reason": small})
                    continue
                timeframe = self.bars.timeframe(like.exchange, symbol)
                newest = self.bars.newest(like.exchange, symbol, timeframe)
                made.append(change.put(OrderRow(
                    client_order_id=client_order_id(self.account, key, n + 1),
                    account=self.config.account, intent_key=key, kind="flatten",
                    strategy_id=like.strategy_id, exchange=like.exchange, symbol=symbol,
                    side="sell" if net > 0 else "buy", qty=qty,
                    status="new" if self.live else "open", reason=f"flatten by {by}",
                    fill_after=self.model.fill_after(newest.ts) if newest else None,
                    timeframe=timeframe, created_at=now, updated_at=now), new=True))
            if self.paper is not None:
                for order in made:
                    self.paper.plan(change, order)
            await self.commit(change)
            log.warning("flatten", extra={"by": by, "orders": len(made), "kept": len(kept)})
        return {"orders": [change.orders.get(o.client_order_id, o).payload().model_dump(mode="json")
                           for o in kept + made]}

    async def cmd_mode(self, request: CommandRequest) -> dict[str, Any]:
        """{"mode": "paper" | "live", "by": "…", "not_after": "<ISO 8601>"} → switch the
        account at once and for good (kept in the state directory, it wins over
        `execution.mode` at the next start: mode.py); the mode in force, whether it changed,
        and (live) where the exchange differed from our records. Refused, changing nothing:
        once `not_after` has passed (the asker stopped waiting: a command the broker kept
        while the service was down must not switch hours later), and going live without
        it; while the account holds a position or an open order, or intents wait (flatten
        first: paper positions are not at the exchange, nor live ones in the paper model);
        and for live when the exchange may not be traded live, the account's API key or
        secret is missing, or the exchange does not take them within `switch_timeout_s`.
        Going live, the exchange is reached and compared with our records before paper
        trading stops; intents are refused meanwhile (`switch_reason`)."""
        args = request.model_extra or {}
        mode, by, not_after = args.get("mode"), request.by or "unknown", args.get("not_after")
        if mode not in MODES:
            raise ValidationFailed('mode must be "paper" or "live"')
        async with self.switching:
            self._refuse_stale(mode, not_after)  # a switch before it may have taken long
            before, old = self.mode, self.driver
            if mode == before:
                return self._mode_answer(changed=False)
            async with self.lock:
                self._refuse_unless_flat(mode)
                self.switching_to = mode  # from here on, nothing is ordered: it stays flat
            try:
                await self._switch(mode, by, not_after)
            finally:
                self.switching_to = None
                if old is not None and self.driver is not old:  # switched: the old one is done
                    await old.close()
            self.wake.set()
        log.warning("trading mode switched", extra={"by": by, "from": before, "to": mode,
                                                    "account": self.config.account})
        return self._mode_answer(changed=True, was=before, by=by)

    async def _switch(self, mode: Mode, by: str, not_after: Any) -> None:
        """Install `mode`: its driver opened first, then the choice kept, then published. On
        an error before the choice is kept, nothing changed and the new driver is closed;
        the old one is the caller's to close."""
        driver = await self._open_live() if mode == "live" else None
        try:
            async with self.lock:
                self._refuse_unless_flat(mode)  # belt and braces: intents were refused
                self._refuse_stale(mode, not_after)  # the asker gave up while we reached out
                paper = None if driver is not None else await self._paper_driver()
                await asyncio.to_thread(choose_mode, self.settings.state_dir, self.account,
                                        mode, by)
                self.driver, self.paper, self.mode = driver, paper, mode
        except BaseException:
            if driver is not None:
                await driver.close()
            raise
        try:  # switched for good: the retained state says so now, or at the run loop's turn
            async with self.lock:
                await self._publish_orders()
                await self._publish_positions()
        except Exception as exc:  # noqa: BLE001 - the switch happened; the answer must say so
            self.positions_dirty = True
            log.warning("mode switched, not yet published", extra={"error": str(exc)})

    def _mode_answer(self, **extra: Any) -> dict[str, Any]:
        return {"account": self.config.account, "mode": self.mode,
                "reconciled": self._reconciled(), "discrepancies": self._discrepancies(),
                **extra}

    def _refuse_stale(self, mode: str, not_after: Any) -> None:
        """Refuse a `mode` command whose asker stopped waiting (`not_after` passed), and one
        going live that does not say until when it may be carried out."""
        if not_after is None:
            if mode == "live":
                raise ValidationFailed(
                    f"still {self.mode}: a switch to live needs not_after (ISO 8601: until "
                    "when it may be carried out), or one queued for hours could go live")
            return
        deadline = None
        if isinstance(not_after, str):
            try:
                deadline = datetime.fromisoformat(not_after)
            except ValueError:
                pass
        if deadline is None or deadline.tzinfo is None:
            raise ValidationFailed(f"not_after must be an ISO 8601 time with its time zone, "
                                   f"not {not_after!r}")
        now = datetime.now(UTC)
        if now > deadline:
            raise ValidationFailed(
                f"still {self.mode}: the switch to {mode} was asked to be done by "
                f"{deadline.astimezone(UTC).isoformat(timespec='seconds')} and is stale (now "
                f"{now.isoformat(timespec='seconds')}: delivered late?); ask again")

    def _refuse_unless_flat(self, mode: str) -> None:
        held = sorted(s for s, p in self.positions.items() if abs(p.qty) >= self.config.min_qty)
        if self.open or held:
            raise ValidationFailed(
                f"still {self.mode}, not {mode}: the account has {len(self.open)} open orders "
                f"and positions in {', '.join(held) or 'nothing'}; halt and flatten first "
                "(paper positions are not at the exchange, nor live ones in the paper model)")
        if self.waiting:
            raise ValidationFailed(
                f"still {self.mode}, not {mode}: intents wait to be decided (for the halt "
                "state, or the exchange); ask again once they are")

    async def _open_live(self) -> LiveDriver:
        """A live driver that reached the exchange and compared it with our records; else an
        error saying why not, with nothing left open."""
        try:
            driver = await self._live_driver()
        except ConfigError as exc:
            why = str(exc).removeprefix("config: ").removeprefix("execution: ")
            raise ValidationFailed(f"still {self.mode}: {why}") from None
        timeout = self.config.switch_timeout_s
        try:
            await asyncio.wait_for(driver.open(), timeout)
        except (TimeoutError, ConfigError) as exc:
            await driver.close()
            why = f"the exchange refused the account's keys ({exc.__cause__ or exc}); check " \
                  "them and their permissions" if isinstance(exc, ConfigError) else \
                f"the exchange did not answer within {timeout:g} s"
            raise OperationalError(f"still {self.mode}: {why}") from None
        except BaseException:
            await driver.close()
            raise
        return driver

    def status_text(self) -> str:
        state = "halt unknown" if getattr(self, "halt", None) is None else (
            "halted" if self.halt and self.halt.halted else "trading")
        return (f"{getattr(self, 'mode', self.config.mode)} {self.config.account}, {state}: "
                f"{len(getattr(self, 'open', {}))} open orders")
