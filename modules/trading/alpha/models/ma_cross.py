"""`ma_cross`: a fast moving average above the slow one is a long signal, below a short one.

value = tanh(scale · (fast − slow) / slow), the spread normalised by the slow average.
confidence = the efficiency ratio of the last `slow` closes, |c₋₁ − c₋ₛₗₒ𝓌| / Σ|Δc| (1 on a
straight line, near 0 in a choppy market, where crossovers whipsaw; 0 when nothing moved).
The EMA variant is computed over the last 3 × `slow` closes, seeded with the first of them
(the seed then weighs about e⁻⁶ of the result), so it too depends on a fixed window only.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from modules.trading.alpha.models.base import History, Model, Params

EMA_SPAN = 3  # EMA windows are this many slow periods long


class MaCrossParams(Params):
    fast: int = Field(10, ge=1, le=10_000, description="bars of the fast average")
    slow: int = Field(30, ge=2, le=10_000, validate_default=True, description="bars of the slow average")
    average: Literal["sma", "ema"] = "sma"
    scale: float = Field(100.0, gt=0, allow_inf_nan=False,
                         description="k in tanh(k · (fast − slow) / slow)")

    @field_validator("slow")
    @classmethod
    def _slower_than_fast(cls, slow: int, info: ValidationInfo) -> int:
        fast = info.data.get("fast")
        if fast is not None and slow <= fast:
            raise ValueError(f"must be longer than fast ({fast})")
        return slow


def ema(values: np.ndarray, period: int) -> float:
    """The exponential moving average (α = 2 / (period + 1)) at the last of `values`,
    seeded with the first of them."""
    alpha = 2.0 / (period + 1)
    n = len(values)
    weights = alpha * (1.0 - alpha) ** np.arange(n - 1, -1, -1, dtype=np.float64)
    weights[0] = (1.0 - alpha) ** (n - 1)
    return float(np.dot(weights, values))


def efficiency_ratio(closes: np.ndarray) -> float:
    """|net move| / path length of `closes`, in [0, 1]; 0 when nothing moved."""
    path = float(np.abs(np.diff(closes)).sum())
    return abs(float(closes[-1] - closes[0])) / path if path > 0 else 0.0


class MaCross(Model[MaCrossParams]):
    kind = "ma_cross"
    params_model = MaCrossParams

    @property
    def warmup(self) -> int:
        p = self.params
        return p.slow * EMA_SPAN if p.average == "ema" else p.slow

    def compute(self, history: History) -> tuple[float, float]:
        p = self.params
        close = history.close
        if p.average == "ema":
            fast, slow = ema(close, p.fast), ema(close, p.slow)
        else:
            fast, slow = float(close[-p.fast:].mean()), float(close[-p.slow:].mean())
        return math.tanh(p.scale * (fast - slow) / slow), efficiency_ratio(close[-p.slow:])
