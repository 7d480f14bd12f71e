"""`circles backtest`: the trading services themselves on a file of bars, without a broker;
parameter sweeps; and the same data through paper trading over a real broker, compared
fill by fill (docs/backtest.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tomllib
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError


def read_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config: {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path}: invalid TOML: {exc}") from None


def _cmd_backtest(args: argparse.Namespace) -> int:
    from modules.trading.backtest import grid, report
    from modules.trading.backtest.engine import run_backtest

    if not args.verbose:
        logging.getLogger("circles").setLevel(logging.ERROR)
    if args.grid and args.compare_paper:
        raise ConfigError("--grid and --compare-paper: one at a time")
    if not args.paper_speed > 0:
        raise ConfigError(f"--paper-speed {args.paper_speed:g}: must be above 0 bars/s")
    config, source = read_config(args.config), str(args.config)
    if args.grid:
        axes = grid.parse(args.grid)
        table = grid.run(config, axes, args.data, source, args.out, args.sort_by,
                         max(1, args.jobs))
        print(table.read_text(), end="")
        print(f"table: {table}")
        return 0
    result = asyncio.run(run_backtest(config, args.data, source))
    doc = report.write(result, args.out)
    data, metrics = doc["data"], doc["metrics"]
    print(f"bars {result.counts['bars']} ({data['timeframe']}, {data['missing_bars']} missing), "
          f"fills {result.counts['fills']}, round trips {metrics.get('round_trips', 0)}")
    print("  ".join(f"{k} {report.plain(metrics.get(k))}"
                    for k in ("net_pnl", "total_return", "max_drawdown_ratio", "sharpe")))
    for letter in result.dead_letters:
        print(f"dead letter: {letter}")
    print(f"report: {args.out / 'report.html'}")
    if args.compare_paper:
        _compare_paper(args, result)
    return 0


def _compare_paper(args: argparse.Namespace, result: Any) -> None:
    from appliance.bus.trading import TIMEFRAMES
    from modules.trading.backtest import compare

    print(f"paper run: {result.rows} bars at {args.paper_speed:g} bars/s over a private broker…",
          flush=True)
    paper = asyncio.run(compare.paper_run(result.settings, result.rows, args.paper_speed,
                                          args.out / "paper" / "logs"))
    pairs = compare.compare(result.events, paper, TIMEFRAMES[result.timeframe])
    slippage = float(result.settings.execution.slippage_bps)
    summary = compare.totals(pairs, result.events, paper, slippage)
    compare.write(args.out, pairs, summary)
    fills = summary["fills"]
    print(f"fills: backtest {fills['backtest']}, paper {fills['paper']}; same {fills['same']}, "
          f"differ {fills['differs']}, only in backtest {fills['only in backtest']}, "
          f"only in paper {fills['only in paper']}")
    print(f"worst price difference {summary['max_abs_price_bps']:.3g} bps "
          f"(slippage {slippage:g} bps); within slippage: {summary['within_slippage']}")
    print(f"fidelity: {args.out / 'fidelity.csv'}, {args.out / 'fidelity.json'}")


def add_commands(sub: Any) -> None:
    bt = sub.add_parser("backtest", help="the trading services on a file of bars, no broker")
    bt.add_argument("--data", type=Path, required=True,
                    help="OHLCV bars, CSV or Parquet: ts, open, high, low, close, volume[, symbol]")
    bt.add_argument("--config", type=Path, required=True,
                    help="a circles.toml with [alpha] [ensemble] [sizing] [execution] [market]")
    bt.add_argument("--out", type=Path, default=Path("backtest-report"),
                    help="the report's folder (default ./backtest-report)")
    bt.add_argument("--grid", nargs="+", metavar="KEY=V1,V2",
                    help="sweep: one backtest per combination, e.g. sizing.fraction=0.2,0.5 "
                         "alpha.models.0.params.fast=5,10")
    bt.add_argument("--sort-by", default="net_pnl",
                    help="the sweep's metric (a key of metrics.json's metrics, or marked_…)")
    bt.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="sweep: processes at once (default: one per core)")
    bt.add_argument("--compare-paper", action="store_true",
                    help="then the same through paper trading over a private broker, compared")
    bt.add_argument("--paper-speed", type=float, default=20.0,
                    help="bars per second of the paper run (default 20)")
    bt.add_argument("--verbose", action="store_true", help="the services' log lines too")
    bt.set_defaults(func=_cmd_backtest)
