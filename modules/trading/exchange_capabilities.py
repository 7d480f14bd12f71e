"""The capability table: what differs between exchanges, by ccxt id, instead of
`if exchange == ...` around the code. Importable without ccxt; `modules.trading.exchange`
re-exports every name.

Live trading needs one capability above all: looking an order up by its client order id
(`fetch_order_by_client_id`). Execution re-sends an order whose fate is unknown (a send that
timed out, an order still `new` at a restart) only when the exchange says it does not know
the id. Where that lookup does not exist, the boundary searches the open orders and the last
closed ones; an order that is in neither (filled long ago, past the closed-order page) looks
unknown and would be sent twice. Such exchanges serve market data, but `require_live_ready`
refuses them for live trading.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import ConfigError


@dataclass(frozen=True)
class Capabilities:
    """What differs between exchanges, looked up in `CAPABILITIES` by ccxt id."""

    client_order_id_param: str = "clientOrderId"  # create_order's param naming our id
    client_order_id_query: str = "clientOrderId"  # fetch/cancel's param naming it
    # The exchange answers "which order has this client id?" with certainty, so "unknown"
    # means "never taken" and re-sending is safe. Else: searched among open and recent orders.
    fetch_order_by_client_id: bool = False
    ohlcv_limit: int = 500  # candles per fetch_ohlcv request
    client_order_id_max: int = 36
    # The ccxt option holding how long (ms) a signed request stays valid after it was sent;
    # once that has passed, a create that timed out can no longer be taken by the exchange.
    request_window_option: str | None = None
    # Texts of errors that refuse one order although ccxt files them under a generic error
    # (Binance's "Filter failure: NOTIONAL" is -1013, a plain ExchangeError for spot).
    order_refusals: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)  # ccxt options this boundary needs

    @property
    def live_ready(self) -> bool:
        """Orders may be sent live: an order whose send failed can be looked up safely
        before it is sent again (see the module docstring)."""
        return self.fetch_order_by_client_id

    @property
    def live_refusal(self) -> str:
        """Why live trading is refused on this exchange; "" when it is not."""
        if self.live_ready:
            return ""
        return ("Circles cannot look an order up by its client order id there (only among open "
                "and recent orders), so an order whose send failed could be sent twice; "
                f"live trading is possible on {', '.join(live_exchanges())}")


_BINANCE = Capabilities(
    client_order_id_param="newClientOrderId", client_order_id_query="origClientOrderId",
    fetch_order_by_client_id=True, ohlcv_limit=1000, client_order_id_max=36,
    request_window_option="recvWindow", order_refusals=("Filter failure:",),
    # Spot only: no futures/options market lists, no private currency list, no margin pairs.
    options={"fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False,
             "fetchMargins": False, "fetchOpenOrders": {"warnWithoutSymbol": False}})
CAPABILITIES: dict[str, Capabilities] = {
    "binance": _BINANCE,
    "binanceus": _BINANCE,
    "bybit": Capabilities(fetch_order_by_client_id=True, ohlcv_limit=1000),
    "okx": Capabilities(fetch_order_by_client_id=True, ohlcv_limit=300, client_order_id_max=32),
    "kucoin": Capabilities(ohlcv_limit=1500, client_order_id_max=40),  # market data only
}
DEFAULT_CAPABILITIES = Capabilities()  # any other ccxt id: market data only


def capabilities_for(exchange_id: str) -> Capabilities:
    return CAPABILITIES.get(exchange_id, DEFAULT_CAPABILITIES)


def live_exchanges() -> list[str]:
    """The ccxt ids live trading accepts, sorted."""
    return sorted(name for name, caps in CAPABILITIES.items() if caps.live_ready)


def require_live_ready(exchange_id: str, key: str = "execution.exchange.id") -> Capabilities:
    """The capabilities of `exchange_id` when it may be traded live; else ConfigError (exit
    78) naming the setting `key` and the reason. Needs no ccxt and no network: call it at
    start, before anything is sent."""
    caps = capabilities_for(exchange_id)
    if not caps.live_ready:
        raise ConfigError(f"config: {key}: {exchange_id!r} cannot be traded live: {caps.live_refusal}")
    return caps
