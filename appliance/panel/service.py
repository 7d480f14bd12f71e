"""The `panel` service: the FastAPI app under uvicorn, on the same event loop as its bus
client (one process, one MQTT client, like every service). It keeps a view of the box from
retained topics, asks services over request/reply, and never imports `modules/`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import uvicorn
from pydantic import Field, ValidationInfo, field_validator

from appliance import services
from appliance.bus import registry
from appliance.bus.base import Bus
from appliance.bus.message import Received
from appliance.config import CoreSettings, Section
from appliance.errors import ConfigError, OperationalError
from appliance.files import private_dir
from appliance.panel.app import create_app
from appliance.panel.deps import Panel
from appliance.panel.devices import DeviceAdmin
from appliance.panel.files import open_space
from appliance.panel.home import keep_charts
from appliance.panel.logs import open_source
from appliance.panel.metrics import PanelMetrics
from appliance.panel.sessions import Logins
from appliance.panel.trust import CaCert
from appliance.panel.view import BoxView
from appliance.runtime import Service, subscribe
from appliance.security.crypto import Keyring
from appliance.security.secrets import SecretStore
from appliance.security.users import Users
from appliance.trade_sender import TradeSender

log = logging.getLogger("circles.panel")


class PanelSettings(Section):
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: the LAN)")
    port: int = Field(8080, ge=1, le=65535)
    tls_cert: Path | None = Field(None, description="PEM certificate: serve HTTPS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    ca_cert: Path | None = Field(
        None, description="PEM certificate of the box's CA: offered at /ca.crt to trust the box")
    trusted_proxies: list[str] = Field(
        [], description="addresses of reverse proxies whose X-Forwarded-For is believed")
    request_timeout_s: float = Field(10.0, gt=0, description="how long a route waits for a service")
    session_hours: float = Field(7 * 24, gt=0, le=90 * 24, description="a login lasts at most")
    idle_hours: float = Field(24, gt=0, description="a login ends after this long unused")
    require_totp: bool = Field(True, description="admins and operators enrol TOTP first")
    logs: Literal["auto", "journal", "files"] = Field(
        "auto", description="where the Logs page reads: auto is the journal under systemd, "
                            "else the JSON lines files of logs_dir")
    logs_dir: Path | None = Field(
        None, description="the services' <service>.jsonl files (default <state_dir>/logs)")
    device_host: str | None = Field(
        None, description="the broker address a device added on the panel is given "
                          "(default: this box's LAN address)")
    device_port: int | None = Field(
        None, ge=1, le=65535, description="the broker port a device added on the panel is "
                                          "given (default 1883, or 8883 when bus.tls)")
    max_upload_mb: int = Field(2048, ge=1, description="the largest file the Files page takes")

    @field_validator("tls_key")
    @classmethod
    def _pair(cls, key: Path | None, info: ValidationInfo) -> Path | None:
        if (key is None) != (info.data.get("tls_cert") is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return key


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals belong to the service runtime, which stops us by cancelling run()


class PanelService(Service):
    name = "panel"
    Settings = PanelSettings

    def __init__(self, settings: CoreSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        self.metrics = PanelMetrics()
        # Every subscription's messages are counted (circles_bus_messages_total): each
        # handler is wrapped here, before the runner takes them.
        for spec, _, batch, attr in self._handlers:
            setattr(self, attr, self.metrics.counting(getattr(self, attr), spec.name, batch=batch))

    async def start(self) -> None:
        config: PanelSettings = self.config
        for key in ("tls_cert", "tls_key", "ca_cert"):
            path = getattr(config, key)
            if path is not None and not path.is_file():
                raise ConfigError(f"config: panel.{key}: no file {path}")
        ca = await asyncio.to_thread(CaCert.load, config.ca_cert) if config.ca_cert else None
        keyring = await asyncio.to_thread(Keyring.load_or_create, self.settings.state_dir)
        users = await asyncio.to_thread(Users.open, self.settings, keyring)
        self.view = BoxView()
        self.sender = TradeSender(self.bus)
        self.panel = Panel(
            bus=self.bus, users=users, view=self.view, sender=self.sender,
            logins=Logins(users.engine, max_age=timedelta(hours=config.session_hours),
                          idle=timedelta(hours=config.idle_hours)),
            request_timeout_s=config.request_timeout_s, tls=config.tls_cert is not None,
            require_totp=config.require_totp, ca=ca, metrics=self.metrics)
        # Exchange API keys go to the box's secret store; every write given an actor is
        # audit-logged (a device's password is not: adding the device is).
        store = SecretStore(self.settings.state_dir, keyring, users.audit)
        self.panel.secrets = store
        self.panel.logs = open_source(config.logs, config.logs_dir or
                                      self.settings.state_dir / "logs", config.request_timeout_s)
        # Devices in the broker: a broker-admin connection opened for each change.
        self.panel.devices = DeviceAdmin(
            self.settings.bus, self.settings.state_dir, store, users.audit,
            frozenset(services.names()), config.device_host, config.device_port)
        # The shared files, in the personal cloud's store ([storage]). An upload spools past
        # 1 MiB to a temporary file: on the state disk, not in /tmp, which may be RAM (tmpfs).
        tempfile.tempdir = str(private_dir(self.settings.state_dir / "tmp"))
        self.panel.files = await asyncio.to_thread(open_space, self.settings, keyring,
                                                   config.max_upload_mb)
        self.app = create_app(self.panel)

    @subscribe(registry.TRADE_ACK)
    async def on_trade_ack(self, msg: Received) -> None:
        self.sender.deliver(msg.data)

    @subscribe(registry.SERVICE_STATUS)
    async def on_status(self, msg: Received) -> None:
        await self.view.set_status(msg.params["service"], msg.data, msg.message.sent_at)

    @subscribe(registry.HEALTH_STATE)
    async def on_health(self, msg: Received) -> None:
        await self.view.set("health", _plain(msg.data))

    @subscribe(registry.TRADING_HALT)
    async def on_halt(self, msg: Received) -> None:
        await self.view.set("halt", _plain(msg.data))

    @subscribe(registry.RISK_STATE)
    async def on_risk(self, msg: Received) -> None:
        await self.view.set("risk", _plain(msg.data))

    @subscribe(registry.TRADE_METRICS)
    async def on_metrics(self, msg: Received) -> None:
        await self.view.set_metrics(msg.params["account"], _plain(msg.data))

    @subscribe(registry.POSITIONS)
    async def on_positions(self, msg: Received) -> None:
        await self.view.set_account_state("positions", msg.params["account"], _plain(msg.data))

    @subscribe(registry.OPEN_ORDERS)
    async def on_orders(self, msg: Received) -> None:
        await self.view.set_account_state("orders", msg.params["account"], _plain(msg.data))

    @subscribe(registry.BACKUP_RESULT)
    async def on_backup(self, msg: Received) -> None:
        await self.view.set_account_state("backups", msg.params["job"], _plain(msg.data))

    @subscribe(registry.BACKUP_DRILL)
    async def on_drill(self, msg: Received) -> None:
        await self.view.set_account_state("drills", msg.params["job"], _plain(msg.data))

    @subscribe(registry.BACKUP_ALERT)
    async def on_backup_alert(self, msg: Received) -> None:
        await self.view.set("backup_alert", _plain(msg.data))

    @subscribe(registry.NOTIFY_RECENT)
    async def on_alerts(self, msg: Received) -> None:
        await self.view.set("alerts", _plain(msg.data))

    @subscribe(registry.HOME_STATE)
    async def on_home_state(self, msg: Received) -> None:
        await self.view.set_home_state(msg.params["device"], msg.params["entity"],
                                       _plain(msg.data), live=not msg.message.retain)

    @subscribe(registry.HOME_STATUS)
    async def on_home_status(self, msg: Received) -> None:
        await self.view.set_device_status("home", msg.params["device"], msg.data,
                                          msg.message.sent_at)

    @subscribe(registry.MT5_STATUS)
    async def on_mt5_status(self, msg: Received) -> None:
        await self.view.set_device_status("mt5", msg.params["account"], msg.data,
                                          msg.message.sent_at)

    @subscribe(registry.MT5_HEARTBEAT)
    async def on_mt5_heartbeat(self, msg: Received) -> None:
        await self.view.heartbeat(msg.params["account"])

    async def run(self) -> None:
        config: PanelSettings = self.config
        proxies = config.trusted_proxies
        server = _Server(uvicorn.Config(
            self.app, host=config.host, port=config.port, log_config=None, access_log=False,
            lifespan="off", server_header=False, date_header=True,
            ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key,
            proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None,
            timeout_graceful_shutdown=1))
        log.info(f"the panel: {self.address()}", extra={"address": self.address()})
        serving = asyncio.ensure_future(server.serve())
        charts = asyncio.create_task(keep_charts(self.panel))  # the live home page's
        try:
            await asyncio.shield(serving)
        except SystemExit:  # uvicorn's way of saying it could not listen
            raise OperationalError(f"panel: cannot listen on {config.host}:{config.port}") from None
        except asyncio.CancelledError:
            # Stopping: uvicorn closes its socket, lets requests finish (1 s), ends streams.
            server.should_exit = True
            await asyncio.wait({serving}, timeout=1.5)
            raise
        finally:
            charts.cancel()

    async def stop(self) -> None:
        self.panel.engine.dispose()
        if self.panel.files is not None:
            await asyncio.to_thread(self.panel.files.close)

    def address(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{self.config.host}:{self.config.port}"

    def status_text(self) -> str:
        return f"listening on {self.address()}"


def _plain(data: Any) -> dict[str, Any] | None:
    return None if data is None else data.model_dump(mode="json")
