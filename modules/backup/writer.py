"""One backup run's chunk pipeline: files are read and hashed here, and each chunk is named,
checked against what the repository may re-use, sealed and sent by a small thread pool."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from hashlib import sha256
from typing import Any, BinaryIO

from appliance.storage.base import Store
from modules.backup.chunks import Codec, chunk_key, ordered_map
from modules.backup.locks import Lock
from modules.backup.manifest import FileEntry, Source

_NOT_READ = {errno.ENOENT: "gone", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.ELOOP: "a symbolic link, not followed", errno.ENXIO: "not a regular file",
             errno.ENOTDIR: "gone"}


class BackupRun:
    """Stores the chunks of `sources`, re-using those in `known` (which it adds its own to).
    Memory: at most `window` chunks read ahead, `workers` of them sealed and sent at once."""

    def __init__(self, store: Store, codec: Codec, lock: Lock, *, chunk_size: int, workers: int,
                 window: int, known: set[str]) -> None:
        self.store, self.codec, self.lock = store, codec, lock
        self.chunk_size, self.workers, self.window = chunk_size, workers, window
        self.known = known
        self.claimed = threading.Lock()
        self.uploaded_ids: set[str] = set()
        self.uploaded_bytes = 0
        self.key_ids: set[str] = set()
        self.skipped: list[str] = []
        self._digests: dict[int, Any] = {}
        self._sizes: dict[int, int] = {}
        self._ids: dict[int, list[str]] = {}

    def store_all(self, sources: Sequence[Source]) -> None:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="backup") as pool:
            for index, cid, sent, key_id in ordered_map(pool, self._store, self._pieces(sources), self.window):
                self._ids[index].append(cid)
                if sent:
                    self.uploaded_ids.add(cid)
                    self.uploaded_bytes += sent
                    self.key_ids.add(key_id)
                self.lock.refresh()

    def entries(self, sources: Sequence[Source]) -> list[FileEntry]:
        """The manifest's entries of the files that were read (`skipped` says which were not)."""
        return [FileEntry(path=s.path, origin=s.origin, kind=s.kind, size=self._sizes[i],
                          sha256=self._digests[i].hexdigest(), mode=s.mode, mtime=s.mtime, chunks=self._ids[i])
                for i, s in enumerate(sources) if i in self._digests]

    def _open(self, source: Source) -> BinaryIO | None:
        # Never through a link, and never blocking on a FIFO: a folder's file may have been
        # replaced since it was listed (by a link to the keyring, say).
        try:
            fd = os.open(source.file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in _NOT_READ:
                raise
            self.skipped.append(f"{source.path}: not read ({_NOT_READ[exc.errno]})")
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            self.skipped.append(f"{source.path}: not read (not a regular file)")
            return None
        return os.fdopen(fd, "rb")

    def _pieces(self, sources: Sequence[Source]) -> Iterator[tuple[int, bytes]]:
        for index, source in enumerate(sources):
            handle = self._open(source)
            if handle is None:
                continue
            self._digests[index], self._sizes[index], self._ids[index] = sha256(), 0, []
            with handle:
                while data := handle.read(self.chunk_size):
                    self._digests[index].update(data)
                    self._sizes[index] += len(data)
                    yield index, data

    def _store(self, piece: tuple[int, bytes]) -> tuple[int, str, int, str]:
        index, data = piece
        cid = self.codec.chunk_id(data)
        with self.claimed:
            if cid in self.known:
                return index, cid, 0, ""
            self.known.add(cid)
        blob = self.codec.seal(cid, data)
        key_id = self.codec.keyring.key_id_of(blob)
        self.store.put_bytes(chunk_key(cid), blob, metadata={"key-id": key_id})
        return index, cid, len(blob), key_id
