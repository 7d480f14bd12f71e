"""Which snapshots a retention policy keeps: restic's `forget --keep-*` rules, as restic's
ApplyPolicy applies them.

Going from the newest snapshot back, each rule with a count N > 0 keeps a snapshot when its
period (hour, day, ISO week, month, year; for `last`, every snapshot is its own) differs from
that of the last snapshot the rule kept, until it kept N: periods without a snapshot do not
count. When a rule still has counts left at the oldest snapshot, the oldest is kept too
(so a short history is kept whole at its far end). A snapshot kept by any rule stays.
Periods are read in the given time zone (default: the box's), so "daily" follows the
owner's days, not UTC's.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the settings model pulls in pydantic, which the engine does not need
    from modules.backup.settings import Keep

_RULES: dict[str, Callable[[datetime, int], Hashable]] = {
    "last": lambda t, nr: nr,
    "hourly": lambda t, nr: (t.year, t.month, t.day, t.hour),
    "daily": lambda t, nr: (t.year, t.month, t.day),
    "weekly": lambda t, nr: t.isocalendar()[:2],  # ISO weeks: Monday to Sunday, as restic
    "monthly": lambda t, nr: (t.year, t.month),
    "yearly": lambda t, nr: t.year,
}


def keep(times: Sequence[tuple[str, datetime]], keep: Keep, *, now: datetime | None = None,
         zone: tzinfo | None = None) -> set[str]:
    """The ids among `times` (id, aware creation time) that `keep` keeps; all of them when
    it keeps nothing at all (as restic does with an empty policy).

    A snapshot dated after `now` (the clock went back since it was made) is kept and does
    not count for any rule, so a wrong clock never makes the newest backups look old."""
    future = {sid for sid, t in times if now is not None and t > now}
    newest_first = sorted(((t.astimezone(zone), sid) for sid, t in times if sid not in future),
                          key=lambda item: item[0], reverse=True)
    counts = {name: getattr(keep, name) for name in _RULES}
    if not any(counts.values()):
        return {sid for sid, _ in times}
    kept = set(future)
    last: dict[str, Hashable] = {}
    for nr, (t, sid) in enumerate(newest_first):
        oldest = nr == len(newest_first) - 1
        for name, period_of in _RULES.items():
            if counts[name] <= 0:
                continue
            period = period_of(t, nr)
            if name not in last or period != last[name] or oldest:
                kept.add(sid)
                last[name] = period
                counts[name] -= 1
    return kept
