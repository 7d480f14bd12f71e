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
from typing import BinaryIO


def write_atomically(dst: Path, write: Callable[[BinaryIO], int], *,
                     exclusive: bool = False) -> int:
    """Write a temporary file (0600) next to `dst` with `write`, fsync it, then rename it over
    `dst` (with `exclusive`, link it, failing with FileExistsError if `dst` exists): a reader
    sees the old file or the whole new one, never a part. Returns what `write` returned."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            count = write(out)
            out.flush()
            os.fsync(out.fileno())
        if exclusive:
            os.link(tmp, dst)
        else:
            os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(dst.parent)
    return count


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


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk too.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
