"""DS18B20 temperature probe on a 1-Wire bus (`onewire`, `ds18x20` from MicroPython's ESP32
firmware). Config: {"kind": "ds18b20", "pin": 4, "rom": "28ff...", "entity": "temperature",
"name": "Temperature"}; without "rom", the first probe found on the pin."""

import time

from config import ConfigError
from sensors import Channel, Sensor, entity_for

# 85.0 °C is the power-on value of the scratchpad: a probe that lost power mid-conversion
# reports it, so it is treated as a failed read rather than a heat wave.
_POWER_ON = 85.0


class DS18B20(Sensor):
    def __init__(self, spec):
        import ds18x20
        import machine
        import onewire

        if "pin" not in spec:
            raise ConfigError("a ds18b20 sensor needs a \"pin\" (the GPIO of its data line)")
        self.bus = ds18x20.DS18X20(onewire.OneWire(machine.Pin(spec["pin"])))
        self.rom = _rom(spec["rom"]) if spec.get("rom") else None
        self.entity = entity_for(spec, "temperature")
        self.channels = (Channel(self.entity, spec.get("name") or "Temperature", "°C",
                                 "temperature"),)

    def read(self):
        rom = self.rom or self._first_probe()
        self.bus.convert_temp()
        time.sleep_ms(750)  # conversion time at 12-bit resolution
        value = self.bus.read_temp(rom)  # raises on a CRC error
        if value is None or value == _POWER_ON:
            raise OSError("DS18B20 gave no valid temperature")
        return {self.entity: round(value, 2)}

    def _first_probe(self):
        found = self.bus.scan()
        if not found:
            raise OSError("no DS18B20 answers on the bus: check the wiring and the 4.7 kΩ pull-up")
        self.rom = found[0]
        return self.rom


def _rom(text):
    import binascii

    return binascii.unhexlify(text.replace(":", "").replace("-", ""))
