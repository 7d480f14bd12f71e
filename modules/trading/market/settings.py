"""Settings of the `market` service: `[market]` and one sub-section per source.

```toml
[market]
source = "synthetic"          # "synthetic" (the demo) | "exchange" (ccxt) | "replay" (a file)
exchange = "sim"              # the feed's exchange name in topics and bars; see `feed_exchange`
symbols = ["BTC/USDT"]
timeframes = ["1m"]
history_bars = 500            # bars kept per feed (answers `history`)
stale_after_bars = 3          # a feed without a new bar for this many timeframes is stale

[market.synthetic]            # source = "synthetic"
seed = 42

[market.ccxt]                 # source = "exchange": modules.trading.exchange.ExchangeSettings
id = "binance"

[market.replay]               # source = "replay"
file = "/var/lib/circles/btc-1m.csv"
speed = 0                     # bars per second; 0 = as fast as the broker takes them
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from appliance.bus.trading import Timeframe
from appliance.config import Section
from modules.trading.exchange import ExchangeSettings


class SyntheticSettings(Section):
    """A deterministic geometric random walk per feed: the same seed, symbol, timeframe and
    start time give the same bars."""

    seed: int = 42
    start_price: float = Field(100.0, gt=0, description="the first open of a symbol not in start_prices")
    start_prices: dict[str, float] = Field(default_factory=lambda: {"BTC/USDT": 60000.0,
                                                                    "ETH/USDT": 3000.0})
    volatility: float = Field(0.002, ge=0, le=0.5,
                              description="standard deviation of the log return of one 1m bar; "
                                          "longer bars scale it by the square root of their length")
    drift: float = Field(0.0, ge=-0.1, le=0.1, description="mean log return of one 1m bar")


class ReplaySettings(Section):
    """Replay of an OHLCV file, CSV or Parquet (Parquet needs the extra `circles[parquet]`,
    i.e. pyarrow), with the columns `ts` (ISO 8601, naive =
    UTC, or epoch milliseconds), `open`, `high`, `low`, `close`, `volume` and optionally
    `symbol`. Rows must be in time order per symbol without duplicate times; missing bars
    are reported as `Bar.gap`, not refused."""

    file: Path | None = None
    speed: float = Field(0.0, ge=0, description="bars per second; 0 = as fast as the broker takes them")
    symbol: str | None = Field(None, min_length=1, max_length=64,
                               description="the symbol of a file without a symbol column "
                                           "(default: the first of market.symbols)")
    timeframe: Timeframe | None = Field(None, description="default: inferred from the time steps")


class MarketSettings(Section):
    """`[market]`. `exchange` names the feeds in topics and bars; when left unset it is
    "sim" for the synthetic and replay sources and the ccxt id (`market.ccxt.id`) for the
    exchange source. Stale checks compare the last bar's close with the wall clock, so they
    are off for replay (replayed times are old); replay still publishes each feed's state."""

    source: Literal["synthetic", "exchange", "replay"] = "synthetic"
    exchange: str | None = Field(None, min_length=1, max_length=64)
    symbols: list[str] = Field(default_factory=lambda: ["BTC/USDT"], min_length=1)
    timeframes: list[Timeframe] = Field(default_factory=lambda: ["1m"], min_length=1)  # type: ignore[arg-type]
    history_bars: int = Field(500, ge=1, le=100_000)
    stale_after_bars: int = Field(3, ge=1)
    poll_delay_s: float = Field(2.0, ge=0, le=60,
                                description="exchange source: wait this long after a bar closes "
                                            "before asking for it")
    synthetic: SyntheticSettings = SyntheticSettings()
    ccxt: ExchangeSettings = ExchangeSettings()
    replay: ReplaySettings = ReplaySettings()

    @model_validator(mode="after")
    def _source_complete(self) -> MarketSettings:
        if self.source == "replay" and self.replay.file is None:
            raise ValueError("market.replay.file: required when market.source = 'replay'")
        return self

    @property
    def feed_exchange(self) -> str:
        """The exchange name of every feed (see the class docstring)."""
        if self.exchange:
            return self.exchange
        return self.ccxt.id if self.source == "exchange" else "sim"
