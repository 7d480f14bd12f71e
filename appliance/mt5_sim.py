"""The MetaTrader 5 expert advisor, simulated (`circles simulate mt5`, the tests).

It speaks the EA's wire protocol (docs/mt5_protocol.md) through the same raw MQTT 3.1.1
encoder (`appliance.bus.mqtt311`), with the device's own credentials, and keeps the same
store and forward: a deal goes to the queue file before it is published, and leaves it only
when the box acknowledges it on the account's ack topic.

The `Terminal` (`appliance.mt5_terminal`) plays the trade server's side; the `Simulator`
plays the EA (queue, connection, snapshots, heartbeats, halt). The history is kept next to
the queue (`<account>.history`), as a terminal keeps its own, so tickets go on increasing
across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from appliance.bus import OFFLINE, ONLINE, registry
from appliance.bus.mqtt311 import Address, Client, Publish, Will
from appliance.bus.mt5 import MAX_TICKETS, MT5Deal, MT5Heartbeat, MT5Snapshot
from appliance.bus.payloads import TradingHalt
from appliance.bus.topics import Filter, slug
from appliance.errors import AuthError, OperationalError, TemporaryError, ValidationFailed
from appliance.mt5_terminal import (
    DAY_MS,
    VERSION,
    Terminal,
    append_deals,
    deal_json,
    read_deals,
    rewrite_deals,
)

log = logging.getLogger("circles.mt5-sim")
RESEND_MAX_S = 300.0


# -- the expert advisor -----------------------------------------------------------------------
class TradingHalted(OperationalError):
    """An open refused because `circles/trading/halt` says trading is halted."""


def commands_filter(account: str) -> str:
    # The EA takes every command of its account with one subscription (`cmd/#`); the
    # registry declares each command's own topic, so the filter is made from one of them.
    resend = str(registry.MT5_RESEND.topic(account=account))
    return str(Filter(resend.rsplit("/", 1)[0] + "/#"))


class Simulator:
    """One expert advisor on account `account`, connecting with `address` (the device's
    credentials), its queue in `queue_path`. `start()` connects (and keeps reconnecting),
    `deposit/open/close/reverse/deal/step/generate` make deals, `stop()` says offline."""

    def __init__(self, account: str, address: Address, queue_path: Path, *,
                 history_path: Path | None = None, seed: int | None = None,
                 gmt_offset_s: int = 7200, login: int | None = None, currency: str = "USD",
                 magics: Iterable[int] = (1001, 1002), skip: Iterable[int] = (),
                 resend_after_s: float = 10.0, reconnect_min_s: float = 1.0,
                 reconnect_max_s: float = 60.0, heartbeat_s: float = 30.0,
                 snapshot_every_s: float = 900.0, snapshot_days: int = 7,
                 keepalive_s: int = 60, clock: Callable[[], float] = time.time) -> None:
        if slug(account) != account:
            raise ValueError(f"account {account!r} is not a topic level (a-z 0-9 - _)")
        self.account, self.address = account, address
        self.queue_path = queue_path
        self.history_path = history_path or queue_path.with_suffix(".history")
        self.terminal = Terminal(
            seed=seed, gmt_offset_s=gmt_offset_s, currency=currency, magics=magics, clock=clock,
            login=login if login is not None else 5_000_000 + zlib.crc32(account.encode()) % 999_999)
        self.skip: set[int] = set(skip)
        self.resend_after_s, self.keepalive_s = resend_after_s, keepalive_s
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self.heartbeat_s, self.snapshot_every_s = heartbeat_s, snapshot_every_s
        self.snapshot_days = snapshot_days
        self.queue: dict[int, MT5Deal] = {}  # waiting for their ack, in the order queued
        self.halt: TradingHalt | None = None
        self.resent = 0
        self._sent_at: dict[int, float] = {}
        self._tries: dict[int, int] = {}  # re-sends of each queued deal
        self._lock = asyncio.Lock()  # queue, queue file and publishing, one at a time
        self._changed = asyncio.Condition()
        self._client: Client | None = None
        self._ready = False  # connected, and the queue re-sent: new deals go out at once
        self._connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fatal: BaseException | None = None

    # -- state ------------------------------------------------------------------------------
    @property
    def history(self) -> dict[int, MT5Deal]:
        return self.terminal.history

    @property
    def halted(self) -> bool:
        return bool(self.halt and self.halt.halted)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def next_ticket(self) -> int:
        return self.terminal.next_ticket

    def may_open(self) -> bool:
        """What `CirclesMayOpen()` answers: False while trading is halted."""
        return not self.halted

    def snapshot(self) -> MT5Snapshot:
        """The tickets of the last `snapshot_days` of history (the newest 5,000) and those
        still queued."""
        to_msc = max(self.terminal.server_msc(), self.terminal.last_msc)
        from_msc = to_msc - self.snapshot_days * DAY_MS
        tickets = sorted(t for t, d in self.history.items() if from_msc <= d.time_msc <= to_msc)
        if len(tickets) > MAX_TICKETS:
            tickets = tickets[-MAX_TICKETS:]
            from_msc = self.history[tickets[0]].time_msc
        return MT5Snapshot(from_msc=from_msc, to_msc=to_msc, tickets=tickets,
                           pending=sorted(self.queue)[:MAX_TICKETS],
                           gmt_offset_s=self.terminal.gmt_offset_s)

    # -- running ----------------------------------------------------------------------------
    async def start(self, *, wait: bool = True, timeout: float = 10.0) -> None:
        """Load the history and the queue, then connect (and reconnect whenever the
        connection drops). With `wait`, return once connected."""
        history, queued = await asyncio.to_thread(
            lambda: (read_deals(self.history_path), read_deals(self.queue_path)))
        self.terminal.load([*history, *queued])
        self.queue = {d.ticket: d for d in sorted(queued, key=lambda d: d.ticket)}
        if self.queue:
            log.info("%d deals in the queue from before; they are sent on connecting",
                     len(self.queue))
        self._task = asyncio.create_task(self._run())
        if wait:
            await self.wait_connected(timeout)

    async def wait_connected(self, timeout: float = 10.0) -> None:
        connected = asyncio.create_task(self._connected.wait())
        assert self._task is not None
        await asyncio.wait({connected, self._task}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        connected.cancel()
        self._raise_fatal()
        if not self._connected.is_set():
            raise TemporaryError(f"not connected to {self.address.host}:{self.address.port} "
                                 f"after {timeout:g} s")

    async def stop(self) -> None:
        """Say `offline` (retained) and DISCONNECT, as the EA does when it is removed."""
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 15)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    async def wait_acked(self, timeout: float | None = None) -> None:
        """Until the queue is empty: every deal sent was acknowledged."""
        async def empty() -> None:
            async with self._changed:
                while self.queue:
                    self._raise_fatal()
                    await self._changed.wait()
        await asyncio.wait_for(empty(), timeout)

    # -- making deals -----------------------------------------------------------------------
    async def deal(self, **fields: Any) -> MT5Deal:
        """A deal of any kind (`MT5Deal` fields; ticket, time, account fields filled in)."""
        return await self._emit(self.terminal.record(**fields))

    async def deposit(self, amount: Decimal | str = "10000.00") -> MT5Deal:
        return await self._emit(self.terminal.deposit(Decimal(str(amount))))

    async def withdraw(self, amount: Decimal | str) -> MT5Deal:
        return await self._emit(self.terminal.withdraw(Decimal(str(amount))))

    async def open(self, symbol: str, side: str = "buy", volume: Decimal | str = "0.10",
                   magic: int | None = None) -> MT5Deal:
        """Open (or add to) a position; TradingHalted while trading is halted."""
        self._refuse_if_halted(f"open {side} {volume} {symbol}")
        return await self._emit(self.terminal.open(symbol, side, volume, magic))

    async def close(self, symbol: str, volume: Decimal | str | None = None,
                    reason: str = "expert") -> MT5Deal:
        """Close (or reduce) a position: allowed while halted."""
        return await self._emit(self.terminal.close(symbol, volume, reason))

    async def reverse(self, symbol: str, volume: Decimal | str) -> MT5Deal:
        self._refuse_if_halted(f"reverse {symbol}")
        return await self._emit(self.terminal.reverse(symbol, volume))

    async def step(self) -> MT5Deal | None:
        """One generated deal (nothing opened while halted); None when there was nothing to do."""
        deal = self.terminal.step(self.may_open())
        return await self._emit(deal) if deal is not None else None

    async def generate(self, count: int | None = None, every: float = 2.0) -> int:
        """`count` generated deals (for ever without), one every `every` s."""
        made, idle = 0, False
        while count is None or made < count:
            self._raise_fatal()
            if await self.step() is not None:
                made, idle = made + 1, False
            elif not idle:
                idle = True
                log.info("trading halted and no position left to close: waiting")
            if count is None or made < count:
                await asyncio.sleep(every)
        return made

    async def resend(self, tickets: Iterable[int]) -> list[int]:
        """Queue these deals of the history again and send them, as `cmd/resend` asks."""
        asked = list(tickets)
        found = [self.history[t] for t in asked if t in self.history]
        missing = sorted(set(asked) - set(self.history))
        if missing:
            log.warning("resend asked for tickets not in the history: %s", missing)
        async with self._lock:
            new = [d for d in found if d.ticket not in self.queue]
            if new:
                await asyncio.to_thread(append_deals, self.queue_path, new)
            for deal in found:
                self.queue[deal.ticket] = deal
                log.info("resending deal %d, as asked", deal.ticket)
                await self._publish(deal)
        return [d.ticket for d in found]

    async def send_snapshot(self) -> MT5Snapshot:
        snap = self.snapshot()
        await self._send(registry.MT5_SNAPSHOT, registry.MT5_SNAPSHOT.encode(snap))
        log.info("snapshot sent: %d tickets, %d pending", len(snap.tickets), len(snap.pending))
        return snap

    # -- inside -----------------------------------------------------------------------------
    def _refuse_if_halted(self, what: str) -> None:
        if self.halted:
            assert self.halt is not None
            raise TradingHalted(f"{what} refused: trading is halted by {self.halt.by} "
                                f"({self.halt.reason})")

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    async def _emit(self, deal: MT5Deal) -> MT5Deal:
        """Into the history file; unless skipped, into the queue file, then published."""
        # No await before the lock: deals reach the files and the broker in ticket order.
        async with self._lock:
            skipped = deal.ticket in self.skip
            await asyncio.to_thread(self._store, deal, not skipped)
            if skipped:
                log.info("deal %d made and kept out of the queue: %s", deal.ticket,
                         _describe(deal))
                return deal
            self.queue[deal.ticket] = deal
            log.info("deal %d: %s", deal.ticket, _describe(deal))
            await self._publish(deal)
        return deal

    def _store(self, deal: MT5Deal, queued: bool) -> None:
        append_deals(self.history_path, [deal])
        if queued:
            append_deals(self.queue_path, [deal])

    async def _publish(self, deal: MT5Deal) -> None:
        """Publish a queued deal if connected (else the reconnect sends it); called holding
        the lock."""
        client = self._client
        if client is None or not self._ready:
            return
        try:
            await client.publish(str(registry.MT5_DEAL.topic(account=self.account)),
                                 deal_json(deal), qos=registry.MT5_DEAL.qos)
            self._sent_at[deal.ticket] = time.monotonic()
        except TemporaryError as exc:
            log.debug("deal %d not sent now (%s); it stays queued", deal.ticket, exc)

    async def _send(self, spec: Any, payload: bytes) -> None:
        client = self._client
        if client is None:
            raise TemporaryError("not connected")
        await client.publish(str(spec.topic(account=self.account)), payload, qos=spec.qos,
                             retain=spec.retained)

    async def _run(self) -> None:
        delay = self.reconnect_min_s
        try:
            while not self._stop.is_set():
                connected = False
                try:
                    connected = await self._session()
                except TemporaryError as exc:
                    log.warning("broker connection failed: %s", exc)
                if self._stop.is_set():
                    return
                if connected:
                    delay = self.reconnect_min_s
                log.info("reconnecting in %g s", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, self.reconnect_max_s)
        except (AuthError, OperationalError) as exc:
            log.error("the broker refused this EA: %s", exc)
            self._fatal = exc
        except Exception as exc:
            log.exception("the EA simulator stopped")
            self._fatal = exc
        finally:
            async with self._changed:
                self._changed.notify_all()

    async def _session(self) -> bool:
        """One connection, from CONNECT until it drops; True if it was made."""
        status = str(registry.MT5_STATUS.topic(account=self.account))
        client = Client(self.address, f"circles-ea-{self.account}",
                        will=Will(status, OFFLINE.encode(), registry.MT5_STATUS.qos,
                                  registry.MT5_STATUS.retained),
                        keepalive=self.keepalive_s, clean_session=True)
        await client.connect()
        tasks: list[asyncio.Task[Any]] = []
        try:
            log.info("connected to %s:%d as %s", self.address.host, self.address.port,
                     self.address.username)
            await client.publish(status, ONLINE, qos=registry.MT5_STATUS.qos,
                                 retain=registry.MT5_STATUS.retained, wait=True)
            await client.subscribe([
                (str(registry.MT5_ACK.topic(account=self.account)), 1),
                (commands_filter(self.account), 1),
                (str(registry.TRADING_HALT.topic()), 1)])
            self._client = client
            tasks.append(asyncio.create_task(self._receive(client)))
            async with self._lock:  # the whole queue first, in order; new deals after it
                self._ready = True
                for deal in list(self.queue.values()):
                    await self._publish(deal)
                if self.queue:
                    log.info("%d queued deals sent again after connecting", len(self.queue))
            await self.send_snapshot()
            self._connected.set()
            tasks += [asyncio.create_task(self._every(self.heartbeat_s, self._heartbeat, True)),
                      asyncio.create_task(self._every(self.snapshot_every_s, self.send_snapshot)),
                      asyncio.create_task(self._every(min(1.0, self.resend_after_s / 2),
                                                      self._resend_unacked)),
                      asyncio.create_task(client.wait_closed()),
                      asyncio.create_task(self._stop.wait())]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if (error := task.exception()) is not None:
                    raise error
            if self._stop.is_set():
                self._ready = False
                with contextlib.suppress(TemporaryError):
                    await client.publish(status, OFFLINE, qos=registry.MT5_STATUS.qos,
                                         retain=registry.MT5_STATUS.retained, wait=True, timeout=5)
                log.info("offline, disconnecting")
            else:
                log.warning("connection lost: %s", await client.wait_closed())
            return True
        finally:
            self._ready, self._client = False, None
            self._connected.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.disconnect()

    async def _every(self, seconds: float, work: Callable[[], Any], now: bool = False) -> None:
        if not now:
            await asyncio.sleep(seconds)
        while True:
            try:
                await work()
            except TemporaryError as exc:
                log.debug("%s not done: %s", getattr(work, "__name__", work), exc)
            await asyncio.sleep(seconds)

    async def _heartbeat(self) -> None:
        beat = MT5Heartbeat(ts=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                            queue=len(self.queue), halted=self.halted, version=VERSION)
        await self._send(registry.MT5_HEARTBEAT, registry.MT5_HEARTBEAT.encode(beat))

    async def _resend_unacked(self) -> None:
        now = time.monotonic()
        async with self._lock:
            # Each deal waits twice as long after each try (up to RESEND_MAX_S): a box that
            # is down for hours must not fill the broker's queues with copies.
            due = [d for t, d in self.queue.items()
                   if now - self._sent_at.get(t, float("-inf"))
                   >= min(self.resend_after_s * 2 ** self._tries.get(t, 0), RESEND_MAX_S)]
            for deal in due:
                self._tries[deal.ticket] = self._tries.get(deal.ticket, 0) + 1
                await self._publish(deal)
            if due and self._ready:
                self.resent += len(due)
                log.info("%d deals without an ack sent again: %s", len(due),
                         [d.ticket for d in due])

    async def _receive(self, client: Client) -> None:
        async for message in client.messages():
            try:
                await self._handle(message)
            except Exception:  # one bad message never stops the EA
                log.exception("message on %s not handled", message.topic)

    async def _handle(self, message: Publish) -> None:
        topic = message.topic
        if registry.TRADING_HALT.parse(topic) is not None:
            self._set_halt(message.payload)
        elif (registry.MT5_ACK.parse(topic) or {}).get("account") == self.account:
            try:
                ack = registry.MT5_ACK.decode(message.payload)
            except ValidationFailed as exc:
                log.warning("ack unreadable, ignored: %s", exc)
                return
            for rejected in ack.rejected:
                log.warning("deal %d rejected by the box: %s", rejected.ticket, rejected.reason)
            await self._acked([*ack.accepted, *(r.ticket for r in ack.rejected)])
        elif (registry.MT5_RESEND.parse(topic) or {}).get("account") == self.account:
            try:
                resend = registry.MT5_RESEND.decode(message.payload)
            except ValidationFailed as exc:
                log.warning("resend command unreadable, ignored: %s", exc)
                return
            log.info("the box asks for deals %s again", resend.tickets)
            await self.resend(resend.tickets)
        else:
            log.warning("unknown command on %s, ignored", topic)

    async def _acked(self, tickets: Iterable[int]) -> None:
        async with self._lock:
            done = [t for t in dict.fromkeys(tickets) if t in self.queue]
            if not done:
                return
            # The file first: a deal out of `queue` is out of the file too.
            await asyncio.to_thread(rewrite_deals, self.queue_path,
                                    [d for t, d in self.queue.items() if t not in done])
            for ticket in done:
                del self.queue[ticket]
                self._sent_at.pop(ticket, None)
                self._tries.pop(ticket, None)
        log.info("acked %s; %d deals still queued", ", ".join(map(str, done)), len(self.queue))
        async with self._changed:
            self._changed.notify_all()

    def _set_halt(self, payload: bytes) -> None:
        was = self.halted
        if not payload:  # the retained halt was cleared
            self.halt = None
        else:
            try:
                self.halt = registry.TRADING_HALT.decode(payload)
            except ValidationFailed as exc:
                # Unreadable: halted, since opening on a halt we cannot read is the worse error.
                log.error("trading halt unreadable (%s): treated as halted", exc)
                self.halt = TradingHalt(halted=True, by="unknown", reason=f"unreadable: {exc}")
        if self.halted and not was:
            assert self.halt is not None
            log.warning("trading halted by %s (%s): no position is opened", self.halt.by,
                        self.halt.reason)
        elif was and not self.halted:
            by = f" by {self.halt.by}" if self.halt else ""
            log.warning("trading resumed%s: opening allowed again", by)


def _describe(deal: MT5Deal) -> str:
    if not deal.symbol:
        return f"{deal.type} {deal.profit} {deal.currency}"
    text = (f"{deal.type} {deal.entry} {deal.volume} {deal.symbol} at {deal.price} "
            f"(position {deal.position}, magic {deal.magic}")
    for key in ("profit", "commission", "swap"):
        if value := getattr(deal, key):
            text += f", {key} {value}"
    return text + ")"
