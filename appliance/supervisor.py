"""`circles up`: a private Mosquitto and every registered service, each its own process.

For a laptop or a demo: the broker's files live under a local state folder, each
service's JSON log lines are copied to `<state>/logs/<service>.jsonl` (which the panel
reads when there is no journal), a crashed service is restarted with backoff, and
Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.bus import broker
from appliance.bus.admin import BrokerAdmin, client_secret
from appliance.errors import ConfigError, OperationalError
from appliance.security.secrets import ensure_secret

OBSERVER = "observer"
MT5_BRIDGE = "mt5-bridge"
DEMO_EA = "demo-mt5"  # the simulated expert advisor's account in the demo
DEMO_EA_ARGS = ["simulate", "mt5", "--account", DEMO_EA, "--every", "30", "--log-json"]


def free_port(start: int = 1883, host: str = "127.0.0.1") -> int:
    for port in range(start, start + 200):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
                return port
            except OSError:
                continue
    raise OperationalError(f"no free port from {start}")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)
    if not found:
        raise ConfigError("mosquitto not found on PATH; install it (apt-get install mosquitto)")
    return found


class Broker:
    """A private Mosquitto under `state`, for `circles up`, the tests and the benchmarks."""

    def __init__(self, state: Path, port: int) -> None:
        self.state, self.port = state, port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        broker.init(self.state, port=self.port)
        logs = self.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "mosquitto.log", "ab") as out:
            self.process = subprocess.Popen(
                [mosquitto_binary(), "-c", str(broker.BrokerFiles.under(self.state).conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise OperationalError(f"mosquitto did not start; see {logs / 'mosquitto.log'}")
            time.sleep(0.05)

    def stop(self) -> None:
        """A clean stop: Mosquitto writes its persistence file on SIGTERM."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class Child:
    """A `circles` command run by the supervisor: a service (`run <name>`) by default."""

    def __init__(self, name: str, env: dict[str, str], logs: Path,
                 args: list[str] | None = None) -> None:
        self.name, self.env, self.log_path = name, env, logs / f"{name}.jsonl"
        self.args = args or ["run", name]
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "appliance.cli", *self.args, env=self.env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)

    async def pump_logs(self) -> None:
        """Copy the child's log lines to its .jsonl file and a short form to the console."""
        assert self.process and self.process.stderr
        with open(self.log_path, "a", encoding="utf-8") as out:
            async for raw in self.process.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError
                except ValueError:
                    record = {"log_level": "ERROR", "service": self.name, "message": line}
                    line = json.dumps(record)
                out.write(line + "\n")
                out.flush()
                print(f"{self.name:>14}  {record.get('log_level', ''):5}  {record.get('message')}",
                      flush=True)


async def provision(port: int, state: Path, services: list[str],
                    devices: Sequence[tuple[str, str]] = ()) -> str:
    """On a private broker: the services' clients (and the command line's), the read-only
    observer, and `devices` ((kind, name), e.g. the demo's simulated EA), each with its
    secret under `state`. Returns the observer's password."""
    admin = await BrokerAdmin.connect("127.0.0.1", port, state)
    try:
        await admin.sync(services, state)
        observer_password = ensure_secret(client_secret(OBSERVER), state)
        await admin.ensure_client("observer", OBSERVER, observer_password)
        for kind, name in devices:
            await admin.ensure_client(kind, name, ensure_secret(client_secret(name), state))
    finally:
        await admin.close()
    return observer_password


async def up(state: Path, *, only: list[str] | None = None, config: Path | None = None) -> int:
    from appliance import services
    from appliance.config import CoreSettings, load
    from appliance.security.users import FIRST_ADMIN, first_start

    # First of all, so that Ctrl-C at any moment from here on stops what was started.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    state = state.resolve()
    names = only or services.names()
    # This process and the services read the same settings (the database among them).
    os.environ.update(CIRCLES_STATE_DIR=str(state), CIRCLES_ENVIRONMENT="development")
    os.environ.pop("NOTIFY_SOCKET", None)
    if config:
        os.environ["CIRCLES_CONFIG"] = str(config.resolve())
    # Before the broker starts, so a failure here leaves nothing running.
    admin_password = first_start(load(CoreSettings))
    port = free_port()
    mosq = Broker(state, port)
    mosq.start()
    try:
        # With the mt5 bridge, a simulated MetaTrader terminal with its own account.
        observer_password = await provision(
            port, state, names, [("mt5", DEMO_EA)] if MT5_BRIDGE in names else [])
    except BaseException:
        mosq.stop()
        raise

    env = {**os.environ, "CIRCLES_BUS__HOST": "127.0.0.1", "CIRCLES_BUS__PORT": str(port)}
    children = [Child(name, env, state / "logs") for name in names]
    if MT5_BRIDGE in names:
        children.append(Child(DEMO_EA, env, state / "logs", DEMO_EA_ARGS))
    print(f"Circles is up: broker on 127.0.0.1:{port}, services: {', '.join(names)}")
    if admin_password:
        print(f"first admin: {FIRST_ADMIN} / {admin_password} — shown once, change it at first login")
    print(f"Watch the bus:\n  mosquitto_sub -h 127.0.0.1 -p {port} -u {OBSERVER} "
          f"-P '{observer_password}' -t 'circles/#' -v")
    print(f"The command line against it:\n  export CIRCLES_STATE_DIR={state} CIRCLES_BUS__PORT={port}")
    print(f"Logs: {state / 'logs'}/<service>.jsonl   Stop: Ctrl-C", flush=True)

    watchers = [asyncio.create_task(supervise(child, stop)) for child in children]
    await stop.wait()
    print("stopping…", flush=True)
    await asyncio.gather(*watchers, return_exceptions=True)
    mosq.stop()
    return 0


async def supervise(child: Child, stop: asyncio.Event) -> None:
    """Run a child until `stop`; restart it with backoff when it dies (not on exit 78)."""
    delay = 1.0
    while not stop.is_set():
        await child.start()
        assert child.process
        pump = asyncio.create_task(child.pump_logs())
        exited = asyncio.create_task(child.process.wait())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not exited.done():
            await terminate(child.process)
        stopping.cancel()
        await pump
        code = child.process.returncode
        if stop.is_set():
            return
        if code == ConfigError.exit_code:
            print(f"{child.name}: configuration error (exit 78); not restarting", flush=True)
            return
        print(f"{child.name}: exited with {code}; restarting in {delay:.0f} s", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            pass
        delay = min(delay * 2, 30.0)


async def terminate(process: Any, timeout: float = 6.0) -> None:
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
