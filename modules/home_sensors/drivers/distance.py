"""An HC-SR04 ultrasonic distance sensor (gpiozero `DistanceSensor`), in centimetres: a
water tank's level, a car in the garage."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from appliance.errors import TemporaryError
from modules.home_sensors.drivers.base import Driver, Options, Shape


class DistanceOptions(Options):
    echo: int | str
    trigger: int | str
    max_distance_m: float = Field(2.0, gt=0, le=10)


class Distance(Driver):
    kind = "ultrasonic"
    Options = DistanceOptions
    shape = Shape("sensor", "distance", "cm", "distance", "measurement")


class GpioDistance(Distance):
    def __init__(self, name: str, options: Any, context: Any) -> None:
        super().__init__(name, options, context)
        from gpiozero import DistanceSensor

        # partial: a read must not wait for a full queue of echoes, which never comes from
        # a sensor that is unplugged, or once the device is closed.
        self.sensor = DistanceSensor(echo=options.echo, trigger=options.trigger,
                                     max_distance=options.max_distance_m, partial=True)

    def read(self) -> float:
        distance = self.sensor.distance
        if distance == 0:  # no echo averaged yet (the sensor cannot measure below 2 cm)
            raise TemporaryError(f"{self.name}: no echo from the sensor")
        return round(distance * 100, 1)

    def close(self) -> None:
        self.sensor.close()
