"""The sensor interface. A driver is one file with one class: it names the entities it
produces (`channels`) and returns their values from `read()`. Hardware modules (`machine`,
`onewire`, `dht`) are imported inside the drivers only, so the node's loop runs wherever
MicroPython does, the unix port included."""

from config import ConfigError, is_slug

# kind in config.json -> (module, class); a driver module is imported only when used.
DRIVERS = {
    "ds18b20": ("ds18b20", "DS18B20"),
    "dht22": ("dht22", "DHT22"),
    "fake": ("fake", "FakeSensor"),
}


class Channel:
    """One entity of a sensor, as it appears on the bus and in Home Assistant."""

    def __init__(self, entity, name, unit=None, device_class=None):
        self.entity = entity
        self.name = name
        self.unit = unit
        self.device_class = device_class


class Sensor:
    """A driver. `read()` returns {entity: value} for its channels and may raise (OSError
    for a bus or timing error); the node logs that and tries again at the next reading."""

    channels = ()

    def read(self):
        raise NotImplementedError

    def command(self, entity, payload):
        """A command arrived on the entity's `set` topic. Sensors have nothing to drive, so
        the default refuses it; an output driver would act and return True."""
        return False


def entity_for(spec, default):
    """The entity name (a topic level) for a channel of `spec`: its `entity` key, or the
    driver's default."""
    entity = spec.get("entity") or default
    if not is_slug(entity):
        raise ConfigError(f"sensor entity {entity!r}: use a-z, 0-9, '-' and '_' (it is a topic level)")
    return entity


def build(specs):
    """The drivers for the `sensors` list of config.json; ConfigError for an unknown kind or
    two channels with the same entity."""
    sensors = []
    seen = set()
    for spec in specs:
        kind = spec["kind"].lower()
        if kind not in DRIVERS:
            known = ", ".join(sorted(DRIVERS))
            raise ConfigError(f"unknown sensor kind {kind!r}; one of {known}")
        module_name, class_name = DRIVERS[kind]
        module = __import__(module_name)
        sensor = getattr(module, class_name)(spec)
        for channel in sensor.channels:
            if channel.entity in seen:
                raise ConfigError(f"two sensors produce the entity {channel.entity!r}: give one an "
                                  f"entity key")
            seen.add(channel.entity)
        sensors.append(sensor)
    return sensors
