"""`circles backtest`: the trading services on a file of bars, without a broker; its report,
sweeps, data checks, and the comparison with paper trading over a private broker."""

from __future__ import annotations

import asyncio
import csv
import json
import tomllib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ConfigError
from modules.trading.backtest import grid
from modules.trading.backtest.data import write_csv
from modules.trading.backtest.engine import run_backtest
from modules.trading.backtest.report import thin
from modules.trading.market.settings import SyntheticSettings
from modules.trading.market.synthetic import SyntheticWalk
from tests.helpers import circles, circles_env
from tests.test_pipeline import CONFIG as PIPELINE_CONFIG
from tests.test_pipeline import write_bars

T0 = datetime(2026, 3, 2, tzinfo=UTC)
REPORT_FILES = ["equity.png", "metrics.json", "report.html", "trades.csv"]

# One model that is +1 after a rise and 0 after no move: ma_cross over the last 2 closes,
# scaled so that tanh saturates (tanh(1000 · 0.04) is exactly 1.0 in float64); confidence is
# the efficiency ratio of those 2 closes: 1 when they differ, 0 when they are equal.
HAND_CONFIG = """
[alpha]
models = [{ name = "step", kind = "ma_cross", params = { fast = 1, slow = 2, scale = 1000 } }]

[sizing]
account = "hand"
fraction = 0.505
qty_step = 1
min_change = 0.4

[execution]
account = "hand"
slippage_bps = 10
fee_bps = 10
starting_balance = 10000

[market]
symbols = ["BTC/USDT"]
"""
# Closes; each bar opens at the previous close.
HAND_CLOSES = [100, 125, 150, 120, 100, 125, 125, 125]


def bar_rows(closes: list[float], start: datetime = T0) -> list[list[str]]:
    rows, previous = [], closes[0]
    for i, close in enumerate(closes):
        rows.append([(start + timedelta(minutes=i)).isoformat(), str(previous),
                     str(max(previous, close) + 1), str(min(previous, close) - 1), str(close), "1e6"])
        previous = close
    return rows


def write_rows(path: Path, rows: list[list[str]], header: str = "ts,open,high,low,close,volume") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def backtest(config: str | dict[str, Any], data: Path) -> Any:
    doc = tomllib.loads(config) if isinstance(config, str) else config
    return asyncio.run(run_backtest(doc, data, "test.toml"))


def fills(events: list[dict[str, Any]]) -> list[tuple[str, str, Decimal, Decimal, Decimal]]:
    return [(e["ts"], e["side"], Decimal(e["qty"]), Decimal(e["price"]), Decimal(e["fee"]))
            for e in events if e["kind"] == "fill"]


def test_a_known_strategy_gives_the_trades_computed_by_hand(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "steps.csv", bar_rows(HAND_CLOSES))
    result = backtest(HAND_CONFIG, data)

    def at(minute: int) -> str:
        return (T0 + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    # bar 0: one close, the model is not warm: target 0, nothing to do.
    # bar 1: 100 → 125, exposure +1: ⌊0.505 × 10000 / 125⌋ = 40, filled at bar 2's open
    #        125 + 10 bps = 125.125, fee 40 × 125.125 × 10 bps = 5.005.
    # bar 2: 125 → 150, still +1: ⌊5050 / 150⌋ = 33, a change of 7 × 150 = 1050, below
    #        min_change (0.4 × equity): nothing.
    # bar 3: 150 → 120, −1 and no shorts: 0, sold at bar 4's open 120 − 10 bps = 119.88,
    #        fee 40 × 119.88 × 10 bps = 4.7952.
    # bar 4: down again, already flat: nothing.
    # bar 5: 100 → 125, +1 on the equity after the round trip, which the ledger's metrics
    #        gave sizing after bar 4: 10000 + 40 × (119.88 − 125.125) − 5.005 − 4.7952
    #        = 9780.3998, so ⌊0.505 × 9780.3998 / 125⌋ = ⌊39.51⌋ = 39 at 125.125, fee 4.879875.
    # bar 6: no move: exposure 0, sold at bar 7's open 124.875, fee 4.870125.
    assert fills(result.events) == [
        (at(2), "buy", Decimal(40), Decimal("125.125"), Decimal("5.005")),
        (at(4), "sell", Decimal(40), Decimal("119.88"), Decimal("4.7952")),
        (at(6), "buy", Decimal(39), Decimal("125.125"), Decimal("4.879875")),
        (at(7), "sell", Decimal(39), Decimal("124.875"), Decimal("4.870125")),
    ]
    # The ledger's metrics, by the trade logger's code: two losing round trips.
    gross = 40 * (119.88 - 125.125) + 39 * (124.875 - 125.125)
    fees = 5.005 + 4.7952 + 4.879875 + 4.870125
    assert result.metrics["round_trips"] == 2 and result.metrics["wins"] == 0
    assert result.metrics["net_pnl"] == pytest.approx(gross - fees)
    assert result.metrics["equity"] == pytest.approx(10_000 + gross - fees)
    # Marked equity: flat at the end, so the same as the ledger's.
    assert result.equity[-1][1] == pytest.approx(10_000 + gross - fees)
    assert result.counts == {"bars": 8, "signals": 8, "targets": 8, "intents": 5, "fills": 4}
    assert result.dead_letters == []


def test_two_runs_give_byte_identical_reports(tmp_path: Path) -> None:
    data = tmp_path / "sine.csv"
    write_bars(data)
    config = tmp_path / "bt.toml"
    config.write_text(PIPELINE_CONFIG)
    env = circles_env(tmp_path / "state")
    outs = []
    for name in ("one", "two"):
        out = tmp_path / name
        done = circles(env, "backtest", "--data", str(data), "--config", str(config), "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert f"report: {out / 'report.html'}" in done.stdout
        outs.append(out)
    assert sorted(p.name for p in outs[0].iterdir()) == REPORT_FILES
    for name in REPORT_FILES:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    doc = json.loads((outs[0] / "metrics.json").read_text())
    assert doc["counts"]["bars"] == 240 and doc["counts"]["fills"] > 10
    assert doc["data"]["missing_bars"] == 0 and doc["dead_letters"] == []
    with (outs[0] / "trades.csv").open() as handle:
        trades = list(csv.DictReader(handle))
    assert len(trades) == doc["metrics"]["events"]
    assert trades[0]["kind"] == "deposit" and trades[1]["kind"] == "fill"
    assert (outs[0] / "equity.png").read_bytes().startswith(b"\x89PNG")
    page = (outs[0] / "report.html").read_text()
    assert "<svg" in page and "<script" not in page and "net_pnl" in page


def test_csv_and_parquet_give_the_same_backtest(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = bar_rows(HAND_CLOSES)
    csv_file = write_rows(tmp_path / "bars.csv", rows)
    names = ["ts", "open", "high", "low", "close", "volume"]
    table = pa.table({name: [r[i] if i == 0 else float(r[i]) for r in rows]
                      for i, name in enumerate(names)})
    pq.write_table(table, tmp_path / "bars.parquet")
    assert backtest(HAND_CONFIG, tmp_path / "bars.parquet").events == \
        backtest(HAND_CONFIG, csv_file).events


@pytest.mark.parametrize(("rows", "line", "problem"), [
    ("bad-number", 5, "close 'abc' is not a number"),
    ("duplicate", 4, "duplicate time"),
    ("unsorted", 5, "before the previous row's"),
    ("short", 3, "5 fields where the header has 6"),
])
def test_a_corrupted_file_gives_an_error_naming_the_line(tmp_path: Path, rows: str, line: int,
                                                         problem: str) -> None:
    good = bar_rows([100, 101, 102, 103, 104, 105])
    bad = [list(r) for r in good]
    if rows == "bad-number":
        bad[3][4] = "abc"
    elif rows == "duplicate":
        bad[2][0] = bad[1][0]
    elif rows == "unsorted":
        bad[3][0], bad[2][0] = bad[2][0], bad[3][0]
    else:
        bad[1] = bad[1][:5]
    data = write_rows(tmp_path / "bad.csv", bad)
    config = tmp_path / "bt.toml"
    config.write_text(HAND_CONFIG)
    done = circles(circles_env(tmp_path / "state"), "backtest", "--data", str(data),
                   "--config", str(config), "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {data}: line {line}: ")
    assert problem in done.stderr
    assert not (tmp_path / "out").exists()  # nothing written from a bad file


def test_gaps_are_reported(tmp_path: Path) -> None:
    rows = bar_rows([100, 101, 102, 103, 104, 105, 106])
    del rows[4:6]  # the bars at minutes 4 and 5
    result = backtest(HAND_CONFIG, write_rows(tmp_path / "gap.csv", rows))
    assert result.missing_bars == 2
    assert [(g.feed, g.missing) for g in result.gaps] == [("sim/BTC/USDT/1m", 2)]
    assert result.gaps[0].before == (T0 + timedelta(minutes=6)).isoformat()


def test_settings_errors_name_the_key(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "bars.csv", bar_rows(HAND_CLOSES))
    with pytest.raises(ConfigError, match="sizing.fraction"):
        backtest(HAND_CONFIG.replace("fraction = 0.505", 'fraction = "half"'), data)
    with pytest.raises(ConfigError, match="sizing.account .*execution.account"):
        backtest(HAND_CONFIG.replace('account = "hand"\nfraction', 'account = "other"\nfraction'), data)
    with pytest.raises(ConfigError, match="sizng: not a section of any service"):
        backtest("[sizng]\nfraction = 0.9\n" + HAND_CONFIG, data)
    config = tmp_path / "bad.toml"
    config.write_text("[sizing\n")
    done = circles(circles_env(tmp_path / "state"), "backtest", "--data", str(data),
                   "--config", str(config))
    assert done.returncode == 78 and f"config: {config}: invalid TOML" in done.stderr


def test_a_live_configuration_is_backtested_on_paper(tmp_path: Path) -> None:
    live = HAND_CONFIG.replace("[execution]\n", '[execution]\nmode = "live"\nlive_confirmed = true\n')
    result = backtest(live, write_rows(tmp_path / "bars.csv", bar_rows(HAND_CLOSES)))
    assert result.settings.execution.mode == "paper"
    assert {e["source"] for e in result.events} == {"paper"}


def test_a_sweep_runs_every_combination_and_ranks_them(tmp_path: Path) -> None:
    data = tmp_path / "sine.csv"
    write_bars(data)
    config = tmp_path / "bt.toml"
    config.write_text(PIPELINE_CONFIG)
    out = tmp_path / "grid"
    done = circles(circles_env(tmp_path / "state"), "backtest", "--data", str(data),
                   "--config", str(config), "--out", str(out), "--jobs", "2",
                   "--grid", "sizing.fraction=0.2,0.5", "alpha.models.0.params.fast=3,5",
                   "--sort-by", "net_pnl")
    assert done.returncode == 0, done.stderr
    with (out / "grid.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4
    assert {(r["sizing.fraction"], r["alpha.models.0.params.fast"]) for r in table} == \
        {("0.2", "3"), ("0.2", "5"), ("0.5", "3"), ("0.5", "5")}
    pnl = [float(r["net_pnl"]) for r in table]
    assert pnl == sorted(pnl, reverse=True) and [r["rank"] for r in table] == ["1", "2", "3", "4"]
    # Each row's report is the one a single backtest with those values writes.
    row = next(r for r in table if (r["sizing.fraction"], r["alpha.models.0.params.fast"]) == ("0.2", "5"))
    single = tmp_path / "single"
    done = circles(circles_env(tmp_path / "state"), "backtest", "--data", str(data), "--config",
                   str(config), "--out", str(single), "--grid", "sizing.fraction=0.2")
    assert done.returncode == 0, done.stderr
    alone = json.loads((single / "1" / "metrics.json").read_text())
    assert json.loads((out / row["report"] / "metrics.json").read_text())["metrics"] == alone["metrics"]


def test_grid_keys_and_values() -> None:
    assert grid.parse(["a.b=1,2.5", "c=ema,\"x\",true"]) == [("a.b", [1, 2.5]), ("c", ["ema", "x", True])]
    doc = {"alpha": {"models": [{"params": {"fast": 5}}]}}
    assert grid.apply(doc, "alpha.models.0.params.fast", 9)["alpha"]["models"][0]["params"]["fast"] == 9
    assert doc["alpha"]["models"][0]["params"]["fast"] == 5  # the original is kept
    assert grid.apply({}, "sizing.fraction", 0.3) == {"sizing": {"fraction": 0.3}}
    with pytest.raises(ConfigError, match="alpha.models.1: the list has 1 item"):
        grid.apply(doc, "alpha.models.1.params.fast", 9)
    with pytest.raises(ConfigError, match="key=value1,value2"):
        grid.parse(["sizing.fraction"])


def test_charts_keep_every_extreme() -> None:
    points = [(float(i), float((i * 7919 + 500) % 1000)) for i in range(100_000)]
    kept = thin(points, 2000)
    assert len(kept) <= 2002 and kept[0] == points[0] and kept[-1] == points[-1]
    assert min(v for _, v in kept) == 0.0 and max(v for _, v in kept) == 999.0


@pytest.mark.slow
def test_paper_over_a_real_broker_matches_the_backtest(tmp_path: Path) -> None:
    """The fidelity report of identical settings: every fill on the same bar, quantity and
    price; nothing missing on either side."""
    walk = SyntheticWalk(SyntheticSettings(volatility=0.004), ("sim", "BTC/USDT", "1m"),
                         int(T0.timestamp()))
    data = tmp_path / "walk.csv"
    write_csv(data, [walk.next() for _ in range(200)])
    config = tmp_path / "bt.toml"
    config.write_text(PIPELINE_CONFIG)
    out = tmp_path / "out"
    done = circles(circles_env(tmp_path / "state"), "backtest", "--data", str(data), "--config",
                   str(config), "--out", str(out), "--compare-paper", "--paper-speed", "20",
                   timeout=240)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "fidelity.json").read_text())
    assert summary["fills"]["backtest"] >= 5, summary
    assert summary["within_slippage"] is True, summary
    assert summary["fills"]["only in backtest"] == summary["fills"]["only in paper"] == 0
    assert summary["max_abs_price_bps"] <= float(tomllib.loads(PIPELINE_CONFIG)["execution"]["slippage_bps"])
    assert summary["fees"]["backtest"] == pytest.approx(summary["fees"]["paper"])
    with (out / "fidelity.csv").open() as handle:
        pairs = list(csv.DictReader(handle))
    assert len(pairs) == summary["fills"]["backtest"]
    assert (out / "paper" / "logs" / "execution.jsonl").stat().st_size > 0
