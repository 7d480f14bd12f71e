"""A PIR motion sensor on a GPIO pin (gpiozero `MotionSensor`): `ON` while it sees motion."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field

from modules.home_sensors.drivers.base import Driver, Options, Shape, on_off


class MotionOptions(Options):
    pin: int | str
    queue_len: int = Field(1, ge=1, le=100, description="samples averaged against false triggers")
    sample_rate: float = Field(10.0, gt=0, le=1000, description="samples per second")


class Motion(Driver):
    kind = "motion"
    Options = MotionOptions
    shape = Shape("binary_sensor", "motion", device_class="motion", event=True)


class GpioMotion(Motion):
    def __init__(self, name: str, options: Any, context: Any) -> None:
        super().__init__(name, options, context)
        from gpiozero import MotionSensor

        # partial: a read never waits for the queue to fill (forever, once closed).
        self.sensor = MotionSensor(options.pin, queue_len=options.queue_len,
                                   sample_rate=options.sample_rate, partial=True)

    def read(self) -> str:
        return on_off(self.sensor.motion_detected)

    def watch(self, changed: Callable[[], None]) -> bool:
        self.sensor.when_motion = lambda: changed()
        self.sensor.when_no_motion = lambda: changed()
        return True

    def close(self) -> None:
        self.sensor.close()
