"""Synthetic market data: a deterministic geometric random walk per feed, in wall-clock time.

The walk starts `history_bars` bars before the service's start (those bars are kept as
history, not published) and then publishes each bar when it closes. The same seed, symbol,
timeframe and start time always give the same bars.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from datetime import UTC, datetime

from appliance.bus.trading import TIMEFRAMES, Bar
from modules.trading.market.clock import Clock, bar_open
from modules.trading.market.feed import FeedKey, Publish, configured_feeds
from modules.trading.market.settings import MarketSettings, SyntheticSettings


def _sig(value: float) -> float:
    # Ten significant digits keep a bar's JSON short; rounding is monotonic, so the
    # low <= open, close <= high order survives it.
    return float(f"{value:.10g}")


class SyntheticWalk:
    """Bars of one feed from `start` (an open time, s) on, one `next()` at a time."""

    def __init__(self, settings: SyntheticSettings, key: FeedKey, start: int) -> None:
        exchange, symbol, timeframe = key
        self.key = key
        self.step = TIMEFRAMES[timeframe]
        digest = hashlib.sha256(f"{settings.seed}:{symbol}:{timeframe}".encode()).digest()
        self.random = random.Random(int.from_bytes(digest[:8], "big"))
        scale = math.sqrt(self.step / 60)
        self.sigma, self.mu = settings.volatility * scale, settings.drift * self.step / 60
        self.price = settings.start_prices.get(symbol, settings.start_price)
        self.ts = start

    def next(self) -> Bar:
        rnd = self.random
        open_ = self.price
        close = open_ * math.exp(self.mu + self.sigma * rnd.gauss(0.0, 1.0))
        high = max(open_, close) * math.exp(abs(rnd.gauss(0.0, 0.5)) * self.sigma)
        low = min(open_, close) * math.exp(-abs(rnd.gauss(0.0, 0.5)) * self.sigma)
        volume = rnd.lognormvariate(0.0, 0.5) * 10
        exchange, symbol, timeframe = self.key
        bar = Bar(exchange=exchange, symbol=symbol, timeframe=timeframe,
                  ts=datetime.fromtimestamp(self.ts, UTC), open=_sig(open_), high=_sig(high),
                  low=_sig(low), close=_sig(close), volume=_sig(volume))
        self.price = close
        self.ts += self.step
        return bar


class SyntheticSource:
    """The demo's market data: no network, no file."""

    live = True

    def __init__(self, settings: MarketSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.feeds: list[FeedKey] = configured_feeds(settings)
        self.walks: dict[FeedKey, SyntheticWalk] = {}

    async def open(self) -> None:
        now = self.clock.now()
        for key in self.feeds:
            start = bar_open(now, key[2]) - self.settings.history_bars * TIMEFRAMES[key[2]]
            self.walks[key] = SyntheticWalk(self.settings.synthetic, key, start)

    async def history(self, key: FeedKey) -> list[Bar]:
        walk = self.walks[key]
        return [walk.next() for _ in range(self.settings.history_bars)]

    async def run(self, publish: Publish) -> None:
        await asyncio.gather(*(self._feed(walk, publish) for walk in self.walks.values()))

    async def _feed(self, walk: SyntheticWalk, publish: Publish) -> None:
        while True:
            await self.clock.sleep_until(walk.ts + walk.step)  # the next bar's close
            await publish(walk.next())

    def problem(self, key: FeedKey) -> str:
        return ""

    async def close(self) -> None:
        pass
