"""The `trade-logger` service: every TRADE_EVENT into its account's ledger chain, once.

A batch of events is appended in one transaction per account (group commit), then the
events are acknowledged to the broker and confirmed on `circles/trade/<account>/ack`, so a
publisher that keeps an event until it is confirmed loses nothing, and a redelivered or
re-sent event is a duplicate, never a second record. Metrics are computed from the ledger
itself and published retained, throttled; `metrics` and `equity` answer requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import Field
from sqlalchemy.exc import OperationalError as DatabaseUnavailable

from appliance.bus import registry
from appliance.bus.message import Message, Received
from appliance.bus.payloads import CommandRequest, utcnow
from appliance.bus.topics import slug
from appliance.bus.trade_event import RejectedEvent, TradeEvent, TradeMetrics, chain_for, event_key
from appliance.config import Section
from appliance.errors import TemporaryError, ValidationFailed
from appliance.ledger import Entry, Ledger, open_ledger
from appliance.logging import request_id
from appliance.runtime import Service, subscribe
from modules.trade_logger.metrics import Fills, compute, equity_curve

log = logging.getLogger("circles.trade_logger")
T = TypeVar("T")
ACK_CHUNK = 500  # events per ack message, well under the bus's payload limit


class TradeLoggerSettings(Section):
    checkpoint_every: int = Field(1000, ge=1, description="sign the head every N records")
    checkpoint_interval_s: float = Field(60.0, gt=0, description="…or every T seconds")
    metrics_interval_s: float = Field(5.0, gt=0, description="at most one metrics update per T s")


class TradeLoggerService(Service):
    name = "trade-logger"
    Settings = TradeLoggerSettings

    async def start(self) -> None:
        self.ledger: Ledger = await asyncio.to_thread(
            open_ledger, self.settings, checkpoint_every=self.config.checkpoint_every,
            checkpoint_interval_s=self.config.checkpoint_interval_s)
        self._books_lock = threading.Lock()  # the run loop and commands both read books
        self.books: dict[str, Fills] = {}  # account → events read from its chain
        self.read_to: dict[str, int] = {}  # account → last seq read into its book
        self.written: set[str] = set()  # accounts appended to since the last metrics pass
        self.stored = self.duplicates = 0
        for chain in await asyncio.to_thread(self.ledger.chains):
            if chain.startswith("trade:"):
                self.written.add(chain.removeprefix("trade:"))
        log.info("ledger open", extra={"accounts": sorted(self.written)})

    @subscribe(registry.TRADE_EVENT, batch=True)
    async def on_events(self, items: list[Received]) -> None:
        by_account: dict[str, list[TradeEvent]] = {}
        refused: dict[str, list[RejectedEvent]] = {}
        for item in items:
            event: TradeEvent = item.data
            account = item.params["account"]
            if event.account != account:
                reason = (f"account_id {event.account_id!r} is not the account of the topic "
                          f"({account!r}); the publisher's identity wins")
                await self.bus.dead_letter(item.message, reason)
                refused.setdefault(account, []).append(
                    RejectedEvent(event_id=event.event_id, source=event.source, reason=reason))
                continue
            by_account.setdefault(account, []).append(event)
        results = await asyncio.to_thread(self._commit, by_account)
        self.written.update(results)  # here, on the loop that swaps the set
        self._log_stored(items, results)
        for account in by_account.keys() | refused.keys():
            await self._confirm(account, results.get(account, []), refused.get(account, []))

    @staticmethod
    def _log_stored(items: list[Received], results: dict[str, list[dict[str, Any]]]) -> None:
        """A line per event stored, under the request id of the message that brought it,
        so that the logs follow an event from whoever sent it to the ledger."""
        stored = {(account, r["event_id"], r["source"]): r
                  for account, rows in results.items() for r in rows}
        for item in items:
            event: TradeEvent = item.data
            row = stored.get((item.params["account"], event.event_id, event.source))
            if row is None:
                continue
            token = request_id.set(item.message.request_id)
            try:
                log.info("trade event stored", extra={
                    "account": event.account, "event_id": event.event_id,
                    "source": event.source, "seq": row["seq"], "duplicate": row["duplicate"]})
            finally:
                request_id.reset(token)

    def _commit(self, by_account: dict[str, list[TradeEvent]]) -> dict[str, list[dict[str, Any]]]:
        """One transaction per account; raises TemporaryError while the database is away
        (nothing is acknowledged then, so the broker keeps the messages)."""
        results: dict[str, list[dict[str, Any]]] = {}
        for account, events in by_account.items():
            try:
                appended = self.ledger.append(chain_for(account), [
                    Entry(e.stored(), key=e.key) for e in events])
            except DatabaseUnavailable as exc:
                raise TemporaryError(f"database unavailable: {exc.orig}") from exc
            results[account] = [{"event_id": e.event_id, "source": e.source, "seq": a.seq,
                                 "hash": a.hash, "duplicate": a.duplicate}
                                for e, a in zip(events, appended, strict=True)]
            dup = sum(a.duplicate for a in appended)
            self.stored += len(appended) - dup
            self.duplicates += dup
        return results

    async def _confirm(self, account: str, accepted: list[dict[str, Any]],
                       rejected: list[RejectedEvent]) -> None:
        """Publish TradeAck documents; `accepted` holds AcceptedEvent fields, already valid,
        so they are written as they are (this runs for every event stored)."""
        topic = str(registry.TRADE_ACK.topic(account=account))
        for i in range(0, max(len(accepted), len(rejected)), ACK_CHUNK):
            ack = {"account": account, "accepted": accepted[i:i + ACK_CHUNK],
                   "rejected": [r.model_dump() for r in rejected[i:i + ACK_CHUNK]]}
            await self.bus.publish(topic, json.dumps(ack, separators=(",", ":")).encode(),
                                   qos=registry.TRADE_ACK.qos)

    async def rejected(self, message: Message, reason: str) -> None:
        """An invalid event is refused for good on the ack topic too, when its topic and
        id can be read, so that a publisher waiting for the ack stops re-sending it."""
        params = registry.TRADE_EVENT.parse(message.topic)
        if params is None:
            return
        try:
            doc = json.loads(message.payload)
        except (ValueError, RecursionError):
            doc = None
        ids = {k: doc.get(k) for k in ("event_id", "source")} if isinstance(doc, dict) else {}
        ids = {k: v if isinstance(v, str) and len(v) <= 128 else None for k, v in ids.items()}
        await self._confirm(params["account"], [], [RejectedEvent(**ids, reason=reason)])

    # -- metrics --------------------------------------------------------------------------
    async def run(self) -> None:
        signed_at = time.monotonic()
        while True:
            await self.publish_written()
            if time.monotonic() - signed_at >= self.config.checkpoint_interval_s:
                signed_at = time.monotonic()
                try:
                    await asyncio.to_thread(self._checkpoint_all)
                except Exception:  # noqa: BLE001 - the next append or pass signs it
                    log.exception("checkpoint failed")
            await asyncio.sleep(self.config.metrics_interval_s)

    async def publish_written(self) -> None:
        """The metrics of every account appended to since the last call."""
        accounts, self.written = self.written, set()
        for account in sorted(accounts):
            try:
                await self.publish_metrics(account)
            except Exception:  # noqa: BLE001 - metrics must never stop the ingest
                log.exception("metrics failed", extra={"account": account})

    def _checkpoint_all(self) -> None:
        for chain in self.ledger.chains():
            if chain.startswith("trade:"):
                self.ledger.checkpoint(chain)

    def _on_book(self, account: str, use: Callable[[Fills], T]) -> tuple[T, int]:
        """`use` applied to the account's events brought up to the chain's head (another
        process may append to the chain too: the ledger, not this process, is the truth)."""
        with self._books_lock:
            book = self.books.setdefault(account, Fills())
            since = self.read_to.get(account, 0)
            for record in self.ledger.records(chain_for(account), since=since):
                try:
                    book.append(record["data"])
                except ValidationFailed as exc:  # a damaged record: `ledger verify` names it
                    log.error("record left out of the metrics", extra={
                        "account": account, "seq": record["seq"], "error": str(exc)})
                since = self.read_to[account] = record["seq"]  # each record read once
            return use(book), since

    async def publish_metrics(self, account: str) -> dict[str, Any]:
        metrics, seq = await asyncio.to_thread(self._on_book, account, compute)
        await self.bus.send(registry.TRADE_METRICS,
                            TradeMetrics(account=account, seq=seq, ts=utcnow(), metrics=metrics),
                            account=account)
        return metrics

    def _account(self, request: CommandRequest) -> str:
        account = (request.model_extra or {}).get("account")
        if not isinstance(account, str) or not account:
            raise ValidationFailed("give the account: {\"account\": \"…\"}")
        account = slug(account)
        if account not in self.read_to and not self.ledger.count(chain_for(account)):
            raise ValidationFailed(f"no trade events for account {account!r}")
        return account

    async def cmd_metrics(self, request: CommandRequest) -> dict[str, Any]:
        """{"account": "…"} → the account's metrics now (also published retained)."""
        account = await asyncio.to_thread(self._account, request)
        return await self.publish_metrics(account)

    async def cmd_known(self, request: CommandRequest) -> dict[str, list[str]]:
        """{"account": "…", "source": "mt5", "event_ids": […]} → {"known": [the ids the
        account's chain holds]}: how a connector finds the events the ledger misses."""
        args = request.model_extra or {}
        account, source, ids = args.get("account"), args.get("source"), args.get("event_ids")
        if not isinstance(account, str) or not isinstance(source, str) or not isinstance(ids, list) \
                or not all(isinstance(i, str) for i in ids) or len(ids) > 10_000:
            raise ValidationFailed('give {"account": "…", "source": "…", "event_ids": [up to '
                                   '10000 strings]}')
        account = slug(account)
        keys = {event_key(source, account, i): i for i in ids}
        found = await asyncio.to_thread(self.ledger.known, chain_for(account), list(keys))
        return {"known": sorted(keys[k] for k in found)}

    async def cmd_equity(self, request: CommandRequest) -> list[dict[str, Any]]:
        """{"account": "…", "max_points": 1000} → the equity curve, oldest first."""
        account = await asyncio.to_thread(self._account, request)
        points = (request.model_extra or {}).get("max_points", 1000)
        if not isinstance(points, int) or not 2 <= points <= 100_000:
            raise ValidationFailed("max_points must be an integer from 2 to 100000")
        curve, _ = await asyncio.to_thread(self._on_book, account,
                                           lambda book: equity_curve(book, points))
        return curve

    async def cmd_fills(self, request: CommandRequest) -> list[dict[str, Any]]:
        """{"account": "…", "limit": 20} → the account's most recent ledger events, newest
        first: `{"seq", "ts", "event"}` (fills and cash flows)."""
        account = await asyncio.to_thread(self._account, request)
        limit = (request.model_extra or {}).get("limit", 20)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise ValidationFailed("limit must be an integer from 1 to 1000")

        def recent() -> list[dict[str, Any]]:
            chain = chain_for(account)
            head, _ = self.ledger.head(chain)
            rows = self.ledger.records(chain, since=max(head - limit, 0))
            return [{"seq": r["seq"], "ts": r["ts"], "event": r["data"]} for r in rows][::-1]

        return await asyncio.to_thread(recent)

    def status_text(self) -> str:
        return f"{self.stored} events stored, {self.duplicates} duplicates"
