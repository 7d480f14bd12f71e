"""An analog input through an MCP3008 ADC on SPI (gpiozero `MCP3008`): a light-dependent
resistor, a soil-moisture probe… published as a percentage of the range."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from modules.home_sensors.drivers.base import Driver, Options, Shape


class AnalogOptions(Options):
    channel: int = Field(ge=0, le=7)
    spi_device: int = Field(0, ge=0, le=1, description="chip select: 0 = CE0, 1 = CE1")
    low: float = Field(0.0, ge=0, le=1, description="the reading (0…1) shown as 0 %")
    high: float = Field(1.0, ge=0, le=1, description="the reading (0…1) shown as 100 %; "
                                                      "below `low` to invert (dry = high)")

    @model_validator(mode="after")
    def _range(self) -> AnalogOptions:
        if self.low == self.high:
            raise ValueError("low and high must differ")
        return self


class Analog(Driver):
    kind = "mcp3008"
    Options = AnalogOptions
    shape = Shape("sensor", "level", "%", None, "measurement")

    def percent(self, reading: float) -> float:
        o = self.options
        return round(min(100.0, max(0.0, (reading - o.low) / (o.high - o.low) * 100)), 1)


class GpioAnalog(Analog):
    def __init__(self, name: str, options: Any, context: Any) -> None:
        super().__init__(name, options, context)
        from gpiozero import MCP3008

        self.adc = MCP3008(channel=options.channel, device=options.spi_device)

    def read(self) -> float:
        return self.percent(self.adc.value)

    def close(self) -> None:
        self.adc.close()
