"""The node's Wi-Fi station. `up()` never blocks for long: it starts a connection and
reports later whether it came up, retrying with backoff, so readings go on meanwhile.
Without MicroPython's `network` module (the unix port) the host's own network is used."""

import time

import log
from backoff import Backoff
from config import ConfigError

_ATTEMPT_MS = 20000  # how long one association may take before it counts as failed


class Wifi:
    def __init__(self, cfg):
        try:
            import network
        except ImportError:
            self.sta = None
            return
        wifi = cfg["wifi"]
        if not wifi:
            raise ConfigError('config.json has no "wifi": add {"wifi": {"ssid": "...", '
                              '"password": "..."}} (see firmware/README.md)')
        self.ssid = wifi["ssid"]
        self.password = wifi.get("password") or ""
        try:
            network.hostname(cfg["device"])  # how the node shows up in the router's list
        except (AttributeError, ValueError, OSError):
            pass
        self.sta = network.WLAN(network.STA_IF)
        self.sta.active(True)
        self.backoff = Backoff(1000, cfg["backoff_max_s"] * 1000)
        self.started = None
        self.was_up = False

    def up(self):
        """True when the node is on the network."""
        if self.sta is None:
            return True
        if self.sta.isconnected():
            if not self.was_up:
                self.was_up = True
                self.started = None
                self.backoff.reset()
                address = self.sta.ifconfig()[0]
                log.info(f"Wi-Fi up: {address}")
            return True
        if self.was_up:
            self.was_up = False
            log.warn("Wi-Fi lost")
        if self.started is not None:
            if time.ticks_diff(time.ticks_ms(), self.started) < _ATTEMPT_MS:
                return False
            self.started = None
            wait = self.backoff.failed()
            log.warn(f"Wi-Fi {self.ssid!r} did not connect; next try in {wait // 1000} s")
            try:
                self.sta.disconnect()
            except OSError:
                pass
        if self.backoff.due():
            log.info(f"Wi-Fi: connecting to {self.ssid!r}")
            try:
                self.sta.connect(self.ssid, self.password)
                self.started = time.ticks_ms()
            except OSError as exc:
                wait = self.backoff.failed()
                log.warn(f"Wi-Fi connect failed ({exc}); next try in {wait // 1000} s")
        return False
