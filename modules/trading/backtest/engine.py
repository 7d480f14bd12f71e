"""The backtest: the trading services themselves on the in-memory bus, driven bar by bar.

The settings of market, alpha, ensemble, sizing, execution and the trade logger come from one
configuration file (nothing else: no environment, no /etc/circles), with the market replaying
the data file, execution on paper, and everything kept under a scratch state folder. Each
service runs as on the box: its Runner validates every payload, hands it to the same handler
and acknowledges it, on one in-memory broker. Only the pace differs: the market publishes a
bar, then the services handle what they received, round after round in a fixed order, until
nothing is left; the trade logger then publishes its metrics (what its timer does on the box)
and the rounds go on until all is quiet; then the next bar. The outcome depends on the data
and the settings alone, so two runs give the same fills.

The retained halt is published once, `halted = false`: the risk service judges by the wall
clock (daily loss, orders per minute, clock sync) and is not part of a backtest.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import services
from appliance.bus import MemoryBroker, MemoryBus, registry
from appliance.bus.payloads import TradingHalt
from appliance.bus.topics import slug
from appliance.bus.trade_event import chain_for
from appliance.bus.trading import Bar
from appliance.config import CoreSettings, from_mapping, section_name, settings_class
from appliance.errors import ConfigError, OperationalError, ValidationFailed
from appliance.runtime import Runner
from modules.trade_logger.metrics import DEPOSIT, WITHDRAWAL, Fills
from modules.trading.market.replay import BadFile

log = logging.getLogger("circles.backtest")
SERVICES = ("market", "alpha", "ensemble", "sizing", "execution", "trade-logger")
OBSERVER = "backtest"
MAX_GAPS_LISTED = 100
STUCK_S = 60.0  # a service's own task that runs this long with nothing on the bus is stuck


@dataclass(frozen=True)
class Gap:
    feed: str  # exchange/symbol/timeframe
    before: str  # the bar after the gap (ISO 8601)
    missing: int  # bars


@dataclass
class Result:
    """What one backtest produced: the account's ledger records, its metrics (the trade
    logger's, from its ledger), and the marked equity after every bar."""

    settings: CoreSettings
    data: Path
    data_sha256: str
    rows: int
    timeframe: str
    feeds: list[str]
    account: str
    events: list[dict[str, Any]]
    metrics: dict[str, Any]
    equity: list[tuple[float, float]]  # (bar close, epoch s; equity at that close)
    gaps: list[Gap] = field(default_factory=list)
    missing_bars: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    dead_letters: list[str] = field(default_factory=list)


def check_sections(config: Mapping[str, Any], source: str) -> None:
    """ConfigError naming a top-level key that is neither a service's section nor a core
    setting (a misspelt `[sizng]` would otherwise be ignored)."""
    known = {section_name(n) for n in services.names()} | set(CoreSettings.model_fields)
    for key in config:
        if key not in known:
            raise ConfigError(f"config: {source}: {key}: not a section of any service "
                              f"(known: {', '.join(sorted(known))})")


def pipeline_settings(config: Mapping[str, Any], data: Path, state: Path,
                      source: str) -> CoreSettings:
    """The settings of the backtest's services: `config` (a parsed circles.toml) with the
    market replaying `data` as fast as it is taken, execution on paper, and the state (its
    database, the ledger, keys) under `state`. ConfigError names the bad key."""
    check_sections(config, source)
    doc = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
    market = doc.setdefault("market", {})
    replay = dict(market.get("replay") or {})
    replay.update(file=str(data), speed=0)
    market.update(source="replay", replay=replay)
    execution = doc.setdefault("execution", {})
    execution.update(mode="paper", live_confirmed=False)
    doc.update(state_dir=str(state), database={}, environment="development")
    sections = {name: services.load(name).Settings for name in SERVICES}
    settings = from_mapping(settings_class(sections), doc, source)
    sizing, paper = settings.sizing, settings.execution  # type: ignore[attr-defined]
    if slug(sizing.account) != slug(paper.account):
        raise ConfigError(f"config: {source}: sizing.account ({sizing.account!r}) and "
                          f"execution.account ({paper.account!r}) must name the same account")
    return settings


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    """A scratch state folder, in memory (/dev/shm) where the machine has one."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix="circles-backtest-", dir=where)


class Engine:
    """The services of one backtest on one in-memory broker."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self.broker = MemoryBroker()
        self.runners: dict[str, Runner] = {}
        for name in SERVICES:
            bus = MemoryBus(name, self.broker, yielding=False)
            self.runners[name] = Runner(services.load(name)(settings, bus), bus,
                                        batch_max=settings.bus.batch_max)
        self.observer = MemoryBus(OBSERVER, self.broker, status=False, yielding=False)
        self.marks: list[tuple[str, float, float]] = []  # (symbol, close epoch s, close)
        self.gaps: list[Gap] = []
        self.missing_bars = 0
        self.started: list[Runner] = []
        self._outside: set[asyncio.Task[Any]] = set()

    def service(self, name: str) -> Any:
        return self.runners[name].service

    async def start(self) -> None:
        self._outside = asyncio.all_tasks()
        await self.observer.connect()
        await self.observer.subscribe([(registry.DLQ.filter(), 1)])
        await self.observer.send(registry.TRADING_HALT, TradingHalt(
            halted=False, by=OBSERVER, reason="backtest: trading allowed throughout"))
        for runner in self.runners.values():
            await runner.bus.connect()
            try:
                await runner.service.start()
            except BadFile as exc:
                raise ValidationFailed(f"{exc.path}: {exc.where}: {exc.problem}") from None
            self.started.append(runner)
            await runner.bus.subscribe(runner.filters())
        await self.settle()

    async def run(self) -> None:
        market = self.service("market")
        await market.source.run(self._bar)
        await self.settle()

    async def _bar(self, bar: Bar) -> None:
        accepted = await self.service("market").publish_bar(bar)
        if accepted is None:
            return
        if accepted.gap:
            self.missing_bars += accepted.gap
            if len(self.gaps) < MAX_GAPS_LISTED:
                self.gaps.append(Gap("/".join(accepted.feed), accepted.ts.isoformat(), accepted.gap))
        self.marks.append((accepted.symbol, accepted.close_time.timestamp(), accepted.close))
        await self.settle()

    async def settle(self) -> None:
        """Let every service handle what it received, round after round in the order of
        SERVICES, until no message waits and no task the services started is left; then the
        trade logger's metrics, and the same again until it has nothing new."""
        logger = self.service("trade-logger")
        while True:
            await self._drain()
            if not logger.written:
                return
            await logger.publish_written()

    async def _drain(self) -> None:
        me = asyncio.current_task()
        runners = list(self.runners.values())
        waited = 0.0
        while True:
            # One hop per round: each service handles what it held when the round began, so
            # a bar reaches execution before the sizing decision it leads to (as on the box,
            # where that decision is three hops away).
            waiting = [runner.bus.pending for runner in runners]
            if any(waiting):
                for runner, count in zip(runners, waiting, strict=True):
                    while count > 0:
                        batch = await runner.bus.receive(min(count, runner.batch_max))
                        count -= len(batch)
                        await runner.handle(batch)
                continue
            # Work a service left running (the alpha's warm-up asking the market for bars).
            ours = {t for t in asyncio.all_tasks() - self._outside if t is not me and not t.done()}
            if not ours:
                return
            if waited > STUCK_S:
                raise OperationalError("backtest: the services' tasks "
                                       f"{sorted(t.get_name() for t in ours)} run on with "
                                       f"nothing on the bus for {STUCK_S:g} s")
            started = asyncio.get_running_loop().time()
            await asyncio.wait(ours, timeout=0.001)
            waited += asyncio.get_running_loop().time() - started

    async def stop(self) -> None:
        for runner in self.started:
            await runner.service.stop()
        for runner in self.runners.values():
            await runner.bus.close()
        for name, path in (("execution", "store"), ("trade-logger", "ledger")):
            held = getattr(self.service(name), path, None)
            if held is not None:  # its database lives in the scratch folder, about to go
                held.engine.dispose()
        await self.observer.close()

    async def dead_letters(self) -> list[str]:
        """What the services sent to the dead letters (nothing, when all went well)."""
        letters = []
        while self.observer.pending:
            for message in await self.observer.receive(1000):
                letter = registry.DLQ.decode(message.payload)
                letters.append(f"{letter.service}: {letter.topic}: {letter.reason}")
        return letters

    def ledger_records(self, account: str) -> list[dict[str, Any]]:
        ledger = self.service("trade-logger").ledger
        return [record["data"] for record in ledger.records(chain_for(account), since=0)]


def marked_equity(marks: list[tuple[str, float, float]],
                  events: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """The account's equity at every bar close time: cash (deposits − withdrawals, their fees,
    and what fills paid, fees included) plus each position at its symbol's last close. A fill
    is dated by the bar it filled on, so it counts from that bar's close on. Events are read
    as the metrics read them (`Fills`: floats, base-currency fees converted)."""
    fills = Fills()
    fills.extend(events)
    ts, kind, side, qty, price, fee, symbol = (fills.columns()[c].tolist() for c in (
        "ts", "kind", "side", "qty", "price", "fee", "symbol"))
    order = sorted(range(len(ts)), key=lambda i: ts[i])  # stable: same ts keeps ledger order
    cash, held, last = 0.0, [0.0] * len(fills.symbols), {}  # type: ignore[var-annotated]
    curve: list[tuple[float, float]] = []
    n = 0
    for k, (name, closed_at, close) in enumerate(marks):
        last[name] = close
        if k + 1 < len(marks) and marks[k + 1][1] == closed_at:
            continue  # the other feeds' bars of this close time first
        while n < len(order) and ts[order[n]] < closed_at:
            i = order[n]
            n += 1
            if kind[i] == DEPOSIT:
                cash += qty[i] * price[i] - fee[i]
            elif kind[i] == WITHDRAWAL:
                cash -= qty[i] * price[i] + fee[i]
            else:
                held[symbol[i]] += side[i] * qty[i]
                cash -= side[i] * qty[i] * price[i] + fee[i]
        curve.append((closed_at, cash + sum(q * last.get(fills.symbols[c], 0.0)
                                            for c, q in enumerate(held))))
    return curve


async def run_backtest(config: Mapping[str, Any], data: Path, source: str) -> Result:
    """One backtest of `data` with the settings of `config` (parsed from `source`)."""
    data = Path(data)
    if not data.is_file():
        raise ValidationFailed(f"{data}: no such file")
    with scratch_dir() as state:
        settings = pipeline_settings(config, data, Path(state), source)
        engine = Engine(settings)
        try:
            await engine.start()
            await engine.run()
            account = slug(settings.execution.account)  # type: ignore[attr-defined]
            events = await asyncio.to_thread(engine.ledger_records, account)
            metrics = await engine.service("trade-logger").publish_metrics(account) \
                if events else {}
            market = engine.service("market")
            replay = market.source.file
            counts = {"bars": market.published,
                      "signals": engine.service("alpha").published,
                      "targets": engine.service("ensemble").published,
                      "intents": engine.service("sizing").intents,
                      "fills": sum(1 for e in events if e["kind"] == "fill")}
            return Result(
                settings=settings, data=data, data_sha256=await asyncio.to_thread(sha256_of, data),
                rows=replay.rows, timeframe=replay.timeframe, account=account,
                feeds=["/".join(key) for key in market.feeds], events=events, metrics=metrics,
                equity=marked_equity(engine.marks, events), gaps=engine.gaps,
                missing_bars=engine.missing_bars, counts=counts,
                dead_letters=await engine.dead_letters())
        finally:
            await engine.stop()
