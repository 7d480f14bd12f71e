"""Finding services: every service is an entry point in the group `circles.services`."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from appliance.errors import ConfigError

if TYPE_CHECKING:
    from appliance.runtime import Service

GROUP = "circles.services"


def names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load(name: str) -> type[Service]:
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not found:
        raise ConfigError(f"no service {name!r}; registered: {', '.join(names()) or 'none'}")
    cls: type[Service] = found[0].load()
    return cls
