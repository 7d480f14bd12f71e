"""Reading a repository back: restoring a snapshot into a folder and checking it, and
re-reading chunks to prove they are still intact."""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

from appliance.errors import OperationalError
from appliance.files import private_dir, write_atomically
from appliance.ledger_verify import verify_bundle
from appliance.security.crypto import DecryptionError
from appliance.storage.base import NotFound, StorageCorrupt, Store
from modules.backup.chunks import Codec, chunk_key, ordered_map
from modules.backup.manifest import FileEntry, Manifest, check_path

# Where a snapshot of the state directory holds the ledger's public key (appliance.ledger
# writes it next to the private key): bundles are checked against it rather than against
# the key their own header names.
LEDGER_PUBLIC_KEY = "keys/ledger-ed25519.pub"


@dataclass
class Report:
    ok: bool
    checked: int  # files restored, or chunks verified
    bytes: int  # plaintext bytes read back
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.ok = False


class ChunkReader:
    """Fetches chunks from a store with a small thread pool, opened and checked."""

    def __init__(self, store: Store, codec: Codec, pool: ThreadPoolExecutor, window: int) -> None:
        self.store, self.codec, self.pool, self.window = store, codec, pool, window

    def read(self, cid: str) -> bytes:
        """The chunk's plaintext, or StorageCorrupt naming the chunk and what is wrong with it
        (missing, does not open under this keyring, or not the bytes its id names)."""
        try:
            return self.codec.unseal(cid, self.store.get_bytes(chunk_key(cid)))
        except NotFound:
            raise StorageCorrupt(f"chunk {cid}: missing from {self.store.name}") from None
        except DecryptionError as exc:  # a key this keyring lacks: this chunk is as good as lost
            raise StorageCorrupt(str(exc)) from None

    def read_all(self, cids: Iterable[str]) -> Iterable[bytes]:
        return ordered_map(self.pool, self.read, cids, self.window)

    def check(self, cid: str) -> tuple[int, str | None]:
        """(plaintext size, None) for a good chunk, (0, what is wrong) for a bad one."""
        try:
            return len(self.read(cid)), None
        except StorageCorrupt as exc:
            return 0, str(exc)


def verify_chunks(reader: ChunkReader, cids: Iterable[str]) -> Report:
    """Re-read each chunk in `cids`; a problem per bad chunk, naming its id."""
    report = Report(ok=True, checked=0, bytes=0)
    for size, problem in ordered_map(reader.pool, reader.check, cids, reader.window):
        report.checked += 1
        report.bytes += size
        if problem:
            report.problem(problem)
    return report


def restore_snapshot(reader: ChunkReader, manifest: Manifest, to: Path) -> Report:
    """Write every file of `manifest` to `to/<its path>` (each file whole or not at all), then
    check the result: sizes and sha256 as the manifest says, every SQLite file passes
    `PRAGMA integrity_check`, every ledger bundle verifies. `to` must be empty or absent."""
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise OperationalError(f"restore: {to} is not an empty folder; restore into a new or empty one")
    private_dir(to)
    report = Report(ok=True, checked=0, bytes=0)
    for entry in manifest.files:
        dst = to / check_path(entry.path)
        dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        digest = hashlib.sha256()
        try:
            size = write_atomically(dst, partial(_write, reader, entry, digest=digest))
        except StorageCorrupt as exc:
            report.problem(f"{entry.path}: not restored: {exc}")
            continue
        report.checked += 1
        report.bytes += size
        if (size, digest.hexdigest()) != (entry.size, entry.sha256):
            report.problem(f"{entry.path}: restored {size} bytes with sha256 {digest.hexdigest()}, "
                           f"the snapshot says {entry.size} bytes with sha256 {entry.sha256}")
        os.chmod(dst, entry.mode & 0o777)
        os.utime(dst, (entry.mtime, entry.mtime))
    _check_contents(manifest, to, report)
    return report


def _write(reader: ChunkReader, entry: FileEntry, out: BinaryIO, *, digest: hashlib._Hash) -> int:
    written = 0
    for data in reader.read_all(entry.chunks):
        digest.update(data)
        out.write(data)
        written += len(data)
    return written


def _check_contents(manifest: Manifest, to: Path, report: Report) -> None:
    public_key = _ledger_key(to)
    for entry in manifest.files:
        path = to / entry.path
        if not path.is_file():
            continue  # already reported as not restored
        if entry.kind == "sqlite":
            verdict = sqlite_integrity(path)
            if verdict != "ok":
                report.problem(f"{entry.path}: PRAGMA integrity_check says {verdict}")
        elif entry.kind == "ledger":
            with open(path, encoding="utf-8") as lines:
                ledger = verify_bundle(lines, public_key)
            if not ledger.ok:
                report.problem(f"{entry.path}: the ledger chain does not verify "
                               f"(seq {ledger.first_bad_seq}: {ledger.reason})")


def sqlite_integrity(path: Path) -> str:
    """"ok", or what `PRAGMA integrity_check` (or opening the file) reports."""
    # immutable: no -wal/-shm next to it and not one byte of the restored file touched.
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True)
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return f"not a usable database ({exc})"
    return "; ".join(str(row[0]) for row in rows)


def _ledger_key(to: Path) -> bytes | None:
    path = to / LEDGER_PUBLIC_KEY
    if not path.is_file():
        return None  # the key each bundle's header names
    return base64.b64decode(path.read_text().strip())
