"""One feed (exchange, symbol, timeframe): the bars kept, gaps and staleness; and the Source
protocol every kind of market data implements."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from appliance.bus.trading import TIMEFRAMES, Bar, FeedState

if TYPE_CHECKING:
    from modules.trading.market.settings import MarketSettings

FeedKey = tuple[str, str, str]  # exchange, symbol, timeframe — as Bar.feed


def configured_feeds(settings: MarketSettings) -> list[FeedKey]:
    """Every (symbol, timeframe) of the settings, on the feeds' exchange."""
    return [(settings.feed_exchange, s, t) for s in settings.symbols for t in settings.timeframes]
Publish = Callable[[Bar], Awaitable[object]]


class Source(Protocol):
    """Where bars come from. `run` calls `publish` with each closed bar of each feed, in
    time order per feed, and returns when no more bars will come (a replay's end)."""

    feeds: list[FeedKey]
    live: bool  # bars are current: their staleness can be judged against the wall clock

    async def open(self) -> None:
        """Check the settings and reach the data: ConfigError when they are wrong,
        TemporaryError when the data cannot be reached yet."""
        ...

    async def history(self, key: FeedKey) -> list[Bar]:
        """Closed bars before now, oldest first, to keep but not publish."""
        ...

    async def run(self, publish: Publish) -> None: ...

    def problem(self, key: FeedKey) -> str:
        """Why the feed may be late (the last error), or ""."""
        ...

    async def close(self) -> None: ...


class Feed:
    """The last `keep` bars of one feed, its gap count and its stale flag. `live`: its bars
    are current (not a replay's), so the wall clock can judge its staleness."""

    def __init__(self, key: FeedKey, keep: int, live: bool = True) -> None:
        self.key = key
        self.live = live
        self.step = TIMEFRAMES[key[2]]
        self.bars: deque[Bar] = deque(maxlen=keep)
        self.gaps = 0
        self.stale = False
        self.published = 0
        self.state_sent_at: float | None = None
        self.sent: FeedState | None = None

    @property
    def last(self) -> Bar | None:
        return self.bars[-1] if self.bars else None

    def keep(self, bars: list[Bar]) -> None:
        """Remember bars that are not published (history at start)."""
        for bar in bars:
            if self.last is None or bar.ts > self.last.ts:
                self.bars.append(bar)

    def accept(self, bar: Bar) -> Bar | None:
        """`bar` with its gap to the previous bar set, kept; None when it is not newer than
        the last bar (a repeat)."""
        last = self.last
        if last is not None and bar.ts <= last.ts:
            return None
        gap = 0 if last is None else int((bar.ts - last.ts).total_seconds()) // self.step - 1
        if gap > 0:
            bar = bar.model_copy(update={"gap": gap})
            self.gaps += gap
        self.bars.append(bar)
        self.published += 1
        return bar

    def is_stale(self, now: float, after_bars: int, since: float) -> bool:
        """No bar closed within `after_bars` timeframes before `now` (counting from `since`,
        the service's start, while there is no bar)."""
        last = self.last
        reference = last.close_time.timestamp() if last is not None else since
        return now - reference > after_bars * self.step

    def state(self, reason: str = "") -> FeedState:
        exchange, symbol, timeframe = self.key
        last = self.last
        return FeedState(exchange=exchange, symbol=symbol, timeframe=timeframe,
                         last_bar_ts=last.ts if last else None, stale=self.stale,
                         live=self.live, gaps=self.gaps, reason=reason)

    def before(self, ts: datetime | None, limit: int) -> list[Bar]:
        """Up to `limit` kept bars opened before `ts` (all when None), oldest first."""
        bars = [b for b in self.bars if ts is None or b.ts < ts]
        return bars[-limit:] if limit > 0 else []


def utc_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
