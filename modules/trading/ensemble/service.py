"""The `ensemble` service (L2 of the trading pipeline): one target exposure per bar.

For each ALPHA_SIGNALS message it publishes one `Target` on ENSEMBLE_TARGET:

    exposure = clip( Σ wᵢ · valueᵢ · confidenceᵢ / Σ wᵢ , −1, 1 )

over the models whose configured weight (`weights`, else `default_weight`) is above 0; an
exposure nearer 0 than `min_abs_exposure` is 0. With `hit_rate_window` N > 0 each weight is
multiplied by the model's hit rate on the feed: the share of its last N evaluated signals
whose sign matched the sign of the next close-to-close return (a signal of 0, a return of 0
or a missing bar in between is not evaluated), 0.5 until `min_observations` are evaluated.
The state depends only on the signals received, so a backtest gives the same targets.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated

from pydantic import Field, ValidationInfo, field_validator

from appliance.bus import registry
from appliance.bus.message import Received
from appliance.bus.trading import TIMEFRAMES, Bar, ModelSignal, Signals, Target, check_feed
from appliance.config import Section
from appliance.runtime import Service, subscribe

log = logging.getLogger("circles.ensemble")
PRIOR_HIT_RATE = 0.5
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class EnsembleSettings(Section):
    weights: dict[str, Weight] = Field(default_factory=dict,
                                       description="weight per model name; 0 excludes it")
    default_weight: Weight = Field(1.0, description="weight of a model not in `weights`")
    hit_rate_window: int = Field(0, ge=0, le=100_000,
                                 description="weigh by the hit rate over the last N signals; 0: off")
    min_observations: int = Field(10, ge=1, validate_default=True,
                                  description="evaluated signals before the hit rate replaces 0.5")
    min_abs_exposure: float = Field(0.05, ge=0, le=1, description="smaller exposures become 0")

    @field_validator("min_observations")
    @classmethod
    def _within_window(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("hit_rate_window")
        if window and value > window:
            raise ValueError(f"must not exceed hit_rate_window ({window})")
        return value


def combine(signals: Sequence[ModelSignal], weights: Mapping[str, float]) -> float:
    """clip(Σ wᵢ·valueᵢ·confidenceᵢ / Σ wᵢ, −1, 1) over the signals whose model is in
    `weights`, summed in the order of `signals`; 0 when the weights sum to 0."""
    numerator = denominator = 0.0
    for signal in signals:
        weight = weights.get(signal.model)
        if weight is None:
            continue
        numerator += weight * signal.value * signal.confidence
        denominator += weight
    if denominator <= 0:
        return 0.0
    return min(1.0, max(-1.0, numerator / denominator)) + 0.0  # + 0.0: no "-0.0" in the JSON


def deadband(exposure: float, minimum: float) -> float:
    """`exposure`, or 0 when its magnitude is below `minimum`."""
    return 0.0 if abs(exposure) < minimum else exposure


@dataclass
class FeedState:
    """What the ensemble remembers of one feed: the last bar, its signals, and each model's
    recent hits (True: the sign was right)."""

    bar: Bar
    values: dict[str, float]
    hits: dict[str, deque[bool]] = field(default_factory=dict)

    def evaluate(self, bar: Bar, window: int) -> None:
        """Score the signals of the previous bar against the return to `bar`, when `bar`
        is the very next bar of the feed."""
        if bar.ts != self.bar.ts + timedelta(seconds=TIMEFRAMES[bar.timeframe]):
            return
        change = bar.close - self.bar.close
        if change == 0:
            return
        for model, value in self.values.items():
            if value != 0:
                self.hits.setdefault(model, deque(maxlen=window)).append((value > 0) == (change > 0))

    def hit_rate(self, model: str, min_observations: int) -> float:
        hits = self.hits.get(model, ())
        return sum(hits) / len(hits) if len(hits) >= min_observations else PRIOR_HIT_RATE


class EnsembleService(Service):
    name = "ensemble"
    Settings = EnsembleSettings

    async def start(self) -> None:
        self.feeds: dict[tuple[str, str, str], FeedState] = {}
        self.published = 0

    @subscribe(registry.ALPHA_SIGNALS)
    async def on_signals(self, msg: Received) -> None:
        signals: Signals = msg.data
        bar = signals.bar
        check_feed(msg.params, bar)
        state = self.feeds.get(bar.feed)
        if state is not None and bar.ts <= state.bar.ts:
            log.debug("signals of a bar not newer than the last one; ignored",
                      extra={"feed": list(bar.feed), "ts": bar.ts.isoformat()})
            return
        target = self.target(signals, state)
        await self.bus.send(registry.ENSEMBLE_TARGET, target, exchange=bar.exchange,
                            symbol=bar.symbol, timeframe=bar.timeframe)
        self.published += 1

    def weights(self, signals: Signals, state: FeedState | None) -> dict[str, float]:
        """The effective weight of each model of `signals` that takes part (configured
        weight above 0), in the order of the signals."""
        config = self.config
        used: dict[str, float] = {}
        for signal in signals.signals:
            weight = config.weights.get(signal.model, config.default_weight)
            if weight <= 0:
                continue
            if config.hit_rate_window:
                weight *= (state.hit_rate(signal.model, config.min_observations) if state
                           else PRIOR_HIT_RATE)
            used[signal.model] = weight
        return used

    def target(self, signals: Signals, state: FeedState | None) -> Target:
        """The target after `signals`; updates the feed's state (hits, last bar)."""
        bar = signals.bar
        window = self.config.hit_rate_window
        if state is not None and window:
            state.evaluate(bar, window)
        weights = self.weights(signals, state)
        exposure = deadband(combine(signals.signals, weights), self.config.min_abs_exposure)
        values = {s.model: s.value for s in signals.signals} if window else {}
        if state is None:
            self.feeds[bar.feed] = FeedState(bar, values)
        else:
            state.bar, state.values = bar, values
        return Target(bar=bar, exposure=exposure, weights=weights)

    def status_text(self) -> str:
        return f"{len(self.feeds)} feeds, {self.published} targets published"
