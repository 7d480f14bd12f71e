"""The bus API every service uses, written once over two transports (Mosquitto, in-memory).

A transport implements four primitives (`_send`, `_subscribe`, `_ack`, `connect`/`close`)
and hands received messages to `_deliver`; everything else — typed publishing, the
receive iterator, dead letters, request/reply, availability — lives here.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from appliance.bus import registry
from appliance.bus.message import Message
from appliance.bus.payloads import CommandReply, DeadLetter
from appliance.bus.topics import Filter, Topic, TopicSpec
from appliance.errors import CirclesError, TemporaryError
from appliance.logging import request_id as current_request_id

log = logging.getLogger("circles.bus")
ONLINE, OFFLINE = "online", "offline"


# A request id taken from outside (a client's `X-Request-ID`, a logs filter): what the
# services make (32 hex digits) and what clients commonly send (a uuid, `ea-<hex>`), short
# enough for a log line and free of anything a header, a URL or the journal would mangle.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{8,64}")


def new_request_id() -> str:
    """128 random bits in hex, as a uuid4's hex but cheaper (one is made per bar, say)."""
    return os.urandom(16).hex()


_stamp: tuple[int, str] = (0, "")


def now_stamp() -> str:
    """Now, ISO 8601 UTC with milliseconds: the `sent_at` of a message (formatted once per
    millisecond, however many messages are sent in it)."""
    global _stamp
    ms = time.time_ns() // 1_000_000
    if ms != _stamp[0]:
        _stamp = (ms, datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds"))
    return _stamp[1]


class Bus(Protocol):
    """What services see of the bus."""

    name: str

    async def connect(self) -> None: ...
    async def subscribe(self, filters: Sequence[tuple[Filter, int]]) -> None: ...
    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      response_topic: str | None = None, correlation: bytes | None = None,
                      wait: bool = False) -> None: ...
    async def send(self, spec: TopicSpec, payload: Any, *, wait: bool = False,
                   **params: str) -> None: ...
    async def receive(self, max_messages: int = 1, timeout: float | None = None) -> list[Message]: ...
    def messages(self) -> AsyncIterator[Message]: ...
    @property
    def pending(self) -> int: ...
    def ack(self, message: Message) -> None: ...
    async def request(self, service: str, command: str, args: dict[str, Any] | None = None,
                      *, timeout: float = 5.0) -> CommandReply: ...
    async def reply(self, request: Message, reply: CommandReply) -> None: ...
    async def dead_letter(self, message: Message, reason: str) -> None: ...
    async def announce_online(self) -> None: ...
    async def close(self) -> None: ...
    @property
    def connected(self) -> bool: ...


class BaseBus:
    """Shared behaviour of both transports. `name` is the client's identity on the bus
    (a service name); it is the sender of everything published and owns its status topic."""

    def __init__(self, name: str, *, status: bool = True) -> None:
        self.name = name
        self._status = status
        self._inbox: deque[Message] = deque()
        self._wakeup = asyncio.Event()
        self._replies: dict[bytes, asyncio.Future[Message]] = {}
        self._filters: dict[str, int] = {}
        self._online = False
        self._closing = False
        self.reply_filter = registry.REPLY.filter(service=name)

    # -- transport primitives ---------------------------------------------------------------
    async def connect(self) -> None:
        raise NotImplementedError

    async def _send(self, message: Message, wait: bool) -> None:
        raise NotImplementedError

    async def _subscribe(self, filters: Sequence[tuple[Filter, int]]) -> None:
        raise NotImplementedError

    def _ack(self, message: Message) -> None:
        raise NotImplementedError

    async def _disconnect(self) -> None:
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    # -- shared behaviour -------------------------------------------------------------------
    def status_will(self) -> tuple[str, bytes] | None:
        """The last will: retained `offline` on the client's status topic."""
        if not self._status:
            return None
        return str(registry.SERVICE_STATUS.topic(service=self.name)), OFFLINE.encode()

    def _deliver(self, message: Message) -> None:
        """Called by the transport for every received message, on the event loop."""
        waiter = None
        if message.correlation and self.reply_filter.matches(message.topic):
            waiter = self._replies.pop(message.correlation, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(message)
            self._ack(message)
            return
        self._inbox.append(message)
        self._wakeup.set()

    async def subscribe(self, filters: Sequence[tuple[Filter, int]]) -> None:
        """Subscribe and wait for the broker's grant; kept and renewed on every reconnect."""
        for flt, qos in filters:
            self._filters[str(flt)] = qos
        await self._subscribe(filters)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      response_topic: str | None = None, correlation: bytes | None = None,
                      wait: bool = False) -> None:
        """Publish with the bus metadata. Returns once the transport holds the message (it is
        re-sent after a reconnect); with `wait=True`, once the broker acknowledged it."""
        message = Message(
            topic, payload, qos, retain,
            request_id=current_request_id.get() or new_request_id(),
            sender=self.name, sent_at=now_stamp(),
            response_topic=response_topic, correlation=correlation)
        await self._send(message, wait)

    async def send(self, spec: TopicSpec, payload: Any, *, wait: bool = False,
                   **params: str) -> None:
        """Publish a registry topic: its QoS, its retained flag, its payload model."""
        await self.publish(str(spec.topic(**params)), spec.encode(payload), qos=spec.qos,
                           retain=spec.retained, wait=wait)

    async def receive(self, max_messages: int = 1, timeout: float | None = None) -> list[Message]:
        """Up to `max_messages` received messages, waiting at most `timeout` s for the first."""
        if not self._inbox:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                return []
        batch: list[Message] = []
        while self._inbox and len(batch) < max_messages:
            batch.append(self._inbox.popleft())
        return batch

    async def messages(self) -> AsyncIterator[Message]:
        """Every received message, one at a time. The caller acks each after handling it."""
        while not self._closing:
            for message in await self.receive(64):
                yield message

    @property
    def pending(self) -> int:
        """Received messages not yet taken by `receive`."""
        return len(self._inbox)

    def ack(self, message: Message) -> None:
        """Tell the broker a QoS 1 message is handled; until then it is redelivered."""
        if message.token is not None:
            self._ack(message)

    async def request(self, service: str, command: str, args: dict[str, Any] | None = None,
                      *, timeout: float = 5.0) -> CommandReply:
        """Send `circles/<service>/cmd/<command>` and wait for the reply."""
        if str(self.reply_filter) not in self._filters:
            await self.subscribe([(self.reply_filter, 1)])
        correlation = uuid.uuid4().bytes
        reply_topic = str(registry.REPLY.topic(service=self.name, request=correlation.hex()))
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._replies[correlation] = waiter
        try:
            await self.publish(str(registry.SERVICE_CMD.topic(service=service, command=command)),
                               registry.SERVICE_CMD.encode(args or {}), qos=1,
                               response_topic=reply_topic, correlation=correlation)
            answer = await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise TemporaryError(f"{service} did not answer {command} within {timeout} s") from None
        finally:
            self._replies.pop(correlation, None)
        return registry.REPLY.decode(answer.payload)

    async def reply(self, request: Message, reply: CommandReply) -> None:
        """Answer a request on its response topic; ValueError if that topic is not a valid
        topic name (a wildcard, say) or the reply cannot be serialised."""
        if not request.response_topic:
            return
        topic = str(Topic(request.response_topic))
        await self.publish(topic, reply.model_dump_json().encode(), qos=1,
                           correlation=request.correlation)

    async def dead_letter(self, message: Message, reason: str) -> None:
        """Send a message that failed to `circles/dlq/<name>` with the reason, and log it."""
        try:
            payload, encoding = message.payload.decode(), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(message.payload).decode(), "base64"
        letter = DeadLetter(service=self.name, topic=message.topic, payload=payload,
                            encoding=encoding, reason=reason, request_id=message.request_id)
        log.warning("dead letter", extra={"topic": message.topic, "reason": reason})
        await self.send(registry.DLQ, letter, service=self.name)

    async def announce_online(self) -> None:
        """Publish retained `online`; repeated after every reconnect from now on."""
        if self._status:
            self._online = True
            await self.send(registry.SERVICE_STATUS, ONLINE, service=self.name)

    async def close(self) -> None:
        """Clean stop: retained `offline` (acknowledged by the broker), then disconnect."""
        if self._closing:
            return
        self._closing = True
        self._wakeup.set()
        if self._online and self.connected:
            try:
                await asyncio.wait_for(self.send(
                    registry.SERVICE_STATUS, OFFLINE, service=self.name, wait=True), 1.5)
            except (TimeoutError, CirclesError):
                log.warning("could not publish offline status")
        await self._disconnect()
