"""The trade journal over HTTP: ingest TRADE_EVENTs, read metrics and the equity curve.

These routes never touch the ledger: they publish to the bus and wait for the trade
logger, which is the only writer.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import ValidationError

from appliance.bus.topics import describe, slug
from appliance.bus.trade_event import MAX_EVENT_BYTES, AcceptedEvent, TradeEvent, parse_json
from appliance.errors import TemporaryError, ValidationFailed
from appliance.panel.deps import ApiAccount, PanelDep, SenderDep, TimeoutDep

router = APIRouter(prefix="/api/v1", tags=["trades"])
MAX_EVENTS = 1000
TRADE_LOGGER = "trade-logger"
log = logging.getLogger("circles.panel")


def _parse(body: bytes) -> Any:
    try:
        return parse_json(body)
    except ValidationFailed as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None


def _validate(items: list[Any], account: str) -> list[TradeEvent]:
    events, errors = [], []
    for index, item in enumerate(items):
        try:
            event = TradeEvent.model_validate(item)
        except ValidationError as exc:
            errors.append({"index": index, "reason": describe(exc)})
            continue
        if len(event.model_dump_json()) > MAX_EVENT_BYTES:
            errors.append({"index": index, "reason": f"event exceeds {MAX_EVENT_BYTES} bytes"})
        elif event.account != account:
            errors.append({"index": index, "reason": f"this API key is for account {account!r}, "
                                                      f"not {event.account_id!r}"})
        else:
            events.append(event)
    if errors:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, errors)
    return events


@router.post("/trade_events")
async def post_trade_events(request: Request, response: Response, account: ApiAccount,
                            sender: SenderDep, timeout: TimeoutDep) -> Any:
    """One TRADE_EVENT or a list of up to 1000 (docs/trade_event.md). Answers once the trade
    logger has committed them: `{"status": "ok", "seq": …, "hash": …}` per event."""
    body = await request.body()
    if len(body) > MAX_EVENT_BYTES * MAX_EVENTS:
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, "request body too large")
    doc = _parse(body)
    items = doc if isinstance(doc, list) else [doc]
    if not 1 <= len(items) <= MAX_EVENTS:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                            f"send 1 to {MAX_EVENTS} events, not {len(items)}")
    events = _validate(items, account)
    log.info("trade events received", extra={"account": account, "events": len(events)})
    try:
        outcomes = await sender.send(events, timeout=timeout)
    except TemporaryError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    results = []
    for outcome in outcomes:
        if isinstance(outcome, AcceptedEvent):
            results.append({"status": "ok", "event_id": outcome.event_id, "seq": outcome.seq,
                            "hash": outcome.hash, "duplicate": outcome.duplicate})
        else:
            response.status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
            results.append({"status": "rejected", "event_id": outcome.event_id,
                            "reason": outcome.reason})
    return results if isinstance(doc, list) else results[0]


def _own(account: str, wanted: str) -> str:
    try:
        wanted = slug(wanted)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"account: {exc}") from None
    if wanted != account:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"this API key is for account {account!r}")
    return account


@router.get("/metrics")
async def get_metrics(account: ApiAccount, panel: PanelDep,
                      account_id: str = Query(alias="account")) -> Any:
    """The account's metrics (docs/metrics.md)."""
    return await panel.ask(TRADE_LOGGER, "metrics", {"account": _own(account, account_id)})


@router.get("/equity")
async def get_equity(account: ApiAccount, panel: PanelDep,
                     account_id: str = Query(alias="account"),
                     max_points: int = Query(1000, ge=2, le=100_000)) -> Any:
    """The account's equity curve, oldest first: `[{"ts": …, "equity": …}, …]`."""
    return await panel.ask(TRADE_LOGGER, "equity", {"account": _own(account, account_id),
                                                    "max_points": max_points})
