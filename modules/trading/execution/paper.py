"""Paper trading: the bars the service has seen, how a bar fills a paper order, and the
`PaperDriver`, the paper side of the service (the live side is `live.py`'s `LiveDriver`).

The model is deliberately not kinder than a market: a buy pays `slippage_bps` above the
price and a sell gets that much below, every fill pays `fee_bps`, and one bar fills at most
`max_volume_fraction` of its volume (the rest of the order waits for the next bars). The
price is the open of the first bar after the intent's bar (`next_open`: the earliest a real
market order could have filled, since the intent exists only once its bar closed), or the
intent bar's own close (`close`). An order remembers the last bar that filled it, so a bar
never fills it twice and the result does not depend on whether an intent arrives before or
after the next bar: the same input stream gives the same fills.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

from appliance.bus.trade_event import TradeEvent
from appliance.bus.trading import TIMEFRAMES, Bar, OrderIntent, Position
from modules.trading.execution.orders import Change, Fill, OrderRow, PositionRow, rounded

if TYPE_CHECKING:
    from modules.trading.execution.service import ExecutionService

BPS = Decimal(10_000)
DEPOSIT_ID = "paper-start"
_JUST_BEFORE = timedelta(microseconds=1)


def decimal(value: float) -> Decimal:
    """A bar's float as the decimal it was written as (`0.1` → `Decimal("0.1")`)."""
    return Decimal(repr(value))


class BarMemory:
    """The last `keep` bars of every feed, so an intent that arrives after its next bar can
    still fill at that bar; and the newest bar of every symbol, for marks and staleness.
    Used in live mode too (marks, staleness, a flatten's feed)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._feeds: dict[tuple[str, str, str], deque[Bar]] = {}
        self._latest: dict[tuple[str, str], Bar] = {}

    def add(self, bar: Bar) -> bool:
        """Remember `bar`; False when it is not newer than its feed's last bar (a redelivery
        or a late bar), which must not fill anything again."""
        bars = self._feeds.setdefault(bar.feed, deque(maxlen=self.keep))
        if bars and bar.ts <= bars[-1].ts:
            return False
        bars.append(bar)
        latest = self._latest.get((bar.exchange, bar.symbol))
        if latest is None or bar.close_time >= latest.close_time:
            self._latest[(bar.exchange, bar.symbol)] = bar
        return True

    def timeframe(self, exchange: str, symbol: str) -> str | None:
        """The feed paper orders of a symbol fill on: its coarsest timeframe seen (sizing
        works on one timeframe per symbol; a finer feed beside it is for something else)."""
        seen = [tf for (ex, sym, tf) in self._feeds if (ex, sym) == (exchange, symbol)]
        return max(seen, key=TIMEFRAMES.__getitem__) if seen else None

    def bars(self, exchange: str, symbol: str, timeframe: str | None,
             after: datetime | None) -> list[Bar]:
        """Remembered bars of the feed opened after `after`, oldest first."""
        if timeframe is None:
            return []
        return [b for b in self._feeds.get((exchange, symbol, timeframe), ())
                if after is None or b.ts > after]

    def newest(self, exchange: str, symbol: str, timeframe: str | None = None) -> Bar | None:
        """The newest bar of the symbol's feed `timeframe` (default: of any feed)."""
        if timeframe is None:
            return self._latest.get((exchange, symbol))
        bars = self._feeds.get((exchange, symbol, timeframe))
        return bars[-1] if bars else None

    def stale(self, intent: OrderIntent, limit: int, now: datetime | None) -> str | None:
        """Why `intent` is too old to act on, or None: its bar is more than `limit` bars
        behind the newest bar of its feed (its timeframe, else the symbol's coarsest seen);
        given `now` (live: a replay's bars are old by the wall clock), also when its bar
        closed more than `limit` timeframes before `now`, and when its timeframe is unknown
        (right after a start no bar has been seen, and an intent queued for hours must not
        go out)."""
        timeframe = intent.timeframe or self.timeframe(intent.exchange, intent.symbol)
        if timeframe is None:
            return None if now is None else (
                f"cannot tell whether the intent is stale: it names no timeframe and no bar "
                f"of {intent.symbol} was seen")
        step = TIMEFRAMES[timeframe]
        newest = self.newest(intent.exchange, intent.symbol, timeframe)
        if newest is not None and (bars := (newest.ts - intent.bar_ts).total_seconds() / step) > limit:
            return (f"stale intent: its bar {intent.bar_ts.isoformat()} is {bars:g} bars older "
                    f"than the newest {timeframe} bar of {intent.symbol}")
        closed = intent.bar_ts + timedelta(seconds=step)
        if now is not None and (bars := (now - closed).total_seconds() / step) > limit:
            return (f"stale intent: its {timeframe} bar closed at {closed.isoformat()}, "
                    f"{bars:.1f} bars ago by the clock (at most {limit})")
        return None

    def marks(self, positions: Iterable[PositionRow], min_qty: Decimal) -> list[Position]:
        """The positions (flat ones left out) marked to their symbol's newest close."""
        marked = []
        for position in sorted(positions, key=lambda p: p.symbol):
            if abs(position.qty) < min_qty:
                continue
            bar = self.newest(position.exchange, position.symbol)
            last = decimal(bar.close) if bar else None
            marked.append(Position(
                symbol=position.symbol, qty=position.qty, avg_price=position.avg_price,
                last_price=last,
                unrealized_pnl=None if last is None else (last - position.avg_price) * position.qty))
        return marked


@dataclass(frozen=True)
class PaperModel:
    slippage_bps: Decimal
    fee_bps: Decimal
    fill_at: Literal["next_open", "close"]
    max_volume_fraction: Decimal
    quote_currency: str
    min_qty: Decimal

    def fill_after(self, bar_ts: datetime) -> datetime:
        """An order for bar `bar_ts` fills on bars opened after the returned time: the next
        bars (`next_open`), or that bar itself (`close`)."""
        return bar_ts if self.fill_at == "next_open" else bar_ts - _JUST_BEFORE

    def fill(self, order: OrderRow, bar: Bar) -> Fill | None:
        """What `bar` fills of `order`, or None (an earlier bar, no volume, nothing left)."""
        if not order.is_open or (order.fill_after is not None and bar.ts <= order.fill_after):
            return None
        remaining = order.remaining
        cap = decimal(bar.volume) * self.max_volume_fraction
        qty = remaining if remaining - cap < self.min_qty else rounded(cap, down=True)
        if qty < self.min_qty or qty <= 0:
            return None
        base = decimal(bar.open if self.fill_at == "next_open" else bar.close)
        slip = self.slippage_bps / BPS
        price = rounded(base * (1 + slip if order.side == "buy" else 1 - slip))
        fee = rounded(qty * price * self.fee_bps / BPS)
        return Fill(qty=qty, price=price, fee=fee, fee_currency=self.quote_currency, ts=bar.ts)

    def plan(self, change: Change, order: OrderRow, bars: Iterable[Bar],
             position: PositionRow) -> None:
        """Add to `change` what `bars` fill of `order` (of the order's feed, when it names
        one); `position` is the symbol's before this step."""
        for bar in bars:
            if not order.is_open:
                return
            if order.timeframe is not None and bar.timeframe != order.timeframe:
                continue
            fill = self.fill(order, bar)
            if fill is not None:
                order = change.fill(order.changed(timeframe=bar.timeframe), fill, position,
                                    "paper", fill_after=bar.ts)


class PaperDriver:
    """The paper side of one execution service (`desk`): its open orders fill on the bars it
    sees, by `model`, and the account starts with one deposit. Called under the desk's lock."""

    def __init__(self, desk: ExecutionService, model: PaperModel) -> None:
        self.desk = desk
        self.model = model
        self.deposited = False  # the desk sets it from its store at start

    def plan(self, change: Change, order: OrderRow) -> None:
        """Add to `change` what the remembered bars fill of `order`."""
        bars = self.desk.bars
        timeframe = order.timeframe or bars.timeframe(order.exchange, order.symbol)
        self.model.plan(change, order, bars.bars(order.exchange, order.symbol, timeframe,
                                                 order.fill_after), self.desk.position_of(order))

    def may_fill(self, order: OrderRow) -> bool:
        return order.is_open and not order.cancel_requested and (
            order.kind == "flatten" or self.desk.halt_reason() is None)

    async def bar(self, bar: Bar) -> None:
        """Fill what a new `bar` fills of the open orders of its symbol."""
        change = Change()
        for order in list(self.desk.open.values()):
            if (order.exchange, order.symbol) == (bar.exchange, bar.symbol) and self.may_fill(order):
                self.model.plan(change, order, [bar], self.desk.position_of(order))
        await self.desk.commit(change)

    async def catch_up(self) -> None:
        """Trading became allowed: open orders catch up on the bars seen meanwhile."""
        change = Change()
        for order in list(self.desk.open.values()):
            if self.may_fill(order):
                self.plan(change, order)
        await self.desk.commit(change)

    async def deposit(self, ts: datetime) -> None:
        """The paper account's starting balance, once, dated by the first bar or intent seen
        (so a replay of old bars starts with its money)."""
        if self.deposited:
            return
        c, desk = self.desk.config, self.desk
        event = TradeEvent(event_id=DEPOSIT_ID, source="paper", account_id=c.account,
                           strategy_id="paper", symbol=c.quote_currency, kind="deposit",
                           qty=c.starting_balance, price=Decimal(1), ts=ts)
        if await desk.db(desk.store.add_event, event):
            await desk.outbox.send(event)
        self.deposited = True
