"""The `automation` service: declarative rules on home states, and cron schedules.

A rule fires when a message on its `when` topic makes its condition true after it was
false or unknown (an edge, like Home Assistant's state trigger), if its `only_if`
conditions and `between` window hold at that moment. A retained message met at
subscription only tells the service how things are: it never fires. A schedule fires at
its cron times. Firing sends the rule's command on a home `set` topic; with `for`, the
revert follows when that time is up by the service's clock (`self.clock`, injectable),
and survives restarts (`pending.py`). Every firing is logged at INFO with its request id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.triggers.cron import CronTrigger

from appliance import cron
from appliance.bus import new_request_id, registry
from appliance.bus.base import Bus
from appliance.bus.message import Received
from appliance.bus.payloads import CommandRequest, HomeState
from appliance.config import CoreSettings
from appliance.logging import request_id
from appliance.runtime import Service, subscribe
from appliance.values import in_window
from modules.automation.pending import PendingStore, Timed, due_now
from modules.automation.settings import (
    Automation,
    AutomationSettings,
    Condition,
    Rule,
    Schedule,
    demo_rules,
)

log = logging.getLogger("circles.automation")
TICK_S = 0.5
# A clock set back by more than this makes the schedules count again from the new time.
CLOCK_BACK = timedelta(minutes=1)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class RuleState:
    rule: Rule
    holds: bool = False  # `when` held after the last message on its topic
    last_fired: datetime | None = None


@dataclass
class ScheduleState:
    schedule: Schedule
    trigger: CronTrigger
    next_at: datetime | None = None  # set by the first tick
    last_fired: datetime | None = None


@dataclass
class Stats:
    fired: int = 0
    reverted: int = 0
    errors: int = 0


class AutomationService(Service):
    name = "automation"
    Settings = AutomationSettings

    def __init__(self, settings: CoreSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        config: AutomationSettings = self.config
        self.clock: Callable[[], datetime] = utc_now
        self.zone = config.zone()
        rules = config.rules if config.rules is not None else (
            demo_rules() if settings.environment == "development" else [])
        self.rules = [RuleState(rule) for rule in rules]
        self.watching: dict[str, list[RuleState]] = {}
        for state in self.rules:
            if state.rule.enabled:
                self.watching.setdefault(state.rule.when.topic, []).append(state)
        self.schedules = [ScheduleState(s, cron.trigger(s.cron, self.zone))
                          for s in config.schedules]
        self.values: dict[str, Any] = {}  # last known value of each topic `only_if` reads
        self.remembered = {condition.topic for automation in [*rules, *config.schedules]
                           for condition in automation.only_if}
        self.pending: dict[str, Timed] = {}
        self.store = PendingStore(settings.state_dir / "automation" / "pending.json")
        self.last_tick: datetime | None = None
        self.stats = Stats()

    async def start(self) -> None:
        self.pending = await asyncio.to_thread(self.store.load)
        for timed in self.pending.values():
            log.info("timed action restored", extra={"rule": timed.name, "topic": timed.topic,
                                                     "payload": timed.payload,
                                                     "due": timed.due.isoformat()})

    # -- rules ------------------------------------------------------------------------------
    @subscribe(registry.HOME_STATE)
    async def on_state(self, msg: Received) -> None:
        await self.observe(msg, msg.data is not None, msg.data.value if msg.data else None)

    @subscribe(registry.HOME_STATUS)
    async def on_status(self, msg: Received) -> None:
        await self.observe(msg, msg.data is not None, msg.data)

    async def observe(self, msg: Received, known: bool, value: Any) -> None:
        """Remember the value of a topic, and fire the rules it turns true."""
        topic = msg.topic
        if not known:  # the retained state was deleted: the entity is gone
            self.values.pop(topic, None)
        elif topic in self.remembered:
            self.values[topic] = value
        now = self.clock()
        for state in self.watching.get(topic, ()):
            holds = known and state.rule.when.holds(value)
            edge = holds and not state.holds
            state.holds = holds
            if not edge:
                continue
            if msg.message.retain:
                # Met at subscribing: how things were before the service looked, not an event.
                log.debug("retained state; not a trigger", extra={"rule": state.rule.name})
                continue
            if (age := self.age(msg, now)) is not None and age > self.config.max_event_age_s:
                log.info("old state; not a trigger", extra={"rule": state.rule.name,
                                                            "age_s": round(age, 1)})
                continue
            blocked = self.blocked(state.rule, now)
            if blocked:
                log.debug("rule not fired", extra={"rule": state.rule.name, "because": blocked})
                continue
            await self.fire(state.rule, now)
            state.last_fired = now

    @staticmethod
    def age(msg: Received, now: datetime) -> float | None:
        """How old a home state is by its own time (a status has none)."""
        if not isinstance(msg.data, HomeState):
            return None
        return (now - msg.data.time).total_seconds()

    def holds(self, condition: Condition) -> bool:
        return condition.topic in self.values and condition.holds(self.values[condition.topic])

    def blocked(self, automation: Automation, now: datetime) -> str | None:
        """Why `only_if` or `between` keep an automation from firing now; None if nothing does."""
        for condition in automation.only_if:
            if not self.holds(condition):
                known = self.values.get(condition.topic, "unknown")
                return f"only_if {condition.topic} {condition.describe()}: it is {known!r}"
        window = automation.window()
        if window is not None and not in_window(now.astimezone(self.zone).time(), window):
            return f"outside {automation.between}"
        return None

    async def fire(self, automation: Automation, now: datetime) -> None:
        """Send the command, under the request id of the triggering message (or a new one);
        with `for`, keep the revert first, so a crash in between still sends it."""
        token = request_id.set(request_id.get() or new_request_id())
        try:
            revert = automation.revert_payload()
            until = None
            if automation.for_ is not None and revert is not None:
                until = now + automation.for_
                self.pending[automation.name] = Timed(
                    name=automation.name, topic=automation.then.topic, payload=revert, due=until,
                    request_id=request_id.get())
                await self.store.save(self.pending)
            where = automation.then.params()
            await self.bus.send(registry.HOME_SET, automation.then.payload,
                                device=where["device"], entity=where["entity"])
            self.stats.fired += 1
            log.info(f"{automation.kind} fired", extra={
                "rule": automation.name, "topic": automation.then.topic,
                "payload": automation.then.payload,
                "until": until.isoformat() if until else None})
        finally:
            request_id.reset(token)

    # -- time -------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the next tick tries again
                self.stats.errors += 1
                log.exception("automation tick failed")
            await asyncio.sleep(TICK_S)

    async def tick(self) -> None:
        """Send the reverts and the schedules due by the clock. A schedule missed while the
        clock jumped (a suspended box) fires once, not once per missed time."""
        now = self.clock()
        for timed in due_now(self.pending, now):
            try:
                await self.revert(timed)
            except Exception:  # noqa: BLE001 - kept; the next tick sends it again
                self.stats.errors += 1
                log.exception("revert failed", extra={"rule": timed.name})
        set_back = self.last_tick is not None and now < self.last_tick - CLOCK_BACK
        self.last_tick = now
        for state in self.schedules:
            if not state.schedule.enabled:
                continue
            if state.next_at is None or set_back:
                state.next_at = cron.next_time(state.trigger, now)
                continue
            if now < state.next_at:
                continue
            state.next_at = cron.next_time(state.trigger, now)
            blocked = self.blocked(state.schedule, now)
            if blocked:
                log.info("schedule not fired", extra={"rule": state.schedule.name,
                                                      "because": blocked})
                continue
            try:
                await self.fire(state.schedule, now)
            except Exception:  # noqa: BLE001 - the other schedules still run
                self.stats.errors += 1
                log.exception("schedule failed", extra={"rule": state.schedule.name})
                continue
            state.last_fired = now

    async def revert(self, timed: Timed) -> None:
        """Send a due revert under a new request id (the log names the firing's)."""
        if self.pending.get(timed.name) is not timed:  # fired again meanwhile: a new timer
            return
        del self.pending[timed.name]
        token = request_id.set(new_request_id())
        try:
            where = timed.params()
            await self.bus.send(registry.HOME_SET, timed.payload, device=where["device"],
                                entity=where["entity"])
            log.info("timed action reverted", extra={
                "rule": timed.name, "topic": timed.topic, "payload": timed.payload,
                "fired_by": timed.request_id})
        except BaseException:
            self.pending.setdefault(timed.name, timed)
            raise
        finally:
            request_id.reset(token)
        self.stats.reverted += 1
        await self.store.save(self.pending)

    # -- the panel --------------------------------------------------------------------------
    async def cmd_rules(self, request: CommandRequest) -> dict[str, Any]:
        """Every rule and schedule with its state: active until (a pending revert), last
        fired, next run (schedules)."""

        def common(automation: Automation, last_fired: datetime | None) -> dict[str, Any]:
            timed = self.pending.get(automation.name)
            doc = automation.model_dump(mode="json", by_alias=True, exclude_none=True)
            doc.pop("for", None)
            return {"kind": automation.kind, **doc,
                    "for_s": automation.for_.total_seconds() if automation.for_ else None,
                    "active_until": timed.due.isoformat() if timed else None,
                    "last_fired": last_fired.isoformat() if last_fired else None}

        rules = [{**common(s.rule, s.last_fired), "holds": s.holds} for s in self.rules]
        schedules = [{**common(s.schedule, s.last_fired),
                      "next_at": s.next_at.isoformat() if s.next_at else None}
                     for s in self.schedules]
        pending = [t.model_dump(mode="json", exclude={"request_id"})
                   for t in sorted(self.pending.values(), key=lambda t: t.due)]
        return {"timezone": self.config.timezone or "local", "rules": rules,
                "schedules": schedules, "pending": pending}

    def status_text(self) -> str:
        rules = sum(len(states) for states in self.watching.values())
        return (f"{rules} rules, {len(self.schedules)} schedules, {len(self.pending)} timed "
                f"actions active, {self.stats.fired} fired")
