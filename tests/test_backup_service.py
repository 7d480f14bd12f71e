"""The backup service as a process on the real broker (results, audit, Home Assistant, the
alert, the drill, a kill -9 in the middle of an upload), and `circles backup …` on a real
state directory (list, verify, restore into a folder and in place, the emergency kit)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance import config
from appliance.bus import registry
from appliance.bus.payloads import BackupAlert, BackupResult
from appliance.config import CoreSettings, StoreSettings
from appliance.security.audit import AuditLog
from appliance.security.crypto import Keyring
from appliance.storage import open_store
from modules.backup.chunks import chunk_key
from modules.backup.manifest import new_id, seal
from modules.backup.repo import Manifest, Repository
from modules.backup.settings import BackupSettings
from modules.backup.sources import collect
from tests.helpers import Collector, ServiceProcess, TestBroker, circles, circles_env
from tests.s3server import S3Server, fresh_bucket

NAME = "backup"


@dataclass
class Box:
    """A state directory with a database holding a ledger (the audit chain), a second SQLite
    database, and a folder of the owner's files; its circles.toml has one backup job."""

    root: Path
    state: Path
    folder: Path
    config: Path
    job: str

    def env(self, broker: TestBroker, user: str = NAME, **extra: str) -> dict[str, str]:
        return broker.env(CIRCLES_STATE_DIR=str(self.state), CIRCLES_CONFIG=str(self.config),
                          CIRCLES_BUS__USERNAME=user, CIRCLES_BUS__PASSWORD=broker.password(user),
                          **extra)

    def settings(self, monkeypatch: pytest.MonkeyPatch) -> CoreSettings:
        monkeypatch.setenv("CIRCLES_STATE_DIR", str(self.state))
        monkeypatch.setenv("CIRCLES_CONFIG", str(self.config))
        return config.load(config.settings_class({NAME: BackupSettings}))

    def rows(self) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(self.state / "home.db")
        try:
            return db.execute("SELECT * FROM readings ORDER BY id").fetchall()
        finally:
            db.close()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def make_box(tmp_path: Path, target: StoreSettings, *, folder_bytes: int = 20_000,
             **backup: Any) -> Box:
    state, folder = tmp_path / "state", tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    # Kept open, as a process that backs up while it uses the database would.
    AuditLog.open(CoreSettings(state_dir=state)).record("test.setup", actor="test")
    with sqlite3.connect(state / "home.db") as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY, value REAL)")
        db.executemany("INSERT INTO readings (value) VALUES (?)", [(20.5,), (21.0,), (21.5,)])
    with open(folder / "a.jpg", "wb") as out:
        for at in range(0, folder_bytes, 1 << 20):
            out.write(os.urandom(min(1 << 20, folder_bytes - at)))
    (folder / "sub" / "b.txt").write_text("the owner's notes\n")
    job = f"t{uuid.uuid4().hex[:8]}"
    lines = ["[backup]", *(f"{k} = {_toml(v)}" for k, v in backup.items()),
             "[[backup.jobs]]", f"name = {_toml(job)}", 'schedule = "0 3 * * *"',
             f"folders = {_toml([str(folder)])}", "[backup.jobs.target]",
             *(f"{k} = {_toml(v)}" for k, v in target.model_dump(exclude_none=True).items())]
    path = state / "circles.toml"
    path.write_text("\n".join(lines) + "\n")
    return Box(tmp_path, state, folder, path, job)


def local_target(tmp_path: Path, *, make: bool = True) -> StoreSettings:
    """A local target folder (made once, as on a USB disk), beside the state directory."""
    if make:
        (tmp_path / "backups").mkdir()
    return StoreSettings(backend="local", path=tmp_path / "backups", encrypt=False)


def engine_backup(box: Box, settings: CoreSettings, now: datetime | None = None) -> Manifest:
    """A snapshot made by the engine itself, as the service makes one."""
    backup: BackupSettings = settings.backup  # type: ignore[attr-defined]
    job = backup.jobs[0]
    repo = Repository(backup.open_target(job, box.state), Keyring.load_or_create(box.state))
    collected = collect(settings, backup, job, box.root / f"scratch-{uuid.uuid4().hex[:6]}")
    return repo.backup(job.name, collected, now=now, notes=collected.notes)


def tamper_a_chunk(box: Box, target: Path, snapshot: str) -> str:
    """Flip a byte in a chunk of the snapshot's biggest file, in a local target; its id."""
    repo = Repository(open_store(local_target(target.parent, make=False), state_dir=box.state,
                                 default_path=target), Keyring.load_or_create(box.state))
    biggest = max(repo.load(snapshot).files, key=lambda f: f.size)
    chunk = target / "objects" / chunk_key(biggest.chunks[0])
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return biggest.chunks[0]


def fresh(spec: Any, model: Any, ms: list, **params: str) -> list:
    """Payloads published on `spec` while we listened (not a retained one of an earlier run)."""
    topic = str(spec.topic(**params))
    return [model.model_validate_json(m.payload) for m in ms if m.topic == topic and not m.retain]


async def start(broker: TestBroker, box: Box, watch: Collector, **env: str) -> ServiceProcess:
    seen = len(watch.messages)  # an earlier process's `online` does not count
    proc = ServiceProcess(NAME, box.env(broker, **env), box.root)
    status = str(registry.SERVICE_STATUS.topic(service=NAME))
    await watch.wait(lambda ms: proc.process.poll() is not None or any(
        m.topic == status and m.payload == b"online" and not m.retain for m in ms[seen:]), 20,
        "online")
    assert proc.process.poll() is None, proc.log
    return proc


async def watcher(broker: TestBroker, job: str) -> Collector:
    return await Collector.start(
        broker, str(registry.SERVICE_STATUS.topic(service=NAME)), str(registry.BACKUP_ALERT.topic()),
        str(registry.BACKUP_RESULT.topic(job=job)), str(registry.BACKUP_DRILL.topic(job=job)),
        "homeassistant/+/circles/+/config")


async def test_runs_are_reported_audited_announced_and_the_drill_finds_a_tampered_chunk(
        broker: TestBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_box(tmp_path, local_target(tmp_path))
    settings = box.settings(monkeypatch)
    # The last good backup is two days old: the box was off at 03:00.
    old = engine_backup(box, settings, datetime.now(UTC) - timedelta(days=2))
    watch = await watcher(broker, box.job)
    proc = await start(broker, box, watch)
    tester = broker.bus()
    await tester.connect()
    try:
        results = await watch.wait(lambda ms: fresh(registry.BACKUP_RESULT, BackupResult, ms,
                                                    job=box.job), 30, "the catch-up run")
        first = results[0]
        assert first.ok and first.snapshot != old.id and first.kind == "backup", first
        assert first.local_only and first.target == f"local:{tmp_path / 'backups'}"
        assert first.files >= 6  # two databases, config, keys, a ledger bundle, the folder
        # Overdue at start, cleared by the run.
        alerts = await watch.wait(lambda ms: (a := fresh(registry.BACKUP_ALERT, BackupAlert, ms))
                                  and not a[-1].alert and a, 10, "the alert cleared")
        assert alerts[0].alert and alerts[0].jobs == [box.job] and "since" in alerts[0].reason

        reply = await tester.request(NAME, "run", {"job": box.job}, timeout=10)
        assert reply.ok and reply.result["jobs"] == [box.job], reply
        second = (await watch.wait(lambda ms: fresh(registry.BACKUP_RESULT, BackupResult, ms,
                                                    job=box.job)[1:], 30, "the asked run"))[0]
        assert second.ok and second.snapshot not in (first.snapshot, old.id)
        refused = await tester.request(NAME, "run", {"job": "nope"}, timeout=10)
        assert not refused.ok and "no backup job 'nope'" in str(refused.error)

        audit = AuditLog.open(settings)
        runs = [e for e in audit.events(action="backup.run") if e.target == box.job]
        assert [(e.outcome, e.details["snapshot"]) for e in runs] == [
            ("ok", first.snapshot), ("ok", second.snapshot)]

        configs = {m.topic.split("/")[3]: json.loads(m.payload) for m in watch.messages
                   if m.topic.startswith("homeassistant/") and m.payload}
        result_topic = str(registry.BACKUP_RESULT.topic(job=box.job))
        assert configs[f"backup_{box.job}_last_success"]["state_topic"] == result_topic
        assert configs[f"backup_{box.job}_last_success"]["device_class"] == "timestamp"
        assert configs[f"backup_{box.job}_local_only"]["device_class"] == "problem"
        assert configs[f"backup_{box.job}_drill"]["state_topic"] == str(
            registry.BACKUP_DRILL.topic(job=box.job))
        assert configs["backup_alert"]["state_topic"] == str(registry.BACKUP_ALERT.topic())

        assert (await tester.request(NAME, "drill", {}, timeout=10)).ok
        drill = (await watch.wait(lambda ms: fresh(registry.BACKUP_DRILL, BackupResult, ms,
                                                   job=box.job), 30, "a drill"))[0]
        assert drill.ok and drill.kind == "drill" and drill.snapshot == second.snapshot, drill
        assert drill.files == second.files

        bad_chunk = tamper_a_chunk(box, tmp_path / "backups", second.snapshot)
        assert (await tester.request(NAME, "drill", {"job": box.job}, timeout=10)).ok
        failed = (await watch.wait(lambda ms: fresh(registry.BACKUP_DRILL, BackupResult, ms,
                                                    job=box.job)[1:], 30, "a second drill"))[0]
        assert not failed.ok and bad_chunk in str(failed.error), failed
        alert = (await watch.wait(lambda ms: [a for a in fresh(registry.BACKUP_ALERT, BackupAlert, ms)
                                              if a.alert and "drill" in a.reason], 10, "drill alert"))[0]
        assert alert.jobs == [box.job]
        assert [e.outcome for e in audit.events(action="backup.drill")] == ["ok", "failed"]

        status = (await tester.request(NAME, "status", timeout=10)).result
        assert status["jobs"][0]["last_success"] and status["jobs"][0]["next_at"]
        assert status["alert"]["alert"] and status["drill_next_at"]
    finally:
        await tester.close()
        proc.stop()
        await watch.close()


async def test_the_alert_names_a_job_that_never_succeeded_and_a_run_to_s3_clears_it(
        broker: TestBroker, s3_server: S3Server, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    target = s3_server.settings(tmp_path / "state", fresh_bucket("backup"))
    box = make_box(tmp_path, target, alert_after_h=0.001)  # 3.6 s, rather than 26 h
    watch = await watcher(broker, box.job)
    proc = await start(broker, box, watch)
    try:
        alert = (await watch.wait(lambda ms: [a for a in fresh(registry.BACKUP_ALERT, BackupAlert, ms)
                                              if a.alert], 20, "the alert"))[0]
        assert alert.jobs == [box.job] and "no good backup found" in alert.reason
        done = await asyncio.to_thread(circles, box.env(broker, user="cli"), "backup", "run",
                                       "--job", box.job, "--timeout", "60")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{box.job}: ok, snapshot" in done.stdout and "s3://" in done.stdout
        assert "LOCAL ONLY" not in done.stdout
        result = fresh(registry.BACKUP_RESULT, BackupResult, watch.messages, job=box.job)[0]
        assert result.ok and not result.local_only and result.target.startswith("s3://")
        # Right after the good run, the alert is withdrawn.
        topics = [m.topic for m in watch.messages if not m.retain]
        after = watch.messages[topics.index(str(registry.BACKUP_RESULT.topic(job=box.job))):]
        cleared = [BackupAlert.model_validate_json(m.payload) for m in after
                   if m.topic == str(registry.BACKUP_ALERT.topic())]
        assert cleared and not cleared[0].alert
        # The kit carries what a new box needs to reach the bucket: the keys themselves.
        kit = await asyncio.to_thread(circles, box.env(broker), "backup", "emergency-kit",
                                      "--out", str(tmp_path / "kit.txt"))
        assert kit.returncode == 0, kit.stderr
        assert f"bucket {target.bucket}" in kit.stdout and target.endpoint in kit.stdout
        assert f"{target.access_key_secret} = {s3_server.access_key}" in kit.stdout
        assert f"{target.secret_key_secret} = {s3_server.secret_key}" in kit.stdout
    finally:
        proc.stop()
        await watch.close()


async def test_a_backup_killed_during_its_upload_lists_nothing_and_the_next_run_completes(
        broker: TestBroker, s3_server: S3Server, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    target = s3_server.settings(tmp_path / "state", fresh_bucket("backup"))
    size = 150 * 1024 * 1024
    box = make_box(tmp_path, target, folder_bytes=size)
    store = open_store(target, state_dir=box.state, default_path=box.state / "unused")
    repo = Repository(store, Keyring.load_or_create(box.state))
    watch = await watcher(broker, box.job)
    proc = await start(broker, box, watch)
    tester = broker.bus()
    await tester.connect()
    try:
        def photo_chunks() -> list[Any]:  # the small files go first, then the photo's MiB chunks
            return [o for o in store.list("chunks/") if o.size > 512 * 1024]

        assert (await tester.request(NAME, "run", {}, timeout=10)).ok
        while len(await asyncio.to_thread(photo_chunks)) < 5:
            assert proc.process.poll() is None, proc.log
            await asyncio.sleep(0.02)
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        assert len(photo_chunks()) < size // (1 << 20)  # killed in the middle of the upload
        assert repo.snapshots() == []  # no half backup is listed
        kept = sum(o.size for o in store.list("chunks/"))

        proc = await start(broker, box, watch)
        assert (await tester.request(NAME, "run", {"job": box.job}, timeout=10)).ok
        result = (await watch.wait(lambda ms: fresh(registry.BACKUP_RESULT, BackupResult, ms,
                                                    job=box.job), 120, "the second run"))[0]
        assert result.ok, result
        assert result.uploaded_bytes < result.bytes - kept // 2  # the killed run's chunks re-used
        (snapshot,) = repo.snapshots()
        assert snapshot.id == result.snapshot
        report = await asyncio.to_thread(repo.restore, snapshot.id, tmp_path / "restored")
        assert report.ok, report.problems
        restored = tmp_path / "restored" / "folders" / "photos" / "a.jpg"
        assert _sha256(restored) == _sha256(box.folder / "a.jpg")
    finally:
        await tester.close()
        proc.stop()
        await watch.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while block := data.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def test_the_command_line_lists_verifies_restores_and_makes_the_emergency_kit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_box(tmp_path, local_target(tmp_path))
    snap = engine_backup(box, box.settings(monkeypatch))
    env = circles_env(box.state, CIRCLES_CONFIG=str(box.config))
    photo = (box.folder / "a.jpg").read_bytes()

    listed = circles(env, "backup", "list")
    assert listed.returncode == 0 and snap.id in listed.stdout and box.job in listed.stdout
    verified = circles(env, "backup", "verify", "--full")
    assert verified.returncode == 0 and "ok" in verified.stdout, verified.stdout + verified.stderr

    restored = circles(env, "backup", "restore", "--to", str(tmp_path / "scratch"))
    assert restored.returncode == 0 and "checks passed" in restored.stdout, restored.stderr
    assert (tmp_path / "scratch" / "folders" / "photos" / "a.jpg").read_bytes() == photo
    with sqlite3.connect(tmp_path / "scratch" / "db" / "home.db") as db:
        assert db.execute("SELECT count(*) FROM readings").fetchone() == (3,)

    # Things change after the backup; a hot -wal of the new contents is left next to home.db.
    before = box.rows()
    (box.folder / "a.jpg").write_bytes(b"overwritten by mistake")
    (box.folder / "new.txt").write_text("made after the backup\n")
    live = sqlite3.connect(box.state / "home.db")
    live.execute("DELETE FROM readings")
    live.commit()
    wal = (box.state / "home.db-wal").read_bytes()
    live.close()
    (box.state / "home.db-wal").write_bytes(wal)
    running = circles(env, "backup", "restore", "--in-place", "--yes")
    assert running.returncode == 1 and "stop every Circles service" in running.stderr, running.stderr
    done = circles(env, "backup", "restore", snap.id, "--in-place", "--yes",
                   "--yes-services-are-stopped")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (box.state / "home.db-wal").exists()  # it belonged to the replaced database
    assert box.rows() == before
    assert (box.folder / "a.jpg").read_bytes() == photo
    assert (box.folder / "new.txt").exists()  # not in the snapshot: left alone
    events = list(AuditLog.open(CoreSettings(state_dir=box.state)).events(action="backup.restore"))
    assert events[-1].target == snap.id and events[-1].details["in_place"] is True

    kit_file = tmp_path / "kit.txt"
    kit = circles(env, "backup", "emergency-kit", "--out", str(kit_file))
    assert kit.returncode == 0, kit.stderr
    text = kit_file.read_text()
    assert kit_file.stat().st_mode & 0o777 == 0o600 and text == kit.stdout
    keyring = Keyring.load_or_create(box.state)
    assert "ANYONE WITH THIS FILE CAN READ YOUR BACKUPS" in text and keyring.current_id in text
    # The kit alone opens the backups: its keyring on a new box restores the snapshot.
    new_box = tmp_path / "new-box"
    (new_box / "keys").mkdir(parents=True)
    (new_box / "keys" / "keyring.json").write_text(text[text.index("{"):text.index("\n}\n") + 3])
    fresh_repo = Repository(open_store(local_target(tmp_path, make=False), state_dir=new_box,
                                       default_path=new_box), Keyring.load_or_create(new_box))
    assert fresh_repo.restore(snap.id, new_box / "restored").ok
    assert [e.outcome for e in AuditLog.open(CoreSettings(state_dir=box.state)).events(
        action="backup.emergency_kit")] == ["ok"]

    # A target folder that is gone (a USB disk not mounted) is an error, never made anew.
    (tmp_path / "backups").rename(tmp_path / "unplugged")
    gone = circles(env, "backup", "list")
    assert gone.returncode == 1 and "is its disk mounted?" in gone.stderr, gone.stderr
    assert not (tmp_path / "backups").exists()
    (tmp_path / "unplugged").rename(tmp_path / "backups")

    bad_chunk = tamper_a_chunk(box, tmp_path / "backups", snap.id)
    broken = circles(env, "backup", "verify", "--full")
    assert broken.returncode == 1 and bad_chunk in broken.stdout


def test_an_in_place_restore_refuses_a_file_outside_its_folder_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_box(tmp_path, local_target(tmp_path))
    settings = box.settings(monkeypatch)
    snap = engine_backup(box, settings)
    env = circles_env(box.state, CIRCLES_CONFIG=str(box.config))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (box.folder / "a.jpg").write_bytes(b"changed since the backup")

    # A forged snapshot, sealed with the box's own keyring: the photo's origin points outside.
    backup: BackupSettings = settings.backup  # type: ignore[attr-defined]
    photo = next(f for f in snap.files if f.path.endswith("/a.jpg"))
    forged = replace(snap, id=new_id(snap.time), files=[
        replace(f, origin=str(outside / "a.jpg")) if f is photo else f for f in snap.files])
    store = backup.open_target(backup.jobs[0], box.state)
    store.put_bytes(forged.key, seal(forged, Keyring.load_or_create(box.state)))
    refused = circles(env, "backup", "restore", forged.id, "--in-place", "--yes", "--yes-services-are-stopped")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"{photo.path}: its origin {outside / 'a.jpg'} is outside" in refused.stderr, refused.stderr

    # A subfolder turned into a symlink that leads out of the folder.
    (box.folder / "sub").rename(tmp_path / "moved-sub")
    (box.folder / "sub").symlink_to(outside)
    refused = circles(env, "backup", "restore", snap.id, "--in-place", "--yes", "--yes-services-are-stopped")
    assert refused.returncode == 1 and "a symlink?" in refused.stderr, refused.stdout + refused.stderr

    assert list(outside.iterdir()) == []
    assert (box.folder / "a.jpg").read_bytes() == b"changed since the backup"
    assert not list(AuditLog.open(CoreSettings(state_dir=box.state)).events(action="backup.restore"))


@pytest.mark.parametrize(("jobs", "key"), [
    ('[{"name": "cmd"}]', "backup.jobs.0.name"),
    ('[{"name": "nightly", "schedule": "0 25 * * *"}]', "backup.jobs.0.schedule"),
])
def test_a_bad_job_stops_the_service_naming_the_key(broker: TestBroker, tmp_path: Path, jobs: str,
                                                    key: str) -> None:
    proc = ServiceProcess(NAME, broker.env(CIRCLES_BACKUP__JOBS=jobs), tmp_path)
    assert proc.wait(20) == 78
    assert key in proc.log, proc.log
