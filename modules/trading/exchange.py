"""The ccxt boundary: the one file of Circles that talks to ccxt.

Every call to the exchange goes through `Exchange._call`, which translates ccxt's
exceptions into Circles' tree (and nowhere else does), waits out rate limits, retries
temporary failures with exponential backoff and keeps a circuit breaker. ccxt itself is
imported lazily, inside `Exchange.open`: it costs ~80 MB and half a second, and a service
that never trades must not pay for it.

Orders are never sent twice blindly: when a create fails in a way that leaves its fate
unknown (a timeout, a dropped connection, a 5xx), the exchange is asked for the client
order id first, and the order is sent again only when the exchange does not know it.

What it raises is in `exchange_errors`, what differs between exchanges (and which of them
may be traded live) in `exchange_capabilities`, the order type it hands on in
`exchange_orders`; every name is re-exported from here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import Field

from appliance import logging as circles_logging
from appliance.config import Section
from modules.trading.exchange_capabilities import (
    CAPABILITIES,
    DEFAULT_CAPABILITIES,
    Capabilities,
    capabilities_for,
    live_exchanges,
    require_live_ready,
)
from modules.trading.exchange_errors import (
    CircuitOpen,
    DuplicateOrder,
    ExchangeError,
    ExchangeFailure,
    ExchangeUnavailable,
    OrderNotFound,
    OrderRejected,
    RateLimited,
    UnknownExchange,
)
from modules.trading.exchange_orders import Candle, ExchangeOrder, order_from_ccxt, to_decimal

# The errors, the capability table and the order type live in their own modules; every
# name stays importable from here, the one boundary module callers know.
__all__ = [
    "CAPABILITIES", "DEFAULT_CAPABILITIES", "Candle", "Capabilities", "CircuitOpen",
    "DuplicateOrder", "Exchange", "ExchangeError", "ExchangeFailure", "ExchangeOrder",
    "ExchangeSettings", "ExchangeUnavailable", "OrderNotFound", "OrderRejected", "RateLimited",
    "UnknownExchange", "capabilities_for", "import_ccxt", "live_exchanges", "require_live_ready",
]

log = logging.getLogger("circles.exchange")
T = TypeVar("T")
# Without a Retry-After, a rate-limited call waits this many times the exchange's own
# spacing between requests (ccxt's `rateLimit`), doubled on each further refusal.
RATE_LIMIT_FACTOR = 20
DUPLICATE_TEXT = "duplicat"  # "duplicate", "duplicated" in the exchanges' own messages


def import_ccxt() -> tuple[Any, Any]:
    """ccxt's asyncio module and its errors module, imported at the first call (lazily: see
    the module docstring). That first import takes ~0.5 s: an event loop that must not stall
    runs it in a thread first (`asyncio.to_thread(import_ccxt)`)."""
    import ccxt.async_support as ccxt_async
    from ccxt.base import errors

    return ccxt_async, errors


class ExchangeSettings(Section):
    """How to reach one exchange through ccxt: `[market.ccxt]` (the market service's exchange
    source) and `[execution.exchange]` (live execution). Credentials are not settings: they
    are passed to `Exchange.open` from the secret store."""

    id: str = Field("binance", min_length=1, description="the ccxt exchange id")
    urls: dict[str, Any] = Field(default_factory=dict,
                                 description="deep-merged into the ccxt client's `urls` "
                                             "(tests point `api` at 127.0.0.1)")
    options: dict[str, Any] = Field(default_factory=dict, description="merged into ccxt options")
    timeout_ms: int = Field(10_000, ge=100)
    sandbox: bool = False
    retries: int = Field(4, ge=0, description="temporary errors retried with exponential backoff")
    backoff_s: float = Field(0.5, ge=0)
    breaker_failures: int = Field(5, ge=1, description="consecutive failures that open the breaker")
    breaker_reset_s: float = Field(60.0, ge=0)
    rate_limit_max_wait_s: float = Field(60.0, ge=0, description=(
        "a rate limit asking for a longer pause is raised at once (RateLimited) instead"))


class Exchange:
    """One ccxt client with Circles' error policy. Open with `await Exchange.open(...)`,
    close with `await exchange.close()`."""

    def __init__(self, settings: ExchangeSettings, client: Any, errors: Any) -> None:
        self.settings = settings
        self.id = settings.id
        self.capabilities = capabilities_for(settings.id)
        self._client = client
        self._errors = errors  # the ccxt.base.errors module, imported with ccxt
        self._failures = 0
        self._open_until = 0.0  # the breaker fails fast until this monotonic time
        self._blocked_until = 0.0  # the exchange asked for silence until then

    def __repr__(self) -> str:
        return f"Exchange({self.id!r})"

    @classmethod
    async def open(cls, settings: ExchangeSettings, *, api_key: str | None = None,
                   secret: str | None = None) -> Exchange:
        """A client for `settings.id` (rate limiting on) with its markets loaded. Raises
        UnknownExchange (an ExchangeFailure) for an id ccxt does not know, and
        ExchangeUnavailable when the exchange cannot be reached after the retries."""
        circles_logging.redact(api_key)
        circles_logging.redact(secret)
        ccxt_async, errors = import_ccxt()

        client_cls = getattr(ccxt_async, settings.id, None)
        if client_cls is None or not isinstance(client_cls, type):
            raise UnknownExchange(f"ccxt knows no exchange {settings.id!r}")
        caps = capabilities_for(settings.id)
        config: dict[str, Any] = {"enableRateLimit": True, "timeout": settings.timeout_ms,
                                  "options": _deep_merge(dict(caps.options), settings.options)}
        if api_key:
            config["apiKey"] = api_key
        if secret:
            config["secret"] = secret
        client = client_cls(config)
        _classify_http_status(client, errors)
        if settings.sandbox:
            client.set_sandbox_mode(True)
        if settings.urls:  # after the sandbox switch, which replaces urls["api"]
            client.urls = _deep_merge(client.urls, settings.urls)
        exchange = cls(settings, client, errors)
        try:
            await exchange._call("load_markets", client.load_markets)
        except BaseException:
            await client.close()
            raise
        return exchange

    async def close(self) -> None:
        """Close the HTTP session; the Exchange is unusable afterwards."""
        await self._client.close()

    # -- market data -------------------------------------------------------------------------
    @property
    def symbols(self) -> list[str]:
        """The unified symbols of the loaded markets."""
        return list(self._client.symbols or [])

    @property
    def timeframes(self) -> list[str]:
        return list((self._client.timeframes or {}).keys())

    @property
    def rate_limit_s(self) -> float:
        """The spacing ccxt keeps between two requests to this exchange."""
        return float(self._client.rateLimit or 0) / 1000

    async def fetch_ohlcv(self, symbol: str, timeframe: str, since_ms: int | None = None,
                          limit: int | None = None) -> list[Candle]:
        """Candles (open time ms, open, high, low, close, volume), oldest first. The last one
        may still be forming: the caller decides what is closed."""
        rows = await self._call("fetch_ohlcv", self._client.fetch_ohlcv, symbol, timeframe,
                                since_ms, limit)
        return [(int(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4]),
                 float(r[5] or 0.0)) for r in rows]

    # -- account -----------------------------------------------------------------------------
    async def fetch_balance(self) -> dict[str, Decimal]:
        """The total (free + used) of every currency the exchange reports."""
        raw = await self._call("fetch_balance", self._client.fetch_balance)
        return {code: to_decimal(total) or Decimal(0) for code, total in (raw.get("total") or {}).items()}

    async def create_order(self, symbol: str, side: str, amount: Decimal, client_order_id: str,
                           *, type: str = "market", price: Decimal | None = None) -> ExchangeOrder:
        """Place an order under `client_order_id` (the idempotency key at the exchange).
        When the outcome of a send is unknown (timeout, network, 5xx), the exchange is asked
        for the id before any new send — on Binance only once the request's recvWindow has
        passed, so a late request can no longer be taken — and the order is sent again only
        when the exchange does not know it. A refused duplicate id returns the order the
        exchange already holds.
        Raises OrderRejected (this order fails), RateLimited/ExchangeUnavailable (its fate
        may be unknown: ask `fetch_order` before sending it again) or ExchangeFailure."""
        if not 0 < len(client_order_id) <= self.capabilities.client_order_id_max:
            raise OrderRejected(f"client order id {client_order_id!r} must be 1.."
                                f"{self.capabilities.client_order_id_max} characters")
        params = {self.capabilities.client_order_id_param: client_order_id}
        args = (symbol, type, side, float(amount), None if price is None else float(price), params)
        attempt = 0
        while True:
            sent_at = time.monotonic()
            try:
                raw = await self._call("create_order", self._client.create_order, *args,
                                       retry_unavailable=False)
                return order_from_ccxt(raw, client_order_id=client_order_id, symbol=symbol, side=side,
                              amount=amount)
            except CircuitOpen:
                raise  # nothing sent now, and any earlier send was confirmed not taken
            except ExchangeUnavailable as exc:
                attempt += 1
                log.warning("order send failed; asking the exchange whether it took it",
                            extra={"client_order_id": client_order_id, "error": str(exc)})
                await asyncio.sleep(max(self._backoff(attempt), self._request_window_left(sent_at)))
                known = await self.fetch_order(symbol, client_order_id)
                if known is not None:
                    return known
                if attempt > self.settings.retries:
                    raise
            except DuplicateOrder:
                known = await self.fetch_order(symbol, client_order_id)
                if known is None:
                    raise
                return known

    async def fetch_order(self, symbol: str, client_order_id: str) -> ExchangeOrder | None:
        """The order placed under `client_order_id`, or None when the exchange does not know it."""
        if not self.capabilities.fetch_order_by_client_id:
            return await self._search_order(symbol, client_order_id)
        params = {self.capabilities.client_order_id_query: client_order_id}
        try:
            raw = await self._call("fetch_order", self._client.fetch_order, None, symbol, params)
        except OrderNotFound:
            return None
        return order_from_ccxt(raw, client_order_id=client_order_id, symbol=symbol)

    async def _search_order(self, symbol: str, client_order_id: str) -> ExchangeOrder | None:
        # Not authoritative: an order in neither list (filled long ago, past the page) looks
        # unknown. Hence such exchanges are refused for live trading (`require_live_ready`).
        for order in await self.fetch_open_orders(symbol):
            if order.client_order_id == client_order_id:
                return order
        if self._client.has.get("fetchClosedOrders"):
            raws = await self._call("fetch_closed_orders", self._client.fetch_closed_orders,
                                    symbol, None, 100)
            for raw in raws:
                if raw.get("clientOrderId") == client_order_id:
                    return order_from_ccxt(raw, symbol=symbol)
        return None

    async def fetch_open_orders(self, symbol: str | None = None) -> list[ExchangeOrder]:
        """The account's open orders (of one symbol, or all)."""
        raws = await self._call("fetch_open_orders", self._client.fetch_open_orders, symbol)
        return [order_from_ccxt(raw, symbol=symbol) for raw in raws]

    async def cancel_order(self, symbol: str, client_order_id: str) -> ExchangeOrder | None:
        """Cancel the order placed under `client_order_id` and return it as it stands; an
        order that can no longer be cancelled (filled, already cancelled) is returned as the
        exchange reports it, an unknown one as None."""
        order_id = None
        if not self.capabilities.fetch_order_by_client_id:  # cancelled by the exchange's id
            known = await self._search_order(symbol, client_order_id)
            if known is None or known.status != "open":
                return known
            order_id = known.id
        params = {self.capabilities.client_order_id_query: client_order_id}
        try:
            raw = await self._call("cancel_order", self._client.cancel_order, order_id, symbol,
                                   params)
        except OrderRejected:  # unknown, or filled or cancelled meanwhile: say how it ended
            return await self.fetch_order(symbol, client_order_id)
        # A cancel answer may carry the cancel request's own client id; ours is the order's.
        return replace(order_from_ccxt(raw, symbol=symbol), client_order_id=client_order_id)

    # -- precision ---------------------------------------------------------------------------
    def amount_to_precision(self, symbol: str, amount: Decimal) -> Decimal:
        """`amount` truncated to what the market accepts; 0 when less than one step."""
        try:
            return Decimal(self._client.amount_to_precision(symbol, format(amount, "f")))
        except self._errors.InvalidOrder:
            return Decimal(0)
        except self._errors.BadSymbol as exc:
            raise OrderRejected(str(exc)) from None

    def min_amount(self, symbol: str) -> Decimal:
        """The smallest order amount of the market (0 when the exchange sets none)."""
        return self._limit(symbol, "amount")

    def min_cost(self, symbol: str) -> Decimal:
        """The smallest order value in the quote currency (0 when the exchange sets none)."""
        return self._limit(symbol, "cost")

    def _limit(self, symbol: str, kind: str) -> Decimal:
        market = self._client.markets.get(symbol) if self._client.markets else None
        if market is None:
            raise OrderRejected(f"{self.id} has no market {symbol!r}")
        return to_decimal(((market.get("limits") or {}).get(kind) or {}).get("min")) or Decimal(0)

    # -- the one way out ---------------------------------------------------------------------
    async def _call(self, what: str, method: Callable[..., Awaitable[T]], *args: Any,
                    retry_unavailable: bool = True) -> T:
        """Call one ccxt method with the boundary's policy: ccxt's exceptions translated,
        rate limits waited out, temporary failures retried, the breaker kept."""
        unavailable = limited = 0
        while True:
            await self._before_attempt(what)
            try:
                result = await method(*args)
            except self._errors.BaseError as exc:
                error = self._translate(what, exc)
                cause: BaseException = exc
            except (OSError, TimeoutError) as exc:
                error, cause = ExchangeUnavailable(f"{self.id} {what}: {exc!r}"), exc
            else:
                self._failures = 0
                return result
            if isinstance(error, RateLimited):
                limited += 1
                self._blocked_until = max(self._blocked_until, time.monotonic() + error.retry_after_s)
                if limited > self.settings.retries or \
                        error.retry_after_s > self.settings.rate_limit_max_wait_s:
                    raise error from cause
                log.warning("rate limited", extra={"call": what, "wait_s": error.retry_after_s})
                continue  # _before_attempt waits
            if isinstance(error, ExchangeUnavailable):
                self._record_failure()
                unavailable += 1
                if not retry_unavailable or unavailable > self.settings.retries:
                    raise error from cause
                delay = self._backoff(unavailable)
                log.warning("exchange unavailable, retrying",
                            extra={"call": what, "error": str(error), "retry_in_s": delay})
                await asyncio.sleep(delay)
                continue
            if isinstance(error, OrderRejected):
                self._failures = 0  # the exchange answered
            raise error from cause

    def _translate(self, what: str, exc: Exception) -> ExchangeError:
        e = self._errors
        text = f"{self.id} {what}: {type(exc).__name__}: {exc}"
        if isinstance(exc, e.RateLimitExceeded | e.DDoSProtection):
            return RateLimited(text, self._retry_after(exc))
        if isinstance(exc, e.OrderNotFound):
            return OrderNotFound(text)
        if isinstance(exc, e.DuplicateOrderId):
            return DuplicateOrder(text)
        if what == "create_order" and isinstance(exc, e.InvalidOrder | e.BadRequest) and \
                DUPLICATE_TEXT in str(exc).lower():
            # Fallback: the ccxt classes of binance, bybit, okx and kucoin map their
            # "duplicate client order id" codes to a plain InvalidOrder/BadRequest (Binance's
            # -2010 "Duplicate order sent." is also its code for "insufficient balance"), so
            # only the exchange's own text tells a duplicate from a refusal.
            return DuplicateOrder(text)
        if isinstance(exc, e.InsufficientFunds | e.InvalidOrder | e.BadSymbol | e.OperationRejected):
            return OrderRejected(text)
        if what == "create_order" and isinstance(exc, e.BadRequest):
            return OrderRejected(text)  # the exchange refused this order's parameters
        if isinstance(exc, e.ExchangeError) and any(
                refusal in str(exc) for refusal in self.capabilities.order_refusals):
            return OrderRejected(text)
        # OperationFailed is ccxt's "may succeed when retried": network errors, timeouts,
        # maintenance, and the exchange's own internal errors.
        if isinstance(exc, e.NetworkError | e.OperationFailed):
            return ExchangeUnavailable(text)
        return ExchangeFailure(text)  # authentication, permissions, and all not understood

    def _retry_after(self, exc: Exception) -> float:
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is None:
            retry_after = _retry_after_header(self._client.last_response_headers)
        return self.rate_limit_s * RATE_LIMIT_FACTOR if retry_after is None else retry_after

    def _backoff(self, attempt: int) -> float:
        return self.settings.backoff_s * 2 ** (attempt - 1)

    def _request_window_left(self, sent_at: float) -> float:
        option = self.capabilities.request_window_option
        window_ms = self._client.options.get(option) if option else None
        if not window_ms:
            return 0.0
        return max(0.0, sent_at + float(window_ms) / 1000 - time.monotonic())

    async def _before_attempt(self, what: str) -> None:
        now = time.monotonic()
        if self._failures >= self.settings.breaker_failures and now < self._open_until:
            raise CircuitOpen(
                f"{self.id} {what}: circuit open after {self._failures} failures in a row; "
                f"next try in {self._open_until - now:.1f} s")
        wait = self._blocked_until - now
        if wait > self.settings.rate_limit_max_wait_s:
            raise RateLimited(f"{self.id} {what}: rate limited for {wait:.1f} s more", wait)
        if wait > 0:
            await asyncio.sleep(wait)

    def _record_failure(self) -> None:
        self._failures += 1
        if self._failures >= self.settings.breaker_failures:
            if self._failures == self.settings.breaker_failures:
                log.error("circuit breaker open", extra={"exchange": self.id,
                                                         "for_s": self.settings.breaker_reset_s})
            # Open (or, after a failed trial call, open again) for the full reset period.
            self._open_until = time.monotonic() + self.settings.breaker_reset_s


def _classify_http_status(client: Any, errors: Any) -> None:
    """Let the HTTP status class decide before the exchange's error codes do: every 5xx
    is "unavailable" (the request's fate is unknown) and 418/429 are rate limits carrying
    their Retry-After, whatever code the body holds (ccxt maps unknown codes to a generic
    ExchangeError, which would otherwise stop the service)."""
    original = client.handle_errors

    def handle_errors(code: int, reason: str, url: str, method: str, headers: Any, body: Any,
                      *rest: Any) -> Any:
        text = f"{client.id} {method} {url.split('?')[0]}: HTTP {code} {reason} {str(body)[:200]}"
        if code in (418, 429):
            error = errors.RateLimitExceeded(text)
            error.retry_after_s = _retry_after_header(headers)
            raise error
        if code >= 500:
            raise errors.ExchangeNotAvailable(text)
        return original(code, reason, url, method, headers, body, *rest)

    client.handle_errors = handle_errors


def _retry_after_header(headers: Mapping[str, Any] | None) -> float | None:
    for name, value in (headers or {}).items():
        if name.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
