"""Trade events on their way to the ledger: published after the transaction that stored them,
re-sent while the trade logger has not confirmed them, marked delivered when it has.

The trade logger keeps each (source, account, event_id) once, so a re-send is harmless; the
wait between re-sends doubles up to MAX_RESEND_S, so a trade logger that is down for a day
does not find its broker queue flooded with copies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from appliance.bus import registry
from appliance.bus.base import Bus
from appliance.bus.trade_event import TradeAck, TradeEvent
from modules.trading.execution.store import Pending

log = logging.getLogger("circles.execution")
MAX_RESEND_S = 300.0


class Outbox:
    def __init__(self, bus: Bus, account: str, resend_after_s: float) -> None:
        self.bus = bus
        self.account = account
        self.resend_after_s = resend_after_s
        # Events published by this process: when last, and how many times.
        self.sent_at: dict[tuple[str, str], tuple[float, int]] = {}

    async def send(self, event: TradeEvent) -> None:
        """Publish an event the store holds already (undelivered)."""
        self.sent_at[(event.source, event.event_id)] = (time.monotonic(), 1)
        await self.bus.send(registry.TRADE_EVENT, event, account=self.account)

    async def resend(self, undelivered: Sequence[Pending]) -> int:
        """Publish the events not confirmed yet (as the store lists them) that waited long
        enough, all of them the first time after a start; returns how many were published."""
        now, sent = time.monotonic(), 0
        topic = str(registry.TRADE_EVENT.topic(account=self.account))
        for pending in undelivered:
            key = (pending.source, pending.event_id)
            last, tries = self.sent_at.get(key, (float("-inf"), 0))
            if now - last >= min(self.resend_after_s * 2 ** max(tries - 1, 0), MAX_RESEND_S):
                self.sent_at[key] = (now, tries + 1)
                await self.bus.publish(topic, pending.data.encode(), qos=registry.TRADE_EVENT.qos)
                sent += 1
        return sent

    def outcomes(self, acks: Sequence[TradeAck]) -> dict[tuple[str, str], str]:
        """(source, event_id) → what the trade logger said, from its ack messages."""
        found: dict[tuple[str, str], str] = {}
        for ack in acks:
            for accepted in ack.accepted:
                found[(accepted.source, accepted.event_id)] = f"accepted: seq {accepted.seq}"
            for rejected in ack.rejected:
                if rejected.source and rejected.event_id:
                    found[(rejected.source, rejected.event_id)] = f"rejected: {rejected.reason}"
        return found

    def confirmed(self, outcomes: dict[tuple[str, str], str]) -> None:
        """The store marked these delivered: stop re-sending them; a refusal is an error a
        person must look at (the event is not in the ledger)."""
        for key, outcome in outcomes.items():
            if self.sent_at.pop(key, None) is not None and outcome.startswith("rejected"):
                log.error("the trade logger refused a trade event", extra={
                    "event_id": key[1], "outcome": outcome})
