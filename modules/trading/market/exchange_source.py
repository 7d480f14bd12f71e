"""Market data from an exchange through the ccxt boundary (`modules.trading.exchange`).

At start the last `history_bars` closed bars of each feed are fetched (kept, not
published). Then each feed is polled once per timeframe close (plus `poll_delay_s`) with
`since` = the next expected bar, and every new closed bar is published in order; the
still-forming last candle never is. A bar the exchange skipped shows as a gap on the next
one. The boundary spaces requests by the exchange's rate limit and retries its failures;
a poll that still fails is tried again with a capped backoff (5 s … 60 s, never past the
next close) and the feed's state says why it is behind meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ValidationError

from appliance.bus.trading import TIMEFRAMES, Bar
from appliance.errors import ConfigError, TemporaryError
from modules.trading.exchange import Candle, Exchange, RateLimited, UnknownExchange
from modules.trading.market.clock import Clock, bar_open
from modules.trading.market.feed import FeedKey, Publish, configured_feeds, utc_ms
from modules.trading.market.settings import MarketSettings

log = logging.getLogger("circles.market")
# A poll that failed (after the boundary's own retries) is tried again after 5 s, 10 s, …
# at most 60 s apart, and never later than the next regular poll.
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 60.0


class ExchangeSource:
    live = True

    def __init__(self, settings: MarketSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.feeds: list[FeedKey] = configured_feeds(settings)
        self.exchange: Exchange | None = None
        self.last_ms: dict[FeedKey, int] = {}  # open time of the last closed bar handed on
        self.problems: dict[FeedKey, str] = {}

    async def open(self) -> None:
        if self.exchange is not None:
            return
        try:
            exchange = await Exchange.open(self.settings.ccxt)
        except UnknownExchange as exc:
            raise ConfigError(f"config: market.ccxt.id: {exc}") from None
        try:
            self._check(exchange)
        except ConfigError:
            await exchange.close()
            raise
        self.exchange = exchange

    def _check(self, exchange: Exchange) -> None:
        unknown = [s for s in self.settings.symbols if s not in exchange.symbols]
        if unknown:
            raise ConfigError(f"config: market.symbols: {unknown} not markets of {exchange.id}")
        offered = exchange.timeframes
        missing = [t for t in self.settings.timeframes if offered and t not in offered]
        if missing:
            raise ConfigError(f"config: market.timeframes: {missing} not offered by {exchange.id}")

    async def history(self, key: FeedKey) -> list[Bar]:
        step_ms = TIMEFRAMES[key[2]] * 1000
        now_ms = int(self.clock.now() * 1000)
        since = bar_open(now_ms / 1000, key[2]) * 1000 - self.settings.history_bars * step_ms
        bars = await self._fetch(key, since, now_ms)
        while bars and len(bars) < self.settings.history_bars:  # one page did not cover it
            more = await self._fetch(key, int(bars[-1].ts.timestamp() * 1000) + step_ms, now_ms)
            if not more:
                break
            bars += more
        bars = bars[-self.settings.history_bars:]
        if bars:
            self.last_ms[key] = int(bars[-1].ts.timestamp() * 1000)
        return bars

    async def run(self, publish: Publish) -> None:
        await asyncio.gather(*(self._poll(key, publish) for key in self.feeds))

    async def _poll(self, key: FeedKey, publish: Publish) -> None:
        step = TIMEFRAMES[key[2]]
        wake = self._next_poll(key[2])
        failures = 0
        while True:
            await self.clock.sleep_until(wake)
            now_ms = int(self.clock.now() * 1000)
            last = self.last_ms.get(key)
            since = last + step * 1000 if last is not None else (bar_open(now_ms / 1000, key[2]) - step) * 1000
            try:
                bars = await self._fetch(key, since, now_ms)
            except TemporaryError as exc:
                # The boundary's own retries are spent. Waiting for the next close would leave
                # the feed an hour behind on 1h (a day on 1d): ask again sooner, backing off.
                failures += 1
                delay = min(RETRY_FIRST_S * 2 ** (failures - 1), RETRY_MAX_S)
                if isinstance(exc, RateLimited):  # the exchange said how long to keep quiet
                    delay = max(delay, exc.retry_after_s)
                wake = min(self.clock.now() + delay, self._next_poll(key[2]))
                self.problems[key] = f"bars not fetched, trying again: {exc}"
                log.warning("no bars from the exchange this time",
                            extra={"feed": list(key), "error": str(exc),
                                   "retry_in_s": round(wake - self.clock.now(), 3)})
                continue
            failures = 0
            self.problems.pop(key, None)
            for bar in bars:
                await publish(bar)
                self.last_ms[key] = int(bar.ts.timestamp() * 1000)
            # A full page may have more behind it (after an outage): ask again at once.
            assert self.exchange is not None
            catching_up = len(bars) >= self.exchange.capabilities.ohlcv_limit - 1
            wake = self.clock.now() if catching_up else self._next_poll(key[2])

    def _next_poll(self, timeframe: str) -> float:
        """The next poll time after now: `poll_delay_s` after a bar's close."""
        delay = self.settings.poll_delay_s
        return bar_open(self.clock.now() - delay, timeframe) + TIMEFRAMES[timeframe] + delay

    async def _fetch(self, key: FeedKey, since_ms: int, now_ms: int) -> list[Bar]:
        """Closed bars of `key` opened at or after `since_ms`, oldest first."""
        assert self.exchange is not None, "open() first"
        exchange, symbol, timeframe = key
        step_ms = TIMEFRAMES[timeframe] * 1000
        candles = await self.exchange.fetch_ohlcv(symbol, timeframe, since_ms,
                                                  self.exchange.capabilities.ohlcv_limit)
        bars = []
        for candle in candles:
            if candle[0] < since_ms or candle[0] + step_ms > now_ms:
                continue  # before what we asked for, or still forming
            bar = self._bar(key, candle)
            if bar is not None:
                bars.append(bar)
        return bars

    @staticmethod
    def _bar(key: FeedKey, candle: Candle) -> Bar | None:
        exchange, symbol, timeframe = key
        ts, open_, high, low, close, volume = candle
        fields: dict[str, Any] = {"exchange": exchange, "symbol": symbol, "timeframe": timeframe,
                                  "ts": utc_ms(ts), "open": open_, "high": high, "low": low,
                                  "close": close, "volume": volume}
        try:
            return Bar(**fields)
        except ValidationError as exc:
            log.warning("the exchange sent a bar that is not one; skipped",
                        extra={"feed": list(key), "candle": list(candle), "error": str(exc)})
            return None

    def problem(self, key: FeedKey) -> str:
        return self.problems.get(key, "")

    async def close(self) -> None:
        if self.exchange is not None:
            await self.exchange.close()
            self.exchange = None
