"""A dimmable LED strip or lamp driver on a PWM pin (gpiozero `PWMOutputDevice`):
brightness in percent; ON restores the last brightness, OFF is 0."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from appliance.errors import ValidationFailed
from modules.home_sensors.drivers.base import OFF, ON, Driver, Options, Shape


class DimmerOptions(Options):
    pin: int | str
    frequency_hz: int = Field(500, ge=1, le=100_000)
    active_high: bool = True


class Dimmer(Driver):
    kind = "pwm"
    Options = DimmerOptions
    shape = Shape("light", "brightness", "%", event=True)

    def __init__(self, name: str, options: Any, context: Any) -> None:
        super().__init__(name, options, context)
        self.last_on = 100

    @classmethod
    def parse(cls, command: str) -> str | int:
        word = command.strip().upper()
        if word in (ON, OFF):
            return word
        try:
            level = float(word)
        except ValueError:
            raise ValidationFailed(f"expected ON, OFF or a brightness 0-100, not {command!r}") from None
        if not 0 <= level <= 100:
            raise ValidationFailed(f"brightness {level:g} is not within 0-100")
        return round(level)

    def level(self, value: str | int) -> int:
        """The brightness a parsed command asks for, remembering the last one that was on."""
        if value == ON:
            return self.last_on
        if value == OFF:
            return 0
        assert isinstance(value, int)
        if value > 0:
            self.last_on = value
        return value


class GpioDimmer(Dimmer):
    def __init__(self, name: str, options: Any, context: Any) -> None:
        super().__init__(name, options, context)
        from gpiozero import PWMOutputDevice

        self.output = PWMOutputDevice(options.pin, active_high=options.active_high,
                                      frequency=options.frequency_hz)

    def read(self) -> int:
        return round(self.output.value * 100)

    def write(self, value: str | int) -> int:
        self.output.value = self.level(value) / 100
        return self.read()

    def close(self) -> None:
        self.output.close()
