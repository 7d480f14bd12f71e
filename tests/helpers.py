"""Test helpers: a real broker, a tester client, running a service as a process; and a
service on the in-memory bus, driven by hand."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.bus import BrokerAddress, Filter, MemoryBroker, MemoryBus, Message, MqttBus, registry
from appliance.bus.admin import BrokerAdmin
from appliance.config import section_name, settings_class
from appliance.errors import AuthError
from appliance.runtime import Runner, Service, serve
from appliance.security.secrets import ensure_secret, read_secret
from appliance.supervisor import Broker, free_port

TESTER = "tester"
_counter = itertools.count()


def circles_env(state: Path, **extra: str) -> dict[str, str]:
    """The environment of a `circles` command working on the state directory `state` (and
    no configuration file but an empty one)."""
    config = state / "empty.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.touch()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CIRCLES_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                            "JOURNAL_STREAM", "CREDENTIALS_DIRECTORY")}
    env.update(CIRCLES_STATE_DIR=str(state), CIRCLES_CONFIG=str(config))
    env.update(extra)
    return env


def circles(env: dict[str, str], *args: str, stdin: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the `circles` command line as a person would."""
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it is true (its value), or fail naming `what`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (found := predicate()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return found


def unique_topic(prefix: str = "circles/tester/t") -> str:
    """A topic no other test uses (under the tester's own prefix by default)."""
    return f"{prefix}/{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


@dataclass
class TestBroker:
    """A real Mosquitto with the project's generated config, auth and ACLs."""

    __test__ = False

    state: Path
    port: int
    broker: Broker = field(init=False)

    def __post_init__(self) -> None:
        self.broker = Broker(self.state, self.port)

    def start(self) -> None:
        self.broker.start()

    def stop(self) -> None:
        self.broker.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    async def admin(self) -> BrokerAdmin:
        return await BrokerAdmin.connect("127.0.0.1", self.port, self.state)

    async def provision(self, services: list[str]) -> None:
        """Service clients, plus a `tester` client that may publish and subscribe anything."""
        admin = await self.admin()
        try:
            await admin.sync(services, self.state)
            acls = [{"acltype": t, "topic": "#", "priority": 0, "allow": True}
                    for t in ("publishClientSend", "subscribePattern")]
            await admin.execute({"command": "createRole", "rolename": TESTER, "acls": acls},
                                allow=["Role already exists"])
            password = ensure_secret(f"mqtt-{TESTER}", self.state)
            await admin.execute({"command": "createClient", "username": TESTER,
                                 "password": password, "roles": [{"rolename": TESTER}]},
                                allow=["Client already exists"])
        finally:
            await admin.close()

    def password(self, username: str) -> str:
        value = read_secret(f"mqtt-{username}", self.state)
        assert value, f"no secret for {username}"
        return value

    def address(self, username: str, password: str | None = None, **kw: Any) -> BrokerAddress:
        return BrokerAddress("127.0.0.1", self.port, username,
                             password if password is not None else self.password(username), **kw)

    def bus(self, username: str = TESTER, *, name: str | None = None, persistent: bool = False,
            client_id: str | None = None, **kw: Any) -> MqttBus:
        return MqttBus(name or username, self.address(username, **kw), status=False,
                       persistent=persistent,
                       client_id=client_id or f"{username}-{uuid.uuid4().hex[:8]}")

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a service process pointed at this broker."""
        return circles_env(self.state, **{
            "CIRCLES_BUS__PORT": str(self.port), "CIRCLES_ENVIRONMENT": "development",
            "CIRCLES_HEALTH__INTERVAL_S": "0.5", "CIRCLES_BUS__RECONNECT_MAX_S": "1",
            "CIRCLES_PANEL__PORT": str(free_port(38080)),
            "CIRCLES_TRADE_LOGGER__METRICS_INTERVAL_S": "0.5", **extra})


class Collector:
    """A connected client that keeps every message arriving on its filters."""

    def __init__(self, bus: MqttBus) -> None:
        self.bus = bus
        self.messages: list[Message] = []
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, broker: TestBroker, *filters: str, **kw: Any) -> Collector:
        self = cls(broker.bus(**kw))
        await self.bus.connect()
        await self.bus.subscribe([(Filter(f), 1) for f in filters])
        self._task = asyncio.create_task(self._pump())
        return self

    async def _pump(self) -> None:
        while True:
            for message in await self.bus.receive(100, timeout=1):
                self.messages.append(message)
                self.bus.ack(message)

    def on(self, topic: str) -> list[Message]:
        return [m for m in self.messages if m.topic == topic]

    async def wait(self, predicate: Callable[[list[Message]], Any], timeout: float = 10.0,
                   what: str = "messages") -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = predicate(self.messages)
            if result:
                return result
            if asyncio.get_running_loop().time() > deadline:
                seen = [(m.topic, m.payload[:80]) for m in self.messages[-10:]]
                raise AssertionError(f"timed out waiting for {what}; last seen: {seen}")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.bus.close()


class ServiceProcess:
    """`circles run <name>` as its own process, as systemd runs it."""

    def __init__(self, name: str, env: dict[str, str], cwd: Path,
                 log_path: Path | None = None) -> None:
        self.name = name
        # Its output (the JSON log lines on stderr): `log_path`, else a new file in `cwd`.
        self.log_path = log_path or cwd / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "run", name], env=env,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 10.0) -> int:
        code = self.process.wait(timeout)
        self._log.close()
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self._log.close()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def serving(broker: TestBroker, service_cls: type[Service], state: Path,
                  **config: Any) -> AsyncIterator[None]:
    """A service in this process on the real broker, run by `serve()` as `circles run` runs
    it, with `config` as its settings section, until the block ends; it is online on entry."""
    name = service_cls.name
    settings = settings_class({name: service_cls.Settings})(
        state_dir=state, **{section_name(name): service_cls.Settings(**config)})
    bus = MqttBus(name, broker.address(name), client_id=f"{name}-{uuid.uuid4().hex[:8]}")
    online = await Collector.start(broker, str(registry.SERVICE_STATUS.topic(service=name)))
    stop = asyncio.Event()
    task = asyncio.create_task(serve(service_cls, settings, bus, stop))
    try:
        await online.wait(lambda ms: task.done() or any(
            m.payload == b"online" and m.sender == name for m in ms), 15, f"{name} online")
        if task.done():
            task.result()  # raises what stopped it
        yield
    finally:
        await online.close()
        stop.set()
        await task


async def services_online(broker: TestBroker, names: Sequence[str], timeout: float = 30) -> None:
    """Wait until each of `names` has said `online` on its status topic."""
    topics = [str(registry.SERVICE_STATUS.topic(service=n)) for n in names]
    watch = await Collector.start(broker, *topics)
    try:
        await watch.wait(lambda ms: all(any(m.topic == t and m.payload == b"online" for m in ms)
                                        for t in topics), timeout, "services online")
    finally:
        await watch.close()


async def delivered(broker: TestBroker, publisher: MqttBus, topic: str) -> bool:
    """Publish from `publisher` and report whether an all-seeing tester received it (a
    retained message that other tests left on the topic does not count)."""
    watch = await Collector.start(broker, topic)
    try:
        try:
            await publisher.publish(topic, b"probe", qos=1, wait=True)
        except AuthError:
            pass  # MQTT v5 PUBACK says so; delivery below is what counts
        try:
            await watch.wait(lambda ms: [m for m in ms if not m.retain], 1.5, topic)
            return True
        except AssertionError:
            return False
    finally:
        await watch.close()


# -- a service on the in-memory bus, driven by hand -----------------------------------------
async def wire(broker: MemoryBroker, service_cls: type[Service], **config: Any) -> Runner:
    """A service on the in-memory bus, started and subscribed (its `run()` is not), with
    `config` as its settings section."""
    section = service_cls.Settings(**config)
    settings = settings_class({service_cls.name: service_cls.Settings})(**{service_cls.name: section})
    bus = MemoryBus(service_cls.name, broker)
    runner = Runner(service_cls(settings, bus), bus)
    await bus.connect()
    await runner.service.start()
    await bus.subscribe(runner.filters())
    return runner


async def watcher(broker: MemoryBroker, *filters: str) -> MemoryBus:
    """A client of the in-memory bus that receives `filters` and may send anything."""
    bus = MemoryBus("watch", broker, status=False)
    await bus.connect()
    await bus.subscribe([(Filter(f), 1) for f in filters])
    return bus


async def pump(runners: list[Runner]) -> None:
    """Let every runner handle what it received, in a fixed order, until all are idle."""
    while True:
        moved = False
        for runner in runners:
            batch = await runner.bus.receive(1000, timeout=0)
            if batch:
                await runner.handle(batch)
                moved = True
        if not moved:
            return


def account_rows(url: str, table: Any, account: str) -> list[Any]:
    """The rows of one account in a table of the database at `url`."""
    from sqlalchemy import select

    from appliance import db

    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(table).where(table.c.account == account)))
    finally:
        engine.dispose()
