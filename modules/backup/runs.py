"""What one backup run and one restore drill of a job do, blocking: the service runs them,
one at a time, in a thread of their own (`off_loop`)."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from apscheduler.triggers.cron import CronTrigger

from appliance.bus.payloads import BackupResult
from appliance.config import CoreSettings
from appliance.errors import CirclesError, OperationalError
from appliance.files import private_dir, write_atomically
from modules.backup.settings import BackupJob, BackupSettings

if TYPE_CHECKING:
    from modules.backup.repo import Manifest, Report, Repository

T = TypeVar("T")
# An unreachable repository is read again after 1 min, then 2, 4… at most an hour.
RECALL_FIRST, RECALL_MAX = timedelta(minutes=1), timedelta(hours=1)


def utc_now() -> datetime:
    return datetime.now(UTC)


def scratch_root(state_dir: Path) -> Path:
    """Where runs and drills collect and restore, each in its own folder removed after."""
    return state_dir / "backup" / "scratch"


async def off_loop(work: Callable[[], T]) -> T:
    """`work()` in a daemon thread. Unlike `asyncio.to_thread`, a stop does not wait for a
    backup to end. The engine's own pool threads are not daemons: at exit Python lets them
    finish the chunks already handed to them (at most the engine's read-ahead window), and
    the abandoned run fails at its next one (no new work after shutdown), or is killed by
    systemd's stop timeout. Either way it is safe by design: the repository writes a
    snapshot's manifest last, so an abandoned run leaves no listed snapshot, and the next
    run re-uses the chunks it sent."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def thread() -> None:
        outcome: tuple[bool, Any]
        try:
            outcome = (True, work())
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop is closed: the service stopped meanwhile

    threading.Thread(target=thread, name="backup-work", daemon=True).start()
    return await future


@dataclass
class Job:
    config: BackupJob
    trigger: CronTrigger
    target: str  # the store's name
    local_only: bool  # the store is on the box's own disk (a local one, until it is opened)
    opener: Callable[[], Repository]
    repo: Repository | None = None
    next_at: datetime | None = None
    since: datetime | None = None  # watched since (survives restarts: `watched_since`)
    tried: bool = False  # its repository was asked once for the last success
    recalled: bool = False  # last_success was read from the repository
    recall_at: datetime | None = None
    recall_wait: timedelta = RECALL_FIRST
    last_success: datetime | None = None
    last: BackupResult | None = None
    drill: BackupResult | None = None
    drill_due: datetime | None = None  # a drill that could not run, tried again then
    drill_after_backup: bool = False  # a drill that found no snapshot, run after the next backup

    def repository(self) -> Repository:
        """The job's repository, its store opened at first use (blocking); a local one is
        opened every time, which looks for its folder: a USB disk may have been unplugged."""
        if self.repo is None or self.target.startswith("local:"):
            self.repo = self.opener()
            self.target, self.local_only = self.repo.store.name, self.repo.store.local
        return self.repo

    def result(self, kind: str, ok: bool, **fields: Any) -> BackupResult:
        return BackupResult(job=self.config.name, kind=kind, ok=ok, target=self.target,
                            local_only=self.local_only, last_success=iso(self.last_success),
                            **fields)


class NothingToDrill(OperationalError):
    """The job has no snapshot yet: its drill has not run, it has not failed."""


def watched_since(state_dir: Path, names: list[str], now: datetime) -> dict[str, datetime]:
    """When the service first watched each job, kept in the state directory: the time a job
    that never succeeded is late from must not start again at every reboot."""
    path = state_dir / "backup" / "watched-since.json"
    try:
        known = {name: datetime.fromisoformat(text) for name, text in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError, TypeError):  # none yet, or unreadable: from now on
        known = {}
    since = {name: known.get(name, now) for name in names}
    if since != {name: when for name, when in known.items() if name in since}:
        private_dir(path.parent)
        text = json.dumps({name: when.isoformat() for name, when in since.items()})
        write_atomically(path, lambda out: out.write(text.encode()))
    return since


def iso(when: datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when else None


def error_text(exc: BaseException) -> str:
    # Ours name things, never secrets; a foreign one is named by its type as well.
    return str(exc) if isinstance(exc, CirclesError) else f"{type(exc).__name__}: {exc}"


def back_up(settings: CoreSettings, backup: BackupSettings, job: Job, now: datetime,
            zone: tzinfo | None) -> tuple[Manifest, list[str], int]:
    """Collect the job's files into a private scratch folder (removed after), store them as a
    snapshot, forget what retention no longer keeps and prune; the snapshot, the forgotten
    ids and the number of chunks pruned."""
    from modules.backup import sources

    name = job.config.name
    scratch = private_dir(scratch_root(settings.state_dir) / f"run-{name}-{secrets.token_hex(4)}")
    try:
        repo = job.repository()
        collected = sources.collect(settings, backup, job.config, scratch)
        manifest = repo.backup(name, collected, now=now, notes=collected.notes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    forgotten = repo.forget(name, job.config.keep, now=now, zone=zone)
    return manifest, forgotten, repo.prune()


def drill(settings: CoreSettings, job: Job, sample: float) -> tuple[str, Report, Report]:
    """Restore the job's newest snapshot into a scratch folder (removed after), which checks
    hashes, SQLite integrity and ledger chains, then re-read `sample` of every snapshot's
    chunks; the snapshot's id and the two reports."""
    name = job.config.name
    repo = job.repository()
    snapshots = repo.snapshots(name)
    if not snapshots:
        raise NothingToDrill(f"no snapshot of {name} to restore yet")
    newest = snapshots[-1].id
    scratch = private_dir(scratch_root(settings.state_dir) / f"drill-{name}-{secrets.token_hex(4)}")
    try:
        restored = repo.restore(newest, scratch / "restore")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return newest, restored, repo.verify(sample=sample)
