"""The Mosquitto transport against the real broker: metadata, acks, redelivery, replies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

from appliance.bus import Filter
from appliance.bus.payloads import CommandReply
from appliance.logging import request_id
from tests.helpers import TestBroker, unique_topic


async def test_metadata_travels_as_user_properties(broker: TestBroker) -> None:
    topic = unique_topic()
    sub, pub = broker.bus(name="sub"), broker.bus(name="pub")
    await sub.connect()
    await pub.connect()
    try:
        await sub.subscribe([(Filter(topic), 1)])
        token = request_id.set("trace-123")
        try:
            await pub.publish(topic, b'{"a": 1}', qos=1, wait=True)
        finally:
            request_id.reset(token)
        (message,) = await sub.receive(10, timeout=5)
        assert message.payload == b'{"a": 1}'
        assert (message.request_id, message.sender) == ("trace-123", "pub")
        assert message.sent_at and message.sent_at.endswith("+00:00")
        await pub.publish(topic, b"x")
        (second,) = await sub.receive(10, timeout=5)
        assert second.request_id and second.request_id != "trace-123"  # created at the edge
    finally:
        await sub.close()
        await pub.close()


async def test_retained_message_reaches_a_late_subscriber(broker: TestBroker) -> None:
    topic = unique_topic()
    pub = broker.bus(name="pub")
    await pub.connect()
    await pub.publish(topic, b"kept", qos=1, retain=True, wait=True)
    sub = broker.bus(name="late")
    await sub.connect()
    await sub.subscribe([(Filter(topic), 1)])
    (message,) = await sub.receive(1, timeout=5)
    assert message.retain and message.payload == b"kept"
    await pub.publish(topic, b"", qos=1, retain=True, wait=True)  # clear it
    await pub.close()
    await sub.close()


CONSUMER = textwrap.dedent("""
    import asyncio, os, sys
    from appliance.bus import BrokerAddress, Filter, MqttBus
    async def main():
        port, password, topic, n, ack = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        bus = MqttBus("consumer", BrokerAddress("127.0.0.1", int(port), "tester", password),
                      client_id="tester-consumer", status=False, persistent=True)
        await bus.connect()
        await bus.subscribe([(Filter(topic), 1)])
        print("READY", flush=True)
        seen = []
        while len(seen) < n:
            for m in await bus.receive(100, timeout=10):
                seen.append(m.payload.decode())
                if ack == "ack":
                    bus.ack(m)
        print(",".join(sorted(set(seen), key=int)), flush=True)
        if ack == "ack":
            await bus.close()
        else:
            os._exit(0)  # killed mid-handling: nothing was acknowledged
    asyncio.run(main())
""")


def consume(broker: TestBroker, topic: str, n: int, ack: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", CONSUMER, str(broker.port),
                             broker.password("tester"), topic, str(n), ack],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout and proc.stdout.readline().strip() == "READY"
    return proc


async def test_unacknowledged_messages_are_redelivered_after_a_crash(broker: TestBroker) -> None:
    topic = unique_topic()
    n = 500
    first = await asyncio.to_thread(consume, broker, topic, n, "no-ack")
    pub = broker.bus(name="pub")
    await pub.connect()
    for i in range(n):
        await pub.publish(topic, str(i).encode(), qos=1, wait=i == n - 1)
    everything = [str(i) for i in range(n)]
    out, _ = await asyncio.to_thread(first.communicate, timeout=30)
    assert out.strip().split(",") == everything
    second = await asyncio.to_thread(consume, broker, topic, n, "ack")
    out, _ = await asyncio.to_thread(second.communicate, timeout=30)
    assert out.strip().split(",") == everything  # all 500 again: none had been acknowledged
    await pub.close()


async def test_request_reply(broker: TestBroker) -> None:
    responder = broker.bus(name="responder")
    asker = broker.bus(name="asker")
    await responder.connect()
    await asker.connect()
    cmd = Filter("circles/responder/cmd/+")
    await responder.subscribe([(cmd, 1)])

    async def answer() -> None:
        (message,) = await responder.receive(1, timeout=5)
        await responder.reply(message, CommandReply(ok=True, result={"echo": message.text}))
        responder.ack(message)

    task = asyncio.create_task(answer())
    reply = await asyncio.wait_for(asker.request("responder", "echo", {"x": 1}, timeout=5), 6)
    await task
    assert reply.ok and reply.result == {"echo": '{"by":null,"x":1}'}
    await responder.close()
    await asker.close()


async def test_request_times_out_with_a_clear_error(broker: TestBroker) -> None:
    from appliance.errors import TemporaryError

    asker = broker.bus(name="asker")
    await asker.connect()
    try:
        await asker.request("nobody-home", "ping", timeout=0.5)
    except TemporaryError as exc:
        assert "nobody-home did not answer ping" in str(exc)
    else:
        raise AssertionError("expected a timeout")
    finally:
        await asker.close()
