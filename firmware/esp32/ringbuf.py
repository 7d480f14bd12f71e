"""Readings waiting for the broker, oldest first, in a fixed amount of memory: when full,
the oldest reading gives way to the newest."""


class RingBuffer:
    def __init__(self, size):
        if size < 1:
            raise ValueError("a ring buffer holds at least one item")
        self.items = [None] * size
        self.start = 0
        self.count = 0
        self.dropped = 0  # readings lost to a full buffer, for the log

    def __len__(self):
        return self.count

    def push(self, item):
        """Keep `item`; returns False when the oldest one was dropped to make room."""
        size = len(self.items)
        if self.count == size:
            self.items[self.start] = item
            self.start = (self.start + 1) % size
            self.dropped += 1
            return False
        self.items[(self.start + self.count) % size] = item
        self.count += 1
        return True

    def pop(self):
        if not self.count:
            raise IndexError("empty ring buffer")
        item = self.items[self.start]
        self.items[self.start] = None
        self.start = (self.start + 1) % len(self.items)
        self.count -= 1
        return item
