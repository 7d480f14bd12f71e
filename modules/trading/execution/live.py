"""Live trading: the execution service's path to a real exchange (`modules.trading.exchange`).

Imported only in live mode. What lives here: reading the credentials, and
turning what the exchange reports about an order into our order's next state and the fill
it adds. The order of operations that makes a crash harmless is the service's: an order is
written as `new` before it is sent, and a `new` order whose send may have happened is looked
up by its client order id before it is sent again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from appliance.bus.trading import OrderStatus
from appliance.errors import ConfigError
from appliance.security.secrets import read_secret
from modules.trading.exchange import ExchangeOrder
from modules.trading.execution.orders import ZERO, Fill, OrderRow, base_currency, rounded, text

STATUSES: dict[str, OrderStatus] = {"closed": "filled", "canceled": "cancelled",
                                    "expired": "cancelled", "rejected": "rejected"}


def secret_names(account: str) -> tuple[str, str]:
    """The secret store names of an account's API key and secret (`account` as a topic
    level: `exchange-main-api-key`)."""
    return f"exchange-{account}-api-key", f"exchange-{account}-secret"


def credentials(account: str, state_dir: Path) -> tuple[str, str]:
    """The account's API key and secret ($CREDENTIALS_DIRECTORY first, then the encrypted
    store); ConfigError naming the secret that is missing."""
    values = []
    for name in secret_names(account):
        value = read_secret(name, state_dir)
        if not value:
            raise ConfigError(f"config: execution: live trading needs the secret {name} "
                              f"(`circles secrets set {name}`, or a systemd credential)")
        values.append(value)
    return values[0], values[1]


@dataclass(frozen=True)
class Absorbed:
    """What an exchange report changes: the order's status, and the quantity filled since
    we last looked as one fill (None when nothing new filled)."""

    status: OrderStatus
    fill: Fill | None
    exchange_order_id: str | None


def absorb(order: OrderRow, seen: ExchangeOrder, *, now: datetime | None = None) -> Absorbed:
    """Compare the exchange's report of `order` with what we recorded. The exchange's
    `filled`, `average` and `fee` are cumulative, so the new fill is the difference: its
    price is what makes the total cost match, its fee what the fee grew by (a report
    without fees, as Binance's order query, never lowers what we recorded)."""
    status = STATUSES.get(seen.status) or ("partial" if seen.filled > 0 else "open")
    fill = None
    grown = seen.filled - order.filled
    if grown > 0 and seen.average is not None:
        cost = seen.average * seen.filled - (order.avg_price or ZERO) * order.filled
        price = rounded(cost / grown) if cost > 0 else seen.average
        same = seen.fee_currency is None or order.fee_currency in (None, seen.fee_currency)
        fee = max(seen.fee - order.fee, ZERO) if same else seen.fee
        ts = datetime.fromtimestamp(seen.timestamp_ms / 1000, UTC) if seen.timestamp_ms \
            else (now or datetime.now(UTC))
        fill = Fill(qty=grown, price=price, fee=rounded(fee), ts=ts,
                    fee_currency=seen.fee_currency or order.fee_currency)
    elif grown > 0:
        status = order.status  # filled without a price yet: take it when the price comes
    return Absorbed(status, fill, seen.id or order.exchange_order_id)


def base_balances(balances: dict[str, Decimal], held: dict[str, Decimal],
                  tolerance: Decimal) -> list[dict[str, str]]:
    """Where the exchange's base-currency totals differ from our positions (symbol → signed
    qty), by more than `tolerance`: one entry per symbol, for a person to look at."""
    found = []
    for symbol, qty in sorted(held.items()):
        currency = base_currency(symbol)
        total = balances.get(currency, ZERO)
        if abs(total - qty) > tolerance:
            found.append({"symbol": symbol, "currency": currency, "ours": text(qty),
                          "exchange": text(total), "difference": text(total - qty)})
    return found
