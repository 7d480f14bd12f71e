"""The panel's Prometheus metrics, in a registry of the app's own (not the process-wide
default, so that several apps in one process never share or clash):

- `circles_panel_requests_total{method, route, status}` and the histogram
  `circles_panel_request_seconds{method, route}`: every HTTP answer, labelled by the route's
  template (`/trading/accounts/{account}`), never the raw path, so a label cannot grow
  without bound;
- `circles_service_online{service}`: 1 while the service's retained status says online, as
  the panel sees it (0 offline; a service whose status was cleared is not listed);
- `circles_bus_messages_total{topic}`: messages the panel's subscriptions received, by the
  topic registry's name (`service_status`, `trade_metrics`, …);
- `circles_panel_sessions`: login sessions live now.

`RequestMetrics` is a pure ASGI middleware: it only watches the response's start and end
go by, so live streams stream as before.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from sqlalchemy import func, select
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.panel.sessions import Logins, iso, sessions
from appliance.panel.view import BoxView

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # the route label of a path no route knows (a 404)
STATIC = "/static/{path}"  # the route label of the panel's files (the one mount)
# Pages answer in milliseconds; a request/reply to a service may take seconds (up to
# panel.request_timeout_s); a live stream lasts as long as its page.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 300.0)

Handler = Callable[[Any], Awaitable[None]]


class PanelMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "circles_panel_requests", "HTTP requests the panel answered, by route template",
            ["method", "route", "status"], registry=self.registry)
        self.seconds = Histogram(
            "circles_panel_request_seconds", "Time to answer an HTTP request (a live stream: "
            "how long it was open), by route template", ["method", "route"],
            buckets=BUCKETS, registry=self.registry)
        self.messages = Counter(
            "circles_bus_messages", "Messages the panel's subscriptions received, by topic "
            "(the topic registry's name)", ["topic"], registry=self.registry)
        self.sessions = Gauge("circles_panel_sessions", "Login sessions live now",
                              registry=self.registry)
        self.view: BoxView | None = None
        self.registry.register(_ServicesOnline(self))

    def follow(self, view: BoxView) -> None:
        """Report the services' status as `view` knows it."""
        self.view = view

    def counting(self, handler: Handler, topic: str, *, batch: bool) -> Handler:
        """`handler` (of a subscription to `topic`), counting each message it is given."""
        counter = self.messages.labels(topic=topic)

        async def counted(received: Any) -> None:
            counter.inc(len(received) if batch else 1)
            await handler(received)

        return counted

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        self.seconds.labels(method=method, route=route).observe(seconds)

    def count_sessions(self, logins: Logins) -> None:
        """Blocking (a database query): run it in a thread."""
        now = logins.clock()
        query = select(func.count()).select_from(sessions).where(
            sessions.c.revoked_at.is_(None), sessions.c.expires_at > iso(now),
            sessions.c.last_seen_at > iso(now - logins.idle))
        with logins.engine.connect() as conn:
            self.sessions.set(conn.execute(query).scalar_one())

    def exposition(self) -> bytes:
        """Everything, in Prometheus' text format."""
        return generate_latest(self.registry)


class _ServicesOnline:
    """Read from the panel's view at each scrape, so a gone service is not kept."""

    def __init__(self, metrics: PanelMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "circles_service_online", "1 while the service's retained status says online, as "
            "the panel sees it; 0 offline", labels=["service"])
        view = self.metrics.view
        for name, seen in sorted(view.services.items()) if view else ():
            family.add_metric([name], 1.0 if seen.online else 0.0)
        yield family


def route_of(scope: Scope) -> str:
    """The template of the route that answered (`/static/{path}` for a file)."""
    # A mount sets no `route` in the scope, only its app as the `endpoint`.
    if isinstance(scope.get("endpoint"), StaticFiles):
        return STATIC
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: PanelMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500  # 500 unless an answer started

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.observe(scope["method"], route_of(scope), status,
                                 time.perf_counter() - started)
