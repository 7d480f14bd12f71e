"""Settings of the `home-sensors` service: `[home_sensors]` and one `[[home_sensors.devices]]`
table per device, its kind's own keys beside `name` and `kind` (docs/home.md).

```toml
[home_sensors]
hardware = "gpio"            # "simulated" (the default: `circles up`, tests) | "gpio"

[[home_sensors.devices]]
name = "front-door"          # the topic level: circles/home/front-door/contact/state
kind = "contact"
pin = 17
invert = true                # a reed switch: open door = ON
device_class = "door"
room = "Hall"
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from appliance.bus.topics import describe, slug
from appliance.config import Section
from modules.home_sensors.drivers import KINDS

Kind = Literal["contact", "motion", "ds18b20", "mcp3008", "ultrasonic", "cpu_temperature",
               "switch", "pwm"]
assert set(Kind.__args__) == set(KINDS)  # type: ignore[attr-defined]


class DeviceSettings(Section):
    """One device; keys other than these belong to its kind (`pin`, `channel`, …)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    kind: Kind
    entity: str | None = Field(None, min_length=1, max_length=64,
                               description="the entity's topic level; default by kind")
    label: str | None = Field(None, max_length=100, description="the name people see")
    room: str | None = Field(None, max_length=64, description="Home Assistant's suggested area")
    interval_s: float | None = Field(None, gt=0, le=86400,
                                     description="seconds between published values")
    _options: Any = PrivateAttr(None)

    @field_validator("name", "entity")
    @classmethod
    def _level(cls, value: str | None) -> str | None:
        if value is not None and slug(value) != value:
            raise ValueError(f"{value!r} is not a topic level; say {slug(value)!r}")
        return value

    @model_validator(mode="after")
    def _kind_options(self) -> DeviceSettings:
        try:
            self._options = KINDS[self.kind].Options.model_validate(self.model_extra or {})
        except ValidationError as exc:
            raise ValueError(f"{self.kind}: {describe(exc)}") from None
        return self

    @property
    def options(self) -> Any:
        return self._options

    @property
    def entity_name(self) -> str:
        return self.entity or KINDS[self.kind].shape.entity


def demo_devices() -> list[DeviceSettings]:
    """What `circles up` shows: one device of each kind, simulated."""
    devices: list[dict[str, Any]] = [
        {"name": "front-door", "kind": "contact", "pin": 17, "invert": True,
         "device_class": "door", "room": "Hall", "label": "Front door"},
        {"name": "hall-motion", "kind": "motion", "pin": 4, "room": "Hall", "label": "Hall motion"},
        {"name": "living-room", "kind": "ds18b20", "room": "Living room",
         "label": "Living room temperature", "interval_s": 30},
        {"name": "garden-light", "kind": "mcp3008", "channel": 0, "room": "Garden",
         "device_class": None, "label": "Garden light", "interval_s": 15},
        {"name": "water-tank", "kind": "ultrasonic", "echo": 24, "trigger": 23, "room": "Garden",
         "label": "Water tank"},
        {"name": "box", "kind": "cpu_temperature", "label": "Box CPU", "interval_s": 30},
        {"name": "hall-light", "kind": "switch", "pin": 27, "room": "Hall", "label": "Hall light"},
        {"name": "desk-lamp", "kind": "pwm", "pin": 18, "room": "Office", "label": "Desk lamp"},
    ]
    return [DeviceSettings(**d) for d in devices]


class HomeSensorsSettings(Section):
    hardware: Literal["simulated", "gpio"] = Field(
        "simulated", description="gpio: the box's pins and files; simulated: no hardware")
    pin_factory: str | None = Field(
        None, description="gpiozero's pin factory (lgpio, rpigpio, native, mock); "
                          "default: gpiozero's choice")
    devices: list[DeviceSettings] | None = Field(
        None, description="default: none, or one simulated device of each kind in development "
                          "(circles up)")
    interval_s: float = Field(60.0, gt=0, le=86400, description="default seconds between values")
    poll_s: float = Field(0.5, gt=0, le=60, description="how often inputs that cannot signal "
                                                        "a change are read")
    w1_path: Path = Path("/sys/bus/w1/devices")
    thermal_file: Path = Path("/sys/class/thermal/thermal_zone0/temp")
    seed: int = 7  # of the simulated values
    history_full_hours: float = Field(24.0, gt=0, le=24 * 31,
                                      description="full-resolution history kept this long")
    history_days: int = Field(365, ge=1, le=3650, description="5-minute means kept this long")

    @model_validator(mode="after")
    def _checked(self) -> HomeSensorsSettings:
        if self.hardware == "gpio" and self.devices is None:
            # Never drive the demo's pins on real hardware.
            raise ValueError("devices: list the devices wired to this box (hardware = 'gpio')")
        seen: dict[tuple[str, str], int] = {}
        for i, device in enumerate(self.devices or []):
            key = (device.name, device.entity_name)
            if key in seen:
                raise ValueError(f"devices.{i}: {device.name}/{device.entity_name} is also "
                                 f"devices.{seen[key]}")
            seen[key] = i
        return self
