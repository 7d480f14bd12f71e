"""Settings of the `notify` service: section `[notify]`, env `CIRCLES_NOTIFY__<KEY>`.

Channels are named (`[notify.channels.phone]`) and hold no secret, only the names of the
secrets in the box's store. Rules are the built-in ones (rules.DEFAULT_RULES) plus those of
the config: a rule with a built-in's name overrides the keys it gives (`enabled = false`
turns it off), any other is added. Every error names its key; the service exits 78.
"""

from __future__ import annotations

import socket
from datetime import time, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import Field, field_validator, model_validator

from appliance.config import Section
from appliance.values import Duration, check_zone, local_zone, parse_window
from modules.notify.channels import ChannelConfig
from modules.notify.rules import DEFAULT_RULES, Rule

_DEFAULTS = {rule["name"]: rule for rule in DEFAULT_RULES}


class NotifySettings(Section):
    channels: dict[str, ChannelConfig] = Field(
        default_factory=dict, description="where alerts go; none: only the log and the panel")
    rules: list[Rule] = Field(default_factory=list, description="added to, or overriding, the built-in rules")
    default_rules: bool = Field(True, description="false: only the rules of the config")
    timezone: str | None = Field(None, description="of quiet_hours; default: the box's")
    quiet_hours: str | None = Field(
        None, description="e.g. 22:00-07:00: alerts below critical wait until it ends")
    summary_every: Duration = Field(timedelta(hours=3),
                                    description="how often an alert that keeps firing is recalled")
    retry_base_s: float = Field(10.0, gt=0, description="first wait after a failed send")
    retry_max_s: float = Field(900.0, gt=0, description="longest wait between two tries")
    max_age: Duration = Field(timedelta(days=7), description="an alert not delivered by then is dropped")
    audit_poll_s: float = Field(15.0, gt=0, description="how often the audit log is read")
    recent: int = Field(20, ge=1, le=200, description="alerts kept on circles/notify/recent")
    box_name: str | None = Field(None, max_length=64, description="names the box in messages; "
                                                                  "default: its host name")

    @field_validator("channels")
    @classmethod
    def _channel_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not name or len(name) > 40 or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"channel name {name!r}: use letters, digits, - and _")
        return value

    @field_validator("rules", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any) -> Any:
        # A built-in rule's name: the keys given replace the built-in's, the others stay.
        if not isinstance(value, list):
            return value
        return [{**_DEFAULTS[item["name"]], **item}
                if isinstance(item, dict) and item.get("name") in _DEFAULTS else item
                for item in value]

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return check_zone(value) if value is not None else None

    @field_validator("quiet_hours")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None:
            parse_window(value)
        return value

    @model_validator(mode="after")
    def _checks(self) -> NotifySettings:
        names = [rule.name for rule in self.rules]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"rules: {name!r} is given twice")
        if self.retry_base_s > self.retry_max_s:
            raise ValueError("retry_base_s must not exceed retry_max_s")
        return self

    def all_rules(self) -> list[Rule]:
        """The rules in force: the built-in ones the config does not name, then the config's;
        disabled ones left out."""
        given = {rule.name for rule in self.rules}
        built_in = [Rule.model_validate(rule) for name, rule in _DEFAULTS.items()
                    if name not in given] if self.default_rules else []
        return [rule for rule in [*built_in, *self.rules] if rule.enabled]

    def zone(self) -> tzinfo:
        """The zone of quiet hours: the configured one, else the box's own."""
        return ZoneInfo(self.timezone) if self.timezone else local_zone()

    def quiet(self) -> tuple[time, time] | None:
        return parse_window(self.quiet_hours) if self.quiet_hours else None

    def box(self) -> str:
        return self.box_name or socket.gethostname()
