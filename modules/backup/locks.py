"""Locks that keep a prune and a backup of one repository from running at once, without a
lock server (docs/backup.md, "Prune and concurrent runs").

Each writes its lock object under `locks/`, then looks for the other's: a prune that sees
any other live lock gives up; a backup that sees a prune's lock waits for it to go,
refreshing its own meanwhile. Both write before they look, so they never both go ahead and
never both wait.

A lock is stale, and removed by whoever meets it, when
- its process has ended: a lock names the machine's boot (`boot_id`), its pid namespace, its
  pid and the process's start time, and only a lock from this very boot and pid namespace
  can be judged so (a host name proves nothing: two boxes may share one, and containers
  share a boot);
- or it was not rewritten for STALE, by the store's own clock: its modified time against
  the one the store gave this process's own lock, so that no machine's wrong clock can make
  a live lock look old. A holder rewrites its lock every REFRESH.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from appliance.errors import TemporaryError
from appliance.storage.base import NotFound, ObjectInfo, Store

log = logging.getLogger("circles.backup")

LOCKS = "locks/"
STALE = timedelta(minutes=30)
REFRESH = timedelta(minutes=5)
WAIT_S = 2.0
BOOT_ID = "/proc/sys/kernel/random/boot_id"


class RepositoryBusy(TemporaryError):
    """Another process holds the repository (a prune running elsewhere): try again later."""


class Lock:
    """This process's lock object of `kind` ("backup" or "prune") in `store`; written at once.
    Used as a context manager, it is released on the way out."""

    def __init__(self, store: Store, kind: str) -> None:
        self.store, self.kind = store, kind
        self.key = f"{LOCKS}{kind}-{secrets.token_hex(8)}"
        self._lost = False
        self._write()

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def _write(self) -> None:
        doc = {"kind": self.kind, **_identity(), "time": datetime.now(UTC).isoformat(timespec="seconds")}
        self.store.put_bytes(self.key, json.dumps(doc).encode(), content_type="application/json")
        self._written = time.monotonic()  # from when it is really there

    def refresh(self) -> None:
        """Rewrite the lock when it was last written REFRESH ago or more (cheap to call
        often). A lock found gone was taken for stale by another process: `confirm` then
        fails, since that process may have pruned meanwhile."""
        if time.monotonic() - self._written < REFRESH.total_seconds():
            return
        if not self.store.exists(self.key):
            self._lost = True
        self._write()

    def confirm(self) -> None:
        """RepositoryBusy unless the lock was held without a break since it was written."""
        if self._lost or not self.store.exists(self.key):
            self._lost = True
            raise RepositoryBusy(f"{self.store.name}: this run's lock was removed by another process "
                                 "(it was not refreshed for too long); run again")

    def others(self) -> list[dict[str, Any]]:
        """The live locks other than this one (their documents); stale ones are removed."""
        infos = list(self.store.list(LOCKS))
        mine: ObjectInfo | None = next((i for i in infos if i.key == self.key), None)
        if mine is None:  # removed by another process that took it for stale
            self._lost = True
            self._write()
            mine = self.store.stat(self.key)
        live = []
        for info in infos:
            if info.key == self.key:
                continue
            try:
                doc = json.loads(self.store.get_bytes(info.key))
            except NotFound:
                continue  # released meanwhile
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                doc = {}  # not ours to read: only its age counts
            if mine.modified - info.modified > STALE or _ended(doc):
                log.info("stale lock removed", extra={"lock": info.key, "store": self.store.name})
                self.store.delete(info.key)
                continue
            live.append(doc)
        return live

    def release(self) -> None:
        self.store.delete(self.key)


def for_backup(store: Store) -> Lock:
    """A backup's lock, once no prune holds the repository; RepositoryBusy after waiting
    STALE for one to finish."""
    lock = Lock(store, "backup")
    deadline = time.monotonic() + STALE.total_seconds()
    try:
        while any(doc.get("kind") == "prune" for doc in lock.others()):
            if time.monotonic() > deadline:
                raise RepositoryBusy(f"{store.name}: a prune is running; try again later")
            time.sleep(WAIT_S)
            lock.refresh()
    except BaseException:
        lock.release()
        raise
    return lock


def for_prune(store: Store) -> Lock | None:
    """A prune's lock, or None while any other process holds a lock on the repository."""
    lock = Lock(store, "prune")
    try:
        if lock.others():
            lock.release()
            return None
    except BaseException:
        lock.release()
        raise
    return lock


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """When the process `pid` started, in clock ticks since boot ("" if unknown)."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()  # the name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _read(BOOT_ID), "pid_ns": _pid_namespace(),
            "pid": pid, "start": _start_time(pid)}


def _ended(doc: dict[str, Any]) -> bool:
    """Whether the lock's process is known to have ended: it ran in this boot and pid
    namespace, and its pid is gone or now belongs to a process started later."""
    me = _identity()
    pid = doc.get("pid")
    if not me["boot_id"] or not me["pid_ns"] or not isinstance(pid, int) or pid <= 0:
        return False
    if (doc.get("boot_id"), doc.get("pid_ns")) != (me["boot_id"], me["pid_ns"]):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _start_time(pid)
    return bool(start) and bool(doc.get("start")) and start != doc["start"]
