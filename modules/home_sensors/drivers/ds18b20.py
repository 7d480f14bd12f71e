"""A DS18B20 1-wire temperature probe, read from the kernel's w1 files
(`<w1_path>/28-…/temperature`, or `w1_slave` on older kernels); `dtoverlay=w1-gpio` in the
Pi's config.txt makes the kernel find it."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from appliance.errors import TemporaryError
from modules.home_sensors.drivers.base import Driver, Options, Shape


class DS18B20Options(Options):
    sensor_id: str | None = Field(None, pattern=r"^28-[0-9a-f]{12}$",
                                  description="the probe's id (28-…); needed with several probes")


class DS18B20(Driver):
    kind = "ds18b20"
    Options = DS18B20Options
    shape = Shape("sensor", "temperature", "°C", "temperature", "measurement")


class W1DS18B20(DS18B20):
    def __init__(self, name: str, options: Any, context: Any) -> None:
        super().__init__(name, options, context)
        probes = sorted(context.w1_path.glob("28-*"))
        if options.sensor_id:
            self.folder = context.w1_path / options.sensor_id
        elif len(probes) == 1:
            self.folder = probes[0]
        else:
            found = ", ".join(p.name for p in probes) or "none"
            raise TemporaryError(f"{name}: set sensor_id; probes under {context.w1_path}: {found}")

    def read(self) -> float:
        simple = self.folder / "temperature"
        try:
            if simple.exists():
                return round(int(simple.read_text().strip()) / 1000, 2)
            lines = (self.folder / "w1_slave").read_text().splitlines()
        except (OSError, ValueError) as exc:
            raise TemporaryError(f"{self.name}: cannot read {self.folder}: {exc}") from None
        # "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES" / "72 01 4b 46 7f ff 0e 10 57 t=23125"
        if len(lines) < 2 or not lines[0].endswith("YES") or "t=" not in lines[1]:
            raise TemporaryError(f"{self.name}: bad reading (CRC) in {self.folder / 'w1_slave'}")
        return round(int(lines[1].rsplit("t=", 1)[1]) / 1000, 2)
