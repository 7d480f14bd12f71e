"""Envelope encryption over any store: what reaches the disk or the S3 server is ciphertext.

Each object is one stream of `crypto.encrypt_chunks` (its own data key, wrapped by the
keyring's current key; 64 KiB authenticated chunks), with the object's key as associated data:
a ciphertext copied or renamed to another key does not decrypt. Both ways, chunks are made
only as the other side reads them (`_Pieces`), so memory stays constant whatever the object's
size, no thread is involved, and an error on either side reaches the caller.

Stored metadata adds `key-id` (the key-encryption key that wraps the data key; `stat` shows it)
and `chunk-size`; the plaintext size follows from the stored size (`crypto.plaintext_size`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import BinaryIO, cast

from appliance.security.crypto import (
    CHUNK_SIZE,
    DecryptionError,
    Keyring,
    decrypt_chunks,
    encrypt_chunks,
    plaintext_size,
)
from appliance.storage.base import (
    NotFound,
    ObjectInfo,
    StorageCorrupt,
    Store,
    announced,
    check_key,
    check_metadata,
    rewind_point,
)

KEY_ID = "key-id"
_CHUNK = "chunk-size"
_RESERVED = (KEY_ID, _CHUNK)


class EncryptedStore(Store):
    """`inner`'s objects, encrypted under `keyring`. `name` and `local` are the inner store's;
    `presigned_get` stays None, since a presigned URL would hand out ciphertext."""

    def __init__(self, inner: Store, keyring: Keyring) -> None:
        self.inner = inner
        self.keyring = keyring
        self.name = inner.name
        self.local = inner.local

    def put(self, key: str, src: BinaryIO, *, length: int = -1,
            content_type: str = "application/octet-stream",
            metadata: dict[str, str] | None = None) -> ObjectInfo:
        check_key(key)
        metadata = check_metadata(metadata)
        if reserved := [name for name in _RESERVED if name in metadata]:
            raise ValueError(f"metadata {reserved[0]}: reserved by the encrypted store")
        stored = {**metadata, KEY_ID: self.keyring.current_id, _CHUNK: str(CHUNK_SIZE)}
        start = rewind_point(src)

        def sealed() -> Iterator[bytes]:
            # The length is checked on the plaintext: a short or long source fails before its
            # last chunk is sealed, so the inner store never keeps it.
            return encrypt_chunks(announced(src, length, f"{self.name}: {key}"), self.keyring, _aad(key))

        ciphertext = _Pieces(sealed, None if start is None else lambda: src.seek(start))
        with ciphertext:
            info = self.inner.put(key, cast(BinaryIO, ciphertext), length=-1, content_type=content_type,
                                  metadata=stored)
        return self._outer(info)

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        check_key(key)
        # Opened now, so that a missing object raises NotFound here, not at the first read.
        return self._decrypting(key, self.inner.open(key))

    def stat(self, key: str) -> ObjectInfo:
        return self._outer(self.inner.stat(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """As the inner store lists; where its listing carries no metadata (S3), each object is
        stat'ed for the plaintext size: one request per object."""
        for info in self.inner.list(prefix):
            if KEY_ID not in info.metadata:
                try:
                    info = self.inner.stat(info.key)
                except NotFound:  # deleted meanwhile
                    continue
            yield self._outer(info)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def close(self) -> None:
        self.inner.close()

    # -- helpers ----------------------------------------------------------------------------
    @contextmanager
    def _decrypting(self, key: str, stored: AbstractContextManager[BinaryIO]) -> Iterator[BinaryIO]:
        with stored as src:

            def plaintext() -> Iterator[bytes]:
                try:
                    yield from decrypt_chunks(src, self.keyring, _aad(key))
                except DecryptionError as exc:
                    raise StorageCorrupt(f"{self.name}: {key}: does not decrypt: {exc}") from None

            with io.BufferedReader(_Pieces(plaintext), CHUNK_SIZE) as reader:
                yield cast(BinaryIO, reader)

    def _outer(self, info: ObjectInfo) -> ObjectInfo:
        """The caller's view of a stored object: plaintext size, the caller's metadata and
        the key id. An object stored without our metadata is shown as it is (it will not
        decrypt: `open` says so)."""
        key_id, chunk = info.metadata.get(KEY_ID), info.metadata.get(_CHUNK, "")
        if key_id is None or not chunk.isdigit() or int(chunk) < 1:
            return info
        metadata = {name: value for name, value in info.metadata.items() if name != _CHUNK}
        return replace(info, size=plaintext_size(info.size, key_id, int(chunk)), metadata=metadata)


def _aad(key: str) -> bytes:
    return b"circles-object\x00" + key.encode("utf-8")


class _Pieces(io.RawIOBase):
    """The pieces `make()` yields, as a raw stream pulled by its reader: `readinto` fills the
    whole buffer (short only at the end). A failure of the pieces is raised again on every
    later read, never mistaken for the end. With `rewind` (which puts the source back where it
    was), it can start over from `seek(0)`, as a store that must send an object again does."""

    def __init__(self, make: Callable[[], Iterator[bytes]], rewind: Callable[[], object] | None = None) -> None:
        self._make, self._rewind = make, rewind
        self._start()

    def _start(self) -> None:
        self._pieces = self._make()
        self._rest = memoryview(b"")
        self._position = 0
        self._failed: Exception | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._rewind is not None

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._failed is not None:
            raise self._failed
        filled = 0
        while filled < len(buffer):
            if not self._rest:
                try:
                    piece = next(self._pieces, None)
                except Exception as exc:
                    self._failed = exc
                    raise
                if piece is None:
                    break
                self._rest = memoryview(piece)
                continue
            count = min(len(buffer) - filled, len(self._rest))
            buffer[filled:filled + count] = self._rest[:count]
            self._rest = self._rest[count:]
            filled += count
        self._position += filled
        return filled

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR and offset == 0:  # tell()
            return self._position
        if (whence, offset) != (io.SEEK_SET, 0) or self._rewind is None:
            raise io.UnsupportedOperation("this stream can only start over")
        self._stop()
        self._rewind()
        self._start()
        return 0

    def close(self) -> None:
        self._stop()
        super().close()

    def _stop(self) -> None:
        if isinstance(self._pieces, Generator):
            self._pieces.close()
