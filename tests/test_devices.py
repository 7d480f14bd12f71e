"""Devices in the real broker: `circles device add|remove|list` and what each kind may do
(checked by delivery: Mosquitto drops a denied publish silently)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance import services
from appliance.bus import BrokerAddress, MqttBus, registry
from appliance.bus.admin import client_secret
from appliance.config import CoreSettings
from appliance.errors import AuthError
from appliance.security import audit as events
from appliance.security.audit import AuditLog
from appliance.security.devices import Device, DeviceError, Devices, Endpoint, write_device_file
from appliance.security.secrets import SecretStore, read_secret
from tests.helpers import TestBroker, circles, circles_env, delivered


@pytest.fixture
async def devices(broker: TestBroker) -> AsyncIterator[Devices]:
    admin = await broker.admin()
    settings = CoreSettings(state_dir=broker.state)
    yield Devices(admin, SecretStore.open(broker.state), AuditLog.open(settings),
                  reserved=set(services.names()))
    await admin.close()


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _client(broker: TestBroker, device: Device) -> MqttBus:
    assert device.password
    return MqttBus(device.name, BrokerAddress("127.0.0.1", broker.port, device.name,
                                              device.password, reconnect_max_s=0.5),
                   status=False, persistent=False, client_id=f"{device.name}-{uuid.uuid4().hex[:6]}")


async def test_an_esp32_node_publishes_on_its_own_topics_and_nowhere_else(
        broker: TestBroker, devices: Devices) -> None:
    device = await devices.add(_name("kitchen"), "esp32", actor="cli:test")
    node = _client(broker, device)
    await node.connect()
    try:
        own = str(registry.HOME_STATE.topic(device=device.name, entity="temp"))
        assert await delivered(broker, node, own)
        assert not await delivered(broker, node, str(registry.HOME_STATE.topic(
            device="someone-else", entity="temp")))
        assert not await delivered(broker, node, str(registry.TRADE_EVENT.topic(account="demo")))
        await node.subscribe([(registry.HOME_SET.filter(device=device.name), 1)])
        with pytest.raises(AuthError):
            await node.subscribe([(registry.HOME_SET.filter(device="someone-else"), 1)])
    finally:
        await node.close()
    assert read_secret(client_secret(device.name), broker.state) == device.password


async def test_home_assistant_commands_a_home_entity_but_cannot_send_a_trade(
        broker: TestBroker, devices: Devices) -> None:
    ha = _client(broker, await devices.add(_name("ha"), "homeassistant", actor="cli:test"))
    await ha.connect()
    try:
        assert await delivered(broker, ha, str(registry.HOME_SET.topic(device="kitchen",
                                                                       entity="relay")))
        assert not await delivered(broker, ha, str(registry.TRADE_EVENT.topic(account="demo")))
        assert not await delivered(broker, ha, str(registry.TRADING_HALT.topic()))
    finally:
        await ha.close()


async def test_an_mt5_account_publishes_under_its_own_name_only(
        broker: TestBroker, devices: Devices) -> None:
    ea = _client(broker, await devices.add(_name("ftmo"), "mt5", actor="cli:test"))
    await ea.connect()
    try:
        assert await delivered(broker, ea, f"circles/mt5/{ea.name}/deal")
        assert not await delivered(broker, ea, "circles/mt5/another-account/deal")
        assert not await delivered(broker, ea, str(registry.TRADE_EVENT.topic(account=ea.name)))
    finally:
        await ea.close()


async def test_a_removed_device_is_disconnected_at_once_and_refused_after(
        broker: TestBroker, devices: Devices) -> None:
    device = await devices.add(_name("garage"), "esp32", actor="cli:test")
    node = _client(broker, device)
    await node.connect()
    try:
        assert (device.name, "esp32") in {(d.name, d.kind) for d in await devices.list()}
        await devices.remove(device.name, actor="cli:test")
        for _ in range(40):
            if not node.connected:
                break
            await asyncio.sleep(0.05)
        assert not node.connected
        with pytest.raises(AuthError):
            await _client(broker, device).connect(timeout=5)
    finally:
        await node.close()
    assert device.name not in {d.name for d in await devices.list()}
    assert read_secret(client_secret(device.name), broker.state) is None
    actions = [(e.action, e.details.get("kind")) for e in devices.audit.events(user=device.name)]
    assert actions == [(events.DEVICE_ADD, "esp32"), (events.DEVICE_REMOVE, "esp32")]


async def test_names_that_cannot_be_devices_are_refused(devices: Devices) -> None:
    for bad in ("Kitchen Light", "a/b", "-x", "trade-logger", "broker-admin", "cli", ""):
        with pytest.raises(DeviceError):
            await devices.add(bad, "esp32", actor="cli:test")
    with pytest.raises(DeviceError, match="kind"):
        await devices.add(_name("x"), "toaster", actor="cli:test")
    taken = await devices.add(_name("twice"), "observer", actor="cli:test")
    with pytest.raises(DeviceError, match="already exists"):
        await devices.add(taken.name, "esp32", actor="cli:test")
    with pytest.raises(DeviceError, match="no device"):
        await devices.remove("health", actor="cli:test")  # a service is not a device


async def test_the_cli_writes_the_files_the_devices_read(broker: TestBroker, tmp_path: Path) -> None:
    env = circles_env(broker.state, CIRCLES_BUS__PORT=str(broker.port))
    node, ea = _name("porch"), _name("icmarkets")
    config = tmp_path / "config.json"
    done = await asyncio.to_thread(circles, env, "device", "add", node, "--kind", "esp32",
                                   "--out", str(config), "--host", "127.0.0.1",
                                   "--port", str(broker.port))
    assert done.returncode == 0, done.stderr
    doc = json.loads(config.read_text())
    assert config.stat().st_mode & 0o777 == 0o600
    assert doc["broker"]["password"] not in done.stdout  # in the file, not on the screen
    assert doc["topics"]["set"] == f"circles/home/{node}/{{entity}}/set"
    assert doc["broker"]["tls"] is False and doc["broker"]["ca_cert"] is None
    probe = _client(broker, Device(node, "esp32", doc["broker"]["password"]))
    await probe.connect(timeout=5)
    await probe.close()

    preset = tmp_path / "ea.set"
    done = await asyncio.to_thread(circles, env, "device", "add", ea, "--kind", "mt5", "--out",
                                   str(preset), "--host", "192.168.1.20")
    assert done.returncode == 0, done.stderr
    lines = preset.read_bytes().decode("utf-16").splitlines()
    assert f"InpUsername={ea}" in lines and "InpHost=192.168.1.20" in lines
    assert "InpPort=1883" in lines and "InpTls=false" in lines
    assert f"InpPassword={read_secret(client_secret(ea), broker.state)}" in lines

    observer = _name("watcher")
    refused = await asyncio.to_thread(circles, env, "device", "add", observer, "--kind", "observer",
                                      "--out", str(tmp_path / "o.json"))
    assert refused.returncode == 1 and "--out is for esp32 and mt5" in refused.stderr

    listed = await asyncio.to_thread(circles, env, "device", "list")
    assert f"esp32          {node}" in listed.stdout and f"mt5            {ea}" in listed.stdout
    assert observer not in listed.stdout  # refused before the device was made
    gone = await asyncio.to_thread(circles, env, "device", "remove", ea)
    assert gone.returncode == 0 and "removed" in gone.stdout
    tls = await asyncio.to_thread(circles, env, "device", "add", _name("n"), "--kind", "esp32",
                                  "--out", str(tmp_path / "c.json"), "--tls")
    assert tls.returncode == 1 and "CA certificate" in tls.stderr


def test_a_device_file_replaces_a_symlink_rather_than_writing_through_it(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("not yours\n")
    out = tmp_path / "config.json"
    out.symlink_to(target)
    write_device_file(Device("porch", "esp32", "pw"), Endpoint("127.0.0.1", 1883), out)
    assert target.read_text() == "not yours\n"
    assert not out.is_symlink() and out.stat().st_mode & 0o777 == 0o600
    assert json.loads(out.read_text())["broker"]["password"] == "pw"
