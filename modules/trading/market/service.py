"""The `market` service (L0 of the trading pipeline): closed OHLCV bars onto the bus.

Each feed (exchange, symbol, timeframe) gets every closed bar on MARKET_BAR, in order, and
its state on the retained MARKET_FEED: at start, whenever its stale flag, gap count or
reason changes, and at least once per timeframe. Bars come from one source
(`[market] source`): synthetic (the demo), an exchange through ccxt, or a replayed file.
The last `history_bars` bars of each feed are kept and answer the `history` command, so
the next layers can warm up. A replay's feed states say `live = false` (its bars are old).
At start, the retained states of feeds it does not serve (a symbol since removed, an earlier
replay, another source or exchange) are cleared: the market is their only publisher, and
risk would otherwise judge them stale for ever.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from appliance.bus import registry
from appliance.bus.message import Received
from appliance.bus.payloads import CommandRequest
from appliance.bus.topics import slug
from appliance.bus.trading import Bar
from appliance.config import CoreSettings
from appliance.errors import TemporaryError
from appliance.runtime import Service, subscribe
from modules.trading.market.clock import Clock, WallClock
from modules.trading.market.exchange_source import ExchangeSource
from modules.trading.market.feed import Feed, FeedKey, Source
from modules.trading.market.replay import ReplaySource
from modules.trading.market.settings import MarketSettings
from modules.trading.market.synthetic import SyntheticSource

log = logging.getLogger("circles.market")
HISTORY_MAX = 1000  # bars per `history` reply: 1000 bars stay well under the bus's payload limit
RETRY_MAX_S = 60.0


class MarketService(Service):
    name = "market"
    Settings = MarketSettings

    def __init__(self, settings: CoreSettings, bus: Any) -> None:
        super().__init__(settings, bus)
        self.clock: Clock = WallClock()  # tests put a hand-moved clock here before start()
        self.feeds: dict[FeedKey, Feed] = {}
        self.published = 0
        self.phase = "starting"
        self.problem = ""  # why the source cannot be read now, if it cannot
        self.opened = False

    async def start(self) -> None:
        config: MarketSettings = self.config
        self.started_at = self.clock.now()
        self.source: Source = self._source(config)
        if not isinstance(self.source, ExchangeSource):
            await self.source.open()  # a bad replay file stops the service here (exit 78)
            self.opened = True
        self._add_feeds()

    def _source(self, config: MarketSettings) -> Source:
        kinds: dict[str, Any] = {"synthetic": SyntheticSource, "exchange": ExchangeSource,
                                 "replay": ReplaySource}
        source: Source = kinds[config.source](config, self.clock)
        return source

    def _add_feeds(self) -> None:
        for key in self.source.feeds:
            self.feeds.setdefault(key, Feed(key, self.config.history_bars, self.source.live))

    async def run(self) -> None:
        monitor = asyncio.create_task(self._monitor(), name="feed-monitor")
        try:
            await self._send_states(force=True)
            await self._prepare()
            self.phase = "running"
            await self._send_states(force=True)
            await self.source.run(self.publish_bar)
            self.phase = "finished"
            await self._send_states(force=True)
            await monitor
        finally:
            monitor.cancel()

    async def _prepare(self) -> None:
        """Open the source and keep each feed's history, retrying while the data cannot be
        reached (the feeds go stale meanwhile, saying why)."""
        delay = 1.0
        while True:
            try:
                if not self.opened:  # an exchange: reached here, retried while it is away
                    await self.source.open()
                    self.opened = True
                for key, feed in self.feeds.items():
                    feed.keep(await self.source.history(key))
                self.problem = ""
                return
            except TemporaryError as exc:
                self.problem = str(exc)
                log.warning("market data not reachable; retrying",
                            extra={"error": str(exc), "retry_in_s": delay})
                await self._send_states()
                await self.clock.sleep_until(self.clock.now() + delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def publish_bar(self, bar: Bar) -> Bar | None:
        """Publish a closed bar of the source, with its gap to the feed's previous bar; None
        when it is not newer than that one (skipped). The backtest feeds the replay here."""
        feed = self.feeds.get(bar.feed)
        if feed is None:
            feed = self.feeds[bar.feed] = Feed(bar.feed, self.config.history_bars,
                                               self.source.live)
        accepted = feed.accept(bar)
        if accepted is None:
            log.debug("bar not newer than the last one; skipped", extra={"feed": list(bar.feed)})
            return None
        # A replay must not outrun the broker: wait for its acknowledgement of each bar.
        await self.bus.send(registry.MARKET_BAR, accepted, wait=not self.source.live,
                            exchange=bar.exchange, symbol=bar.symbol, timeframe=bar.timeframe)
        self.published += 1
        if accepted.gap or feed.stale:
            await self._send_state(feed)
        return accepted

    @subscribe(registry.MARKET_FEED)
    async def on_feed_state(self, msg: Received) -> None:
        """Clear the state of a feed not served now: only the market publishes feed states,
        so it is left over from an earlier run. Our own states, echoed, and deletions pass."""
        if msg.data is None or any(msg.topic == _state_topic(key) for key in self.feeds):
            return
        log.info("clearing the state of a feed no longer served", extra={"topic": msg.topic})
        await self.bus.publish(msg.topic, b"", retain=True)

    async def _monitor(self) -> None:
        tick = min(max(min(f.step for f in self.feeds.values()) / 10, 1.0), 10.0) \
            if self.feeds else 10.0
        while True:
            await self.clock.sleep_until(self.clock.now() + tick)
            await self._send_states()

    async def _send_states(self, force: bool = False) -> None:
        for feed in list(self.feeds.values()):
            await self._send_state(feed, force)

    async def _send_state(self, feed: Feed, force: bool = False) -> None:
        now = self.clock.now()
        if self.source.live:
            feed.stale = feed.is_stale(now, self.config.stale_after_bars, self.started_at)
        state = feed.state(self._reason(feed, now))
        sent = feed.sent
        changed = sent is None or (sent.stale, sent.gaps, sent.reason) != \
            (state.stale, state.gaps, state.reason)
        due = feed.state_sent_at is None or now - feed.state_sent_at >= feed.step
        if not (force or changed or due):
            return
        exchange, symbol, timeframe = feed.key
        await self.bus.send(registry.MARKET_FEED, state, exchange=exchange, symbol=symbol,
                            timeframe=timeframe)
        if changed and sent is not None:
            log.info("feed state changed", extra={"feed": list(feed.key), "stale": state.stale,
                                                  "gaps": state.gaps, "reason": state.reason})
        feed.sent, feed.state_sent_at = state, now

    def _reason(self, feed: Feed, now: float) -> str:
        if self.phase == "finished":
            return "replay finished"
        problem = self.problem or self.source.problem(feed.key)
        if feed.stale:
            last = feed.last
            since = f"since {last.close_time.isoformat()}" if last else "since the start"
            return f"no new bar {since}" + (f": {problem}" if problem else "")
        return problem

    # -- commands ----------------------------------------------------------------------------
    async def cmd_history(self, request: CommandRequest) -> list[dict[str, Any]]:
        """The feed's kept bars opened before `before` (ISO 8601; all when absent), oldest
        first, at most `limit` (default and cap 1000). Args: `exchange` (optional),
        `symbol`, `timeframe` (each optional when only one feed matches)."""
        args = request.model_extra or {}
        feed = self._feed(args.get("exchange"), args.get("symbol"), args.get("timeframe"))
        limit = min(int(args.get("limit", HISTORY_MAX)), HISTORY_MAX)
        before = args.get("before")
        ts = None
        if before is not None:
            ts = datetime.fromisoformat(str(before).replace("Z", "+00:00"))
            ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
        return [bar.model_dump(mode="json") for bar in feed.before(ts, limit)]

    async def cmd_feeds(self, request: CommandRequest) -> dict[str, Any]:
        """Every feed with its state, the bars it keeps and the bars it published."""
        return {"source": self.config.source, "phase": self.phase, "published": self.published,
                "feeds": [{**feed.state(self._reason(feed, self.clock.now())).model_dump(mode="json"),
                           "bars": len(feed.bars), "published": feed.published}
                          for feed in self.feeds.values()]}

    def _feed(self, exchange: Any, symbol: Any, timeframe: Any) -> Feed:
        def same(value: Any, name: str) -> bool:
            return value is None or slug(str(value)) == slug(name)

        found = [f for k, f in self.feeds.items()
                 if same(exchange, k[0]) and same(symbol, k[1]) and same(timeframe, k[2])]
        if len(found) != 1:
            known = ", ".join("/".join(k) for k in self.feeds) or "none yet"
            what = "no feed" if not found else "several feeds"
            raise ValueError(f"{what} for exchange={exchange!r} symbol={symbol!r} "
                             f"timeframe={timeframe!r}; feeds: {known}")
        return found[0]

    def status_text(self) -> str:
        phase = "replay finished" if self.phase == "finished" else self.phase
        return (f"{self.config.source} {phase}: {len(self.feeds)} feeds, "
                f"{self.published} bars published")

    async def stop(self) -> None:
        source = getattr(self, "source", None)
        if source is not None:
            await source.close()


def _state_topic(key: FeedKey) -> str:
    exchange, symbol, timeframe = key
    return str(registry.MARKET_FEED.topic(exchange=exchange, symbol=symbol, timeframe=timeframe))
