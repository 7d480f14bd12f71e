"""Dedupe and summaries: what turns conditions and events into messages.

An alert has a key, its rule and subject (`service_offline:market`). A condition that starts
to hold opens a track; the alert goes out at once, or when it has held for the rule's
`for`. While it keeps holding nothing more is sent but a summary every `summary_every`
("Still halted, 3 h"); when it ends, the rule's `resolved` text (if any). An event (from the
audit log) opens a track too: the same event again only counts, and the summary says how
many more there were; a track that saw no more events for `summary_every` closes quietly.

Tracks are what must survive a restart (so an alert is not sent again): the service saves
the changed ones with the messages they caused, in one transaction (`changes()`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from appliance.bus import new_request_id
from modules.notify.channels.base import Kind, Severity
from modules.notify.rules import AUDIT, Rule, human, render


@dataclass
class Track:
    key: str
    rule: str
    subject: str
    since: float  # when the condition began to hold, or the first event (epoch s)
    fired_at: float | None = None  # when the alert went out; None: still within `for`
    last_at: float | None = None  # the last message (alert or summary)
    repeats: int = 0  # events since the last message
    request_id: str | None = None  # of the message that opened it
    context: dict[str, Any] = field(default_factory=dict)
    confirmed: bool = True  # False: loaded at start, not seen on the bus since

    def dumps(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "confirmed"}, default=str)

    @classmethod
    def loads(cls, text: str) -> Track:
        return cls(**json.loads(text), confirmed=False)


@dataclass(frozen=True)
class Draft:
    """A message to queue."""

    key: str
    rule: str
    subject: str
    severity: Severity
    kind: Kind
    title: str
    body: str
    request_id: str | None
    at: datetime


def key_of(rule: Rule, subject: str) -> str:
    return f"{rule.name}:{subject}" if subject else rule.name


class Alerts:
    def __init__(self, rules: Iterable[Rule], summary_every: timedelta, box: str) -> None:
        self.rules = {rule.name: rule for rule in rules}
        self.summary_every = summary_every
        self.box = box
        self.tracks: dict[str, Track] = {}
        self._changed: set[str] = set()
        self._removed: set[str] = set()

    def load(self, tracks: Iterable[Track]) -> None:
        """The tracks saved before a restart; those of rules no longer in force are dropped."""
        for track in tracks:
            if track.rule in self.rules:
                self.tracks[track.key] = track
            else:
                self._remove(track.key)

    def reset(self, tracks: Iterable[Track]) -> None:
        """Back to the saved tracks (a save failed: what changed in memory since is undone)."""
        unconfirmed = {key for key, track in self.tracks.items() if not track.confirmed}
        self.tracks = {}
        self._changed.clear()
        self._removed.clear()
        self.load(tracks)
        self._removed.clear()
        for key, track in self.tracks.items():
            track.confirmed = key not in unconfirmed

    # -- what happens -----------------------------------------------------------------------
    def holds(self, rule: Rule, subject: str, context: dict[str, Any], now: datetime,
              request_id: str | None) -> list[Draft]:
        """The rule's condition holds for `subject` (it may have held before)."""
        key = key_of(rule, subject)
        track = self.tracks.get(key)
        if track is None:
            # A sender without request ids (a last will, a device, an EA): the alert gets its own.
            track = self.tracks[key] = Track(key, rule.name, subject, now.timestamp(),
                                             request_id=request_id or new_request_id(), context=context)
            self._changed.add(key)
        else:
            track.context, track.confirmed = context, True
        if track.fired_at is None and rule.for_ is None:
            return [self._fire(track, rule, now)]
        return []

    def ends(self, rule: Rule, subject: str, context: dict[str, Any], now: datetime,
             request_id: str | None) -> list[Draft]:
        """The rule's condition no longer holds for `subject`: resolved, if it had fired."""
        track = self.tracks.get(key_of(rule, subject))
        if track is None:
            return []
        self._remove(track.key)
        if track.fired_at is None or rule.resolved is None:
            return []
        return [self._draft(track, rule, "resolved", now, context, request_id)]

    def gone(self, rule: Rule, subject: str) -> None:
        """What the rule watched is gone (its retained message was deleted): forget quietly."""
        if key_of(rule, subject) in self.tracks:
            self._remove(key_of(rule, subject))

    def event(self, rule: Rule, subject: str, context: dict[str, Any], now: datetime,
              request_id: str | None) -> list[Draft]:
        """One more matching event: an alert if none is open for its key, else counted."""
        key = key_of(rule, subject)
        track = self.tracks.get(key)
        if track is not None:
            track.repeats += 1
            track.context = context
            self._changed.add(key)
            return []
        track = self.tracks[key] = Track(key, rule.name, subject, now.timestamp(),
                                         request_id=request_id or new_request_id(), context=context)
        return [self._fire(track, rule, now)]

    def due(self, now: datetime) -> list[Draft]:
        """Alerts whose `for` is up, and the summaries due."""
        drafts = []
        stamp = now.timestamp()
        for track in list(self.tracks.values()):
            rule = self.rules[track.rule]
            if track.fired_at is None:
                if rule.for_ is not None and stamp - track.since >= rule.for_.total_seconds():
                    drafts.append(self._fire(track, rule, now))
                continue
            every = (rule.summary_every or self.summary_every).total_seconds()
            if stamp - (track.last_at or track.fired_at) < every:
                continue
            if rule.topic == AUDIT and not track.repeats:
                self._remove(track.key)  # quiet for a whole period: over
                continue
            drafts.append(self._draft(track, rule, "summary", now))
            track.last_at, track.repeats = stamp, 0
            self._changed.add(track.key)
        return drafts

    def forget_unconfirmed(self) -> list[str]:
        """Drop the tracks loaded at start that no message confirmed (what they watched was
        deleted while the service was down); audit tracks need no confirmation."""
        stale = [key for key, track in self.tracks.items()
                 if not track.confirmed and self.rules[track.rule].topic != AUDIT]
        for key in stale:
            self._remove(key)
        for track in self.tracks.values():
            track.confirmed = True
        return stale

    def active(self) -> int:
        return sum(track.fired_at is not None for track in self.tracks.values())

    def changes(self) -> tuple[list[tuple[str, str]], list[str]]:
        """(key, saved form) of the tracks changed, and the keys removed, since the last call."""
        changed = [(key, self.tracks[key].dumps()) for key in sorted(self._changed)
                   if key in self.tracks]
        removed = sorted(self._removed - set(self.tracks))
        self._changed.clear()
        self._removed.clear()
        return changed, removed

    # -- messages ---------------------------------------------------------------------------
    def _fire(self, track: Track, rule: Rule, now: datetime) -> Draft:
        track.fired_at = track.last_at = now.timestamp()
        track.repeats = 0
        self._changed.add(track.key)
        return self._draft(track, rule, "alert", now)

    def _remove(self, key: str) -> None:
        self.tracks.pop(key, None)
        self._changed.discard(key)
        self._removed.add(key)

    def _draft(self, track: Track, rule: Rule, kind: Kind, now: datetime,
               context: dict[str, Any] | None = None, request_id: str | None = None) -> Draft:
        since = datetime.fromtimestamp(track.since, UTC)
        values = {**(context if context is not None else track.context),
                  "rule": rule.name, "subject": track.subject, "severity": rule.severity,
                  "duration": human(now - since), "since": since.isoformat(timespec="seconds"),
                  "repeats": track.repeats, "box": self.box}
        title = " ".join(render(rule.title, values).split())  # one line: a mail subject
        values["title"] = title
        template = {"alert": rule.message, "summary": rule.summary}.get(kind, rule.resolved)
        assert template is not None
        return Draft(track.key, rule.name, track.subject, rule.severity, kind,
                     f"Resolved: {title}" if kind == "resolved" else title,
                     render(template, values), request_id or track.request_id, now)
