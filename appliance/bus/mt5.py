"""Payloads of the MT5 wire protocol (docs/mt5_protocol.md): what the expert advisor (and its
simulator) sends, and what the `mt5-bridge` service answers."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import ConfigDict, Field

from appliance.bus.payloads import Payload
from appliance.bus.trade_event import ExactJson

Ticket = int
MAX_TICKETS = 5000


class MT5Deal(ExactJson, Payload):
    """One deal of the terminal's history, as `HistoryDeal*` reads it; its numbers exact.
    Keys a newer EA adds are ignored: a deal must never be refused for carrying more."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    ticket: Ticket = Field(gt=0)
    order: int = Field(0, ge=0)
    position: int = Field(0, ge=0)
    symbol: str = Field("", max_length=128)
    type: str = Field(min_length=1, max_length=40, pattern=r"^[a-z_]+$")
    entry: Literal["in", "out", "inout", "out_by", "state"] = "in"
    volume: Decimal = Field(Decimal(0), ge=0)
    price: Decimal = Field(Decimal(0), ge=0)
    profit: Decimal = Decimal(0)
    commission: Decimal = Decimal(0)
    swap: Decimal = Decimal(0)
    fee: Decimal = Decimal(0)
    magic: int = Field(0, ge=0)
    reason: str = Field("client", max_length=40)
    time_msc: int = Field(gt=0, description="ms since 1970 in the trade server's time")
    gmt_offset_s: int = Field(0, ge=-14 * 3600, le=14 * 3600,
                              description="the trade server's time minus UTC")
    currency: str = Field(min_length=1, max_length=16)
    comment: str = Field("", max_length=128)
    login: int | None = None


class MT5Snapshot(Payload):
    """The deal tickets of the terminal's recent history, and those still in its queue."""

    from_msc: int = Field(ge=0)
    to_msc: int = Field(ge=0)
    tickets: list[Ticket] = Field(max_length=MAX_TICKETS)
    pending: list[Ticket] = Field(default_factory=list, max_length=MAX_TICKETS)
    gmt_offset_s: int = Field(0, ge=-14 * 3600, le=14 * 3600)


class MT5Heartbeat(Payload):
    ts: str
    queue: int = Field(0, ge=0)
    halted: bool = False
    version: str = Field("", max_length=32)


class RejectedDeal(Payload):
    ticket: Ticket
    reason: str


class MT5Ack(Payload):
    """Deals the ledger holds (or refused for good): the EA drops them from its queue."""

    accepted: list[Ticket] = []
    rejected: list[RejectedDeal] = []


class MT5Resend(Payload):
    tickets: list[Ticket] = Field(max_length=MAX_TICKETS)


class MT5Gaps(Payload):
    """Deals the terminal has that are neither in the ledger nor in the EA's queue."""

    missing: list[Ticket]
    checked: int
    from_msc: int
    to_msc: int
    ts: str
