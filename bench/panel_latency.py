"""Panel latency: p95 of the dashboard's JSON API under load, against a bare FastAPI "hello"
route under the same load in the same run.

The system under test is `circles run panel` as systemd runs it (its own process, real
uvicorn), on a private Mosquitto with the trade logger, the risk service and the health
service beside it at their production intervals, so the dashboard shows real retained
state; it is asked `GET /api/v1/dashboard` with an API token (`Authorization: Bearer ct_…`,
scope viewer) of an admin made in its private database. The baseline is a FastAPI app with
one `GET /hello` returning {"hello": "world"}, in a process of its own, served as the panel
serves (uvicorn.Server.serve() on a plain asyncio loop, log_config=None, access_log=False,
no lifespan, no server header).

The load is this process: `--clients` (50) keep-alive connections, each sending its next
request as soon as the answer is in, for `--seconds` (20) per target on loopback. The time
is cut into `--rounds` slices that alternate the targets (ABBA), so both see the same
moments of a noisy machine; a short warm-up of each goes first, not counted. The client is
a minimal HTTP/1.1 one on asyncio streams, which keeps this process near a fifth of a core
while a server is saturated (`loadgen_cpu_pct_*`, `*_server_cpu_pct`); `--client httpx`
uses httpx.AsyncClient instead, which saturates this process at ~250 requests/s whatever
the target and so measures itself, not the servers. Each request is timed from its write
to the last byte of its answer.

Prints requests, rates and CPU of each phase, the panel's RSS before the load,
`hello_p95_ms`, `dashboard_p95_ms`, and last `dashboard_p95/hello_p95` (target ≤ 3) and
`panel_rss_mb` (the panel's RSS after the load; target ≤ 120).
Usage: python bench/panel_latency.py [--seconds 20] [--clients 50] [--rounds 4]
                                     [--warmup 1] [--client raw|httpx]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOST = "127.0.0.1"
ACCOUNT = "bench"
SERVICES = ("trade-logger", "risk", "health", "panel")
PASSWORD = "correct horse battery staple"
CONFIG = f"""
[risk]
accounts = ["{ACCOUNT}"]
require_clock_sync = false

[log]
level = "WARN"
"""
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


# -- the baseline: a bare FastAPI app, served as the panel serves ------------------------------
def serve_hello(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    server = uvicorn.Server(uvicorn.Config(
        app, host=HOST, port=port, log_config=None, access_log=False, lifespan="off",
        server_header=False, date_header=True))
    asyncio.run(server.serve())  # as the panel: inside asyncio.run, not uvicorn.run's loop


# -- the load -----------------------------------------------------------------------------------
async def raw_client(port: int, request: bytes, stop_at: float, samples: list[float]) -> None:
    """One keep-alive connection sending `request` until `stop_at`."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while (began := time.perf_counter()) < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = _LENGTH.search(head)
            if length is None:
                raise RuntimeError(f"no content-length in {head[:200]!r}")
            body = await reader.readexactly(int(length.group(1)))
            samples.append(time.perf_counter() - began)
            if head[9:12] != b"200":
                raise RuntimeError(f"{head[:12]!r}: {body[:300]!r}")
    finally:
        writer.close()


async def httpx_client(client: Any, url: str, headers: dict[str, str], stop_at: float,
                       samples: list[float]) -> None:
    while (began := time.perf_counter()) < stop_at:
        answer = await client.get(url, headers=headers)
        samples.append(time.perf_counter() - began)
        if answer.status_code != 200:
            raise RuntimeError(f"{answer.status_code}: {answer.text[:300]}")


async def load(kind: str, port: int, path: str, token: str, clients: int,
               seconds: float) -> list[float]:
    """`clients` connections asking `path` for `seconds`; the latency of every answer."""
    samples: list[float] = []
    stop_at = time.perf_counter() + seconds
    if kind == "raw":
        request = (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                   f"Authorization: Bearer {token}\r\nAccept: application/json\r\n\r\n").encode()
        await asyncio.gather(*(raw_client(port, request, stop_at, samples) for _ in range(clients)))
        return samples
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"authorization": f"Bearer {token}", "accept": "application/json"}
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        await asyncio.gather(*(httpx_client(client, f"http://{HOST}:{port}{path}", headers,
                                            stop_at, samples) for _ in range(clients)))
    return samples


class Phase:
    """The samples of one target, with the CPU its server and this process spent on them."""

    def __init__(self, name: str, server: psutil.Process, port: int, path: str) -> None:
        self.name, self.server, self.port, self.path = name, server, port, path
        self.samples: list[float] = []
        self.wall = self.server_cpu = self.loadgen_cpu = 0.0

    async def run(self, args: argparse.Namespace, token: str, seconds: float,
                  count: bool = True) -> None:
        me = psutil.Process()
        cpu0, own0, wall0 = _cpu(self.server), _cpu(me), time.perf_counter()
        samples = await load(args.client, self.port, self.path, token, args.clients, seconds)
        if count:
            self.samples += samples
            self.wall += time.perf_counter() - wall0
            self.server_cpu += _cpu(self.server) - cpu0
            self.loadgen_cpu += _cpu(me) - own0

    def p95_ms(self) -> float:
        return float(np.percentile(np.array(self.samples) * 1000, 95))

    def report(self) -> None:
        print(f"{self.name}_requests = {len(self.samples)}")
        print(f"{self.name}_rps = {len(self.samples) / self.wall:.0f}")
        print(f"{self.name}_p50_ms = {np.percentile(np.array(self.samples) * 1000, 50):.2f}")
        print(f"{self.name}_server_cpu_pct = {100 * self.server_cpu / self.wall:.0f}")
        print(f"loadgen_cpu_pct_{self.name} = {100 * self.loadgen_cpu / self.wall:.0f}")


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


# -- the box --------------------------------------------------------------------------------------
def make_token(state: Path, url: str) -> str:
    """An admin in the panel's database and an API token of theirs, scope viewer."""
    from argon2 import PasswordHasher

    from appliance import db
    from appliance.ledger import Ledger, Signer
    from appliance.panel.sessions import Logins
    from appliance.security.audit import AuditLog
    from appliance.security.crypto import Keyring
    from appliance.security.permissions import Principal, Role
    from appliance.security.users import Users

    engine = db.make_engine(url)
    try:
        db.migrate(engine)
        users = Users(engine, AuditLog(Ledger(engine, Signer.load_or_create(state))),
                      keyring=Keyring.load_or_create(state),
                      hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
        users.add("ada", PASSWORD, Role.ADMIN, actor="cli:bench")
        logins = Logins(engine, max_age=timedelta(days=1), idle=timedelta(days=1))
        _, token = logins.create_token(Principal("ada", Role.ADMIN), "bench", Role.VIEWER)
        return token
    finally:
        engine.dispose()


async def until_ready(broker: Any, panel_port: int, hello_port: int, token: str) -> None:
    """Every service online, and the dashboard showing health and the trading halt."""
    import httpx

    from appliance.bus import registry
    from tests.helpers import Collector

    watch = await Collector.start(broker, str(registry.SERVICE_STATUS.filter()))
    try:
        await watch.wait(lambda ms: {m.topic.split("/")[1] for m in ms
                                     if m.payload == b"online"} >= set(SERVICES), 60,
                         "every service online")
    finally:
        await watch.close()
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            try:
                hello = await client.get(f"http://{HOST}:{hello_port}/hello")
                answer = await client.get(f"http://{HOST}:{panel_port}/api/v1/dashboard",
                                          headers={"authorization": f"Bearer {token}"})
                shown = answer.json() if answer.status_code == 200 else {}
                if hello.status_code == 200 and shown.get("health") \
                        and shown["trading"]["known"] and len(shown["services"]) >= len(SERVICES):
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the dashboard did not fill in 30 s")
            await asyncio.sleep(0.25)


async def main(args: argparse.Namespace) -> None:
    from appliance.supervisor import free_port
    from tests.helpers import ServiceProcess, TestBroker

    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)  # clean up
    with tempfile.TemporaryDirectory(prefix="circles-bench-") as tmp:
        state = Path(tmp)
        broker = TestBroker(state, free_port(21883))
        broker.start()
        processes: list[ServiceProcess] = []
        hello: subprocess.Popen[bytes] | None = None
        try:
            await broker.provision(list(SERVICES))
            url = f"sqlite:///{state / 'panel.db'}"
            token = make_token(state, url)
            config = state / "bench.toml"
            config.write_text(CONFIG)
            panel_port = free_port(38080)
            hello_port = free_port(panel_port + 1)
            env = broker.env(CIRCLES_CONFIG=str(config), CIRCLES_DATABASE__URL=url,
                             CIRCLES_PANEL__PORT=str(panel_port),
                             # production intervals, not the tests'
                             CIRCLES_HEALTH__INTERVAL_S="10",
                             CIRCLES_TRADE_LOGGER__METRICS_INTERVAL_S="5")
            for name in SERVICES:
                processes.append(ServiceProcess(name, env, state))
            hello = subprocess.Popen([sys.executable, __file__, "--serve-hello", str(hello_port)],
                                     stdin=subprocess.DEVNULL)
            await until_ready(broker, panel_port, hello_port, token)
            panel = psutil.Process(processes[-1].process.pid)
            idle_mb = panel.memory_info().rss / 2**20
            phases = [Phase("hello", psutil.Process(hello.pid), hello_port, "/hello"),
                      Phase("dashboard", panel, panel_port, "/api/v1/dashboard")]
            for phase in phases:
                await phase.run(args, token, args.warmup, count=False)
            for round_ in range(args.rounds):  # ABBA: drift in machine load hits both alike
                for phase in phases if round_ % 2 == 0 else phases[::-1]:
                    await phase.run(args, token, args.seconds / args.rounds)
            rss_mb = panel.memory_info().rss / 2**20
        except BaseException:
            for process in processes:
                if process.process.poll() is not None:
                    print(f"--- {process.name} exited:\n{process.log[-3000:]}", file=sys.stderr)
            raise
        finally:
            if hello is not None:
                hello.kill()
                hello.wait(10)
            for process in processes:
                process.stop()
            broker.stop()
    print(f"clients = {args.clients}")
    print(f"seconds_each = {args.seconds:g}")
    for phase in phases:
        phase.report()
    print(f"panel_rss_before_mb = {idle_mb:.0f}")
    hello_p95, dashboard_p95 = phases[0].p95_ms(), phases[1].p95_ms()
    print(f"hello_p95_ms = {hello_p95:.2f}")
    print(f"dashboard_p95_ms = {dashboard_p95:.2f}")
    print(f"dashboard_p95/hello_p95 = {dashboard_p95 / hello_p95:.2f}")
    print(f"panel_rss_mb = {rss_mb:.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="of load on each target")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4, help="slices, alternating the targets")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds, not counted")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw")
    parser.add_argument("--serve-hello", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve_hello:
        serve_hello(parsed.serve_hello)
    else:
        asyncio.run(main(parsed))
