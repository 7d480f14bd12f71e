"""The one storage interface: objects by key in a flat namespace, over S3 or the local disk.

Every backend (`fs.FileStore`, `s3.S3Store`) and the encryption wrapper
(`encrypted.EncryptedStore`) implement `Store`. Calls are blocking (the `minio` SDK is);
a service runs them in a thread (`asyncio.to_thread`). Errors are only the ones below:
a backend translates its library's exceptions at its own boundary.

Keys are `/`-separated paths of 1-1024 characters, no leading `/`, no empty, `.` or `..`
segment, no control characters (`check_key`). Metadata keys are lower-case
`[a-z0-9-]`, values printable ASCII (what S3 user metadata carries).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO, cast

from appliance.errors import AuthError, CirclesError, OperationalError, TemporaryError

# Objects larger than this (or of unknown length) go up in parts of this size.
PART_SIZE = 16 * 1024 * 1024
_SEGMENT_BAD = re.compile(r"[\x00-\x1f\x7f]")
_META_KEY = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class StorageError(CirclesError):
    """Base of storage errors; the message names the store and the key, never a secret."""


class NotFound(StorageError):
    """No object under that key."""


class StorageUnavailable(StorageError, TemporaryError):
    """The store cannot be reached now (network, server error): retry later."""


class StorageDenied(StorageError, AuthError):
    """The store refused the credentials or the request."""


class StorageCorrupt(StorageError, OperationalError):
    """An object is not what it should be: a bad hash, or it fails to decrypt."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int  # bytes as the caller sees them (plaintext size under encryption)
    modified: datetime  # aware, UTC
    etag: str = ""
    content_type: str = "application/octet-stream"
    metadata: dict[str, str] = field(default_factory=dict)


def check_key(key: str) -> str:
    """`key` if it is a valid object key, else ValueError saying why."""
    if not 1 <= len(key) <= 1024:
        raise ValueError("an object key has 1 to 1024 characters")
    if key.startswith("/") or _SEGMENT_BAD.search(key):
        raise ValueError(f"invalid object key {key!r}: no leading '/' and no control characters")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' segment")
    return key


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """The metadata, checked: lower-case keys of `[a-z0-9-]`, printable ASCII values."""
    checked: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        if not _META_KEY.fullmatch(name):
            raise ValueError(f"metadata key {name!r}: lower-case letters, digits and '-' only")
        if not value.isascii() or not value.isprintable() or len(value) > 1024:
            raise ValueError(f"metadata {name}: printable ASCII, at most 1024 characters")
        checked[name] = value
    return checked


def announced(src: BinaryIO, length: int, where: str) -> BinaryIO:
    """`src` itself when `length` is -1 (unknown); else `src` held to `length` bytes: reading
    it raises ValueError (naming `where`) as soon as it proves shorter or longer, before its
    last byte is handed on, so a store never keeps an object of another size than announced."""
    return src if length < 0 else cast(BinaryIO, _Announced(src, length, where))


def rewind_point(src: BinaryIO) -> int | None:
    """Where `src` stands now, if it can be read again from there (a store that must send an
    object a second time seeks back to it); None for a stream that cannot."""
    try:
        return src.tell() if src.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


class _Announced:
    def __init__(self, src: BinaryIO, length: int, where: str) -> None:
        self._src, self._length, self._where = src, length, where
        self._left, self._checked = length, False

    def read(self, size: int = -1) -> bytes:
        want = self._left if size < 0 else min(size, self._left)
        data = self._src.read(want) if want else b""
        self._left -= len(data)
        if want and not data:
            raise ValueError(f"{self._where}: the stream gave {self._length - self._left} bytes, "
                             f"{self._length} were announced")
        if not self._left and not self._checked:
            self._checked = True
            if self._src.read(1):
                raise ValueError(f"{self._where}: the stream gave more than the {self._length} "
                                 "bytes announced")
        return data


class Store(ABC):
    """Objects by key. `put` and `open` stream: memory stays bounded by a part, whatever the
    object's size."""

    #: "local:/var/lib/circles/storage" or "s3://host:9000/bucket": for messages and reports.
    name: str
    #: True when the objects live on the box's own disk (a backup there is "local only").
    local: bool

    @abstractmethod
    def put(self, key: str, src: BinaryIO, *, length: int = -1,
            content_type: str = "application/octet-stream",
            metadata: dict[str, str] | None = None) -> ObjectInfo:
        """Store everything `src` yields under `key` (replacing what was there; a reader sees
        the old or the whole new object, never part). `length` -1: unknown, sent in parts."""

    @abstractmethod
    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        """The object's bytes as a readable stream (NotFound if there is none)."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, time, content type and metadata of an object (NotFound if there is none)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in key order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; no error if there is none."""

    def presigned_get(self, key: str, expires: timedelta) -> str | None:
        """A URL anyone may GET the object's bytes from until `expires` has passed, or None
        when this store cannot make one (the local disk; encrypted objects): the panel then
        serves its own signed link."""
        return None

    # -- conveniences on top of the primitives ------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/octet-stream",
                  metadata: dict[str, str] | None = None) -> ObjectInfo:
        import io

        return self.put(key, io.BytesIO(data), length=len(data), content_type=content_type,
                        metadata=metadata)

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as src:
            return src.read()

    def put_file(self, key: str, path: Path, *, content_type: str = "application/octet-stream",
                 metadata: dict[str, str] | None = None) -> ObjectInfo:
        with open(path, "rb") as src:
            return self.put(key, src, length=path.stat().st_size, content_type=content_type,
                            metadata=metadata)

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release connections (a no-op for most backends)."""
