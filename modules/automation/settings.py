"""Settings of the `automation` service: section `[automation]`, env `CIRCLES_AUTOMATION__<KEY>`.

Rules ("when a home state becomes … then send a command [for a while]") and schedules (a
cron expression, then a command) are declared here and checked at start; every error
names the rule or schedule, and the service exits 78 (docs/automation.md).
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, time, timedelta, tzinfo
from typing import Annotated, Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from appliance.bus import registry
from appliance.bus.topics import Topic, TopicSpec, slug
from appliance.config import Section
from modules.automation import cron

MAX_DURATION = timedelta(days=30)
OPPOSITE = {"ON": "OFF", "OFF": "ON", "on": "off", "off": "on", "On": "Off", "Off": "On"}
_DURATION = re.compile(r"^(?:(\d+)\s*d)?\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m)?\s*(?:(\d+)\s*s)?$")
_WINDOW = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")


# -- values -------------------------------------------------------------------------------
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
    """`90s`, `5m`, `1h30m`, `2d`, or a number of seconds, as a timedelta."""
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


def _bounded(value: timedelta) -> timedelta:
    if not timedelta(0) < value <= MAX_DURATION:
        raise ValueError(f"must be above 0 and at most {MAX_DURATION.days} days")
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


def _window(text: str | None) -> str | None:
    if text is not None:
        parse_window(text)
    return text


def _payload(value: Any) -> Any:
    # A number in TOML is a fine command (`payload = 50`); on the bus it is its text.
    if isinstance(value, bool):
        raise ValueError("a payload is text, like \"ON\" or \"50\"")
    if isinstance(value, int | float):
        return str(value)
    return value


def check_topic(value: str, specs: tuple[TopicSpec, ...], what: str) -> str:
    """`value` if it is a concrete topic of one of `specs` whose levels are slugs."""
    try:
        Topic(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    for spec in specs:
        params = spec.parse(value)
        if params is None:
            continue
        for level in params.values():
            try:
                wanted = slug(level)
            except ValueError:
                wanted = "a-z, 0-9, - and _ only"
            if wanted != level:
                raise ValueError(f"{level!r} is not a topic level; say {wanted!r}")
        return value
    other = registry.spec_for(value)
    seen = f", it is a {other.name} topic" if other is not None else ""
    templates = " or ".join(spec.template for spec in specs)
    raise ValueError(f"{value!r} is not {what} ({templates}){seen}")


Duration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_bounded)]
Payload = Annotated[str, BeforeValidator(_payload), Field(max_length=1024)]
Scalar = str | int | float | bool


# -- the declarations ---------------------------------------------------------------------
class Condition(Section):
    """A test on the last known value of a home state or status topic. The value of a state
    topic is its `value`; a status topic's is its raw text (`online`/`offline`)."""

    topic: str
    is_: Scalar | None = Field(None, alias="is", description="equal to")
    is_not: Scalar | None = Field(None, description="known, and not equal to")
    above: float | None = Field(None, allow_inf_nan=False, description="a number above")
    below: float | None = Field(None, allow_inf_nan=False, description="a number below")

    @field_validator("topic")
    @classmethod
    def _home_topic(cls, value: str) -> str:
        return check_topic(value, (registry.HOME_STATE, registry.HOME_STATUS),
                           "a home state or status topic")

    @model_validator(mode="after")
    def _one_test(self) -> Condition:
        given = [self.is_ is not None, self.is_not is not None,
                 self.above is not None or self.below is not None]
        if sum(given) != 1:
            raise ValueError("give one test: is, is_not, or above and/or below")
        if self.above is not None and self.below is not None and self.above >= self.below:
            raise ValueError(f"above ({self.above:g}) must be less than below ({self.below:g})")
        return self

    def holds(self, value: Any) -> bool:
        """The test on a known value."""
        if self.is_ is not None:
            return same(value, self.is_)
        if self.is_not is not None:
            return not same(value, self.is_not)
        found = number(value)
        return found is not None and (self.above is None or found > self.above) \
            and (self.below is None or found < self.below)

    def describe(self) -> str:
        if self.is_ is not None:
            return f"is {self.is_!r}"
        if self.is_not is not None:
            return f"is not {self.is_not!r}"
        return " and ".join(f"{word} {limit:g}" for word, limit in
                            (("above", self.above), ("below", self.below)) if limit is not None)


class Action(Section):
    """A command: a raw payload on a home `set` topic."""

    topic: str
    payload: Payload

    @field_validator("topic")
    @classmethod
    def _set_topic(cls, value: str) -> str:
        return check_topic(value, (registry.HOME_SET,), "a home command topic")

    def params(self) -> dict[str, str]:
        return registry.HOME_SET.parse(self.topic) or {}


class Automation(Section):
    """What rules and schedules share: a name, conditions, the command, and its revert."""

    kind: ClassVar[str] = "automation"

    name: str = Field(min_length=1, max_length=100)
    enabled: bool = True
    only_if: list[Condition] = Field(default_factory=list,
                                     description="every one must hold when it fires")
    between: Annotated[str | None, AfterValidator(_window)] = Field(
        None, description="local time window, e.g. 18:00-07:00 (may cross midnight)")
    then: Action
    for_: Duration | None = Field(None, alias="for",
                                  description="send `revert` this long after firing")
    revert: Payload | None = Field(None, description="default: the opposite of ON/OFF")

    # Defined before the wrap below, so that its errors get the name too.
    @model_validator(mode="after")
    def _revert_needs_for(self) -> Automation:
        if self.revert is not None and self.for_ is None:
            raise ValueError("revert: only with `for` (it is sent when that time is up)")
        if self.for_ is not None and self.revert is None and self.then.payload not in OPPOSITE:
            raise ValueError(f"revert: needed with `for` when then.payload is not ON or OFF "
                             f"(got {self.then.payload!r})")
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _name_the_errors(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        # pydantic locates an error by index (rules.2.when.topic); a person looks for the name.
        try:
            return handler(data)
        except ValidationError as exc:
            name = data.get("name") if isinstance(data, dict) else None
            who = f"{cls.kind} {name!r}" if isinstance(name, str) and name else f"{cls.kind} (no name)"
            parts = []
            for err in exc.errors():
                where = ".".join(str(part) for part in err["loc"])
                shown = ""
                if err["type"] not in ("missing", "value_error") and \
                        not isinstance(err.get("input"), dict | list):
                    shown = f" (got {err.get('input')!r})"
                message = err["msg"].removeprefix("Value error, ")
                parts.append(f"{where + ': ' if where else ''}{message}{shown}")
            # Not "; ": that separates the errors of different keys (`circles config check`).
            detail = f"{who}: " + " | ".join(parts)
            raise PydanticCustomError("automation", "{detail}", {"detail": detail}) from None

    def revert_payload(self) -> str | None:
        """What is sent when `for` is up; None without `for`."""
        if self.for_ is None:
            return None
        return self.revert if self.revert is not None else OPPOSITE[self.then.payload]

    def window(self) -> tuple[time, time] | None:
        return parse_window(self.between) if self.between else None


class Rule(Automation):
    """When a message makes `when` true (it was false or unknown), and `only_if` and
    `between` hold, send `then`."""

    kind: ClassVar[str] = "rule"

    when: Condition


class Schedule(Automation):
    """At each time of a cron expression (in the section's time zone), if `only_if` and
    `between` hold, send `then`."""

    kind: ClassVar[str] = "schedule"

    cron: str = Field(description="minute hour day-of-month month day-of-week, or @daily …")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if cron.next_time(cron.trigger(value, UTC), datetime.now(UTC)) is None:
            raise ValueError(f"{value!r} never fires (e.g. 30 February)")
        return value


def demo_rules() -> list[Rule]:
    """What `circles up` shows, on the simulated devices of `home-sensors`."""
    return [Rule.model_validate({
        "name": "hall light on motion after dark",
        "when": {"topic": str(registry.HOME_STATE.topic(device="hall-motion", entity="motion")),
                 "is": "ON"},
        "only_if": [{"topic": str(registry.HOME_STATE.topic(device="garden-light", entity="level")),
                     "below": 30}],
        "then": {"topic": str(registry.HOME_SET.topic(device="hall-light", entity="switch")),
                 "payload": "ON"},
        "for": "5m",
    })]


class AutomationSettings(Section):
    timezone: str | None = Field(
        None, description="the zone of cron times and `between` windows; default: the box's")
    rules: list[Rule] | None = Field(
        None, description="default: none, or the demo's rule in development (circles up)")
    schedules: list[Schedule] = Field(default_factory=list)
    max_event_age_s: float = Field(
        60.0, gt=0, description="a state older than this by its own time (a node's buffered "
                                "reading, a message queued while the service was down) "
                                "is remembered but fires nothing")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r} (e.g. 'Europe/Berlin')") from None
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> AutomationSettings:
        seen: dict[str, str] = {}
        for where, items in (("rules", self.rules or []), ("schedules", self.schedules)):
            for i, item in enumerate(items):
                here = f"{where}.{i}"
                if item.name in seen:
                    raise PydanticCustomError(
                        "automation", "{detail}",
                        {"detail": f"{here}: {item.kind} {item.name!r}: name: already used by "
                                   f"{seen[item.name]}"})
                seen[item.name] = here
        return self

    def zone(self) -> tzinfo | None:
        """The configured zone; None is the box's local zone."""
        return ZoneInfo(self.timezone) if self.timezone else None
