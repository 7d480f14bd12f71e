"""Alpha models, one file each behind `base.Model`, found by `kind` in `REGISTRY`.

Adding a model: one file with a `Model` subclass, and its class in the tuple below.
"""

from __future__ import annotations

from typing import Any

from modules.trading.alpha.models.base import History, Model, Params
from modules.trading.alpha.models.breakout import Breakout
from modules.trading.alpha.models.ma_cross import MaCross
from modules.trading.alpha.models.rsi_reversion import RsiReversion

REGISTRY: dict[str, type[Model[Any]]] = {cls.kind: cls for cls in (
    MaCross,
    RsiReversion,
    Breakout,
)}

__all__ = ["REGISTRY", "Breakout", "History", "MaCross", "Model", "Params", "RsiReversion"]
