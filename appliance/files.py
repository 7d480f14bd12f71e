"""Files that hold secrets: written whole or not at all, kept private, and locked by writers.

Keys, secrets, backups and device files all go through here, so each of them gets the same
guarantees: mode 0600 from the first byte, a reader never sees a partial file, and a
symlink left at the destination is replaced, never written through.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

_T = TypeVar("_T")


def write_atomically(dst: Path, write: Callable[[BinaryIO], _T], *, exclusive: bool = False,
                     tmp_dir: Path | None = None) -> _T:
    """Write a temporary file (0600) with `write`, fsync it, then rename it over `dst` (with
    `exclusive`, link it, failing with FileExistsError if `dst` exists) and fsync `dst`'s
    folder: a reader sees the old file or the whole new one, never a part, and after a power
    cut the new one is there once this returned. Returns what `write` returned.

    The temporary file is made in `tmp_dir` (on the same file system as `dst`) or else beside
    `dst`, and is held locked until it is renamed, so `sweep_temporary` can tell the leftover
    of a killed writer from a write in progress."""
    tmp, fd = _locked_temporary(tmp_dir or dst.parent, "" if tmp_dir else f".{dst.name}.")
    try:
        with open(fd, "wb") as out:  # closing releases the lock: only once the rename is done
            result = write(out)
            out.flush()
            os.fsync(out.fileno())
            if exclusive:
                os.link(tmp, dst)
            else:
                os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dst.parent)
    return result


def sweep_temporary(directory: Path) -> int:
    """Remove the temporary files `write_atomically` left in `directory` when its process was
    killed; returns how many. A file still being written is locked by its writer and stays."""
    removed = 0
    for path in directory.glob("*.tmp"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # gone meanwhile, or not a file of ours (a symbolic link)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
            removed += 1
        except OSError:  # BlockingIOError: a live writer holds it
            continue
        finally:
            os.close(fd)
    return removed


def _locked_temporary(directory: Path, stem: str) -> tuple[Path, int]:
    """A new temporary file in `directory`, created 0600 and locked; its path and descriptor."""
    while True:
        tmp = directory / f"{stem}{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                return tmp, fd
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        # A sweep took it between its creation and the lock (it takes unlocked files only).
        os.close(fd)


def private_dir(directory: Path) -> Path:
    """`directory`, created 0700 if missing and tightened to 0700 if looser (see `tighten`)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    tighten(directory, 0o700)
    return directory


def tighten(path: Path, mode: int) -> None:
    """Drop the permission bits of `path` that `mode` does not have, if this process owns it.

    For files made by hand or by an older version with a looser mode. Best effort: a file of
    another user, or one on a read-only file system, is left as it is."""
    st = path.stat()
    if st.st_mode & 0o777 & ~mode and st.st_uid == os.geteuid():
        try:
            path.chmod(st.st_mode & mode)
        except OSError:
            pass


@contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the lock file `path` (created 0600) for the block; writers
    of the same files take turns."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk too.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
