"""The `notify` service: appliance events as messages to the owner's phone (docs/notify.md).

It watches the topics its rules name (trading halt, risk, services, devices, health, MT5
gaps, backups) and the audit log, and turns what needs a person into alerts: queued
durably (`outbox.py`) before the triggering message is acknowledged, deduplicated and
summarised (`alerts.py`), sent through ntfy, Telegram or e-mail with quiet hours, rate
limits and retries (`delivery.py`). The last alerts are retained on `circles/notify/recent`
for the panel. Time comes from `self.clock` (injectable, as in the automation service).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from appliance.bus import new_request_id, registry
from appliance.bus.base import Bus
from appliance.bus.message import Received
from appliance.bus.payloads import CommandRequest, NotifyAlert, NotifyRecent
from appliance.bus.topics import TopicSpec
from appliance.config import CoreSettings
from appliance.errors import OperationalError, TemporaryError
from appliance.logging import request_id
from appliance.runtime import Service, subscribe
from modules.notify.alerts import Alerts, Draft
from modules.notify.audit_watch import AuditWatch, Matched
from modules.notify.channels import Channel, ChannelError, Note, build
from modules.notify.delivery import Courier
from modules.notify.outbox import Outbox
from modules.notify.rules import AUDIT
from modules.notify.settings import NotifySettings

log = logging.getLogger("circles.notify")
TICK_S = 1.0
TEST_WAIT_S = 10.0  # how long `cmd_test` waits for the channel before it answers
CONFIRM_S = 30.0  # after a start, how long a saved alert waits for its topic's retained message
AUDIT_SEQ = "audit_seq"


def utc_now() -> datetime:
    return datetime.now(UTC)


def _watch(spec: TopicSpec) -> Callable[..., Awaitable[None]]:
    # A batch: a save that fails raises TemporaryError, and the Runner then retries the batch
    # without acknowledging it (a single message's handler would dead-letter it).
    async def handler(self: NotifyService, msgs: list[Received]) -> None:
        await self.observe(msgs)

    return subscribe(spec, batch=True)(handler)


def _plain(data: Any) -> dict[str, Any]:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    return {"value": data}  # a raw payload: a status's `online` / `offline`


class NotifyService(Service):
    name = "notify"
    Settings = NotifySettings

    def __init__(self, settings: CoreSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        config: NotifySettings = self.config
        self.clock: Callable[[], datetime] = utc_now
        self.box = config.box()
        rules = config.all_rules()
        self.bus_rules = [rule for rule in rules if rule.topic != AUDIT]
        audit_rules = [rule for rule in rules if rule.topic == AUDIT]
        self.alerts = Alerts(rules, config.summary_every, self.box)
        self.channels = {name: build(name, channel, settings.state_dir)
                         for name, channel in config.channels.items()}
        self.outbox = Outbox(settings.state_dir / "notify" / "outbox.db")
        self.courier = Courier(config, self.channels, self.outbox, self.box)
        self.audit = AuditWatch(settings, audit_rules) if audit_rules else None
        self.audit_seq: int | None = None
        self.lock = asyncio.Lock()  # one evaluation and save at a time
        self.wake = asyncio.Event()
        self.recent_dirty = True
        self.started = 0.0
        self.queued = 0
        self.tests: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await asyncio.to_thread(self.outbox.open)
        self.alerts.load(await asyncio.to_thread(self.outbox.tracks))
        saved = await asyncio.to_thread(self.outbox.meta, AUDIT_SEQ)
        self.audit_seq = int(saved) if saved is not None else None
        self.started = asyncio.get_running_loop().time()
        log.info("notify ready", extra={"channels": sorted(self.channels),
                                        "rules": sorted(self.alerts.rules),
                                        "alerts_open": len(self.alerts.tracks)})

    async def stop(self) -> None:
        await asyncio.to_thread(self.outbox.close)
        if self.audit is not None:
            await asyncio.to_thread(self.audit.close)

    # -- the bus: one handler per topic a rule may watch (rules.WATCHED) ---------------------
    on_trading_halt = _watch(registry.TRADING_HALT)
    on_risk_state = _watch(registry.RISK_STATE)
    on_service_status = _watch(registry.SERVICE_STATUS)
    on_health_state = _watch(registry.HEALTH_STATE)
    on_home_status = _watch(registry.HOME_STATUS)
    on_home_state = _watch(registry.HOME_STATE)
    on_mt5_status = _watch(registry.MT5_STATUS)
    on_mt5_gaps = _watch(registry.MT5_GAPS)
    on_backup_alert = _watch(registry.BACKUP_ALERT)
    on_backup_result = _watch(registry.BACKUP_RESULT)
    on_backup_drill = _watch(registry.BACKUP_DRILL)

    async def observe(self, msgs: list[Received]) -> None:
        """Evaluate the rules watching these messages' topics; what they raise is saved
        before the messages are acknowledged (TemporaryError if it could not be). A retained
        message counts as much as a new one: the saved tracks say whether its alert was sent
        before a restart."""
        async with self.lock:
            now = self.clock()
            drafts: list[Draft] = []
            for msg in msgs:
                doc = None if msg.data is None else _plain(msg.data)
                subject = "/".join(msg.params.values())
                for rule in self.bus_rules:
                    if not rule.matches(msg.topic):
                        continue
                    if doc is None:
                        self.alerts.gone(rule, subject)
                    elif rule.holds(doc):
                        drafts += self.alerts.holds(rule, subject, {**doc, **msg.params}, now,
                                                    msg.message.request_id)
                    else:
                        drafts += self.alerts.ends(rule, subject, {**doc, **msg.params}, now,
                                                   msg.message.request_id)
            try:
                await self.save(drafts, now)
            except Exception as exc:
                await self.undo(exc)
                raise TemporaryError(f"alerts not saved: {type(exc).__name__}: {exc}") from None

    async def undo(self, exc: Exception) -> None:
        """A save failed: back to the state saved, so the same messages or timers (tried
        again) raise the same alerts; if the outbox cannot even be read, what is in memory
        stays and the next save carries it."""
        log.error("alerts not saved; tried again", extra={"error": f"{type(exc).__name__}: {exc}"})
        try:
            tracks = await asyncio.to_thread(self.outbox.tracks)
            saved = await asyncio.to_thread(self.outbox.meta, AUDIT_SEQ)
        except Exception:  # noqa: BLE001 - logged above; the error that matters is the save's
            return
        self.alerts.reset(tracks)
        self.audit_seq = int(saved) if saved is not None else None

    async def save(self, drafts: list[Draft], now: datetime, meta: dict[str, str] | None = None) -> None:
        changed, removed = self.alerts.changes()
        if not (drafts or changed or removed or meta):
            return
        queued = [(draft, self.courier.routes(draft, now)) for draft in drafts]
        await asyncio.to_thread(self.outbox.save, queued, changed, removed, meta)
        for draft, routes in queued:
            token = request_id.set(draft.request_id)
            try:
                log.info(f"alert: {draft.title}", extra={
                    "key": draft.key, "kind": draft.kind, "severity": draft.severity,
                    "text": draft.body, "channels": [name for name, _ in routes]})
            finally:
                request_id.reset(token)
        if drafts:
            self.recent_dirty = True
            self.wake.set()

    # -- time -------------------------------------------------------------------------------
    async def run(self) -> None:
        audit = asyncio.create_task(self.watch_audit()) if self.audit is not None else None
        try:
            await self.loop()
        finally:
            if audit is not None:
                audit.cancel()

    async def loop(self) -> None:
        while True:
            self.wake.clear()
            try:
                await self.tick()
                await self.deliver()
            except Exception:  # noqa: BLE001 - the next turn tries again; nothing is lost
                log.exception("notify pass failed")
            try:
                await asyncio.wait_for(self.wake.wait(), TICK_S)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        """Alerts whose `for` is up, and the summaries due."""
        loop = asyncio.get_running_loop()
        async with self.lock:
            now = self.clock()
            drafts = self.alerts.due(now)
            if self.started and loop.time() - self.started >= CONFIRM_S:
                self.started = 0.0
                for key in self.alerts.forget_unconfirmed():
                    log.info("alert forgotten: what it watched is gone", extra={"key": key})
            try:
                await self.save(drafts, now)
            except Exception as exc:  # noqa: BLE001 - the next tick raises them again
                await self.undo(exc)

    async def watch_audit(self) -> None:
        """Poll the audit log every `audit_poll_s`, apart from the bus and the timers (a slow
        database must hold neither)."""
        while True:
            try:
                await self.poll_audit()
            except Exception:  # noqa: BLE001 - the next poll tries again
                log.exception("audit poll failed")
            await asyncio.sleep(self.config.audit_poll_s)

    async def poll_audit(self) -> None:
        """The audit rules' alerts for the events since the last poll, saved with the seq read."""
        matches = await self.read_audit()  # not under the lock: it may wait for the database
        if matches is None:
            return
        async with self.lock:
            now = self.clock()
            drafts: list[Draft] = []
            for match in matches:
                drafts += self.alerts.event(match.rule, match.subject, match.context, now,
                                            new_request_id())
            meta = {AUDIT_SEQ: str(self.audit_seq)} if self.audit_seq is not None else None
            try:
                await self.save(drafts, now, meta)
            except Exception as exc:  # noqa: BLE001 - audit_seq goes back too: read again
                await self.undo(exc)

    async def read_audit(self) -> list[Matched] | None:
        """The audit rules' matches since the last poll (None: the log could not be read);
        the first start only notes where the chain ends: its history is not news."""
        assert self.audit is not None
        try:
            if self.audit_seq is None:
                self.audit_seq = await asyncio.to_thread(self.audit.head)
                return []
            matches, self.audit_seq = await asyncio.to_thread(self.audit.poll, self.audit_seq,
                                                              self.clock())
        except Exception as exc:  # noqa: BLE001 - a database away for a while: next poll
            log.warning("audit log not read", extra={"error": f"{type(exc).__name__}: {exc}"})
            return None
        return matches

    async def deliver(self) -> None:
        if await self.courier.deliver(self.clock()):
            self.recent_dirty = True
        if self.recent_dirty:
            await self.bus.send(registry.NOTIFY_RECENT, await self.recent())
            self.recent_dirty = False  # only once sent: a failed send is tried next turn

    async def recent(self) -> NotifyRecent:
        rows = await asyncio.to_thread(self.outbox.recent, self.config.recent)
        self.queued = await asyncio.to_thread(self.outbox.queued)
        return NotifyRecent(active=self.alerts.active(), queued=self.queued, alerts=[NotifyAlert(
            ts=datetime.fromtimestamp(row["at"], UTC).isoformat(timespec="seconds"),
            rule=row["rule"], subject=row["subject"], severity=row["severity"], kind=row["kind"],
            title=row["title"], text=row["body"], pending=pending) for row, pending in rows])

    # -- commands ---------------------------------------------------------------------------
    async def cmd_test(self, request: CommandRequest) -> dict[str, Any]:
        """Send a test message through the channel `channel` now (not queued, whatever the
        quiet hours and severities); the error if it fails."""
        name = str(getattr(request, "channel", "") or "")
        channel = self.channels.get(name)
        if channel is None:
            known = ", ".join(sorted(self.channels)) or "none configured"
            raise OperationalError(f"no channel {name!r} (channels: {known})")
        note = Note("Test message", f"A test message from {self.box}, sent at "
                    f"{self.clock().isoformat(timespec='seconds')}: this channel works.",
                    "info", "test", self.box)
        sending = asyncio.create_task(self._send_test(channel, note, request.by))
        self.tests.add(sending)
        sending.add_done_callback(self._test_done)
        try:
            # Not the channel's whole timeout: the command waits in the receive loop, which
            # the watchdog watches. A slower endpoint is still tried; its outcome is logged.
            await asyncio.wait_for(asyncio.shield(sending), TEST_WAIT_S)
        except TimeoutError:
            return {"channel": name, "sent": False,
                    "detail": f"no answer within {TEST_WAIT_S:g} s; still trying, see the log"}
        return {"channel": name, "sent": True}

    def _test_done(self, task: asyncio.Task[None]) -> None:
        self.tests.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: when nobody waited any more, the log line tells it

    @staticmethod
    async def _send_test(channel: Channel, note: Note, by: str | None) -> None:
        try:
            await asyncio.to_thread(channel.send, note)
        except Exception as exc:  # noqa: BLE001 - any failure is the channel's, its text scrubbed
            error = exc if isinstance(exc, ChannelError) else channel.error(f"{type(exc).__name__}: {exc}"[:300])
            log.warning("test message not sent", extra={"channel": channel.name, "error": str(error)})
            raise OperationalError(f"channel {channel.name}: {error}") from None
        log.info("test message sent", extra={"channel": channel.name, "by": by})

    async def cmd_recent(self, request: CommandRequest) -> dict[str, Any]:
        """The last alerts, as on circles/notify/recent."""
        return (await self.recent()).model_dump(mode="json")

    def status_text(self) -> str:
        return (f"{len(self.channels)} channels, {self.alerts.active()} alerts active, "
                f"{self.queued} queued")
