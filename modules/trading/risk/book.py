"""What the risk service watches and which of its limits are breached: plain bookkeeping,
no bus and no clock of its own (the caller passes `now`), so it is tested directly.

Equity of an account is the ledger's closed-trade `equity` (TRADE_METRICS) plus the
unrealized PnL of its POSITIONS. Losses are measured on trading PnL (the ledger's `net_pnl`
plus unrealized PnL), so a deposit or a withdrawal is never a gain or a loss; the drawdown
peak moves with cash flows for the same reason.

Two kinds of breach: a *condition* (exposure, order rate, stale market, disk, clock) ends
by itself when the figure comes back under its limit; a *loss* (daily loss, drawdown) stays
until the next UTC day (daily loss) or until a person accepts it, which re-bases the
figure on the current equity (`acknowledge`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from appliance.bus.payloads import HealthState
from appliance.bus.trading import TIMEFRAMES, FeedState, Order, Position
from modules.trading.risk.settings import RiskSettings

ORDER_WINDOW = timedelta(minutes=1)
_BASELINE_KEYS = ("day", "day_start_equity", "day_start_pnl", "peak", "peak_cash",
                  "ledger_drawdown_seen")


@dataclass(frozen=True)
class Breach:
    """One limit exceeded: `text` names the limit and the figure, e.g.
    `max_daily_loss_pct: lost 6.2 % today (limit 5 %)`."""

    limit: str
    text: str
    account: str | None = None
    loss: bool = False  # stays until acknowledged (or, for the daily loss, the next day)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Assessment:
    figures: dict[str, float | None]
    breaches: list[Breach]

    @property
    def conditions(self) -> list[Breach]:
        return [b for b in self.breaches if not b.loss]

    @property
    def losses(self) -> list[Breach]:
        return [b for b in self.breaches if b.loss]


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None


def _g(limit: float) -> str:
    return f"{limit:g}"


class _Worst:
    """The worst (highest) value of each figure over the accounts; None when none has one."""

    def __init__(self) -> None:
        self.values: dict[str, float | None] = dict.fromkeys(
            ("daily_loss_pct", "drawdown_pct", "ledger_max_drawdown_pct", "symbol_exposure",
             "total_exposure"))

    def keep(self, key: str, value: float | None) -> None:
        current = self.values[key]
        if value is not None and (current is None or value > current):
            self.values[key] = value


@dataclass
class Account:
    """One trading account: the latest ledger figures and positions, and the baselines the
    losses are measured from (kept across restarts by the service)."""

    name: str
    equity: float | None = None  # closed-trade equity, from the ledger
    net_pnl: float | None = None
    ledger_drawdown: float | None = None  # the ledger's max_drawdown_ratio (all-time)
    positions: list[Position] = field(default_factory=list)
    day: str | None = None
    day_start_equity: float | None = None
    day_start_pnl: float | None = None
    peak: float | None = None
    peak_cash: float | None = None
    ledger_drawdown_seen: float | None = None

    @property
    def cash(self) -> float | None:
        """Deposits − withdrawals − transfer fees: the part of equity that is not PnL."""
        if self.equity is None or self.net_pnl is None:
            return None
        return self.equity - self.net_pnl

    def unrealized(self) -> float:
        total = 0.0
        for p in self.positions:
            if p.unrealized_pnl is not None:
                total += float(p.unrealized_pnl)
            elif p.last_price is not None:
                total += float((p.last_price - p.avg_price) * p.qty)
        return total

    def marked(self) -> float | None:
        """Equity with open positions marked to their last price."""
        return None if self.equity is None else self.equity + self.unrealized()

    def pnl(self) -> float | None:
        return None if self.net_pnl is None else self.net_pnl + self.unrealized()

    def exposures(self) -> dict[str, float]:
        """|qty × last price| per symbol (the average price when no last price is known)."""
        out: dict[str, float] = {}
        for p in self.positions:
            price = p.last_price if p.last_price is not None else p.avg_price
            out[p.symbol] = out.get(p.symbol, 0.0) + abs(float(p.qty * price))
        return {symbol: value for symbol, value in out.items() if value > 0}

    def baselines(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _BASELINE_KEYS}


class RiskBook:
    """The inputs of the risk service and the breaches of its limits."""

    def __init__(self, limits: RiskSettings) -> None:
        self.limits = limits
        self.accounts: dict[str, Account] = {}
        self.orders: dict[str, datetime] = {}  # client order id → created
        self._order_times: deque[tuple[datetime, str]] = deque()
        self.feeds: dict[str, FeedState] = {}  # topic → latest state
        self.health: HealthState | None = None

    # -- inputs ---------------------------------------------------------------------------
    def account(self, name: str) -> Account:
        return self.accounts.setdefault(name, Account(name))

    def on_metrics(self, account: str, metrics: dict[str, Any]) -> None:
        acc = self.account(account)
        acc.equity = _num(metrics.get("equity"))
        acc.net_pnl = _num(metrics.get("net_pnl"))
        acc.ledger_drawdown = _num(metrics.get("max_drawdown_ratio"))

    def on_positions(self, account: str, positions: list[Position]) -> None:
        self.account(account).positions = [p for p in positions if p.qty != 0]

    def on_order(self, order: Order, now: datetime) -> None:
        """Count each order once, at its creation time (never later than `now`): the first
        update seen of it, whatever its status (a paper order may start `open`, not `new`),
        and orders re-delivered after a restart fall outside the minute. An order first seen
        `rejected` is not counted: execution refused it (halted, stale intent) and it never
        reached the market; counting the refusals made while halted would keep this limit
        breached and refuse the resume. A live order the exchange rejects was first seen
        `new` (it is written before it is sent), so it still counts."""
        if order.client_order_id in self.orders or order.status == "rejected":
            return
        try:
            created = datetime.fromisoformat(order.created_at)
        except ValueError:
            created = now
        if created.tzinfo is None or created > now:
            created = now
        self.orders[order.client_order_id] = created
        self._order_times.append((created, order.client_order_id))

    def on_feed(self, topic: str, feed: FeedState | None) -> None:
        """The feed's latest state; None forgets the feed (its retained state was cleared:
        the market no longer serves it)."""
        if feed is None:
            self.feeds.pop(topic, None)
        else:
            self.feeds[topic] = feed

    def on_health(self, health: HealthState) -> None:
        self.health = health

    def orders_in_last_minute(self, now: datetime) -> int:
        while self._order_times and self._order_times[0][0] <= now - ORDER_WINDOW * 2:
            _, oid = self._order_times.popleft()
            self.orders.pop(oid, None)
        return sum(1 for created in self.orders.values() if now - ORDER_WINDOW < created <= now)

    # -- baselines ------------------------------------------------------------------------
    def roll(self, now: datetime) -> bool:
        """Bring the baselines up to `now`: a new UTC day starts its daily loss at the
        current equity, a new high raises the peak, cash flows move the peak. True when a
        baseline changed (worth keeping)."""
        today = now.date().isoformat()
        changed = False
        for acc in self.accounts.values():
            value, pnl, cash = acc.marked(), acc.pnl(), acc.cash
            if value is None or pnl is None or cash is None:
                continue
            if acc.day != today:
                acc.day, acc.day_start_equity, acc.day_start_pnl = today, value, pnl
                changed = True
            if acc.peak is not None and acc.peak_cash is not None and cash != acc.peak_cash:
                acc.peak += cash - acc.peak_cash
                acc.peak_cash = cash
                changed = True
            if acc.peak is None or value > acc.peak:
                acc.peak, acc.peak_cash = value, cash
                changed = True
            if acc.ledger_drawdown_seen is None and acc.ledger_drawdown is not None:
                # The ledger's history before risk first saw the account is not a breach.
                acc.ledger_drawdown_seen = acc.ledger_drawdown
                changed = True
        return changed

    def acknowledge(self, breaches: list[Breach]) -> None:
        """A person accepts these losses: measure them again from the current equity."""
        for breach in breaches:
            acc = self.accounts.get(breach.account or "")
            if acc is None or acc.marked() is None:
                continue
            if breach.limit == "max_daily_loss_pct":
                acc.day_start_equity, acc.day_start_pnl = acc.marked(), acc.pnl()
            elif breach.limit == "max_drawdown_pct":
                acc.peak, acc.peak_cash = acc.marked(), acc.cash
                acc.ledger_drawdown_seen = acc.ledger_drawdown

    def baselines(self) -> dict[str, dict[str, Any]]:
        return {name: acc.baselines() for name, acc in self.accounts.items()}

    def load_baselines(self, saved: dict[str, Any]) -> None:
        for name, values in saved.items():
            if not isinstance(values, dict):
                continue
            acc = self.account(name)
            day = values.get("day")
            acc.day = day if isinstance(day, str) else None
            for key in _BASELINE_KEYS[1:]:
                setattr(acc, key, _num(values.get(key)))

    # -- figures and breaches -------------------------------------------------------------
    def daily_loss_pct(self, acc: Account) -> float | None:
        today = self.pnl_today(acc)
        if today is None or not acc.day_start_equity or acc.day_start_equity <= 0:
            return None
        return -today / acc.day_start_equity * 100

    def pnl_today(self, acc: Account) -> float | None:
        """Trading PnL since the day's start (closed and open), in the account's currency."""
        pnl = acc.pnl()
        if pnl is None or acc.day_start_pnl is None:
            return None
        return pnl - acc.day_start_pnl

    def drawdown_pct(self, acc: Account) -> float | None:
        value = acc.marked()
        if value is None or acc.peak is None or acc.peak <= 0:
            return None
        return max(0.0, (acc.peak - value) / acc.peak * 100)

    def staleness(self, feed: FeedState, now: datetime) -> str | None:
        """Why `feed` is stale ("" when the market gave no reason), or None when it is not.
        The market's own flag counts; and for a live feed risk judges for itself from the
        last bar the market reported, because a market that died says nothing any more (a
        replay's bars are old by the wall clock: only its market can tell)."""
        if feed.stale:
            return feed.reason
        if not feed.live or feed.last_bar_ts is None:
            return None  # no bar yet: only the market can tell how long it has waited
        step = timedelta(seconds=TIMEFRAMES[feed.timeframe])
        closed = feed.last_bar_ts + step
        if now - closed > step * self.limits.stale_after_bars:
            return (f"no bar closed since {closed.isoformat()}, more than "
                    f"{self.limits.stale_after_bars} timeframes ago")
        return None

    def assess(self, now: datetime) -> Assessment:
        """Every figure against its limit, and the breaches, worst account first."""
        cfg = self.limits
        figures: dict[str, float | None] = {"pnl_today": None}  # summed over the accounts
        breaches: list[Breach] = []
        worst = _Worst()

        for name in sorted(self.accounts):
            acc = self.accounts[name]
            where = f", account {name}"
            value = acc.marked()
            figures[f"equity.{name}"] = value
            today = self.pnl_today(acc)
            figures[f"pnl_today.{name}"] = today
            if today is not None:
                figures["pnl_today"] = (figures.get("pnl_today") or 0.0) + today
            loss = self.daily_loss_pct(acc)
            worst.keep("daily_loss_pct", loss)
            if cfg.max_daily_loss_pct is not None and loss is not None \
                    and loss > cfg.max_daily_loss_pct:
                breaches.append(Breach("max_daily_loss_pct", (
                    f"max_daily_loss_pct: lost {loss:.1f} % today "
                    f"(limit {_g(cfg.max_daily_loss_pct)} %){where}"), name, loss=True))
            dd = self.drawdown_pct(acc)
            worst.keep("drawdown_pct", dd)
            if cfg.max_drawdown_pct is not None and dd is not None and dd > cfg.max_drawdown_pct:
                breaches.append(Breach("max_drawdown_pct", (
                    f"max_drawdown_pct: equity {value:.2f} is {dd:.1f} % below its peak "
                    f"{acc.peak:.2f} (limit {_g(cfg.max_drawdown_pct)} %){where}"), name, loss=True))
            ratio, seen = acc.ledger_drawdown, acc.ledger_drawdown_seen
            worst.keep("ledger_max_drawdown_pct", None if ratio is None else ratio * 100)
            if cfg.max_drawdown_pct is not None and ratio is not None and seen is not None \
                    and ratio * 100 > cfg.max_drawdown_pct and ratio > seen + 1e-12:
                breaches.append(Breach("max_drawdown_pct", (
                    f"max_drawdown_pct: the ledger's max drawdown reached {ratio * 100:.1f} % "
                    f"(limit {_g(cfg.max_drawdown_pct)} %){where}"), name, loss=True))
            breaches += self._exposure(acc, value, worst)

        rate = self.orders_in_last_minute(now)
        figures["orders_per_minute"] = float(rate)
        if cfg.max_orders_per_minute is not None and rate > cfg.max_orders_per_minute:
            breaches.append(Breach("max_orders_per_minute", (
                f"max_orders_per_minute: {rate} new orders in the last minute "
                f"(limit {cfg.max_orders_per_minute})")))

        stale = [(feed, why) for _, feed in sorted(self.feeds.items())
                 if (why := self.staleness(feed, now)) is not None]
        figures["stale_feeds"] = float(len(stale))
        if cfg.halt_on_stale_market:
            for feed, why in stale:
                breaches.append(Breach("halt_on_stale_market", (
                    f"halt_on_stale_market: the feed {feed.exchange} {feed.symbol} "
                    f"{feed.timeframe} is stale{f' ({why})' if why else ''}")))

        health = self.health
        disk = health.disk_percent if health else None
        figures["disk_percent"] = disk
        if cfg.max_disk_percent is not None and disk is not None and disk > cfg.max_disk_percent:
            breaches.append(Breach("max_disk_percent", (
                f"max_disk_percent: the disk is {disk:.1f} % full "
                f"(limit {_g(cfg.max_disk_percent)} %)")))
        synced = health.clock_synchronized if health else None
        figures["clock_synchronized"] = None if synced is None else float(synced)
        if cfg.require_clock_sync and synced is False:
            breaches.append(Breach("require_clock_sync", (
                "require_clock_sync: the clock is not synchronised (NTP)")))
        return Assessment({**worst.values, **figures}, breaches)

    def _exposure(self, acc: Account, value: float | None, worst: _Worst) -> list[Breach]:
        cfg, found = self.limits, []
        where = f", account {acc.name}"
        exposures = acc.exposures()
        if value is None or not exposures:
            return []
        if value <= 0:
            # Any position is infinitely many times no equity.
            for key, limit in (("max_total_exposure", cfg.max_total_exposure),
                               ("max_symbol_exposure", cfg.max_symbol_exposure)):
                if limit is not None:
                    return [Breach(key, (f"{key}: positions are open with an equity of "
                                         f"{value:.2f} (limit {_g(limit)} × equity){where}"),
                                   acc.name)]
            return []
        for symbol, amount in sorted(exposures.items()):
            ratio = amount / value
            worst.keep("symbol_exposure", ratio)
            if cfg.max_symbol_exposure is not None and ratio > cfg.max_symbol_exposure:
                found.append(Breach("max_symbol_exposure", (
                    f"max_symbol_exposure: {symbol} is {ratio:.2f} × equity "
                    f"(limit {_g(cfg.max_symbol_exposure)}){where}"), acc.name))
        total = sum(exposures.values()) / value
        worst.keep("total_exposure", total)
        if cfg.max_total_exposure is not None and total > cfg.max_total_exposure:
            found.append(Breach("max_total_exposure", (
                f"max_total_exposure: positions are {total:.2f} × equity "
                f"(limit {_g(cfg.max_total_exposure)}){where}"), acc.name))
        return found

    def detail(self) -> dict[str, dict[str, Any]]:
        """Per account: equity, baselines and figures, for the `state` command."""
        return {name: {"equity": acc.marked(), "closed_equity": acc.equity,
                       "unrealized_pnl": acc.unrealized(), "daily_loss_pct": self.daily_loss_pct(acc),
                       "drawdown_pct": self.drawdown_pct(acc), "exposure": acc.exposures(),
                       **acc.baselines()}
                for name, acc in sorted(self.accounts.items())}
