"""Readings of the box itself; blocking, so the service runs them in a thread."""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from appliance.bus.payloads import HealthState, ServiceState

_TIME_ERROR = 5  # adjtimex(): the clock is not synchronised
_STA_UNSYNC = 0x0040
_TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")


class _Timex(ctypes.Structure):
    # The leading fields of struct timex; the padding covers the rest of it.
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("_rest", ctypes.c_byte * 256)]


def clock_synchronized() -> bool | None:
    """The kernel's view (what timedatectl's NTPSynchronized reports): adjtimex() says
    whether an NTP client disciplines the clock. None when it cannot be asked."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        timex = _Timex()
        state = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return _TIMESYNCD_FLAG.exists() or None
    if state < 0:
        return _TIMESYNCD_FLAG.exists() or None
    return state != _TIME_ERROR and not timex.status & _STA_UNSYNC


def cpu_temperature() -> float | None:
    """The CPU's temperature in °C (the Pi's thermal zone, or a coretemp sensor)."""
    reader = getattr(psutil, "sensors_temperatures", None)
    readings = reader() if reader else {}
    for name in ("cpu_thermal", "coretemp", "k10temp", "soc_thermal", "acpitz"):
        if readings.get(name):
            return round(readings[name][0].current, 1)
    zone = Path("/sys/class/thermal/thermal_zone0/temp")
    try:
        return round(int(zone.read_text()) / 1000, 1)
    except (OSError, ValueError):
        return None


def sample(disk_path: Path, services: dict[str, ServiceState]) -> HealthState:
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(disk_path))
    return HealthState(
        ts=datetime.now(UTC).isoformat(timespec="milliseconds"),
        hostname=socket.gethostname(),
        cpu_percent=psutil.cpu_percent(interval=None),
        load=tuple(round(x, 2) for x in psutil.getloadavg()),
        memory_percent=memory.percent,
        memory_used_mb=round((memory.total - memory.available) / 2**20, 1),
        memory_total_mb=round(memory.total / 2**20, 1),
        disk_percent=disk.percent,
        disk_free_gb=round(disk.free / 2**30, 2),
        uptime_s=round(time.time() - psutil.boot_time(), 1),
        cpu_temp_c=cpu_temperature(),
        clock_synchronized=clock_synchronized(),
        services=dict(services),
    )
