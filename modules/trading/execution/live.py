"""Live trading: the execution service's path to a real exchange (`modules.trading.exchange`).

Imported only in live mode. `LiveDriver` is what the service owns for it: it opens the
exchange and reconciles with it at start (every order a crash may have left is looked up by
its client order id, balances and the exchange's open orders are compared with ours), then,
turn by turn of the service's run loop, sends new orders, cancels those asked to be, polls
the open ones and takes in what the exchange reports. The order of operations that makes a
crash harmless: an order is written as `new` before it is sent, and a `new` order whose
send may have happened is looked up by its client order id before it is sent again.

Exchange calls run without the service's lock; their answers are taken in under it, through
the service's `commit`, which writes them before anything is published.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from appliance.bus.trading import OrderStatus
from appliance.errors import ConfigError, OperationalError, TemporaryError
from appliance.security.secrets import read_secret
from appliance.trading_secrets import exchange_secret_names as secret_names
from modules.trading.exchange import Exchange, ExchangeFailure, ExchangeOrder, OrderRejected
from modules.trading.execution.orders import (
    ZERO,
    Change,
    Fill,
    OrderRow,
    base_currency,
    is_client_order_id,
    rounded,
    text,
)

if TYPE_CHECKING:
    from modules.trading.execution.service import ExecutionService

log = logging.getLogger("circles.execution")
T = TypeVar("T")
MAX_PAUSE_S = 60.0  # the longest the live path waits after the exchange failed
STATUSES: dict[str, OrderStatus] = {"closed": "filled", "canceled": "cancelled",
                                    "expired": "cancelled", "rejected": "rejected"}


def credentials(account: str, state_dir: Path) -> tuple[str, str]:
    """The account's API key and secret ($CREDENTIALS_DIRECTORY first, then the encrypted
    store); ConfigError naming the secret that is missing."""
    values = []
    for name in secret_names(account):
        value = read_secret(name, state_dir)
        if not value:
            raise ConfigError(f"config: execution: live trading needs the secret {name} "
                              f"(the panel's Trading settings, `circles secrets set {name}`, "
                              "or a systemd credential)")
        values.append(value)
    return values[0], values[1]


@dataclass(frozen=True)
class Absorbed:
    """What an exchange report changes: the order's status, and the quantity filled since
    we last looked as one fill (None when nothing new filled)."""

    status: OrderStatus
    fill: Fill | None
    exchange_order_id: str | None


def absorb(order: OrderRow, seen: ExchangeOrder, *, now: datetime | None = None) -> Absorbed:
    """Compare the exchange's report of `order` with what we recorded. The exchange's
    `filled`, `average` and `fee` are cumulative, so the new fill is the difference: its
    price is what makes the total cost match, its fee what the fee grew by (a report
    without fees, as Binance's order query, never lowers what we recorded)."""
    status = STATUSES.get(seen.status) or ("partial" if seen.filled > 0 else "open")
    fill = None
    grown = seen.filled - order.filled
    if grown > 0 and seen.average is not None:
        cost = seen.average * seen.filled - (order.avg_price or ZERO) * order.filled
        price = rounded(cost / grown) if cost > 0 else seen.average
        same = seen.fee_currency is None or order.fee_currency in (None, seen.fee_currency)
        fee = max(seen.fee - order.fee, ZERO) if same else seen.fee
        ts = datetime.fromtimestamp(seen.timestamp_ms / 1000, UTC) if seen.timestamp_ms \
            else (now or datetime.now(UTC))
        fill = Fill(qty=grown, price=price, fee=rounded(fee), ts=ts,
                    fee_currency=seen.fee_currency or order.fee_currency)
    elif grown > 0:
        status = order.status  # filled without a price yet: take it when the price comes
    return Absorbed(status, fill, seen.id or order.exchange_order_id)


def base_balances(balances: dict[str, Decimal], held: dict[str, Decimal],
                  tolerance: Decimal) -> list[dict[str, str]]:
    """Where the exchange's base-currency totals differ from our positions (symbol → signed
    qty), by more than `tolerance`: one entry per symbol, for a person to look at."""
    found = []
    for symbol, qty in sorted(held.items()):
        currency = base_currency(symbol)
        total = balances.get(currency, ZERO)
        if abs(total - qty) > tolerance:
            found.append({"kind": "balance", "symbol": symbol, "currency": currency,
                          "ours": text(qty), "exchange": text(total),
                          "difference": text(total - qty)})
    return found


def foreign_order(seen: ExchangeOrder, ours: OrderRow | None) -> dict[str, str]:
    """A discrepancy entry for an order open at the exchange under one of our client order
    ids that our database does not have open (`ours`: its row, if any)."""
    problem = "unknown to our database" if ours is None else f"{ours.status} in our database"
    return {"kind": "order", "client_order_id": seen.client_order_id, "symbol": seen.symbol,
            "side": seen.side, "qty": text(seen.amount), "filled": text(seen.filled),
            "exchange_order_id": seen.id or "",
            "problem": f"open at the exchange, {problem}: not managed by Circles"}


class LiveDriver:
    """The exchange side of one execution service (`desk`)."""

    def __init__(self, desk: ExecutionService, api_key: str, secret: str) -> None:
        self.desk = desk
        self._credentials = (api_key, secret)
        self.exchange: Exchange | None = None
        self.absent: set[str] = set()  # new orders known not to be at the exchange
        self.reconciled = False  # orders, balances and open orders compared with the exchange's
        self.discrepancies: list[dict[str, str]] = []
        self.pause_until = 0.0  # no exchange call before this (it just failed)
        self.failures = 0
        self.polled = 0.0

    async def close(self) -> None:
        if self.exchange is not None:
            await self.exchange.close()

    # -- start: connect and reconcile ------------------------------------------------------
    async def open(self) -> None:
        """Reach the exchange (retrying while it is unavailable), then reconcile: every order
        that may be at the exchange is looked up, and the balances and the exchange's open
        orders are compared with ours. A refusal here (credentials, permissions, anything the
        boundary does not understand) is a ConfigError: the unit does not restart into
        logging in again and again with a bad key, which exchanges punish with a ban.

        Opened for a switch to live (the `mode` command), this driver is not yet the desk's:
        the desk's book is paper's then, which it leaves alone (`_pass`): flat, and kept flat
        by intents being refused until the switch is done."""
        desk, (api_key, secret) = self.desk, self._credentials
        try:
            self.exchange = await self._retrying("connect", lambda: Exchange.open(
                desk.config.exchange, api_key=api_key, secret=secret))
            # Before anything is sent: learn what became of every order a crash may have left.
            while not await self._pass(poll=True):
                await asyncio.sleep(max(0.0, self.pause_until - time.monotonic()))
            balances = await self._retrying("balances", self.exchange.fetch_balance)
        except ExchangeFailure as exc:
            key, secret_name = secret_names(desk.account)
            raise ConfigError(
                f"config: execution: the exchange refused us at start ({exc}); check the "
                f"secrets {key} and {secret_name}, the key's permissions, and "
                f"execution.exchange (not restarting: a refused key tried again and again "
                f"gets the address banned)") from exc
        found = base_balances(balances, {s: p.qty for s, p in desk.positions.items()},
                              desk.config.min_qty)
        try:  # a report only: the key was accepted above, so a refusal here stops nothing
            listed = await self._retrying("open orders", self.exchange.fetch_open_orders)
        except ExchangeFailure as exc:
            listed = []
            found.append({"kind": "order", "problem": f"the exchange's open orders could not "
                                                      f"be listed: {exc}"})
        book = self._book()
        for seen in listed:
            coid = seen.client_order_id
            if not is_client_order_id(coid) or coid in book:
                continue
            ours = await desk.db(desk.store.order, coid)
            if ours is None or not ours.is_open:
                found.append(foreign_order(seen, ours))
        async with desk.lock:
            self.discrepancies = found
            for entry in found:
                log.warning("the exchange differs from our records: not adopted; check the "
                            "account", extra=entry)
            self.reconciled = True
            if desk.driver is self:
                await desk.settle_waiting()
        desk.wake.set()

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` until it works, waiting longer after each temporary failure."""
        delay = self.desk.config.poll_s
        while True:
            try:
                return await call()
            except TemporaryError as exc:
                delay = max(delay, getattr(exc, "retry_after_s", 0.0))
                log.warning("exchange unavailable, retrying", extra={
                    "call": what, "error": str(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_PAUSE_S)

    # -- the run loop's turn ---------------------------------------------------------------
    async def turn(self) -> None:
        """Send, cancel and (every `poll_s`) poll, unless the exchange asked for a pause.
        A refusal (ExchangeFailure) stops the service; its restart meets it at start."""
        if not self.reconciled or time.monotonic() < self.pause_until:
            return
        poll = time.monotonic() - self.polled >= self.desk.config.poll_s
        if poll:
            self.polled = time.monotonic()
        try:
            await self._pass(poll=poll)
        except ExchangeFailure as exc:
            log.error("the exchange refused us; stopping", extra={"error": str(exc)})
            raise OperationalError(f"execution: {exc}") from exc

    def committed(self, change: Change) -> bool:
        """The service committed `change`: orders it made never left yet; True when the run
        loop has something to send or cancel."""
        for order in change.orders.values():
            if order.client_order_id in change.made and order.is_open:
                self.absent.add(order.client_order_id)
        return any(o.is_open and (o.status == "new" or o.cancel_requested)
                   for o in change.orders.values())

    def amount(self, symbol: str, qty: Decimal,
               price: Decimal | None) -> tuple[Decimal, str | None]:
        """`qty` as the exchange accepts it, and why no order is made when it is too small
        (in amount, or in value at `price`): the exchange would only refuse it."""
        assert self.exchange is not None
        amount = self.exchange.amount_to_precision(symbol, qty)
        minimum = max(self.exchange.min_amount(symbol), self.desk.config.min_qty)
        if amount < minimum:
            return amount, f"{qty} is below the exchange's minimum amount {minimum} of {symbol}"
        least = self.exchange.min_cost(symbol)
        if price is not None and amount * price < least:
            return amount, (f"{amount} {symbol} at {price} is worth less than the exchange's "
                            f"minimum order value {least}")
        return amount, None

    async def _pass(self, *, poll: bool) -> bool:
        """One turn over the open orders: send the new ones (when trading is allowed),
        cancel those asked to be, and look up the others (when `poll`). False when the
        exchange failed for now (the pass is resumed after a pause)."""
        desk = self.desk
        for order in list(self._book().values()):
            try:
                if order.cancel_requested:
                    await self._cancel(order)
                elif order.status == "new":
                    if order.kind == "flatten" or desk.halt_reason() is None:
                        await self._send(order)
                    elif order.client_order_id not in self.absent:
                        await self._lookup(order)
                elif poll:
                    await self._lookup(order)
            except OrderRejected as exc:
                log.warning("order rejected by the exchange", extra={
                    "client_order_id": order.client_order_id, "error": str(exc)})
                async with desk.lock:
                    current = desk.open.get(order.client_order_id)
                    if current is not None and current.status == "new":
                        await desk.save(current.changed(status="rejected", reason=str(exc)))
            except TemporaryError as exc:
                self.failures += 1
                pause = min(desk.config.poll_s * 2 ** self.failures, MAX_PAUSE_S)
                # A ban (HTTP 418) names its end: asking earlier would only prolong it.
                pause = max(pause, getattr(exc, "retry_after_s", 0.0))
                self.pause_until = time.monotonic() + pause
                log.warning("exchange unavailable; orders wait", extra={
                    "error": str(exc), "retry_in_s": pause})
                return False
        self.failures = 0
        return True

    def _book(self) -> dict[str, OrderRow]:
        """The desk's open orders when this driver is the desk's; else none (they are paper
        orders: looked up at the exchange, they would be found missing and cancelled)."""
        return self.desk.open if self.desk.driver is self else {}

    async def _lookup(self, order: OrderRow) -> None:
        assert self.exchange is not None
        seen = await self.exchange.fetch_order(order.symbol, order.client_order_id)
        if seen is not None:
            await self._absorb(order.client_order_id, seen)
        elif order.status == "new":
            self.absent.add(order.client_order_id)
        else:
            log.warning("the exchange does not know an open order", extra={
                "client_order_id": order.client_order_id})
            async with self.desk.lock:
                if (current := self.desk.open.get(order.client_order_id)) is not None:
                    await self.desk.save(current.changed(
                        status="cancelled", reason="the exchange does not know this order"))

    async def _send(self, order: OrderRow) -> None:
        """Send a new order, unless the exchange has it already (a send before a crash, or
        one whose answer was lost)."""
        assert self.exchange is not None
        desk, coid = self.desk, order.client_order_id
        if coid not in self.absent:
            await self._lookup(order)
            if coid not in self.absent:
                return
        async with desk.lock:  # the order may have been cancelled, or trading halted, meanwhile
            current = desk.open.get(coid)
            if current is None or current.status != "new" or current.cancel_requested or not (
                    current.kind == "flatten" or desk.halt_reason() is None):
                return
        try:
            seen = await self.exchange.create_order(order.symbol, order.side, order.qty, coid)
        except TemporaryError:
            self.absent.discard(coid)  # its fate is unknown: look it up before sending again
            raise
        self.absent.discard(coid)
        await self._absorb(coid, seen)

    async def _cancel(self, order: OrderRow) -> None:
        assert self.exchange is not None
        coid = order.client_order_id
        if order.status == "new" and coid not in self.absent:
            await self._lookup(order)
        seen = None
        if not (order.status == "new" and coid in self.absent):
            seen = await self.exchange.cancel_order(order.symbol, coid)
        if seen is not None:
            await self._absorb(coid, seen)
            return
        async with self.desk.lock:  # never reached the exchange, or unknown to it
            if (current := self.desk.open.get(coid)) is not None and current.status == "new":
                await self.desk.save(current.changed(status="cancelled"))

    async def _absorb(self, coid: str, seen: ExchangeOrder) -> None:
        """Take in the exchange's report of an order: a new fill (recorded once: the
        difference to what we recorded), a new status, its exchange id."""
        desk = self.desk
        async with desk.lock:
            order = desk.open.get(coid) or await desk.db(desk.store.order, coid)
            if order is None:
                return
            got = absorb(order, seen)
            change = Change()
            if got.fill is not None:
                final = got.status if got.status in ("filled", "cancelled", "rejected") else None
                change.fill(order.changed(exchange_order_id=got.exchange_order_id), got.fill,
                            desk.position_of(order), "ccxt", status=final)
            elif (got.status, got.exchange_order_id) != (order.status, order.exchange_order_id):
                change.put(order.changed(status=got.status,
                                         exchange_order_id=got.exchange_order_id))
            await desk.commit(change)
