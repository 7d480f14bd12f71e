"""`rsi_reversion`: buy what is oversold, sell what is overbought.

RSI is Cutler's (simple averages of the gains and losses of the last `period` closes; unlike
Wilder's smoothing it depends on those `period + 1` closes only):
RSI = 100 − 100 / (1 + mean gain / mean loss), 100 with no loss, 50 when nothing moved.
value = (oversold − RSI) / oversold below `oversold` (0 … 1), −(RSI − overbought) /
(100 − overbought) above `overbought` (−1 … 0), 0 between; confidence 1.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from modules.trading.alpha.models.base import History, Model, Params


class RsiReversionParams(Params):
    period: int = Field(14, ge=2, le=10_000, description="closes to price changes over")
    oversold: float = Field(30.0, gt=0, lt=100, description="RSI below this is a long signal")
    overbought: float = Field(70.0, gt=0, lt=100, validate_default=True,
                              description="RSI above this is a short signal")

    @field_validator("overbought")
    @classmethod
    def _above_oversold(cls, overbought: float, info: ValidationInfo) -> float:
        oversold = info.data.get("oversold")
        if oversold is not None and overbought <= oversold:
            raise ValueError(f"must be above oversold ({oversold})")
        return overbought


def rsi(closes: np.ndarray) -> float:
    """Cutler's RSI of `closes` (all of them), 0 … 100."""
    changes = np.diff(closes)
    gain = float(changes[changes > 0].sum())
    loss = float(-changes[changes < 0].sum())
    if loss == 0:
        return 50.0 if gain == 0 else 100.0
    return 100.0 - 100.0 / (1.0 + gain / loss)


class RsiReversion(Model[RsiReversionParams]):
    kind = "rsi_reversion"
    params_model = RsiReversionParams

    @property
    def warmup(self) -> int:
        return self.params.period + 1

    def compute(self, history: History) -> tuple[float, float]:
        p = self.params
        value = rsi(history.close)
        if value < p.oversold:
            return (p.oversold - value) / p.oversold, 1.0
        if value > p.overbought:
            return -(value - p.overbought) / (100.0 - p.overbought), 1.0
        return 0.0, 1.0
