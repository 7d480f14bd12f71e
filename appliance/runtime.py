"""The Service base class and `run()`: what every Circles process does the same way.

`run()` builds the settings, connects to the broker, subscribes, says `online`, sends
`READY=1`, then runs the receive loop and the service's own `run()` until SIGTERM.
A QoS 1 message is acknowledged to the broker only after its handler returned (or
after it went to the dead-letter topic), so a process killed mid-handling gets it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

from pydantic import ValidationError

from appliance import logging as circles_logging
from appliance.bus import registry
from appliance.bus.base import Bus
from appliance.bus.message import Message, Received
from appliance.bus.mqtt import BrokerAddress, MqttBus
from appliance.bus.payloads import CommandReply, CommandRequest
from appliance.bus.topics import Filter, TopicSpec
from appliance.config import CoreSettings, Section, load, section_name, settings_class
from appliance.errors import CirclesError, ConfigError, TemporaryError, ValidationFailed
from appliance.ha_discovery import Announcer, Entity
from appliance.logging import request_id
from appliance.security.secrets import read_secret

log = logging.getLogger("circles.runtime")
STOP_TIMEOUT_S = 2.5
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def notify(state: str) -> bool:
    """Send one sd_notify line; a no-op (False) without NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half of systemd's WATCHDOG_USEC, when the watchdog is meant for this process."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


def subscribe(spec: TopicSpec, *, batch: bool = False, **params: str) -> Callable[[F], F]:
    """Mark a method as the handler of `spec` (narrowed by `params`). With `batch=True` it
    receives a list of messages and may commit them at once; the batch is acknowledged
    after it returns. A handler of a retained topic gets `data=None` when the retained
    message is deleted (an empty payload), and must cope with it."""

    def mark(method: F) -> F:
        method.__circles_subscription__ = (spec, params, batch)  # type: ignore[attr-defined]
        return method

    return mark


class Service:
    """Base of every service. Subclasses set `name` and `Settings`, mark handlers with
    `@subscribe`, may answer commands with `cmd_<command>` methods, and may override
    `start`, `run` and `stop`."""

    name: ClassVar[str]
    Settings: ClassVar[type[Section]] = Section
    _handlers: ClassVar[list[tuple[TopicSpec, dict[str, str], bool, str]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers = [
            (*attr.__circles_subscription__, attr_name)
            for attr_name in dir(cls)
            if hasattr(attr := getattr(cls, attr_name), "__circles_subscription__")
        ]

    def __init__(self, settings: CoreSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.config: Any = getattr(settings, section_name(self.name), None)

    async def start(self) -> None:
        """Before READY: open what the service needs."""

    async def run(self) -> None:
        """The service's own work beside message handling; returns or runs until cancelled."""

    async def stop(self) -> None:
        """After the last message was handled: close what `start` opened."""

    def status_text(self) -> str:
        return "running"

    def entities(self) -> list[Entity]:
        """The Home Assistant entities this service announces (after `start`). A service that
        lists any is announced once online and again when Home Assistant comes online."""
        return []

    def topic_values(self) -> dict[str, str]:
        """Topic levels fixed by the settings (an `account`): every subscription whose
        template has such a level is narrowed to it, unless its `@subscribe` names one."""
        return {}

    async def rejected(self, message: Message, reason: str) -> None:
        """A message failed validation and went to the dead letters; a service may tell
        its publisher here (the trade logger answers on the account's ack topic)."""

    async def cmd_ping(self, request: CommandRequest) -> dict[str, Any]:
        return {"service": self.name, "pid": os.getpid()}


class Runner:
    """Drives one Service: routing, validation, dead letters, acks, commands, watchdog."""

    def __init__(self, service: Service, bus: Bus, *, batch_max: int = 500,
                 watchdog_s: float | None = None) -> None:
        self.service = service
        self.bus = bus
        self.batch_max = batch_max
        self.watchdog_s = watchdog_s
        # The receive loop turns at least this often when idle, well within a watchdog period.
        self.tick = min(1.0, watchdog_s / 4) if watchdog_s else 1.0
        self.alive_at = time.monotonic()
        self.stopping = asyncio.Event()
        self.handled = 0
        cmd = registry.SERVICE_CMD
        self.routes: list[tuple[Filter, TopicSpec, bool, Callable[..., Awaitable[Any]] | None]] = [
            (cmd.filter(service=service.name), cmd, False, None)]
        fixed = service.topic_values()
        for spec, params, batch, attr in service._handlers:
            values = {k: v for k, v in fixed.items() if k in spec.params} | params
            self.routes.append((spec.filter(**values), spec, batch, getattr(service, attr)))
        # topic → (spec, batch, handler, the topic's values of the spec's template), or None
        self._routed: dict[str, tuple[TopicSpec, bool, Any, dict[str, str]] | None] = {}
        self.announcer: Announcer | None = None
        if type(service).entities is not Service.entities:
            self.announcer = Announcer(bus, service.name, service.settings.state_dir
                                       / service.name / "discovery.json")
            self.routes.append((registry.HA_STATUS.filter(), registry.HA_STATUS, False,
                                self._ha_status))

    async def announce(self) -> None:
        if self.announcer is not None:
            await self.announcer.announce(self.service.entities())

    async def _ha_status(self, msg: Received) -> None:
        # The retained `online` met at subscribing needs nothing: the start announced.
        if msg.data is not None and msg.data.strip() == "online" and not msg.message.retain:
            await self.announce()

    def filters(self) -> list[tuple[Filter, int]]:
        return [(flt, spec.qos) for flt, spec, _, _ in self.routes]

    def _route(self, message: Message) -> tuple[TopicSpec, bool, Any, dict[str, str]] | None:
        try:
            return self._routed[message.topic]
        except KeyError:
            pass
        found = next(((spec, batch, handler, spec.parse(message.topic) or {})
                      for flt, spec, batch, handler in self.routes
                      if flt.matches(message.topic)), None)
        if len(self._routed) >= 10_000:  # topics are few (one per account, device…); stay small
            self._routed.clear()
        self._routed[message.topic] = found
        return found

    async def receive_loop(self) -> None:
        while not self.stopping.is_set():
            self.alive_at = time.monotonic()
            batch = await self.bus.receive(self.batch_max, timeout=self.tick)
            if batch:
                await self.handle(batch)
                self.alive_at = time.monotonic()

    async def handle(self, batch: list[Message]) -> None:
        """Validate, dispatch and acknowledge one batch of received messages."""
        groups: dict[Any, list[Received]] = {}
        for message in batch:
            route = self._route(message)
            if route is None:
                await self.bus.dead_letter(message, "no handler for this topic")
                continue
            spec, is_batch, handler, params = route
            try:
                # An empty payload on a retained topic is how MQTT deletes the retained
                # message: the handler learns that the thing it described is gone (None).
                data = None if spec.retained and not message.payload \
                    else spec.decode(message.payload)
            except ValidationFailed as exc:
                await self._reject(message, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a validator's own bug must not stop the loop
                log.exception("payload validation failed", extra={"topic": message.topic})
                await self._reject(message, f"cannot validate: {type(exc).__name__}: {exc}")
                continue
            received = Received(message, spec, dict(params), data)
            if handler is None:
                await self._command(received)
            elif is_batch:
                groups.setdefault(handler, []).append(received)
            else:
                await self._call(handler, received)
        for handler, items in groups.items():
            await self._call_batch(handler, items)
        for message in batch:
            self.bus.ack(message)
        self.handled += len(batch)

    async def _reject(self, message: Message, reason: str) -> None:
        await self.bus.dead_letter(message, reason)
        await self._reply(message, CommandReply(ok=False, error=reason))
        try:
            await self.service.rejected(message, reason)
        except Exception:  # noqa: BLE001 - the dead letter is what must not be lost
            log.exception("rejected() failed", extra={"topic": message.topic})

    async def _reply(self, message: Message, reply: CommandReply) -> None:
        """Answer a request; a reply that cannot be sent (a wildcard response topic, a result
        that is not JSON) dead-letters the request instead of stopping the loop."""
        try:
            await self.bus.reply(message, reply)
        except (ValueError, TypeError) as exc:
            await self.bus.dead_letter(message, f"cannot reply: {exc}")

    async def _call(self, handler: Callable[..., Awaitable[Any]], received: Received,
                    batch: bool = False) -> None:
        token = request_id.set(received.message.request_id)
        try:
            await handler([received] if batch else received)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the loop
            log.exception("handler failed", extra={"topic": received.topic})
            await self.bus.dead_letter(received.message, f"{type(exc).__name__}: {exc}")
        finally:
            request_id.reset(token)

    async def _call_batch(self, handler: Callable[..., Awaitable[Any]], items: list[Received]) -> None:
        delay = 0.1
        while True:
            try:
                await handler(items)
                return
            except TemporaryError as exc:
                if self.stopping.is_set():
                    raise  # not acknowledged: the broker redelivers after the restart
                log.warning("batch failed, retrying", extra={"error": str(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:  # noqa: BLE001 - find the message that fails, alone
                if len(items) == 1:
                    await self._call(handler, items[0], batch=True)  # logs, dead-letters it
                    return
                for item in items:
                    await self._call_batch(handler, [item])
                return

    async def _command(self, received: Received) -> None:
        message = received.message
        command = received.params.get("command", "").replace("-", "_")
        method = getattr(self.service, f"cmd_{command}", None)
        token = request_id.set(message.request_id)
        try:
            if method is None:
                reply = CommandReply(ok=False, error=f"unknown command {command!r}")
            else:
                reply = CommandReply(ok=True, result=await method(received.data))
        except (CirclesError, ValueError, ValidationError) as exc:
            reply = CommandReply(ok=False, error=str(exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("command failed", extra={"command": command})
            reply = CommandReply(ok=False, error=f"{type(exc).__name__}: {exc}")
        finally:
            request_id.reset(token)
        await self._reply(message, reply)

    async def watchdog(self) -> None:
        """WATCHDOG=1 only while the receive loop really turns (not a blind timer)."""
        interval = self.watchdog_s
        assert interval
        while not self.stopping.is_set():
            await asyncio.sleep(interval)
            stale = time.monotonic() - self.alive_at
            if stale < interval:
                notify(f"WATCHDOG=1\nSTATUS={self.service.status_text()}, "
                       f"{self.handled} messages handled")
            else:
                log.error("receive loop stuck; withholding the watchdog ping",
                          extra={"stale_s": round(stale, 1)})


def address_for(settings: CoreSettings, name: str) -> BrokerAddress:
    bus = settings.bus
    username = bus.username or name
    password = bus.password.get_secret_value() if bus.password else read_secret(
        f"mqtt-{username}", settings.state_dir)
    if not password:
        raise ConfigError(f"config: bus.password: not set, and no secret mqtt-{username} in "
                          f"$CREDENTIALS_DIRECTORY or {settings.state_dir}/secrets")
    circles_logging.redact(password)
    return BrokerAddress(bus.host, bus.port, username, password, bus.tls, bus.ca_file,
                         bus.keepalive_s, bus.receive_maximum, bus.session_expiry_s,
                         bus.reconnect_max_s)


async def serve(service_cls: type[Service], settings: CoreSettings, bus: Bus,
                stop: asyncio.Event | None = None) -> None:
    """Run a service on a bus until `stop` is set, by default until SIGTERM/SIGINT."""
    service = service_cls(settings, bus)
    runner = Runner(service, bus, batch_max=settings.bus.batch_max,
                    watchdog_s=watchdog_interval())
    loop = asyncio.get_running_loop()
    if stop is not None:
        runner.stopping = stop
    else:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, runner.stopping.set)
    notify("STATUS=connecting to the broker")
    connecting = asyncio.create_task(bus.connect())
    stop_wait = asyncio.create_task(runner.stopping.wait())
    await asyncio.wait({connecting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():  # asked to stop before the broker answered
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await bus.close()
        return
    connecting.result()
    await service.start()
    await bus.subscribe(runner.filters())
    await bus.announce_online()
    await runner.announce()
    notify(f"READY=1\nSTATUS={service.status_text()}")
    log.info("service ready", extra={"subscriptions": [str(f) for f, _ in runner.filters()]})

    receive = asyncio.create_task(runner.receive_loop(), name="receive")
    tasks: set[asyncio.Task[Any]] = {receive, asyncio.create_task(service.run(), name="run")}
    if runner.watchdog_s:
        tasks.add(asyncio.create_task(runner.watchdog(), name="watchdog"))
    failure: BaseException | None = None
    pending: set[asyncio.Task[Any]] = set(tasks)
    while not runner.stopping.is_set():
        done, pending = await asyncio.wait(pending | {stop_wait},
                                           return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stop_wait}:
            failure = failure or task.exception()
            if failure is not None or task is receive:
                runner.stopping.set()
        pending.discard(stop_wait)

    notify("STOPPING=1\nSTATUS=stopping")
    log.info("stopping")
    # Within STOP_TIMEOUT_S: finish the batch in hand (what was not handled is not
    # acknowledged), stop the service; then bus.close() takes at most 2 s more.
    deadline = loop.time() + STOP_TIMEOUT_S

    def left() -> float:
        return max(0.0, deadline - loop.time())

    await asyncio.wait({receive}, timeout=left() * 0.6)
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=left() / 2)
    try:
        await asyncio.wait_for(service.stop(), left())
    except TimeoutError:
        log.warning("service did not stop in time")
    finally:
        await bus.close()
    if failure is not None:
        raise failure


def run(service_cls: type[Service]) -> int:
    """The entry point of `circles run <name>`; returns the exit code."""
    try:
        settings = load(settings_class({service_cls.name: service_cls.Settings}))
        circles_logging.setup(service_cls.name, level=settings.log.level,
                              environment=settings.environment,
                              journal_socket=settings.log.journal_socket)
        address = address_for(settings, service_cls.name)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return ConfigError.exit_code
    logging.getLogger("circles.runtime").info("starting", extra={"broker": repr(address)})
    bus = MqttBus(service_cls.name, address)
    try:
        asyncio.run(serve(service_cls, settings, bus))
    except ConfigError as exc:
        log.error(str(exc))
        return ConfigError.exit_code
    except Exception as exc:  # noqa: BLE001 - systemd restarts us; say why first
        log.exception("service failed", extra={"error": str(exc)})
        return 1
    return 0

