"""DHT22 (AM2302) temperature and humidity sensor (`dht` from MicroPython's firmware).
Config: {"kind": "dht22", "pin": 13, "entity": "porch"} gives the entities `porch_temperature`
and `porch_humidity` (`temperature` and `humidity` without "entity"). The sensor needs two
seconds between reads, so interval_s must be at least 2."""

from config import ConfigError
from sensors import Channel, Sensor, entity_for


class DHT22(Sensor):
    def __init__(self, spec):
        import dht
        import machine

        if "pin" not in spec:
            raise ConfigError("a dht22 sensor needs a \"pin\" (the GPIO of its data line)")
        self.dht = dht.DHT22(machine.Pin(spec["pin"]))
        prefix = spec.get("entity")
        self.temperature = entity_for({}, prefix + "_temperature" if prefix else "temperature")
        self.humidity = entity_for({}, prefix + "_humidity" if prefix else "humidity")
        label = spec.get("name")
        self.channels = (
            Channel(self.temperature, (label + " temperature") if label else "Temperature", "°C",
                    "temperature"),
            Channel(self.humidity, (label + " humidity") if label else "Humidity", "%", "humidity"),
        )

    def read(self):
        self.dht.measure()  # OSError on a timeout or checksum error
        return {self.temperature: round(self.dht.temperature(), 1),
                self.humidity: round(self.dht.humidity(), 1)}
