"""`breakout`: a close beyond the Donchian channel of the `period` bars before it.

A close above the channel's high is a long signal, below its low a short one. The signal
fades as the move ages: value = ±(1 − age / fade_bars), where age counts the bars since the
most recent breakout (0 on the breakout bar; none within `fade_bars` → 0). A breakout that
failed — the close is back at or inside the level it broke — gives 0.
confidence = the breakout bar's volume over the mean volume of its channel, capped at 1
(1 when the channel traded nothing); 1 when there is no breakout.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import Field

from modules.trading.alpha.models.base import History, Model, Params


class BreakoutParams(Params):
    period: int = Field(20, ge=1, le=10_000, description="bars of the channel")
    fade_bars: int = Field(10, ge=1, le=1_000, description="bars over which a breakout fades")


class Breakout(Model[BreakoutParams]):
    kind = "breakout"
    params_model = BreakoutParams

    @property
    def warmup(self) -> int:
        return self.params.period + self.params.fade_bars

    def compute(self, history: History) -> tuple[float, float]:
        period, fade = self.params.period, self.params.fade_bars
        # Row j is the channel of bar period + j: the `period` bars before it.
        upper = sliding_window_view(history.high[:-1], period).max(axis=1)
        lower = sliding_window_view(history.low[:-1], period).min(axis=1)
        closes = history.close[period:]
        for age in range(fade):
            j = fade - 1 - age
            if closes[j] > upper[j]:
                direction, level = 1.0, float(upper[j])
            elif closes[j] < lower[j]:
                direction, level = -1.0, float(lower[j])
            else:
                continue
            if direction * (float(history.close[-1]) - level) <= 0:
                return 0.0, 1.0
            return direction * (1.0 - age / fade), self._volume_ratio(history.volume, period + j)
        return 0.0, 1.0

    def _volume_ratio(self, volume: np.ndarray, bar: int) -> float:
        mean = float(volume[bar - self.params.period:bar].mean())
        return min(1.0, float(volume[bar]) / mean) if mean > 0 else 1.0
