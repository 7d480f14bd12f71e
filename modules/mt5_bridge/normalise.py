"""An MT5 deal as a TRADE_EVENT (docs/mt5_protocol.md, docs/trade_event.md).

- The event id is `<account>:<ticket>`, so a re-sent deal is a duplicate in the ledger.
- The account is the topic's (the broker's identity of the EA), never the payload's.
- Buys and sells are fills in lots at the deal's price. MT5 computes each deal's profit
  itself, so it travels as `realized_pnl`; the ledger subtracts `fee`. Charges (commission
  and fee, negative in MT5) become the `fee`; a rebate (positive) is added to the profit
  instead, since a fee cannot be negative. Net PnL is profit + commission + swap + fee.
- Balance operations (deposits, withdrawals, credit, bonus, corrections) are cash flows
  in the account's currency: they move equity, never PnL.
- The deal's time is the trade server's: UTC is `time_msc / 1000 - gmt_offset_s`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from appliance.bus.mt5 import MT5Deal
from appliance.bus.topics import describe
from appliance.bus.trade_event import MAX_FUTURE, TradeEvent
from appliance.errors import TemporaryError, ValidationFailed

FILLS = ("buy", "sell")
CASH_FLOWS = ("balance", "credit", "bonus", "correction")


def event_id(account: str, ticket: int) -> str:
    return f"{account}:{ticket}"


def ticket_of(account: str, event_id: str) -> int | None:
    """The deal ticket of an event id made by `event_id`, or None for another account's."""
    prefix, _, ticket = event_id.rpartition(":")
    return int(ticket) if prefix == account and ticket.isdigit() else None


def to_event(account: str, deal: MT5Deal) -> TradeEvent:
    """The TRADE_EVENT of a deal; ValidationFailed when the deal is not one the ledger keeps
    (a cancelled deal, a fill of no volume), TemporaryError when it cannot be kept yet."""
    ts = datetime.fromtimestamp(deal.time_msc / 1000 - deal.gmt_offset_s, UTC)
    if ts - datetime.now(UTC) > MAX_FUTURE:
        # Not the deal's fault: this box's clock may not be set yet (a Pi without a
        # real-time clock before NTP). Refusing it would make the EA drop it for good.
        raise TemporaryError(f"deal {deal.ticket}: its time {ts.isoformat()} is ahead of this "
                             "box's clock; it will come again")
    extra: dict[str, Any] = {"ticket": deal.ticket, "type": deal.type, "entry": deal.entry,
                             "reason": deal.reason, "magic": deal.magic,
                             "profit": deal.profit, "commission": deal.commission,
                             "swap": deal.swap, "fee": deal.fee}
    if deal.comment:
        extra["comment"] = deal.comment
    if deal.login is not None:
        extra["login"] = deal.login
    common: dict[str, Any] = {"event_id": event_id(account, deal.ticket), "source": "mt5",
                              "account_id": account, "ts": ts, "extra": extra}
    try:
        if deal.type in FILLS:
            charges = deal.commission + deal.fee
            gross = deal.profit + deal.swap
            fee, realized = (-charges, gross) if charges <= 0 else (Decimal(0), gross + charges)
            return TradeEvent(
                kind="fill", side=deal.type, symbol=deal.symbol, qty=deal.volume,
                # The fee is in the account currency (fee_currency names no asset of the symbol).
                price=deal.price, fee=fee, realized_pnl=realized,
                strategy_id=f"magic-{deal.magic}" if deal.magic else "manual",
                order_id=str(deal.order) if deal.order else None,
                position_id=str(deal.position) if deal.position else None, **common)
        if deal.type in CASH_FLOWS:
            if deal.profit == 0:
                raise ValidationFailed(f"deal {deal.ticket}: a {deal.type} operation of 0")
            return TradeEvent(kind="deposit" if deal.profit > 0 else "withdrawal",
                              symbol=deal.currency, qty=abs(deal.profit), price=Decimal(1),
                              **common)
    except ValidationError as exc:
        raise ValidationFailed(f"deal {deal.ticket}: {describe(exc)}") from None
    raise ValidationFailed(f"deal {deal.ticket}: type {deal.type!r} is neither a trade nor a "
                           f"balance operation ({', '.join(FILLS + CASH_FLOWS)})")
