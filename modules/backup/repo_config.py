"""The repository's `config` object: format version, chunk size, and the dedupe key that
names chunks (modules.backup.chunks). Sealed by the keyring like every other object, so
the key never lies in the store in the clear and a modified `config` does not open.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.errors import OperationalError
from appliance.security.crypto import Keyring
from appliance.storage.base import NotFound, StorageCorrupt, Store
from modules.backup.chunks import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, open_sealed
from modules.backup.manifest import created_text

CONFIG = "config"
FORMAT = "circles-backup-repository"
VERSION = 2
_AAD = b"circles-backup-config\x00"
_KEY_BYTES = 32


@dataclass(frozen=True)
class RepoConfig:
    chunk_size: int
    created: str
    dedupe_key: bytes = field(repr=False)


def check_chunk_size(size: int) -> int:
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {size}: must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
    return size


def load(store: Store, keyring: Keyring) -> RepoConfig | None:
    """The repository's config, or None when the store holds no repository yet.
    DecryptionError when a key this keyring lacks sealed it (the keyring was replaced);
    OperationalError when it is not a config this release reads, or it was modified."""
    try:
        blob = store.get_bytes(CONFIG)
    except NotFound:
        return None
    what = f"{store.name}: {CONFIG}"
    if blob.startswith(b"{"):  # an older release wrote it in the clear
        raise OperationalError(f"{what}: not a {FORMAT} version {VERSION} (an older format, or not a "
                               "backup repository); back up into a new target")
    try:
        doc: dict[str, Any] = json.loads(open_sealed(keyring, blob, _AAD, what))
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise OperationalError(f"{what}: not a {FORMAT} version {VERSION} (found "
                                   f"{doc.get('format')!r} version {doc.get('version')!r})")
        found = RepoConfig(chunk_size=check_chunk_size(int(doc["chunk_size"])), created=str(doc["created"]),
                           dedupe_key=base64.b64decode(doc["dedupe_key"], validate=True))
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageCorrupt(f"{what}: malformed ({type(exc).__name__}: {exc})") from None
    if len(found.dedupe_key) != _KEY_BYTES:
        raise StorageCorrupt(f"{what}: malformed (the dedupe key is not {_KEY_BYTES} bytes)")
    return found


def create(store: Store, keyring: Keyring, chunk_size: int) -> RepoConfig:
    """Make the repository: a `config` with a fresh dedupe key. Returns the config as read
    back, so that of two processes creating the same repository at once, the one whose
    write landed last is the one both go on with (`Repository.backup` checks again before
    it lists a snapshot)."""
    doc = {"format": FORMAT, "version": VERSION, "chunk_size": check_chunk_size(chunk_size),
           "chunker": "fixed", "created": created_text(datetime.now(UTC)),
           "dedupe_key": base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode()}
    blob = keyring.encrypt(json.dumps(doc).encode(), _AAD)
    store.put_bytes(CONFIG, blob, metadata={"key-id": keyring.key_id_of(blob)})
    stored = load(store, keyring)
    if stored is None:
        raise StorageCorrupt(f"{store.name}: {CONFIG} is gone right after it was written")
    return stored
