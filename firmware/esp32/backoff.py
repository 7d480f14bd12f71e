"""When to try again after a failure: the wait doubles up to a ceiling and starts over
after a success, so a box that is down for hours is not hammered, and one back after a
second is found quickly."""

import time


class Backoff:
    def __init__(self, first_ms, max_ms):
        self.first_ms = first_ms
        self.max_ms = max_ms
        self.wait_ms = first_ms
        self.next_at = time.ticks_ms()

    def due(self):
        return time.ticks_diff(time.ticks_ms(), self.next_at) >= 0

    def ms_left(self):
        return max(0, time.ticks_diff(self.next_at, time.ticks_ms()))

    def failed(self):
        """Schedule the next attempt; returns the wait in ms."""
        wait = self.wait_ms
        self.next_at = time.ticks_add(time.ticks_ms(), wait)
        self.wait_ms = min(self.wait_ms * 2, self.max_ms)
        return wait

    def reset(self):
        self.wait_ms = self.first_ms
        self.next_at = time.ticks_ms()
