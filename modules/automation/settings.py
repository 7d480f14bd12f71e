"""Settings of the `automation` service: section `[automation]`, env `CIRCLES_AUTOMATION__<KEY>`.

Rules ("when a home state becomes … then send a command [for a while]") and schedules (a
cron expression, then a command) are declared here and checked at start; every error
names the rule or schedule, and the service exits 78 (docs/automation.md).
"""

from __future__ import annotations

from datetime import UTC, datetime, time, tzinfo
from typing import Annotated, Any, ClassVar
from zoneinfo import ZoneInfo

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

from appliance import cron
from appliance.bus import registry
from appliance.bus.topics import Topic, TopicSpec, slug
from appliance.config import Section
from appliance.values import Duration, Scalar, check_range, check_zone, compare, parse_window
from appliance.values import parse_duration as parse_duration  # its home before appliance.values

OPPOSITE = {"ON": "OFF", "OFF": "ON", "on": "off", "off": "on", "On": "Off", "Off": "On"}


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


Payload = Annotated[str, BeforeValidator(_payload), Field(max_length=1024)]


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
        check_range(self.above, self.below)
        return self

    def holds(self, value: Any) -> bool:
        """The test on a known value."""
        return compare(value, is_=self.is_, is_not=self.is_not, above=self.above, below=self.below)

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
        return check_zone(value) if value is not None else None

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
