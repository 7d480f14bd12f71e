"""Publishing TRADE_EVENTs that must be kept: each one is held until the trade logger
confirms it on the account's ack topic, and re-sent while it is not (DESIGN §3).

Re-sending is safe because the trade logger is idempotent on (source, account, event_id):
an event confirmed twice is stored once. Used by the CLI (simulate, import, test trade) and
by the panel's HTTP ingest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.bus import registry
from appliance.bus.base import Bus
from appliance.bus.trade_event import AcceptedEvent, RejectedEvent, TradeAck, TradeEvent
from appliance.errors import TemporaryError

Outcome = AcceptedEvent | RejectedEvent


@dataclass(eq=False)  # identity: kept in sets
class _Pending:
    event: TradeEvent
    future: asyncio.Future[Outcome]
    sent_at: float = 0.0
    waiters: int = 0  # send() calls waiting for it (concurrent HTTP requests may share one)


def _key(account: str, source: str | None, event_id: str | None) -> tuple[str, str, str]:
    return account, source or "", event_id or ""


class TradeSender:
    """Send events and wait for their confirmation. Acks reach `deliver()`: a service routes
    its TRADE_ACK subscription there; a standalone client calls `listen()`."""

    def __init__(self, bus: Bus, *, resend_after_s: float = 5.0, window: int = 2000) -> None:
        self.bus = bus
        self.resend_after_s = resend_after_s
        self.window = window  # events in flight at most
        self._pending: dict[tuple[str, str, str], _Pending] = {}
        self.resent = 0

    def deliver(self, ack: TradeAck) -> None:
        outcomes: list[Outcome] = [*ack.accepted, *ack.rejected]
        for outcome in outcomes:
            pending = self._pending.pop(_key(ack.account, outcome.source, outcome.event_id), None)
            if pending is not None and not pending.future.done():
                pending.future.set_result(outcome)

    async def listen(self) -> asyncio.Task[None]:
        """For a client without a service runner: subscribe to the acks (before anything is
        sent, so none is missed) and read them in a task; cancel it when done."""
        await self.bus.subscribe([(registry.TRADE_ACK.filter(), registry.TRADE_ACK.qos)])
        return asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for message in self.bus.messages():
            if registry.TRADE_ACK.parse(message.topic) is not None:
                self.deliver(registry.TRADE_ACK.decode(message.payload))
            self.bus.ack(message)

    async def send(self, events: Sequence[TradeEvent], *, timeout: float = 30.0) -> list[Outcome]:
        """Publish `events` and return their outcomes in order. TemporaryError when some are
        still unconfirmed after `timeout` (sending them again later is safe)."""
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        mine: list[_Pending] = []
        waiting: set[_Pending] = set()
        for event in events:
            key = _key(event.account, event.source, event.event_id)
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = _Pending(event, loop.create_future())
                while len(waiting) >= self.window:
                    await self._wait_some(waiting, deadline)
                await self._publish(pending)
            mine.append(pending)
            if not pending.future.done() and pending not in waiting:
                pending.waiters += 1
                waiting.add(pending)
        while waiting:
            await self._wait_some(waiting, deadline)
        return [p.future.result() for p in mine]

    async def _publish(self, pending: _Pending) -> None:
        pending.sent_at = time.monotonic()
        await self.bus.send(registry.TRADE_EVENT, pending.event, account=pending.event.account)

    async def _wait_some(self, waiting: set[_Pending], deadline: float) -> None:
        """Wait up to a second for confirmations; re-send what waited too long."""
        left = deadline - time.monotonic()
        if left <= 0:
            for p in waiting:
                p.waiters -= 1
                if not p.waiters:  # nobody else waits for it: forget it
                    self._pending.pop(_key(p.event.account, p.event.source, p.event.event_id), None)
            raise TemporaryError(f"{len(waiting)} trade events not confirmed by the trade logger; "
                                 "is it running? Sending them again is safe.")
        await asyncio.wait([p.future for p in waiting], timeout=min(1.0, left),
                           return_when=asyncio.FIRST_COMPLETED)
        now = time.monotonic()
        for p in list(waiting):
            if p.future.done():
                waiting.discard(p)
            elif now - p.sent_at >= self.resend_after_s:
                self.resent += 1
                await self._publish(p)
