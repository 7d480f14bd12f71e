"""Replay of an OHLCV file (CSV or Parquet) onto the bus.

Columns: `ts` (ISO 8601 — a naive time is UTC — or epoch milliseconds), `open`, `high`,
`low`, `close`, `volume`, and optionally `symbol` (else `[market.replay] symbol`, else the
first of `market.symbols`). The timeframe is `[market.replay] timeframe`, else the largest
step that divides every step between two rows of a symbol.

The whole file is checked at start, so a bad file stops the service before anything is
published (ConfigError naming `market.replay.file`, the file and the line — the row for
Parquet). Rows are then read again in chunks while publishing, so a large file is never
held in memory. Missing bars are not errors: they show as `Bar.gap`.

Parquet needs pyarrow, an optional extra (`pip install 'circles[parquet]'`); without it a
Parquet file stops the service the same way, saying so.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

from appliance.bus.trading import TIMEFRAMES, Bar
from appliance.errors import ConfigError
from modules.trading.market.clock import Clock
from modules.trading.market.feed import FeedKey, Publish, utc_ms
from modules.trading.market.settings import MarketSettings

log = logging.getLogger("circles.market")
COLUMNS = ("ts", "open", "high", "low", "close", "volume")
CHUNK = 1000  # rows read per trip to the reading thread


@dataclass(frozen=True, slots=True)
class Row:
    line: int  # the CSV line (the header is line 1), or the Parquet row (the first is 1)
    symbol: str
    ts_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float


class BadFile(ConfigError):
    """The replay file cannot be replayed; the message names the key, the file and the line
    (`where`: "line 7", "row 7", "header" or "file")."""

    def __init__(self, path: Path, where: str, problem: str) -> None:
        super().__init__(f"config: market.replay.file: {path}: {where}: {problem}")
        self.path, self.where, self.problem = path, where, problem

    def __reduce__(self) -> tuple[type[BadFile], tuple[Path, str, str]]:  # crosses processes
        return BadFile, (self.path, self.where, self.problem)


def _ts_ms(value: Any) -> int:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"ts {value!r} is not a whole number of milliseconds")
        return int(value)
    else:
        text = str(value).strip()
        if text.lstrip("-").isdigit():
            return int(text)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _number(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} {value!r} is not a finite number")
    return number


def _row(line: int, record: dict[str, Any], symbol: str) -> Row:
    ts_ms = _ts_ms(record["ts"])
    o, h, lo, c, v = (_number(k, record[k]) for k in COLUMNS[1:])
    if min(o, h, lo, c) <= 0:
        raise ValueError("prices must be positive")
    if v < 0:
        raise ValueError(f"volume {v} is negative")
    if lo > h:
        raise ValueError(f"low {lo} > high {h}")
    if not lo <= min(o, c) or not max(o, c) <= h:
        raise ValueError(f"open {o} and close {c} must lie within low {lo} .. high {h}")
    name = str(record.get("symbol") or symbol).strip()
    return Row(line, name, ts_ms, o, h, lo, c, v)


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader, [])]
        _check_columns(path, header)
        for values in reader:
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise BadFile(path, f"line {reader.line_num}",
                            f"{len(values)} fields where the header has {len(header)}")
            yield reader.line_num, dict(zip(header, values, strict=True))


def _parquet_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq  # lazily: only a Parquet replay needs pyarrow
    except ImportError:  # an optional extra: `circles[parquet]`
        raise BadFile(path, "file", "replaying a Parquet file needs pyarrow, which is not installed: "
                                  "pip install 'circles[parquet]' (or replay a CSV file)") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors have no common base
        raise BadFile(path, "file", f"not a Parquet file: {exc}") from None
    names = [name.lower() for name in parquet.schema_arrow.names]
    _check_columns(path, names)
    row = 0
    for batch in parquet.iter_batches(batch_size=CHUNK):
        columns = {name.lower(): batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
        for i in range(batch.num_rows):
            row += 1
            yield row, {name: values[i] for name, values in columns.items()}


def _check_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise BadFile(path, "header", f"missing column(s) {missing}; need {list(COLUMNS)}"
                                    " and optionally 'symbol'")


def read_rows(path: Path, symbol: str) -> Iterator[Row]:
    """Every row of the file, checked one by one; BadFile names the line of the first bad
    one. Order and duplicates are checked by `ReplayFile.check`."""
    parquet = path.suffix.lower() in (".parquet", ".pq")
    where = "row" if parquet else "line"
    try:
        records = _parquet_records(path) if parquet else _csv_records(path)
        for line, record in records:
            try:
                yield _row(line, record, symbol)
            except (ValueError, OverflowError, OSError) as exc:
                raise BadFile(path, f"{where} {line}", str(exc)) from None
    except FileNotFoundError:
        raise BadFile(path, "file", "does not exist") from None
    except (UnicodeDecodeError, csv.Error, IsADirectoryError, PermissionError) as exc:
        raise BadFile(path, "file", str(exc)) from None


class ReplayFile:
    """One checked replay file: its feeds and timeframe."""

    def __init__(self, path: Path, symbol: str, timeframe: str | None) -> None:
        self.path, self.symbol, self.timeframe = path, symbol, timeframe
        self.symbols: list[str] = []
        self.rows = 0

    def check(self) -> None:
        """Read the whole file (blocking): every row valid, times strictly increasing per
        symbol, the timeframe known. Raises BadFile."""
        where = "row" if self.path.suffix.lower() in (".parquet", ".pq") else "line"
        last: dict[str, int] = {}
        step_gcd = 0
        fixed = TIMEFRAMES[self.timeframe] * 1000 if self.timeframe else None
        for row in read_rows(self.path, self.symbol):
            self.rows += 1
            previous = last.get(row.symbol)
            if previous is None:
                self.symbols.append(row.symbol)
            elif row.ts_ms == previous:
                raise BadFile(self.path, f"{where} {row.line}", f"duplicate time {utc_ms(row.ts_ms).isoformat()}")
            elif row.ts_ms < previous:
                raise BadFile(self.path, f"{where} {row.line}",
                            f"time {utc_ms(row.ts_ms).isoformat()} is before the previous row's "
                            f"{utc_ms(previous).isoformat()} (rows must be sorted by time)")
            else:
                step = row.ts_ms - previous
                if fixed and step % fixed:
                    raise BadFile(self.path, f"{where} {row.line}",
                                f"{step / 1000:g} s after the previous row: not a multiple of "
                                f"the timeframe {self.timeframe}")
                step_gcd = math.gcd(step_gcd, step)
            last[row.symbol] = row.ts_ms
        if not self.rows:
            raise BadFile(self.path, "file", "has no rows")
        if self.timeframe is None:
            inferred = [name for name, seconds in TIMEFRAMES.items() if seconds * 1000 == step_gcd]
            if not inferred:
                raise BadFile(self.path, "file", f"the steps between rows ({step_gcd / 1000:g} s) "
                                               "match no timeframe; set market.replay.timeframe")
            self.timeframe = inferred[0]


class ReplaySource:
    """Publishes every row of the file once, in file order, then stays idle."""

    live = False

    def __init__(self, settings: MarketSettings, clock: Clock) -> None:
        assert settings.replay.file is not None
        self.settings = settings
        self.clock = clock
        self.file = ReplayFile(settings.replay.file, settings.replay.symbol or settings.symbols[0],
                               settings.replay.timeframe)
        self.feeds: list[FeedKey] = []
        self.finished = False

    async def open(self) -> None:
        await asyncio.to_thread(self.file.check)
        assert self.file.timeframe is not None
        self.feeds = [(self.settings.feed_exchange, s, self.file.timeframe) for s in self.file.symbols]
        log.info("replay file checked", extra={"file": str(self.file.path), "rows": self.file.rows,
                                               "feeds": [list(k) for k in self.feeds]})

    async def history(self, key: FeedKey) -> list[Bar]:
        return []

    async def run(self, publish: Publish) -> None:
        rows = read_rows(self.file.path, self.file.symbol)
        speed = self.settings.replay.speed
        exchange, timeframe = self.settings.feed_exchange, self.file.timeframe
        while chunk := await asyncio.to_thread(lambda: list(islice(rows, CHUNK))):
            for row in chunk:
                bar = Bar(exchange=exchange, symbol=row.symbol, timeframe=timeframe,
                          ts=utc_ms(row.ts_ms), open=row.open, high=row.high, low=row.low,
                          close=row.close, volume=row.volume)
                await publish(bar)
                if speed:
                    await asyncio.sleep(1 / speed)
        self.finished = True
        log.info("replay finished", extra={"file": str(self.file.path), "rows": self.file.rows})

    def problem(self, key: FeedKey) -> str:
        return "replay finished" if self.finished else ""

    async def close(self) -> None:
        pass
