"""A local HTTP server that answers like Binance's spot REST API, for the real ccxt library.

It serves exactly what ccxt's `binance` class calls for spot trading: exchangeInfo, klines,
account, order (POST/GET/DELETE by newClientOrderId / origClientOrderId), openOrders,
ping and time. Balances are kept, market orders fill at the last kline close (or at
`prices[symbol]`), errors are Binance's own JSON, and every create request is counted per
client order id (`created`) so a test can prove no order was sent twice; `times(path)` says
when (by the fake's `clock()`) each request arrived. Signed requests must carry the API-key
header, a timestamp within recvWindow and a valid HMAC-SHA256 signature. `fail_next`
injects errors, delays and timeouts.

Klines are generated from a deterministic formula of the open time, up to the fake's
`clock()` (the last one still forming, as on Binance); `freeze_klines()` stops producing
new ones, `missing` drops chosen ones.

Use the `fake_exchange` fixture:
`from tests.fake_exchange import fake_exchange_fixture  # noqa: F401` (or list this module in
conftest's `pytest_plugins`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

API_KEY, SECRET = "fake-api-key-0123456789", "fake-secret-abcdefghijklmnop"
INTERVALS = {"m": 60, "h": 3600, "d": 86400, "w": 604800}
DEFAULT_BODIES = {
    418: {"code": -1003, "msg": "Way too many requests; IP(127.0.0.1) banned until 1700000000000."},
    429: {"code": -1003, "msg": "Too many requests; current limit of IP(127.0.0.1) is 6000 "
                                "requests per minute."},
    500: {"code": -1001, "msg": "Internal error; unable to process your request. Please try again."},
    503: {"code": -1008, "msg": "Service Unavailable."},
}
INSUFFICIENT = {"code": -2010, "msg": "Account has insufficient balance for requested action."}
DUPLICATE = {"code": -2010, "msg": "Duplicate order sent."}
ORDER_MISSING = {"code": -2013, "msg": "Order does not exist."}
CANCEL_UNKNOWN = {"code": -2011, "msg": "Unknown order sent."}


def interval_seconds(interval: str) -> int:
    return int(interval[:-1]) * INTERVALS[interval[-1]]


def fmt(value: Decimal | float) -> str:
    return f"{Decimal(str(value)):.8f}"


@dataclass
class Market:
    base: str
    quote: str
    base_price: float  # where generated klines wander around
    min_qty: str = "0.00001000"
    step: str = "0.00001000"
    tick: str = "0.01000000"
    min_notional: str = "5.00000000"


@dataclass
class Failure:
    path: str
    method: str | None
    times: int
    status: int | None
    body: Any
    delay_s: float
    taken: bool
    retry_after: float | None


@dataclass
class FakeOrder:
    order_id: int
    client_order_id: str
    symbol: str
    side: str
    type: str
    qty: Decimal
    price: Decimal
    status: str = "NEW"
    executed: Decimal = Decimal(0)
    quote: Decimal = Decimal(0)
    time_ms: int = 0
    fills: list[dict[str, Any]] = field(default_factory=list)

    def doc(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol, "orderId": self.order_id, "orderListId": -1,
            "clientOrderId": self.client_order_id, "price": fmt(self.price),
            "origQty": fmt(self.qty), "executedQty": fmt(self.executed),
            "cummulativeQuoteQty": fmt(self.quote), "status": self.status,
            "timeInForce": "GTC", "type": self.type, "side": self.side, "stopPrice": "0.00000000",
            "icebergQty": "0.00000000", "time": self.time_ms, "updateTime": self.time_ms,
            "isWorking": True, "workingTime": self.time_ms, "origQuoteOrderQty": "0.00000000",
            "selfTradePreventionMode": "EXPIRE_MAKER"}


class FakeExchange:
    """The server and its state; all state is guarded by `lock`."""

    def __init__(self, *, api_key: str = API_KEY, secret: str = SECRET) -> None:
        self.api_key, self.secret = api_key, secret
        self.lock = threading.RLock()
        self.markets: dict[str, Market] = {
            "BTCUSDT": Market("BTC", "USDT", 60000.0),
            "ETHUSDT": Market("ETH", "USDT", 3000.0, min_qty="0.00010000", step="0.00010000"),
        }
        self.balances: dict[str, Decimal] = {"USDT": Decimal(10000), "BTC": Decimal(0),
                                             "ETH": Decimal(0)}
        self.locked: defaultdict[str, Decimal] = defaultdict(Decimal)
        self.prices: dict[str, Decimal] = {}  # symbol id → fill price instead of the last close
        self.fee_rate = Decimal("0.001")  # charged in the quote currency
        self.orders: list[FakeOrder] = []
        self.created: Counter[str] = Counter()  # POST /api/v3/order requests per client order id
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.received_at: list[float] = []  # the fake's clock() at each request of `requests`
        self.clock: Callable[[], float] = time.time  # what "now" is for klines and orders
        self.frozen_at: float | None = None
        self.missing: set[tuple[str, str, int]] = set()  # (symbol id, interval, open ms) dropped
        self._failures: list[Failure] = []
        self._next_id = 1000
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- test API ------------------------------------------------------------------------
    def start(self) -> FakeExchange:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def urls(self) -> dict[str, Any]:
        """What to put in ExchangeSettings.urls: every API of ccxt's binance, here."""
        paths = {"public": "/api/v3", "private": "/api/v3", "v1": "/api/v1", "sapi": "/sapi/v1",
                 "sapiV2": "/sapi/v2", "sapiV3": "/sapi/v3", "sapiV4": "/sapi/v4",
                 "fapiPublic": "/fapi/v1", "fapiPublicV2": "/fapi/v2", "fapiPublicV3": "/fapi/v3",
                 "fapiPrivate": "/fapi/v1", "fapiPrivateV2": "/fapi/v2",
                 "fapiPrivateV3": "/fapi/v3", "fapiData": "/futures/data",
                 "dapiPublic": "/dapi/v1", "dapiPrivate": "/dapi/v1", "dapiPrivateV2": "/dapi/v2",
                 "dapiData": "/futures/data", "eapiPublic": "/eapi/v1", "eapiPrivate": "/eapi/v1",
                 "papi": "/papi/v1", "papiV2": "/papi/v2"}
        return {"api": {name: self.base_url + path for name, path in paths.items()}}

    def fail_next(self, path: str, times: int = 1, *, status: int | None = 503, body: Any = None,
                  delay_s: float = 0.0, method: str | None = None, taken: bool = False,
                  retry_after: float | None = None) -> None:
        """The next `times` requests to `path` (e.g. "/api/v3/order", optionally only for
        `method`) wait `delay_s`, then answer `status` with `body` (Binance's error JSON for
        the status by default) instead of being handled. With `taken=True` the request is
        handled first (the exchange took it; only the answer is lost or late); with
        `status=None` the real answer follows the delay — a delay longer than the client's
        timeout is a timeout."""
        with self.lock:
            self._failures.append(Failure(path, method, times, status, body, delay_s, taken,
                                          retry_after))

    def calls(self, path: str, method: str | None = None) -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if p == path and (method is None or m == method))

    def times(self, path: str, method: str | None = None) -> list[float]:
        """When (by the fake's `clock()`) each request to `path` arrived, oldest first."""
        with self.lock:
            return [at for (m, p), at in zip(self.requests, self.received_at, strict=True)
                    if p == path and (method is None or m == method)]

    def freeze_klines(self) -> None:
        """Stop producing candles: nothing newer than now is ever served."""
        self.frozen_at = self.clock()

    def resume_klines(self) -> None:
        self.frozen_at = None

    def kline(self, symbol: str, interval: str, open_ms: int, now: float | None = None) -> list[Any]:
        """The candle opened at `open_ms` as served at `now` (partial while it forms)."""
        step = interval_seconds(interval)
        now = self.clock() if now is None else now
        base = self.markets[symbol].base_price
        open_, close = self._price(base, open_ms / 1000 - step, step), self._price(base, open_ms / 1000, step)
        volume = 1 + (self._noise(symbol, open_ms, 3) + 1) * 5
        progress = min(1.0, max(0.0, (now - open_ms / 1000) / step))
        close = open_ + (close - open_) * progress
        volume *= progress
        high = max(open_, close) * (1 + 0.001 * (1 + self._noise(symbol, open_ms, 1)))
        low = min(open_, close) * (1 - 0.001 * (1 + self._noise(symbol, open_ms, 2)))
        close_ms = open_ms + step * 1000 - 1
        return [open_ms, fmt(round(open_, 2)), fmt(round(high, 2)), fmt(round(low, 2)),
                fmt(round(close, 2)), fmt(round(volume, 4)), close_ms, "0.00000000", 10,
                "0.00000000", "0.00000000", "0"]

    @staticmethod
    def _price(base: float, t: float, step: int) -> float:
        index = t / step
        return base * math.exp(0.02 * math.sin(index / 40) + 0.004 * math.sin(index * 1.7))

    @staticmethod
    def _noise(symbol: str, open_ms: int, salt: int) -> float:
        digest = hashlib.sha256(f"{symbol}:{open_ms}:{salt}".encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**31 - 1  # -1 … 1

    def last_price(self, symbol: str) -> Decimal:
        if symbol in self.prices:
            return self.prices[symbol]
        now = self.clock() if self.frozen_at is None else min(self.frozen_at, self.clock())
        step = 60
        return Decimal(self.kline(symbol, "1m", int(now // step * step * 1000), now)[4])

    # -- request handling -------------------------------------------------------------------
    def handle(self, method: str, path: str, query: str, body: str,
               headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            self.requests.append((method, path))
            self.received_at.append(self.clock())
            if method == "POST" and path == "/api/v3/order":
                params = dict(parse_qsl(body))
                self.created[params.get("newClientOrderId", "")] += 1
            failure = self._take_failure(method, path)
        if failure is None:
            return self._route(method, path, query, body, headers)
        answer = self._route(method, path, query, body, headers) if failure.taken else None
        if failure.delay_s:
            time.sleep(failure.delay_s)
        if failure.status is None:
            return answer or self._route(method, path, query, body, headers)
        extra = {} if failure.retry_after is None else {"Retry-After": f"{failure.retry_after:g}"}
        return failure.status, failure.body or DEFAULT_BODIES.get(failure.status, {}), extra

    def _take_failure(self, method: str, path: str) -> Failure | None:
        for failure in self._failures:
            if failure.path == path and failure.method in (None, method) and failure.times > 0:
                failure.times -= 1
                return failure
        return None

    def _route(self, method: str, path: str, query: str, body: str,
               headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        params = dict(parse_qsl(query))
        public = {("GET", "/api/v3/ping"): lambda p: {},
                  ("GET", "/api/v3/time"): lambda p: {"serverTime": int(time.time() * 1000)},
                  ("GET", "/api/v3/exchangeInfo"): self._exchange_info,
                  ("GET", "/api/v3/klines"): self._klines}
        private = {("GET", "/api/v3/account"): self._account,
                   ("POST", "/api/v3/order"): self._create,
                   ("GET", "/api/v3/order"): self._get_order,
                   ("DELETE", "/api/v3/order"): self._cancel,
                   ("GET", "/api/v3/openOrders"): self._open_orders}
        if (method, path) in public:
            return 200, public[(method, path)](params), {}
        if (method, path) not in private:
            return 404, {"code": -1, "msg": f"the fake exchange does not serve {method} {path}"}, {}
        signed = body if method in ("POST", "PUT") else query
        refused = self._check_signature(signed, headers)
        if refused:
            return refused
        params.update(parse_qsl(body))
        with self.lock:
            return 200, private[(method, path)](params), {}

    def _check_signature(self, signed: str, headers: dict[str, str]) -> tuple[int, Any, dict[str, str]] | None:
        key = headers.get("x-mbx-apikey")
        if not key:
            return 401, {"code": -2014, "msg": "API-key format invalid."}, {}
        if key != self.api_key:
            return 401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}, {}
        payload, sep, signature = signed.rpartition("&signature=")
        params = dict(parse_qsl(payload))
        if not sep or not signature:
            return 400, {"code": -1102, "msg": "Mandatory parameter 'signature' was not sent, "
                                               "was empty/null, or malformed."}, {}
        if "timestamp" not in params:
            return 400, {"code": -1102, "msg": "Mandatory parameter 'timestamp' was not sent, "
                                               "was empty/null, or malformed."}, {}
        expected = hmac.new(self.secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return 400, {"code": -1022, "msg": "Signature for this request is not valid."}, {}
        window = int(params.get("recvWindow", 5000))
        if abs(time.time() * 1000 - int(params["timestamp"])) > window:
            return 400, {"code": -1021, "msg": "Timestamp for this request is outside of the "
                                               "recvWindow."}, {}
        return None

    def _exchange_info(self, params: dict[str, str]) -> dict[str, Any]:
        symbols = []
        for sid, m in self.markets.items():
            symbols.append({
                "symbol": sid, "status": "TRADING", "baseAsset": m.base, "baseAssetPrecision": 8,
                "quoteAsset": m.quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
                "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT",
                               "TAKE_PROFIT_LIMIT"],
                "icebergAllowed": True, "ocoAllowed": True, "quoteOrderQtyMarketAllowed": True,
                "isSpotTradingAllowed": True, "isMarginTradingAllowed": False,
                "filters": [
                    {"filterType": "PRICE_FILTER", "minPrice": m.tick, "maxPrice": "1000000.00000000",
                     "tickSize": m.tick},
                    {"filterType": "LOT_SIZE", "minQty": m.min_qty, "maxQty": "9000.00000000",
                     "stepSize": m.step},
                    {"filterType": "NOTIONAL", "minNotional": m.min_notional,
                     "applyMinToMarket": True, "maxNotional": "9000000.00000000",
                     "applyMaxToMarket": False, "avgPriceMins": 5}],
                "permissions": [], "permissionSets": [["SPOT"]],
                "defaultSelfTradePreventionMode": "EXPIRE_MAKER"})
        return {"timezone": "UTC", "serverTime": int(time.time() * 1000),
                "rateLimits": [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE",
                                "intervalNum": 1, "limit": 6000}],
                "exchangeFilters": [], "symbols": symbols}

    def _klines(self, params: dict[str, str]) -> Any:
        symbol, interval = params["symbol"], params["interval"]
        if symbol not in self.markets:
            return _Error(400, {"code": -1121, "msg": "Invalid symbol."})
        step_ms = interval_seconds(interval) * 1000
        limit = min(int(params.get("limit", 500)), 1000)
        now = self.clock() if self.frozen_at is None else min(self.frozen_at, self.clock())
        last_open = int(now * 1000) // step_ms * step_ms
        if "endTime" in params:
            last_open = min(last_open, int(params["endTime"]) // step_ms * step_ms)
        if "startTime" in params:
            first = -(-int(params["startTime"]) // step_ms) * step_ms
            opens = range(first, min(last_open, first + (limit - 1) * step_ms) + 1, step_ms)
        else:
            opens = range(last_open - (limit - 1) * step_ms, last_open + 1, step_ms)
        return [self.kline(symbol, interval, t, now) for t in opens
                if (symbol, interval, t) not in self.missing]

    def _account(self, params: dict[str, str]) -> dict[str, Any]:
        return {"makerCommission": 10, "takerCommission": 10, "canTrade": True,
                "canWithdraw": True, "canDeposit": True, "accountType": "SPOT",
                "updateTime": int(time.time() * 1000), "permissions": ["SPOT"],
                "balances": [{"asset": a, "free": fmt(total - self.locked[a]),
                              "locked": fmt(self.locked[a])} for a, total in self.balances.items()]}

    def _create(self, params: dict[str, str]) -> Any:
        symbol, client_id = params["symbol"], params.get("newClientOrderId") or f"auto{self._next_id}"
        market = self.markets.get(symbol)
        if market is None:
            return _Error(400, {"code": -1121, "msg": "Invalid symbol."})
        if any(o.client_order_id == client_id and o.status in ("NEW", "PARTIALLY_FILLED")
               for o in self.orders):
            return _Error(400, DUPLICATE)  # Binance refuses an id only while its order is open
        qty, side, kind = Decimal(params["quantity"]), params["side"], params["type"]
        last = self.last_price(symbol)
        price = Decimal(params.get("price", last))
        if qty < Decimal(market.min_qty) or qty % Decimal(market.step):
            return _Error(400, {"code": -1013, "msg": "Filter failure: LOT_SIZE"})
        if qty * price < Decimal(market.min_notional):
            return _Error(400, {"code": -1013, "msg": "Filter failure: NOTIONAL"})
        marketable = kind == "MARKET" or (side == "BUY" and price >= last) or \
            (side == "SELL" and price <= last)
        fill_price = last if marketable else price
        cost = qty * fill_price
        need_asset, need = (market.quote, cost * (1 + self.fee_rate)) if side == "BUY" else (market.base, qty)
        if self.balances.get(need_asset, Decimal(0)) - self.locked[need_asset] < need:
            return _Error(400, INSUFFICIENT)
        now_ms = int(self.clock() * 1000)
        order = FakeOrder(self._next_id, client_id, symbol, side, kind, qty,
                          price if kind == "LIMIT" else Decimal(0), time_ms=now_ms)
        self._next_id += 1
        self.orders.append(order)
        if marketable:
            fee = cost * self.fee_rate
            sign = 1 if side == "BUY" else -1
            self.balances[market.base] = self.balances.get(market.base, Decimal(0)) + sign * qty
            self.balances[market.quote] = self.balances.get(market.quote, Decimal(0)) - sign * cost - fee
            order.status, order.executed, order.quote = "FILLED", qty, cost
            order.fills = [{"price": fmt(fill_price), "qty": fmt(qty), "commission": fmt(fee),
                            "commissionAsset": market.quote, "tradeId": order.order_id}]
        else:
            self.locked[need_asset] += need
        return {**order.doc(), "transactTime": now_ms, "fills": order.fills}

    def _find(self, params: dict[str, str]) -> FakeOrder | None:
        wanted = [o for o in self.orders if o.symbol == params.get("symbol") and (
            o.client_order_id == params.get("origClientOrderId")
            or str(o.order_id) == params.get("orderId"))]
        return wanted[-1] if wanted else None

    def _get_order(self, params: dict[str, str]) -> Any:
        order = self._find(params)
        return _Error(400, ORDER_MISSING) if order is None else order.doc()

    def _cancel(self, params: dict[str, str]) -> Any:
        order = self._find(params)
        if order is None or order.status != "NEW":
            return _Error(400, CANCEL_UNKNOWN)
        market = self.markets[order.symbol]
        asset, amount = (market.quote, order.qty * order.price * (1 + self.fee_rate)) \
            if order.side == "BUY" else (market.base, order.qty)
        self.locked[asset] -= amount
        order.status = "CANCELED"
        return {**order.doc(), "origClientOrderId": order.client_order_id,
                "clientOrderId": f"cancel{order.order_id}", "transactTime": int(self.clock() * 1000)}

    def _open_orders(self, params: dict[str, str]) -> list[dict[str, Any]]:
        return [o.doc() for o in self.orders if o.status in ("NEW", "PARTIALLY_FILLED")
                and params.get("symbol") in (None, o.symbol)]


@dataclass
class _Error:
    status: int
    body: Any


def _handler(fake: FakeExchange) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, doc, extra = fake.handle(self.command, parts.path, parts.query, body, headers)
            if isinstance(doc, _Error):
                status, doc = doc.status, doc.body
            data = json.dumps(doc).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json;charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test)

        do_GET = do_POST = do_DELETE = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(name="fake_exchange")
def fake_exchange_fixture() -> Iterator[FakeExchange]:
    """A started fake Binance on 127.0.0.1 with a free port; stopped after the test."""
    fake = FakeExchange().start()
    yield fake
    fake.stop()
