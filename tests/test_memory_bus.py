"""The in-memory bus and the runtime's message handling, without a broker."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from appliance.bus import Filter, MemoryBroker, MemoryBus, Received, registry
from appliance.bus.payloads import CommandRequest, DeadLetter, HomeState
from appliance.config import CoreSettings
from appliance.errors import TemporaryError
from appliance.runtime import Runner, Service, subscribe


async def connected(broker: MemoryBroker, name: str, *filters: str) -> MemoryBus:
    bus = MemoryBus(name, broker)
    await bus.connect()
    if filters:
        await bus.subscribe([(Filter(f), 1) for f in filters])
    return bus


async def test_wildcards_retained_and_metadata() -> None:
    broker = MemoryBroker()
    pub = await connected(broker, "pub")
    await pub.send(registry.HOME_STATE, HomeState(value=1), device="a", entity="t")
    sub = await connected(broker, "sub", "circles/home/+/+/state")
    (retained,) = await sub.receive(10, timeout=1)
    assert retained.topic == "circles/home/a/t/state" and retained.sender == "pub"
    await pub.publish("circles/other", b"x")
    assert await sub.receive(10, timeout=0.05) == []


async def test_last_will_and_redelivery_of_unacked() -> None:
    broker = MemoryBroker()
    watch = await connected(broker, "watch", "circles/+/status")
    svc = await connected(broker, "svc", "circles/svc/cmd/+")
    await svc.announce_online()
    await watch.publish("circles/svc/cmd/ping", b"{}")
    (first,) = await svc.receive(1, timeout=1)
    svc.crash()
    statuses = [m.payload for m in await watch.receive(10, timeout=1)]
    assert statuses == [b"online", b"offline"]
    await svc.restart()
    (again,) = await svc.receive(1, timeout=1)
    assert again.payload == first.payload
    svc.ack(again)
    assert svc.unacked == {}


async def test_request_reply_in_memory() -> None:
    broker = MemoryBroker()
    server = await connected(broker, "srv", "circles/srv/cmd/+")
    client = await connected(broker, "cli")

    async def serve() -> None:
        from appliance.bus.payloads import CommandReply

        (message,) = await server.receive(1, timeout=1)
        await server.reply(message, CommandReply(ok=True, result=42))

    task = asyncio.create_task(serve())
    reply = await client.request("srv", "answer", timeout=1)
    await task
    assert reply.ok and reply.result == 42


class Recorder(Service):
    name = "recorder"

    async def start(self) -> None:
        self.seen: list[Any] = []
        self.batches: list[int] = []
        self.fail_once = True

    @subscribe(registry.HOME_STATE, device="box")
    async def on_state(self, msg: Received) -> None:
        if msg.data is None:  # the retained state was deleted
            self.seen.append((msg.params["entity"], None))
            return
        if msg.data.value == "explode":
            raise RuntimeError("cannot handle this one")
        self.seen.append((msg.params["entity"], msg.data.value))

    @subscribe(registry.HOME_STATE, batch=True, device="batch")
    async def on_batch(self, items: list[Received]) -> None:
        if self.fail_once:
            self.fail_once = False
            raise TemporaryError("database locked")
        if any(i.data.value == "poison" for i in items):
            raise ValueError("poison in batch")
        self.batches.append(len(items))

    @subscribe(registry.TRADE_ACK)
    async def on_ack(self, msg: Received) -> None:
        self.seen.append(("ack", msg.data))

    async def cmd_add(self, request: CommandRequest) -> int:
        return int(request.model_extra["a"]) + int(request.model_extra["b"])  # type: ignore[index]


async def make_runner(watchdog_s: float | None = None) -> tuple[Recorder, Runner, MemoryBus, MemoryBus]:
    broker = MemoryBroker()
    bus = MemoryBus("recorder", broker)
    service = Recorder(CoreSettings(), bus)
    runner = Runner(service, bus, watchdog_s=watchdog_s)
    await bus.connect()
    await service.start()
    await bus.subscribe(runner.filters())
    tester = await connected(broker, "tester", "circles/dlq/#")
    return service, runner, bus, tester


async def test_runner_validates_dispatches_dead_letters_and_acks() -> None:
    service, runner, bus, tester = await make_runner()
    state = registry.HOME_STATE
    await tester.publish(str(state.topic(device="box", entity="t")), b'{"value": 1}')
    await tester.publish(str(state.topic(device="box", entity="t")), b'{"valu": 1}')
    await tester.publish(str(state.topic(device="box", entity="u")), b'{"value": "explode"}')
    await tester.publish(str(state.topic(device="box", entity="v")), b'{"value": 2}')
    await runner.handle(await bus.receive(10, timeout=1))
    assert service.seen == [("t", 1), ("v", 2)]  # the bad ones did not stop the others
    letters = [DeadLetter.model_validate_json(m.payload) for m in await tester.receive(10, 1)]
    assert [("value" in d.reason, d.topic.split("/")[3]) for d in letters] == [(True, "t"), (False, "u")]
    assert "RuntimeError: cannot handle this one" in letters[1].reason
    assert bus.unacked == {}


async def test_an_empty_retained_payload_is_a_deletion_not_a_dead_letter() -> None:
    """MQTT deletes a retained message with an empty one: the handler of a retained topic
    gets data None. On a topic that is not retained an empty payload is still invalid."""
    service, runner, bus, tester = await make_runner()
    state = str(registry.HOME_STATE.topic(device="box", entity="t"))
    ack = str(registry.TRADE_ACK.topic(account="a"))
    await tester.publish(state, b'{"value": 1}', retain=True)
    await tester.publish(state, b"", retain=True)
    await tester.publish(ack, b"")
    await runner.handle(await bus.receive(10, timeout=1))
    assert service.seen == [("t", 1), ("t", None)]
    letters = [DeadLetter.model_validate_json(m.payload) for m in await tester.receive(10, 1)]
    assert [d.topic for d in letters] == [ack]
    assert bus.unacked == {} and state not in bus.broker.retained


async def test_batch_handler_retries_temporary_errors_and_isolates_poison() -> None:
    service, runner, bus, tester = await make_runner()
    topic = str(registry.HOME_STATE.topic(device="batch", entity="x"))
    for value in ("1", "2", '"poison"', "3"):
        await tester.publish(topic, b'{"value": %s}' % value.encode())
    await runner.handle(await bus.receive(10, timeout=1))
    assert service.batches == [1, 1, 1]  # retried, then split to find the poison
    (letter,) = await tester.receive(10, timeout=1)
    assert "poison in batch" in DeadLetter.model_validate_json(letter.payload).reason
    assert bus.unacked == {}


async def test_commands_reply_with_result_or_error() -> None:
    service, runner, bus, tester = await make_runner()
    task = asyncio.create_task(tester.request("recorder", "add", {"a": 2, "b": 3}, timeout=2))
    await asyncio.sleep(0.01)
    await runner.handle(await bus.receive(10, timeout=1))
    assert (await task).result == 5
    task = asyncio.create_task(tester.request("recorder", "nope", timeout=2))
    await asyncio.sleep(0.01)
    await runner.handle(await bus.receive(10, timeout=1))
    reply = await task
    assert not reply.ok and "unknown command" in (reply.error or "")


async def test_watchdog_pings_only_while_the_receive_loop_turns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    service, runner, bus, tester = await make_runner(watchdog_s=0.1)
    block = asyncio.Event()

    async def stuck(msg: Received) -> None:
        await block.wait()

    loop = asyncio.create_task(runner.receive_loop())
    dog = asyncio.create_task(runner.watchdog())
    await asyncio.sleep(0.35)
    pings = drain(sock)
    assert pings.count("WATCHDOG=1") >= 2
    service.on_state = stuck  # type: ignore[method-assign]
    runner.routes = [(f, s, b, stuck if h is not None else None) for f, s, b, h in runner.routes]
    await tester.publish(str(registry.HOME_STATE.topic(device="box", entity="t")), b'{"value": 1}')
    await asyncio.sleep(0.2)
    drain(sock)
    await asyncio.sleep(0.5)
    assert "WATCHDOG=1" not in drain(sock)
    block.set()
    runner.stopping.set()
    await asyncio.gather(loop, dog)
    sock.close()
    assert os.environ["NOTIFY_SOCKET"] == str(path)


def drain(sock: socket.socket) -> list[str]:
    lines = []
    while True:
        try:
            lines += sock.recv(4096).decode().splitlines()
        except BlockingIOError:
            return lines


async def test_messages_is_one_async_iterator() -> None:
    broker = MemoryBroker()
    sub = await connected(broker, "sub", "circles/x/#")
    pub = await connected(broker, "pub")
    for i in range(3):
        await pub.publish(f"circles/x/{i}", str(i).encode())
    got = []
    async for message in sub.messages():
        got.append(message.payload)
        sub.ack(message)
        if len(got) == 3:
            await sub.close()
    assert got == [b"0", b"1", b"2"] and sub.unacked == {}


async def test_unsendable_reply_is_dead_lettered_not_fatal() -> None:
    service, runner, bus, tester = await make_runner()
    await tester.publish("circles/recorder/cmd/ping", b"{}", response_topic="circles/reply/+/x")
    await runner.handle(await bus.receive(10, timeout=1))
    (letter,) = await tester.receive(10, timeout=1)
    assert "cannot reply" in DeadLetter.model_validate_json(letter.payload).reason
    assert bus.unacked == {}


async def test_a_request_survives_seeing_its_own_command() -> None:
    """A client that also receives the command topics it sends on still gets its reply."""
    broker = MemoryBroker()
    server = await connected(broker, "srv", "circles/srv/cmd/+")
    nosy = await connected(broker, "nosy", "circles/+/cmd/+")

    async def serve() -> None:
        from appliance.bus.payloads import CommandReply

        (message,) = await server.receive(1, timeout=1)
        await server.reply(message, CommandReply(ok=True, result="pong"))

    task = asyncio.create_task(serve())
    reply = await nosy.request("srv", "ping", timeout=1)
    await task
    assert reply.result == "pong"
    (own,) = await nosy.receive(10, timeout=0.1)
    assert own.topic == "circles/srv/cmd/ping"
