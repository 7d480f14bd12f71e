"""The base of every alpha model: a name, validated parameters, a warm-up, and one signal per
bar computed from the feed's last `warmup` bars only.

A model sees nothing but those bars, so its signal is the same however much history the
service holds (a live process warmed up from the market service, a backtest started cold):
the signal is a function of the input stream, never of the wall clock.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from appliance.bus.trading import ModelSignal


class Params(BaseModel):
    """Base of a model's parameters: unknown keys are errors, as in every settings section."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class History:
    """One feed's bars, oldest first: read-only float64 columns of equal length."""

    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    def __len__(self) -> int:
        return len(self.close)

    def tail(self, n: int) -> History:
        """The last `n` bars (all of them when there are fewer); `n` ≥ 1."""
        return History(self.open[-n:], self.high[-n:], self.low[-n:], self.close[-n:],
                       self.volume[-n:])

    @classmethod
    def of(cls, open: Any, high: Any, low: Any, close: Any, volume: Any) -> History:
        """A history from five sequences (tests and tools build one from lists)."""
        columns = [np.asarray(c, dtype=np.float64) for c in (open, high, low, close, volume)]
        if len({len(c) for c in columns}) != 1:
            raise ValueError("the five columns must have the same length")
        for column in columns:
            column.flags.writeable = False
        return cls(*columns)


P = TypeVar("P", bound=Params)


class Model(ABC, Generic[P]):
    """One alpha model. A subclass sets `kind` and `params_model`, says how many bars it
    needs (`warmup`) and computes `(value, confidence)` from exactly that many bars."""

    kind: ClassVar[str]
    params_model: ClassVar[type[Params]]

    def __init__(self, name: str, params: P) -> None:
        self.name = name
        self.params = params

    @classmethod
    def build(cls, name: str, params: dict[str, Any]) -> Model[Any]:
        """The model named `name` with `params` validated (pydantic ValidationError if bad)."""
        # params_model is the subclass's P, which a ClassVar cannot say.
        return cls(name, cls.params_model.model_validate(params))  # type: ignore[arg-type]

    @property
    @abstractmethod
    def warmup(self) -> int:
        """The number of bars the signal is computed from (≥ 1)."""

    @abstractmethod
    def compute(self, history: History) -> tuple[float, float]:
        """(value, confidence) from exactly `warmup` bars; out-of-range values are clipped."""

    def signal(self, history: History) -> ModelSignal:
        """The signal after the last bar of `history`: value in [-1, 1], confidence in [0, 1];
        value 0 and confidence 0 while there are fewer than `warmup` bars, or when the
        arithmetic gives no finite number."""
        if len(history) < self.warmup:
            return self.neutral()
        value, confidence = self.compute(history.tail(self.warmup))
        if not (math.isfinite(value) and math.isfinite(confidence)):
            return self.neutral()
        return ModelSignal(model=self.name, value=_clip(float(value), -1.0, 1.0) + 0.0,
                           confidence=_clip(float(confidence), 0.0, 1.0))

    def neutral(self) -> ModelSignal:
        return ModelSignal(model=self.name, value=0.0, confidence=0.0)


def _clip(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))
