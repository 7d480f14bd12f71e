"""`circles backup restore --in-place`: the disaster-recovery path. Every file of a snapshot
goes back where it came from, while the services and the broker are stopped (docs/backup.md).

Before anything is stopped or asked: each file's origin is checked against the place its
part of the snapshot belongs to under the current settings (db/, secrets/, keys/ and
mosquitto/ in the state directory or the broker's folder, config/ the config file,
folders/<name>/ that folder), the snapshot is restored into a scratch folder and checked
(hashes, SQLite integrity, ledger chains), and every destination is checked (its folder can
be made, it is no folder itself, there is room for it). If anything is wrong, nothing on the
box changes. Then each file replaces its origin whole (a temporary file renamed over it),
keeping the owner of the file it replaces; a SQLite database loses its -wal/-shm/-journal
files, which belong to the old one and would be replayed into the new one. Files that are
on the box but not in the snapshot are left alone.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from appliance.errors import OperationalError
from appliance.files import write_atomically
from appliance.values import size_text

if TYPE_CHECKING:
    from appliance.config import CoreSettings
    from modules.backup.repo import FileEntry, Manifest, Repository
    from modules.backup.settings import BackupSettings

UNITS = ("circles.target", "mosquitto.service")
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
COPY_BLOCK = 1024 * 1024
ROOM = 64 * 1024 * 1024  # left free on each file system after the restore
Plan = list[tuple["FileEntry", Path]]


def systemd_runs_the_box() -> bool:
    """Whether systemd runs this machine and knows the Circles units."""
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return False
    state = subprocess.run(["systemctl", "show", "--property=LoadState", "--value", UNITS[0]],
                           capture_output=True, text=True)
    return state.stdout.strip() == "loaded"


def systemctl(action: str) -> None:
    print(f"systemctl {action} {' '.join(UNITS)}")
    done = subprocess.run(["systemctl", action, *UNITS], capture_output=True, text=True)
    if done.returncode:
        raise OperationalError(f"systemctl {action} failed: {done.stderr.strip()}")


def restore(settings: CoreSettings, repo: Repository, snap: Manifest, args: argparse.Namespace) -> int:
    """Check the snapshot and every destination, ask, stop the services (systemd), put every
    file back, start them. A failure while putting back leaves the services stopped."""
    from appliance.cli.backup import AUDIT_RESTORE, _report
    from modules.backup.runs import scratch_root

    stop_start = _services(args)
    plan = _plan(settings, [f for f in snap.files if f.origin])  # a ledger bundle has none
    scratch = scratch_root(settings.state_dir) / f"restore-{secrets.token_hex(4)}"
    _make_folders(scratch)  # owned as the state directory: the service removes leftovers
    try:
        report = repo.restore(snap.id, scratch / "files")
        if not report.ok:
            print("the snapshot does not restore cleanly; nothing on the box was changed")
            _audit(settings, AUDIT_RESTORE, snap.id, "failed", problems=len(report.problems))
            return _report(report)
        _preflight(scratch / "files", plan)
        print(f"snapshot {snap.id} of job {snap.job}, made {snap.created} on {snap.host}, checked: "
              f"{len(plan)} files ({size_text(sum(e.size for e, _ in plan))}) go back where they came "
              "from, replacing the ones there now, in:")
        for folder in sorted({str(dst.parent) for _, dst in plan})[:12]:
            print(f"  {folder}")
        if not args.yes and not _confirmed():
            print("nothing changed")
            return 1
        if stop_start:
            _stop()
        _put_back_all(settings, scratch / "files", snap, plan, stopped=stop_start)
        _audit(settings, AUDIT_RESTORE, snap.id, files=len(plan))
        _own_database_files(settings)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if stop_start:
        systemctl("start")
    print(f"restored {len(plan)} files of snapshot {snap.id} in place")
    return 0


def _stop() -> None:
    """Stop the units; when that fails, start what it stopped, and report the stop's error."""
    try:
        systemctl("stop")
    except OperationalError:
        try:
            systemctl("start")
        except OperationalError as again:
            print(f"and starting them again failed too: {again}", file=sys.stderr)
        raise


def _put_back_all(settings: CoreSettings, files: Path, snap: Manifest, plan: Plan, *, stopped: bool) -> None:
    from appliance.cli.backup import AUDIT_RESTORE

    for done, (entry, dst) in enumerate(plan):
        try:
            put_back(files / entry.path, entry, dst)
        except (OSError, OperationalError) as exc:
            _audit(settings, AUDIT_RESTORE, snap.id, "failed", files=done)
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise OperationalError(
                f"{entry.path}: not put back at {dst} ({why}); {done} of {len(plan)} files were. "
                + ("The services stay STOPPED: the box holds part old, part restored files. "
                   if stopped else "") + "Fix that, then run the restore again") from None


# -- where each file may go ---------------------------------------------------------------------
def _roots(settings: CoreSettings) -> dict[str, list[Path]]:
    """The folders each part of a snapshot may write into, from the current settings."""
    from appliance.bus.broker import BrokerFiles

    backup: BackupSettings = getattr(settings, "backup")  # noqa: B009 - a section of its own
    state = Path(os.path.realpath(settings.state_dir))
    mosquitto = [state, Path(os.path.realpath(BrokerFiles.under(settings.state_dir).root))]
    if backup.mosquitto_db is not None:
        mosquitto.append(Path(os.path.realpath(backup.mosquitto_db.parent)))
    roots = {"db": [state], "secrets": [state], "keys": [state], "mosquitto": mosquitto}
    for job in backup.jobs:
        for folder in job.folders:
            root = Path(os.path.realpath(folder))
            # Two folders with the same last part are `docs`, `docs_`… in the snapshot.
            for extra in range(len(job.folders)):
                roots.setdefault(f"folders/{(root.name or 'root') + '_' * extra}", []).append(root)
    return roots


def _plan(settings: CoreSettings, entries: list[FileEntry]) -> Plan:
    """Each entry with its destination, or OperationalError naming the first origin outside
    the place its part belongs to (a snapshot of another box, or a forged one)."""
    from appliance.config import config_path

    roots, config = _roots(settings), Path(os.path.realpath(config_path()))
    plan: Plan = []
    for entry in entries:
        dst = Path(os.path.normpath(entry.origin))
        part = entry.path.split("/", 1)[0]
        if part == "folders":
            part = "/".join(entry.path.split("/", 2)[:2])
        allowed = [config] if part == "config" else roots.get(part, [])
        inside: Path | None = None
        if not Path(entry.origin).is_absolute():
            pass
        elif part == "config":
            inside = config.parent if dst == config else None
        else:
            inside = next((root for root in allowed if root in dst.parents), None)
        if inside is None:
            raise OperationalError(
                f"{entry.path}: its origin {entry.origin} is outside "
                + (", ".join(map(str, allowed)) or "every place the settings name") + "; refused, "
                "nothing on the box was changed (a snapshot of another box? restore it with --to)")
        _check_destination(entry, dst, inside)
        plan.append((entry, dst))
    return plan


def _check_destination(entry: FileEntry, dst: Path, root: Path) -> None:
    """`dst` is no symlink and its folder, followed through symlinks, stays inside `root`."""
    parent = Path(os.path.realpath(dst.parent))
    if parent != root and root not in parent.parents:
        raise OperationalError(f"{entry.path}: {dst.parent} leads to {parent}, outside {root} "
                               "(a symlink?); refused, nothing on the box was changed")
    if dst.is_symlink():
        raise OperationalError(f"{entry.path}: {dst} is a symlink; refused, nothing on the box "
                               "was changed")


def _preflight(files: Path, plan: Plan) -> None:
    """While the services still run: every destination's folder can be made, none is a folder
    itself, and each file system has room for the new files next to the old ones."""
    needed: dict[int, tuple[Path, int]] = {}
    for entry, dst in plan:
        existing = _existing(dst.parent)
        if not existing.is_dir():
            raise OperationalError(f"{entry.path}: {existing} is not a folder, so {dst} cannot be "
                                   "made; nothing on the box was changed")
        if dst.is_dir():
            raise OperationalError(f"{entry.path}: {dst} is a folder now; move it away, then run "
                                   "the restore again (nothing on the box was changed)")
        device = existing.stat().st_dev
        place, size = needed.get(device, (existing, 0))
        needed[device] = (place, size + (files / entry.path).stat().st_size)
    for place, size in needed.values():
        free = shutil.disk_usage(place).free
        if free < size + ROOM:
            raise OperationalError(f"not enough room at {place}: the restore needs {size + ROOM} "
                                   f"bytes, {free} are free; nothing on the box was changed")


# -- putting back ---------------------------------------------------------------------------------
def _services(args: argparse.Namespace) -> bool:
    """Whether this command stops and starts the services; refuses when it cannot and the
    person did not say they are stopped."""
    if args.yes_services_are_stopped:
        return False
    if systemd_runs_the_box():
        if os.geteuid() != 0:
            raise OperationalError("restore --in-place stops and starts the services: run it as root")
        return True
    raise OperationalError(
        "restore --in-place: stop every Circles service and the broker first (Ctrl-C on "
        "`circles up`), then run it again with --yes-services-are-stopped")


def _confirmed() -> bool:
    if not sys.stdin.isatty():
        raise OperationalError("restore --in-place replaces the box's files: confirm at a "
                               "terminal, or add --yes")
    return input("type 'restore' to go on: ").strip() == "restore"


def put_back(src: Path, entry: FileEntry, dst: Path) -> None:
    """Replace `dst` (the checked origin of `entry`) with the restored file `src`, whole, with
    the snapshot's permission bits and time, owned as the file it replaces (as its folder, for
    a new one) when root."""
    _make_folders(dst.parent)
    if dst.is_symlink():  # made since the check
        raise OperationalError(f"{dst} is a symlink")
    owner = _owner(dst)

    def write(out: BinaryIO) -> int:
        written = 0
        with open(src, "rb") as data:
            while block := data.read(COPY_BLOCK):
                out.write(block)
                written += len(block)
        os.fchmod(out.fileno(), entry.mode & 0o777)
        if owner:
            os.fchown(out.fileno(), *owner)
        if entry.kind == "sqlite":
            for suffix in SQLITE_SIDE_FILES:
                Path(f"{dst}{suffix}").unlink(missing_ok=True)
        return written

    write_atomically(dst, write)
    os.utime(dst, (entry.mtime, entry.mtime))


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _owner(path: Path) -> tuple[int, int] | None:
    """Root restores as the owner of what is there (mosquitto's, the services', root's own)."""
    if os.geteuid() != 0:
        return None
    st = _existing(path).stat()
    return st.st_uid, st.st_gid


def _missing(folder: Path) -> Iterator[Path]:
    while not folder.exists():
        yield folder
        folder = folder.parent


def _make_folders(folder: Path) -> None:
    """`folder` and its missing parents, 0700, owned (when root) as the nearest existing one."""
    owner = _owner(folder)
    for missing in reversed(list(_missing(folder))):
        missing.mkdir(mode=0o700)
        if owner:
            os.chown(missing, *owner)


def _audit(settings: CoreSettings, action: str, target: str, outcome: str = "ok", **details: object) -> None:
    """The audit event of the restore, unless the database or the ledger's key is missing:
    root would make them anew, empty and its own, in the services' state directory."""
    from appliance.cli import backup
    from appliance.db import database_url

    url = database_url(settings)
    missing = [path for path in (Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None,
                                 settings.state_dir / "keys" / "ledger-ed25519.pem")
               if path is not None and not path.is_file()]
    if missing:
        print(f"note: not audit-logged: {', '.join(map(str, missing))} missing")
        return
    backup._audit(settings, action, target, outcome, in_place=True, **details)


def _own_database_files(settings: CoreSettings) -> None:
    """The audit event was written as root: side files SQLite made then must stay the
    services' (a root-owned -wal would lock them out of their database)."""
    from appliance.db import database_url

    url = database_url(settings)
    if os.geteuid() != 0 or not url.startswith("sqlite:///"):
        return
    db = Path(url.removeprefix("sqlite:///"))
    if not db.is_file():
        return
    st = db.stat()
    for suffix in SQLITE_SIDE_FILES:
        side = Path(f"{db}{suffix}")
        if side.exists():
            os.chown(side, st.st_uid, st.st_gid)
