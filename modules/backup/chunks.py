"""Chunks: how a piece of a file is named and stored, and a bounded pipeline to store or
fetch many.

A chunk's id is HMAC-SHA256 (hex) of its plaintext under the repository's dedupe key (a
random key kept sealed in the repository's `config`), so the same bytes are stored once
however many files and snapshots hold them, while someone who sees the object names cannot
test them against the hash of a file they hold. The object `chunks/<id[:2]>/<id>` is
`Keyring.encrypt(flag ‖ payload)` with associated data `"circles-backup-chunk\\0" ‖ id`: an
object copied under another id fails to open instead of restoring the wrong bytes. The flag
says whether the payload is the raw bytes (0) or zlib-compressed (1).
"""

from __future__ import annotations

import hmac
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from appliance.security.crypto import DecryptionError, Keyring
from appliance.storage.base import StorageCorrupt

CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 64 << 20  # also what a chunk may inflate to when it is read back
CHUNKS = "chunks/"
AAD = b"circles-backup-chunk\x00"
RAW, ZLIB = 0, 1
# Level 1: on log-like text it runs at ~130 MB/s and keeps 36 % of the input; level 6 keeps
# 29 % at ~33 MB/s, slower than the uploads it would shorten (measured on the build machine).
LEVEL = 1
MIN_SAVING = 0.03  # compressed unless it saves less than this: then reading it back costs nothing
_PROBE = 8 * 1024  # four slices of this size, spread over the chunk, are compressed first
_ID_LENGTH = 64
_HEX = frozenset("0123456789abcdef")
# A sealed object starts with magic, version, key-id length, key id (<= 32), wrapped key (60).
HEADER_BYTES = 128

T = TypeVar("T")
R = TypeVar("R")


def chunk_key(cid: str) -> str:
    return f"{CHUNKS}{cid[:2]}/{cid}"


def is_chunk_id(text: str) -> bool:
    return len(text) == _ID_LENGTH and _HEX.issuperset(text)


def id_of(key: str) -> str | None:
    """The chunk id of an object key under `chunks/`, or None for anything else there."""
    cid = key.rsplit("/", 1)[-1]
    if is_chunk_id(cid) and key == chunk_key(cid):
        return cid
    return None


def open_sealed(keyring: Keyring, blob: bytes, aad: bytes, what: str) -> bytes:
    """The plaintext of a sealed object (`what` names it in errors). DecryptionError only when
    a key this keyring lacks sealed it (a replaced keyring: nothing of the repository will
    open); StorageCorrupt when it is not a sealed object or fails authentication."""
    try:
        key_id = keyring.key_id_of(blob)
    except DecryptionError as exc:
        raise StorageCorrupt(f"{what}: {exc}") from None
    try:
        keyring.info(key_id)
    except DecryptionError as exc:
        raise DecryptionError(f"{what}: {exc}") from None
    try:
        return keyring.decrypt(blob, aad)
    except DecryptionError as exc:
        raise StorageCorrupt(f"{what}: {exc}") from None


def _worth_compressing(data: bytes) -> bool:
    """Whether compressing `data` is likely to save MIN_SAVING: media and archives (most of
    a home's bytes) do not compress, and deflating random bytes runs at ~50 MB/s, slower than
    sending them; a probe of 32 KiB decides for the whole chunk."""
    if len(data) <= 4 * _PROBE:
        return True
    step = len(data) // 4
    probe = b"".join(data[i * step:i * step + _PROBE] for i in range(4))
    return len(zlib.compress(probe, LEVEL)) <= len(probe) * (1 - MIN_SAVING)


class Codec:
    """Names, seals and opens the chunks of one repository (its dedupe key, a keyring)."""

    def __init__(self, keyring: Keyring, dedupe_key: bytes) -> None:
        self.keyring = keyring
        self._dedupe_key = dedupe_key

    def __repr__(self) -> str:  # never the key
        return f"Codec(keyring={self.keyring!r})"

    def chunk_id(self, data: bytes) -> str:
        return hmac.digest(self._dedupe_key, data, "sha256").hex()

    def seal(self, cid: str, data: bytes) -> bytes:
        """The stored form of the chunk `data` whose id is `cid`."""
        if _worth_compressing(data):
            packed = zlib.compress(data, LEVEL)
            if len(packed) <= len(data) * (1 - MIN_SAVING):
                return self.keyring.encrypt(bytes([ZLIB]) + packed, AAD + cid.encode())
        return self.keyring.encrypt(bytes([RAW]) + data, AAD + cid.encode())

    def unseal(self, cid: str, blob: bytes) -> bytes:
        """The plaintext of a stored chunk, checked against its id. DecryptionError if a key
        this keyring lacks sealed it; StorageCorrupt if it does not open (a modified or
        moved object) or what opens is not the bytes its id names."""
        body = open_sealed(self.keyring, blob, AAD + cid.encode(), f"chunk {cid}")
        flag, payload = body[:1], body[1:]
        if flag == bytes([RAW]):
            data = payload
        elif flag == bytes([ZLIB]):
            inflate = zlib.decompressobj()
            try:
                data = inflate.decompress(payload, MAX_CHUNK_SIZE)
            except zlib.error as exc:
                raise StorageCorrupt(f"chunk {cid}: does not decompress ({exc})") from None
            if inflate.unconsumed_tail or not inflate.eof:
                raise StorageCorrupt(f"chunk {cid}: inflates beyond {MAX_CHUNK_SIZE} bytes or is cut")
        else:
            raise StorageCorrupt(f"chunk {cid}: unknown format flag {body[:1]!r}")
        if not hmac.compare_digest(self.chunk_id(data), cid):
            raise StorageCorrupt(f"chunk {cid}: content does not match its id")
        return data


def ordered_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T],
                window: int) -> Iterator[R]:
    """`fn` over `items` in `pool`, results in the order of `items`, with at most `window`
    items taken from `items` and not yet handed back: memory stays bounded by the window
    while up to the pool's size of them are worked on at once. An exception of `fn` is
    raised here, at its item; the items after it are cancelled."""
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
