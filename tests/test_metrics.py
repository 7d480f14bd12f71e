"""Trade metrics: hand-computed cases, and the vectorised FIFO against a plain loop over lots."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import defaultdict, deque
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from appliance.errors import ValidationFailed
from modules.trade_logger.metrics import Fills, compute, equity_curve

T0 = datetime(2026, 1, 1, tzinfo=UTC)
_ids = itertools.count()


def iso(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event(kind: str, side: str | None, qty: float | str, price: float | str = "1", fee: float | str = "0", *,
          hours: float, strategy: str = "ma", symbol: str = "BTC/USDT", realized: str | None = None,
          fee_currency: str = "USDT") -> dict[str, Any]:
    """A TRADE_EVENT as the ledger stores it."""
    return {"event_id": f"e{next(_ids)}", "source": "sim", "account_id": "demo", "strategy_id": strategy,
            "symbol": symbol, "side": side, "qty": str(qty), "price": str(price), "fee": str(fee),
            "fee_currency": fee_currency, "ts": iso(hours), "order_id": None, "position_id": None,
            "kind": kind, "realized_pnl": realized, "extra": {}}


def buy(qty: float | str, price: float | str, fee: float | str = "0", **kw: Any) -> dict[str, Any]:
    return event("fill", "buy", qty, price, fee, **kw)


def sell(qty: float | str, price: float | str, fee: float | str = "0", **kw: Any) -> dict[str, Any]:
    return event("fill", "sell", qty, price, fee, **kw)


def store(*events: dict[str, Any]) -> Fills:
    fills = Fills()
    fills.extend(events)
    return fills


def metrics(fills: Fills, **kw: Any) -> dict[str, Any]:
    """compute(), checked to be strict JSON (no NaN or infinity)."""
    out = compute(fills, **kw)
    return dict(json.loads(json.dumps(out, allow_nan=False)))


def curve(fills: Fills) -> list[float]:
    return [point["equity"] for point in equity_curve(fills, max_points=10**6)]


def test_long_round_trip_with_fees() -> None:
    m = metrics(store(buy("2", "100", "0.2", hours=1), sell("2", "110", "0.22", hours=2)))
    # gross = 2 * (110 - 100) = 20; fees = 0.2 + 0.22 = 0.42; net = 19.58
    assert (m["gross_pnl"], m["fees"], m["net_pnl"]) == (20.0, 0.42, 19.58)
    assert m["volume"] == 420.0  # 2*100 + 2*110
    assert m["round_trips"] == 1 and m["win_rate"] == 1.0
    assert m["avg_win"] == m["expectancy"] == 19.58  # the round trip carries both fees
    assert m["avg_loss"] is None and m["profit_factor"] is None  # no losing round trip
    assert m["by_strategy"]["ma"]["net_pnl"] == m["by_symbol"]["BTC/USDT"]["net_pnl"] == 19.58


def test_short_round_trip_with_fees() -> None:
    m = metrics(store(sell("1", "50", "0.05", hours=1), buy("1", "45", "0.045", hours=2)))
    # short 1 at 50, covered at 45: gross = 1 * (50 - 45) = 5; fees 0.095; net 4.905
    assert (m["gross_pnl"], m["fees"], m["net_pnl"]) == (5.0, 0.095, 4.905)
    assert m["round_trips"] == 1 and m["expectancy"] == 4.905


def test_a_fill_that_crosses_zero_closes_and_reopens() -> None:
    fills = store(buy("1", "100", "1", hours=1), sell("3", "110", "3", hours=2), buy("2", "105", "2", hours=3))
    m = metrics(fills)
    # sell 3 @ 110 closes the long 1 (gross 1*(110-100) = 10) and opens a short 2 @ 110;
    # its fee 3 splits by quantity: 1 to the close, 2 to the open.
    # trip 1 = 10 - 1 (buy fee) - 1 = 8; buy 2 @ 105 covers: gross 2*(110-105) = 10,
    # trip 2 = 10 - 2 - 2 = 6.
    assert (m["gross_pnl"], m["fees"], m["net_pnl"]) == (20.0, 6.0, 14.0)
    assert m["round_trips"] == 2 and m["wins"] == 2
    assert m["avg_win"] == m["expectancy"] == 7.0  # (8 + 6) / 2
    # booked per fill: -1 (fee), 10 - 3 = 7, 10 - 2 = 8 → cumulative -1, 6, 14
    assert curve(fills) == [-1.0, 6.0, 14.0]


def test_partial_closes_match_lots_first_in_first_out() -> None:
    fills = store(buy("1", "100", hours=1), buy("1", "110", hours=2), buy("1", "130", hours=3),
                  sell("1.5", "120", hours=4), sell("1", "125", hours=5))
    # FIFO: sell 1.5 @ 120 takes 1 @ 100 (+20) and 0.5 @ 110 (+5) → 25
    #       sell 1 @ 125 takes 0.5 @ 110 (+7.5) and 0.5 @ 130 (-2.5) → 5;  total 30
    # LIFO would give: 1 @ 130 (-10) + 0.5 @ 110 (+5) = -5, then 0.5 @ 110 (+7.5)
    #       + 0.5 @ 100 (+12.5) = 20; total 15
    m = metrics(fills)
    assert m["gross_pnl"] == 30.0
    assert curve(fills) == [0.0, 0.0, 0.0, 25.0, 30.0]
    assert m["round_trips"] == 0 and m["win_rate"] is None  # 0.5 @ 130 is still open


def test_drawdown_duration_and_exposure() -> None:
    fills = store(
        event("deposit", None, "1000", hours=0, symbol="USDT"),
        buy("1", "100", hours=1), sell("1", "200", hours=2),   # +100 → equity 1100, NAV 1.1
        buy("1", "300", hours=3), sell("1", "80", hours=4),    # -220 → 880, NAV 1.1 * 0.8 = 0.88
        buy("1", "100", hours=5), sell("1", "210", hours=6),   # +110 → 990, NAV 0.99
        buy("1", "100", hours=7), sell("1", "210", hours=8),   # +110 → 1100, NAV 1.1: recovered
        buy("1", "100", hours=9), sell("1", "45", hours=10),   # -55 → 1045, NAV 1.045
    )
    m = metrics(fills)
    # cumulative net PnL: 100, -120, -10, 100, 45 → deepest fall from the peak 100 is 220
    assert m["max_drawdown"] == 220.0
    assert m["max_drawdown_ratio"] == pytest.approx(0.2)  # 1 - 0.88 / 1.1
    # last at the peak at 3h (the opening buy), back at it at 8h: 5 h; the second
    # drawdown (from 9h) is not recovered and runs to the last event at 10h: 1 h
    assert m["max_drawdown_duration_s"] == 5 * 3600
    # below the peak from 4h to 8h, and at 10h (the last event, no time after it)
    assert m["time_under_water_s"] == 4 * 3600
    assert m["time_under_water_frac"] == 0.4  # of the 10 h span
    assert m["exposure"] == 0.5  # one position open 1-2h, 3-4h, 5-6h, 7-8h, 9-10h
    assert m["total_return"] == pytest.approx(0.045)
    cagr = 1.045 ** (365.25 * 24 / 10) - 1  # NAV_end ^ (year / span) - 1
    assert m["cagr"] == pytest.approx(cagr, rel=1e-9)
    assert m["calmar"] == pytest.approx(cagr / 0.2, rel=1e-9)
    assert curve(fills) == [1000, 1000, 1100, 1100, 880, 880, 990, 990, 1100, 1100, 1045]


def daily_trades(day: int, pnl: float) -> list[dict[str, Any]]:
    return [buy("1", "100", hours=24 * day + 1), sell("1", 100 + pnl, hours=24 * day + 2)]


def test_sharpe_and_sortino_on_daily_returns() -> None:
    # Daily returns -2%, +2%, +2%, +2% on equity 1000 → 980 → 999.6 → 1019.592 → 1039.98384
    fills = store(event("deposit", None, "1000", hours=0, symbol="USDT"),
                  *daily_trades(0, -20), *daily_trades(1, 19.6), *daily_trades(2, 19.992),
                  *daily_trades(3, 20.39184))
    # mean = 0.01; deviations -0.03, 0.01, 0.01, 0.01 → variance 0.0012 / 3 = 0.0004, std 0.02
    # downside: sqrt(mean(min(r, 0)^2)) = sqrt(0.0004 / 4) = 0.01
    # with 4 periods a year: Sharpe = 0.01 / 0.02 * 2 = 1, Sortino = 0.01 / 0.01 * 2 = 2
    m = metrics(fills, periods_per_year=4)
    assert m["days"] == 4
    assert m["sharpe"] == pytest.approx(1.0, rel=1e-9)
    assert m["sortino"] == pytest.approx(2.0, rel=1e-9)
    m = metrics(fills)
    assert m["sharpe"] == pytest.approx(0.5 * math.sqrt(365), rel=1e-9)


def test_days_without_events_count_as_zero_returns() -> None:
    # +2% on day 0, nothing on day 1, +1% on day 2 (of 1020 = 10.2)
    fills = store(event("deposit", None, "1000", hours=0, symbol="USDT"),
                  *daily_trades(0, 20), *daily_trades(2, 10.2))
    # returns 0.02, 0, 0.01: mean 0.01, variance (0.0001 + 0.0001 + 0) / 2 = 0.0001, std 0.01
    # Sharpe = 1 * sqrt(9) = 3; no negative day → Sortino undefined
    m = metrics(fills, periods_per_year=9)
    assert m["days"] == 3
    assert m["sharpe"] == pytest.approx(3.0, rel=1e-9)
    assert m["sortino"] is None


def test_profit_factor_and_expectancy_per_symbol() -> None:
    pnls = {"BTC/USDT": [30, -10, 0], "ETH/USDT": [20, -20]}
    events = [e for symbol, trips in pnls.items() for i, pnl in enumerate(trips)
              for e in (buy("1", "100", hours=i, symbol=symbol), sell("1", 100 + pnl, hours=i + 0.5, symbol=symbol))]
    m = metrics(store(*events))
    # round trips +30, -10, 0, +20, -20: wins 50, losses -30
    assert m["round_trips"] == 5 and (m["wins"], m["losses"]) == (2, 2)  # 0 is neither
    assert m["win_rate"] == 0.4
    assert m["profit_factor"] == pytest.approx(50 / 30)
    assert m["expectancy"] == 4.0  # 20 / 5
    assert (m["avg_win"], m["avg_loss"]) == (25.0, -15.0)
    btc, eth = m["by_symbol"]["BTC/USDT"], m["by_symbol"]["ETH/USDT"]
    assert btc["profit_factor"] == 3.0  # 30 / 10
    assert (btc["expectancy"], btc["win_rate"]) == (pytest.approx(20 / 3), pytest.approx(1 / 3))
    assert (eth["profit_factor"], eth["expectancy"], eth["win_rate"]) == (1.0, 0.0, 0.5)
    assert m["by_strategy"]["ma"]["round_trips"] == 5


def test_realized_pnl_of_the_source_wins_over_fifo() -> None:
    # MT5: quantities are lots, so FIFO would say 0.1 * (1.1050 - 1.1000) = 0.0005
    fills = store(buy("0.1", "1.1000", "0.7", hours=1, symbol="EURUSD", realized="0", fee_currency="USD"),
                  sell("0.1", "1.1050", "0.7", hours=2, symbol="EURUSD", realized="50", fee_currency="USD"),
                  buy("1", "100", hours=3), sell("1", "103", hours=4))  # no realized_pnl: FIFO, +3
    m = metrics(fills)
    assert m["by_symbol"]["EURUSD"]["gross_pnl"] == 50.0
    assert m["by_symbol"]["EURUSD"]["expectancy"] == 48.6  # 50 - 0.7 - 0.7
    assert m["gross_pnl"] == 53.0


def test_cash_flows_are_neither_pnl_nor_drawdown() -> None:
    fills = store(event("deposit", None, "1000", hours=0, symbol="USDT"),
                  buy("1", "100", hours=1), sell("1", "90", hours=2),                  # -10
                  event("withdrawal", None, "500", fee="1", hours=3, symbol="USDT"),
                  event("deposit", None, "200", hours=4, symbol="USDT"))
    m = metrics(fills)
    assert (m["gross_pnl"], m["net_pnl"], m["fills"], m["events"]) == (-10.0, -10.0, 2, 5)
    assert (m["deposits"], m["withdrawals"], m["transfer_fees"]) == (1200.0, 500.0, 1.0)
    assert m["equity"] == 689.0  # 1200 - 500 - 1 - 10
    assert m["max_drawdown"] == 10.0  # the withdrawal of 500 is not a drawdown
    assert m["max_drawdown_ratio"] == pytest.approx(0.01)  # 10 / 1000
    assert list(m["by_symbol"]) == ["BTC/USDT"]  # cash flows are no symbol's trades
    assert curve(fills) == [1000.0, 1000.0, 990.0, 489.0, 689.0]


def test_without_deposits_relative_metrics_are_undefined() -> None:
    m = metrics(store(buy("1", "100", hours=1), sell("1", "90", hours=30)))
    assert m["max_drawdown"] == 10.0
    assert m["max_drawdown_ratio"] is None and m["sharpe"] is None and m["cagr"] is None


def test_empty_fills() -> None:
    m = metrics(Fills())
    assert (m["events"], m["fills"], m["round_trips"]) == (0, 0, 0)
    assert (m["volume"], m["gross_pnl"], m["fees"], m["net_pnl"], m["max_drawdown"]) == (0.0,) * 5
    assert m["win_rate"] is None and m["sharpe"] is None and m["first_ts"] is None and m["exposure"] is None
    assert m["by_strategy"] == {} and m["by_symbol"] == {}
    assert equity_curve(Fills()) == []


def test_events_are_taken_in_time_order_whatever_the_append_order() -> None:
    ordered = [buy("1", "100", hours=1), buy("1", "110", hours=2), sell("1", "120", hours=3)]
    shuffled = [ordered[2], ordered[0], ordered[1]]
    assert metrics(store(*shuffled)) == metrics(store(*ordered))
    assert metrics(store(*ordered))["gross_pnl"] == 20.0  # FIFO: the lot at 100


def test_fee_in_the_base_asset_is_valued_at_the_fill_price() -> None:
    m = metrics(store(buy("1", "30000", "0.001", hours=1, fee_currency="BTC")))
    assert m["fees"] == 30.0


def test_columns_are_built_lazily_and_kept_until_the_next_append() -> None:
    fills = store(buy("1", "100", hours=1))
    first = fills.ts
    assert fills.ts is first
    fills.append(sell("1", "101", "0.5", hours=2))
    assert len(fills) == 2 and fills.ts is not first
    assert fills.side.tolist() == [1, -1] and fills.fee.tolist() == [0.0, 0.5]
    assert math.isnan(fills.realized[0]) and fills.symbols == ["BTC/USDT"]
    assert compute(fills)["gross_pnl"] == 1.0
    fills.append(buy("1", "100", hours=3))  # a cached result is dropped too
    assert compute(fills)["fills"] == 3


def test_a_bad_event_is_refused_and_adds_nothing() -> None:
    fills = store(buy("1", "100", hours=1))
    with pytest.raises(ValidationFailed):
        fills.append({**sell("1", "101", hours=2), "qty": "lots"})
    with pytest.raises(ValidationFailed):
        fills.append({**sell("1", "101", hours=2), "side": None})
    with pytest.raises(ValidationFailed):
        fills.append({**sell("1", "101", hours=2), "price": "NaN"})
    assert len(fills) == 1 and fills.qty.tolist() == [1.0]


def test_from_arrays_and_appends_mix() -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    fills = Fills.from_arrays(ts=[base, base + 3600], side=[1, -1], qty=[2.0, 1.0], price=[100.0, 110.0],
                              symbol=[0, 0], symbols=["BTC/USDT"], strategies=["ma"])
    fills.append(sell("1", "120", hours=2))
    m = metrics(fills)
    assert m["gross_pnl"] == 30.0  # 1*(110-100) + 1*(120-100)
    assert list(m["by_symbol"]) == ["BTC/USDT"] and list(m["by_strategy"]) == ["ma"]
    with pytest.raises(ValueError):
        Fills.from_arrays(ts=[base], side=[1], qty=[1.0], price=[1.0], symbol=[3])


def test_equity_curve_keeps_first_last_and_minimum() -> None:
    pnl = [10.0] * 5000
    pnl[1234] = -10**6  # the lowest point, off any even grid
    events = [event("deposit", None, "2000000", hours=0, symbol="USDT")]
    for i, x in enumerate(pnl):
        events += [buy("1", "1000", hours=i + 0.1), sell("1", 1000 + x, hours=i + 0.2)]
    fills = store(*events)
    points = equity_curve(fills, max_points=100)
    full = equity_curve(fills, max_points=10**6)
    assert 90 <= len(points) <= 100
    assert points[0] == full[0] and points[-1] == full[-1]
    assert min(p["equity"] for p in points) == min(p["equity"] for p in full) == 2_000_000 + 12_340 - 10**6
    assert [p["ts"] for p in points] == sorted(p["ts"] for p in points)
    assert len(equity_curve(fills, max_points=2)) == 2


# -- the vectorised FIFO against a plain loop over lots -------------------------------------

def reference(events: list[dict[str, Any]]) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], list[float]],
                                                     list[float]]:
    """Gross PnL and closed round trips per (strategy, symbol), and the net PnL booked at
    each event in time order, with one deque of open lots per (strategy, symbol)."""
    lots: dict[tuple[str, str], deque[list[float]]] = defaultdict(deque)
    direction: dict[tuple[str, str], int] = defaultdict(int)
    running: dict[tuple[str, str], float] = defaultdict(float)
    gross: dict[tuple[str, str], float] = defaultdict(float)
    trips: dict[tuple[str, str], list[float]] = defaultdict(list)
    booked = []
    for e in sorted(events, key=lambda e: e["ts"]):  # stable, like the store
        if e["kind"] != "fill":
            booked.append(0.0)
            continue
        key = (e["strategy_id"], e["symbol"])
        qty, price, fee = float(e["qty"]), float(e["price"]), float(e["fee"])
        sign = 1 if e["side"] == "buy" else -1
        remaining, closed, fifo = qty, 0.0, 0.0
        while remaining > 1e-9 and lots[key] and direction[key] == -sign:
            lot = lots[key][0]
            take = min(lot[0], remaining)
            fifo += take * (price - lot[1]) * direction[key]
            lot[0] -= take
            remaining -= take
            closed += take
            if lot[0] <= 1e-9:
                lots[key].popleft()
        if remaining <= 1e-9:
            remaining = 0.0
        pnl = fifo if e["realized_pnl"] is None else float(e["realized_pnl"])
        gross[key] += pnl
        booked.append(pnl - fee)
        close_fee = fee * closed / qty
        if closed:
            running[key] += pnl - close_fee
            if not lots[key]:
                trips[key].append(running[key])
                running[key], direction[key] = 0.0, 0
        if remaining:
            if not lots[key]:
                direction[key], running[key] = sign, 0.0
            lots[key].append([remaining, price])
            running[key] += (0.0 if closed else pnl) - (fee - close_fee)
    return gross, trips, booked


def random_events(seed: int, decimals: bool) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = [event("deposit", None, "100000", hours=0, symbol="USDT")]
    for _ in range(600):
        if rng.random() < 0.02:
            events.append(event(rng.choice(["deposit", "withdrawal"]), None, rng.randint(1, 500),
                                hours=rng.randint(1, 200), symbol="USDT"))
            continue
        # Quantities in tenths leave float residues where a position should be flat;
        # in halves they are exact. Both must flip, close and reopen alike.
        qty = rng.randint(1, 30) / 10 if decimals else rng.randint(1, 6) / 2
        realized = f"{rng.uniform(-50, 50):.2f}" if rng.random() < 0.1 else None
        events.append(event("fill", rng.choice(["buy", "sell"]), qty, f"{rng.uniform(50, 150):.2f}",
                            f"{rng.uniform(0, 0.5):.3f}", hours=rng.randint(1, 200),  # ties too
                            strategy=rng.choice(["ma", "rsi"]), symbol=rng.choice(["A/USD", "B/USD", "C/USD"]),
                            realized=realized))
    rng.shuffle(events)
    return events


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("decimals", [False, True])
def test_vectorised_fifo_matches_a_loop_over_lots(seed: int, decimals: bool) -> None:
    events = random_events(seed, decimals)
    gross, trips, booked = reference(events)
    fills = store(*events)
    m = metrics(fills)
    assert sum(len(t) for t in trips.values()) > 10  # the case does close and flip positions

    def expected(by: int) -> dict[str, dict[str, Any]]:
        names = sorted({key[by] for key in gross})
        out = {}
        for name in names:
            pnls = [p for key, t in trips.items() if key[by] == name for p in t]
            wins, losses = [p for p in pnls if p > 0], [p for p in pnls if p < 0]
            out[name] = {"gross_pnl": sum(g for key, g in gross.items() if key[by] == name),
                         "round_trips": len(pnls), "expectancy": np.mean(pnls) if pnls else None,
                         "avg_win": np.mean(wins) if wins else None, "avg_loss": np.mean(losses) if losses else None,
                         "win_rate": len(wins) / len(pnls) if pnls else None,
                         "profit_factor": sum(wins) / -sum(losses) if losses else None}
        return out

    for by, section in ((0, "by_strategy"), (1, "by_symbol")):
        want = expected(by)
        assert set(m[section]) == set(want)
        for name, values in want.items():
            for field, value in values.items():
                got = m[section][name][field]
                assert (got is None) == (value is None), (section, name, field)
                if value is not None:
                    assert got == pytest.approx(value, abs=1e-6), (section, name, field)
    assert m["gross_pnl"] == pytest.approx(sum(gross.values()), abs=1e-6)
    assert m["round_trips"] == sum(len(t) for t in trips.values())
    cash = [0.0 if e["kind"] == "fill" else float(e["qty"]) * (1 if e["kind"] == "deposit" else -1)
            for e in sorted(events, key=lambda e: e["ts"])]
    assert curve(fills) == pytest.approx(np.cumsum(np.add(booked, cash)).tolist(), abs=1e-6)
