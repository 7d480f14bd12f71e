"""Crontab expressions as APScheduler triggers, with crontab's own weekday numbers.

APScheduler 3's `CronTrigger.from_crontab` counts weekdays from 0 = Monday, so `1-5` would
mean Tuesday to Saturday. Here the weekday field is read as crontab reads it (0 and 7 =
Sunday, 1 = Monday, names `sun`…`sat`) and handed to the trigger as names, which mean the
same thing in both. The nicknames `@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly`,
`@yearly` and `@annually` are accepted too.
"""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo

from apscheduler.triggers.cron import CronTrigger

NICKNAMES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab's numbers 0..6


def _day(text: str) -> int:
    if text in WEEKDAYS:
        return WEEKDAYS.index(text)
    if text.isdigit() and int(text) <= 7:
        return int(text)
    raise ValueError(f"{text!r} is not a weekday (0-7 or sun-sat)")


def weekdays(field: str) -> str:
    """A crontab weekday field as a list of day names (`1-5` → `mon,tue,wed,thu,fri`)."""
    field = field.strip().lower()
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for part in field.split(","):
        body, slash, step_text = part.partition("/")
        if slash and not (step_text.isdigit() and int(step_text) > 0):
            raise ValueError(f"{part!r}: the step must be a whole number above 0")
        step = int(step_text) if slash else 1
        if body == "*":
            first, last = 0, 6
        elif "-" in body:
            start, _, end = body.partition("-")
            first, last = _day(start), _day(end)
        else:
            first = _day(body)
            last = 7 if slash else first  # `1/2`: from Monday on, every other day
        if first > last:
            raise ValueError(f"{part!r}: the range runs backwards")
        days.update(day % 7 for day in range(first, last + 1, step))
    return ",".join(WEEKDAYS[day] for day in sorted(days))


def trigger(expression: str, zone: tzinfo | None) -> CronTrigger:
    """The trigger of a five-field crontab expression in `zone` (None: the box's local zone).
    ValueError says what is wrong with the expression."""
    text = NICKNAMES.get(expression.strip().lower(), expression)
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"{expression!r} has {len(fields)} fields, a cron expression has 5 "
                         "(minute hour day-of-month month day-of-week)")
    minute, hour, day, month, weekday = fields
    try:
        return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                           day_of_week=weekdays(weekday), timezone=zone)
    except ValueError as exc:
        raise ValueError(f"{expression!r}: {exc}") from None


def next_time(cron: CronTrigger, now: datetime) -> datetime | None:
    """The first fire time strictly after `now` (an aware datetime)."""
    found: datetime | None = cron.get_next_fire_time(None, now + timedelta(microseconds=1))
    return found
