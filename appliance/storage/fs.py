"""The local filesystem backend: objects as plain files under one root, the embedded default.

Layout under the root (docs/storage.md):

    objects/<key>   the object's bytes, one file per key, at the key's own path
    meta/<key>      a JSON sidecar: size, etag, content type and metadata of those bytes
    tmp/            writes in progress, each locked by its writer; renamed into `objects/` or
                    `meta/` when complete
    lock            writers of the root take turns at the commit step

The two trees mirror each other, so a sidecar can never sit where another key's object or
sidecar belongs, and only `objects/` is listed: an unfinished write or a sidecar never shows
up as an object. Directories are 0700 and files 0600: they are the owner's files. A symbolic
link or a special file inside the trees (planted, or brought by a copy) is neither followed
nor served: no key leads out of the root, and no read blocks on a FIFO.

Like MinIO on a plain disk, a key cannot be both an object and a "folder" of other objects
(`a` and `a/b`): the second put raises ValueError.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any, BinaryIO

from appliance.files import flocked, fsync_dir, sweep_temporary, tighten, write_atomically
from appliance.storage.base import (
    NotFound,
    ObjectInfo,
    StorageDenied,
    StorageUnavailable,
    Store,
    announced,
    check_key,
    check_metadata,
)

_COPY = 1024 * 1024
_SWEEP_EVERY = 3600.0  # seconds: how often a long-running store looks for a killed writer's files
# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; it is refused after.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_Version = dict[str, Any]  # a sidecar entry: the fields below
_FIELDS = {"ino": int, "mtime_ns": int, "size": int, "etag": str, "content_type": str, "metadata": dict}


class FileStore(Store):
    """Objects under `root`. `local` says whether the root is on the box's own disk (see
    `open_store`, which compares devices)."""

    def __init__(self, root: Path, *, local: bool = True) -> None:
        self.root = root
        self.name = f"local:{root}"
        self.local = local
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            _make_dir(root)
            # Resolved once: every path of a key is then checked to stay inside these.
            self._objects, self._meta, self._tmp = (Path(os.path.realpath(_make_dir(root / name)))
                                                    for name in ("objects", "meta", "tmp"))
        except OSError as exc:
            raise self._error(None, exc) from None
        self._lock = root / "lock"
        self._sweep()

    # -- the primitives ---------------------------------------------------------------------
    def put(self, key: str, src: BinaryIO, *, length: int = -1,
            content_type: str = "application/octet-stream",
            metadata: dict[str, str] | None = None) -> ObjectInfo:
        check_key(key)
        metadata = check_metadata(metadata)
        if time.monotonic() >= self._next_sweep:
            self._sweep()
        source = announced(src, length, f"{self.name}: {key}")
        with ExitStack() as committing:  # holds the lock from the sidecar's write to the rename

            def write(out: BinaryIO) -> ObjectInfo:
                size, etag = _copy(source, out)
                st = os.fstat(out.fileno())
                version = {"ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "size": size, "etag": etag,
                           "content_type": content_type, "metadata": metadata}
                committing.enter_context(flocked(self._lock))
                self._prepare(key, version)
                return _object_info(key, st, version)

            try:
                return write_atomically(self._objects / key, write, tmp_dir=self._tmp)
            except _SourceFailed as failed:
                raise failed.error from None
            except (NotADirectoryError, IsADirectoryError, FileExistsError):
                raise self._conflict(key) from None
            except OSError as exc:
                raise self._error(key, exc) from None

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        check_key(key)
        fd = self._open_regular(self._objects, key)
        if fd is None:
            raise NotFound(f"{self.name}: no object {key}")
        return open(fd, "rb")

    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        info = self._info(key)
        if info is None:
            raise NotFound(f"{self.name}: no object {key}")
        return info

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only the folder the prefix names, then sort: key order is string order of the
        # whole key ("a-c" before "a/b"), which a directory-by-directory walk would not give.
        folder, _, _ = prefix.rpartition("/")
        if folder and not _valid(folder):
            return  # no key starts with it (and a '..' must not lead out of the root)
        start = self._objects / folder if folder else self._objects
        if os.path.realpath(start) != str(start):
            return  # a symbolic link on the way: not a folder of the store
        keys = []
        # os.walk follows no link to a folder; links to files are left out by `_info`.
        for directory, _dirs, files in os.walk(start):
            base = Path(directory).relative_to(self._objects).as_posix()
            for file in files:
                key = file if base == "." else f"{base}/{file}"
                if key.startswith(prefix) and _valid(key):  # a file copied in by hand may not be
                    keys.append(key)
        for key in sorted(keys):
            info = self._info(key)
            if info is not None:  # deleted meanwhile, or not a regular file
                yield info

    def delete(self, key: str) -> None:
        check_key(key)
        try:
            with flocked(self._lock):
                # The bytes first: without them there is no object, whatever a crash leaves.
                for tree in (self._objects, self._meta):
                    path = _inside(tree, key)
                    if path is None:
                        continue
                    try:
                        path.unlink()
                    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                        continue
                    fsync_dir(path.parent)
                    _prune(path.parent, tree)
        except OSError as exc:
            raise self._error(key, exc) from None

    # -- how a write lands ------------------------------------------------------------------
    def _prepare(self, key: str, version: _Version) -> None:
        """Under the lock, just before the new bytes are renamed into place: the key's folders
        made in both trees, and the sidecar rewritten (durably) with the entry of the bytes in
        place followed by the new one's, the latest.

        Two files cannot be renamed at once. This way, whenever a reader looks and after a
        crash at any point, the sidecar holds the entry of the very bytes it finds: never new
        bytes with old metadata, or the reverse."""
        for tree in (self._objects, self._meta):
            _make_folders(tree, key)
        versions = [version]
        current = _regular(self._objects / key)
        if current is not None:
            kept = _version_of(self._versions(key), current)
            if kept is not None:  # none for bytes copied in by hand
                versions.insert(0, kept)
        text = json.dumps({"versions": versions}, sort_keys=True).encode()
        write_atomically(self._meta / key, lambda out: out.write(text), tmp_dir=self._tmp)

    def _conflict(self, key: str) -> ValueError:
        return ValueError(f"{self.name}: key {key!r} clashes with an existing object, folder or link "
                          "(a local store cannot hold both 'a' and 'a/b', and follows no link)")

    def _error(self, key: str | None, exc: OSError) -> Exception:
        """The storage error a disk's error means, naming the store and the key."""
        if exc.errno == errno.ENAMETOOLONG:
            return ValueError(f"{self.name}: key {key!r} has a segment too long for a file name "
                              "(255 bytes)")
        kind = StorageDenied if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else StorageUnavailable
        where = f"{self.name}: {key}" if key else self.name
        # A vanished root (a USB disk unplugged) is FileNotFoundError: unavailable, too.
        return kind(f"{where}: {exc.strerror or type(exc).__name__}")

    # -- reading ----------------------------------------------------------------------------
    def _info(self, key: str) -> ObjectInfo | None:
        """The object's info, or None if there is none."""
        path = _inside(self._objects, key)
        if path is None:
            return None
        tries = 3
        while True:
            st = _regular(path)
            if st is None:
                return None
            versions = self._versions(key)
            tries -= 1
            # The same file after the sidecar was read: the sidecar has its entry (see
            # `_prepare`). Another one: a put landed in between, look again.
            again = _regular(path)
            if not tries or (again is not None and (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)):
                return _object_info(key, st, _version_of(versions, st))

    def _versions(self, key: str) -> builtins.list[_Version]:
        """The entries of the key's sidecar; none if it is missing or damaged by hand (the
        object's bytes are still served, without metadata)."""
        fd = self._open_regular(self._meta, key)
        if fd is None:
            return []
        with open(fd, "rb") as sidecar:
            raw = sidecar.read()
        try:
            versions = json.loads(raw)["versions"]
        except (ValueError, KeyError, TypeError):
            return []
        if not isinstance(versions, list):
            return []
        return [v for v in versions
                if isinstance(v, dict) and all(isinstance(v.get(n), t) for n, t in _FIELDS.items())]

    def _open_regular(self, tree: Path, key: str) -> int | None:
        """A descriptor of the regular file of `key` in `tree`, or None if there is none (or
        only a link, a folder or a special file)."""
        path = _inside(tree, key)
        if path is None:
            return None
        try:
            fd = os.open(path, _READ)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # the key's own name is a link
                return None
            raise self._error(key, exc) from None
        if not S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return fd

    def _sweep(self) -> None:
        """Remove the temporary files of writers that were killed: theirs are the only ones
        nobody holds locked."""
        self._next_sweep = time.monotonic() + _SWEEP_EVERY
        sweep_temporary(self._tmp)


class _SourceFailed(Exception):
    """Carries an exception of the caller's stream through `write_atomically` to the caller,
    unchanged: it must not be taken for an error of the disk."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _copy(src: BinaryIO, out: BinaryIO) -> tuple[int, str]:
    """Copy `src` into `out`; the size and sha256 of what was copied."""
    digest = hashlib.sha256()
    size = 0
    while True:
        try:
            piece = src.read(_COPY)
        except Exception as exc:
            raise _SourceFailed(exc) from exc
        if not piece:
            break
        out.write(piece)
        digest.update(piece)
        size += len(piece)
    out.flush()  # before the caller's fstat: its time is then the file's final one
    return size, digest.hexdigest()


def _version_of(versions: list[_Version], st: os.stat_result) -> _Version | None:
    """The sidecar entry of the bytes `st` describes: normally the one of this very file (its
    inode and time). In a copy of the store (rsync, a restore, a FAT disk: new inodes) the one
    of the same size and time, else the latest of the same size. A copy taken while a write was
    committing has two entries; their sizes tell them apart unless they are equal."""
    same_size = [v for v in versions if v["size"] == st.st_size]
    exact = [v for v in same_size if (v["ino"], v["mtime_ns"]) == (st.st_ino, st.st_mtime_ns)]
    timed = [v for v in same_size if v["mtime_ns"] == st.st_mtime_ns]
    for found in (exact, timed, same_size):
        if found:
            return found[-1]
    return None


def _object_info(key: str, st: os.stat_result, version: _Version | None) -> ObjectInfo:
    modified = datetime.fromtimestamp(st.st_mtime_ns / 1e9, UTC)
    if version is None:  # bytes copied in by hand, or a sidecar lost: the file alone
        return ObjectInfo(key=key, size=st.st_size, modified=modified)
    return ObjectInfo(key=key, size=st.st_size, modified=modified, etag=version["etag"],
                      content_type=version["content_type"], metadata=dict(version["metadata"]))


def _inside(tree: Path, key: str) -> Path | None:
    """`tree/key` if no folder on the way is a symbolic link (`tree` is resolved and `key`
    checked, so the path is already in normal form), else None."""
    path = tree / key
    return path if os.path.realpath(path.parent) == str(path.parent) else None


def _regular(path: Path) -> os.stat_result | None:
    """`path`'s status if it is a regular file (a link is not followed), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if S_ISREG(st.st_mode) else None


def _make_dir(path: Path) -> Path:
    """`path` as a private folder. A new one is made durable in its parent: after a power cut,
    a folder must not vanish with the objects renamed into it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        tighten(path, 0o700)
    else:
        fsync_dir(path.parent)
    return path


def _make_folders(tree: Path, key: str) -> None:
    """The folders of `key` under `tree`, made where missing (as `_make_dir`). One that
    exists but is not a real folder (an object, a link) raises NotADirectoryError: the key
    clashes. Checked part by part, so that nothing is made through a link."""
    folder = tree
    for part in key.split("/")[:-1]:
        folder = folder / part
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            if not S_ISDIR(os.lstat(folder).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder)) from None
            continue
        fsync_dir(folder.parent)


def _valid(key: str) -> bool:
    try:
        check_key(key)
    except ValueError:
        return False
    return True


def _prune(directory: Path, top: Path) -> None:
    """Remove folders left empty by a delete, up to (not including) `top`."""
    while directory != top:
        try:
            directory.rmdir()
        except OSError:  # not empty, or already gone
            return
        directory = directory.parent
