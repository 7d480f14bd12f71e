"""Who may do what, enforced by Mosquitto's dynamic-security plugin (checked by delivery:
Mosquitto drops a denied publish silently)."""

from __future__ import annotations

import asyncio

import pytest

from appliance.bus import BrokerAddress, MqttBus, registry
from appliance.bus.roles import acl_filters
from appliance.errors import AuthError
from tests.helpers import TestBroker, delivered


async def test_anonymous_client_is_refused(broker: TestBroker) -> None:
    bus = MqttBus("anon", BrokerAddress("127.0.0.1", broker.port), status=False, persistent=False)
    with pytest.raises(AuthError):
        await bus.connect(timeout=5)


async def test_wrong_password_is_refused(broker: TestBroker) -> None:
    with pytest.raises(AuthError):
        await broker.bus("health", password="not-the-password").connect(timeout=5)


async def test_service_cannot_publish_under_another_services_prefix(broker: TestBroker) -> None:
    health = broker.bus("health", name="health")
    await health.connect()
    try:
        assert await delivered(broker, health, "circles/health/anything")
        assert not await delivered(broker, health, "circles/other-service/anything")
        assert not await delivered(broker, health, str(registry.DLQ.topic(service="other")))
    finally:
        await health.close()


async def test_service_cannot_subscribe_outside_its_role(broker: TestBroker) -> None:
    health = broker.bus("health", name="health")
    await health.connect()
    try:
        with pytest.raises(AuthError, match="refused"):
            await health.subscribe([(registry.REPLY.filter(service="someone-else"), 1)])
    finally:
        await health.close()


async def test_device_roles_limit_a_device_to_its_own_topics(broker: TestBroker) -> None:
    admin = await broker.admin()
    try:
        await admin.ensure_client("esp32", "kitchen", "kitchen-password-1")
        await admin.ensure_client("homeassistant", "ha", "ha-password-123")
    finally:
        await admin.close()
    node = MqttBus("kitchen", BrokerAddress("127.0.0.1", broker.port, "kitchen",
                                            "kitchen-password-1"), status=False, persistent=False)
    ha = MqttBus("ha", BrokerAddress("127.0.0.1", broker.port, "ha", "ha-password-123"),
                 status=False, persistent=False)
    await node.connect()
    await ha.connect()
    try:
        own = str(registry.HOME_STATE.topic(device="kitchen", entity="temp"))
        other = str(registry.HOME_STATE.topic(device="garage", entity="temp"))
        assert await delivered(broker, node, own)
        assert not await delivered(broker, node, other)
        set_topic = str(registry.HOME_SET.topic(device="kitchen", entity="relay"))
        assert await delivered(broker, ha, set_topic)
        assert not await delivered(broker, ha, "circles/trade/demo/event")
    finally:
        await node.close()
        await ha.close()


async def test_deleted_client_is_disconnected_at_once_and_refused_after(broker: TestBroker) -> None:
    admin = await broker.admin()
    await admin.ensure_client("esp32", "doomed", "doomed-password-1")
    node = MqttBus("doomed", BrokerAddress("127.0.0.1", broker.port, "doomed", "doomed-password-1",
                                           reconnect_max_s=0.5), status=False, persistent=False)
    await node.connect()
    assert node.connected
    try:
        await admin.delete_client("doomed", "esp32")
        for _ in range(40):
            if not node.connected:
                break
            await asyncio.sleep(0.05)
        assert not node.connected
        assert "doomed" not in await admin.list_clients()
        assert "esp32-doomed" not in await admin.list_roles()
        with pytest.raises(AuthError):
            await MqttBus("doomed2", node.address, status=False, persistent=False).connect(timeout=5)
    finally:
        await node.close()
        await admin.close()


async def test_roles_in_the_broker_match_the_registry(broker: TestBroker) -> None:
    admin = await broker.admin()
    try:
        (found,) = await admin.execute({"command": "getRole", "rolename": "service-health"})
        acls = found["data"]["role"]["acls"]
        pubs = sorted(a["topic"] for a in acls if a["acltype"] == "publishClientSend")
        subs = sorted(a["topic"] for a in acls if a["acltype"] == "subscribePattern")
        assert (pubs, subs) == acl_filters("service", "health")
        assert await admin.ensure_role({"rolename": "service-health", "acls": acls}) is False
    finally:
        await admin.close()


async def test_sync_again_does_not_disconnect_running_services(broker: TestBroker) -> None:
    health = broker.bus("health", name="health")
    await health.connect()
    admin = await broker.admin()
    try:
        assert await admin.sync(["health"], broker.state) == []
        await asyncio.sleep(0.3)
        assert health.connected
        assert await admin.password_works("health", broker.password("health"))
        assert not await admin.password_works("health", "wrong-password")
    finally:
        await admin.close()
        await health.close()
