"""What the ccxt boundary (`modules.trading.exchange`) raises: Circles' exceptions, never
ccxt's. Importable without ccxt; `modules.trading.exchange` re-exports every name."""

from __future__ import annotations

from appliance.errors import CirclesError, OperationalError, TemporaryError


class ExchangeError(CirclesError):
    """Base of what the boundary raises (never a ccxt exception)."""


class RateLimited(ExchangeError, TemporaryError):
    """The exchange asked us to slow down; `retry_after_s` says for how long."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ExchangeUnavailable(ExchangeError, TemporaryError):
    """Network error, timeout, 5xx, maintenance, or the circuit breaker is open."""


class CircuitOpen(ExchangeUnavailable):
    """Failed fast: the breaker is open after too many failures in a row; nothing was sent."""


class OrderRejected(ExchangeError):
    """This order (or this request about one order) was refused: insufficient funds, an
    invalid order, an amount below the minimum, an unknown symbol. The service goes on."""


class OrderNotFound(OrderRejected):
    """The exchange does not know that order."""


class DuplicateOrder(OrderRejected):
    """The exchange refused a new order because it already holds one under that client
    order id. `Exchange.create_order` answers it with the order the exchange holds; it
    raises it only when the exchange then cannot show that order."""


class ExchangeFailure(ExchangeError, OperationalError):
    """Authentication refused, a permission missing, anything not understood: report and stop."""


class UnknownExchange(ExchangeFailure):
    """ccxt has no exchange of that id (a configuration mistake)."""
