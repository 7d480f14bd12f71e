"""Paper trading: the bars the service has seen, and how a bar fills a paper order.

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
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from appliance.bus.trading import TIMEFRAMES, Bar
from modules.trading.execution.orders import Fill, OrderRow, rounded

BPS = Decimal(10_000)
_JUST_BEFORE = timedelta(microseconds=1)


def decimal(value: float) -> Decimal:
    """A bar's float as the decimal it was written as (`0.1` → `Decimal("0.1")`)."""
    return Decimal(repr(value))


class BarMemory:
    """The last `keep` bars of every feed, so an intent that arrives after its next bar can
    still fill at that bar; and the newest bar of every symbol, for marks and staleness."""

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
