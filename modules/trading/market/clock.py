"""What "now" is for the market service: the wall clock, or a clock a test moves by hand."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from appliance.bus.trading import TIMEFRAMES


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep_until(self, when: float) -> None:
        """Return once `now() >= when`."""
        ...


class WallClock:
    def now(self) -> float:
        return time.time()

    async def sleep_until(self, when: float) -> None:
        # In steps, so a wall-clock jump (NTP, a resumed laptop) is noticed within a minute.
        while (left := when - time.time()) > 0:
            await asyncio.sleep(min(left, 60.0))


def bar_open(ts: float, timeframe: str) -> int:
    """The open time (s) of the bar of `timeframe` that contains `ts`."""
    step = TIMEFRAMES[timeframe]
    return int(ts // step * step)
