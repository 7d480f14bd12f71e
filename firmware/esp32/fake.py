"""A sensor without hardware, for development on the unix port and for tests: reading n
(from 0) gives start + n * step, so every value can be traced to the reading that made it.
Config: {"kind": "fake", "entity": "count", "name": "Count", "unit": null,
"device_class": null, "start": 0, "step": 1, "fail": false}; "fail": true makes every read
raise, as a broken probe would."""

from sensors import Channel, Sensor, entity_for


class FakeSensor(Sensor):
    def __init__(self, spec):
        self.entity = entity_for(spec, "fake")
        self.channels = (Channel(self.entity, spec.get("name") or self.entity, spec.get("unit"),
                                 spec.get("device_class")),)
        self.start = spec.get("start", 0)
        self.step = spec.get("step", 1)
        self.fail = bool(spec.get("fail", False))
        self.n = 0

    def read(self):
        if self.fail:
            raise OSError(f"fake sensor {self.entity} set to fail")
        value = self.start + self.n * self.step
        self.n += 1
        if isinstance(value, float):
            value = round(value, 6)  # 20.1 rather than 20.099999999999998
        return {self.entity: value}
