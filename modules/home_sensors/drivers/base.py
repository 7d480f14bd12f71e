"""The driver interface of the home-sensors service.

A *kind* (`contact`, `switch`, …) says what a device publishes and which commands it takes;
a *driver* is one way to reach that kind's hardware: through gpiozero (or the kernel's files)
on the box, or simulated for `circles up` and tests. Every driver call may block (gpiozero,
sysfs), so the service runs them in a thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from appliance.config import Section
from appliance.errors import ValidationFailed

ON, OFF = "ON", "OFF"


@dataclass(frozen=True)
class Context:
    """What drivers need from the service's settings."""

    w1_path: Path
    thermal_file: Path
    seed: int


@dataclass(frozen=True)
class Shape:
    """How a kind appears on the bus and in Home Assistant."""

    component: str  # sensor | binary_sensor | switch | light
    entity: str  # the default entity name (topic level)
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = None
    event: bool = False  # a state change is published at once, not only periodically


class Options(Section):
    """Keys every device may set beside `name` and `kind` (the kind's own keys extend it)."""

    device_class: str | None = Field(None, description="Home Assistant's device class, "
                                                        "when the kind's default does not fit")


class Driver:
    """One device's hardware. `read` returns the entity's value as published (`ON`/`OFF` or
    a number); an output's `write` applies a parsed command and returns the state the
    hardware then reports."""

    kind: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    shape: ClassVar[Shape]

    def __init__(self, name: str, options: Any, context: Context) -> None:
        self.name = name
        self.options = options
        self.context = context

    @classmethod
    def parse(cls, command: str) -> Any:
        """The value a `set` command asks for; ValidationFailed when the kind takes none."""
        raise ValidationFailed(f"a {cls.kind} takes no commands")

    def read(self) -> Any:
        raise NotImplementedError

    def write(self, value: Any) -> Any:
        raise ValidationFailed(f"a {self.kind} takes no commands")

    def watch(self, changed: Callable[[], None]) -> bool:
        """Call `changed` (from any thread) whenever the state may have changed; False when
        the driver cannot, and the service polls it instead."""
        return False

    def close(self) -> None:
        """Release the hardware."""


def on_off(active: bool) -> str:
    return ON if active else OFF


def parse_on_off(command: str) -> str:
    """ON, OFF or TOGGLE from a command (any case; 1/0 and true/false too)."""
    word = command.strip().upper()
    if word in (ON, "1", "TRUE"):
        return ON
    if word in (OFF, "0", "FALSE"):
        return OFF
    if word == "TOGGLE":
        return word
    raise ValidationFailed(f"expected ON, OFF or TOGGLE, not {command!r}")
