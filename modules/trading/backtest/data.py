"""OHLCV files for the backtest: writing bars as the CSV the market's replay reads (its
reader, `modules.trading.market.replay`, checks every row, the order and duplicates)."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from appliance.bus.trading import Bar

COLUMNS = ("ts", "symbol", "open", "high", "low", "close", "volume")


def write_csv(path: Path, bars: Iterable[Bar]) -> int:
    """Write `bars` as CSV with a header; returns how many."""
    count = 0
    with path.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle, lineterminator="\n")
        out.writerow(COLUMNS)
        for bar in bars:
            out.writerow((bar.ts.isoformat().replace("+00:00", "Z"), bar.symbol, repr(bar.open),
                          repr(bar.high), repr(bar.low), repr(bar.close), repr(bar.volume)))
            count += 1
    return count
