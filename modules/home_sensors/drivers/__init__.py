"""Drivers by hardware and kind: `DRIVERS[hardware][kind]`."""

from __future__ import annotations

from modules.home_sensors.drivers import simulated as sim
from modules.home_sensors.drivers.analog import Analog, GpioAnalog
from modules.home_sensors.drivers.base import Driver
from modules.home_sensors.drivers.contact import Contact, GpioContact
from modules.home_sensors.drivers.cpu import CpuTemperature, GpioCpuTemperature
from modules.home_sensors.drivers.dimmer import Dimmer, GpioDimmer
from modules.home_sensors.drivers.distance import Distance, GpioDistance
from modules.home_sensors.drivers.ds18b20 import DS18B20, W1DS18B20
from modules.home_sensors.drivers.motion import GpioMotion, Motion
from modules.home_sensors.drivers.switch import GpioSwitch, Switch

KINDS: dict[str, type[Driver]] = {k.kind: k for k in (
    Contact, Motion, DS18B20, Analog, Distance, CpuTemperature, Switch, Dimmer)}

DRIVERS: dict[str, dict[str, type[Driver]]] = {
    "gpio": {d.kind: d for d in (GpioContact, GpioMotion, W1DS18B20, GpioAnalog, GpioDistance,
                                 GpioCpuTemperature, GpioSwitch, GpioDimmer)},
    "simulated": {d.kind: d for d in (sim.SimulatedContact, sim.SimulatedMotion,
                                      sim.SimulatedDS18B20, sim.SimulatedAnalog,
                                      sim.SimulatedDistance, sim.SimulatedCpuTemperature,
                                      sim.SimulatedSwitch, sim.SimulatedDimmer)},
}
assert all(set(drivers) == set(KINDS) for drivers in DRIVERS.values())
