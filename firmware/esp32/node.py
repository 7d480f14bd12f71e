"""The node's main loop: read every sensor each interval, keep each reading (with the time
it was taken) in the ring buffer, and send the buffer to the broker oldest first whenever
the broker is reachable. A reading leaves the node's memory only once the broker has
acknowledged it (QoS 1 PUBACK), so an outage of the Wi-Fi or of the box loses nothing the
buffer can hold."""

import gc
import json
import time

import clock
import discovery
import log
from backoff import Backoff
from mqtt import MQTTClient, MQTTError
from net import Wifi
from ringbuf import RingBuffer

_NTP_EVERY_MS = 6 * 3600 * 1000  # the ESP32's RTC drifts by seconds a day
_STOP_GRACE_MS = 2000  # on a clean stop, how long to spend sending what is left


class Node:
    def __init__(self, cfg, sensors, wifi=None):
        self.cfg = cfg
        self.sensors = sensors
        self.topics = cfg["topics"]
        self.buffer = RingBuffer(cfg["buffer_size"])
        self.interval_ms = int(cfg["interval_s"] * 1000)
        self.next_read = time.ticks_ms()
        self.backoff = Backoff(500, int(cfg["backoff_max_s"] * 1000))
        self.wifi = wifi or Wifi(cfg)
        self.units = {}
        self.owners = {}
        for sensor in sensors:
            for channel in sensor.channels:
                self.units[channel.entity] = channel.unit
                self.owners[channel.entity] = sensor
        b = cfg["broker"]
        # Every wait on the broker (connect, SUBACK, PUBACK) is bounded by its keepalive: a
        # broker that needs longer than that is treated as gone either way.
        self.client = MQTTClient(b["client_id"], b["host"], b["port"], b["username"],
                                 b["password"], b["keepalive_s"], b["tls"], b["ca_cert"],
                                 b["server_hostname"], timeout_s=min(10, b["keepalive_s"]),
                                 retry_ms=b["keepalive_s"] * 500)
        self.client.set_last_will(self.topics["status"], discovery.OFFLINE, retain=True, qos=1)
        self.client.on_message = self._on_message
        self.announce_due = False
        self.synced_at = None
        self.failures = 0  # broker attempts since the last success, for the log
        self.failing = [None] * len(sensors)  # each sensor's last error, to log changes only

    # -- the loop ----------------------------------------------------------------------------
    def run(self):
        """Run until interrupted (Ctrl-C, SIGINT on the unix port); then stop cleanly."""
        b = self.cfg["broker"]
        device, every, tls = self.cfg["device"], self.cfg["interval_s"], " (TLS)" if b["tls"] else ""
        log.info(f"node {device} starting: {len(self.units)} entities, a reading every {every} s, "
                 f"broker {self._broker()}{tls}")
        if not self.units:
            log.warn('no sensors configured: add a "sensors" list to config.json')
        try:
            while True:
                self.step()
        except KeyboardInterrupt:
            self.stop()

    def step(self):
        online = self.wifi.up()
        if online:
            self._sync_clock()
            if not self.client.connected and self.backoff.due():
                self._connect()
        if time.ticks_diff(time.ticks_ms(), self.next_read) >= 0:
            self._read_all()
        if self.client.connected:
            try:
                if self.announce_due:
                    self._announce()
                self._send()
                self.client.poll(self._wait_ms())
            except (OSError, MQTTError) as exc:
                self._lost(exc)
        else:
            time.sleep_ms(min(self._wait_ms(), self.backoff.ms_left() if online else 250))

    def _waiting(self):
        """Readings not yet acknowledged by the broker; the last few may be discovery configs
        or the status, which are in flight the same way."""
        return len(self.buffer) + len(self.client.inflight)

    def _wait_ms(self):
        if len(self.buffer) and self.client.can_publish():
            return 0
        # Capped so keepalive and resends are looked at at least once a second.
        return min(1000, max(0, time.ticks_diff(self.next_read, time.ticks_ms())))

    def stop(self):
        """Send what can be sent within a short grace, say `offline`, and disconnect; when
        the connection is not clean enough for that, drop it and let the broker publish
        the last will (also `offline`)."""
        if self.client.usable:
            try:
                deadline = time.ticks_add(time.ticks_ms(), _STOP_GRACE_MS)
                while (len(self.buffer) or self.client.inflight) and time.ticks_diff(deadline, time.ticks_ms()) > 0:
                    self._send()
                    self.client.poll(50)
                self.client.publish(self.topics["status"], discovery.OFFLINE, qos=1, retain=True)
                deadline = time.ticks_add(time.ticks_ms(), _STOP_GRACE_MS)
                while self.client.inflight and time.ticks_diff(deadline, time.ticks_ms()) > 0:
                    self.client.poll(50)
                self.client.disconnect()
            except (OSError, MQTTError) as exc:
                log.warn(f"clean stop failed ({exc}); the broker publishes the last will")
        self.client.close()
        log.info(f"stopped; {self._waiting()} readings not sent")

    # -- readings ----------------------------------------------------------------------------
    def _read_all(self):
        self.next_read = time.ticks_add(self.next_read, self.interval_ms)
        if time.ticks_diff(self.next_read, time.ticks_ms()) < 0:
            # Far behind (a long TLS handshake, a blocked Wi-Fi call): skip, do not burst.
            self.next_read = time.ticks_add(time.ticks_ms(), self.interval_ms)
        for i, sensor in enumerate(self.sensors):
            names = ", ".join(c.entity for c in sensor.channels)
            try:
                values = sensor.read()
            except Exception as exc:  # noqa: BLE001 - one broken probe must not stop the others
                why = str(exc) or repr(exc)
                if why != self.failing[i]:
                    log.warn(f"reading {names} failed: {why}")
                self.failing[i] = why
                continue
            if self.failing[i] is not None:
                self.failing[i] = None
                log.info(f"reading {names} works again")
            ts = clock.now_iso()
            for entity in values:
                self._keep(entity, values[entity], ts)
        gc.collect()  # readings are small and many: keep the ESP32's heap from fragmenting

    def _keep(self, entity, value, ts):
        if value is None:
            return
        dropped = self.buffer.dropped
        self.buffer.push((entity, value, ts))
        if not self.client.connected:
            log.info(f"kept {entity}={value} for later ({len(self.buffer)} waiting)")
        if self.buffer.dropped != dropped and self.buffer.dropped in (1, 10, 100, 1000, 10000):
            log.warn(f"reading buffer full ({len(self.buffer)}): {self.buffer.dropped} oldest "
                     f"readings dropped so far")

    def _send(self):
        """Hand buffered readings to the client, oldest first, while its in-flight window
        has room; each stays in the client's in-flight list until its PUBACK."""
        while len(self.buffer) and self.client.can_publish():
            entity, value, ts = self.buffer.pop()
            doc = {"value": value, "unit": self.units.get(entity)}
            if ts:
                doc["ts"] = ts
            topic = discovery.fill(self.topics["state"], entity=entity)
            self.client.publish(topic, json.dumps(doc), qos=1, retain=True)

    # -- the broker --------------------------------------------------------------------------
    def _broker(self):
        b = self.cfg["broker"]
        return f"{b['host']}:{b['port']}"

    def _connect(self):
        try:
            self.client.connect()
        except (OSError, MQTTError) as exc:
            self.failures += 1
            wait = self.backoff.failed()
            if self.failures == 1 or wait >= self.backoff.max_ms:
                log.warn(f"cannot connect to the broker {self._broker()} ({exc}); {self._waiting()} "
                         f"readings waiting, next try in {wait / 1000:.1f} s")
            return
        self.backoff.reset()
        self.failures = 0
        log.info(f"connected to {self._broker()}; {self._waiting()} readings to send")
        try:
            self._subscribe()
            self._announce()
            self.client.publish(self.topics["status"], discovery.ONLINE, qos=1, retain=True)
        except (OSError, MQTTError) as exc:
            self._lost(exc)

    def _subscribe(self):
        wanted = [(discovery.fill(self.topics["set"], entity="+"), 1), (self.topics["ha_status"], 1)]
        try:
            self.client.subscribe(wanted)
        except MQTTError as exc:
            if not self.client.connected:
                raise
            # The broker's ACL for this device refuses it: commands and re-announcing are
            # lost, readings are not, so the node keeps going.
            log.error(str(exc))

    def _announce(self):
        self.announce_due = False
        configs = discovery.configs(self.cfg, self.sensors)
        for topic, payload in configs:
            self.client.publish(topic, payload, qos=1, retain=True)
        log.info(f"Home Assistant discovery sent for {len(configs)} entities")

    def _lost(self, exc):
        self.client.close()
        log.warn(f"broker connection lost ({exc}); {self._waiting()} readings waiting")

    def _on_message(self, topic, payload, retained):
        try:
            if topic == self.topics["ha_status"]:
                # A retained `online` is Home Assistant's state from before this connection,
                # and the node announces on every connect anyway; a live one is a restart.
                if payload == discovery.ONLINE.encode() and not retained:
                    self.announce_due = True
                return
            entity = self._entity_of(topic)
            if entity is not None:
                self._command(entity, payload)
        except Exception as exc:  # noqa: BLE001 - a bad message must not stop the readings
            log.error(f"message on {topic} not handled: {exc}")

    def _entity_of(self, topic):
        prefix, _, suffix = self.topics["set"].partition("{entity}")
        if topic.startswith(prefix) and topic.endswith(suffix) and len(topic) > len(prefix) + len(suffix):
            entity = topic[len(prefix):len(topic) - len(suffix)]
            if "/" not in entity:
                return entity
        return None

    def _command(self, entity, payload):
        sensor = self.owners.get(entity)
        if sensor is not None and sensor.command(entity, payload):
            return
        log.info(f"command {payload!r} for {entity} ignored: this node has no outputs")

    def _sync_clock(self):
        now = time.ticks_ms()
        if self.synced_at is not None and time.ticks_diff(now, self.synced_at) < _NTP_EVERY_MS:
            return
        self.synced_at = now
        host = self.cfg["ntp_host"]
        if clock.sync(host):
            log.info(f"clock set: {clock.now_iso()}")
            return
        if clock.is_set():
            log.warn(f"clock not reset over NTP ({host}); it keeps running as it is")
            return
        log.warn(f"clock not set over NTP ({host}); readings carry no time until it is")
        # NTP blocks for up to a second, so not every loop; but a clock never set is worth a
        # try every minute rather than every six hours.
        self.synced_at = time.ticks_add(now, 60000 - _NTP_EVERY_MS)
