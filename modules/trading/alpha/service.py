"""The `alpha` service (L1 of the trading pipeline): every closed bar through every model.

For each MARKET_BAR it publishes one `Signals` message on ALPHA_SIGNALS with the bar and the
signal of each model that covers the feed, in the configured order. A model's signal is a
function of the feed's last bars only (models/base.py), so the same bars give the same
messages, live or in a backtest. On the first bar of a feed the service asks the market
service for the bars before it (`warmup_from_market`), so the models need not wait for the
stream to fill their windows; a redelivered or older bar is ignored.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from appliance.bus import registry, slug
from appliance.bus.message import Received
from appliance.bus.trading import Bar, Signals, check_feed
from appliance.config import Section
from appliance.errors import CirclesError
from appliance.runtime import Service, subscribe
from modules.trading.alpha.history import FeedHistory
from modules.trading.alpha.models import REGISTRY, Model

log = logging.getLogger("circles.alpha")


class ModelConfig(Section):
    """One model: its name in the signals, its kind (a key of the models' REGISTRY), its
    parameters, and the symbols it covers (none: every feed)."""

    name: str = Field(min_length=1, max_length=64)
    kind: str
    params: dict[str, Any] = {}
    symbols: list[str] = []

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in REGISTRY:
            raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(sorted(REGISTRY))})")
        return kind

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        kind = info.data.get("kind")
        if kind is None:  # the kind's own error is reported
            return params
        # Its ValidationError keeps each error's location under `params`.
        return REGISTRY[kind].params_model.model_validate(params).model_dump()

    @field_validator("symbols")
    @classmethod
    def _usable_symbols(cls, symbols: list[str]) -> list[str]:
        for symbol in symbols:
            slug(symbol)  # ValueError when nothing of it is usable
        return symbols

    def build(self) -> Model[Any]:
        return REGISTRY[self.kind].build(self.name, self.params)


def default_models() -> list[ModelConfig]:
    return [
        ModelConfig(name="ma_cross", kind="ma_cross", params={"fast": 10, "slow": 30}),
        ModelConfig(name="rsi", kind="rsi_reversion",
                    params={"period": 14, "oversold": 30, "overbought": 70}),
        ModelConfig(name="breakout", kind="breakout", params={"period": 20, "fade_bars": 10}),
    ]


class AlphaSettings(Section):
    models: list[ModelConfig] = Field(default_factory=default_models,
                                      description="the models, in the order of the signals")
    history_bars: int = Field(300, ge=2, le=100_000, validate_default=True,
                              description="bars kept per feed")
    warmup_from_market: bool = Field(True, description="ask market for the bars before a "
                                     "feed's first one")
    warmup_timeout_s: float = Field(5.0, gt=0, le=60, description="how long to wait for them")

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        seen: set[str] = set()
        for model in models:
            if model.name in seen:
                raise ValueError(f"two models are named {model.name!r}")
            seen.add(model.name)
        return models

    @field_validator("history_bars")
    @classmethod
    def _covers_warmups(cls, history_bars: int, info: ValidationInfo) -> int:
        for model in info.data.get("models", []):
            needed = model.build().warmup
            if needed > history_bars:
                raise ValueError(f"model {model.name!r} needs {needed} bars, more than that")
        return history_bars


class AlphaService(Service):
    name = "alpha"
    Settings = AlphaSettings

    async def start(self) -> None:
        self.models: list[tuple[Model[Any], frozenset[str]]] = [
            (config.build(), frozenset(slug(s) for s in config.symbols))
            for config in self.config.models]
        self.feeds: dict[tuple[str, str, str], FeedHistory] = {}
        # Feeds whose earlier bars are being asked for: the bars that came meanwhile, in
        # order. The request runs beside the receive loop, so commands and other feeds are
        # not held up while the market service takes its time (or is down).
        self.warming: dict[tuple[str, str, str], list[Bar]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.published = 0

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()

    @subscribe(registry.MARKET_BAR)
    async def on_bar(self, msg: Received) -> None:
        bar: Bar = msg.data
        check_feed(msg.params, bar)
        waiting = self.warming.get(bar.feed)
        history = self.feeds.get(bar.feed)
        if waiting is not None:
            if bar.ts > waiting[-1].ts:
                waiting.append(bar)
            return
        if history is None and self.config.warmup_from_market:
            self.warming[bar.feed] = [bar]
            task = asyncio.create_task(self._warm_up(bar), name=f"warm-up {bar.feed}")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        if history is None:
            history = self.feeds[bar.feed] = FeedHistory(self.config.history_bars)
        elif history.last_ts is not None and bar.ts <= history.last_ts:
            log.debug("bar not newer than the last one; ignored",
                      extra={"feed": list(bar.feed), "ts": bar.ts.isoformat()})
            return
        await self._publish(bar, history)

    async def _publish(self, bar: Bar, history: FeedHistory) -> None:
        history.append(bar)
        await self.bus.send(registry.ALPHA_SIGNALS, self.signals(bar, history),
                            exchange=bar.exchange, symbol=bar.symbol, timeframe=bar.timeframe)
        self.published += 1

    async def _warm_up(self, first: Bar) -> None:
        """Fill the feed's history from the market service, then publish the signals of the
        bars that came meanwhile, in order; the feed is handled as usual afterwards."""
        history = FeedHistory(self.config.history_bars)
        try:
            for old in await self.earlier_bars(first):
                history.append(old)
            waiting = self.warming[first.feed]
            done = 0
            while done < len(waiting):  # bars may still come while these are sent
                await self._publish(waiting[done], history)
                done += 1
            self.feeds[first.feed] = history
        except Exception:  # noqa: BLE001 - the feed must not stay stuck in warm-up
            log.exception("warm-up failed", extra={"feed": list(first.feed)})
            self.feeds.setdefault(first.feed, history)
        finally:
            self.warming.pop(first.feed, None)

    def signals(self, bar: Bar, history: FeedHistory) -> Signals:
        """The signal of every model covering the bar's symbol, after `history` (which ends
        with `bar`)."""
        view = history.view()
        symbol = slug(bar.symbol)
        return Signals(bar=bar, signals=[model.signal(view) for model, symbols in self.models
                                         if not symbols or symbol in symbols])

    async def earlier_bars(self, bar: Bar) -> list[Bar]:
        """Up to `history_bars − 1` bars of the feed before `bar`, oldest first, from the
        market service's `history` command; none when it does not answer in time."""
        limit = self.config.history_bars - 1
        args = {"exchange": bar.exchange, "symbol": bar.symbol, "timeframe": bar.timeframe,
                "limit": limit, "before": bar.ts.isoformat()}
        feed = list(bar.feed)
        try:
            reply = await self.bus.request("market", "history", args,
                                           timeout=self.config.warmup_timeout_s)
        except CirclesError as exc:
            log.warning("no warm-up from market; starting from the stream",
                        extra={"feed": feed, "error": str(exc)})
            return []
        if not reply.ok or not isinstance(reply.result, list):
            log.warning("no warm-up from market; starting from the stream",
                        extra={"feed": feed, "error": reply.error or "the result is not a list"})
            return []
        by_ts: dict[Any, Bar] = {}
        refused = 0
        for item in reply.result:
            try:
                old = Bar.model_validate(item)
            except ValidationError:
                refused += 1
                continue
            if old.feed == bar.feed and old.ts < bar.ts:
                by_ts[old.ts] = old
        bars = [by_ts[ts] for ts in sorted(by_ts)][-limit:]
        log.info("warmed up from market", extra={"feed": feed, "bars": len(bars),
                                                 "refused": refused})
        return bars

    def status_text(self) -> str:
        return f"{len(self.feeds)} feeds, {self.published} signals published"
