"""Each home entity's history in SQLite, for the panel's charts.

Readings are kept at full resolution for `full_s` (24 h by default); older ones are folded
into 5-minute means (with min, max and count) kept for `keep_s` (a year), and pruned after.
Folding merges into a bucket that already exists, so a reading that arrives late (an ESP32
node's buffer) is counted, and a reading seen twice (the same entity and time) is stored once.
Blocking: the service calls it in a thread; one lock serialises its single connection.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError

BUCKET_S = 300
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    entity TEXT NOT NULL, ts REAL NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (entity, ts)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS means (
    entity TEXT NOT NULL, bucket REAL NOT NULL, mean REAL NOT NULL, low REAL NOT NULL,
    high REAL NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (entity, bucket)) WITHOUT ROWID;
"""
# Means over `:step` seconds of both tables together, weighted by how many readings each holds.
_QUERY = """
SELECT CAST(t / :step AS INTEGER) * :step AS slot, SUM(total) / SUM(n), MIN(low), MAX(high),
       SUM(n)
FROM (SELECT ts AS t, value AS total, 1 AS n, value AS low, value AS high FROM samples
      WHERE entity = :entity AND ts >= :since AND ts < :until
      UNION ALL
      SELECT bucket, mean * count, count, low, high FROM means
      WHERE entity = :entity AND bucket >= :since AND bucket < :until)
GROUP BY slot ORDER BY slot
"""
_FOLD = """
INSERT INTO means (entity, bucket, mean, low, high, count)
SELECT entity, CAST(ts / :b AS INTEGER) * :b, AVG(value), MIN(value), MAX(value), COUNT(*)
FROM samples WHERE ts < :cutoff GROUP BY entity, CAST(ts / :b AS INTEGER)
ON CONFLICT (entity, bucket) DO UPDATE SET
    mean = (mean * count + excluded.mean * excluded.count) / (count + excluded.count),
    low = MIN(low, excluded.low), high = MAX(high, excluded.high),
    count = count + excluded.count
"""


def numeric(value: Any) -> float | None:
    """A reading as a number for the history: numbers as they are, ON/OFF as 1/0."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        word = value.strip().upper()
        if word in ("ON", "OPEN", "TRUE"):
            return 1.0
        if word in ("OFF", "CLOSED", "FALSE"):
            return 0.0
    return None


class History:
    def __init__(self, path: Path, *, full_s: float = 86400, keep_s: float = 365 * 86400) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.full_s = full_s
        self.keep_s = keep_s
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # a chart may lose its last second
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(f"{path}: history schema {version} is newer than this version's "
                              f"({SCHEMA_VERSION}); run the newer version or move the file")
        self.db.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")

    def add(self, rows: list[tuple[str, float, float]]) -> int:
        """Store (entity, ts, value) readings; returns how many were new."""
        with self.lock:
            before = self.db.total_changes
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO samples VALUES (?, ?, ?)", rows)
            self.db.execute("COMMIT")
            return self.db.total_changes - before

    def maintain(self, now: float) -> tuple[int, int]:
        """Fold readings older than the full-resolution window into 5-minute means, drop
        means older than the retention; returns (readings folded, means pruned)."""
        cutoff = math.floor((now - self.full_s) / BUCKET_S) * BUCKET_S
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(_FOLD, {"b": BUCKET_S, "cutoff": cutoff})
                folded = self.db.execute("DELETE FROM samples WHERE ts < ?", (cutoff,)).rowcount
                pruned = self.db.execute("DELETE FROM means WHERE bucket < ?",
                                         (now - self.keep_s,)).rowcount
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return folded, pruned

    def query(self, entity: str, since: float, until: float, max_points: int = 500, *,
              now: float | None = None) -> tuple[float, list[tuple[float, float, float, float, int]]]:
        """(step, points): means over `step` seconds (at least 1 s; at least 5 minutes when
        the range reaches back to where only means are kept), each (start, mean, min, max,
        readings), oldest first."""
        step = max(1.0, (until - since) / max_points)
        if since < (time.time() if now is None else now) - self.full_s:
            step = max(step, float(BUCKET_S))
        with self.lock:
            rows = self.db.execute(_QUERY, {"step": step, "entity": entity, "since": since,
                                            "until": until}).fetchall()
        return step, [tuple(r) for r in rows]

    def close(self) -> None:
        with self.lock:
            self.db.close()
