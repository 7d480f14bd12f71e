"""The backup repository: content-addressed, encrypted chunks and one manifest per snapshot,
on any `Store` (docs/backup.md, "How a backup is stored").

Objects: `config` (modules.backup.repo_config: format version, chunk size, the dedupe key;
sealed), `chunks/..` (modules.backup.chunks), `snapshots/<job>/<id>` (modules.backup.manifest)
and `locks/..` (modules.backup.locks). A snapshot's manifest is written last, after every
chunk it names is stored: a run that is killed leaves only chunks no manifest names, never
a listed snapshot, and the next run finds those chunks and does not send them again.

Manifests are opened one at a time and not kept: what grows with the repository is only the
set of chunk ids a backup, a prune or a verify works with.
"""

from __future__ import annotations

import logging
import math
import random
import socket
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import OperationalError
from appliance.security.crypto import DecryptionError, Keyring
from appliance.storage.base import NotFound, ObjectInfo, StorageCorrupt, Store
from modules.backup import locks, manifest, repo_config, retention
from modules.backup.chunks import CHUNK_SIZE, CHUNKS, HEADER_BYTES, Codec, id_of
from modules.backup.locks import Lock, RepositoryBusy
from modules.backup.manifest import SNAPSHOTS, FileEntry, Manifest, Source
from modules.backup.repo_config import RepoConfig
from modules.backup.restore import ChunkReader, Report, restore_snapshot, verify_chunks
from modules.backup.writer import BackupRun

if TYPE_CHECKING:
    from modules.backup.settings import Keep

__all__ = ["FileEntry", "Manifest", "Report", "Repository", "RepositoryBusy", "Source"]

log = logging.getLogger("circles.backup")


class Repository:
    """Snapshots of files, deduplicated by chunk, sealed by `keyring`, on `store` (a raw store:
    each object is encrypted here, so never give it an `EncryptedStore`).

    `workers` chunks are sealed/sent (or fetched/opened) at once, and at most `window` chunks
    are read ahead: memory holds about `window` + 3 x `workers` chunks (some 20 MiB with the
    defaults) whatever the size of the files. `chunk_size` (64 KiB..64 MiB) applies when the
    repository is created; after that the repository's own `config` says."""

    def __init__(self, store: Store, keyring: Keyring, *, workers: int = 4, window: int = 8,
                 chunk_size: int = CHUNK_SIZE) -> None:
        if not 1 <= workers <= window:
            raise ValueError("need 1 <= workers <= window")
        self.store, self.keyring = store, keyring
        self.workers, self.window = workers, window
        self._new_chunk_size = repo_config.check_chunk_size(chunk_size)
        self._config: RepoConfig | None = None  # never changes once made

    # -- writing ----------------------------------------------------------------------------
    def backup(self, job: str, sources: Sequence[Source], *, now: datetime | None = None,
               notes: Sequence[str] = ()) -> Manifest:
        """Store `sources` as a new snapshot of `job` and return its manifest; only chunks the
        repository cannot already give back are sent (`uploaded_bytes` counts them). Nothing
        is listed as a snapshot unless the whole run succeeded. `notes` (what the caller
        skipped) are kept in the manifest, with the files that could not be read and the
        earlier snapshots that do not open. DecryptionError, before anything is sent, when
        the repository was sealed by a key this keyring lacks (a replaced keyring)."""
        created = (now or datetime.now(UTC)).astimezone(UTC)
        manifest.check_job(job)
        if len({s.path for s in sources}) != len(sources):
            raise ValueError("two sources have the same path in the snapshot")
        for source in sources:
            manifest.check_path(source.path)
        config = self._repo_config(create=True)
        with locks.for_backup(self.store) as lock:
            # Listed only once this lock keeps prunes away: every chunk found stays.
            known, orphan_keys, unreadable = self._reusable(lock)
            run = BackupRun(self.store, Codec(self.keyring, config.dedupe_key), lock, chunk_size=config.chunk_size,
                            workers=self.workers, window=self.window, known=known)
            run.store_all(sources)
            files = run.entries(sources)
            snap = Manifest(id=manifest.new_id(created), job=job, created=manifest.created_text(created),
                            host=socket.gethostname(), key_ids=self._key_ids(run, files, orphan_keys, lock),
                            files=files, size=sum(f.size for f in files), uploaded_bytes=run.uploaded_bytes,
                            chunk_size=config.chunk_size, notes=[*notes, *unreadable, *run.skipped])
            if repo_config.load(self.store, self.keyring) != config:
                self._config = None
                raise OperationalError(f"{self.store.name}: the repository was created by two processes at "
                                       "once and this run named its chunks with the other key; run it again")
            lock.confirm()
            blob = manifest.seal(snap, self.keyring)
            self.store.put_bytes(snap.key, blob, content_type="application/octet-stream",
                                 metadata={"key-id": self.keyring.key_id_of(blob)})
        log.info("backup stored", extra={"job": job, "snapshot": snap.id, "files": len(files),
                                          "bytes": snap.size, "uploaded_bytes": snap.uploaded_bytes})
        return snap

    def forget(self, job: str, keep: Keep, *, now: datetime | None = None,
               zone: tzinfo | None = None) -> list[str]:
        """Remove the snapshots of `job` that `keep` does not keep (modules.backup.retention;
        periods in `zone`, default the box's); returns their ids, oldest first. Their chunks
        stay until `prune`. A snapshot that does not open is left alone (verify names it)."""
        found = sorted((m.time, m.id, m.key) for _, m in self._manifests(f"{SNAPSHOTS}{job}/")
                       if isinstance(m, Manifest))
        kept = retention.keep([(sid, t) for t, sid, _ in found], keep, now=(now or datetime.now(UTC)), zone=zone)
        removed = [(sid, key) for _, sid, key in found if sid not in kept]
        for _, key in removed:
            self.store.delete(key)
        if removed:
            log.info("snapshots forgotten", extra={"job": job, "snapshots": [sid for sid, _ in removed]})
        return [sid for sid, _ in removed]

    def prune(self) -> int:
        """Delete the chunks no snapshot names; returns how many. Deletes nothing (0) while
        another process holds a lock on the repository (a backup's new chunks are named by
        no manifest yet, and it counts on the old ones it found), and while any snapshot
        does not open: its chunks would look unused."""
        lock = locks.for_prune(self.store)
        if lock is None:
            log.info("prune skipped: the repository is in use", extra={"store": self.store.name})
            return 0
        removed = 0
        with lock:
            named: set[str] = set()
            for _, found in self._manifests(SNAPSHOTS):
                lock.refresh()
                if isinstance(found, StorageCorrupt):
                    log.warning("prune refused: %s", found, extra={"store": self.store.name})
                    return 0
                named.update(c for f in found.files for c in f.chunks)
            lock.confirm()
            for info in self.store.list(CHUNKS):
                cid = id_of(info.key)
                if cid is not None and cid not in named:
                    self.store.delete(info.key)
                    removed += 1
                lock.refresh()
        if removed:
            log.info("chunks pruned", extra={"chunks": removed, "store": self.store.name})
        return removed

    # -- reading ----------------------------------------------------------------------------
    def snapshots(self, job: str | None = None) -> list[Manifest]:
        """The snapshots of `job` (of every job if None), oldest first. One that does not
        open is left out (logged; verify names it). DecryptionError if a key this keyring
        lacks sealed one."""
        found = [m for _, m in self._manifests(SNAPSHOTS + (f"{job}/" if job else "")) if isinstance(m, Manifest)]
        return sorted(found, key=lambda m: (m.created, m.id))

    def load(self, snapshot_id: str) -> Manifest:
        """The snapshot `snapshot_id` (of any job): NotFound if there is none, StorageCorrupt
        if it does not open, DecryptionError if a key this keyring lacks sealed it."""
        manifest.check_id(snapshot_id)
        for key in self._snapshot_keys(SNAPSHOTS):
            if key.endswith("/" + snapshot_id):
                return manifest.unseal(key, self.store.get_bytes(key), self.keyring)
        raise NotFound(f"{self.store.name}: no snapshot {snapshot_id}")

    def verify(self, *, snapshot_id: str | None = None, sample: float = 0.1,
               full: bool = False) -> Report:
        """Re-read chunks named by the snapshot `snapshot_id` (by every snapshot if None): all
        of them with `full`, else a random `sample` fraction (at least one), each opened and
        checked against its id. A problem per bad chunk, naming it, and per snapshot that
        does not open; no snapshot at all is a problem too."""
        if not 0 < sample <= 1:
            raise ValueError("sample is a fraction in (0, 1]")
        if snapshot_id:
            manifest.check_id(snapshot_id)
        report = Report(ok=True, checked=0, bytes=0)
        named: set[str] = set()
        seen = 0
        for _, found in self._manifests(SNAPSHOTS, only=snapshot_id):
            seen += 1
            if isinstance(found, StorageCorrupt):
                report.problem(str(found))
            else:
                named.update(c for f in found.files for c in f.chunks)
        if snapshot_id and not seen:
            raise NotFound(f"{self.store.name}: no snapshot {snapshot_id}")
        cids = sorted(named)
        del named
        if not full and cids:
            cids = random.sample(cids, max(1, math.ceil(len(cids) * sample)))
        if cids:
            with self._reader() as reader:
                checked = verify_chunks(reader, cids)
            report.checked, report.bytes = checked.checked, checked.bytes
            for problem in checked.problems:
                report.problem(problem)
        if not seen:
            report.problem(f"{self.store.name}: no snapshot to verify")
        return report

    def restore(self, snapshot_id: str, to: Path) -> Report:
        """Restore the snapshot into the empty (or new) folder `to` and check it
        (modules.backup.restore.restore_snapshot). A snapshot that does not open
        (StorageCorrupt) writes nothing."""
        snap = self.load(snapshot_id)
        with self._reader() as reader:
            return restore_snapshot(reader, snap, to)

    # -- internals --------------------------------------------------------------------------
    def _repo_config(self, *, create: bool = False) -> RepoConfig:
        if self._config is None:
            self._config = repo_config.load(self.store, self.keyring)
        if self._config is None:
            if not create:
                raise StorageCorrupt(f"{self.store.name}: no `{repo_config.CONFIG}` object: not a backup "
                                     "repository, or it lost its config")
            self._config = repo_config.create(self.store, self.keyring, self._new_chunk_size)
        return self._config

    @contextmanager
    def _reader(self) -> Iterator[ChunkReader]:
        codec = Codec(self.keyring, self._repo_config().dedupe_key)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="backup-read")
        try:
            yield ChunkReader(self.store, codec, pool, self.window)
        finally:
            pool.shutdown(cancel_futures=True)

    def _snapshot_keys(self, prefix: str) -> Iterator[str]:
        for info in self.store.list(prefix):
            parts = info.key[len(SNAPSHOTS):].split("/")
            if len(parts) == 2 and manifest.is_id(parts[1]):
                yield info.key

    def _manifests(self, prefix: str, *, only: str | None = None) -> Iterator[tuple[str, Manifest | StorageCorrupt]]:
        """Each snapshot under `prefix` (or only the one with id `only`), opened one at a time,
        or the StorageCorrupt that says why it does not open. DecryptionError (a key this
        keyring lacks) is raised: then the keyring, not one snapshot, is wrong."""
        for key in self._snapshot_keys(prefix):
            if only is not None and not key.endswith("/" + only):
                continue
            try:
                yield key, manifest.unseal(key, self.store.get_bytes(key), self.keyring)
            except NotFound:
                continue  # forgotten meanwhile
            except StorageCorrupt as exc:
                log.warning("snapshot does not open: %s", exc, extra={"store": self.store.name})
                yield key, exc

    def _reusable(self, lock: Lock) -> tuple[set[str], dict[str, str], list[str]]:
        """The chunks a backup may name without sending them: those in the store that a
        snapshot names (one that opens, with every key it needs in this keyring), and the
        others (left by a killed run, or by forgotten snapshots) when sealed by a key of this
        keyring. A chunk sealed by a lost key is sent again, so the new snapshot opens. Also
        returns the key ids of the re-usable orphans and notes on the snapshots that do not
        open."""
        named: set[str] = set()
        notes = []
        ids = set(self.keyring.ids)
        for _, found in self._manifests(SNAPSHOTS):
            lock.refresh()
            if isinstance(found, StorageCorrupt):
                notes.append(f"{found}; its chunks were not re-used")
            elif ids.issuperset(found.key_ids):
                named.update(c for f in found.files for c in f.chunks)
        known: set[str] = set()
        orphan_keys: dict[str, str] = {}
        for info in self.store.list(CHUNKS):
            lock.refresh()
            cid = id_of(info.key)
            if cid is None:
                continue
            if cid in named:  # moved, so that the two sets together stay the size of one
                named.discard(cid)
                known.add(cid)
            elif (key_id := self._key_id_of(info)) in ids:
                known.add(cid)
                orphan_keys[cid] = key_id
        return known, orphan_keys, notes

    def _key_id_of(self, info: ObjectInfo) -> str | None:
        """The key that sealed a chunk object: from its metadata (in a local listing; S3's
        listings carry none, so from a `stat`), else from the object's own header."""
        try:
            key_id = info.metadata.get("key-id") or self.store.stat(info.key).metadata.get("key-id")
            if key_id:
                return key_id
            with self.store.open(info.key) as src:
                head = src.read(HEADER_BYTES)
        except NotFound:
            return None
        try:
            return self.keyring.key_id_of(head)
        except DecryptionError:
            return None

    def _key_ids(self, run: BackupRun, files: list[FileEntry], orphan_keys: dict[str, str], lock: Lock) -> list[str]:
        """The keys a snapshot of `files` needs: the ones this run sealed with, and those of
        the chunks it re-uses (a chunk keeps the key it was sent with)."""
        reused = {c for f in files for c in f.chunks} - run.uploaded_ids
        keys = run.key_ids | {self.keyring.current_id}
        keys.update(key_id for cid, key_id in orphan_keys.items() if cid in reused)
        if reused:
            ids = set(self.keyring.ids)
            for _, found in self._manifests(SNAPSHOTS):
                lock.refresh()
                if (isinstance(found, Manifest) and ids.issuperset(found.key_ids)
                        and not reused.isdisjoint(c for f in found.files for c in f.chunks)):
                    keys.update(found.key_ids)
        return sorted(keys)
