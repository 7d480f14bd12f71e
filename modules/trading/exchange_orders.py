"""Orders and candles as the ccxt boundary (`modules.trading.exchange`) hands them on:
ccxt's unified structures turned into small frozen types of Decimals. Importable without
ccxt; `modules.trading.exchange` re-exports `ExchangeOrder` and `Candle`."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

ORDER_STATUSES = {"open": "open", "closed": "closed", "canceled": "canceled",
                  "cancelled": "canceled", "rejected": "rejected", "expired": "expired",
                  "canceling": "open"}


@dataclass(frozen=True)
class ExchangeOrder:
    """One order as the exchange reports it. `status` is one of open, closed, canceled,
    rejected, expired."""

    id: str | None
    client_order_id: str
    symbol: str
    side: str
    amount: Decimal
    filled: Decimal
    average: Decimal | None
    status: str
    fee: Decimal
    fee_currency: str | None
    timestamp_ms: int | None


Candle = tuple[int, float, float, float, float, float]


def to_decimal(value: Any, default: Decimal | None = Decimal(0)) -> Decimal | None:
    """`value` (a number or a numeric string) as a Decimal; `default` when absent or not a number."""
    if value is None or value == "":
        return default
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return default


def order_from_ccxt(raw: dict[str, Any], *, client_order_id: str | None = None, symbol: str | None = None,
           side: str | None = None, amount: Decimal | None = None) -> ExchangeOrder:
    """An ExchangeOrder from ccxt's unified order; the keywords fill what the exchange left out."""
    fee, fee_currency = Decimal(0), None
    fees = [f for f in (raw.get("fees") or ([raw["fee"]] if raw.get("fee") else [])) if f]
    if fees:
        fee_currency = fees[0].get("currency")
        fee = sum((to_decimal(f.get("cost")) or Decimal(0) for f in fees
                   if f.get("currency") == fee_currency), Decimal(0))
    filled = to_decimal(raw.get("filled")) or Decimal(0)
    average = to_decimal(raw.get("average"), None)
    if average is not None and (average == 0 and filled == 0):
        average = None
    status = ORDER_STATUSES.get(str(raw.get("status") or "open"), "open")
    return ExchangeOrder(
        id=None if raw.get("id") is None else str(raw["id"]),
        client_order_id=str(raw.get("clientOrderId") or client_order_id or ""),
        symbol=str(raw.get("symbol") or symbol or ""),
        side=str(raw.get("side") or side or ""),
        amount=to_decimal(raw.get("amount"), amount) or Decimal(0),
        filled=filled, average=average, status=status, fee=fee, fee_currency=fee_currency,
        timestamp_ms=None if raw.get("timestamp") is None else int(raw["timestamp"]))
