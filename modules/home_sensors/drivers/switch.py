"""A relay or an LED on a GPIO pin (gpiozero `DigitalOutputDevice`): ON, OFF or TOGGLE."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from modules.home_sensors.drivers.base import ON, Driver, Options, Shape, on_off, parse_on_off


class SwitchOptions(Options):
    pin: int | str
    active_high: bool = Field(True, description="False for relay boards that switch on a low pin")
    initial: bool = Field(False, description="the state set at start")


class Switch(Driver):
    kind = "switch"
    Options = SwitchOptions
    shape = Shape("switch", "switch", event=True)

    @classmethod
    def parse(cls, command: str) -> str:
        return parse_on_off(command)

    def wanted(self, command: str) -> bool:
        return command == ON or (command == "TOGGLE" and self.read() != ON)


class GpioSwitch(Switch):
    def __init__(self, name: str, options: Any, context: Any) -> None:
        super().__init__(name, options, context)
        from gpiozero import DigitalOutputDevice

        self.output = DigitalOutputDevice(options.pin, active_high=options.active_high,
                                          initial_value=options.initial)

    def read(self) -> str:
        return on_off(bool(self.output.value))

    def write(self, value: str) -> str:
        if self.wanted(value):
            self.output.on()
        else:
            self.output.off()
        return self.read()

    def close(self) -> None:
        self.output.close()
