"""The bars the alpha service keeps per feed: a bounded window, oldest first, appended in O(1)
(amortised) and read as numpy columns without copying."""

from __future__ import annotations

from datetime import datetime

import numpy as np

from appliance.bus.trading import Bar
from modules.trading.alpha.models import History


class FeedHistory:
    """The last `capacity` bars of one feed."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # Twice the window: when the end is reached the window is moved to the front once,
        # so an append costs O(1) on average and a read is a slice.
        self._data = np.empty((5, 2 * capacity), dtype=np.float64)
        self._start = self._end = 0
        self.last_ts: datetime | None = None

    def __len__(self) -> int:
        return self._end - self._start

    def append(self, bar: Bar) -> None:
        """Add `bar` as the newest; the caller keeps the bars in time order."""
        if self._end == self._data.shape[1]:
            keep = self.capacity - 1
            self._data[:, :keep] = self._data[:, self._end - keep:self._end]
            self._start, self._end = 0, keep
        self._data[:, self._end] = (bar.open, bar.high, bar.low, bar.close, bar.volume)
        self._end += 1
        if self._end - self._start > self.capacity:
            self._start += 1
        self.last_ts = bar.ts

    def view(self) -> History:
        """The kept bars as read-only columns (valid until the next append)."""
        window = self._data[:, self._start:self._end]
        columns = []
        for row in window:
            row.flags.writeable = False
            columns.append(row)
        return History(*columns)
