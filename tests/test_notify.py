"""The notify service: each built-in rule sends one message with its content, dedupe and
summaries, quiet hours and rate limits by a clock moved by hand, the audit log's lockouts
and failed logins from real logins; and as a process on the real broker: ntfy, Telegram and
e-mail endpoints on 127.0.0.1 with their secrets, retries until an endpoint recovers, an
alert queued across a kill -9, `circles notify test`, and no secret in a message or a log."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from pydantic import BaseModel, ValidationError

from appliance.bus import MemoryBroker, MemoryBus, registry
from appliance.bus.message import Message
from appliance.bus.mt5 import MT5Gaps
from appliance.bus.payloads import BackupAlert, BackupResult, HealthState, NotifyRecent, TradingHalt
from appliance.bus.topics import TopicSpec
from appliance.bus.trading import RiskState
from appliance.config import SecuritySettings, describe_errors, settings_class
from appliance.db import default_url, make_engine, migrate
from appliance.ledger import Entry, Ledger, Signer
from appliance.logging import request_id
from appliance.runtime import Runner
from appliance.security.audit import CHAIN, AuditLog
from appliance.security.crypto import Keyring
from appliance.security.permissions import Role
from appliance.security.secrets import write_secret
from appliance.security.users import Users
from modules.notify.audit_watch import BATCH
from modules.notify.delivery import Courier
from modules.notify.outbox import Outbox
from modules.notify.rules import WATCHED, render
from modules.notify.service import NotifyService
from modules.notify.settings import NotifySettings
from tests.helpers import Collector, ServiceProcess, TestBroker, circles, pump, until
from tests.notify_endpoints import Endpoint, Mailbox

T0 = datetime(2024, 6, 3, 10, 0, tzinfo=UTC)  # a Monday, 12:00 in Berlin


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def ntfy() -> Iterator[Endpoint]:
    endpoint = Endpoint()
    yield endpoint
    endpoint.close()


class Box:
    """The service on the in-memory bus, driven turn by turn, and a client that publishes."""

    def __init__(self, runner: Runner, source: MemoryBus, clock: Clock) -> None:
        self.runner, self.source, self.clock = runner, source, clock

    @property
    def service(self) -> NotifyService:
        assert isinstance(self.runner.service, NotifyService)
        return self.runner.service

    async def send(self, spec: TopicSpec, payload: BaseModel | str, rid: str | None = None,
                   **params: str) -> None:
        token = request_id.set(rid)
        try:
            await self.source.send(spec, payload, **params)
        finally:
            request_id.reset(token)

    async def turn(self, **advance: float) -> None:
        """Move the clock, handle what arrived, read the audit log, then one pass of timers and
        deliveries."""
        self.clock.advance(**advance)
        await pump([self.runner])
        if self.service.audit is not None:
            await self.service.poll_audit()
        await self.service.tick()
        await self.service.deliver()


async def start(state: Path, clock: Clock, ntfy: Endpoint | None = None, **config: Any) -> Box:
    if ntfy is not None:
        config.setdefault("channels", {"phone": {"kind": "ntfy", "url": ntfy.url, "topic": "box-alerts"}})
    config.setdefault("box_name", "pi")
    settings = settings_class({"notify": NotifySettings})(notify=NotifySettings(**config),
                                                         state_dir=state)
    broker = MemoryBroker()
    bus = MemoryBus("notify", broker)
    service = NotifyService(settings, bus)
    service.clock = clock
    runner = Runner(service, bus)
    await bus.connect()
    await service.start()
    await bus.subscribe(runner.filters())
    source = MemoryBus("source", broker, status=False)
    await source.connect()
    return Box(runner, source, clock)


def health(**values: Any) -> HealthState:
    doc: dict[str, Any] = dict(ts=T0.isoformat(), hostname="pi", cpu_percent=5.0, load=(0.1, 0.1, 0.1),
                               memory_percent=30.0, memory_used_mb=300.0, memory_total_mb=1000.0,
                               disk_percent=50.0, disk_free_gb=20.0, uptime_s=100.0,
                               clock_synchronized=True)
    return HealthState(**(doc | values))


def drill(ok: bool) -> BackupResult:
    return BackupResult(job="home", kind="drill", ok=ok, target="local:/srv/backups", local_only=True,
                        error=None if ok else "sha256 mismatch in db/circles.db")


def gaps(missing: list[int]) -> MT5Gaps:
    return MT5Gaps(missing=missing, checked=5, from_msc=1, to_msc=2, ts=T0.isoformat())


def risk(breaches: list[str]) -> RiskState:
    return RiskState(halted=False, breaches=breaches, figures={"pnl_today": -520.0},
                     limits={"max_daily_loss": 500.0})


# rule: (spec, topic levels, what triggers it, what ends it, its `for`, title, text, resolved text)
DEFAULT_CASES: dict[str, tuple[TopicSpec, dict[str, str], Any, Any, timedelta | None, str, str, str]] = {
    "trading_halted": (registry.TRADING_HALT, {}, TradingHalt(halted=True, by="risk", reason="daily loss"),
                       TradingHalt(halted=False, by="user:alice", reason="reviewed"), None,
                       "Trading halted", "Trading halted by risk: daily loss",
                       "Trading resumed by user:alice: reviewed (halted for 1 min)"),
    "risk_breach": (registry.RISK_STATE, {}, risk(["max_daily_loss"]), risk([]), None,
                    "Risk limit breached", "Risk limits breached: max_daily_loss",
                    "Risk back within its limits"),
    "service_offline": (registry.SERVICE_STATUS, {"service": "market"}, "offline", "online",
                        timedelta(minutes=5), "Service market offline",
                        "The market service has been offline for 5 min",
                        "The market service is back online (offline for 6 min)"),
    "device_offline": (registry.HOME_STATUS, {"device": "garage-door"}, "offline", "online",
                       timedelta(minutes=10), "Device garage-door offline",
                       "The device garage-door has been offline for 10 min",
                       "The device garage-door is back online (offline for 11 min)"),
    "mt5_offline": (registry.MT5_STATUS, {"account": "ftmo-1"}, "offline", "online",
                    timedelta(minutes=10), "MT5 terminal ftmo-1 offline",
                    "The MT5 terminal of ftmo-1 has been offline for 10 min",
                    "The MT5 terminal of ftmo-1 is back online (offline for 11 min)"),
    "mt5_gap": (registry.MT5_GAPS, {"account": "ftmo-1"}, gaps([101, 102]), gaps([]),
                timedelta(minutes=30), "MT5 deals missing: ftmo-1",
                "missing from the ledger for 30 min and were not recovered by a resend: tickets 101, 102",
                "The missing deals of ftmo-1 are in the ledger now"),
    "backup_overdue": (registry.BACKUP_ALERT, {}, BackupAlert(alert=True, reason="home: none for 3 d",
                                                                  overdue=["home: none for 3 d"]),
                       BackupAlert(alert=False), None, "No good backup", "No good backup: home: none for 3 d",
                       "Backups are good again"),
    "restore_drill_failed": (registry.BACKUP_DRILL, {"job": "home"}, drill(False), drill(True), None,
                             "Restore drill of home failed",
                             "The restore drill of the backup home failed: sha256 mismatch in db/circles.db",
                             "The restore drill of the backup home passed"),
    "disk_full": (registry.HEALTH_STATE, {}, health(disk_percent=93.6, disk_free_gb=1.2), health(),
                  timedelta(minutes=5),
                  "Disk almost full", "The disk of pi is 94 % full (1.2 GB free)",
                  "The disk is 50 % full again"),
    "clock_unsynchronised": (registry.HEALTH_STATE, {}, health(clock_synchronized=False), health(),
                             timedelta(minutes=10), "Clock not synchronised",
                             "The clock of pi has not been synchronised for 10 min",
                             "The clock is synchronised again"),
}
PRIORITY = {"trading_halted": 5}  # critical; the others are warnings (ntfy's 4)


@pytest.mark.parametrize("rule", sorted(DEFAULT_CASES))
async def test_each_built_in_rule_sends_one_message(rule: str, tmp_path: Path, ntfy: Endpoint) -> None:
    spec, params, trigger, end, hold, title, text, resolved = DEFAULT_CASES[rule]
    box = await start(tmp_path, Clock(), ntfy)
    await box.send(spec, trigger, **params)
    await box.turn()
    if hold is not None:  # nothing until it has held that long
        await box.turn(seconds=hold.total_seconds() - 1)
        assert ntfy.posted == []
        await box.turn(seconds=1)
    (sent,) = [p.body for p in ntfy.posted]
    assert (sent["title"], sent["topic"], sent["priority"]) == (title, "box-alerts", PRIORITY.get(rule, 4))
    assert text in sent["message"], sent["message"]
    await box.send(spec, trigger, **params)  # the same again, and time passing: nothing new
    await box.turn(minutes=1)
    assert len(ntfy.posted) == 1
    await box.send(spec, end, **params)
    await box.turn()
    assert [p.body["title"] for p in ntfy.posted] == [title, f"Resolved: {title}"]
    assert ntfy.posted[1].body["message"] == resolved
    assert ntfy.posted[1].body["tags"] == ["white_check_mark"]


async def test_an_alert_that_keeps_firing_is_summarised(tmp_path: Path, ntfy: Endpoint) -> None:
    box = await start(tmp_path, Clock(), ntfy)
    await box.send(registry.TRADING_HALT, TradingHalt(halted=True, by="risk", reason="daily loss"))
    await box.turn()
    await box.send(registry.TRADING_HALT, TradingHalt(halted=True, by="risk", reason="drawdown"))
    await box.turn(hours=2, minutes=59)
    assert len(ntfy.posted) == 1
    await box.turn(minutes=1)
    assert ntfy.posted[1].body["message"] == "Still halted, 3 h: drawdown"
    assert ntfy.posted[1].body["tags"] == ["hourglass"]
    await box.turn(hours=2)
    assert len(ntfy.posted) == 2
    await box.turn(hours=1)
    assert ntfy.posted[2].body["message"] == "Still halted, 6 h: drawdown"


async def test_rules_are_overridden_disabled_and_added_by_the_config(tmp_path: Path, ntfy: Endpoint) -> None:
    box = await start(tmp_path, Clock(), ntfy, summary_every="1h", rules=[
        {"name": "disk_full", "when": [{"field": "disk_percent", "above": 80}], "severity": "critical"},
        {"name": "trading_halted", "enabled": False},
        {"name": "leak", "topic": "circles/home/+/leak/state", "when": [{"is": "ON"}], "severity": "critical",
         "title": "Water at {device}", "message": "The {device} sensor says {value} ({unit})"}])
    await box.send(registry.TRADING_HALT, TradingHalt(halted=True, by="risk", reason="x"))
    await box.send(registry.HEALTH_STATE, health(disk_percent=85.0))
    await box.send(registry.HOME_STATE, _state("ON"), device="cellar", entity="leak")
    await box.send(registry.HOME_STATE, _state("ON"), device="cellar", entity="temperature")
    await box.turn()
    assert [(p.body["title"], p.body["priority"]) for p in ntfy.posted] == [("Water at cellar", 5)]
    assert ntfy.posted[0].body["message"] == "The cellar sensor says ON (–)"
    await box.turn(minutes=5)  # the built-in's `for`, kept
    assert [(p.body["title"], p.body["priority"]) for p in ntfy.posted[1:]] == [("Disk almost full", 5)]
    await box.turn(minutes=55)  # the section's summary_every, for every rule
    assert [p.body["message"] for p in ntfy.posted[2:]] == ["Still so after 1 h: Water at cellar"]
    await box.turn(minutes=5)
    assert [p.body["message"] for p in ntfy.posted[3:]] == ["The disk is still 85 % full, 1 h 5 min"]


def _state(value: Any) -> Any:
    from appliance.bus.payloads import HomeState

    return HomeState(value=value)


async def test_quiet_hours_hold_alerts_below_critical_until_they_end(tmp_path: Path, ntfy: Endpoint) -> None:
    clock = Clock(datetime(2024, 6, 3, 21, 30, tzinfo=UTC))  # 23:30 in Berlin
    box = await start(tmp_path, clock, ntfy, timezone="Europe/Berlin", quiet_hours="22:00-07:00")
    await box.send(registry.RISK_STATE, risk(["max_daily_loss"]))
    await box.send(registry.TRADING_HALT, TradingHalt(halted=True, by="risk", reason="daily loss"))
    await box.turn()
    assert [p.body["title"] for p in ntfy.posted] == ["Trading halted"]  # critical: at once
    recent = box.service.recent
    held = (await recent()).alerts
    assert [(a.title, a.pending) for a in held] == [("Trading halted", []), ("Risk limit breached", ["phone"])]
    await box.turn(hours=7, minutes=29, seconds=59)  # 06:59:59; the halt's summary came meanwhile
    assert [p.body["message"] for p in ntfy.posted[1:]] == ["Still halted, 7 h 29 min: daily loss"]
    await box.turn(seconds=1)  # 07:00 in Berlin: the alert, not its summary queued behind it
    assert [p.body["title"] for p in ntfy.posted[2:]] == ["Risk limit breached"]
    assert (await recent()).queued == 0


def test_quiet_hours_follow_the_wall_clock_across_daylight_saving(tmp_path: Path) -> None:
    config = NotifySettings(timezone="Europe/Berlin", quiet_hours="01:00-04:00")
    courier = Courier(config, {}, Outbox(tmp_path / "outbox.db"), "pi")
    spring = datetime(2024, 3, 31, tzinfo=UTC)  # 02:00 CET becomes 03:00 CEST
    assert [courier.quiet_now(spring + timedelta(minutes=m)) for m in (-1, 30, 90, 119, 120)] == [
        False, True, True, True, False]  # 00:59 CET, 01:30 CET, 03:30 CEST, 03:59 CEST, 04:00 CEST
    autumn = datetime(2024, 10, 27, tzinfo=UTC)  # 03:00 CEST becomes 02:00 CET
    assert [courier.quiet_now(autumn + timedelta(minutes=m)) for m in (-61, 0, 150, 179, 180)] == [
        False, True, True, True, False]  # 00:59 CEST, 02:00 CEST, 03:30 CET, 03:59 CET, 04:00 CET


async def test_beyond_the_rate_limit_one_digest(tmp_path: Path, ntfy: Endpoint) -> None:
    box = await start(tmp_path, Clock(), ntfy, default_rules=False, channels={
        "phone": {"kind": "ntfy", "url": ntfy.url, "topic": "box-alerts", "max_per_hour": 2}}, rules=[
        {"name": "door", "topic": "home_status", "when": [{"is": "offline"}], "title": "{device} offline",
         "message": "{device} went offline"}])
    for door in ("front", "back", "garage", "shed"):
        await box.send(registry.HOME_STATUS, "offline", device=door)
    await box.turn()
    assert [p.body["title"] for p in ntfy.posted] == ["front offline", "3 alerts"]
    assert ntfy.posted[1].body["message"].splitlines() == [
        "• back offline: back went offline", "• garage offline: garage went offline",
        "• shed offline: shed went offline"]
    await box.send(registry.HOME_STATUS, "offline", device="cellar")
    await box.turn(minutes=59)
    assert len(ntfy.posted) == 2  # two sent within the hour: it waits
    await box.turn(minutes=1)
    assert ntfy.posted[2].body["title"] == "cellar offline"


async def test_critical_alerts_pass_the_rate_limit(tmp_path: Path, ntfy: Endpoint) -> None:
    box = await start(tmp_path, Clock(), ntfy, default_rules=False, channels={
        "phone": {"kind": "ntfy", "url": ntfy.url, "topic": "box-alerts", "max_per_hour": 1}}, rules=[
        {"name": "door", "topic": "home_status", "when": [{"is": "offline"}], "title": "{device} offline",
         "message": "{device} went offline"},
        {"name": "halt", "topic": "trading_halt", "when": [{"field": "halted", "is": True}],
         "severity": "critical", "title": "Halted", "message": "{reason}"}])
    await box.send(registry.HOME_STATUS, "offline", device="front")
    await box.turn()
    await box.send(registry.HOME_STATUS, "offline", device="back")
    await box.send(registry.TRADING_HALT, TradingHalt(halted=True, by="risk", reason="daily loss"))
    await box.turn(minutes=1)
    assert [p.body["title"] for p in ntfy.posted] == ["front offline", "Halted"]
    assert (await box.service.recent()).queued == 1  # `back` waits for the next free slot


class RequestIds(logging.Handler):
    """The request id each line is logged under (the log schema takes it from the context)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), request_id.get()))


async def test_an_alert_from_a_sender_without_request_ids_gets_one(tmp_path: Path, ntfy: Endpoint) -> None:
    box = await start(tmp_path, Clock(), ntfy)
    # A last will (or a device, an EA) carries no request id.
    will = Message(str(registry.MT5_STATUS.topic(account="ftmo-1")), b"offline", 1, True)
    assert will.request_id is None
    box.source.broker.route(will)
    lines = RequestIds()
    logger = logging.getLogger("circles.notify")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        await box.turn()
        await box.turn(minutes=10)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    (rid,) = [rid for message, rid in lines.lines if message == "alert sent"]
    assert rid and len(rid) >= 8
    assert [p.body["title"] for p in ntfy.posted] == ["MT5 terminal ftmo-1 offline"]


async def test_a_failed_restore_drill_is_one_alert_not_two(tmp_path: Path, ntfy: Endpoint) -> None:
    box = await start(tmp_path, Clock(), ntfy)
    await box.send(registry.BACKUP_DRILL, drill(False), job="home")
    await box.send(registry.BACKUP_ALERT, BackupAlert(
        alert=True, reason="home: the restore drill of 2024-06-03T09:00:00Z failed", jobs=["home"]))
    await box.turn()
    assert [p.body["title"] for p in ntfy.posted] == ["Restore drill of home failed"]
    await box.send(registry.BACKUP_ALERT, BackupAlert(alert=True, jobs=["home", "media"], reason=(
        "home: the restore drill of 2024-06-03T09:00:00Z failed; media: no good backup since 2024-05-30"),
        overdue=["media: no good backup since 2024-05-30"]))
    await box.turn()
    assert ntfy.posted[1].body["message"] == "No good backup: media: no good backup since 2024-05-30"


async def test_a_channel_answering_garbage_is_retried_without_leaking_its_url(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    telegram = Endpoint()
    token = f"12345:{uuid.uuid4().hex}"
    write_secret("telegram-bot-token", token, tmp_path)
    box = await start(tmp_path, Clock(), retry_base_s=60, channels={
        "chat": {"kind": "telegram", "chat_id": 42, "api_url": telegram.url}})
    telegram.garble = True
    try:
        with caplog.at_level(logging.INFO, logger="circles.notify"):
            await box.send(registry.TRADING_HALT, TradingHalt(halted=True, by="risk", reason="x"))
            await box.turn()
            assert telegram.refused == 1
            telegram.garble = False
            await box.turn(minutes=2)
        (failed,) = [r for r in caplog.records if r.getMessage() == "alert not sent; will retry"]
        assert "BadStatusLine" in failed.error  # type: ignore[attr-defined]
        assert token not in caplog.text
        assert [p.body["chat_id"] for p in telegram.posted] == ["42"]
    finally:
        telegram.close()


async def test_a_failing_channel_is_retried_with_backoff_until_it_takes_the_alert(
        tmp_path: Path, ntfy: Endpoint, caplog: pytest.LogCaptureFixture) -> None:
    box = await start(tmp_path, Clock(), ntfy, retry_base_s=60, retry_max_s=600)
    ntfy.fail_with = 503
    await box.send(registry.TRADING_HALT, TradingHalt(halted=True, by="risk", reason="daily loss"), rid="halt-1")
    with caplog.at_level(logging.INFO, logger="circles.notify"):
        await box.turn()
        assert ntfy.refused == 1
        await box.turn(seconds=29)  # the first wait is 30 to 60 s
        assert ntfy.refused == 1
        await box.turn(seconds=31)
        assert ntfy.refused == 2
        await box.turn(seconds=59)  # the second is 60 to 120 s
        assert ntfy.refused == 2
        ntfy.fail_with = None
        await box.turn(seconds=61)
    assert [p.body["title"] for p in ntfy.posted] == ["Trading halted"]
    failures = [r for r in caplog.records if r.getMessage() == "alert not sent; will retry"]
    assert [r.attempts for r in failures] == [1, 2]  # type: ignore[attr-defined]
    assert all("HTTP 503: down for the test" in r.error for r in failures)  # type: ignore[attr-defined]
    assert (await box.service.recent()).queued == 0


async def test_lockouts_and_repeated_failed_logins_from_the_audit_log(tmp_path: Path, ntfy: Endpoint) -> None:
    engine = make_engine(default_url(tmp_path))
    migrate(engine)
    audit = AuditLog(Ledger(engine, Signer.load_or_create(tmp_path)))
    users = Users(engine, audit, SecuritySettings(), keyring=Keyring.load_or_create(tmp_path),
                  hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    users.add("alice", "correct horse battery staple", Role.OPERATOR, actor="cli:test")
    for _ in range(12):  # before the service ever ran: history, not news
        users.authenticate("nobody", "wrong", source="192.0.2.1")
    box = await start(tmp_path, Clock(), ntfy, audit_poll_s=0.001)
    await box.turn()
    for _ in range(5):
        users.authenticate("alice", "not her password", source="198.51.100.7")
    for _ in range(10):
        users.authenticate("mallory", "guess", source="203.0.113.9")
    await box.turn()
    assert sorted((p.body["title"], p.body["message"].split(" (")[0]) for p in ntfy.posted) == [
        ("Login locked: alice", "alice was locked out after repeated failed logins"),
        ("Repeated failed logins", "10 failed logins for address 203.0.113.9 within 15 min")]
    for _ in range(3):  # the same burst: counted, not sent again
        users.authenticate("mallory", "guess", source="203.0.113.9")
    await box.turn(minutes=1)
    assert len(ntfy.posted) == 2
    await box.turn(hours=2, minutes=59)  # the summary of the burst, 3 h after it began
    assert ntfy.posted[2].body["message"] == "3 more failed logins for address 203.0.113.9 in 3 h"
    engine.dispose()


async def test_the_audit_log_is_followed_past_records_archived_meanwhile(tmp_path: Path, ntfy: Endpoint) -> None:
    engine = make_engine(default_url(tmp_path))
    migrate(engine)
    ledger = Ledger(engine, Signer.load_or_create(tmp_path))
    audit = AuditLog(ledger)
    audit.record("user.add", actor="cli:test", target="bob")
    box = await start(tmp_path, Clock(), ntfy, audit_poll_s=0.001)
    await box.turn()  # starts at the head: seq 1
    # More than one read's worth of events, archived out of the database before the next poll.
    ledger.append(CHAIN, [Entry({"action": "panel.view", "actor": "user:bob"}) for _ in range(BATCH + 100)])
    ledger.checkpoint(CHAIN)
    ledger.archive(CHAIN, ledger.head(CHAIN)[0], tmp_path / "archive")
    audit.record("login.lockout", actor="system", target="bob", source="198.51.100.7", until="10:15")
    await box.turn()
    assert [p.body["title"] for p in ntfy.posted] == ["Login locked: bob"]
    engine.dispose()


@pytest.mark.parametrize("config,where,says", [
    ({"quiet_hours": "22:00-25:00"}, "quiet_hours", "hours are 00-23"),
    ({"timezone": "Mars/Olympus"}, "timezone", "unknown time zone"),
    ({"channels": {"phone": {"kind": "pager"}}}, "channels.phone", "kind"),
    ({"channels": {"mail": {"kind": "email", "host": "smtp.example.com", "sender": "box@example.com"}}},
     "channels.mail.email.to", "Field required"),
    ({"rules": [{"name": "x", "topic": "circles/trade/+/event", "when": [{"is": 1}], "title": "t",
                 "message": "m"}]}, "rules.0.topic", "watch one of"),
    ({"rules": [{"name": "disk_full", "message": "{hostname.__class__}"}]}, "rules.0.message", "no attributes"),
    ({"rules": [{"name": "disk_full", "when": [{"field": "disk_percent"}]}]}, "rules.0.when.0", "give one test"),
    ({"rules": [{"name": "failed_logins", "within": None}]}, "rules.0", "count above 1 needs within"),
])
def test_bad_settings_name_the_key(config: dict[str, Any], where: str, says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        NotifySettings(**config)
    (line,) = describe_errors(caught.value)
    assert line.startswith(where) and says in line, line


def test_the_service_subscribes_to_every_topic_a_rule_may_watch() -> None:
    assert {spec.name for spec, *_ in NotifyService._handlers} == set(WATCHED)


def test_templates_reach_fields_only_and_payloads_stay_text() -> None:
    context = {"reason": "{__class__} {0}", "figures": {"pnl": -3.5}, "missing": [1, 2]}
    assert render("{reason} / {figures[pnl]:+.1f} / {missing} / {nothing}", context) == \
        "{__class__} {0} / -3.5 / 1, 2 / ?"


# -- the process on the real broker ---------------------------------------------------------
SECRETS = {"ntfy-token": "tk_" + uuid.uuid4().hex, "telegram-bot-token": f"12345:{uuid.uuid4().hex}",
           "smtp-password": "pw-" + uuid.uuid4().hex}


def process_env(broker: TestBroker, state: Path, config: str, user: str = "notify") -> dict[str, str]:
    """A process's environment: its own state directory and config, the broker's password."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / "circles.toml"
    path.write_text(config)
    return broker.env(CIRCLES_STATE_DIR=str(state), CIRCLES_CONFIG=str(path),
                      CIRCLES_BUS__USERNAME=user, CIRCLES_BUS__PASSWORD=broker.password(user))


def door_rule(device: str) -> str:
    return ("default_rules = false\nretry_base_s = 0.2\nretry_max_s = 0.5\nbox_name = \"pi\"\n"
            "[[notify.rules]]\nname = \"door\"\n"
            f"topic = \"{registry.HOME_STATUS.topic(device=device)}\"\n"
            "when = [{ is = \"offline\" }]\nseverity = \"critical\"\n"
            "title = \"Door {device} offline\"\nmessage = \"The {device} node went {value}\"\n"
            "resolved = \"The {device} node is back\"\n")


async def start_notify(broker: TestBroker, env: dict[str, str], tmp_path: Path) -> ServiceProcess:
    """`circles run notify`, once it said it is online."""
    watch = await Collector.start(broker, str(registry.SERVICE_STATUS.topic(service="notify")))
    proc = ServiceProcess("notify", env, tmp_path)
    try:
        await watch.wait(lambda ms: proc.process.poll() is not None or any(
            m.payload == b"online" and not m.retain for m in ms), 20, "notify online")
        assert proc.process.poll() is None, proc.log
    finally:
        await watch.close()
    return proc


async def clear(tester: Any, device: str) -> None:
    """Leave nothing retained for the tests after this one."""
    for topic in (registry.HOME_STATUS.topic(device=device), registry.NOTIFY_RECENT.topic()):
        await tester.publish(str(topic), b"", retain=True, wait=True)
    await tester.close()


async def test_process_sends_through_every_channel_without_leaking_a_secret(
        broker: TestBroker, tmp_path: Path) -> None:
    state = tmp_path / "state"
    for name, value in SECRETS.items():
        write_secret(name, value, state)
    device = f"door-{uuid.uuid4().hex[:6]}"
    ntfy, telegram = Endpoint(), Endpoint()
    mailbox = Mailbox(tmp_path, "box@example.com", SECRETS["smtp-password"])
    telegram.fail_with = 401  # refused first: the error is logged, then it is tried again
    config = "[notify]\n" + door_rule(device) + (
        f"[notify.channels.phone]\nkind = \"ntfy\"\nurl = \"{ntfy.url}\"\ntopic = \"pi-alerts\"\n"
        "token_secret = \"ntfy-token\"\n"
        f"[notify.channels.chat]\nkind = \"telegram\"\napi_url = \"{telegram.url}\"\nchat_id = 4242\n"
        f"[notify.channels.mail]\nkind = \"email\"\nhost = \"127.0.0.1\"\nport = {mailbox.port}\n"
        f"sender = \"box@example.com\"\nto = [\"owner@example.com\"]\nusername = \"box@example.com\"\n"
        f"ca_file = \"{mailbox.ca_file}\"\n")
    proc = await start_notify(broker, process_env(broker, state, config), tmp_path)
    tester = broker.bus()
    await tester.connect()
    try:
        token = request_id.set(f"door-{device}")
        try:
            await tester.send(registry.HOME_STATUS, "offline", device=device, wait=True)
        finally:
            request_id.reset(token)
        await until(lambda: ntfy.posted and mailbox.messages and telegram.refused, 15, "ntfy, mail, a refusal")
        telegram.fail_with = None
        await until(lambda: telegram.posted, 15, "telegram after its retry")
        (phone,), (chat,), (mail,) = ntfy.posted, telegram.posted, mailbox.messages
        assert phone.headers["Authorization"] == f"Bearer {SECRETS['ntfy-token']}"
        assert (phone.body["title"], phone.body["message"], phone.body["priority"]) == (
            f"Door {device} offline", f"The {device} node went offline", 5)
        assert chat.path == f"/bot{SECRETS['telegram-bot-token']}/sendMessage"
        assert chat.body["chat_id"] == "4242" and chat.body["text"].startswith(f"🚨 Door {device} offline\n")
        assert mail["Subject"] == f"[!] [pi] Door {device} offline" and mail["To"] == "owner@example.com"
        assert mailbox.tls == [True] and mailbox.logins == [("box@example.com", SECRETS["smtp-password"])]

        cli = process_env(broker, state, config, user="cli")
        result = circles(cli, "notify", "test", "--channel", "chat")
        assert result.returncode == 0 and "sent through chat" in result.stdout, result.stderr
        assert telegram.posted[-1].body["text"].startswith("🧪 Test message\n")
        result = circles(cli, "notify", "test", "--channel", "pager")
        assert result.returncode == 1
        assert "no channel 'pager' (channels: chat, mail, phone)" in result.stderr

        await tester.send(registry.HOME_STATUS, "online", device=device, wait=True)
        await until(lambda: len(ntfy.posted) == 2 and len(mailbox.messages) == 2, 15, "resolved")
        assert ntfy.posted[1].body["title"] == f"Resolved: Door {device} offline"
        listed = circles(cli, "notify", "recent").stdout.splitlines()
        assert [line.split("  ", 1)[1].split()[:3] for line in listed[1:3]] == [
            ["critical", "resolved", "Resolved:"], ["critical", "alert", "Door"]]
    finally:
        proc.stop()
        await clear(tester, device)
        ntfy.close()
        telegram.close()
        mailbox.close()
    lines = [json.loads(line) for line in proc.log.splitlines() if line.startswith("{")]
    sent = [line for line in lines if line["message"] == "alert sent" and line["extra"]["kind"] == "alert"]
    assert sorted(line["extra"]["channel"] for line in sent) == ["chat", "mail", "phone"]
    assert {line["request_id"] for line in sent} == {f"door-{device}"}
    retried = [line for line in lines if line["message"] == "alert not sent; will retry"]
    assert retried and "telegram sendMessage: HTTP 401: down for the test" in retried[0]["extra"]["error"]
    everything = proc.log + json.dumps([p.body for p in ntfy.posted + telegram.posted]) + \
        "".join(m.as_string() for m in mailbox.messages)
    for value in SECRETS.values():
        assert value not in everything


async def test_process_keeps_an_alert_queued_across_a_kill_9(broker: TestBroker, tmp_path: Path) -> None:
    state = tmp_path / "state"
    device = f"door-{uuid.uuid4().hex[:6]}"
    ntfy = Endpoint()
    ntfy.fail_with = 503
    config = "[notify]\n" + door_rule(device) + (
        f"[notify.channels.phone]\nkind = \"ntfy\"\nurl = \"{ntfy.url}\"\ntopic = \"pi-alerts\"\n")
    env = process_env(broker, state, config)
    proc = await start_notify(broker, env, tmp_path)
    tester = broker.bus()
    await tester.connect()
    recent = await Collector.start(broker, str(registry.NOTIFY_RECENT.topic()))
    try:
        await tester.send(registry.HOME_STATUS, "offline", device=device, wait=True)
        await until(lambda: ntfy.refused >= 2, 15, "two refused tries")
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        ntfy.fail_with = None
        proc = await start_notify(broker, env, tmp_path)
        await until(lambda: ntfy.posted, 20, "the queued alert after the restart")

        def delivered(ms: list[Any]) -> bool:
            docs = [NotifyRecent.model_validate_json(m.payload) for m in ms if not m.retain]
            return any(d.alerts and d.alerts[0].title == f"Door {device} offline"
                       and not d.alerts[0].pending and d.queued == 0 for d in docs)

        await recent.wait(delivered, 10, "the recent alerts without anything waiting")
        # The retained `offline` came again at the restart: no new alert. The node's return,
        # handled after it (one topic, in order), marks that it was handled.
        await tester.send(registry.HOME_STATUS, "online", device=device, wait=True)
        await until(lambda: any(p.body["title"].startswith("Resolved") for p in ntfy.posted), 10,
                         "the resolved message")
        assert [p.body["title"] for p in ntfy.posted] == [f"Door {device} offline",
                                                          f"Resolved: Door {device} offline"]
    finally:
        proc.stop()
        await recent.close()
        await clear(tester, device)
        ntfy.close()

