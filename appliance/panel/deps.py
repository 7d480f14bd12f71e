"""Dependencies of the panel's routes, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status
from sqlalchemy import Engine

from appliance.bus.base import Bus
from appliance.panel import api_keys
from appliance.trade_sender import TradeSender


def _bus(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _sender(request: Request) -> TradeSender:
    sender: TradeSender = request.app.state.sender
    return sender


def _timeout(request: Request) -> float:
    return float(request.app.state.request_timeout_s)


BusDep = Annotated[Bus, Depends(_bus)]
EngineDep = Annotated[Engine, Depends(_engine)]
SenderDep = Annotated[TradeSender, Depends(_sender)]
TimeoutDep = Annotated[float, Depends(_timeout)]


def _api_account(engine: EngineDep, authorization: Annotated[str | None, Header()] = None,
                 x_api_key: Annotated[str | None, Header()] = None) -> str:
    """The account of the request's API key (`Authorization: Bearer ck_…` or `X-API-Key`)."""
    key = x_api_key or (authorization or "").removeprefix("Bearer ").strip()
    account = api_keys.account_for(engine, key) if key else None
    if account is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid API key is required "
                            "(circles ledger key create --account …)",
                            headers={"WWW-Authenticate": "Bearer"})
    return account


ApiAccount = Annotated[str, Depends(_api_account)]
