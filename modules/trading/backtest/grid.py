"""Parameter sweeps: `--grid key=v1,v2 …` runs one backtest per combination, in parallel
processes, and writes a table sorted by a chosen metric.

A key is a dotted path into the configuration file, with list positions as numbers
(`sizing.fraction`, `alpha.models.0.params.fast`); each value is read as TOML (`10`, `0.5`,
`true`, `"ema"`), or taken as a string when it is not TOML (`ema`).
"""

from __future__ import annotations

import asyncio
import copy
import csv
import itertools
import logging
import multiprocessing
import tomllib
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError

log = logging.getLogger("circles.backtest")
# Metrics where less is better: these sort ascending, every other metric descending.
LOWER_IS_BETTER = frozenset({"max_drawdown", "max_drawdown_ratio", "max_drawdown_duration_s",
                             "time_under_water_s", "time_under_water_frac", "fees",
                             "marked_max_drawdown_ratio"})
COLUMNS = ("net_pnl", "total_return", "sharpe", "max_drawdown_ratio", "round_trips", "win_rate")


def parse(specs: list[str]) -> list[tuple[str, list[Any]]]:
    """`["a.b=1,2", "c=x"]` → `[("a.b", [1, 2]), ("c", ["x"])]`."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {spec!r}: write key=value1,value2,…")
        axes.append((key, [_value(v.strip()) for v in values.split(",")]))
    return axes


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply(config: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of `config` with `key` (dotted, numbers for list positions) set to `value`."""
    doc = copy.deepcopy(dict(config))
    node: Any = doc
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--grid {key}: {where}: the list has {len(node)} item(s)")
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
            if not last:
                node.setdefault(part, {})
        else:
            raise ConfigError(f"--grid {key}: {'.'.join(parts[:depth])} is not a table or a list")
        if last:
            node[index] = value
        else:
            node = node[index]
    return doc


def combinations(config: Mapping[str, Any],
                 axes: list[tuple[str, list[Any]]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every combination as (the values chosen, the configuration with them)."""
    found = []
    for values in itertools.product(*(v for _, v in axes)):
        chosen = dict(zip((k for k, _ in axes), values, strict=True))
        doc: dict[str, Any] = dict(config)
        for key, value in chosen.items():
            doc = apply(doc, key, value)
        found.append((chosen, doc))
    return found


def figure(doc: Mapping[str, Any], metric: str) -> float | None:
    """A metric of a report's metrics.json: the ledger's, or `marked_*` for the marked ones."""
    if metric.startswith("marked_"):
        value = doc["marked"].get(metric.removeprefix("marked_"))
    else:
        value = doc["metrics"].get(metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def ranked(rows: list[tuple[int, dict[str, Any], dict[str, Any]]],
           metric: str) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
    """Best first by `metric` (see LOWER_IS_BETTER); no value last; ties in grid order."""
    sign = 1.0 if metric.removeprefix("marked_") in LOWER_IS_BETTER or metric in LOWER_IS_BETTER \
        else -1.0

    def key(row: tuple[int, dict[str, Any], dict[str, Any]]) -> tuple[int, float, int]:
        value = figure(row[2], metric)
        return (value is None, 0.0 if value is None else sign * value, row[0])

    return sorted(rows, key=key)


def run(config: Mapping[str, Any], axes: list[tuple[str, list[Any]]], data: Path, source: str,
        out: Path, metric: str, jobs: int) -> Path:
    """Run every combination in `jobs` processes, each with its report in a numbered folder
    of `out`, then write `out/grid.csv`; returns its path."""
    from modules.trading.backtest.engine import check_sections

    combos = combinations(config, axes)
    for _, doc in combos:  # a misspelt key must not run the same backtest N times
        check_sections(doc, f"{source} with --grid")
    width = len(str(len(combos)))
    folders = [out / f"{n + 1:0{width}d}" for n in range(len(combos))]
    # spawn: a fresh interpreter per worker, whatever threads or loops this one has
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, doc, data, source, folder)
                   for (_, doc), folder in zip(combos, folders, strict=True)]
        docs = [f.result() for f in futures]
    if not metric.startswith("marked_") and all(metric not in d["metrics"] for d in docs):
        known = sorted({k for d in docs for k, v in d["metrics"].items() if not isinstance(v, dict)})
        raise ConfigError(f"--sort-by {metric}: no such metric (known: {', '.join(known)}, "
                          "marked_final_equity, marked_max_drawdown_ratio)")
    rows = ranked([(n, chosen, doc) for n, ((chosen, _), doc) in enumerate(zip(combos, docs,
                                                                                 strict=True))],
                  metric)
    table = out / "grid.csv"
    keys = [k for k, _ in axes]
    extra = [c for c in COLUMNS if c != metric]
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["rank", *keys, metric, *extra, "fills", "report"])
        for rank, (n, chosen, doc) in enumerate(rows, 1):
            values = [figure(doc, c) for c in (metric, *extra)]
            writer.writerow([rank, *(chosen[k] for k in keys),
                             *("" if v is None else f"{v:.6g}" for v in values),
                             doc["counts"]["fills"], folders[n].name])
    return table


def run_one(config: dict[str, Any], data: Path, source: str, folder: Path) -> dict[str, Any]:
    """One combination in a worker process: its backtest and its report."""
    from modules.trading.backtest import report
    from modules.trading.backtest.engine import run_backtest

    logging.getLogger("circles").setLevel(logging.ERROR)
    result = asyncio.run(run_backtest(config, data, source))
    return report.write(result, folder)
