"""The `sizing` service (L3 of the trading pipeline): a target exposure becomes a target
position, published as an ORDER_INTENT for one account.

For each ENSEMBLE_TARGET the notional to hold is, by `method`:

- fixed_fractional: exposure · fraction · equity
- volatility:       exposure · equity · target_risk / (ATR / price), ATR the mean true range
                    of the feed's last `atr_period` bars (flat until there are that many)
- kelly:            exposure · f · equity, f = clip(W − (1 − W) / R, 0, kelly_cap) with the
                    win rate W and R = avg_win / |avg_loss| of the strategy's round trips in
                    the ledger metrics; `fraction` until there are `kelly_min_trades` of them

capped at max_leverage · equity; a negative exposure is flat unless `allow_short`. The
target quantity is notional / close, rounded toward zero to `qty_step`.

An intent is sent for the first target of a symbol after a start, and when the target
differs from the last one sent by more than `min_change` × equity in notional, or becomes 0.
Otherwise, when the position the account holds (its retained POSITIONS) differs from the
last target sent by that much, that target is sent again for this bar: an intent that
execution refused (halted, stale) or that a flatten undid is asked for again, so the account
goes back to its target after a resume. It is the last target again, not the new one, so
that a fill still on its way does not turn every small move of the target into an order. An
intent is a target position: sending it again orders nothing more (execution counts its
position and open orders). Equity comes from the account's TRADE_METRICS (`initial_equity`
until they arrive). Every decision depends on the messages received only; the intent's key
and timestamp come from the bar.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from appliance.bus import registry, slug
from appliance.bus.message import Received
from appliance.bus.trading import Bar, OrderIntent, Positions, Target, check_feed
from appliance.config import Section
from appliance.runtime import Service, subscribe

log = logging.getLogger("circles.sizing")
MAX_DECIMAL_PLACES = 18  # of the quantities and prices of an OrderIntent


class SizingSettings(Section):
    account: str = Field("paper", min_length=1, max_length=64, description="the account traded")
    strategy_id: str = Field("ensemble", min_length=1, max_length=64)
    method: Literal["fixed_fractional", "volatility", "kelly"] = "fixed_fractional"
    max_leverage: float = Field(1.0, gt=0, le=100, allow_inf_nan=False,
                                description="no position above this × equity in notional")
    fraction: float = Field(0.1, gt=0, allow_inf_nan=False, validate_default=True,
                            description="share of equity held at exposure ±1 (fixed fractional)")
    target_risk: float = Field(0.01, gt=0, le=1, description="volatility targeting: equity "
                               "share at risk per ATR move")
    atr_period: int = Field(14, ge=1, le=10_000, description="bars of the ATR")
    kelly_cap: float = Field(0.25, gt=0, le=1, description="the Kelly fraction is at most this")
    kelly_min_trades: int = Field(20, ge=1, description="round trips before Kelly replaces `fraction`")
    initial_equity: float = Field(10_000.0, gt=0, allow_inf_nan=False,
                                  description="equity until the ledger's metrics arrive")
    allow_short: bool = Field(False, description="spot: a negative exposure is flat")
    qty_step: Decimal = Field(Decimal("1e-8"), gt=0, description="quantities are multiples of it")
    min_change: float = Field(0.01, ge=0, le=1, description="smallest change sent, × equity")

    @field_validator("account")
    @classmethod
    def _usable_account(cls, account: str) -> str:
        slug(account)  # ValueError when nothing of it is usable in a topic
        return account

    @field_validator("fraction")
    @classmethod
    def _within_leverage(cls, fraction: float, info: ValidationInfo) -> float:
        leverage = info.data.get("max_leverage")
        if leverage is not None and fraction > leverage:
            raise ValueError(f"must not exceed max_leverage ({leverage})")
        return fraction

    @field_validator("qty_step")
    @classmethod
    def _representable(cls, step: Decimal) -> Decimal:
        if not step.is_finite() or _places(step) > MAX_DECIMAL_PLACES:
            raise ValueError(f"must be finite with at most {MAX_DECIMAL_PLACES} decimal places")
        return step


@dataclass(frozen=True)
class KellyStats:
    """The round-trip figures Kelly sizing reads from the ledger metrics."""

    round_trips: int = 0
    win_rate: float | None = None
    avg_win: float | None = None
    avg_loss: float | None = None


@dataclass(frozen=True)
class Plan:
    qty: Decimal
    notional: float
    reason: str


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _places(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def equity_from(metrics: Mapping[str, Any], initial_equity: float) -> float | None:
    """The account's equity from its ledger metrics: `equity` once the ledger holds a deposit;
    before that the ledger knows only the PnL, so `initial_equity + equity`. None when the
    metrics give no finite equity."""
    equity = _number(metrics.get("equity"))
    if equity is None:
        return None
    deposits = _number(metrics.get("deposits")) or 0.0
    return equity if deposits > 0 else initial_equity + equity


def kelly_stats(metrics: Mapping[str, Any], strategy_id: str) -> KellyStats:
    """The strategy's own round-trip figures (`by_strategy`), else the account's."""
    source: Mapping[str, Any] = metrics
    by_strategy = metrics.get("by_strategy")
    if isinstance(by_strategy, Mapping) and isinstance(by_strategy.get(strategy_id), Mapping):
        source = by_strategy[strategy_id]
    return KellyStats(round_trips=int(_number(source.get("round_trips")) or 0),
                      win_rate=_number(source.get("win_rate")), avg_win=_number(source.get("avg_win")),
                      avg_loss=_number(source.get("avg_loss")))


def kelly_fraction(stats: KellyStats, cap: float) -> float:
    """f* = W − (1 − W) / R with R = avg_win / |avg_loss|, clipped to [0, cap]: W when there
    was no loss (R infinite), 0 when there was no win."""
    win_rate = stats.win_rate or 0.0
    if not stats.avg_loss:
        share = win_rate
    elif not stats.avg_win or stats.avg_win <= 0:
        share = 0.0
    else:
        share = win_rate - (1.0 - win_rate) / (stats.avg_win / abs(stats.avg_loss))
    return min(cap, max(0.0, share))


def round_qty(qty: float, step: Decimal) -> Decimal:
    """`qty` as a multiple of `step`, rounded toward zero, with the step's decimal places.
    Float noise is removed first (12 significant digits, as in the ledger's metrics), so that
    19.999999999999996 becomes 20 rather than one step less."""
    steps = (Decimal(f"{qty:.12g}") / step).to_integral_value(rounding=ROUND_DOWN)
    if steps == 0:
        return Decimal(0)  # "0", not "-0E-8"
    return (steps * step).quantize(Decimal(1).scaleb(-_places(step)))


def decimal_price(price: float) -> Decimal:
    """The float price as the Decimal it prints as, with at most 18 decimal places."""
    value = Decimal(str(price))
    if _places(value) > MAX_DECIMAL_PLACES:
        value = value.quantize(Decimal(1).scaleb(-MAX_DECIMAL_PLACES))
    return value


def intent_key(account: str, strategy_id: str, exchange: str, symbol: str, timeframe: str,
               ts: datetime) -> str:
    """`<account>-<symbol>-<hash>-<epoch s>`: the slugs of account and symbol (16 characters
    at most each), the first 12 hex digits of the SHA-256 of all six fields, and the bar's
    time; at most 60 characters of `[a-z0-9_-]`, the same for the same bar every time."""
    fields = "\n".join((account, strategy_id, exchange, symbol, timeframe, ts.isoformat()))
    digest = hashlib.sha256(fields.encode()).hexdigest()[:12]
    return "-".join((slug(account)[:16].strip("-"), slug(symbol)[:16].strip("-"), digest,
                     str(int(ts.timestamp()))))


def plan(config: SizingSettings, exposure: float, equity: float, price: float,
         atr: float | None, stats: KellyStats | None, models: str) -> Plan:
    """The target position for `exposure` (see the module's docstring for the formulas);
    `models` names the models behind it, for the reason."""
    head = f"{models} → {exposure:.2f}"
    if exposure < 0 and not config.allow_short:
        return Plan(round_qty(0.0, config.qty_step), 0.0, f"{head}: no shorts, flat")
    if equity <= 0:
        return Plan(round_qty(0.0, config.qty_step), 0.0, f"{head}: no equity, flat")
    cap = config.max_leverage * equity
    if config.method == "volatility":
        if atr is None:
            return Plan(round_qty(0.0, config.qty_step), 0.0,
                        f"{head}: ATR warming up ({config.atr_period} bars), flat")
        if exposure == 0:
            notional = 0.0
        elif atr <= 0:
            notional = math.copysign(math.inf, exposure)
        else:
            notional = exposure * equity * config.target_risk / (atr / price)
        reason = f"{head} × {config.target_risk:g} risk / ATR {atr / price:.3%} of price"
    elif (config.method == "kelly" and stats is not None and stats.win_rate is not None
          and stats.round_trips >= config.kelly_min_trades):
        share = kelly_fraction(stats, config.kelly_cap)
        notional = exposure * share * equity
        reason = f"{head} of kelly {share:.4g} × equity"
    else:
        notional = exposure * config.fraction * equity
        reason = f"{head} of {config.fraction:g} × equity"
        if config.method == "kelly":
            reason += f" (kelly after {config.kelly_min_trades} round trips)"
    if abs(notional) > cap:
        notional = math.copysign(cap, notional)
        reason += f", capped at {config.max_leverage:g} × equity"
    return Plan(round_qty(notional / price, config.qty_step), notional, reason)


def worth_sending(last: Decimal | None, qty: Decimal, price: float, equity: float,
                  min_change: float) -> bool:
    """Send `qty` after `last`? Always the first time and when it becomes 0; otherwise when
    the change is worth more than `min_change` × equity."""
    if last is None:
        return True
    if qty == last:
        return False
    if qty == 0:
        return True
    return float(abs(qty - last)) * price > min_change * equity


@dataclass
class FeedState:
    """One feed's last bar and its recent true ranges (for the ATR)."""

    bar: Bar
    ranges: deque[float]

    def add(self, bar: Bar) -> None:
        previous = self.bar.close
        self.ranges.append(max(bar.high - bar.low, abs(bar.high - previous), abs(bar.low - previous)))
        self.bar = bar

    def atr(self) -> float | None:
        """The mean of the last `maxlen` true ranges; None until there are that many."""
        if len(self.ranges) < (self.ranges.maxlen or 0):
            return None
        return sum(self.ranges) / len(self.ranges)


class SizingService(Service):
    name = "sizing"
    Settings = SizingSettings

    def topic_values(self) -> dict[str, str]:
        # TRADE_METRICS and POSITIONS of this account only.
        return {"account": slug(self.config.account)}

    async def start(self) -> None:
        self.equity: float = self.config.initial_equity
        self.stats: KellyStats | None = None
        self.feeds: dict[tuple[str, str, str], FeedState] = {}
        self.sent: dict[tuple[str, str], Decimal] = {}  # (exchange, symbol) → last target sent
        # symbol → quantity the account holds; None until its POSITIONS arrive (a backtest
        # without execution has none: then only what was sent counts).
        self.held: dict[str, Decimal] | None = None
        self.intents = 0

    @subscribe(registry.TRADE_METRICS)
    async def on_metrics(self, msg: Received) -> None:
        if msg.data is None:
            return  # the retained metrics were deleted: keep the last equity known
        metrics = msg.data.metrics
        equity = equity_from(metrics, self.config.initial_equity)
        if equity is not None:
            self.equity = equity
        self.stats = kelly_stats(metrics, self.config.strategy_id)

    @subscribe(registry.POSITIONS)
    async def on_positions(self, msg: Received) -> None:
        positions: Positions | None = msg.data
        if positions is None:
            return  # the retained positions were deleted: nothing new is known
        held: dict[str, Decimal] = {}
        for position in positions.positions:
            held[position.symbol] = held.get(position.symbol, Decimal(0)) + position.qty
        self.held = held

    @subscribe(registry.ENSEMBLE_TARGET)
    async def on_target(self, msg: Received) -> None:
        target: Target = msg.data
        bar = target.bar
        check_feed(msg.params, bar)
        state = self.feeds.get(bar.feed)
        if state is None:
            # The first bar has no previous close: its true range is its own range.
            state = self.feeds[bar.feed] = FeedState(bar, deque(maxlen=self.config.atr_period))
            state.ranges.append(bar.high - bar.low)
        elif bar.ts <= state.bar.ts:
            log.debug("target of a bar not newer than the last one; ignored",
                      extra={"feed": list(bar.feed), "ts": bar.ts.isoformat()})
            return
        else:
            state.add(bar)
        intent = self.intent(target, state.atr())
        if intent is not None:
            await self.bus.send(registry.ORDER_INTENT, intent, account=self.config.account)
            self.sent[(bar.exchange, bar.symbol)] = intent.target_qty
            self.intents += 1

    def intent(self, target: Target, atr: float | None) -> OrderIntent | None:
        """The intent for `target`: its new target position, or the last one again while the
        account does not hold it; None when neither is called for."""
        config, bar = self.config, target.bar
        models = "+".join(name for name, weight in target.weights.items() if weight > 0) or "no model"
        sized = plan(config, target.exposure, self.equity, bar.close, atr, self.stats, models)
        last = self.sent.get((bar.exchange, bar.symbol))
        # Positions name no exchange: an account trades on one.
        held = None if self.held is None else self.held.get(bar.symbol, Decimal(0))
        if worth_sending(last, sized.qty, bar.close, self.equity, config.min_change):
            qty, reason = sized.qty, sized.reason
        elif last is not None and held is not None and \
                worth_sending(held, last, bar.close, self.equity, config.min_change):
            qty, reason = last, f"the account holds {held}, not the target {last}: asked again"
        else:
            return None
        return OrderIntent(
            key=intent_key(config.account, config.strategy_id, bar.exchange, bar.symbol,
                           bar.timeframe, bar.ts),
            account=config.account, strategy_id=config.strategy_id, exchange=bar.exchange,
            symbol=bar.symbol, target_qty=qty, price=decimal_price(bar.close),
            bar_ts=bar.ts, timeframe=bar.timeframe, reason=reason,
            ts=bar.close_time.isoformat(timespec="milliseconds"))

    def status_text(self) -> str:
        return f"{len(self.feeds)} feeds, {self.intents} intents, equity {self.equity:.2f}"
