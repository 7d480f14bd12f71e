"""What a backup job copies, gathered into consistent files first (docs/backup.md).

- databases: every SQLite database under the state directory, copied page by page with
  SQLite's online backup API from a read-only connection: a consistent snapshot even while
  services write (a file copy of a live WAL database is not one).
- config: the config file, the secret store (`secrets/*.enc`, already sealed) and the key
  folder except the keyring itself: a backup sealed by the keyring cannot carry it, the
  emergency kit does.
- mosquitto: the broker's persistence file and its dynamic-security file (clients, roles).
- ledger: one export bundle per chain, through the ledger API (verifiable on its own),
  named by the chain's name percent-encoded (`acct:demo` -> `ledger/acct%3Ademo.jsonl`).
- folders: every regular file under each folder the owner listed (symlinks not followed),
  except the backups themselves, the backup's working copies and the keys.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import inspect

from appliance.config import CoreSettings, config_path
from appliance.db import database_url, make_engine
from appliance.errors import OperationalError
from appliance.files import private_dir
from appliance.ledger import Ledger, Signer
from appliance.security.crypto import KEYRING_CREDENTIAL, keyring_path
from appliance.security.secrets import SUFFIX, secrets_dir
from modules.backup.manifest import Source
from modules.backup.settings import BackupJob, BackupSettings

__all__ = ["Collected", "Source", "collect"]

log = logging.getLogger("circles.backup")

_SIDE_FILES = ("-wal", "-shm", "-journal")
_MIN_DATABASE = 512  # SQLite's smallest page: anything shorter holds no database worth a copy
LEDGER_KEY = "ledger-ed25519.pem"  # appliance.ledger.Signer's file in the key folder


class Collected(list[Source]):
    """The sources of a job, and `notes`: what was skipped and why (for the manifest)."""

    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        log.warning("backup: %s", text, extra={"note": text})
        self.notes.append(text)

    def add(self, path: str, origin: Path, kind: str, file: Path | None = None) -> None:
        """Add `origin` (read from `file` when a copy of it was made) as `path`."""
        try:
            st = origin.stat()
        except FileNotFoundError:  # deleted since it was listed: not part of this backup
            self.note(f"{path}: gone before it was read")
            return
        self.append(Source(path=path, origin=str(origin) if kind != "ledger" else "", kind=kind,
                           file=file or origin, mode=stat.S_IMODE(st.st_mode), mtime=st.st_mtime))


def collect(settings: CoreSettings, backup: BackupSettings, job: BackupJob, scratch: Path) -> Collected:
    """The files of `job`, with SQLite snapshots and ledger bundles made in `scratch` (a
    private folder the caller removes afterwards). Missing optional parts (no Mosquitto
    file, a folder that is not there, a PostgreSQL database) are notes, not errors."""
    state = settings.state_dir.resolve()
    scratch = private_dir(scratch).resolve()
    out = Collected()
    # The ledger first: exporting signs the head, which writes to the database; the database
    # snapshot then holds every record and checkpoint the bundles show, and a second run
    # with nothing new finds the same bytes.
    if job.ledger:
        _ledger(settings, scratch, out)
    if job.databases:
        _databases(settings, backup, job, scratch, out)
    if job.config:
        _config(state, out)
    if job.mosquitto:
        _mosquitto(state, backup, out)
    names: set[str] = set()
    private = _private_places(state, backup, scratch)
    for folder in job.folders:
        _folder(folder, names, private, out)
    return out


def _scratch_places(state: Path, scratch: Path) -> set[Path]:
    """This run's scratch folder, and the folder holding it when that is inside the state
    directory: other runs' and drills' copies may have been left there by a killed process."""
    return {scratch, *((scratch.parent,) if state in scratch.parent.parents else ())}


def _private_places(state: Path, backup: BackupSettings, scratch: Path) -> dict[Path, str]:
    """What a listed folder may hold that no snapshot takes, and why."""
    places = {place: "the backup's working copies" for place in _scratch_places(state, scratch)}
    for target in [backup.target, *(job.target for job in backup.jobs if job.target)]:
        if target.backend == "local":
            places[(target.path or state / "backups").resolve()] = "a backup target"
    places[(state / "backups").resolve()] = "a backup target"
    places[keyring_path(state).parent.resolve()] = ("the key folder (the config part takes its keys, "
                                                    "the emergency kit the keyring)")
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        places[(Path(credentials) / KEYRING_CREDENTIAL).resolve()] = "the keyring"
    return places


def _databases(settings: CoreSettings, backup: BackupSettings, job: BackupJob, scratch: Path,
               out: Collected) -> None:
    state = settings.state_dir.resolve()
    url = database_url(settings)
    if not url.startswith("sqlite"):
        # Never the URL itself in a note: it may carry a password.
        out.note("databases: the main database is PostgreSQL; back it up with pg_dump "
                 "(docs/backup.md). The ledger bundles are still included.")
    # Folders that are not the box's databases: the objects of stores and backups (which may
    # hold SQLite files of their own) and the backup's working copies.
    skip = {*_scratch_places(state, scratch), state / "storage", state / "backups",
            *((target.path.resolve(),) if (target := backup.target_of(job)).path else ()),
            *((settings.storage.path.resolve(),) if settings.storage.path else ())}
    for directory, dirs, files in os.walk(state, onerror=lambda exc: _unreadable("databases", exc, out)):
        here = Path(directory)
        dirs[:] = sorted(d for d in dirs if (here / d) not in skip)
        for name in sorted(files):
            path = here / name
            rel = path.relative_to(state).as_posix()
            try:
                if name.endswith(_SIDE_FILES) or not _is_sqlite(path):
                    continue
            except sqlite3.Error as exc:
                out.note(f"databases: {rel} not read ({exc})")
                continue
            copy = scratch / "db" / path.relative_to(state)
            _snapshot_sqlite(path, copy)
            out.add(f"db/{rel}", path, "sqlite", copy)


def _is_sqlite(path: Path) -> bool:
    """Whether `path` holds a SQLite database; sqlite3.Error when SQLite cannot tell (the
    file is not readable, or stays locked). Asked of SQLite itself, never by reading the
    header with open(): closing any descriptor of a file drops every POSIX lock this process
    holds on it, those of its own live connections too (sqlite.org/howtocorrupt.html, 2.2),
    while SQLite shares one descriptor per file among the connections of a process."""
    try:
        st = path.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size < _MIN_DATABASE:
        return False
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=60)
    try:
        db.execute("PRAGMA schema_version")
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_NOTADB:
            return False
        raise
    finally:
        db.close()
    return True


def _snapshot_sqlite(path: Path, copy: Path) -> None:
    """A consistent copy of the live database `path` at `copy`, by the online backup API."""
    copy.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    src = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=60)
    try:
        dst = sqlite3.connect(copy)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _config(state: Path, out: Collected) -> None:
    config = config_path()
    if config.is_file():
        out.add(f"config/{config.name}", config.resolve(), "file")
    secrets = secrets_dir(state)
    if secrets.is_dir():
        for path in sorted(secrets.iterdir()):
            if path.name.endswith(SUFFIX) and _regular(path):
                out.add(f"secrets/{path.name}", path, "file")
    keys = keyring_path(state).parent
    if keys.is_dir():
        for path in sorted(keys.iterdir()):
            if path.name != keyring_path(state).name and not path.name.endswith(".lock") and _regular(path):
                out.add(f"keys/{path.name}", path, "file")


def _mosquitto(state: Path, backup: BackupSettings, out: Collected) -> None:
    # Mosquitto writes its persistence file whole and renames it into place, so the file
    # open here is one complete save, never half of one.
    from appliance.bus.broker import BrokerFiles

    broker = BrokerFiles.under(state)
    data = backup.mosquitto_db or broker.data / "mosquitto.db"
    if _regular(data):
        out.add(f"mosquitto/{data.name}", data.resolve(), "file")
    else:
        out.note(f"mosquitto: no persistence file at {data}; nothing of the broker's queues to keep")
    if _regular(broker.dynsec):
        out.add(f"mosquitto/{broker.dynsec.name}", broker.dynsec, "file")


def _ledger(settings: CoreSettings, scratch: Path, out: Collected) -> None:
    url = database_url(settings)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return  # no database, so no ledger (and none is created by looking)
    engine = make_engine(url)
    try:
        if not inspect(engine).has_table("ledger_heads"):
            return
        signer = _signer(settings.state_dir)
        if signer is None:  # never made here: a key made by a backup would sign nothing else
            out.note(f"ledger: no signing key ({LEDGER_KEY}) to export the chains with; the records "
                     "are still in the database copy")
            return
        ledger = Ledger(engine, signer)
        folder = private_dir(scratch / "ledger")
        for chain in ledger.chains():
            # Reversible and collision-free, unlike replacing characters: "a:b" and "a_b" differ.
            name = quote(chain, safe="")
            bundle = folder / f"{name}.jsonl"
            with open(bundle, "w", encoding="utf-8") as handle:
                ledger.export(chain, handle)
            out.add(f"ledger/{name}.jsonl", bundle, "ledger")
    finally:
        engine.dispose()


def _signer(state: Path) -> Signer | None:
    """The ledger's signing key, or None when the box has none."""
    path = keyring_path(state).parent / LEDGER_KEY
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return None
    if not pem:
        return None
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise OperationalError(f"ledger: {path} is not an Ed25519 key")
    return Signer(key)


def _folder(folder: Path, names: set[str], private: dict[Path, str], out: Collected) -> None:
    if not folder.is_dir():
        out.note(f"folders: {folder} is not a folder (not mounted?); skipped")
        return
    root = folder.resolve()
    inside = next((place for place in private if place == root or place in root.parents), None)
    if inside is not None:
        out.note(f"folders: {folder} skipped: it is {private[inside]} or inside it")
        return
    name = root.name or "root"
    while name in names:  # two folders with the same last part: /a/docs and /b/docs
        name += "_"
    names.add(name)
    # os.walk does not follow symlinks to folders; files that are symlinks fail _regular.
    for directory, dirs, files in os.walk(root, onerror=lambda exc: _unreadable("folders", exc, out)):
        here = Path(directory)
        dirs[:] = [d for d in sorted(dirs) if not _private(here / d, private, out)]
        for file in sorted(files):
            path = here / file
            if _regular(path) and not _private(path, private, out):
                out.add(f"folders/{name}/{path.relative_to(root).as_posix()}", path, "file")


def _private(path: Path, private: dict[Path, str], out: Collected) -> bool:
    if path not in private:
        return False
    out.note(f"folders: {path} skipped: {private[path]}")
    return True


def _unreadable(part: str, exc: OSError, out: Collected) -> None:
    out.note(f"{part}: {exc.filename} not read ({exc.strerror}); skipped")


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False
