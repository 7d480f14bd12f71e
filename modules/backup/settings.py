"""The `[backup]` section: jobs, where they go, how long snapshots are kept (docs/backup.md)."""

from __future__ import annotations

import re
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from appliance import cron
from appliance.config import Section, StoreSettings
from appliance.errors import ConfigError

if TYPE_CHECKING:
    from appliance.storage.base import Store

# A job name is a topic level (circles/backup/<job>/result): these would read as other topics.
RESERVED_JOBS = frozenset({"cmd", "reply", "alert", "status"})


class Keep(Section):
    """Retention as restic's `forget --keep-*`: the newest snapshot of each of the last N
    hours/days/weeks/months/years that have one, plus the `last` N; the rest are forgotten."""

    last: int = Field(3, ge=0)
    hourly: int = Field(0, ge=0)
    daily: int = Field(7, ge=0)
    weekly: int = Field(4, ge=0)
    monthly: int = Field(12, ge=0)
    yearly: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _keeps_something(self) -> Keep:
        if not any((self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly)):
            raise ValueError("keeps nothing: set at least one of last, hourly, daily, weekly, "
                             "monthly, yearly above 0")
        return self


class BackupJob(Section):
    name: str = Field(..., min_length=1, max_length=40)
    schedule: str = "30 3 * * *"  # crontab, in [backup].timezone
    databases: bool = True  # every SQLite database of the state directory (online backup API)
    config: bool = True  # the config file and the secret store (already encrypted)
    mosquitto: bool = True  # Mosquitto's persistence file
    ledger: bool = True  # one export bundle per ledger chain
    folders: list[Path] = []  # the owner's folders, whole
    target: StoreSettings | None = None  # default: [backup].target
    keep: Keep = Keep()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", value) or value in RESERVED_JOBS:
            raise ValueError(f"{value!r}: lower-case letters, digits, '-' and '_', and not one "
                             f"of {', '.join(sorted(RESERVED_JOBS))}")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        cron.trigger(value, None)  # ValueError says what is wrong
        return value


class BackupSettings(Section):
    # Default: the local disk under <state_dir>/backups — "local only" until pointed elsewhere.
    target: StoreSettings = StoreSettings()
    jobs: list[BackupJob] = [BackupJob(name="box")]
    alert_after_h: float = Field(26.0, gt=0, description="alert when no backup succeeded for this long")
    drill: str = "0 4 * * 0"  # the weekly restore drill (crontab); "" turns it off
    timezone: str | None = None  # of the schedules; default: the box's
    mosquitto_db: Path | None = None  # default: the broker's persistence under the state dir

    @field_validator("jobs")
    @classmethod
    def _unique(cls, jobs: list[BackupJob]) -> list[BackupJob]:
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise ValueError("two jobs have the same name")
        return jobs

    @field_validator("drill")
    @classmethod
    def _drill(cls, value: str) -> str:
        if value:
            cron.trigger(value, None)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r} (e.g. 'Europe/Berlin')") from None
        return value

    def zone(self) -> tzinfo | None:
        return ZoneInfo(self.timezone) if self.timezone else None

    def target_of(self, job: BackupJob) -> StoreSettings:
        return job.target or self.target

    def target_name(self, job: BackupJob, state_dir: Path) -> str:
        """The target as the store names itself (before it is opened)."""
        target = self.target_of(job)
        if target.backend == "s3":
            return f"s3://{target.endpoint}/{target.bucket}"
        return f"local:{target.path or state_dir / 'backups'}"

    def open_target(self, job: BackupJob, state_dir: Path) -> Store:
        """The raw store of `job`'s target (the repository seals each object itself, so never
        the encrypting wrapper). A local target folder must exist (StorageUnavailable): it is
        never made here, for made once on the disk it names, it is missing while that disk is
        not mounted, and a backup then fails instead of filling the box's own disk under the
        mount point. ConfigError names the job's setting that is wrong."""
        from appliance.storage import open_store

        target = self.target_of(job)
        key = f"backup.jobs.{self.jobs.index(job)}.target" if job.target else "backup.target"
        try:
            return open_store(target.model_copy(update={"encrypt": False}), state_dir=state_dir,
                              default_path=state_dir / "backups", must_exist=True)
        except ConfigError as exc:
            # open_store names the [storage] keys; here they are the job's target's.
            raise ConfigError(f"config: {str(exc).replace('storage.', key + '.', 1)} "
                              f"(backup job {job.name})") from None
