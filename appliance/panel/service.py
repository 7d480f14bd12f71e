"""The `panel` service: the FastAPI app under uvicorn, on the same event loop as its bus
client (one process, one MQTT client, like every service)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn
from pydantic import Field

from appliance.bus import registry
from appliance.bus.message import Received
from appliance.config import Section
from appliance.db import open_database
from appliance.errors import OperationalError
from appliance.panel.app import create_app
from appliance.runtime import Service, subscribe
from appliance.trade_sender import TradeSender

log = logging.getLogger("circles.panel")


class PanelSettings(Section):
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: the LAN)")
    port: int = Field(8080, ge=1, le=65535)
    request_timeout_s: float = Field(10.0, gt=0, description="how long a route waits for a service")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals belong to the service runtime, which stops us by cancelling run()


class PanelService(Service):
    name = "panel"
    Settings = PanelSettings

    async def start(self) -> None:
        self.engine = await asyncio.to_thread(open_database, self.settings)
        self.sender = TradeSender(self.bus)
        self.app = create_app(self.bus, self.engine, self.sender,
                              request_timeout_s=self.config.request_timeout_s)

    @subscribe(registry.TRADE_ACK)
    async def on_trade_ack(self, msg: Received) -> None:
        self.sender.deliver(msg.data)

    async def run(self) -> None:
        config = uvicorn.Config(self.app, host=self.config.host, port=self.config.port,
                                log_config=None, access_log=False, lifespan="off")
        server = _Server(config)
        try:
            await server.serve()
        except SystemExit:  # uvicorn's way of saying it could not listen
            raise OperationalError(f"panel: cannot listen on {self.config.host}:"
                                   f"{self.config.port}") from None
        finally:
            server.should_exit = True

    async def stop(self) -> None:
        self.engine.dispose()

    def status_text(self) -> str:
        return f"listening on {self.config.host}:{self.config.port}"
