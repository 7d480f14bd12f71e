"""Performance metrics of one trading account, computed from its stored TRADE_EVENTs.

`Fills` holds an account's events as columns; `compute()` returns the account's metrics
with a breakdown per strategy and per symbol, and `equity_curve()` the closed-trade
equity. Every definition is written out in docs/metrics.md. The numbers are float64
statistics over the ledger's exact decimals: the ledger stays the record of truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.errors import ValidationFailed

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

FILL, DEPOSIT, WITHDRAWAL = 0, 1, 2
KINDS = {"fill": FILL, "deposit": DEPOSIT, "withdrawal": WITHDRAWAL}
SIDES = {"buy": 1, "sell": -1}

_DTYPES: dict[str, type[np.generic]] = {
    "ts": np.float64, "kind": np.int8, "side": np.int8, "qty": np.float64, "price": np.float64,
    "fee": np.float64, "realized": np.float64, "strategy": np.int32, "symbol": np.int32,
}
# Float sums that should cancel leave residues; a position within this fraction of the
# largest fill of its (strategy, symbol) is flat.
FLAT_TOLERANCE = 1e-9
# NAV within this fraction of its running peak is back at the peak.
PEAK_TOLERANCE = 1e-12
DAY_S = 86_400.0
YEAR_S = 365.25 * DAY_S
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_ts(value: str | datetime) -> float:
    """ISO 8601 ('Z' or an offset; naive means UTC), or a datetime → epoch seconds."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) / timedelta(seconds=1)


def format_ts(epoch_s: float) -> str:
    """Epoch seconds → `YYYY-MM-DDTHH:MM:SS.ffffffZ`, the ledger's timestamp form."""
    moment = _EPOCH + timedelta(microseconds=round(epoch_s * 1e6))
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Fills:
    """The events of ONE account as columns, cheap to append to.

    Appends go to Python lists; the numpy columns are built on first use and kept until
    the next append. Decimal strings become float64. `strategy` and `symbol` are int32
    codes into `strategies` and `symbols` (a fill without a strategy gets ""); cash
    flows have code -1 in both.
    """

    def __init__(self) -> None:
        self.strategies: list[str] = []
        self.symbols: list[str] = []
        self._strategy_codes: dict[str, int] = {}
        self._symbol_codes: dict[str, int] = {}
        self._arrays: dict[str, npt.NDArray[Any]] = {k: np.empty(0, t) for k, t in _DTYPES.items()}
        self._pending: dict[str, list[Any]] = {k: [] for k in _DTYPES}
        self._memo: dict[str, Any] = {}  # results derived from the columns, dropped on append

    def __len__(self) -> int:
        return len(self._arrays["ts"]) + len(self._pending["ts"])

    def append(self, event: Mapping[str, Any]) -> None:
        """Add one stored TRADE_EVENT; raises ValidationFailed (and adds nothing) if it
        cannot be read."""
        try:
            row = self._row(event)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ValidationFailed(f"event {event.get('event_id')!r}: {exc!r}") from exc
        for name, value in zip(_DTYPES, row, strict=True):
            self._pending[name].append(value)
        self._memo.clear()

    def extend(self, events: Iterable[Mapping[str, Any]]) -> None:
        for event in events:
            self.append(event)

    def _row(self, event: Mapping[str, Any]) -> tuple[Any, ...]:
        kind = KINDS[event["kind"]]
        qty, price = float(event["qty"]), float(event["price"])
        fee = float(event.get("fee") or 0)
        realized = event.get("realized_pnl")
        realized_f = math.nan if realized is None else float(realized)
        if not math.isfinite(qty + price + fee + (0.0 if realized is None else realized_f)):
            raise ValueError("qty, price, fee and realized_pnl must be finite numbers")
        ts = parse_ts(event["ts"])
        if kind != FILL:
            return ts, kind, 0, qty, price, fee, math.nan, -1, -1
        side = SIDES[event["side"]]
        symbol = str(event["symbol"])
        # A fee charged in the base asset (BTC on BTC/USDT) is converted at the fill price.
        if event.get("fee_currency") and event["fee_currency"] == symbol.partition("/")[0]:
            fee *= price
        strategy = self._code(self._strategy_codes, self.strategies, event.get("strategy_id") or "")
        return ts, kind, side, qty, price, fee, realized_f, strategy, \
            self._code(self._symbol_codes, self.symbols, symbol)

    @staticmethod
    def _code(codes: dict[str, int], names: list[str], name: str) -> int:
        code = codes.get(name)
        if code is None:
            code = codes[name] = len(names)
            names.append(name)
        return code

    @classmethod
    def from_arrays(cls, *, ts: npt.ArrayLike, side: npt.ArrayLike, qty: npt.ArrayLike,
                    price: npt.ArrayLike, fee: npt.ArrayLike | None = None,
                    kind: npt.ArrayLike | None = None, realized: npt.ArrayLike | None = None,
                    strategy: npt.ArrayLike | None = None, symbol: npt.ArrayLike | None = None,
                    strategies: Sequence[str] = ("",), symbols: Sequence[str] = ("",)) -> Fills:
        """Columns built elsewhere (a benchmark, an import): `ts` in epoch seconds, `kind`
        0/1/2 (default all fills), `side` +1/-1/0, `realized` NaN where absent, `strategy`
        and `symbol` codes into `strategies` and `symbols` (default all 0)."""
        stamps = np.array(ts, dtype=np.float64)
        n = len(stamps)

        def column(values: npt.ArrayLike | None, name: str, default: float) -> npt.NDArray[Any]:
            if values is None:
                return np.full(n, default, dtype=_DTYPES[name])
            out = np.array(values, dtype=_DTYPES[name])
            if out.shape != (n,):
                raise ValueError(f"{name}: expected {n} values, got shape {out.shape}")
            return out

        fills = cls()
        fills.strategies, fills.symbols = list(strategies), list(symbols)
        fills._strategy_codes = {name: i for i, name in enumerate(fills.strategies)}
        fills._symbol_codes = {name: i for i, name in enumerate(fills.symbols)}
        fills._arrays = {"ts": stamps, "kind": column(kind, "kind", FILL), "side": column(side, "side", 0),
                         "qty": column(qty, "qty", 0), "price": column(price, "price", 0),
                         "fee": column(fee, "fee", 0), "realized": column(realized, "realized", math.nan),
                         "strategy": column(strategy, "strategy", 0), "symbol": column(symbol, "symbol", 0)}
        is_fill = fills._arrays["kind"] == FILL
        for name, names in (("strategy", fills.strategies), ("symbol", fills.symbols)):
            codes = fills._arrays[name][is_fill]
            if codes.size and (codes.min() < 0 or codes.max() >= len(names)):
                raise ValueError(f"{name} codes must index {name} names (0..{len(names) - 1})")
        return fills

    def columns(self) -> dict[str, npt.NDArray[Any]]:
        """All columns as numpy arrays, in append order (built now if appends are pending)."""
        if self._pending["ts"]:
            self._arrays = {name: np.concatenate((self._arrays[name], np.asarray(self._pending[name], dtype)))
                            for name, dtype in _DTYPES.items()}
            for values in self._pending.values():
                values.clear()
        return self._arrays

    @property
    def ts(self) -> F64:
        return self.columns()["ts"]

    @property
    def kind(self) -> npt.NDArray[np.int8]:
        return self.columns()["kind"]

    @property
    def side(self) -> npt.NDArray[np.int8]:
        return self.columns()["side"]

    @property
    def qty(self) -> F64:
        return self.columns()["qty"]

    @property
    def price(self) -> F64:
        return self.columns()["price"]

    @property
    def fee(self) -> F64:
        return self.columns()["fee"]

    @property
    def realized(self) -> F64:
        return self.columns()["realized"]

    @property
    def strategy(self) -> npt.NDArray[np.int32]:
        return self.columns()["strategy"]

    @property
    def symbol(self) -> npt.NDArray[np.int32]:
        return self.columns()["symbol"]


@dataclass(frozen=True)
class _Book:
    """The account's events replayed: per event in time order, and per fill."""

    ts: F64              # every event, sorted by time (stable)
    kind: npt.NDArray[np.int8]
    amount: F64          # qty * price
    pnl: F64             # net realized PnL booked at the event (0 for cash flows)
    cash: F64            # signed cash flow, its fee included (0 for fills)
    open_groups: I64     # (strategy, symbol) positions open after the event
    group: I64           # per fill, in any order: strategy * len(symbols) + symbol
    gross: F64
    fee: F64
    volume: F64
    trip_pnl: F64        # closed round trips
    trip_group: I64


@dataclass(frozen=True)
class _Trades:
    gross: F64           # per fill: realized gross PnL
    opened: I64          # per fill: +1 flat → open, -1 open → flat
    trip_pnl: F64
    trip_group: I64


def _runs(keys: npt.NDArray[Any]) -> tuple[I64, I64]:
    """Start and end (exclusive) of each run of equal values in a sorted array."""
    if not keys.size:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return starts, np.r_[starts[1:], keys.size].astype(np.int64)


def _segmented_cumsum(values: F64, starts: I64, ends: I64) -> F64:
    # One cumsum per run (not one global cumsum minus offsets), so that each group's
    # running sums carry no rounding error from the groups before it. The loop is over
    # groups, never over fills.
    out = np.empty_like(values)
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        np.cumsum(values[start:end], out=out[start:end])
    return out


def _fifo(group: I64, signed_qty: F64, price: F64, fee: F64, realized: F64) -> _Trades:
    """FIFO accounting of fills sorted by (group, time); see docs/metrics.md."""
    n = group.size
    starts, ends = _runs(group)
    after = _segmented_cumsum(signed_qty, starts, ends)
    if n:
        largest = np.repeat(np.maximum.reduceat(np.abs(signed_qty), starts), ends - starts)
        after[np.abs(after) <= FLAT_TOLERANCE * largest] = 0.0
    before = np.empty_like(after)
    before[1:] = after[:-1]
    before[starts] = 0.0
    sign_b, sign_a = np.sign(before), np.sign(after)
    abs_b, abs_a = np.abs(before), np.abs(after)
    cross = sign_b * sign_a < 0
    # A crossing fill closes the old position and opens the new one with the remainder.
    close_q = np.where(cross, abs_b, np.maximum(abs_b - abs_a, 0.0))
    open_q = np.where(cross, abs_a, np.maximum(abs_a - abs_b, 0.0))

    # Streams of opening and closing quantity per (group, direction). Each episode ends
    # flat before the next one opens, so the k-th unit closed matches the k-th unit opened.
    oi = np.flatnonzero(open_q > 0)
    ci = np.flatnonzero(close_q > 0)
    okey = group[oi] * 2 + (sign_a[oi] < 0)
    ckey = group[ci] * 2 + (sign_b[ci] < 0)
    by_key = np.argsort(okey, kind="stable")
    oi, okey = oi[by_key], okey[by_key]
    by_key = np.argsort(ckey, kind="stable")
    ci, ckey = ci[by_key], ckey[by_key]

    gross = np.zeros(n)
    if ci.size:
        o_starts, o_ends = _runs(okey)
        o_qty, o_price = open_q[oi], price[oi]
        cum_q = _segmented_cumsum(o_qty, o_starts, o_ends)      # opened so far, per key
        cum_cost = _segmented_cumsum(o_qty * o_price, o_starts, o_ends)
        run_base = np.r_[0.0, np.cumsum(cum_q[o_ends - 1])[:-1]]
        # One increasing array over all keys, only to locate a quantity's segment.
        located = cum_q + np.repeat(run_base, o_ends - o_starts)

        c_starts, c_ends = _runs(ckey)
        c_qty = close_q[ci]
        closed_to = _segmented_cumsum(c_qty, c_starts, c_ends)  # closed so far, per key
        closed_from = np.empty_like(closed_to)
        closed_from[1:] = closed_to[:-1]
        closed_from[c_starts] = 0.0
        run = np.searchsorted(okey[o_starts], ckey)  # the open run of each close's key
        lo, hi, base = o_starts[run], o_ends[run] - 1, run_base[run]

        def cost(q: F64) -> F64:
            # Piecewise-linear cumulative cost of the first q units opened in the key.
            seg = np.clip(np.searchsorted(located, q + base, side="left"), lo, hi)
            return cum_cost[seg] - (cum_q[seg] - q) * o_price[seg]

        matched = cost(closed_to) - cost(closed_from)
        direction = np.where(ckey % 2 == 1, -1.0, 1.0)
        gross[ci] = direction * (c_qty * price[ci] - matched)
    gross = np.where(np.isnan(realized), gross, realized)

    # Round trips: an episode starts when a position opens from flat (or on a flip).
    new_episode = (open_q > 0) & ((sign_b == 0) | cross)
    episode = np.cumsum(new_episode) - 1
    closed_episode = episode - cross
    part = open_q + close_q
    close_fee = fee * np.divide(close_q, part, out=np.zeros(n), where=part > 0)
    has_close, has_open = close_q > 0, open_q > 0
    count = int(new_episode.sum())
    open_part = np.where(has_close, 0.0, gross) - (fee - close_fee)
    trip = np.bincount(closed_episode[has_close], weights=(gross - close_fee)[has_close], minlength=count) \
        + np.bincount(episode[has_open], weights=open_part[has_open], minlength=count).astype(np.float64)
    ends_flat = has_close & (cross | (sign_a == 0))
    opened = (sign_b == 0) & (sign_a != 0)
    closed = (sign_b != 0) & (sign_a == 0)
    return _Trades(gross=gross, opened=opened.astype(np.int64) - closed.astype(np.int64),
                   trip_pnl=trip[closed_episode[ends_flat]], trip_group=group[ends_flat])


def _book(fills: Fills) -> _Book:
    memo = fills._memo.get("book")
    if isinstance(memo, _Book):
        return memo
    col = fills.columns()
    order = np.argsort(col["ts"], kind="stable")
    ts, kind, qty, price, fee = (col[k][order] for k in ("ts", "kind", "qty", "price", "fee"))
    amount = qty * price
    is_fill = kind == FILL
    cash = np.where(kind == DEPOSIT, amount, 0.0) - np.where(kind == WITHDRAWAL, amount, 0.0) \
        - np.where(is_fill, 0.0, fee)

    fill_at = np.flatnonzero(is_fill)
    group = col["strategy"][order][fill_at].astype(np.int64) * max(len(fills.symbols), 1) \
        + col["symbol"][order][fill_at]
    by_group = np.argsort(group, kind="stable")
    at, group = fill_at[by_group], group[by_group]
    signed = col["side"][order][at] * qty[at]
    trades = _fifo(group, signed, price[at], fee[at], col["realized"][order][at])

    pnl = np.zeros(ts.size)
    pnl[at] = trades.gross - fee[at]
    opened = np.zeros(ts.size, dtype=np.int64)
    opened[at] = trades.opened
    book = _Book(ts=ts, kind=kind, amount=amount, pnl=pnl, cash=cash, open_groups=np.cumsum(opened),
                 group=group, gross=trades.gross, fee=fee[at], volume=amount[at],
                 trip_pnl=trades.trip_pnl, trip_group=trades.trip_group)
    fills._memo["book"] = book
    return book


def _num(value: float | None, digits: int = 12) -> float | None:
    """A JSON-safe float: None for NaN/inf, float noise past `digits` significant digits dropped."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{float(value):.{digits}g}")


def _trip_stats(count: int, wins: int, win_sum: float, losses: int, loss_sum: float,
                total: float) -> dict[str, Any]:
    return {
        "round_trips": count, "wins": wins, "losses": losses,
        "win_rate": _num(wins / count) if count else None,
        "avg_win": _num(win_sum / wins) if wins else None,
        "avg_loss": _num(loss_sum / losses) if losses else None,
        "profit_factor": _num(win_sum / -loss_sum) if losses else None,
        "expectancy": _num(total / count) if count else None,
    }


def _breakdown(book: _Book, codes: I64, trip_codes: I64, names: list[str]) -> dict[str, dict[str, Any]]:
    size = len(names)

    def per(values: F64 | None, where: npt.NDArray[np.bool_] | None = None,
            keys: I64 = trip_codes) -> F64:
        if where is not None:
            keys = keys[where]
            values = None if values is None else values[where]
        return np.bincount(keys, weights=values, minlength=size).astype(np.float64)

    fills = per(None, keys=codes)
    volume, gross, fees = per(book.volume, keys=codes), per(book.gross, keys=codes), per(book.fee, keys=codes)
    win, loss = book.trip_pnl > 0, book.trip_pnl < 0
    count, total = per(None), per(book.trip_pnl)
    wins, win_sum = per(None, win), per(book.trip_pnl, win)
    losses, loss_sum = per(None, loss), per(book.trip_pnl, loss)
    out: dict[str, dict[str, Any]] = {}
    for code in np.flatnonzero(fills).tolist():
        out[names[code]] = {
            "fills": int(fills[code]), "volume": _num(volume[code]), "gross_pnl": _num(gross[code]),
            "fees": _num(fees[code]), "net_pnl": _num(gross[code] - fees[code]),
            **_trip_stats(int(count[code]), int(wins[code]), float(win_sum[code]), int(losses[code]),
                          float(loss_sum[code]), float(total[code])),
        }
    return out


def _drawdown(ts: F64, nav: F64) -> dict[str, float | None]:
    """Relative drawdown and its durations on the NAV index (one point per event, after a
    starting point of 1 at the first event's time)."""
    points = np.r_[1.0, nav]
    at = np.r_[ts[0], ts]
    peak = np.maximum.accumulate(points)
    at_peak = points >= peak * (1 - PEAK_TOLERANCE)
    depth = np.where(at_peak, 0.0, 1 - points / peak)
    step = np.diff(at_peak.astype(np.int8))
    falls = np.flatnonzero(step == -1) + 1   # first point below the peak
    backs = np.flatnonzero(step == 1) + 1    # first point back at it
    if backs.size < falls.size:               # never recovered: runs to the last event
        backs = np.r_[backs, points.size - 1]
    span = float(ts[-1] - ts[0])
    under = float(np.sum(at[backs] - at[falls]))
    return {
        "max_drawdown_ratio": _num(float(depth.max())),
        "max_drawdown_duration_s": _num(float(np.max(at[backs] - at[falls - 1], initial=0.0))),
        "time_under_water_s": _num(under),
        "time_under_water_frac": _num(under / span) if span > 0 else None,
    }


def _daily_returns(ts: F64, nav: F64) -> F64:
    """Return of each UTC day from the first event's day to the last one's: NAV at the
    day's end over NAV at the previous day's end (1 before the first event), minus 1."""
    day = np.floor(ts / DAY_S).astype(np.int64)
    day -= day[0]
    last = np.searchsorted(day, np.arange(day[-1] + 1), side="right") - 1
    closing = nav[last]
    return closing / np.r_[1.0, closing[:-1]] - 1


def _ratios(returns: F64, periods_per_year: int) -> dict[str, float | None]:
    if returns.size < 2:
        return {"sharpe": None, "sortino": None}
    mean, scale = float(returns.mean()), math.sqrt(periods_per_year)
    std = float(returns.std(ddof=1))
    downside = math.sqrt(float(np.mean(np.minimum(returns, 0.0) ** 2)))
    return {"sharpe": _num(mean / std * scale) if std > 0 else None,
            "sortino": _num(mean / downside * scale) if downside > 0 else None}


def compute(fills: Fills, *, periods_per_year: int = 365) -> dict[str, Any]:
    """The account's metrics, JSON-ready (no NaN or infinity: None where undefined), with
    the same trade metrics per strategy (`by_strategy`) and per symbol (`by_symbol`).
    Definitions: docs/metrics.md."""
    book = _book(fills)
    n, ts = book.ts.size, book.ts
    span = float(ts[-1] - ts[0]) if n else 0.0
    deposits = float(book.amount[book.kind == DEPOSIT].sum())
    withdrawals = float(book.amount[book.kind == WITHDRAWAL].sum())
    transfer_fees = float(deposits - withdrawals - book.cash.sum())
    gross, fees = float(book.gross.sum()), float(book.fee.sum())
    trips = book.trip_pnl
    win, loss = trips[trips > 0], trips[trips < 0]
    out: dict[str, Any] = {
        "events": n, "fills": int(book.group.size),
        "first_ts": format_ts(float(ts[0])) if n else None,
        "last_ts": format_ts(float(ts[-1])) if n else None,
        "span_s": _num(span),
        "deposits": _num(deposits), "withdrawals": _num(withdrawals), "transfer_fees": _num(transfer_fees),
        "volume": _num(float(book.volume.sum())), "gross_pnl": _num(gross), "fees": _num(fees),
        "net_pnl": _num(gross - fees),
        "equity": _num(float(book.pnl.sum() + book.cash.sum())),
        **_trip_stats(trips.size, win.size, float(win.sum()), loss.size, float(loss.sum()), float(trips.sum())),
    }

    cum_pnl = np.cumsum(book.pnl)
    peak_pnl = np.maximum(np.maximum.accumulate(cum_pnl), 0.0) if n else cum_pnl
    out["max_drawdown"] = _num(float(np.max(peak_pnl - cum_pnl, initial=0.0)))

    undefined: dict[str, Any] = {"max_drawdown_ratio": None, "max_drawdown_duration_s": None,
                                 "time_under_water_s": None, "time_under_water_frac": None,
                                 "total_return": None, "cagr": None, "calmar": None,
                                 "days": None, "sharpe": None, "sortino": None}
    out.update(undefined)
    equity = np.cumsum(book.pnl + book.cash)
    before = np.r_[0.0, equity[:-1]]
    moves = book.pnl != 0
    if n and not np.any(moves & (before <= 0)):
        returns = np.divide(book.pnl, before, out=np.zeros(n), where=moves)
        nav = np.cumprod(1 + returns)
        out.update(_drawdown(ts, nav))
        daily = _daily_returns(ts, nav)
        out["days"] = int(daily.size)
        out.update(_ratios(daily, periods_per_year))
        final = float(nav[-1])
        out["total_return"] = _num(final - 1)
        if span > 0 and final > 0:
            try:
                cagr = math.exp(math.log(final) * YEAR_S / span) - 1
            except OverflowError:
                cagr = math.inf
            out["cagr"] = _num(cagr)
            ratio = out["max_drawdown_ratio"]
            out["calmar"] = _num(cagr / ratio) if ratio else None

    open_time = float(np.sum(np.diff(ts) * (book.open_groups[:-1] > 0))) if n else 0.0
    out["exposure"] = _num(open_time / span) if span > 0 else None

    n_symbols = max(len(fills.symbols), 1)
    out["by_strategy"] = _breakdown(book, book.group // n_symbols, book.trip_group // n_symbols,
                                    fills.strategies)
    out["by_symbol"] = _breakdown(book, book.group % n_symbols, book.trip_group % n_symbols, fills.symbols)
    return out


def equity_curve(fills: Fills, max_points: int = 1000) -> list[dict[str, Any]]:
    """Closed-trade equity after each event (cash flows + net realized PnL), as
    `{"ts": ISO, "equity": float}`; above `max_points` events, evenly spaced events
    that include the first and the last, plus the lowest one (from 3 points on)."""
    if max_points < 2:
        raise ValueError("max_points must be at least 2 (the first and the last event)")
    book = _book(fills)
    equity = np.cumsum(book.pnl + book.cash)
    keep: npt.NDArray[np.int64] = np.arange(equity.size)
    if equity.size > max_points:
        if max_points == 2:
            keep = np.array([0, equity.size - 1])
        else:
            even = np.linspace(0, equity.size - 1, max_points - 1).round().astype(np.int64)
            keep = np.unique(np.r_[even, np.argmin(equity)])
    return [{"ts": format_ts(t), "equity": _num(e)}
            for t, e in zip(book.ts[keep].tolist(), equity[keep].tolist(), strict=True)]
