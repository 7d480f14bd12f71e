"""What a snapshot is: the files it holds, each as a list of chunk ids, and how it is named.

A manifest is JSON, sealed by the keyring with its object key as associated data, stored at
`snapshots/<job>/<id>` where the id is `<created, compact UTC>-<8 hex>`: listing a job's
prefix lists its snapshots in time order without opening them.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.security.crypto import Keyring
from appliance.storage.base import StorageCorrupt
from modules.backup.chunks import is_chunk_id, open_sealed

FORMAT = "circles-backup-snapshot"
VERSION = 1
SNAPSHOTS = "snapshots/"
_MANIFEST_AAD = b"circles-backup-snapshot\x00"
_JOB = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")
_CREATED = "%Y-%m-%dT%H:%M:%S.%fZ"  # microseconds: two runs in one second still sort
_COMPACT = "%Y%m%dT%H%M%SZ"
KINDS = ("sqlite", "file", "ledger")


@dataclass(frozen=True)
class Source:
    """One file to back up: where it goes in the snapshot (`path`), where it came from
    (`origin`, absolute; "" when it has no place of its own on the box, like a ledger bundle,
    whose records travel in the database), and the local file to read (`file`: a SQLite
    snapshot or a ledger export in the scratch folder, else the origin itself)."""

    path: str
    origin: str
    kind: str
    file: Path
    mode: int
    mtime: float


@dataclass(frozen=True)
class FileEntry:
    path: str
    origin: str
    kind: str
    size: int
    sha256: str
    mode: int
    mtime: float
    chunks: list[str]


@dataclass(frozen=True)
class Manifest:
    id: str
    job: str
    created: str  # ISO 8601 UTC, microseconds
    host: str
    key_ids: list[str]  # the keys this snapshot's objects are sealed with
    files: list[FileEntry]
    size: int  # plaintext bytes of all files
    uploaded_bytes: int  # bytes of new chunks this run sent to the store
    chunk_size: int = 0
    notes: list[str] = field(default_factory=list)  # what was skipped, and why

    @property
    def key(self) -> str:
        return snapshot_key(self.job, self.id)

    @property
    def time(self) -> datetime:
        return parse_created(self.created)


def check_path(path: str) -> str:
    """`path` if it is a relative POSIX path with no `.`/`..`/empty part (a manifest names
    files under the restore folder, never outside it); else ValueError."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in path:
        raise ValueError(f"invalid path in a snapshot: {path!r}")
    return str(PurePosixPath(path))


def new_id(created: datetime) -> str:
    return f"{created.astimezone(UTC).strftime(_COMPACT)}-{secrets.token_hex(4)}"


def created_text(created: datetime) -> str:
    return created.astimezone(UTC).strftime(_CREATED)


def parse_created(text: str) -> datetime:
    return datetime.strptime(text, _CREATED).replace(tzinfo=UTC)


def is_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None


def check_id(snapshot_id: str) -> str:
    if not _ID.fullmatch(snapshot_id):
        raise ValueError(f"not a snapshot id: {snapshot_id!r} (looks like 20240131T033000Z-1a2b3c4d)")
    return snapshot_id


def check_job(job: str) -> str:
    """`job` if it can name a folder of snapshots (as BackupJob's names can), else ValueError."""
    if not _JOB.fullmatch(job):
        raise ValueError(f"invalid job name {job!r}: lower-case letters, digits, '-' and '_'")
    return job


def snapshot_key(job: str, snapshot_id: str) -> str:
    return f"{SNAPSHOTS}{job}/{snapshot_id}"


def seal(manifest: Manifest, keyring: Keyring) -> bytes:
    doc = {"format": FORMAT, "version": VERSION, **asdict(manifest)}
    return keyring.encrypt(json.dumps(doc, separators=(",", ":")).encode(), _MANIFEST_AAD + manifest.key.encode())


def unseal(key: str, blob: bytes, keyring: Keyring) -> Manifest:
    """The manifest stored under `key`, checked. DecryptionError naming the key when a key
    this keyring lacks sealed it (the keyring was replaced); StorageCorrupt naming it for
    anything else: it does not open (modified, moved), is not a manifest of this format, or
    names a file a restore could not put safely under its folder."""
    what = f"snapshot {key}"
    try:
        doc: dict[str, Any] = json.loads(open_sealed(keyring, blob, _MANIFEST_AAD + key.encode(), what))
    except ValueError:
        raise StorageCorrupt(f"{what}: not JSON") from None
    if not isinstance(doc, dict) or doc.pop("format", None) != FORMAT or doc.pop("version", None) != VERSION:
        raise StorageCorrupt(f"{what}: not a {FORMAT} version {VERSION} manifest")
    try:
        files = [FileEntry(**entry) for entry in doc.pop("files")]
        manifest = Manifest(files=files, **doc)
    except (KeyError, TypeError) as exc:
        raise StorageCorrupt(f"{what}: malformed manifest ({exc})") from None
    if manifest.key != key:
        raise StorageCorrupt(f"{what}: the manifest names {manifest.key}")
    try:
        check_files(manifest.files)
    except (ValueError, TypeError, AttributeError) as exc:  # wrong types only from a bug, still refused
        raise StorageCorrupt(f"{what}: {exc}") from None
    return manifest


def check_files(files: list[FileEntry]) -> None:
    """ValueError unless every entry is well-formed and a restore can write all of them
    under one folder: relative paths without `.`/`..`/empty parts, none twice, and none
    that is a folder of another (`a` and `a/b`); origins absolute or empty."""
    paths = set()
    for entry in files:
        check_path(entry.path)
        if entry.path in paths:
            raise ValueError(f"{entry.path!r} is listed twice")
        paths.add(entry.path)
        if entry.origin and (not entry.origin.startswith("/") or "\x00" in entry.origin):
            raise ValueError(f"{entry.path!r}: its origin {entry.origin!r} is not an absolute path")
        if entry.kind not in KINDS or not all(is_chunk_id(c) for c in entry.chunks):
            raise ValueError(f"{entry.path!r}: bad kind or chunk id")
    for path in paths:
        parts = path.split("/")
        for end in range(1, len(parts)):
            if "/".join(parts[:end]) in paths:
                raise ValueError(f"{'/'.join(parts[:end])!r} is a file and also the folder of {path!r}")
