"""Payload models of the registry's topics. A payload is exactly its model's JSON,
so a device or `mosquitto_pub` can publish one by hand."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def epoch(ts: str | None) -> float | None:
    """An ISO 8601 time (a payload's `ts`; `Z` too) in epoch seconds; None for none or one
    that is no time."""
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() if ts else None
    except ValueError:
        return None


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeadLetter(Payload):
    """What `circles/dlq/<service>` carries: the message as it arrived and why it failed."""

    service: str
    topic: str
    payload: str
    encoding: str = Field(description="utf-8, or base64 when the payload was not UTF-8")
    reason: str
    ts: str = Field(default_factory=utcnow)
    request_id: str | None = None


class CommandRequest(BaseModel):
    """A command's arguments; each command documents its own keys."""

    model_config = ConfigDict(extra="allow", frozen=True)
    by: str | None = Field(None, description="who asked (a user, a device), for the audit log")


class CommandReply(Payload):
    ok: bool
    error: str | None = None
    result: Any = None


class ServiceState(Payload):
    online: bool
    since: str | None = None


class HealthState(Payload):
    ts: str
    hostname: str
    cpu_percent: float
    load: tuple[float, float, float]
    memory_percent: float
    memory_used_mb: float
    memory_total_mb: float
    disk_percent: float
    disk_free_gb: float
    uptime_s: float
    cpu_temp_c: float | None = None
    clock_synchronized: bool | None = None
    services: dict[str, ServiceState] = {}


class HomeState(Payload):
    value: Any
    unit: str | None = None
    ts: str = Field(default_factory=utcnow, description="ISO 8601 with a time zone")

    @field_validator("ts")
    @classmethod
    def _aware(cls, value: str) -> str:
        try:
            aware = datetime.fromisoformat(value).tzinfo is not None
        except ValueError:
            aware = False
        if not aware:
            raise ValueError(f"{value!r} is not an ISO 8601 time with a time zone")
        return value

    @property
    def time(self) -> datetime:
        return datetime.fromisoformat(self.ts)


class TradingHalt(Payload):
    halted: bool
    by: str
    reason: str
    ts: str = Field(default_factory=utcnow)


class BackupResult(Payload):
    """The last run of a backup job, or of its restore drill (`kind`), retained per job."""

    job: str
    kind: Literal["backup", "drill"] = "backup"
    ok: bool
    ts: str = Field(default_factory=utcnow)
    snapshot: str | None = None  # the snapshot's id
    target: str  # the store's name: "local:/…" or "s3://host/bucket"
    local_only: bool  # the target is on the box's own disk: not safe from a dead SD card
    files: int = 0
    bytes: int = 0  # plaintext bytes in the snapshot
    uploaded_bytes: int = 0  # bytes sent to the store this run (new chunks only)
    duration_s: float = 0.0
    error: str | None = None
    last_success: str | None = None  # when this job last succeeded (this run or before)


class BackupAlert(Payload):
    """Retained: whether any job has gone without a good backup for too long."""

    alert: bool
    ts: str = Field(default_factory=utcnow)
    reason: str = ""
    jobs: list[str] = []  # the jobs that are overdue or whose last drill failed
    overdue: list[str] = []  # the reasons that are not a failed drill: "<job>: no good backup …"


class NotifyAlert(Payload):
    """One message of the notify service: an alert, a summary of one that keeps firing, or
    its end."""

    ts: str
    rule: str
    subject: str
    severity: Literal["info", "warning", "critical"]
    kind: Literal["alert", "summary", "resolved"]
    title: str
    text: str
    pending: list[str] = []  # channels it still waits for (held, or being retried)


class NotifyRecent(Payload):
    """Retained by the notify service: its last messages, newest first."""

    ts: str = Field(default_factory=utcnow)
    alerts: list[NotifyAlert] = []
    active: int = 0  # alerts firing now
    queued: int = 0  # deliveries waiting (quiet hours, rate limit, a channel down)
