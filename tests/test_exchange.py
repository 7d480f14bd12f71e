"""The ccxt boundary: the real ccxt library against the fake Binance, never the internet."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from ccxt.base import errors as ccxt_errors

from appliance.errors import ConfigError
from appliance.logging import JsonFormatter
from modules.trading.exchange import (
    DuplicateOrder,
    Exchange,
    ExchangeFailure,
    ExchangeSettings,
    ExchangeUnavailable,
    OrderRejected,
    RateLimited,
    capabilities_for,
    require_live_ready,
)
from tests.fake_exchange import (
    API_KEY,
    SECRET,
    FakeExchange,
    fake_exchange_fixture,  # noqa: F401
)

ROOT = Path(__file__).resolve().parent.parent
BTC = "BTC/USDT"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any name lookup but the loopback's fails: the fake is the only host these tests reach."""
    original = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", "localhost", b"127.0.0.1", None):
            raise OSError(f"test tried to reach {host!r}")
        return original(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


@asynccontextmanager
async def opened(fake: FakeExchange, *, api_key: str | None = API_KEY, secret: str | None = SECRET,
                 **settings: Any) -> AsyncIterator[Exchange]:
    options = settings.pop("options", {})
    config = ExchangeSettings(urls=fake.urls(), backoff_s=0.01, options=options, **settings)
    exchange = await Exchange.open(config, api_key=api_key, secret=secret)
    try:
        yield exchange
    finally:
        await exchange.close()


def paths(fake: FakeExchange) -> set[str]:
    return {path for _, path in fake.requests}


async def test_markets_ohlcv_and_balance(fake_exchange: FakeExchange) -> None:
    async with opened(fake_exchange) as ex:
        assert set(ex.symbols) == {BTC, "ETH/USDT"}
        assert ex.capabilities.client_order_id_param == "newClientOrderId"
        assert ex.min_amount(BTC) == Decimal("0.00001") and ex.min_cost(BTC) == Decimal(5)
        assert ex.amount_to_precision(BTC, Decimal("0.123456789")) == Decimal("0.12345")
        assert ex.amount_to_precision(BTC, Decimal("0.000001")) == 0
        candles = await ex.fetch_ohlcv(BTC, "1m", limit=5)
        assert len(candles) == 5
        assert [c[0] for c in candles] == sorted(c[0] for c in candles)
        assert all(c[0] % 60_000 == 0 and c[3] <= min(c[1], c[4]) <= max(c[1], c[4]) <= c[2]
                   for c in candles)
        since = candles[0][0]
        assert (await ex.fetch_ohlcv(BTC, "1m", since_ms=since, limit=2))[0][0] == since
        balance = await ex.fetch_balance()
        assert balance["USDT"] == Decimal(10000) and balance["BTC"] == 0
    # Spot markets only, no currencies (a private sapi call), everything on the fake.
    assert paths(fake_exchange) == {"/api/v3/exchangeInfo", "/api/v3/klines", "/api/v3/account"}
    assert fake_exchange.calls("/api/v3/exchangeInfo") == 1


async def test_create_fetch_cancel_and_open_orders(fake_exchange: FakeExchange) -> None:
    fake_exchange.prices["BTCUSDT"] = Decimal(50000)
    async with opened(fake_exchange) as ex:
        order = await ex.create_order(BTC, "buy", Decimal("0.01"), "c-market-1")
        assert (order.status, order.filled, order.average) == ("closed", Decimal("0.01"), Decimal(50000))
        assert order.fee == Decimal("0.5") and order.fee_currency == "USDT"
        assert order.client_order_id == "c-market-1" and order.id
        again = await ex.fetch_order(BTC, "c-market-1")
        assert again is not None and (again.id, again.status) == (order.id, "closed")
        assert await ex.fetch_order(BTC, "never-sent") is None

        limit = await ex.create_order(BTC, "buy", Decimal("0.01"), "c-limit-1", type="limit",
                                      price=Decimal(40000))
        assert limit.status == "open" and limit.filled == 0
        assert [o.client_order_id for o in await ex.fetch_open_orders(BTC)] == ["c-limit-1"]
        assert [o.client_order_id for o in await ex.fetch_open_orders()] == ["c-limit-1"]
        cancelled = await ex.cancel_order(BTC, "c-limit-1")
        assert cancelled is not None and cancelled.status == "canceled"
        assert cancelled.client_order_id == "c-limit-1"
        assert await ex.fetch_open_orders(BTC) == []
        filled = await ex.cancel_order(BTC, "c-market-1")  # too late: it says how it ended
        assert filled is not None and filled.status == "closed"
        assert await ex.cancel_order(BTC, "never-sent") is None
        balance = await ex.fetch_balance()
        assert balance["BTC"] == Decimal("0.01") and balance["USDT"] == Decimal("9499.5")
    assert fake_exchange.created == {"c-market-1": 1, "c-limit-1": 1}


async def test_rate_limit_waits_for_retry_after_then_succeeds(
        fake_exchange: FakeExchange, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="circles.exchange")
    async with opened(fake_exchange) as ex:
        fake_exchange.fail_next("/api/v3/klines", status=429, retry_after=0.4)
        assert len(await ex.fetch_ohlcv(BTC, "1m", limit=3)) == 3
    # The wait came from the Retry-After header (ccxt's own spacing would say 1 s), and the
    # request was sent again only after it, as the fake saw the two requests arrive.
    assert [getattr(r, "wait_s", None) for r in caplog.records if r.getMessage() == "rate limited"] == [0.4]
    refused, served = fake_exchange.times("/api/v3/klines")
    assert served - refused >= 0.4


async def test_a_long_ban_is_raised_at_once_and_kept(fake_exchange: FakeExchange) -> None:
    async with opened(fake_exchange, rate_limit_max_wait_s=5) as ex:
        fake_exchange.fail_next("/api/v3/klines", status=418, retry_after=120)
        with pytest.raises(RateLimited) as raised:
            await ex.fetch_ohlcv(BTC, "1m", limit=3)
        assert raised.value.retry_after_s == 120
        with pytest.raises(RateLimited):  # not even sent: the exchange asked for silence
            await ex.fetch_balance()
    assert fake_exchange.calls("/api/v3/klines") == 1
    assert fake_exchange.calls("/api/v3/account") == 0


async def test_server_errors_are_retried_then_succeed(fake_exchange: FakeExchange) -> None:
    async with opened(fake_exchange, retries=3) as ex:
        fake_exchange.fail_next("/api/v3/account", times=2, status=500)
        fake_exchange.fail_next("/api/v3/klines", times=1, status=503, body="<html>down</html>")
        assert (await ex.fetch_balance())["USDT"] == Decimal(10000)
        assert len(await ex.fetch_ohlcv(BTC, "1m", limit=2)) == 2
    assert fake_exchange.calls("/api/v3/account") == 3
    assert fake_exchange.calls("/api/v3/klines") == 2


async def test_server_errors_give_up_after_the_retries(fake_exchange: FakeExchange) -> None:
    async with opened(fake_exchange, retries=2) as ex:
        fake_exchange.fail_next("/api/v3/klines", times=10, status=503)
        with pytest.raises(ExchangeUnavailable, match="503"):
            await ex.fetch_ohlcv(BTC, "1m", limit=2)
    assert fake_exchange.calls("/api/v3/klines") == 3


async def test_timeout_on_create_does_not_send_twice_when_taken(fake_exchange: FakeExchange) -> None:
    async with opened(fake_exchange, timeout_ms=300, options={"recvWindow": 600}) as ex:
        fake_exchange.fail_next("/api/v3/order", method="POST", status=None, delay_s=1.0, taken=True)
        order = await ex.create_order(BTC, "buy", Decimal("0.01"), "c-timeout")
        assert order.status == "closed" and order.client_order_id == "c-timeout"
        assert (await ex.fetch_balance())["BTC"] == Decimal("0.01")
    assert fake_exchange.created["c-timeout"] == 1
    assert len([o for o in fake_exchange.orders if o.client_order_id == "c-timeout"]) == 1


async def test_5xx_on_create_taken_is_found_not_resent(fake_exchange: FakeExchange) -> None:
    fake_exchange.balances["BTC"] = Decimal(1)
    async with opened(fake_exchange, options={"recvWindow": 300}) as ex:
        fake_exchange.fail_next("/api/v3/order", method="POST", status=500, taken=True)
        order = await ex.create_order(BTC, "sell", Decimal("0.01"), "c-5xx")
        assert order.status == "closed" and order.side == "sell"
    assert fake_exchange.created["c-5xx"] == 1
    assert fake_exchange.balances["BTC"] == Decimal("0.99")


async def test_create_lost_before_the_exchange_is_sent_again(fake_exchange: FakeExchange) -> None:
    async with opened(fake_exchange, timeout_ms=300, options={"recvWindow": 600}) as ex:
        fake_exchange.fail_next("/api/v3/order", method="POST", status=503, delay_s=1.0)
        order = await ex.create_order(BTC, "buy", Decimal("0.01"), "c-lost")
        assert order.status == "closed"
    # Asked first, unknown, so sent again: two sends, one order.
    assert fake_exchange.created["c-lost"] == 2
    assert fake_exchange.calls("/api/v3/order", "GET") == 1
    assert len([o for o in fake_exchange.orders if o.client_order_id == "c-lost"]) == 1


async def test_a_duplicate_id_returns_the_order_the_exchange_holds(fake_exchange: FakeExchange) -> None:
    async with opened(fake_exchange) as ex:
        first = await ex.create_order(BTC, "buy", Decimal("0.01"), "c-dup", type="limit",
                                      price=Decimal(1000))
        second = await ex.create_order(BTC, "buy", Decimal("0.01"), "c-dup", type="limit",
                                       price=Decimal(1000))
        assert (second.id, second.status) == (first.id, "open")
    assert len([o for o in fake_exchange.orders if o.client_order_id == "c-dup"]) == 1


async def test_insufficient_funds_and_too_small_are_rejected(fake_exchange: FakeExchange) -> None:
    async with opened(fake_exchange) as ex:
        with pytest.raises(OrderRejected, match="insufficient balance"):
            await ex.create_order(BTC, "buy", Decimal(1), "c-poor")
        with pytest.raises(OrderRejected, match="NOTIONAL"):
            await ex.create_order(BTC, "buy", Decimal("0.00002"), "c-small")
        with pytest.raises(OrderRejected):
            await ex.create_order(BTC, "buy", Decimal("0.01"), "x" * 40)
        assert (await ex.fetch_balance())["USDT"] == Decimal(10000)  # still serving
    assert fake_exchange.created == {"c-poor": 1, "c-small": 1}


async def test_a_refused_key_is_a_failure_and_never_logged(
        fake_exchange: FakeExchange, caplog: pytest.LogCaptureFixture) -> None:
    wrong_key, wrong_secret = "wrong-key-0123456789", "wrong-secret-0123456789"
    caplog.set_level(logging.DEBUG)
    async with opened(fake_exchange, api_key=wrong_key, secret=wrong_secret) as ex:
        with pytest.raises(ExchangeFailure, match="Invalid API-key"):
            await ex.fetch_balance()
        assert wrong_key not in repr(ex)
    assert fake_exchange.calls("/api/v3/account") == 1  # not retried
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert any("X-MBX-APIKEY" in line for line in lines)  # ccxt logs its request headers…
    assert not any(wrong_key in line or wrong_secret in line for line in lines)  # …scrubbed


async def test_unsigned_requests_are_refused_by_the_fake(fake_exchange: FakeExchange) -> None:
    async with opened(fake_exchange, api_key=None, secret=None) as ex:
        with pytest.raises(ExchangeFailure):
            await ex.fetch_balance()  # ccxt refuses before sending: no credentials
    status, body, _ = fake_exchange.handle("GET", "/api/v3/account", "timestamp=1", "",
                                           {"x-mbx-apikey": API_KEY})
    assert (status, body["code"]) == (400, -1102)
    status, body, _ = fake_exchange.handle("GET", "/api/v3/account", "timestamp=1&signature=ab",
                                           "", {})
    assert (status, body["code"]) == (401, -2014)


async def test_the_breaker_opens_then_lets_a_trial_through(fake_exchange: FakeExchange) -> None:
    async with opened(fake_exchange, retries=0, breaker_failures=3, breaker_reset_s=0.3) as ex:
        fake_exchange.fail_next("/api/v3/klines", times=3, status=500)
        for _ in range(3):
            with pytest.raises(ExchangeUnavailable):
                await ex.fetch_ohlcv(BTC, "1m", limit=2)
        with pytest.raises(ExchangeUnavailable, match="circuit open"):
            await ex.fetch_ohlcv(BTC, "1m", limit=2)
        assert fake_exchange.calls("/api/v3/klines") == 3  # failed fast, nothing sent
        await asyncio.sleep(0.35)
        assert len(await ex.fetch_ohlcv(BTC, "1m", limit=2)) == 2


class ScriptedClient:
    """A stand-in for a ccxt client whose create_order raises what the test scripts and whose
    fetch_order answers from `held`: for what the fake Binance never says (ccxt's binance
    class never raises DuplicateOrderId)."""

    def __init__(self, create_error: Exception, held: dict[str, Any] | None) -> None:
        self.create_error, self.held = create_error, held
        self.creates = self.fetches = 0

    async def create_order(self, *args: Any) -> dict[str, Any]:
        self.creates += 1
        raise self.create_error

    async def fetch_order(self, order_id: Any, symbol: str, params: dict[str, Any]) -> dict[str, Any]:
        self.fetches += 1
        if self.held is None:
            raise ccxt_errors.OrderNotFound("binance Order does not exist.")
        return self.held


@pytest.mark.parametrize("error", [
    ccxt_errors.DuplicateOrderId("binance clOrdId already used"),  # what ccxt says for some exchanges
    ccxt_errors.InvalidOrder('binance {"code":-2010,"msg":"Duplicate order sent."}'),  # Binance's way
])
async def test_a_refused_duplicate_id_is_translated_and_answered_with_the_held_order(
        error: Exception) -> None:
    held = {"id": "42", "clientOrderId": "c-held", "symbol": BTC, "side": "buy", "amount": 0.01,
            "filled": 0.0, "status": "open"}
    client = ScriptedClient(error, held)
    ex = Exchange(ExchangeSettings(backoff_s=0.01), client, ccxt_errors)
    order = await ex.create_order(BTC, "buy", Decimal("0.01"), "c-held")
    assert (order.id, order.status, client.creates, client.fetches) == ("42", "open", 1, 1)

    gone = ScriptedClient(error, None)
    ex = Exchange(ExchangeSettings(backoff_s=0.01), gone, ccxt_errors)
    with pytest.raises(DuplicateOrder):  # a duplicate the exchange cannot show: refused, not re-sent
        await ex.create_order(BTC, "buy", Decimal("0.01"), "c-held")
    assert (gone.creates, gone.fetches) == (1, 1)


async def test_a_refusal_that_is_no_duplicate_is_not_looked_up() -> None:
    client = ScriptedClient(ccxt_errors.InsufficientFunds(
        'binance {"code":-2010,"msg":"Account has insufficient balance for requested action."}'), None)
    ex = Exchange(ExchangeSettings(backoff_s=0.01), client, ccxt_errors)
    with pytest.raises(OrderRejected) as raised:
        await ex.create_order(BTC, "buy", Decimal("0.01"), "c-poor")
    assert not isinstance(raised.value, DuplicateOrder)
    assert (client.creates, client.fetches) == (1, 0)


@pytest.mark.parametrize("exchange_id,ready", [("binance", True), ("binanceus", True),
                                               ("bybit", True), ("okx", True), ("kucoin", False),
                                               ("kraken", False)])
def test_live_trading_needs_a_lookup_by_client_order_id(exchange_id: str, ready: bool) -> None:
    caps = capabilities_for(exchange_id)
    assert caps.live_ready is ready is caps.fetch_order_by_client_id
    assert (caps.live_refusal == "") is ready
    if ready:
        assert require_live_ready(exchange_id) is caps
        return
    with pytest.raises(ConfigError) as raised:
        require_live_ready(exchange_id)
    message = str(raised.value)
    assert message.startswith(f"config: execution.exchange.id: {exchange_id!r} cannot be traded live")
    assert "client order id" in message and "binance, binanceus, bybit, okx" in message
    assert raised.value.exit_code == 78
    with pytest.raises(ConfigError, match="config: other.key: "):
        require_live_ready(exchange_id, key="other.key")


def test_the_boundary_keeps_every_name_and_splits_errors_and_capabilities() -> None:
    code = ("import json, sys\n"
            "import modules.trading.exchange_errors as errors, "
            "modules.trading.exchange_capabilities as caps, modules.trading.exchange_orders as orders\n"
            "from modules.trading.exchange import (ExchangeSettings, Exchange, RateLimited, "
            "ExchangeUnavailable, OrderRejected, ExchangeFailure, ExchangeOrder, OrderNotFound, "
            "CircuitOpen, UnknownExchange, DuplicateOrder, Capabilities, CAPABILITIES, "
            "capabilities_for, require_live_ready, Candle)\n"
            "assert RateLimited is errors.RateLimited and DuplicateOrder is errors.DuplicateOrder\n"
            "assert Capabilities is caps.Capabilities and require_live_ready is caps.require_live_ready\n"
            "assert ExchangeOrder is orders.ExchangeOrder\n"
            "print(json.dumps('ccxt' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) is False


def test_exchange_settings_name_the_keys_they_are_read_from() -> None:
    from modules.trading.execution.settings import ExecutionSettings
    from modules.trading.market.settings import MarketSettings

    assert MarketSettings.model_fields["ccxt"].annotation is ExchangeSettings
    assert ExecutionSettings.model_fields["exchange"].annotation is ExchangeSettings
    doc = ExchangeSettings.__doc__ or ""
    assert "[market.ccxt]" in doc and "[execution.exchange]" in doc and "execution.ccxt" not in doc


def test_importing_the_boundary_does_not_import_ccxt() -> None:
    code = ("import sys, modules.trading.exchange as e; e.ExchangeSettings(); "
            "print(json.dumps('ccxt' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", "import json; " + code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) is False
