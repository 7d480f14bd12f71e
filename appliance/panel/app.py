"""The panel's FastAPI app factory. The app is given the bus and the database engine by the
`panel` service (nothing is created at import time); routes reach them as dependencies."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy import Engine

from appliance.bus.base import Bus
from appliance.panel.routes import trades
from appliance.trade_sender import TradeSender


def create_app(bus: Bus, engine: Engine, sender: TradeSender, *,
               request_timeout_s: float = 10.0) -> FastAPI:
    app = FastAPI(title="Circles", docs_url="/api/docs", openapi_url="/api/openapi.json",
                  redoc_url=None)
    app.state.bus = bus
    app.state.engine = engine
    app.state.sender = sender
    app.state.request_timeout_s = request_timeout_s
    app.include_router(trades.router)
    return app
