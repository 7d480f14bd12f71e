"""Security events from the audit log: lockouts and repeated failed logins.

The audit chain of the box's database is read, never written, every `audit_poll_s`, from
the sequence number after the last one seen (kept in the outbox with the alerts it caused,
so a restart neither misses nor repeats an event; the first start begins at the chain's
head, not with its history; records archived out of the database are skipped, and an event
older than its rule's window, or an hour, is not alerted on). A rule with `count` above 1 fires when that many matching
events fall within `within` for one value of a field of `by` (the same user, the same
address); further events of that burst count toward the alert already sent.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config import CoreSettings
from modules.notify.rules import Rule, human

if TYPE_CHECKING:
    from appliance.ledger import Ledger

log = logging.getLogger("circles.notify")
BATCH = 1000  # records read at once
MIN_FRESH = timedelta(hours=1)
MAX_GROUPS = 10_000  # users and addresses counted at once, per rule
WORDS = {"target": "user", "source": "address", "actor": "actor"}


@dataclass(frozen=True)
class Matched:
    rule: Rule
    subject: str
    context: dict[str, Any]


def _event(record: dict[str, Any]) -> dict[str, Any] | None:
    data = record["data"]
    if not isinstance(data, dict):
        return None
    details = data.get("details")
    if not isinstance(details, dict):
        details = {}
    return {**details, **{k: data.get(k) for k in ("action", "actor", "target", "outcome")},
            "seq": record["seq"], "ts": record["ts"]}


def _fresh(rule: Rule) -> float:
    return max(rule.within or MIN_FRESH, MIN_FRESH).total_seconds()


def _epoch(ts: str) -> float:
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return datetime.now(UTC).timestamp()


class AuditWatch:
    def __init__(self, settings: CoreSettings, rules: Sequence[Rule]) -> None:
        self.settings = settings
        self.rules = list(rules)
        self._ledger: Ledger | None = None
        self._absent_logged = False
        self._windows: dict[str, dict[tuple[str, str], deque[float]]] = {r.name: {} for r in rules}
        self._bursts: dict[str, dict[tuple[str, str], float]] = {r.name: {} for r in rules}

    def ledger(self) -> Ledger | None:
        """The box's ledger, read only: None while its database or signing key does not exist
        (the services that write the audit log make them; this one never does)."""
        if self._ledger is None:  # imported here: only where the audit log is watched
            from appliance.db import database_url, make_engine
            from appliance.ledger import Signer

            url = database_url(self.settings)
            key = self.settings.state_dir / "keys" / "ledger-ed25519.pem"
            path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
            if not key.is_file() or (path is not None and not Path(path).is_file()):
                if not self._absent_logged:
                    self._absent_logged = True
                    log.info("no audit log yet: lockouts and failed logins are watched once it exists")
                return None
            from appliance.ledger import Ledger

            # Not migrated: the services that write the database do that.
            self._ledger = Ledger(make_engine(url), Signer.load_or_create(self.settings.state_dir))
        return self._ledger

    def head(self) -> int | None:
        """The last seq of the audit chain; None while there is no audit log."""
        from appliance.security.audit import CHAIN

        ledger = self.ledger()
        return None if ledger is None else ledger.head(CHAIN)[0]

    def poll(self, after: int, now: datetime) -> tuple[list[Matched], int]:
        """The rules' matches among the events after `after`, and the last seq read. Records
        archived away are skipped; events older than a rule's window (at least an hour)
        before `now` are history (a backlog after a long stop), not news."""
        from appliance.security.audit import CHAIN

        ledger = self.ledger()
        if ledger is None:
            return [], after
        found: list[Matched] = []
        last = start = max(after, ledger.first_seq(CHAIN) - 1)
        while True:
            read = 0
            for record in ledger.records(CHAIN, since=last, through=last + BATCH):
                read += 1
                last = record["seq"]
                event = _event(record)
                if event is None:
                    continue
                for rule in self.rules:
                    if rule.holds(event) and _epoch(str(event["ts"])) >= now.timestamp() - _fresh(rule) \
                            and (match := self._count(rule, event)) is not None:
                        found.append(match)
            if read < BATCH:
                break
        if last == start and (head := ledger.head(CHAIN)[0]) < after:
            return [], head  # a new database (restored, or made again): follow its chain
        return found, last

    def _count(self, rule: Rule, event: dict[str, Any]) -> Matched | None:
        if rule.count == 1:
            subject = str(event.get("target") or event.get("source") or event.get("actor") or "")
            return Matched(rule, subject, event)
        assert rule.within is not None
        within = rule.within.total_seconds()
        at = _epoch(str(event["ts"]))
        windows, bursts = self._windows[rule.name], self._bursts[rule.name]
        groups = [(f, str(event[f])) for f in rule.by if event.get(f) not in (None, "")]
        for group in groups:
            times = windows.setdefault(group, deque())
            times.append(at)
            while times and times[0] <= at - within:
                times.popleft()
        for group in groups:  # a burst already reported: this event belongs to it
            if group in bursts and at - bursts[group] <= within:
                bursts[group] = at
                return self._match(rule, group, event)
        for group in groups:
            if len(windows[group]) >= rule.count:
                bursts[group] = at
                return self._match(rule, group, event)
        self._trim(windows, bursts, at - within)
        return None

    def _match(self, rule: Rule, group: tuple[str, str], event: dict[str, Any]) -> Matched:
        field, value = group
        assert rule.within is not None
        label = f"{WORDS.get(field, field)} {value}"
        return Matched(rule, f"{field}={value}", {
            **event, "group": label, "count": len(self._windows[rule.name][group]),
            "within": human(rule.within)})

    @staticmethod
    def _trim(windows: dict[tuple[str, str], deque[float]], bursts: dict[tuple[str, str], float],
              before: float) -> None:
        """Forget groups with nothing left in the window (and the oldest, past a bound)."""
        for group in [g for g, times in windows.items() if not times or times[-1] <= before]:
            del windows[group]
        for group in [g for g, at in bursts.items() if at <= before]:
            del bursts[group]
        while len(windows) > MAX_GROUPS:
            del windows[min(windows, key=lambda g: windows[g][-1])]

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.engine.dispose()
