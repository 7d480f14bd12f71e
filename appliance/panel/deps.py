"""Dependencies of the panel's routes, as `Annotated` aliases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Header, HTTPException, Request, status
from sqlalchemy import Engine

from appliance.bus.base import Bus
from appliance.errors import TemporaryError
from appliance.ledger import Ledger
from appliance.panel import api_keys
from appliance.panel.metrics import PanelMetrics
from appliance.panel.sessions import Login, Logins
from appliance.panel.view import BoxView
from appliance.security.audit import AuditLog
from appliance.security.permissions import Permission, Principal, RequirePermission
from appliance.security.users import Users
from appliance.trade_sender import TradeSender

if TYPE_CHECKING:
    from appliance.panel.devices import DeviceAdmin
    from appliance.panel.files import FileSpace
    from appliance.panel.logs import LogSource
    from appliance.panel.trust import CaCert
    from appliance.security.secrets import SecretStore


@dataclass
class Panel:
    """Everything the routes use, made by the `panel` service (nothing at import time)."""

    bus: Bus
    users: Users
    logins: Logins
    view: BoxView
    sender: TradeSender
    request_timeout_s: float = 10.0
    tls: bool = False
    require_totp: bool = True
    ca: CaCert | None = None  # the box's root certificate, offered at /ca.crt
    metrics: PanelMetrics = field(default_factory=PanelMetrics)  # GET /metrics
    devices: DeviceAdmin | None = None  # devices in the broker (None: not managed here)
    secrets: SecretStore | None = None  # exchange API keys (None: not stored from here)
    logs: LogSource | None = None  # the services' log lines (None: not read here)
    files: FileSpace | None = None  # the shared files (None: not served here)

    @property
    def engine(self) -> Engine:
        return self.users.engine

    @property
    def audit(self) -> AuditLog:
        return self.users.audit

    @property
    def ledger(self) -> Ledger:
        return self.users.audit.ledger

    async def ask(self, service: str, command: str, args: dict[str, Any] | None = None) -> Any:
        """A service's answer to a command; 503 when it does not answer, 404 when the trade
        logger has no such account, 502 on any other error of the service."""
        try:
            reply = await self.bus.request(service, command, args or {},
                                           timeout=self.request_timeout_s)
        except TemporaryError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
        if not reply.ok:
            code = status.HTTP_404_NOT_FOUND if "no trade events" in (reply.error or "") \
                else status.HTTP_502_BAD_GATEWAY
            raise HTTPException(code, f"{service}: {reply.error}")
        return reply.result


async def _panel(request: Request) -> Panel:
    panel: Panel = request.app.state.panel
    return panel


PanelDep = Annotated[Panel, Depends(_panel)]


async def _engine(panel: PanelDep) -> Engine:
    return panel.engine


async def _sender(panel: PanelDep) -> TradeSender:
    return panel.sender


async def _timeout(panel: PanelDep) -> float:
    return panel.request_timeout_s


EngineDep = Annotated[Engine, Depends(_engine)]
SenderDep = Annotated[TradeSender, Depends(_sender)]
TimeoutDep = Annotated[float, Depends(_timeout)]
Viewer = Annotated[Principal, Depends(RequirePermission(Permission.VIEW))]
TradingControl = Annotated[Principal, Depends(RequirePermission(Permission.TRADING_CONTROL))]
KeysManager = Annotated[Principal, Depends(RequirePermission(Permission.KEYS_MANAGE))]
DevicesOperate = Annotated[Principal, Depends(RequirePermission(Permission.DEVICES_OPERATE))]
DevicesManager = Annotated[Principal, Depends(RequirePermission(Permission.DEVICES_MANAGE))]
SecretsManager = Annotated[Principal, Depends(RequirePermission(Permission.SECRETS_MANAGE))]
FilesWriter = Annotated[Principal, Depends(RequirePermission(Permission.FILES_WRITE))]


async def _login(request: Request) -> Login:
    """Any live login, also one restricted to its first step (for the account's own pages)."""
    login: Login | None = getattr(request.state, "login", None)
    if login is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "not logged in")
    return login


LoginDep = Annotated[Login, Depends(_login)]


async def _session_login(login: LoginDep) -> Login:
    """A login by session only: a script's token may not touch its owner's credentials."""
    if login.session_id is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "only a logged-in session may do this, not an API token")
    return login


SessionLogin = Annotated[Login, Depends(_session_login)]


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
