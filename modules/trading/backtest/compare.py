"""Backtest against paper: the same data and settings through the paper execution over a real
Mosquitto, every service its own process, then a trade-by-trade comparison of the fills.

`paper_run` starts a private Mosquitto (the project's generated config) and the services
market, alpha, ensemble, sizing, execution and trade-logger as `circles run <name>`
processes, with the settings of the backtest (passed as one JSON environment variable per
section, over an empty configuration file) and the market replaying the file at `speed`
bars per second. It stands in for the risk service, as the backtest does: trading is
allowed throughout (the retained halt, published with the risk service's credentials). It
waits until the replay has finished and nothing has moved on the bus for `quiet_s`, then
reads the account's chain from the ledger.

`compare` pairs the fills: by event id first (ids come from the intent's bar, so the same
decision has the same id), then the same symbol and side within `window_bars` bars, and
reports per pair the differences in bar, quantity, price (in bps) and fee, and in total.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from appliance.bus import registry
from appliance.bus.admin import client_secret
from appliance.bus.mqtt import BrokerAddress, MqttBus
from appliance.bus.payloads import TradingHalt
from appliance.bus.trade_event import chain_for
from appliance.config import CoreSettings, from_mapping
from appliance.errors import OperationalError
from appliance.ledger import open_ledger
from appliance.security.secrets import read_secret
from appliance.supervisor import OBSERVER, Broker, free_port, provision, terminate
from modules.trade_logger.metrics import parse_ts
from modules.trading.backtest.engine import SERVICES, scratch_dir

log = logging.getLogger("circles.backtest")
HALT_WRITER = "risk"
# What moves while the desk is busy: the pipeline's topics, and the feeds' states (which
# say when the replay is done).
WATCHED = (registry.MARKET_FEED, registry.MARKET_BAR, registry.ALPHA_SIGNALS,
           registry.ENSEMBLE_TARGET, registry.ORDER_INTENT, registry.ORDER_UPDATE,
           registry.TRADE_EVENT, registry.TRADE_ACK, registry.TRADE_METRICS)
START_TIMEOUT_S = 60.0


def paper_environment(doc: Mapping[str, Any], state: Path, port: int) -> dict[str, str]:
    """The environment of a service process: the settings `doc` (the backtest's, with the
    state moved to `state`), nothing from this process's CIRCLES_* variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CIRCLES_") and k not in (
               "NOTIFY_SOCKET", "WATCHDOG_USEC", "CREDENTIALS_DIRECTORY", "JOURNAL_STREAM")}
    empty = state / "empty.toml"
    empty.touch()
    env.update(CIRCLES_CONFIG=str(empty), CIRCLES_STATE_DIR=str(state),
               CIRCLES_ENVIRONMENT="development", CIRCLES_BUS__HOST="127.0.0.1",
               CIRCLES_BUS__PORT=str(port), CIRCLES_LOG__LEVEL="INFO")
    for section, value in doc.items():
        env[f"CIRCLES_{section.upper()}"] = json.dumps(value)
    return env


def paper_settings(settings: CoreSettings, speed: float) -> dict[str, Any]:
    """The backtest's settings for the paper run: the replay paced at `speed` bars/s, and the
    trade logger's metrics and the positions' marks as prompt, in bars, as on the box."""
    sections = ("market", "alpha", "ensemble", "sizing", "execution", "trade_logger")
    doc = {name: getattr(settings, name).model_dump(mode="json") for name in sections}
    doc["market"]["replay"]["speed"] = speed
    bar_s = 1.0 / speed
    logger = doc["trade_logger"]
    logger["metrics_interval_s"] = max(0.01, min(logger["metrics_interval_s"], bar_s / 2))
    doc["execution"]["positions_interval_s"] = max(0.05, bar_s)
    return doc


@dataclass
class Watch:
    """What the observer saw: when anything last moved, and which feeds have finished."""

    moved_at: float = 0.0
    finished: bool = False

    def see(self, topic: str, payload: bytes, retained: bool) -> None:
        if retained:
            return  # what the broker kept from before: nothing moved
        self.moved_at = time.monotonic()
        if registry.MARKET_FEED.parse(topic) is not None and payload:
            # The market sends every feed's state at once when the file is done.
            self.finished = self.finished or json.loads(payload).get("reason") == "replay finished"


async def paper_run(settings: CoreSettings, rows: int, speed: float, logs: Path, *,
                    quiet_s: float = 3.0) -> list[dict[str, Any]]:
    """The account's ledger records after replaying the `rows` of the data through the
    services over a private broker (see the module's docstring). Its state (database,
    ledger, broker, secrets) is a scratch folder, removed afterwards; the services' log
    lines are copied to `logs/`."""
    with scratch_dir() as tmp:
        state = Path(tmp)
        try:
            return await _paper_run(settings, rows, speed, state, quiet_s)
        finally:
            logs.mkdir(parents=True, exist_ok=True)
            for log_file in (state / "logs").glob("*"):
                shutil.copyfile(log_file, logs / log_file.name)


async def _paper_run(settings: CoreSettings, rows: int, speed: float, state: Path,
                     quiet_s: float) -> list[dict[str, Any]]:
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    doc = paper_settings(settings, speed)
    port = free_port(28830)
    broker = Broker(state, port)
    processes: list[Any] = []
    observer: MqttBus | None = None
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    loop.add_signal_handler(signal.SIGTERM, me.cancel)  # stop what was started, then exit
    try:
        await asyncio.to_thread(broker.start)
        await provision(port, state, [*SERVICES, HALT_WRITER])
        observer = _bus(OBSERVER, port, state)
        halt = _bus(HALT_WRITER, port, state)
        await observer.connect()
        await halt.connect()
        watch = Watch()
        await observer.subscribe([(spec.filter(), 1) for spec in WATCHED])
        await halt.send(registry.TRADING_HALT, TradingHalt(
            halted=False, by="backtest", reason="paper comparison: trading allowed throughout"),
            wait=True)
        await halt.close()
        env = paper_environment(doc, state, port)
        for name in SERVICES:
            with (logs / f"{name}.jsonl").open("ab") as out:
                processes.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "appliance.cli", "run", name, env=env,
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=out, start_new_session=True))
        budget = START_TIMEOUT_S + rows / speed * 3
        deadline = time.monotonic() + budget
        watch.moved_at = time.monotonic()
        while True:
            for message in await observer.receive(500, timeout=0.2):
                watch.see(message.topic, message.payload, message.retain)
                observer.ack(message)
            if watch.finished and time.monotonic() - watch.moved_at >= quiet_s:
                break
            for name, process in zip(SERVICES, processes, strict=True):
                if process.returncode is not None:
                    raise OperationalError(f"paper run: {name} exited with {process.returncode}; "
                                           f"see its log, {name}.jsonl")
            if time.monotonic() > deadline:
                raise OperationalError(f"paper run: not finished after {budget:.0f} s; see the logs")
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if observer is not None:
            await observer.close()
        await asyncio.gather(*(terminate(p) for p in processes))
        await asyncio.to_thread(broker.stop)
    ledger = await asyncio.to_thread(open_ledger, from_mapping(
        CoreSettings, {"state_dir": str(state)}, "paper run"))
    account = chain_for(doc["execution"]["account"])
    return [record["data"] for record in await asyncio.to_thread(ledger.records, account, since=0)]


def _bus(user: str, port: int, state: Path) -> MqttBus:
    password = read_secret(client_secret(user), state)
    return MqttBus(user, BrokerAddress("127.0.0.1", port, user, password), status=False,
                   client_id=f"backtest-{user}-{os.getpid()}")


@dataclass
class Pair:
    status: str  # same | differs | only in backtest | only in paper
    symbol: str
    side: str
    backtest_id: str = ""
    paper_id: str = ""
    backtest_ts: str = ""
    paper_ts: str = ""
    bars_late: float | None = None  # paper bar − backtest bar
    backtest_qty: str = ""
    paper_qty: str = ""
    backtest_price: str = ""
    paper_price: str = ""
    price_bps: float | None = None  # (paper − backtest) / backtest × 10⁴, signed
    backtest_fee: str = ""
    paper_fee: str = ""


def _fills(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "fill"]


def _pair(bt: dict[str, Any] | None, pp: dict[str, Any] | None, step_s: float) -> Pair:
    one = bt or pp
    assert one is not None
    pair = Pair(status="only in backtest" if pp is None else "only in paper" if bt is None else "",
                symbol=one["symbol"], side=one["side"])
    if bt is not None:
        pair.backtest_id, pair.backtest_ts = bt["event_id"], bt["ts"]
        pair.backtest_qty, pair.backtest_price, pair.backtest_fee = bt["qty"], bt["price"], bt["fee"]
    if pp is not None:
        pair.paper_id, pair.paper_ts = pp["event_id"], pp["ts"]
        pair.paper_qty, pair.paper_price, pair.paper_fee = pp["qty"], pp["price"], pp["fee"]
    if bt is not None and pp is not None:
        pair.bars_late = (parse_ts(pp["ts"]) - parse_ts(bt["ts"])) / step_s
        price_bt, price_pp = Decimal(bt["price"]), Decimal(pp["price"])
        pair.price_bps = float((price_pp - price_bt) / price_bt * 10_000)
        same = pair.bars_late == 0 and Decimal(bt["qty"]) == Decimal(pp["qty"]) and \
            price_bt == price_pp and Decimal(bt["fee"]) == Decimal(pp["fee"])
        pair.status = "same" if same else "differs"
    return pair


def compare(backtest: list[dict[str, Any]], paper: list[dict[str, Any]], step_s: float,
            window_bars: int = 5) -> list[Pair]:
    """Every fill of either side, paired (see the module's docstring), in backtest order
    with the paper's extra fills after."""
    bt_fills, pp_fills = _fills(backtest), _fills(paper)
    by_id = {e["event_id"]: e for e in pp_fills}
    used: set[str] = set()
    pairs: list[Pair | None] = []
    unmatched: list[tuple[int, dict[str, Any]]] = []
    for event in bt_fills:
        twin = by_id.get(event["event_id"])
        if twin is not None:
            used.add(twin["event_id"])
            pairs.append(_pair(event, twin, step_s))
        else:
            unmatched.append((len(pairs), event))
            pairs.append(None)
    for at, event in unmatched:
        ts = parse_ts(event["ts"])
        near = [e for e in pp_fills if e["event_id"] not in used and e["symbol"] == event["symbol"]
                and e["side"] == event["side"]
                and abs(parse_ts(e["ts"]) - ts) <= window_bars * step_s]
        twin = min(near, key=lambda e: abs(parse_ts(e["ts"]) - ts), default=None)
        if twin is not None:
            used.add(twin["event_id"])
        pairs[at] = _pair(event, twin, step_s)
    found = [p for p in pairs if p is not None]
    found += [_pair(None, e, step_s) for e in pp_fills if e["event_id"] not in used]
    return found


def totals(pairs: list[Pair], backtest: list[dict[str, Any]], paper: list[dict[str, Any]],
           slippage_bps: float) -> dict[str, Any]:
    """The comparison in total; `within_slippage`: every fill has its twin, on the same bar
    and quantity, its price within the configured slippage."""
    matched = [p for p in pairs if p.price_bps is not None]

    def total(events: list[dict[str, Any]], key: str) -> float:
        return float(sum((Decimal(e[key]) for e in _fills(events)), Decimal(0)))

    def volume(events: list[dict[str, Any]]) -> float:
        return float(sum((Decimal(e["qty"]) * Decimal(e["price"]) for e in _fills(events)),
                         Decimal(0)))

    worst = max((abs(p.price_bps or 0.0) for p in matched), default=0.0)
    counts = {status: sum(1 for p in pairs if p.status == status)
              for status in ("same", "differs", "only in backtest", "only in paper")}
    return {
        "fills": {"backtest": len(_fills(backtest)), "paper": len(_fills(paper)), **counts},
        "max_abs_price_bps": worst,
        "mean_price_bps": sum(p.price_bps or 0.0 for p in matched) / len(matched) if matched else None,
        "max_abs_bars_late": max((abs(p.bars_late or 0.0) for p in matched), default=0.0),
        "fees": {"backtest": total(backtest, "fee"), "paper": total(paper, "fee")},
        "volume": {"backtest": volume(backtest), "paper": volume(paper)},
        "slippage_bps": slippage_bps,
        "within_slippage": counts["only in backtest"] == counts["only in paper"] == 0
        and all(p.bars_late == 0 and Decimal(p.backtest_qty) == Decimal(p.paper_qty)
                for p in matched) and worst <= slippage_bps,
    }


def write(out: Path, pairs: list[Pair], summary: dict[str, Any]) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
    with (out / "fidelity.csv").open("w", newline="", encoding="utf-8") as handle:
        fields = list(Pair.__dataclass_fields__)
        writer = csv.DictWriter(handle, fields, lineterminator="\n")
        writer.writeheader()
        for pair in pairs:
            writer.writerow({k: "" if v is None else v for k, v in asdict(pair).items()})
