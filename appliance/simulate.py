"""Realistic simulated fills for `circles simulate trades`, the demo and the tests: a deposit
first, then trades on several symbols at random-walk prices, opened and closed (partly or
wholly, long and short), so there are wins and losses, with taker fees."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from appliance.bus.trade_event import TradeEvent

SYMBOLS = {"BTC/USDT": 60000.0, "ETH/USDT": 3000.0, "SOL/USDT": 150.0}
STRATEGIES = ("ma-cross", "rsi-revert", "breakout")
FEE_RATE = Decimal("0.001")  # a typical taker fee
CENT, LOT = Decimal("0.01"), Decimal("0.0001")


def simulated_trades(n: int, account: str = "demo", *, seed: int | None = None,
                     deposit: Decimal = Decimal(10000), notional: float = 1000.0,
                     step: timedelta = timedelta(minutes=5),
                     end: datetime | None = None) -> Iterator[TradeEvent]:
    """`n` events (the deposit included), the last one at `end` (default now). With a
    `seed`, the same events (ids included) every time, so sending them twice stores them once."""
    rng = random.Random(seed)
    run = f"{seed}" if seed is not None else uuid.uuid4().hex[:8]
    end = end or datetime.now(UTC)
    ts = end - step * max(n - 1, 0)
    prices = dict(SYMBOLS)
    positions = dict.fromkeys(SYMBOLS, Decimal(0))
    if n > 0:
        yield TradeEvent(event_id=f"sim-{run}-0", source="sim", account_id=account,
                         symbol="USDT", kind="deposit", qty=deposit, ts=ts)
    for i in range(1, n):
        ts += step
        for symbol in prices:  # every market moves, one trades
            prices[symbol] *= 1 + rng.gauss(0.0, 0.004)
        symbol = rng.choice(list(prices))
        price = Decimal(str(prices[symbol])).quantize(CENT)
        held = positions[symbol]
        if held == 0 or rng.random() < 0.3:  # open, or add to the position
            side = "buy" if (held > 0 or (held == 0 and rng.random() < 0.6)) else "sell"
            qty = (Decimal(notional * rng.uniform(0.5, 1.5)) / price).quantize(LOT)
        else:  # close all or part
            side = "sell" if held > 0 else "buy"
            qty = abs(held) if rng.random() < 0.6 else (abs(held) / 2).quantize(LOT)
        qty = max(qty, LOT)
        positions[symbol] += qty if side == "buy" else -qty
        yield TradeEvent(
            event_id=f"sim-{run}-{i}", source="sim", account_id=account,
            strategy_id=STRATEGIES[list(SYMBOLS).index(symbol)], symbol=symbol, side=side,
            qty=qty, price=price, fee=(qty * price * FEE_RATE).quantize(Decimal("0.000001")),
            fee_currency="USDT", ts=ts, order_id=f"o-{run}-{i}")
