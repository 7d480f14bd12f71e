"""The Pi's own CPU temperature (gpiozero `CPUTemperature`, from the thermal zone's file)."""

from __future__ import annotations

from typing import Any

from modules.home_sensors.drivers.base import Driver, Shape


class CpuTemperature(Driver):
    kind = "cpu_temperature"
    shape = Shape("sensor", "temperature", "°C", "temperature", "measurement")


class GpioCpuTemperature(CpuTemperature):
    def __init__(self, name: str, options: Any, context: Any) -> None:
        super().__init__(name, options, context)
        from gpiozero import CPUTemperature

        self.sensor = CPUTemperature(sensor_file=str(context.thermal_file))

    def read(self) -> float:
        return round(self.sensor.temperature, 1)

    def close(self) -> None:
        self.sensor.close()
