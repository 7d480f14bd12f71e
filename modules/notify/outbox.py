"""The durable outbox: `<state_dir>/notify/outbox.db`, SQLite in WAL mode, synchronous FULL.

An alert is written, with one delivery row per channel it goes to, before anything is sent
(and before the bus message that caused it is acknowledged); a delivery row is deleted
only after its channel accepted the message. So a network that is down, a kill -9 or a
power cut loses nothing: what is left in `deliveries` is sent after the restart. The
alerts' dedupe state (alerts.Track) is saved in the same transaction as the messages it
caused, so a restart neither forgets an alert nor sends it twice. The last alerts stay for
the panel; older ones are trimmed once delivered. Blocking: the service calls it in a thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import OperationalError
from appliance.files import private_dir
from modules.notify.alerts import Draft, Track
from modules.notify.channels.base import Kind, Severity

VERSION = 1
KEEP = 200  # delivered alerts kept for the panel and `circles notify recent`
SENT_WINDOW_S = 3600.0  # the rate limits count sends over the last hour
_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, key TEXT NOT NULL,
    rule TEXT NOT NULL, subject TEXT NOT NULL, severity TEXT NOT NULL, kind TEXT NOT NULL,
    title TEXT NOT NULL, body TEXT NOT NULL, request_id TEXT);
CREATE TABLE IF NOT EXISTS deliveries (
    alert_id INTEGER NOT NULL REFERENCES alerts (id), channel TEXT NOT NULL, due REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT, PRIMARY KEY (alert_id, channel));
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (due);
CREATE TABLE IF NOT EXISTS tracks (key TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sent (channel TEXT NOT NULL, at REAL NOT NULL);
"""
_ALERT_COLUMNS = "a.id, a.at, a.key, a.rule, a.subject, a.severity, a.kind, a.title, a.body, a.request_id"


@dataclass(frozen=True)
class Queued:
    """An alert waiting for one channel."""

    id: int
    at: float
    key: str
    rule: str
    subject: str
    severity: Severity
    kind: Kind
    title: str
    body: str
    request_id: str | None
    channel: str
    due: float
    attempts: int


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        private_dir(self.path.parent)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > VERSION:
            db.close()
            raise OperationalError(f"{self.path}: made by a newer release (schema {version})")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={VERSION}")
        self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._db
            if db is None:
                raise OperationalError("the outbox is not open")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # a failed COMMIT (disk full, I/O) leaves it open
                    db.execute("ROLLBACK")
                raise

    # -- writing ----------------------------------------------------------------------------
    def save(self, queued: Sequence[tuple[Draft, Sequence[tuple[str, float]]]],
             changed: Sequence[tuple[str, str]], removed: Sequence[str],
             meta: dict[str, str] | None = None) -> list[int]:
        """In one transaction: each draft with its deliveries (channel, due), the tracks
        changed and removed, and `meta`; the new alerts' ids."""
        ids = []
        with self._tx() as db:
            for draft, deliveries in queued:
                if draft.kind == "summary":
                    # A newer summary replaces one still waiting, and is not queued behind
                    # its own alert still waiting (quiet hours, a channel down).
                    db.execute("DELETE FROM deliveries WHERE alert_id IN (SELECT id FROM alerts "
                               "WHERE key = ? AND kind = 'summary')", (draft.key,))
                    waiting = {channel for (channel,) in db.execute(
                        "SELECT d.channel FROM deliveries d JOIN alerts a ON a.id = d.alert_id "
                        "WHERE a.key = ?", (draft.key,))}
                    deliveries = [(c, due) for c, due in deliveries if c not in waiting]
                cursor = db.execute(
                    "INSERT INTO alerts (at, key, rule, subject, severity, kind, title, body, "
                    "request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (draft.at.timestamp(), draft.key, draft.rule, draft.subject, draft.severity,
                     draft.kind, draft.title, draft.body, draft.request_id))
                alert_id = int(cursor.lastrowid or 0)
                ids.append(alert_id)
                db.executemany("INSERT INTO deliveries (alert_id, channel, due) VALUES (?, ?, ?)",
                               [(alert_id, channel, due) for channel, due in deliveries])
            db.executemany("INSERT OR REPLACE INTO tracks (key, data) VALUES (?, ?)", changed)
            db.executemany("DELETE FROM tracks WHERE key = ?", [(key,) for key in removed])
            db.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                           list((meta or {}).items()))
            if queued:
                db.execute("DELETE FROM alerts WHERE id NOT IN (SELECT alert_id FROM deliveries) "
                           "AND id <= (SELECT max(id) FROM alerts) - ?", (KEEP,))
        return ids

    def delivered(self, channel: str, ids: Sequence[int], at: float) -> None:
        """The channel accepted these alerts (one message: a digest counts once)."""
        with self._tx() as db:
            db.executemany("DELETE FROM deliveries WHERE alert_id = ? AND channel = ?",
                           [(i, channel) for i in ids])
            db.execute("INSERT INTO sent (channel, at) VALUES (?, ?)", (channel, at))
            db.execute("DELETE FROM sent WHERE at < ?", (at - SENT_WINDOW_S,))

    def failed(self, channel: str, ids: Sequence[int], error: str, due: float) -> None:
        with self._tx() as db:
            db.executemany("UPDATE deliveries SET attempts = attempts + 1, error = ?, due = ? "
                           "WHERE alert_id = ? AND channel = ?",
                           [(error, due, i, channel) for i in ids])

    def drop(self, rows: Sequence[Queued]) -> None:
        """Give these deliveries up (too old, or their channel is no longer configured)."""
        with self._tx() as db:
            db.executemany("DELETE FROM deliveries WHERE alert_id = ? AND channel = ?",
                           [(row.id, row.channel) for row in rows])

    # -- reading ----------------------------------------------------------------------------
    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._tx() as db:
            return db.execute(sql, args).fetchall()

    def due(self, now: float) -> list[Queued]:
        """Deliveries due at `now`, oldest alert first."""
        rows = self._read(f"SELECT {_ALERT_COLUMNS}, d.channel, d.due, d.attempts FROM deliveries d "
                          "JOIN alerts a ON a.id = d.alert_id WHERE d.due <= ? ORDER BY a.id", (now,))
        return [Queued(*row) for row in rows]

    def sent_count(self, channel: str, since: float) -> int:
        return int(self._read("SELECT count(*) FROM sent WHERE channel = ? AND at > ?",
                              (channel, since))[0][0])

    def queued(self) -> int:
        return int(self._read("SELECT count(*) FROM deliveries")[0][0])

    def tracks(self) -> list[Track]:
        return [Track.loads(data) for (data,) in self._read("SELECT data FROM tracks")]

    def meta(self, name: str) -> str | None:
        found = self._read("SELECT value FROM meta WHERE name = ?", (name,))
        return str(found[0][0]) if found else None

    def recent(self, limit: int) -> list[tuple[dict[str, Any], list[str]]]:
        """The last `limit` alerts, newest first, each with the channels it still waits for."""
        rows = self._read(f"SELECT {_ALERT_COLUMNS}, (SELECT group_concat(channel, ' ') FROM "
                          "deliveries d WHERE d.alert_id = a.id) FROM alerts a "
                          "ORDER BY a.id DESC LIMIT ?", (limit,))
        names = ("id", "at", "key", "rule", "subject", "severity", "kind", "title", "body",
                 "request_id")
        return [(dict(zip(names, row[:-1], strict=True)), sorted((row[-1] or "").split()))
                for row in rows]
