"""The `mt5-bridge` service: MetaTrader 5 deals into the ledger (docs/mt5_protocol.md).

An expert advisor (or `circles simulate mt5`) publishes each deal on
`circles/mt5/<account>/deal` and keeps it until it is confirmed. The bridge turns it into a
TRADE_EVENT for the trade logger and, when the trade logger's ack says the event is
committed, relays the deal's ticket on `circles/mt5/<account>/ack`: the confirmation is end
to end, and the bridge itself keeps nothing (the ticket travels in the event id). Snapshots
of the terminal's history are compared with the ledger; missing deals are published on
`…/gaps` and asked for again with `…/cmd/resend`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from appliance.bus import OFFLINE, ONLINE, registry
from appliance.bus.message import Message, Received
from appliance.bus.mt5 import MT5Ack, MT5Gaps, MT5Heartbeat, MT5Resend, MT5Snapshot, RejectedDeal
from appliance.bus.payloads import CommandRequest, utcnow
from appliance.bus.trade_event import TradeAck
from appliance.config import Section
from appliance.errors import CirclesError, TemporaryError, ValidationFailed
from appliance.files import write_atomically
from appliance.runtime import Service, subscribe
from modules.mt5_bridge.normalise import event_id, ticket_of, to_event

log = logging.getLogger("circles.mt5_bridge")
LEDGER = "trade-logger"
MAX_REFUSED = 10_000  # per account; the oldest tickets are forgotten first
KNOWN_CHUNK = 1000  # event ids per `known` request


class MT5BridgeSettings(Section):
    heartbeat_timeout_s: float = Field(
        90.0, gt=0, description="a terminal silent this long counts as offline (its will "
                                "comes only when the broker notices the lost connection)")
    ledger_timeout_s: float = Field(10.0, gt=0, description="wait for the trade logger's answer")


@dataclass
class EA:
    """What the bridge knows of one expert advisor (one terminal's account)."""

    status: str | None = None  # its retained status: online / offline (its will)
    since: str | None = None
    heartbeat: MT5Heartbeat | None = None
    heard_at: float | None = None  # monotonic time of the last heartbeat
    gaps: list[int] | None = None


class MT5BridgeService(Service):
    name = "mt5-bridge"
    Settings = MT5BridgeSettings

    async def start(self) -> None:
        self.terminals: dict[str, EA] = {}
        self.checks: dict[str, asyncio.Task[None]] = {}  # account → its snapshot's check
        self.sent = 0
        # Deals refused for good stay in the terminal's history: remembered, so that a
        # snapshot does not ask for them again and again.
        self.refused_file = self.settings.state_dir / self.name / "refused.json"
        self.refused: dict[str, set[int]] = await asyncio.to_thread(self._load_refused)

    def _load_refused(self) -> dict[str, set[int]]:
        try:
            return {a: set(t) for a, t in json.loads(self.refused_file.read_text()).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("refused deals unreadable", extra={"error": str(exc)})
            return {}

    def _save_refused(self, data: bytes) -> None:
        self.refused_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.refused_file, lambda out: out.write(data))

    def terminal(self, account: str) -> EA:
        return self.terminals.setdefault(account, EA())

    # -- deals ----------------------------------------------------------------------------
    @subscribe(registry.MT5_DEAL, batch=True)
    async def on_deals(self, batch: list[Received]) -> None:
        """Each deal to the ledger as a TRADE_EVENT, held by the broker before the EA's
        message is acknowledged; a deal the ledger can never keep is refused to the EA."""
        for msg in batch:
            account = msg.params["account"]
            try:
                event = to_event(account, msg.data)
            except TemporaryError as exc:  # no answer: the EA sends it again later
                log.warning("deal not forwarded yet", extra={"account": account,
                                                             "error": str(exc)})
                continue
            except ValidationFailed as exc:
                await self.bus.dead_letter(msg.message, str(exc))
                await self.ack(account, rejected=[RejectedDeal(ticket=msg.data.ticket,
                                                               reason=str(exc))])
                continue
            await self.bus.send(registry.TRADE_EVENT, event, account=account, wait=True)
            self.sent += 1

    async def rejected(self, message: Message, reason: str) -> None:
        """A deal that is not a valid deal payload: tell the EA to stop re-sending it, when
        its ticket can be read."""
        params = registry.MT5_DEAL.parse(message.topic)
        if params is None:
            return
        try:
            ticket = json.loads(message.payload).get("ticket")
        except (ValueError, AttributeError):
            return
        if isinstance(ticket, int) and ticket > 0:
            await self.ack(params["account"], rejected=[RejectedDeal(ticket=ticket, reason=reason)])

    @subscribe(registry.TRADE_ACK)
    async def on_ledger_ack(self, msg: Received) -> None:
        """The trade logger committed (or refused) events: relay the MT5 ones to their EA."""
        account, ack = msg.params["account"], msg.data
        assert isinstance(ack, TradeAck)
        accepted = [t for a in ack.accepted if a.source == "mt5"
                    and (t := ticket_of(account, a.event_id)) is not None]
        rejected = [RejectedDeal(ticket=t, reason=r.reason) for r in ack.rejected
                    if r.source == "mt5" and r.event_id
                    and (t := ticket_of(account, r.event_id)) is not None]
        if accepted or rejected:
            await self.ack(account, accepted=accepted, rejected=rejected)

    async def ack(self, account: str, *, accepted: list[int] | None = None,
                  rejected: list[RejectedDeal] | None = None) -> None:
        if rejected:
            kept = self.refused.setdefault(account, set())
            kept.update(r.ticket for r in rejected)
            while len(kept) > MAX_REFUSED:
                kept.discard(min(kept))
            data = json.dumps({a: sorted(t) for a, t in self.refused.items()}).encode()
            await asyncio.to_thread(self._save_refused, data)
        await self.bus.send(registry.MT5_ACK, MT5Ack(accepted=accepted or [],
                                                     rejected=rejected or []), account=account)

    # -- gaps -----------------------------------------------------------------------------
    @subscribe(registry.MT5_SNAPSHOT)
    async def on_snapshot(self, msg: Received) -> None:
        # Beside the receive loop: a trade logger that is slow to answer must not hold up
        # the deals and acks behind it. A newer snapshot replaces a check still running.
        account = msg.params["account"]
        if (running := self.checks.get(account)) is not None:
            running.cancel()
        self.checks[account] = asyncio.create_task(self.check(account, msg.data))
        self.checks[account].add_done_callback(self._checked)

    @staticmethod
    def _checked(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("snapshot check failed", exc_info=error)

    async def check(self, account: str, snapshot: MT5Snapshot) -> None:
        """Deals of the terminal's history that are neither in the ledger nor in the EA's
        queue: published on `gaps`, and asked for again."""
        candidates = sorted(set(snapshot.tickets) - set(snapshot.pending)
                            - self.refused.get(account, set()))
        known: set[int | None] = set()
        try:
            for i in range(0, len(candidates), KNOWN_CHUNK):  # well under the payload limit
                reply = await self.bus.request(LEDGER, "known", {
                    "account": account, "source": "mt5",
                    "event_ids": [event_id(account, t) for t in candidates[i:i + KNOWN_CHUNK]]},
                    timeout=self.config.ledger_timeout_s)
                if not reply.ok:
                    raise CirclesError(reply.error or "refused")
                known.update(ticket_of(account, e) for e in reply.result["known"])
        except CirclesError as exc:
            log.warning("snapshot not compared with the ledger",
                        extra={"account": account, "error": str(exc)})
            return
        missing = [t for t in candidates if t not in known]
        self.terminal(account).gaps = missing
        await self.bus.send(registry.MT5_GAPS, MT5Gaps(
            missing=missing, checked=len(candidates), from_msc=snapshot.from_msc,
            to_msc=snapshot.to_msc, ts=utcnow()), account=account)
        if missing:
            log.warning("deals missing from the ledger; asking the terminal again",
                        extra={"account": account, "tickets": missing[:50],
                               "count": len(missing)})
            await self.bus.send(registry.MT5_RESEND, MT5Resend(tickets=missing), account=account)

    # -- terminals ------------------------------------------------------------------------
    @subscribe(registry.MT5_STATUS)
    async def on_status(self, msg: Received) -> None:
        account, status = msg.params["account"], msg.data
        if status is None:  # its retained status deleted: the device is gone
            self.terminals.pop(account, None)
            return
        if status not in (ONLINE, OFFLINE):
            raise ValidationFailed(f"status must be {ONLINE} or {OFFLINE}, not {status!r}")
        terminal = self.terminal(account)
        if terminal.status != status:
            terminal.status, terminal.since = status, utcnow()
            log.info(f"terminal {status}", extra={"account": account})

    @subscribe(registry.MT5_HEARTBEAT)
    async def on_heartbeat(self, msg: Received) -> None:
        terminal = self.terminal(msg.params["account"])
        terminal.heartbeat, terminal.heard_at = msg.data, time.monotonic()

    def online(self, terminal: EA) -> bool:
        """Online by its status, and not silent longer than the heartbeat timeout."""
        fresh = terminal.heard_at is None or \
            time.monotonic() - terminal.heard_at < self.config.heartbeat_timeout_s
        return terminal.status == ONLINE and fresh

    async def cmd_terminals(self, request: CommandRequest) -> list[dict[str, Any]]:
        """Every EA heard of: online (status and heartbeat), since, its queue, whether it
        obeys a halt, and the deals the last snapshot found missing."""
        out = []
        for account, t in sorted(self.terminals.items()):
            beat = t.heartbeat
            out.append({"account": account, "online": self.online(t), "status": t.status,
                        "since": t.since, "last_heartbeat": beat.ts if beat else None,
                        "queue": beat.queue if beat else None,
                        "halted": beat.halted if beat else None,
                        "version": beat.version if beat else None, "gaps": t.gaps})
        return out

    async def stop(self) -> None:
        for task in self.checks.values():
            task.cancel()

    def status_text(self) -> str:
        online = sum(self.online(t) for t in self.terminals.values())
        return f"{online}/{len(self.terminals)} terminals online, {self.sent} deals forwarded"
