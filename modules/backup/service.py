"""The `backup` service: each job on its cron schedule, the weekly restore drill, and the
alert when no backup has succeeded for too long (docs/backup.md).

Runs go one at a time through a queue, fed by the schedules and by `cmd_run`/`cmd_drill`,
which answer at once: a backup may take longer than any reply timeout, and a handler that
waited for it would stall the receive loop past the watchdog. Results come on the retained
`circles/backup/<job>/result` and `…/drill` topics, under the request id that asked.

When each job last succeeded is read from its repository at start (the newest snapshot,
which is listed only once complete): the repository is what a restore would use, and it
survives a broker whose retained messages were lost. The job's retained result counts too,
for a repository that cannot be read now, and the alert waits until every repository was
asked once: a restart does not withdraw a standing alert. A run missed while the box was off
is caught up then. The last drill of each job comes back from its own retained topic.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from appliance import cron
from appliance.bus import new_request_id, registry
from appliance.bus.base import Bus
from appliance.bus.message import Received
from appliance.bus.payloads import BackupAlert, BackupResult, CommandRequest
from appliance.config import CoreSettings
from appliance.errors import ValidationFailed
from appliance.files import private_dir
from appliance.ha_discovery import Entity
from appliance.logging import request_id
from appliance.runtime import Service, subscribe
from appliance.storage.base import StorageError, StorageUnavailable
from modules.backup import discovery, runs
from modules.backup.runs import (
    RECALL_FIRST,
    RECALL_MAX,
    Job,
    NothingToDrill,
    error_text,
    iso,
    off_loop,
    scratch_root,
    utc_now,
    watched_since,
)
from modules.backup.settings import BackupJob, BackupSettings

if TYPE_CHECKING:
    from appliance.security.crypto import Keyring
    from modules.backup.repo import Repository

log = logging.getLogger("circles.backup")
TICK_S = 1.0
CLOCK_BACK = timedelta(minutes=1)  # a clock set back further re-counts the schedules
DRILL_SAMPLE = 0.1  # share of every snapshot's chunks the drill re-reads beyond the restore
ACTOR = "service:backup"
AUDIT_RUN = "backup.run"
AUDIT_DRILL = "backup.drill"


class BackupService(Service):
    name = "backup"
    Settings = BackupSettings

    def __init__(self, settings: CoreSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        config: BackupSettings = self.config
        self.clock: Callable[[], datetime] = utc_now
        self.zone = config.zone()
        self.drill_trigger = cron.trigger(config.drill, self.zone) if config.drill else None
        self.drill_at: datetime | None = None
        self.jobs: dict[str, Job] = {}
        self.queue: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
        self.queued: set[tuple[str, str]] = set()
        self.running: tuple[str, str] | None = None
        self.alert: BackupAlert | None = None
        self.last_tick: datetime | None = None

    async def start(self) -> None:
        from appliance.security.crypto import Keyring

        state_dir = self.settings.state_dir
        keyring = await asyncio.to_thread(Keyring.load_or_create, state_dir)
        # Scratch folders a killed run left behind.
        await asyncio.to_thread(shutil.rmtree, scratch_root(state_dir), True)
        for job in self.config.jobs:
            state = self.jobs[job.name] = Job(
                job, cron.trigger(job.schedule, self.zone), self.config.target_name(job, state_dir),
                self.config.target_of(job).backend == "local", partial(self._open, job, keyring))
            try:  # a wrong setting stops the service now (ConfigError)
                await asyncio.to_thread(state.repository)
            except (StorageError, OSError) as exc:
                log.warning("backup target not available; tried again at each run",
                            extra={"job": job.name, "error": error_text(exc)})
        since = await asyncio.to_thread(watched_since, state_dir, list(self.jobs), self.clock())
        for name, job in self.jobs.items():
            job.since = since[name]

    def _open(self, job: BackupJob, keyring: Keyring) -> Repository:
        from modules.backup.repo import Repository

        target, state_dir = self.config.target_of(job), self.settings.state_dir
        if target.backend == "local" and target.path is None:
            private_dir(state_dir / "backups")  # the default target: on the box, made here
        return Repository(self.config.open_target(job, state_dir), keyring)

    async def stop(self) -> None:
        for job in self.jobs.values():
            if job.repo is not None:
                job.repo.store.close()

    def entities(self) -> list[Entity]:
        return discovery.entities(list(self.jobs))

    def status_text(self) -> str:
        good = sum(1 for job in self.jobs.values() if job.last_success)
        return f"{len(self.jobs)} jobs, {good} with a good backup" + (
            f", running {self.running[1]}" if self.running else "")

    # -- the results' and the drills' memory --------------------------------------------------
    @subscribe(registry.BACKUP_RESULT)
    async def on_result(self, msg: Received) -> None:
        """The last success a result names counts while the repository cannot be read."""
        job = self.jobs.get(msg.params["job"])
        if job is None or msg.data is None or msg.data.last_success is None:
            return
        when = datetime.fromisoformat(msg.data.last_success)
        job.last_success = max(when, job.last_success or when)
        job.last = job.last or msg.data

    @subscribe(registry.BACKUP_DRILL)
    async def on_drill(self, msg: Received) -> None:
        job = self.jobs.get(msg.params["job"])
        if job is None or msg.data is None:  # a job no longer configured, or its topic cleared
            return
        if job.drill is None or msg.data.ts >= job.drill.ts:
            job.drill = msg.data
            await self.publish_alert()

    # -- time -------------------------------------------------------------------------------
    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.worker())
            group.create_task(self.ticker())

    async def ticker(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the next tick tries again
                log.exception("backup tick failed")
            await asyncio.sleep(TICK_S)

    async def tick(self) -> None:
        """Queue what the schedules say is due, catch up a run missed while the box was off,
        and publish the alert when it changes."""
        now = self.clock()
        set_back = self.last_tick is not None and now < self.last_tick - CLOCK_BACK
        self.last_tick = now
        for job in self.jobs.values():
            if not job.recalled and (job.recall_at is None or now >= job.recall_at):
                await self.recall(job, now)
            if job.drill_due is not None and now >= job.drill_due:
                job.drill_due = None
                self.enqueue("drill", job.config.name, new_request_id())
            if job.next_at is None or set_back:
                job.next_at = cron.next_time(job.trigger, now)
            elif now >= job.next_at:
                job.next_at = cron.next_time(job.trigger, now)
                self.enqueue("backup", job.config.name, new_request_id())
        if self.drill_trigger is not None:
            if self.drill_at is None or set_back:
                self.drill_at = cron.next_time(self.drill_trigger, now)
            elif now >= self.drill_at:
                self.drill_at = cron.next_time(self.drill_trigger, now)
                for name in self.jobs:
                    self.enqueue("drill", name, new_request_id())
        await self.publish_alert()

    async def recall(self, job: Job, now: datetime) -> None:
        """When the job last succeeded, from its newest snapshot; a run that fell due since
        then (the box was off) is queued now."""
        name = job.config.name
        try:
            snapshots = await off_loop(lambda: job.repository().snapshots(name))
        except Exception as exc:  # noqa: BLE001 - unreachable now; asked again later
            job.tried = True
            job.recall_at, job.recall_wait = now + job.recall_wait, min(job.recall_wait * 2, RECALL_MAX)
            log.warning("cannot list the job's snapshots", extra={
                "job": name, "target": job.target, "error": error_text(exc)})
            return
        job.recalled = job.tried = True
        if snapshots:
            newest = snapshots[-1].time
            job.last_success = max(newest, job.last_success or newest)
        missed = job.last_success and cron.next_time(job.trigger, job.last_success)
        if missed and missed <= now:
            log.info("a scheduled backup was missed; running it now",
                     extra={"job": name, "due": missed.isoformat()})
            self.enqueue("backup", name, new_request_id())

    # -- runs -------------------------------------------------------------------------------
    def enqueue(self, kind: str, job: str, rid: str) -> bool:
        """Queue a backup or a drill of `job`; False if one is waiting already."""
        if (kind, job) in self.queued:
            return False
        self.queued.add((kind, job))
        self.queue.put_nowait((kind, job, rid))
        return True

    async def worker(self) -> None:
        while True:
            kind, name, rid = await self.queue.get()
            self.queued.discard((kind, name))
            self.running = (kind, name)
            token = request_id.set(rid)
            try:
                await (self.backup if kind == "backup" else self.drill)(self.jobs[name])
                await self.publish_alert()
            except Exception:  # noqa: BLE001 - the next run must still happen
                log.exception("backup worker failed", extra={"job": name, "kind": kind})
            finally:
                request_id.reset(token)
                self.running = None

    async def backup(self, job: Job) -> BackupResult:
        """One run: collect, back up, forget and prune; the result is published (retained),
        audit-logged and logged, whether it succeeded or not."""
        name, began = job.config.name, time.monotonic()
        now = self.clock()
        try:
            manifest, forgotten, pruned = await off_loop(
                partial(runs.back_up, self.settings, self.config, job, now, self.zone))
        except Exception as exc:  # noqa: BLE001 - reported, and the schedule goes on
            result = job.result("backup", False, error=error_text(exc),
                                duration_s=round(time.monotonic() - began, 3))
            log.error("backup failed", exc_info=exc, extra={
                "job": name, "target": job.target, "error": result.error})
            await self._publish(job, result)
            await self.record(AUDIT_RUN, name, "failed", target_store=job.target,
                              error=result.error)
            return result
        job.last_success = manifest.time
        if job.drill_after_backup:
            job.drill_after_backup = False
            self.enqueue("drill", name, new_request_id())
        result = job.result("backup", True, snapshot=manifest.id, files=len(manifest.files),
                            bytes=manifest.size, uploaded_bytes=manifest.uploaded_bytes,
                            duration_s=round(time.monotonic() - began, 3))
        log.info("backup done", extra={
            "job": name, "snapshot": manifest.id, "target": job.target,
            "local_only": job.local_only, "files": result.files, "bytes": result.bytes,
            "uploaded_bytes": result.uploaded_bytes, "duration_s": result.duration_s,
            "forgotten": forgotten, "chunks_pruned": pruned, "notes": manifest.notes})
        await self._publish(job, result)
        await self.record(AUDIT_RUN, name, "ok", snapshot=manifest.id,
                          target_store=job.target, local_only=job.local_only,
                          files=result.files, bytes=result.bytes)
        return result

    async def drill(self, job: Job) -> BackupResult | None:
        """Restore the job's newest snapshot into a scratch folder (hashes, SQLite integrity,
        ledger chains checked) and re-read a sample of every snapshot's chunks. A drill that
        cannot reach the store, or finds no snapshot yet, has not run (None): it is tried
        again a minute later, or after the next good backup."""
        name, began = job.config.name, time.monotonic()

        fields: dict[str, Any] = {}
        try:
            snapshot, restored, sample = await off_loop(
                partial(runs.drill, self.settings, job, DRILL_SAMPLE))
        except (StorageUnavailable, NothingToDrill) as exc:
            if isinstance(exc, NothingToDrill):
                job.drill_after_backup = True
            else:
                job.drill_due = self.clock() + RECALL_FIRST
            log.warning("restore drill not run", extra={"job": name, "error": error_text(exc)})
            return None
        except Exception as exc:  # noqa: BLE001 - a drill that cannot restore has failed
            problems = [error_text(exc)]
        else:
            problems = restored.problems + sample.problems
            fields = {"snapshot": snapshot, "files": restored.checked, "bytes": restored.bytes}
        ok = not problems
        error = None if ok else "; ".join(problems[:5]) + (
            f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        result = job.result("drill", ok, error=error,
                            duration_s=round(time.monotonic() - began, 3), **fields)
        job.drill = result
        (log.info if ok else log.error)("restore drill " + ("passed" if ok else "failed"), extra={
            "job": name, "snapshot": result.snapshot, "files": result.files,
            "problems": problems[:20], "duration_s": result.duration_s})
        await self.bus.send(registry.BACKUP_DRILL, result, wait=True, job=name)
        await self.record(AUDIT_DRILL, name, "ok" if ok else "failed",
                          snapshot=result.snapshot, problems=len(problems))
        return result

    async def _publish(self, job: Job, result: BackupResult) -> None:
        job.last = result
        await self.bus.send(registry.BACKUP_RESULT, result, wait=True, job=job.config.name)

    async def record(self, action: str, job: str, outcome: str, **details: Any) -> None:
        """An audit event of the run; one that cannot be written is logged, and the run's
        result stands."""
        def write() -> None:
            from appliance.security.audit import AuditLog

            # Not kept open between runs: while a run reads the state directory's files, no
            # connection of this process may hold the database (a close() of any other fd on
            # it would drop that connection's locks: sqlite.org/howtocorrupt.html, 2.2).
            audit = AuditLog.open(self.settings)
            try:
                audit.record(action, actor=ACTOR, target=job, outcome=outcome,
                             request_id=request_id.get(), **details)
            finally:
                audit.ledger.engine.dispose()

        try:
            await asyncio.to_thread(write)
        except Exception:  # noqa: BLE001 - the backup itself is done
            log.exception("audit log not written", extra={"action": action, "job": job})

    # -- the alert --------------------------------------------------------------------------
    def evaluate(self, now: datetime) -> BackupAlert:
        """Alert when a job's last success is older than `alert_after_h` (or it has none and
        the service has watched it that long, across restarts), when it is dated in the
        future (the clock is wrong), or its last restore drill failed."""
        limit = timedelta(hours=self.config.alert_after_h)
        reasons: list[str] = []
        overdue: list[str] = []
        jobs: list[str] = []
        for name, job in self.jobs.items():
            late = None
            if job.last_success is None:
                if now - (job.since or now) > limit:
                    late = f"{name}: no good backup found" + (
                        "" if job.recalled else " (its store cannot be read)")
            elif job.last_success > now + CLOCK_BACK:
                late = (f"{name}: the last good backup is dated in the future "
                        f"({iso(job.last_success)}); check the clock")
            elif now - job.last_success > limit:
                late = f"{name}: no good backup since {iso(job.last_success)}"
            drill = (f"{name}: the restore drill of {job.drill.ts} failed"
                     if job.drill is not None and not job.drill.ok else None)
            if late:
                overdue.append(late)
            mine = [reason for reason in (late, drill) if reason]
            if mine:
                jobs.append(name)
                reasons += mine
        return BackupAlert(alert=bool(jobs), reason="; ".join(reasons), jobs=jobs,
                           overdue=overdue)

    async def publish_alert(self) -> None:
        """The retained alert, when it differs from the last one sent; none before every
        job's repository was asked once (the retained one stands meanwhile)."""
        if not all(job.tried for job in self.jobs.values()):
            return
        alert = self.evaluate(self.clock())
        last = self.alert
        if last is not None and last.model_dump(exclude={"ts"}) == alert.model_dump(exclude={"ts"}):
            return
        await self.bus.send(registry.BACKUP_ALERT, alert, wait=True)
        self.alert = alert
        (log.warning if alert.alert else log.info)(
            "backup alert" if alert.alert else "no backup alert",
            extra={"jobs": alert.jobs, "reason": alert.reason})

    # -- commands ---------------------------------------------------------------------------
    def _named(self, request: CommandRequest) -> list[str]:
        job = (request.model_extra or {}).get("job")
        if job is None:
            return list(self.jobs)
        if not isinstance(job, str) or job not in self.jobs:
            raise ValidationFailed(f"no backup job {job!r}; the jobs are: {', '.join(self.jobs)}")
        return [job]

    def _queue(self, kind: str, request: CommandRequest) -> dict[str, Any]:
        # A job already waiting is not queued twice: its coming result answers this too.
        names = self._named(request)
        rid = request_id.get() or new_request_id()
        for name in names:
            self.enqueue(kind, name, rid)
        return {"jobs": names, "request_id": rid}

    async def cmd_run(self, request: CommandRequest) -> dict[str, Any]:
        """{"job": name?} → back up that job (every job without one) now. Answers at once;
        each result follows on `circles/backup/<job>/result` under this request's id."""
        return self._queue("backup", request)

    async def cmd_drill(self, request: CommandRequest) -> dict[str, Any]:
        """{"job": name?} → a restore drill of that job (of every job) now; the result follows
        on `circles/backup/<job>/drill`."""
        return self._queue("drill", request)

    async def cmd_status(self, request: CommandRequest) -> dict[str, Any]:
        """Every job: schedule, target, next run, last success, last result and drill; the
        next drill, the alert, and what runs now."""
        def dump(result: BackupResult | BackupAlert | None) -> dict[str, Any] | None:
            return result.model_dump() if result else None

        return {
            "jobs": [{"job": name, "schedule": job.config.schedule, "target": job.target,
                      "local_only": job.local_only, "next_at": iso(job.next_at),
                      "last_success": iso(job.last_success), "last": dump(job.last),
                      "drill": dump(job.drill)} for name, job in self.jobs.items()],
            "drill_schedule": self.config.drill or None, "drill_next_at": iso(self.drill_at),
            "timezone": self.config.timezone or "local",
            "alert": dump(self.alert),
            "running": {"kind": self.running[0], "job": self.running[1]} if self.running else None,
        }
