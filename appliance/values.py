"""Values a person writes in circles.toml and compares with what the bus carries: loose
comparisons of numbers and texts, the tests of a condition, durations (`5m`), daily time
windows (`22:00-07:00`) and time zones. Shared by the services whose settings hold
conditions (automation, notify)."""

from __future__ import annotations

import json
import math
import os
import re
from datetime import UTC, time, timedelta, tzinfo
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BeforeValidator

_DURATION = re.compile(r"^(?:(\d+)\s*d)?\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m)?\s*(?:(\d+)\s*s)?$")
_WINDOW = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")


def number(value: Any) -> float | None:
    """`value` as a finite number (a JSON number or a numeric string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        found = float(value)
    elif isinstance(value, str):
        try:
            found = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return found if math.isfinite(found) else None


def same(actual: Any, expected: Any) -> bool:
    """Numbers compare as numbers (`21` is `21.0` is `"21"`), anything else as its text
    (`"ON"`; `true` is `"true"`)."""
    a, e = number(actual), number(expected)
    if a is not None and e is not None:
        return a == e

    def text(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    return text(actual) == text(expected)


def parse_duration(value: Any) -> Any:
    """`90s`, `5m`, `1h30m`, `2d`, or a number of seconds, as a timedelta (for a pydantic
    `BeforeValidator`: anything else is passed on for pydantic to judge)."""
    if isinstance(value, bool):
        raise ValueError("a duration is like '90s', '5m' or '1h30m'")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if isinstance(value, str) and not value.strip().upper().startswith("P"):  # ISO 8601: pydantic's
        found = _DURATION.match(value.strip().lower())
        if not value.strip() or found is None:
            raise ValueError(f"{value!r} is not a duration like '90s', '5m' or '1h30m'")
        days, hours, minutes, seconds = (int(part or 0) for part in found.groups())
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    return value


def parse_window(text: str) -> tuple[time, time]:
    """`"18:00-07:00"` as (start, end); the window may cross midnight; `24:00` ends at midnight."""
    found = _WINDOW.match(text.strip())
    if found is None:
        raise ValueError(f"{text!r} is not a time window like '18:00-07:00'")
    h1, m1, h2, m2 = (int(part) for part in found.groups())
    if (h2, m2) == (24, 0):
        h2 = 0
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"{text!r}: hours are 00-23 (24:00 only as the end), minutes 00-59")
    start, end = time(h1, m1), time(h2, m2)
    if start == end:
        raise ValueError(f"{text!r} starts where it ends")
    return start, end


def in_window(moment: time, window: tuple[time, time]) -> bool:
    """Whether a local time of day is inside a window (start included, end excluded)."""
    start, end = window
    return start <= moment < end if start < end else moment >= start or moment < end


def check_zone(value: str) -> str:
    """`value` if it names an IANA time zone, else ValueError with an example."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (e.g. 'Europe/Berlin')") from None
    return value


def local_zone() -> tzinfo:
    """The box's own time zone without a third-party library: `TZ` when it names an IANA
    zone, else `/etc/timezone` (Debian), else the zone `/etc/localtime` links to, else UTC."""
    candidates = [os.environ.get("TZ", "").removeprefix(":")]
    try:
        candidates.append(Path("/etc/timezone").read_text().strip())
    except OSError:
        pass
    try:
        target = str(Path("/etc/localtime").resolve())
        candidates.append(target.partition("/zoneinfo/")[2])
    except OSError:
        pass
    for name in candidates:
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return UTC


# -- durations with a bound, and the comparisons of a condition ---------------------------
MAX_DURATION = timedelta(days=30)


def bounded(value: timedelta) -> timedelta:
    """`value` if above 0 and at most MAX_DURATION (for a pydantic `AfterValidator`)."""
    if not timedelta(0) < value <= MAX_DURATION:
        raise ValueError(f"must be above 0 and at most {MAX_DURATION.days} days")
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(bounded)]
Scalar = str | int | float | bool


def check_range(above: float | None, below: float | None) -> None:
    """ValueError when `above` and `below` leave no number between them."""
    if above is not None and below is not None and above >= below:
        raise ValueError(f"above ({above:g}) must be less than below ({below:g})")


def compare(value: Any, *, is_: Scalar | None = None, is_not: Scalar | None = None,
            above: float | None = None, below: float | None = None) -> bool:
    """The one test given (`is`, `is not`, or `above` and/or `below`) on a known value."""
    if is_ is not None:
        return same(value, is_)
    if is_not is not None:
        return not same(value, is_not)
    found = number(value)
    return found is not None and (above is None or found > above) and (below is None or found < below)


def size_text(size: float) -> str:
    """A size as people read it: 512 B, 1.5 KB, 2.0 GB."""
    if size < 1024:
        return f"{size:.0f} B"
    value = size / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
