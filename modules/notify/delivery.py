"""Getting queued alerts out: routing, quiet hours, rate limits, retries.

Each alert goes to every channel whose `min_severity` it reaches. During quiet hours (judged
when sending, in the configured zone or the box's) alerts below critical wait until they
end; critical ones go at once. A channel sends at most `max_per_hour` messages in any hour:
the alerts due beyond that wait for the next free slot and then go out together as one
digest; critical alerts are never held by that limit. A failed send is tried again after an
exponential backoff with jitter (capped at `retry_max_s`, longer if the endpoint asked);
the channel's other waiting alerts wait with it. An alert still undelivered after
`max_age` is dropped with an error in the log. Every send is logged under the request id
of the message that caused the alert.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from datetime import datetime

from appliance.logging import request_id
from appliance.values import in_window
from modules.notify.alerts import Draft
from modules.notify.channels import Channel, ChannelError, Note
from modules.notify.channels.base import SEVERITIES, rank
from modules.notify.outbox import SENT_WINDOW_S, Outbox, Queued
from modules.notify.settings import NotifySettings

log = logging.getLogger("circles.notify")
DIGEST_LINES = 30
CRITICAL = SEVERITIES[-1]


def backoff(attempts: int, base: float, cap: float, asked: float | None = None) -> float:
    """Seconds to wait after the `attempts`-th failure: doubling from `base`, at most `cap`,
    with jitter (so channels failing together do not retry in step)."""
    delay = min(cap, base * 2 ** min(attempts - 1, 30))
    delay = delay / 2 + random.uniform(0, delay / 2)
    return max(delay, asked or 0.0)


def note_of(row: Queued, source: str) -> Note:
    return Note(row.title, row.body, row.severity, row.kind, source)


def digest(rows: Sequence[Queued], source: str) -> Note:
    """One message for several alerts."""
    severity = max((row.severity for row in rows), key=rank)
    lines = [f"• {row.title}: {row.body}" for row in rows[:DIGEST_LINES]]
    if len(rows) > DIGEST_LINES:
        lines.append(f"… and {len(rows) - DIGEST_LINES} more")
    return Note(f"{len(rows)} alerts", "\n".join(lines), severity, "digest", source)


class Courier:
    def __init__(self, config: NotifySettings, channels: dict[str, Channel], outbox: Outbox,
                 source: str) -> None:
        self.config = config
        self.channels = channels
        self.outbox = outbox
        self.source = source
        self.quiet = config.quiet()
        self.zone = config.zone()

    def routes(self, draft: Draft, now: datetime) -> list[tuple[str, float]]:
        """The channels a new alert goes to, each with when it is due (quiet hours are
        decided when it is sent)."""
        return [(name, now.timestamp()) for name, channel in self.channels.items()
                if channel.wants(draft.severity)]

    def quiet_now(self, now: datetime) -> bool:
        return self.quiet is not None and in_window(now.astimezone(self.zone).time(), self.quiet)

    async def deliver(self, now: datetime) -> bool:
        """Send what is due; whether anything changed in the outbox (sent, failed, dropped)."""
        rows = await asyncio.to_thread(self.outbox.due, now.timestamp())
        if not rows:
            return False
        oldest = (now - self.config.max_age).timestamp()
        dropped = [row for row in rows if row.at < oldest or row.channel not in self.channels]
        if dropped:
            await asyncio.to_thread(self.outbox.drop, dropped)
            for row in dropped:
                why = "too old" if row.at < oldest else "its channel is no longer configured"
                self._log(logging.ERROR, "alert dropped undelivered", row, reason=why)
        quiet = self.quiet_now(now)
        waiting: dict[str, list[Queued]] = {}
        for row in rows:
            if row not in dropped and not (quiet and row.severity != CRITICAL):
                waiting.setdefault(row.channel, []).append(row)
        names = list(waiting)
        moved = await asyncio.gather(*(self._channel(name, waiting[name], now) for name in names),
                                     return_exceptions=True)
        for name, result in zip(names, moved, strict=True):
            if isinstance(result, BaseException):  # the outbox, most likely: the next pass retries
                log.error("channel pass failed", extra={"channel": name,
                                                        "error": f"{type(result).__name__}: {result}"})
        return bool(dropped) or any(result is True for result in moved)

    async def _channel(self, name: str, rows: list[Queued], now: datetime) -> bool:
        channel = self.channels[name]
        # Critical alerts are never held by the rate limit; they count toward it all the same.
        critical = [row for row in rows if row.severity == CRITICAL]
        rows = [row for row in rows if row.severity != CRITICAL]
        for i, row in enumerate(critical):
            if not await self._send(channel, [row], note_of(row, self.source), critical[i:] + rows, now):
                return True
        if not rows:
            return bool(critical)
        used = await asyncio.to_thread(self.outbox.sent_count, name, now.timestamp() - SENT_WINDOW_S)
        room = channel.settings.max_per_hour - used
        if room <= 0:
            return bool(critical)  # the next free slot sends them as a digest
        alone, together = (rows, []) if len(rows) <= room else (rows[:room - 1], rows[room - 1:])
        for i, row in enumerate(alone):
            if not await self._send(channel, [row], note_of(row, self.source), rows[i:], now):
                return True
        if together:
            await self._send(channel, together, digest(together, self.source), together, now)
        return True

    async def _send(self, channel: Channel, rows: list[Queued], note: Note,
                    left: list[Queued], now: datetime) -> bool:
        try:
            await asyncio.to_thread(channel.send, note)
        except Exception as exc:  # noqa: BLE001 - whatever a channel raises is a failed send
            if not isinstance(exc, ChannelError):
                exc = channel.error(f"{type(exc).__name__}: {exc}"[:300])
            attempts = max(row.attempts for row in left) + 1
            wait = backoff(attempts, self.config.retry_base_s, self.config.retry_max_s,
                           exc.retry_after)
            await asyncio.to_thread(self.outbox.failed, channel.name, [row.id for row in left],
                                    str(exc), now.timestamp() + wait)
            self._log(logging.WARNING, "alert not sent; will retry", rows[0], error=str(exc),
                      attempts=attempts, retry_in_s=round(wait, 1), waiting=len(left))
            return False
        await asyncio.to_thread(self.outbox.delivered, channel.name, [row.id for row in rows],
                                now.timestamp())
        for row in rows:
            self._log(logging.INFO, "alert sent", row, digest=len(rows) if len(rows) > 1 else None)
        return True

    def _log(self, level: int, message: str, row: Queued, **extra: object) -> None:
        token = request_id.set(row.request_id)
        try:
            log.log(level, message, extra={
                "channel": row.channel, "alert_id": row.id, "rule": row.rule,
                "subject": row.subject, "kind": row.kind, "severity": row.severity,
                "attempts": row.attempts, **{k: v for k, v in extra.items() if v is not None}})
        finally:
            request_id.reset(token)
