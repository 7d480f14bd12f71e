"""The `risk` service: the only writer of the retained trading halt `circles/trading/halt`.

It watches the ledger's metrics, the positions, the orders, the market feeds and the
box's health against the `[risk]` limits (`book.py`), on every message and once a second
(a feed goes stale, and an order leaves the sliding minute, without any message). A breach
halts trading at once; it never resumes trading by itself: a person does (`circles trading
resume`, the panel, Home Assistant's switch), and only once no limit is breached any more.
Every change of the halt is audit-logged with who asked. The halt and the loss baselines
are also kept in `<state>/risk/state.json`, so a broker that lost its retained messages, or
a restart at noon, neither resumes trading nor forgets the morning's losses.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.bus import registry
from appliance.bus.message import Received
from appliance.bus.payloads import CommandRequest, HealthState, TradingHalt
from appliance.bus.topics import slug
from appliance.bus.trade_event import TradeMetrics
from appliance.bus.trading import FeedState, Order, Positions, RiskState
from appliance.errors import OperationalError, TemporaryError, ValidationFailed
from appliance.files import write_atomically
from appliance.ha_discovery import Entity
from appliance.runtime import Service, subscribe
from appliance.security import audit
from modules.trading.risk import discovery
from modules.trading.risk.book import Assessment, RiskBook
from modules.trading.risk.settings import RiskSettings

if TYPE_CHECKING:
    from appliance.security.audit import AuditLog

log = logging.getLogger("circles.risk")
BY = "risk"
HOME_ASSISTANT = "homeassistant"
MAX_BY = 128
MAX_REASON = 500
# Figures are republished at most this often when only they change (positions move per tick).
FIGURES_EVERY_S = 1.0


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _when(halt: TradingHalt) -> datetime:
    try:
        when = datetime.fromisoformat(halt.ts)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class RiskService(Service):
    name = "risk"
    Settings = RiskSettings

    async def start(self) -> None:
        self.clock: Callable[[], datetime] = _utc_now
        self.book = RiskBook(self.config)
        self.halt: TradingHalt | None = None
        self.assessment = Assessment({}, [])
        self._retained: TradingHalt | None = None  # the retained halt found at start
        self._queued: TradingHalt | None = None  # one left in our session, older
        self._restored = asyncio.Event()
        self._started = False  # the start-up wait is over; breaches now halt
        self._owned = False  # this process has published the halt
        self._lock = asyncio.Lock()  # one change of the halt at a time
        self._audit: AuditLog | None = None
        self.audit_error: str | None = None
        self._published: tuple[Any, ...] | None = None
        self._published_at = 0.0
        self._dirty = False
        self._watched = {slug(a) for a in self.config.accounts} if self.config.accounts else None
        self.path = state_file(self.settings.state_dir)
        self._saved_halt = await asyncio.to_thread(self._load)

    # -- start-up -------------------------------------------------------------------------
    def _load(self) -> TradingHalt | None:
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("risk state file unreadable; starting without it",
                      extra={"path": str(self.path), "error": str(exc)})
            return None
        self.book.load_baselines(saved.get("accounts") or {})
        try:
            return TradingHalt.model_validate(saved["halt"]) if saved.get("halt") else None
        except ValueError:
            return None

    def _save(self, halt: TradingHalt | None, baselines: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"halt": halt.model_dump() if halt else None, "accounts": baselines}
        data = json.dumps(doc, indent=1).encode()
        write_atomically(self.path, lambda out: out.write(data))

    async def _keep(self) -> None:
        self._dirty = False
        try:
            await asyncio.to_thread(self._save, self.halt, self.book.baselines())
        except OSError as exc:
            self._dirty = True
            log.error("cannot write the risk state file", extra={"path": str(self.path),
                                                                 "error": str(exc)})

    async def run(self) -> None:
        try:
            await asyncio.wait_for(self._restored.wait(), self.config.start_wait_s)
        except TimeoutError:
            pass
        async with self._lock:
            await self._restore()
        self._started = True
        ticks = 0
        while True:
            try:
                await self.assess()
            except Exception:  # noqa: BLE001 - the next tick tries again; the halt holds
                log.exception("assessment failed")
            ticks += 1
            if self._dirty and ticks % 10 == 0:
                await self._keep()
            await asyncio.sleep(1.0)

    async def _restore(self) -> None:
        """Take the newest halt known (retained, or kept in the state file); publish the
        initial `halted=false` only when there is none. A retained halt is never lifted here."""
        if self._owned:
            return  # a command or a breach already set it
        retained = self._retained
        chosen = retained
        for other in (self._queued, self._saved_halt):
            if other and (chosen is None or _when(other) > _when(chosen)) \
                    and not (retained and retained.halted and not other.halted):
                chosen = other
        if chosen is None:
            log.info("no trading halt found; trading allowed")
            await self._set_halt(False, BY, "initial state", action=audit.TRADING_RESUME)
        elif chosen is not retained:
            log.warning("the broker's halt is missing or older than the one kept; restoring it",
                        extra={"halted": chosen.halted, "reason": chosen.reason})
            await self._set_halt(chosen.halted, chosen.by, chosen.reason, action=None)
        else:
            self.halt = chosen
            log.info("trading halt restored", extra={"halted": chosen.halted, "by": chosen.by,
                                                     "reason": chosen.reason})
            if chosen != self._saved_halt:
                await self._keep()

    def entities(self) -> list[Entity]:
        return discovery.entities()

    async def stop(self) -> None:
        if self._dirty:
            await self._keep()

    # -- inputs ---------------------------------------------------------------------------
    def _watches(self, account: str) -> bool:
        return self._watched is None or account in self._watched

    @subscribe(registry.TRADING_HALT)
    async def on_halt(self, msg: Received) -> None:
        halt: TradingHalt | None = msg.data  # None: someone deleted the retained halt
        if not self._owned and not self._started:
            # Start-up: the retained halt comes on subscribing; what was queued in our
            # session comes before it and is older. A deletion is no halt to restore.
            if halt is None:
                return
            if msg.message.retain:
                self._retained = halt
                self._restored.set()
            else:
                self._queued = halt
            return
        if msg.message.sender == self.name:
            return  # our own publication, echoed
        log.warning("someone else wrote or deleted the trading halt; publishing ours again",
                    extra={"sender": msg.message.sender,
                           "halted": None if halt is None else halt.halted})
        if self.halt is not None:
            await self.bus.send(registry.TRADING_HALT, self.halt, wait=True)

    @subscribe(registry.TRADE_METRICS)
    async def on_metrics(self, msg: Received) -> None:
        if account := self._account_of(msg):
            self.book.on_metrics(account, msg.data.metrics)
            await self.assess()

    @subscribe(registry.POSITIONS)
    async def on_positions(self, msg: Received) -> None:
        if account := self._account_of(msg):
            self.book.on_positions(account, msg.data.positions)
            await self.assess()

    def _account_of(self, msg: Received) -> str | None:
        """The watched account a retained per-account state is of, or None to ignore it (a
        deleted state leaves the last one known standing). ValidationFailed when the payload
        names another account than its topic."""
        state: TradeMetrics | Positions | None = msg.data
        if state is None:
            return None
        account = msg.params["account"]
        if slug(state.account) != account:
            raise ValidationFailed(f"account {state.account!r} is not the topic's ({account!r})")
        return account if self._watches(account) else None

    @subscribe(registry.ORDER_UPDATE)
    async def on_order(self, msg: Received) -> None:
        order: Order = msg.data
        if self._watches(msg.params["account"]):
            self.book.on_order(order, self.clock())
            await self.assess()

    @subscribe(registry.MARKET_FEED)
    async def on_feed(self, msg: Received) -> None:
        feed: FeedState | None = msg.data  # None: the market cleared a feed it no longer serves
        self.book.on_feed(msg.topic, feed)
        await self.assess()

    @subscribe(registry.HEALTH_STATE)
    async def on_health(self, msg: Received) -> None:
        health: HealthState | None = msg.data
        if health is None:
            return  # the retained health state was deleted: the last one known stands
        self.book.on_health(health)
        await self.assess()

    @subscribe(registry.HA_CMD, command=discovery.HA_COMMAND)
    async def on_ha_switch(self, msg: Received) -> None:
        command = str(msg.data).strip().upper()
        if command not in (discovery.ON, discovery.OFF):
            raise ValidationFailed(f"the trading-halt switch takes ON or OFF, not {msg.data!r}")
        try:
            if command == discovery.ON:
                await self.halt_trading(HOME_ASSISTANT, "halted from Home Assistant")
            else:
                await self.resume_trading(HOME_ASSISTANT)
        except ValidationFailed as exc:
            log.warning("Home Assistant's resume refused", extra={"error": str(exc)})
            if self.halt is not None:
                # The switch shows what it is told: tell it again that trading is halted.
                await self.bus.send(registry.TRADING_HALT, self.halt, wait=True)

    # -- assessment -----------------------------------------------------------------------
    async def assess(self) -> Assessment:
        """Figures and breaches now; a breach halts trading (once the start-up wait is over),
        and the risk state is published when it changed."""
        now = self.clock()
        if self._started and self.book.roll(now):
            self._dirty = True
        self.assessment = self.book.assess(now)
        if self._started and self.assessment.breaches and not self.halted:
            async with self._lock:
                if not self.halted:
                    reason = "; ".join(b.text for b in self.assessment.breaches)
                    log.warning("limit breached; halting trading", extra={"reason": reason})
                    await self._set_halt(True, BY, reason[:MAX_REASON], action=audit.TRADING_HALT)
        await self.publish_state()
        return self.assessment

    @property
    def halted(self) -> bool:
        return self.halt is not None and self.halt.halted

    def risk_state(self) -> RiskState:
        return RiskState(halted=self.halted, breaches=[b.text for b in self.assessment.breaches],
                         figures=self.assessment.figures, limits=self.config.limits())

    async def publish_state(self, *, force: bool = False) -> None:
        state = self.risk_state()
        loop = asyncio.get_running_loop()
        key = (state.halted, tuple(state.breaches))
        since = loop.time() - self._published_at
        if not force and self._published is not None:
            changed = key != self._published[0]
            moved = state.figures != self._published[1] and since >= FIGURES_EVERY_S
            if not (changed or moved or since >= self.config.state_interval_s):
                return
        self._published, self._published_at = (key, state.figures), loop.time()
        await self.bus.send(registry.RISK_STATE, state)

    # -- the halt -------------------------------------------------------------------------
    async def _set_halt(self, halted: bool, by: str, reason: str, *, action: str | None,
                        **details: Any) -> TradingHalt:
        """Publish the halt (acknowledged by the broker before this returns), keep it, and
        audit-log the change as `action`. A failed audit write does not undo a halt in
        force: it is logged and left in `audit_error`."""
        halt = TradingHalt(halted=halted, by=by, reason=reason)
        await self.bus.send(registry.TRADING_HALT, halt, wait=True)
        self.halt, self._owned = halt, True
        self.audit_error = None
        await self._keep()
        await self.publish_state(force=True)
        if action:
            try:
                await self.record(action, by, reason, **details)
            except OperationalError as exc:
                self.audit_error = str(exc)
        return halt

    def _answer(self, halt: TradingHalt, changed: bool) -> dict[str, Any]:
        answer = {**halt.model_dump(), "changed": changed}
        if changed and self.audit_error:
            answer["audit_error"] = self.audit_error
        return answer

    async def record(self, action: str, actor: str, reason: str, **details: Any) -> None:
        """Append one event to the audit log; an audit log that cannot be written is logged
        and raised as OperationalError (the halt itself is already in force)."""
        def write() -> None:
            if self._audit is None:
                from appliance.security.audit import AuditLog

                self._audit = AuditLog.open(self.settings)
            self._audit.record(action, actor=actor, target="trading", reason=reason, **details)

        try:
            await asyncio.to_thread(write)
        except Exception as exc:  # noqa: BLE001 - the halt must hold whatever the database does
            log.exception("audit log not written", extra={"action": action, "actor": actor})
            raise OperationalError(f"{action} done, but the audit log could not be written: "
                                   f"{type(exc).__name__}: {exc}") from exc

    async def halt_trading(self, by: str, reason: str) -> dict[str, Any]:
        """Halt trading for `by`; a halt already in force is kept as it is."""
        async with self._lock:
            if self.halt is not None and self.halt.halted:
                return self._answer(self.halt, False)
            halt = await self._set_halt(True, by, reason, action=audit.TRADING_HALT)
        log.info("trading halted", extra={"by": by, "reason": reason})
        return self._answer(halt, True)

    async def resume_trading(self, by: str, *, force: bool = False) -> dict[str, Any]:
        """Lift the halt for `by`. Refused (ValidationFailed naming the breaches) while a limit
        is breached; losses (daily loss, drawdown) are accepted with `force`, which measures
        them again from the current equity. Conditions (exposure, orders, market, disk,
        clock) can never be forced."""
        async with self._lock:
            found = self.book.assess(self.clock())
            if found.conditions:
                raise ValidationFailed("cannot resume while limits are breached: " +
                                       "; ".join(b.text for b in found.breaches))
            if found.losses and not force:
                raise ValidationFailed(
                    "cannot resume while limits are breached: " +
                    "; ".join(b.text for b in found.losses) +
                    " — to accept these losses and measure from the current equity, resume "
                    "with force (circles trading resume --force)")
            if self.halt is not None and not self.halt.halted:
                return self._answer(self.halt, False)
            accepted = [b.text for b in found.losses]
            reason = f"resumed by {by}" + (f", accepting: {'; '.join(accepted)}" if accepted else "")
            # Recorded before it takes effect: trading never restarts unrecorded (an audit
            # log that cannot be written refuses the resume).
            await self.record(audit.TRADING_RESUME, by, reason[:MAX_REASON], forced=bool(accepted),
                              previous=self.halt.reason if self.halt else "")
            if accepted:
                self.book.acknowledge(found.losses)
                self._dirty = True
            self.assessment = self.book.assess(self.clock())
            halt = await self._set_halt(False, by, reason[:MAX_REASON], action=None)
        log.info("trading resumed", extra={"by": by, "accepted": accepted})
        return self._answer(halt, True)

    # -- commands -------------------------------------------------------------------------
    @staticmethod
    def _by(request: CommandRequest) -> str:
        by = (request.by or "").strip()
        if not by:
            raise ValidationFailed('say who asks: {"by": "<person or device>"} '
                                   "(it goes to the audit log)")
        if len(by) > MAX_BY:
            raise ValidationFailed(f"by: at most {MAX_BY} characters")
        return by

    @staticmethod
    def _arg(request: CommandRequest, key: str, kind: type, default: Any) -> Any:
        value = (request.model_extra or {}).get(key, default)
        if value is not None and not isinstance(value, kind):
            raise ValidationFailed(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
        return value

    async def cmd_halt(self, request: CommandRequest) -> dict[str, Any]:
        """{"by": "…", "reason": "…"} → the halt in force ("changed": false if it already was)."""
        by = self._by(request)
        reason = (self._arg(request, "reason", str, None) or "").strip() or f"halted by {by}"
        return await self.halt_trading(by, reason[:MAX_REASON])

    async def cmd_resume(self, request: CommandRequest) -> dict[str, Any]:
        """{"by": "…", "force": false} → the halt lifted; an error naming the breaches while
        any limit is breached (losses may be accepted with force)."""
        by = self._by(request)
        return await self.resume_trading(by, force=bool(self._arg(request, "force", bool, False)))

    async def cmd_flatten(self, request: CommandRequest) -> dict[str, Any]:
        """{"by": "…", "reason": "…"} → halt trading, then ask the execution service to close
        every position; its answer, or an error saying the flatten was not confirmed (the halt
        stays)."""
        by = self._by(request)
        why = (self._arg(request, "reason", str, None) or "").strip()
        reason = f"halt and flatten requested by {by}" + (f": {why}" if why else "")
        reason = reason[:MAX_REASON]
        async with self._lock:
            was = self.halted
            halt = await self._set_halt(True, by, reason,
                                        action=None if was else audit.TRADING_HALT)
        try:
            reply = await self.bus.request("execution", "flatten", {"by": by},
                                           timeout=self.config.flatten_timeout_s)
        except TemporaryError as exc:
            await self._record_quietly(audit.TRADING_FLATTEN, by, reason, outcome="unconfirmed")
            raise OperationalError(f"flatten not confirmed: {exc}; trading stays halted") from None
        if not reply.ok:
            await self._record_quietly(audit.TRADING_FLATTEN, by, reason, outcome="refused",
                                       error=reply.error)
            raise OperationalError(f"flatten refused by execution: {reply.error}; "
                                   "trading stays halted")
        answer: dict[str, Any] = {"halt": halt.model_dump(), "execution": reply.result}
        if error := await self._record_quietly(audit.TRADING_FLATTEN, by, reason):
            answer["audit_error"] = error
        log.info("flatten confirmed by execution", extra={"by": by})
        return answer

    async def _record_quietly(self, action: str, actor: str, reason: str,
                              **details: Any) -> str | None:
        """`record`, returning its error instead of raising it (it is logged either way)."""
        try:
            await self.record(action, actor, reason, **details)
        except OperationalError as exc:
            return str(exc)
        return None

    async def cmd_state(self, request: CommandRequest) -> dict[str, Any]:
        """The halt in force, the risk state (figures, limits, breaches) and each account."""
        assessment = await self.assess()
        return {"halt": self.halt.model_dump() if self.halt else None,
                "risk": self.risk_state().model_dump(),
                "losses": [b.text for b in assessment.losses],
                "accounts": self.book.detail()}

    def status_text(self) -> str:
        if self.halt is None:
            return "waiting for the halt state"
        state = f"halted: {self.halt.reason}" if self.halt.halted else "trading allowed"
        return f"{state}; {len(self.assessment.breaches)} breaches"


def state_file(state_dir: Path) -> Path:
    """Where the risk service keeps its halt and loss baselines."""
    return state_dir / "risk" / "state.json"
