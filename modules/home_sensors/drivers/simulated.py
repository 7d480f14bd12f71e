"""Simulated drivers, one per kind, for `circles up` and the tests: the same interface as the
hardware, with values that move like a house does (the light follows the sun, the door opens
now and then). Each is deterministic in the wall clock, the seed and the device's name."""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from modules.home_sensors.drivers.analog import Analog
from modules.home_sensors.drivers.base import OFF, ON, on_off
from modules.home_sensors.drivers.contact import Contact
from modules.home_sensors.drivers.cpu import CpuTemperature
from modules.home_sensors.drivers.dimmer import Dimmer
from modules.home_sensors.drivers.distance import Distance
from modules.home_sensors.drivers.ds18b20 import DS18B20
from modules.home_sensors.drivers.motion import Motion
from modules.home_sensors.drivers.switch import Switch

DAY = 86400.0


class Signal:
    """Noise and events from the clock, the seed and a name: the same inputs, the same values."""

    def __init__(self, seed: int, name: str) -> None:
        self.key = f"{seed}:{name}".encode()

    def unit(self, slot: int) -> float:
        """A value in [0, 1) for one time slot."""
        digest = hashlib.blake2b(self.key + slot.to_bytes(8, "big", signed=True), digest_size=8)
        return int.from_bytes(digest.digest(), "big") / 2**64

    def active(self, now: float, every_s: float, lasts_s: float, chance: float) -> bool:
        """True for `lasts_s` at the start of a slot of `every_s`, in a `chance` of the slots."""
        slot = int(now // every_s)
        return now - slot * every_s < lasts_s and self.unit(slot) < chance

    def noise(self, now: float, every_s: float, size: float) -> float:
        return (self.unit(int(now // every_s)) - 0.5) * 2 * size


def day_phase(now: float) -> float:
    """The local time of day as a fraction (0 = midnight)."""
    local = time.localtime(now)
    return (local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec) / DAY


class SimulatedMixin:
    name: str
    context: Any

    @property
    def signal(self) -> Signal:
        return Signal(self.context.seed, self.name)


class SimulatedContact(SimulatedMixin, Contact):
    def read(self) -> str:
        # Opened for 20 s in about one of every five minutes.
        return on_off(self.signal.active(time.time(), 60, 20, 0.2))


class SimulatedMotion(SimulatedMixin, Motion):
    def read(self) -> str:
        return on_off(self.signal.active(time.time(), 30, 12, 0.25))


class SimulatedDS18B20(SimulatedMixin, DS18B20):
    def read(self) -> float:
        now = time.time()
        base = 20.5 - 1.5 * math.cos(2 * math.pi * (day_phase(now) - 0.15))  # warmest at 15:36
        return round(base + self.signal.noise(now, 30, 0.15), 2)


class SimulatedAnalog(SimulatedMixin, Analog):
    def read(self) -> float:
        now = time.time()
        daylight = max(0.0, math.sin(math.pi * (day_phase(now) - 0.25) * 2))  # 06:00 to 18:00
        reading = 0.02 + 0.9 * daylight + self.signal.noise(now, 10, 0.02)
        return self.percent(min(1.0, max(0.0, reading)))


class SimulatedDistance(SimulatedMixin, Distance):
    def read(self) -> float:
        # A tank that empties over a day and is refilled at midnight.
        now = time.time()
        top = self.options.max_distance_m * 100
        return round(10 + (top - 20) * day_phase(now) + self.signal.noise(now, 10, 0.5), 1)


class SimulatedCpuTemperature(SimulatedMixin, CpuTemperature):
    def read(self) -> float:
        now = time.time()
        return round(48 + 4 * math.sin(2 * math.pi * now / 600) + self.signal.noise(now, 5, 0.5), 1)


class SimulatedSwitch(Switch):
    def __init__(self, name: str, options: Any, context: Any) -> None:
        super().__init__(name, options, context)
        self.state = on_off(options.initial)

    def read(self) -> str:
        return self.state

    def write(self, value: str) -> str:
        self.state = ON if self.wanted(value) else OFF
        return self.state


class SimulatedDimmer(Dimmer):
    def __init__(self, name: str, options: Any, context: Any) -> None:
        super().__init__(name, options, context)
        self.brightness = 0

    def read(self) -> int:
        return self.brightness

    def write(self, value: str | int) -> int:
        self.brightness = self.level(value)
        return self.brightness
