"""Trade metrics on one account of 1,000,000 fills: `compute()` then `equity_curve()`.

The fills are built with `Fills.from_arrays` (no event dicts): a deposit first, then
5 symbols, 3 strategies, random-walk prices and about as many buys as sells, so that
positions go long, short and flip. Also times `Fills.append` of stored event dicts (the
service appends ~10k events/s). Prints a few of the metrics as a sanity check,
`append_events_per_s`, `compute_s`, `equity_curve_s`, and last `metrics_1m_s` (the two
together, best of --rounds; target ≤ 2 s on 2 cores).
Usage: python bench/metrics.py [--fills 1000000] [--rounds 3] [--seed 1] [--appends 100000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from modules.trade_logger.metrics import DEPOSIT, Fills, compute, equity_curve, format_ts

SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT", "EURUSD", "#US30"]
STRATEGIES = ["ma", "breakout", "mean-revert"]
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DEPOSIT_AMOUNT = 1e9  # large enough that equity stays positive, so every metric is defined


def columns(n: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    symbol = rng.integers(0, len(SYMBOLS), n)
    start_price = np.array([60_000.0, 3_000.0, 150.0, 1.1, 40_000.0])
    steps = rng.normal(0.0, 0.001, n)
    price = np.empty(n)
    for code in range(len(SYMBOLS)):  # one random walk per symbol
        mine = symbol == code
        price[mine] = start_price[code] * np.exp(np.cumsum(steps[mine]))
    qty = rng.lognormal(0.0, 0.5, n) / start_price[symbol] * 1_000  # about 1,000 per fill
    side = np.where(rng.random(n) < 0.5, 1, -1)
    ts = START + np.cumsum(rng.exponential(30.0, n))  # a fill every 30 s on average
    kind = np.zeros(n + 1, dtype=np.int8)
    kind[0] = DEPOSIT
    return {"ts": np.r_[START, ts], "kind": kind, "side": np.r_[0, side], "qty": np.r_[DEPOSIT_AMOUNT, qty],
            "price": np.r_[1.0, price], "fee": np.r_[0.0, qty * price * 0.001],
            "strategy": np.r_[-1, rng.integers(0, len(STRATEGIES), n)], "symbol": np.r_[-1, symbol],
            "strategies": STRATEGIES, "symbols": SYMBOLS}


def stored_event(i: int) -> dict[str, Any]:
    """A TRADE_EVENT as the ledger stores it (decimals as strings)."""
    return {"event_id": f"e{i}", "source": "sim", "account_id": "demo", "strategy_id": STRATEGIES[i % 3],
            "symbol": SYMBOLS[i % 5], "side": "buy" if i % 2 else "sell", "qty": "0.5",
            "price": f"{30_000 + i % 1_000}.1", "fee": "1.2", "fee_currency": "USDT", "ts": format_ts(START + i),
            "order_id": None, "position_id": None, "kind": "fill", "realized_pnl": None, "extra": {}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fills", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--appends", type=int, default=100_000)
    args = parser.parse_args()

    started = time.perf_counter()
    data = columns(args.fills, args.seed)
    fills = Fills.from_arrays(**data)
    build_s = time.perf_counter() - started
    timings = []
    for _ in range(args.rounds):
        fills = Fills.from_arrays(**data)  # a fresh store: nothing derived from the last round
        started = time.perf_counter()
        metrics = compute(fills)
        computed = time.perf_counter()
        curve = equity_curve(fills)
        timings.append((computed - started, time.perf_counter() - computed))
    compute_s, curve_s = min(timings, key=sum)

    events = [stored_event(i) for i in range(args.appends)]
    store = Fills()
    started = time.perf_counter()
    for event in events:
        store.append(event)
    append_rate = len(events) / (time.perf_counter() - started)

    print(f"fills = {metrics['fills']}")
    print(f"round_trips = {metrics['round_trips']}")
    print(f"net_pnl = {metrics['net_pnl']}")
    print(f"max_drawdown_ratio = {metrics['max_drawdown_ratio']}")
    print(f"sharpe = {metrics['sharpe']}")
    print(f"exposure = {metrics['exposure']}")
    print(f"curve_points = {len(curve)}")
    print(f"build_s = {build_s:.2f}")
    print(f"append_events_per_s = {append_rate:.0f}")
    print(f"compute_s = {compute_s:.2f}")
    print(f"equity_curve_s = {curve_s:.2f}")
    print(f"metrics_1m_s = {compute_s + curve_s:.2f}")


if __name__ == "__main__":
    main()
