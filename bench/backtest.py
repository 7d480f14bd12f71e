"""The backtest against its model: one symbol, one model, 200,000 one-minute bars.

The bars are the market service's synthetic walk (seed 42), written to a CSV file. In one
run this times (1) the whole backtest of that file — the file checked, the replay, every
payload encoded and validated on the in-memory bus as on the real one, market → alpha →
ensemble → sizing → execution (paper) → trade logger, the ledger and its metrics — and
(2) the same bars through the model's own update in a loop (the alpha's history append and
the model's signal), from bars already in memory. Prints `bars`, `fills`,
`backtest_bars_per_s`, `direct_bars_per_s`, and last `backtest/direct` (target ≥ 0.25).
Usage: python bench/backtest.py [--bars 200000] [--model ma_cross]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modules.trading.alpha.history import FeedHistory
from modules.trading.alpha.service import ModelConfig, default_models
from modules.trading.backtest.data import write_csv
from modules.trading.backtest.engine import run_backtest
from modules.trading.market.settings import SyntheticSettings
from modules.trading.market.synthetic import SyntheticWalk

FEED = ("sim", "BTC/USDT", "1m")
START = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp())


def config(model: ModelConfig) -> dict[str, Any]:
    return {"alpha": {"models": [model.model_dump()]},
            "sizing": {"account": "bench"}, "execution": {"account": "bench"},
            "market": {"symbols": [FEED[1]], "timeframes": [FEED[2]]}}


def direct(bars: list[Any], model: ModelConfig, history_bars: int) -> float:
    """Seconds to run the bars through the model's update, as the alpha service does."""
    built = model.build()
    history = FeedHistory(history_bars)
    started = time.perf_counter()
    for bar in bars:
        history.append(bar)
        built.signal(history.view())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=200_000)
    parser.add_argument("--model", default="ma_cross", help="one of the default models")
    args = parser.parse_args()
    logging.getLogger("circles").setLevel(logging.ERROR)
    model = next(m for m in default_models() if m.name == args.model)
    walk = SyntheticWalk(SyntheticSettings(), FEED, START)
    bars = [walk.next() for _ in range(args.bars)]
    with tempfile.TemporaryDirectory(prefix="circles-bench-") as tmp:
        data = Path(tmp) / "bars.csv"
        write_csv(data, bars)
        started = time.perf_counter()
        result = asyncio.run(run_backtest(config(model), data, "bench"))
        backtest_s = time.perf_counter() - started
    assert result.counts["bars"] == args.bars, result.counts
    direct_s = direct(bars, model, 300)
    backtest_rate, direct_rate = args.bars / backtest_s, args.bars / direct_s
    print(f"bars = {args.bars}")
    print(f"fills = {result.counts['fills']}")
    print(f"backtest_bars_per_s = {backtest_rate:.0f}")
    print(f"direct_bars_per_s = {direct_rate:.0f}")
    print(f"backtest/direct = {backtest_rate / direct_rate:.2f}")


if __name__ == "__main__":
    main()
