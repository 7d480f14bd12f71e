"""A button or a door/window contact on a GPIO pin (gpiozero `Button`): `ON` while closed
(pressed), or while open with `invert` (a reed switch on a door: open door = `ON`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field

from modules.home_sensors.drivers.base import Driver, Options, Shape, on_off


class ContactOptions(Options):
    pin: int | str
    pull_up: bool = Field(True, description="wired to ground with the Pi's pull-up (the usual way)")
    bounce_s: float = Field(0.05, ge=0, le=5, description="ignore changes shorter than this")
    invert: bool = Field(False, description="ON while the contact is open")


class Contact(Driver):
    kind = "contact"
    Options = ContactOptions
    shape = Shape("binary_sensor", "contact", event=True)


class GpioContact(Contact):
    def __init__(self, name: str, options: Any, context: Any) -> None:
        super().__init__(name, options, context)
        from gpiozero import Button

        self.button = Button(options.pin, pull_up=options.pull_up,
                             bounce_time=options.bounce_s or None)

    def read(self) -> str:
        return on_off(self.button.is_pressed != self.options.invert)

    def watch(self, changed: Callable[[], None]) -> bool:
        self.button.when_pressed = lambda: changed()
        self.button.when_released = lambda: changed()
        return True

    def close(self) -> None:
        self.button.close()
