"""Topics, filters, the slug rule and the topic specification type.

A `Topic` is a concrete topic name; a `Filter` may hold `+` and `#`. Both validate
themselves on construction. A `TopicSpec` is one entry of the registry
(`appliance.bus.registry`): its template, QoS, retained flag, payload model (or raw
string) and which kinds of client may publish and subscribe.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ValidationError

from appliance.errors import ValidationFailed

_NOT_SLUG = re.compile(r"[^a-z0-9_-]+")
MAX_PAYLOAD = 256 * 1024


@lru_cache(maxsize=4096, typed=True)  # names are few (symbols, accounts, devices) and asked for per message
def slug(name: str) -> str:
    """The topic level for a name: lower-case, `[a-z0-9_-]` only (`BTC/USDT` → `btc-usdt`,
    `#US30` → `us30`). The real name travels in the payload."""
    value = _NOT_SLUG.sub("-", str(name).strip().lower()).strip("-")
    if not value:
        raise ValueError(f"{name!r} has no character usable in a topic level")
    return value


def _check_levels(value: str, *, wildcards: bool) -> None:
    if not value or len(value.encode()) > 65535:
        raise ValueError("a topic must be 1..65535 bytes")
    if "\x00" in value:
        raise ValueError("a topic must not contain NUL")
    levels = value.split("/")
    for i, level in enumerate(levels):
        if ("+" in level or "#" in level) and not wildcards:
            raise ValueError(f"{value!r}: wildcards are not allowed in a topic name")
        if "+" in level and level != "+":
            raise ValueError(f"{value!r}: '+' must fill a whole level")
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"{value!r}: '#' must be the whole last level")


@dataclass(frozen=True, slots=True)
class Topic:
    value: str

    def __post_init__(self) -> None:
        _check_levels(self.value, wildcards=False)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Filter:
    value: str

    def __post_init__(self) -> None:
        _check_levels(self.value, wildcards=True)

    def __str__(self) -> str:
        return self.value

    def matches(self, topic: str | Topic) -> bool:
        """MQTT matching: `+` one level, `#` this level and all below; `$`-topics only
        match filters that name their first level."""
        name = str(topic)
        pattern, levels = self.value.split("/"), name.split("/")
        if name.startswith("$") and pattern[0] in ("+", "#"):
            return False
        for i, want in enumerate(pattern):
            if want == "#":
                return True
            if i >= len(levels) or (want != "+" and want != levels[i]):
                return False
        return len(levels) == len(pattern)


@dataclass(frozen=True)
class TopicSpec:
    """One registry entry. `model` is None for raw string payloads.

    `publishers`/`subscribers` name kinds of client: `service`, `esp32`, `mt5`,
    `homeassistant`, `observer`; `service:<name>` is one service; `<kind>:self` binds
    the kind's identity level (`{service}`, `{device}`, `{account}`) to the client's own
    name, so a device may only touch its own topics.
    """

    name: str
    template: str
    qos: int = 1
    retained: bool = False
    model: type[BaseModel] | None = None
    publishers: frozenset[str] = frozenset()
    subscribers: frozenset[str] = frozenset()
    params: tuple[str, ...] = field(init=False)
    _regex: re.Pattern[str] = field(init=False, repr=False)
    _topics: dict[tuple[tuple[str, str], ...], Topic] = field(init=False, repr=False,
                                                             compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        names = tuple(p for _, p, _, _ in string.Formatter().parse(self.template) if p)
        object.__setattr__(self, "params", names)
        regex = re.escape(self.template)
        for p in names:
            regex = regex.replace(re.escape("{" + p + "}"), f"(?P<{p}>[^/]+)")
        object.__setattr__(self, "_regex", re.compile(f"^{regex}$"))
        _check_levels(self.template.format(**{p: "x" for p in names}), wildcards=False)

    def topic(self, **values: str) -> Topic:
        """The concrete topic; every value is slugified."""
        key = tuple(values.items())
        found = self._topics.get(key)
        if found is not None:
            return found
        missing = set(self.params) - set(values)
        if missing:
            raise ValueError(f"{self.name}: missing {sorted(missing)}")
        topic = Topic(self.template.format(**{k: slug(v) for k, v in values.items()}))
        if len(self._topics) >= 10_000:  # one per account, device, feed…: stay small
            self._topics.clear()
        self._topics[key] = topic
        return topic

    def filter(self, **values: str) -> Filter:
        """A subscription filter: the values given are slugified, the others become `+`."""
        return Filter(self.template.format(
            **{p: slug(values[p]) if p in values else "+" for p in self.params}))

    def partial(self, **values: str) -> str:
        """The template with the values given filled in (slugified) and the others kept as
        `{name}`: what a device's firmware is told, to fill in itself."""
        return self.template.format(**{p: slug(values[p]) if p in values else "{" + p + "}"
                                       for p in self.params})

    def parse(self, topic: str) -> dict[str, str] | None:
        """The template's values in `topic`, or None when the topic is not of this spec."""
        found = self._regex.match(topic)
        return found.groupdict() if found else None

    def encode(self, payload: BaseModel | str | dict[str, Any]) -> bytes:
        if self.model is None:
            if not isinstance(payload, str):
                raise TypeError(f"{self.name} carries a raw string, not {type(payload).__name__}")
            return payload.encode()
        if isinstance(payload, dict):
            payload = self.model.model_validate(payload)
        if not isinstance(payload, self.model):
            raise TypeError(f"{self.name} carries {self.model.__name__}")
        return payload.model_dump_json().encode()

    def decode(self, data: bytes) -> Any:
        """The validated payload; ValidationFailed names the reason."""
        if len(data) > MAX_PAYLOAD:
            raise ValidationFailed(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD}")
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            raise ValidationFailed(f"payload is not UTF-8: {exc}") from None
        if self.model is None:
            return text
        try:
            return self.model.model_validate_json(text)
        except ValidationError as exc:
            raise ValidationFailed(describe(exc)) from None
        except (ValueError, RecursionError) as exc:
            raise ValidationFailed(f"invalid JSON: {exc}") from None


def describe(exc: ValidationError) -> str:
    """A one-line reason from a pydantic error: `field: message; field: message`."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str).encode()
