"""Alert rules: which topic, which condition, how severe, what to say.

A rule watches a topic of the registry (by its spec name, `trading_halt`, or a filter of one,
`circles/home/+/status`) or the audit log (`audit`). Its condition is a list of tests on the
payload's fields, all of which must hold. Its texts are templates over the payload's fields
and the topic's levels (`{service}`, `{disk_percent:.0f}`, `{figures[pnl_today]}`): names and
`[key]` only, never an attribute, so a template cannot reach into Python objects.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from datetime import timedelta
from functools import cached_property
from typing import Annotated, Any

from pydantic import AfterValidator, Field, field_validator, model_validator

from appliance.bus import registry
from appliance.bus.topics import Filter, TopicSpec
from appliance.config import Section
from appliance.values import Duration, Scalar, check_range, compare
from modules.notify.channels.base import Severity

AUDIT = "audit"  # the rules' name for the audit log's chain
MAX_TEXT = 2000  # characters of one rendered text; a payload may be long
MAX_LISTED = 10  # items of a list shown in a text
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[[^\[\]{}]+\])*$")
_KEY = re.compile(r"\[([^\[\]]+)\]")

# The topics a rule may watch; the service subscribes to each.
WATCHED: dict[str, TopicSpec] = {spec.name: spec for spec in (
    registry.TRADING_HALT, registry.RISK_STATE, registry.SERVICE_STATUS, registry.HEALTH_STATE,
    registry.HOME_STATUS, registry.HOME_STATE, registry.MT5_STATUS, registry.MT5_GAPS,
    registry.BACKUP_ALERT, registry.BACKUP_RESULT, registry.BACKUP_DRILL)}


# -- templates ----------------------------------------------------------------------------
def check_template(text: str) -> str:
    """`text` if every `{…}` in it is a name with `[key]`s, a format spec and a conversion."""
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc} (write {{{{ and }}}} for braces)") from None
    for _, field, spec, _ in parts:
        if field is None:
            continue
        if not _FIELD.match(field):
            raise ValueError(f"{text!r}: {{{field}}}: use a field's name, with [key] for what it "
                             f"holds (no attributes, no positions)")
        if spec and ("{" in spec or "}" in spec):
            raise ValueError(f"{text!r}: {{{field}:{spec}}}: no fields inside a format")
    return text


def shown(value: Any) -> str:
    """A value as a person reads it: lists joined (the first few), nothing as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        items = [shown(item) for item in value[:MAX_LISTED]]
        more = f" (+{len(value) - MAX_LISTED})" if len(value) > MAX_LISTED else ""
        return ", ".join(items) + more if items else "none"
    if isinstance(value, dict):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


_MISSING = object()
_CONVERSIONS: dict[str, Callable[[object], str]] = {"r": repr, "s": str, "a": ascii}


def _lookup(field: str, context: dict[str, Any]) -> Any:
    name = field.split("[", 1)[0]
    value = context.get(name, _MISSING)
    for key in _KEY.findall(field):
        if isinstance(value, dict):
            value = value.get(key, _MISSING)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return _MISSING
    return value


def render(template: str, context: dict[str, Any]) -> str:
    """The template filled from `context`; a missing field shows as `?`, a value its format
    spec does not fit shows as it is (a message always goes out)."""
    out = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        out.append(literal)
        if field is None:
            continue
        value = _lookup(field, context)
        if value is _MISSING:
            out.append("?")
            continue
        if conversion:
            value = _CONVERSIONS[conversion](value)
        try:
            out.append(format(value, spec) if spec else shown(value))
        except (TypeError, ValueError):
            out.append(shown(value))
    text = "".join(out)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


def human(span: timedelta) -> str:
    """`45 s`, `5 min`, `3 h`, `2 h 5 min`, `1 d 4 h`."""
    seconds = max(0, int(span.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min" if minutes else f"{seconds} s"


Template = Annotated[str, AfterValidator(check_template), Field(min_length=1, max_length=1000)]


# -- conditions ---------------------------------------------------------------------------
def field_of(doc: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of a payload (`services.market.online`); _MISSING if none."""
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


class Test(Section):
    """One test on a field of the payload (`value`: a home state's value, or the text of a
    raw payload such as a status)."""

    field: str = Field("value", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    is_: Scalar | None = Field(None, alias="is", description="equal to")
    is_not: Scalar | None = Field(None, description="known, and not equal to")
    above: float | None = Field(None, allow_inf_nan=False)
    below: float | None = Field(None, allow_inf_nan=False)
    empty: bool | None = Field(None, description="true: none or empty; false: has something")

    @model_validator(mode="after")
    def _one_test(self) -> Test:
        given = [self.is_ is not None, self.is_not is not None,
                 self.above is not None or self.below is not None, self.empty is not None]
        if sum(given) != 1:
            raise ValueError("give one test: is, is_not, above and/or below, or empty")
        check_range(self.above, self.below)
        return self

    def holds(self, doc: dict[str, Any]) -> bool:
        value = field_of(doc, self.field)
        if self.empty is not None:
            nothing = value is _MISSING or value is None or (
                isinstance(value, list | dict | str) and not value)
            return nothing == self.empty
        if value is _MISSING or value is None:  # `is_not` too: unknown is not "not equal"
            return False
        return compare(value, is_=self.is_, is_not=self.is_not, above=self.above, below=self.below)


# -- rules --------------------------------------------------------------------------------
def watch_filter(topic: str) -> Filter | None:
    """The filter of a rule's `topic` (None for the audit log); ValueError naming what may be
    watched."""
    if topic == AUDIT:
        return None
    if topic in WATCHED:
        return WATCHED[topic].filter()
    try:
        flt = Filter(topic)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    spec = registry.spec_for(topic.replace("+", "x")) if "#" not in topic else None
    if spec is None or spec.name not in WATCHED:
        raise ValueError(f"{topic!r}: watch one of {', '.join([AUDIT, *WATCHED])}, or a filter "
                         f"of one of their topics (with + for a level, no #)")
    return flt


class Rule(Section):
    """When the condition holds (for `for`, if given): one alert. While it keeps holding, a
    summary every `summary_every`; when it ends, `resolved` (if given)."""

    name: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")
    enabled: bool = True
    topic: str = Field(description="a watched topic's name, a filter of one, or audit")
    when: list[Test] = Field(min_length=1, description="every test must hold")
    for_: Duration | None = Field(None, alias="for", description="hold this long before alerting")
    severity: Severity = "warning"
    title: Template
    message: Template
    summary: Template = "Still so after {duration}: {title}"
    resolved: Template | None = Field(None, description="sent when it ends; none: nothing is")
    summary_every: Duration | None = Field(None, description="default: the section's")
    # Audit rules only: `count` matching events within `within`, counted per value of each
    # field in `by` (the same user, the same address).
    count: int = Field(1, ge=1, le=10_000)
    within: Duration | None = None
    by: list[str] = Field(default_factory=lambda: ["target", "source"], min_length=1)

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        watch_filter(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.topic == AUDIT:
            if self.for_ is not None or self.resolved is not None:
                raise ValueError("for and resolved: not for audit rules (an event does not end)")
            if self.count > 1 and self.within is None:
                raise ValueError("count above 1 needs within (e.g. '15m')")
        elif self.count != 1 or self.within is not None:
            raise ValueError("count and within: only for audit rules")
        return self

    @cached_property
    def filter(self) -> Filter | None:
        return watch_filter(self.topic)

    def matches(self, topic: str) -> bool:
        return self.filter is not None and self.filter.matches(topic)

    def holds(self, doc: dict[str, Any]) -> bool:
        return all(test.holds(doc) for test in self.when)


def _rule(name: str, topic: str, when: list[dict[str, Any]], severity: str, title: str,
          message: str, summary: str, resolved: str | None = None, **more: Any) -> dict[str, Any]:
    return {"name": name, "topic": topic, "when": when, "severity": severity, "title": title,
            "message": message, "summary": summary,
            **({"resolved": resolved} if resolved else {}), **more}


# The built-in rules, as a person would write them (a rule of the same name in the config
# overrides the keys it gives).
DEFAULT_RULES: list[dict[str, Any]] = [
    _rule("trading_halted", "trading_halt", [{"field": "halted", "is": True}], "critical",
          "Trading halted", "Trading halted by {by}: {reason}", "Still halted, {duration}: {reason}",
          "Trading resumed by {by}: {reason} (halted for {duration})"),
    _rule("risk_breach", "risk_state", [{"field": "breaches", "empty": False}], "warning",
          "Risk limit breached", "Risk limits breached: {breaches}",
          "Still breached, {duration}: {breaches}", "Risk back within its limits"),
    _rule("service_offline", "service_status", [{"is": "offline"}], "warning",
          "Service {service} offline", "The {service} service has been offline for {duration}",
          "The {service} service is still offline, {duration}",
          "The {service} service is back online (offline for {duration})", **{"for": "5m"}),
    _rule("device_offline", "home_status", [{"is": "offline"}], "warning",
          "Device {device} offline", "The device {device} has been offline for {duration}",
          "The device {device} is still offline, {duration}",
          "The device {device} is back online (offline for {duration})", **{"for": "10m"}),
    _rule("mt5_offline", "mt5_status", [{"is": "offline"}], "warning",
          "MT5 terminal {account} offline",
          "The MT5 terminal of {account} has been offline for {duration}",
          "The MT5 terminal of {account} is still offline, {duration}",
          "The MT5 terminal of {account} is back online (offline for {duration})",
          **{"for": "10m"}),
    _rule("mt5_gap", "mt5_gaps", [{"field": "missing", "empty": False}], "warning",
          "MT5 deals missing: {account}",
          "Deals of {account} have been missing from the ledger for {duration} and were not "
          "recovered by a resend: tickets {missing}",
          "Deals of {account} still missing from the ledger, {duration}: tickets {missing}",
          "The missing deals of {account} are in the ledger now", **{"for": "30m"}),
    # `overdue` leaves out failed drills, which restore_drill_failed reports.
    _rule("backup_overdue", "backup_alert", [{"field": "overdue", "empty": False}], "warning",
          "No good backup", "No good backup: {overdue}", "Still no good backup, {duration}: {overdue}",
          "Backups are good again"),
    _rule("restore_drill_failed", "backup_drill", [{"field": "ok", "is": False}], "warning",
          "Restore drill of {job} failed", "The restore drill of the backup {job} failed: {error}",
          "The restore drill of {job} still fails, {duration}",
          "The restore drill of the backup {job} passed"),
    _rule("disk_full", "health_state", [{"field": "disk_percent", "above": 90}], "warning",
          "Disk almost full",
          "The disk of {hostname} is {disk_percent:.0f} % full ({disk_free_gb} GB free)",
          "The disk is still {disk_percent:.0f} % full, {duration}",
          "The disk is {disk_percent:.0f} % full again", **{"for": "5m"}),
    _rule("clock_unsynchronised", "health_state", [{"field": "clock_synchronized", "is": False}],
          "warning", "Clock not synchronised",
          "The clock of {hostname} has not been synchronised for {duration}: times in the "
          "ledger and the logs may drift", "The clock is still not synchronised, {duration}",
          "The clock is synchronised again", **{"for": "10m"}),
    _rule("login_lockout", AUDIT, [{"field": "action", "is": "login.lockout"}], "warning",
          "Login locked: {target}",
          "{target} was locked out after repeated failed logins (from {source}, until {until})",
          "{repeats} more lockouts of {target} in {duration}"),
    _rule("failed_logins", AUDIT, [{"field": "action", "is": "login.failure"}], "warning",
          "Repeated failed logins", "{count} failed logins for {group} within {within}",
          "{repeats} more failed logins for {group} in {duration}",
          count=10, within="15m"),
]
