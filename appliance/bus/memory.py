"""The in-memory transport: the same bus semantics inside one process, no broker.

Used by unit tests and the backtest. Retained messages, wildcards, last wills and
unacknowledged-message redelivery behave as they do with Mosquitto.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from itertools import count

from appliance.bus.base import BaseBus
from appliance.bus.message import Message
from appliance.bus.topics import Filter


class MemoryBroker:
    """Routes messages between MemoryBus clients of one process."""

    def __init__(self) -> None:
        self.clients: dict[str, MemoryBus] = {}
        self.retained: dict[str, Message] = {}
        # topic → the clients it goes to, with their QoS; forgotten when anyone connects,
        # leaves or subscribes
        self._routes: dict[str, list[tuple[MemoryBus, int]]] = {}

    def changed(self) -> None:
        self._routes.clear()

    def route(self, message: Message) -> None:
        if message.retain:
            if message.payload:
                self.retained[message.topic] = message
            else:
                self.retained.pop(message.topic, None)
            message = replace(message, retain=False)
        targets = self._routes.get(message.topic)
        if targets is None:
            if len(self._routes) >= 10_000:  # reply topics are one per request: stay small
                self._routes.clear()
            targets = self._routes[message.topic] = [
                (client, qos) for client in self.clients.values()
                if (qos := client.granted(message.topic)) is not None]
        for client, qos in targets:
            client.take(message, qos)


class MemoryBus(BaseBus):
    def __init__(self, name: str, broker: MemoryBroker, *, status: bool = True,
                 yielding: bool = True) -> None:
        """`yielding`: every publish lets the event loop run other tasks, as a network
        transport does; off where one driver runs every client in turn (the backtest)."""
        super().__init__(name, status=status)
        self.broker = broker
        self.yielding = yielding
        self._is_connected = False
        self._ids = count(1)
        self.unacked: dict[int, Message] = {}

    @property
    def connected(self) -> bool:
        return self._is_connected

    async def connect(self) -> None:
        self.broker.clients[self.name] = self
        self.broker.changed()
        self._is_connected = True

    def granted(self, topic: str) -> int | None:
        levels = [q for f, q in self._filters.items() if Filter(f).matches(topic)]
        return max(levels) if levels else None

    def take(self, message: Message, qos: int) -> None:
        qos = min(qos, message.qos)
        token = next(self._ids) if qos else None
        m = message  # a copy with this client's QoS and token (faster than replace())
        message = Message(topic=m.topic, payload=m.payload, qos=qos, retain=m.retain,
                          request_id=m.request_id, sender=m.sender, sent_at=m.sent_at,
                          response_topic=m.response_topic, correlation=m.correlation, token=token)
        if token is not None:
            self.unacked[token] = message
        self._deliver(message)

    async def _send(self, message: Message, wait: bool) -> None:
        if not self._is_connected:
            raise ConnectionError(f"{self.name} is not connected")
        self.broker.route(message)
        if self.yielding:
            await asyncio.sleep(0)

    async def _subscribe(self, filters: Sequence[tuple[Filter, int]]) -> None:
        self.broker.changed()
        for flt, qos in filters:
            for message in list(self.broker.retained.values()):
                if flt.matches(message.topic):
                    self.take(message, qos)

    def _ack(self, message: Message) -> None:
        self.unacked.pop(message.token, None)

    async def _disconnect(self) -> None:
        self._is_connected = False
        self.broker.clients.pop(self.name, None)
        self.broker.changed()

    def crash(self) -> None:
        """Vanish without a clean stop: the broker publishes the last will."""
        self._is_connected = False
        self.broker.clients.pop(self.name, None)
        self.broker.changed()
        if will := self.status_will():
            self.broker.route(Message(will[0], will[1], qos=1, retain=True, sender="broker"))

    async def restart(self) -> None:
        """Reconnect after a crash: unacknowledged messages are delivered again."""
        self._inbox.clear()
        self._closing = False
        await self.connect()
        for message in list(self.unacked.values()):
            self._deliver(message)
