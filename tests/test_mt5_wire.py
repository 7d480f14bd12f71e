"""The MQTT 3.1.1 codec the MT5 simulator shares with the expert advisor: the packet test
vectors of docs/mt5_protocol.md and of the EA's include file, the remaining-length varint,
and the client against the real broker with a real mt5 device's credentials."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance import services
from appliance.bus import mqtt311 as m
from appliance.bus import registry
from appliance.mt5_sim import commands_filter
from appliance.security.devices import Device, Devices
from appliance.security.secrets import SecretStore
from tests.helpers import Collector, TestBroker

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "mt5_protocol.md"
MQH = ROOT / "modules" / "mt5_bridge" / "mql5" / "CirclesBridge.mqh"
MQH_VECTOR = re.compile(r"^// VECTOR ([a-z0-9_]+): ([0-9a-f ]+)$", re.M)
DOC_ROW = re.compile(r"^\| `([a-z0-9_]+)` \| [^\n]*? \| `([0-9a-f ]+)` \|$", re.M)

WILL = m.Will("circles/mt5/demo/status", b"offline", qos=1, retain=True)
DEAL_TOPIC, TICKET_7 = "circles/mt5/demo/deal", b'{"ticket":7}'
# What the EA sends, built from each row's description; the rows marked "(read)" are decoded.
SENT = {
    "connect": m.encode_connect("circles-ea-demo", username="demo", password="secret",
                                will=WILL, keepalive=60, clean_session=True),
    "publish_qos1": m.encode_publish(DEAL_TOPIC, TICKET_7, qos=1, packet_id=1),
    "publish_qos1_dup": m.encode_publish(DEAL_TOPIC, TICKET_7, qos=1, packet_id=1, dup=True),
    "publish_retained_qos1": m.encode_publish("circles/mt5/demo/status", b"online", qos=1,
                                              retain=True, packet_id=2),
    "publish_qos0": m.encode_publish("circles/mt5/demo/heartbeat", b"{}"),
    "publish_long_head": m.encode_publish(DEAL_TOPIC, b"x" * 175, qos=1, packet_id=9)[:30],
    "puback": m.encode_puback(1),
    "subscribe": m.encode_subscribe(3, [("circles/mt5/demo/ack", 1),
                                        ("circles/mt5/demo/cmd/#", 1),
                                        ("circles/trading/halt", 1)]),
    "pingreq": m.encode_pingreq(),
    "disconnect": m.encode_disconnect(),
}
READ = {"connack_accepted": m.Connack(session_present=False, return_code=0),
        "suback": m.Suback(packet_id=3, granted=(1, 1, 1)),
        "pingresp": m.Pingresp()}


def doc_vectors() -> dict[str, bytes]:
    section = DOC.read_text(encoding="utf-8").split("## Packet test vectors", 1)[1]
    rows = DOC_ROW.findall(section)
    assert len(rows) == len({name for name, _ in rows}), "a vector name appears twice in the doc"
    return {name: bytes.fromhex(hex_) for name, hex_ in rows}


def mqh_vectors() -> dict[str, bytes]:
    if not MQH.is_file():
        pytest.fail(f"{MQH.relative_to(ROOT)} is missing: the EA's include file must carry the "
                    "packet test vectors as `// VECTOR <name>: <hex>` lines", pytrace=False)
    rows = MQH_VECTOR.findall(MQH.read_text(encoding="utf-8", errors="replace"))
    assert len(rows) == len({name for name, _ in rows}), "a vector name appears twice in the .mqh"
    return {name: bytes.fromhex(hex_) for name, hex_ in rows}


def test_the_doc_has_the_thirteen_vectors_and_every_one_is_checked() -> None:
    vectors = doc_vectors()
    assert len(vectors) == 13
    assert set(vectors) == set(SENT) | set(READ)


@pytest.mark.parametrize("name", sorted(SENT))
def test_the_encoder_writes_the_doc_vector(name: str) -> None:
    assert SENT[name].hex(" ") == doc_vectors()[name].hex(" ")


def test_the_include_file_carries_the_same_vectors_as_the_doc() -> None:
    assert mqh_vectors() == doc_vectors()


@pytest.mark.parametrize("name", sorted(SENT))
def test_the_encoder_writes_the_include_file_vector(name: str) -> None:
    vectors = mqh_vectors()
    assert name in vectors, f"no `// VECTOR {name}:` line in {MQH.name}"
    assert SENT[name].hex(" ") == vectors[name].hex(" ")


def test_the_decoder_reads_the_vectors() -> None:
    vectors = doc_vectors()
    for name, packet in READ.items():
        assert m.decode(vectors[name]) == packet, name
    deal = m.Publish(DEAL_TOPIC, TICKET_7, qos=1, packet_id=1)
    assert m.decode(vectors["publish_qos1"]) == deal
    assert m.decode(vectors["publish_qos1_dup"]) == m.Publish(DEAL_TOPIC, TICKET_7, qos=1,
                                                              dup=True, packet_id=1)
    assert m.decode(vectors["publish_retained_qos1"]) == m.Publish(
        "circles/mt5/demo/status", b"online", qos=1, retain=True, packet_id=2)
    assert m.decode(vectors["publish_qos0"]) == m.Publish("circles/mt5/demo/heartbeat", b"{}")
    assert m.decode(vectors["puback"]) == m.Puback(1)
    long = m.encode_publish(DEAL_TOPIC, b"x" * 175, qos=1, packet_id=9)
    assert long[:30] == vectors["publish_long_head"] and len(long) == 203
    assert m.decode(long) == m.Publish(DEAL_TOPIC, b"x" * 175, qos=1, packet_id=9)


# The remaining length at the boundaries of its byte counts (MQTT 3.1.1, table 2.4).
BOUNDARIES = [(0, "00"), (127, "7f"), (128, "80 01"), (16383, "ff 7f"), (16384, "80 80 01"),
              (2097151, "ff ff 7f"), (2097152, "80 80 80 01"), (268435455, "ff ff ff 7f")]


@pytest.mark.parametrize(("value", "encoded"), BOUNDARIES)
def test_the_remaining_length_round_trips_at_its_boundaries(value: int, encoded: str) -> None:
    data = m.encode_length(value)
    assert data.hex(" ") == encoded
    assert m.decode_length(b"\x30" + data + b"rest", 1) == (value, 1 + len(data))


def test_a_remaining_length_beyond_four_bytes_is_refused() -> None:
    with pytest.raises(ValueError):
        m.encode_length(268435456)
    with pytest.raises(ValueError):
        m.encode_length(-1)
    with pytest.raises(m.MalformedPacket):
        m.decode_length(bytes.fromhex("ff ff ff ff 01"))
    with pytest.raises(m.MalformedPacket):
        m.decode_length(bytes.fromhex("ff ff"))  # cut short


def test_malformed_packets_are_refused() -> None:
    for hex_ in ("20 03 00 00",  # a length that does not match the bytes
                 "22 02 00 00",  # CONNACK with reserved flags set
                 "36 05 00 01 61 00 01",  # PUBLISH with QoS 3
                 "10 00",  # CONNECT: a broker never sends one
                 "90 02 00 03"):  # SUBACK without a grant
        with pytest.raises(m.MalformedPacket):
            m.decode(bytes.fromhex(hex_))
    with pytest.raises(ValueError):
        m.encode_publish("circles/mt5/+/deal", b"", qos=0)
    with pytest.raises(ValueError):
        m.encode_publish(DEAL_TOPIC, b"", qos=0, dup=True)
    with pytest.raises(ValueError):
        m.encode_publish(DEAL_TOPIC, b"", qos=1)  # no packet id


# -- against the real broker -------------------------------------------------------------------
async def add_ea_device(broker: TestBroker) -> Device:
    """A new mt5 device in `broker`, as `circles device add <name> --kind mt5` makes it."""
    admin = await broker.admin()
    try:
        devices = Devices(admin, SecretStore.open(broker.state), None,
                          reserved=set(services.names()))
        return await devices.add(f"ea-{uuid.uuid4().hex[:8]}", "mt5", actor="cli:test")
    finally:
        await admin.close()


@pytest.fixture
async def ea(broker: TestBroker) -> AsyncIterator[Device]:
    yield await add_ea_device(broker)


def _client(broker: TestBroker, device: Device, password: str | None = None) -> m.Client:
    status = str(registry.MT5_STATUS.topic(account=device.name))
    return m.Client(m.Address("127.0.0.1", broker.port, device.name,
                              password if password is not None else device.password),
                    f"circles-ea-{device.name}", will=m.Will(status, b"offline"), keepalive=60)


async def test_the_codec_talks_to_mosquitto_with_a_device_s_credentials(
        broker: TestBroker, ea: Device) -> None:
    account = ea.name
    deal_topic = str(registry.MT5_DEAL.topic(account=account))
    ack_topic = str(registry.MT5_ACK.topic(account=account))
    watch = await Collector.start(broker, deal_topic)
    client = _client(broker, ea)
    try:
        assert await client.connect() == m.Connack(session_present=False, return_code=0)
        granted = await client.subscribe([(ack_topic, 1),
                                          (commands_filter(account), 1),
                                          (str(registry.TRADING_HALT.topic()), 1)])
        assert granted == (1, 1, 1)
        packet_id = await client.publish(deal_topic, b'{"ticket": 7}', qos=1, wait=True)
        assert packet_id >= 1  # returned after the broker's PUBACK
        await watch.wait(lambda ms: [x for x in ms if x.payload == b'{"ticket": 7}'], 10,
                         "the deal at a subscriber")
        await client.ping()
        assert await client.publish(deal_topic, b"{}", qos=0) == 0
        # The box answers on the ack topic with QoS 1: the client receives it (and PUBACKs).
        await watch.bus.publish(ack_topic, b'{"accepted": [7]}', qos=1, wait=True)
        async for received in client.messages():  # past a halt retained by earlier tests
            if received.topic == ack_topic:
                break
        assert (received.topic, received.payload, received.qos) == (ack_topic,
                                                                      b'{"accepted": [7]}', 1)
        await client.ping()  # still connected after its PUBACK
        # Another account's topics are not this device's.
        with pytest.raises(m.AuthError):
            await client.subscribe([(str(registry.MT5_ACK.topic(account="someone-else")), 1)])
    finally:
        await client.disconnect()
        await watch.close()
    assert await client.wait_closed() is None


async def test_a_wrong_password_is_an_auth_error(broker: TestBroker, ea: Device) -> None:
    with pytest.raises(m.AuthError):
        await _client(broker, ea, password="not-" + (ea.password or "")).connect()


async def test_a_dropped_connection_leaves_the_will_offline_and_retained(
        broker: TestBroker, ea: Device) -> None:
    status = str(registry.MT5_STATUS.topic(account=ea.name))
    client = _client(broker, ea)
    await client.connect()
    await client.publish(status, "online", qos=1, retain=True, wait=True)
    await client.abort()
    assert isinstance(await client.wait_closed(), m.ConnectionLost)
    watch = await Collector.start(broker, status)  # after the fact: the retained value
    try:
        await watch.wait(lambda ms: ms and ms[-1].payload == b"offline" and ms[-1].retain, 10,
                         "the will, retained")
    finally:
        await watch.close()


class _Silent(m.Client):
    """A client that never pings: the broker must drop it."""

    async def _keep_alive(self) -> None:
        return


async def test_an_idle_client_stays_connected_by_its_pings(broker: TestBroker, ea: Device) -> None:
    """Mosquitto drops a client that sends nothing for 1.5 keep alives (a silent one shows
    when); the client pings when it has sent nothing for half of one."""
    address = m.Address("127.0.0.1", broker.port, ea.name, ea.password)
    client = m.Client(address, f"circles-ea-{ea.name}", keepalive=2)
    silent = _Silent(address, f"silent-{ea.name}", keepalive=2)
    await client.connect()
    await silent.connect()
    try:
        assert isinstance(await asyncio.wait_for(silent.wait_closed(), 30), m.ConnectionLost)
        assert client.connected
        await client.ping()
    finally:
        await client.disconnect()
        await silent.disconnect()
