"""Wall-clock time for readings: ISO 8601 UTC with milliseconds, or None while the clock is
not set (an ESP32 starts in 2000 and learns the time over NTP once on the network)."""

import time

# Before this year the RTC has not been set: a reading then carries no time at all rather
# than a wrong one.
_FIRST_VALID_YEAR = 2024


def now_iso():
    ns = time.time_ns()
    secs = ns // 1000000000
    t = time.gmtime(secs)
    if t[0] < _FIRST_VALID_YEAR:
        return None
    ms = (ns // 1000000) % 1000
    return f"{t[0]:04d}-{t[1]:02d}-{t[2]:02d}T{t[3]:02d}:{t[4]:02d}:{t[5]:02d}.{ms:03d}+00:00"


def uptime():
    return f"+{time.ticks_ms() / 1000:.3f}s"


def is_set():
    return time.gmtime(time.time_ns() // 1000000000)[0] >= _FIRST_VALID_YEAR


def sync(host):
    """Set the RTC over NTP; False when it could not. Hosts without `ntptime` (the unix port)
    keep their own time."""
    try:
        import ntptime
    except ImportError:
        return is_set()
    try:
        ntptime.host = host
        ntptime.settime()
        return True
    except Exception:  # noqa: BLE001 - a failed sync is retried later, never fatal
        return False
