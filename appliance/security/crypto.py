"""Authenticated encryption at rest: a keyring of key-encryption keys and envelope encryption.

Every object gets its own random 256-bit data key; the data is sealed with AES-256-GCM under
that key, and the data key is itself sealed (wrapped) with AES-256-GCM under the keyring's
current key-encryption key (KEK). The KEK id travels with every ciphertext, so after
`rotate()` new data uses the new key while old data still decrypts, and `rewrap()` moves an
object to the current key by re-sealing only its 32-byte data key.

Only authenticated modes exist here: a modified, truncated or mislabelled ciphertext is
refused with `DecryptionError`, never decrypted into garbage (docs/encryption.md says why).
Files of any size go through `encrypt_chunks`/`decrypt_chunks` (or their file-to-file
forms `encrypt_stream`/`decrypt_stream`) in fixed-size chunks, with constant memory, under the
same keyring.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets as _random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.errors import CirclesError, OperationalError
from appliance.files import flocked, private_dir, tighten, write_atomically

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
WRAPPED_KEY_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES

BLOB_MAGIC = b"CIRB"
BLOB_VERSION = 1
KEYRING_CREDENTIAL = "circles-keyring"  # the name a systemd unit gives LoadCredential=
_BLOB_AD = b"circles-blob-v1\x00"  # prefixed to the caller's associated data

STREAM_MAGIC = b"CIRS"
STREAM_VERSION = 1
CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
_PREFIX_BYTES = 7  # nonce = prefix 7 ‖ chunk counter 4 ‖ final flag 1
_MAX_CHUNKS = 2**32

_KEY_ID = re.compile(r"[a-z0-9]{1,32}")
AUTH_FAILED = "authentication failed: wrong key, wrong associated data, or the data was modified"


class DecryptionError(CirclesError):
    """A ciphertext could not be opened: not ours, an unknown key, or it fails authentication."""


def keyring_path(state_dir: Path) -> Path:
    """Where the state directory's keyring file is (whether or not it exists)."""
    return state_dir / "keys" / "keyring.json"


@dataclass(frozen=True)
class KeyInfo:
    id: str
    created: str
    key: bytes = field(repr=False)  # a repr may end up in a log line


class Keyring:
    """Key-encryption keys by id, one of them current.

    Stored at `<state_dir>/keys/keyring.json` (directory 0700, file 0600), or read-only from
    `$CREDENTIALS_DIRECTORY/circles-keyring` when systemd provides it.
    """

    def __init__(self, keys: list[KeyInfo], current: str, *, path: Path,
                 read_only: bool = False) -> None:
        if current not in {k.id for k in keys}:
            raise OperationalError(f"keyring: the current key {current} is not in the keyring")
        self._keys = {k.id: k for k in keys}
        self._current = current
        self.path = path
        self.read_only = read_only

    def __repr__(self) -> str:
        return f"Keyring(current={self._current!r}, ids={self.ids!r}, path={self.path})"

    # -- loading and saving -----------------------------------------------------------------
    @classmethod
    def load_or_create(cls, state_dir: Path) -> Keyring:
        """The box's keyring: systemd's credential if present, else the state directory's file,
        created with one fresh key the first time (two processes racing get the same one)."""
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if credentials and (Path(credentials) / KEYRING_CREDENTIAL).is_file():
            path = Path(credentials) / KEYRING_CREDENTIAL
            return cls._parse(path.read_bytes(), path, read_only=True)
        path = keyring_path(state_dir)
        for _ in range(3):
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                pass
            else:
                # Made by hand or by an older version: nobody else may read the keys.
                tighten(path.parent, 0o700)
                tighten(path, 0o600)
                return cls._parse(raw, path)
            private_dir(path.parent)
            first = KeyInfo(_new_id(set()), _now(), _random.token_bytes(KEY_BYTES))
            keyring = cls([first], first.id, path=path)
            if keyring._save(exclusive=True):
                return keyring
            # Another process's keyring got there first; the next pass reads it.
        raise OperationalError(f"keyring: {path} could not be read or created")

    @classmethod
    def _parse(cls, raw: bytes, path: Path, *, read_only: bool = False) -> Keyring:
        try:
            doc = json.loads(raw)
            keys = [KeyInfo(str(k["id"]), str(k["created"]), base64.b64decode(k["key"], validate=True))
                    for k in doc["keys"]]
            current = str(doc["current"])
        except (ValueError, KeyError, TypeError) as exc:
            raise OperationalError(f"keyring: {path} is not a valid keyring ({type(exc).__name__})") from None
        for k in keys:
            if not _KEY_ID.fullmatch(k.id) or len(k.key) != KEY_BYTES:
                raise OperationalError(f"keyring: {path} has a malformed key {k.id!r}")
        return cls(keys, current, path=path, read_only=read_only)

    def _save(self, *, exclusive: bool = False) -> bool:
        """Write the file atomically. With `exclusive`, only if no keyring exists yet; returns
        False when another process's keyring was there first."""
        text = json.dumps({"version": 1, "current": self._current, "keys": [
            {"id": k.id, "created": k.created, "key": base64.b64encode(k.key).decode()}
            for k in self._keys.values()]}, indent=2) + "\n"
        try:
            write_atomically(self.path, lambda out: out.write(text.encode()), exclusive=exclusive)
        except FileExistsError:
            return False
        return True

    def reload(self) -> None:
        """Pick up keys another process added (a `rotate` while this one was running)."""
        fresh = self._parse(self.path.read_bytes(), self.path, read_only=self.read_only)
        self._keys, self._current = fresh._keys, fresh._current

    # -- keys -------------------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        return list(self._keys)

    @property
    def current_id(self) -> str:
        return self._current

    def info(self, key_id: str) -> KeyInfo:
        """The key `key_id` (its bytes stay out of its repr)."""
        return self._key(key_id)

    def rotate(self) -> str:
        """Add a fresh key and make it current; persisted before this returns. Old keys stay, so
        old data still decrypts. Returns the new key's id."""
        if self.read_only:
            raise OperationalError(f"keyring: {self.path} comes from systemd "
                                   "credentials and is read-only; rotate the keyring where it is "
                                   "provisioned")
        with flocked(self.path.with_name("keyring.lock")):
            self.reload()  # under the lock, so two rotations both land
            new = KeyInfo(_new_id(set(self._keys)), _now(), _random.token_bytes(KEY_BYTES))
            self._keys[new.id] = new
            self._current = new.id
            self._save()
        return new.id

    def _key(self, key_id: str) -> KeyInfo:
        if key_id not in self._keys:
            try:
                self.reload()
            except (OSError, OperationalError):
                pass
        if key_id not in self._keys:
            raise DecryptionError(f"unknown key id {key_id} (was the keyring replaced?)")
        return self._keys[key_id]

    # -- envelope encryption ----------------------------------------------------------------
    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """Seal `plaintext` with a fresh data key; `aad` is authenticated but not stored, and the
        same `aad` must be given to `decrypt`. The result names the key that wraps its data key.

        Layout: magic "CIRB", version 1, key-id length, key id (ASCII), wrapped data key
        (nonce 12 + key 32 + tag 16), nonce 12, ciphertext with its 16-byte tag."""
        data_key, head = self._new_data_key(BLOB_MAGIC, BLOB_VERSION)
        nonce = _random.token_bytes(NONCE_BYTES)
        return head + nonce + AESGCM(data_key).encrypt(nonce, plaintext, _BLOB_AD + aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext of a blob from `encrypt`, or `DecryptionError` (never partial data)."""
        data_key, end = self._open_data_key(blob, BLOB_MAGIC, BLOB_VERSION)
        body = blob[end:]
        if len(body) < NONCE_BYTES + TAG_BYTES:
            raise DecryptionError("not a Circles ciphertext (too short)")
        try:
            return AESGCM(data_key).decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], _BLOB_AD + aad)
        except InvalidTag:
            raise DecryptionError(AUTH_FAILED) from None

    def rewrap(self, blob: bytes) -> bytes:
        """The same blob with its data key wrapped by the current key (the data itself is not
        touched, so this is cheap). A blob already on the current key is returned as is."""
        if self.key_id_of(blob) == self._current:
            return blob
        data_key, end = self._open_data_key(blob, BLOB_MAGIC, BLOB_VERSION)
        return self._wrap(data_key, BLOB_MAGIC, BLOB_VERSION) + blob[end:]

    def key_id_of(self, blob: bytes) -> str:
        """Which key-encryption key a blob needs (no decryption)."""
        return _parse_header(blob, BLOB_MAGIC, BLOB_VERSION)[0]

    # -- data keys, shared with the stream format -------------------------------------------
    def _new_data_key(self, magic: bytes, version: int) -> tuple[bytes, bytes]:
        """A fresh data key and the header that carries it wrapped by the current KEK."""
        data_key = AESGCM.generate_key(bit_length=256)
        return data_key, self._wrap(data_key, magic, version)

    def _wrap(self, data_key: bytes, magic: bytes, version: int) -> bytes:
        kek = self._keys[self._current]
        kid = kek.id.encode("ascii")
        start = magic + bytes([version, len(kid)]) + kid
        nonce = _random.token_bytes(NONCE_BYTES)
        # The wrap is bound to the start of the header, so a key id cannot be swapped.
        return start + nonce + AESGCM(kek.key).encrypt(nonce, data_key, start)

    def _open_data_key(self, blob: bytes, magic: bytes, version: int) -> tuple[bytes, int]:
        """The data key of a blob or stream header, and where its wrapped key ends."""
        key_id, start = _parse_header(blob, magic, version)
        wrapped = blob[start:start + WRAPPED_KEY_BYTES]
        try:
            data_key = AESGCM(self._key(key_id).key).decrypt(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], blob[:start])
        except InvalidTag:
            raise DecryptionError(AUTH_FAILED) from None
        return data_key, start + WRAPPED_KEY_BYTES


def _parse_header(blob: bytes, magic: bytes, version: int) -> tuple[str, int]:
    """The key id of a blob or stream header and where its wrapped data key starts."""
    if len(blob) < len(magic) + 2 or not blob.startswith(magic):
        raise DecryptionError("not a Circles ciphertext")
    if blob[len(magic)] != version:
        raise DecryptionError(f"unsupported Circles ciphertext version {blob[len(magic)]}")
    start = len(magic) + 2 + blob[len(magic) + 1]
    if len(blob) < start + WRAPPED_KEY_BYTES:
        raise DecryptionError("not a Circles ciphertext (too short)")
    key_id = blob[len(magic) + 2:start].decode("ascii", errors="replace")
    if not _KEY_ID.fullmatch(key_id):
        raise DecryptionError("not a Circles ciphertext (bad key id)")
    return key_id, start


# -- streams ---------------------------------------------------------------------------------
def encrypt_chunks(src: BinaryIO, keyring: Keyring, aad: bytes, *,
                   chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The encrypted stream of everything `src` yields, piece by piece: the header, then each
    sealed chunk, reading `src` only as pieces are asked for (two chunks in memory at most).
    `aad` is needed again to decrypt.

    Layout: magic "CIRS", version 1, key-id length, key id, wrapped data key (60), nonce
    prefix (7), chunk size (4, big-endian); then chunks of `chunk_size` bytes + 16-byte tag,
    the last one shorter or equal (an empty input is one empty final chunk). Chunk `i` uses
    nonce prefix ‖ i (4 bytes) ‖ final flag (1 byte) and the whole header + `aad` as
    associated data, so a modified, reordered, dropped, truncated or appended chunk fails."""
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be 1..{MAX_CHUNK_SIZE}")
    data_key, head = keyring._new_data_key(STREAM_MAGIC, STREAM_VERSION)
    prefix = _random.token_bytes(_PREFIX_BYTES)
    header = head + prefix + chunk_size.to_bytes(4, "big")
    aead, ad = AESGCM(data_key), header + aad
    yield header
    index = 0
    chunk = _read_full(src, chunk_size)
    while True:
        # Read one chunk ahead: only then is it known whether this one is the final chunk.
        following = _read_full(src, chunk_size) if len(chunk) == chunk_size else b""
        yield aead.encrypt(_nonce(prefix, index, not following), chunk, ad)
        if not following:
            return
        chunk, index = following, index + 1


def decrypt_chunks(src: BinaryIO, keyring: Keyring, aad: bytes) -> Iterator[bytes]:
    """The plaintext of a stream from `encrypt_chunks`, chunk by chunk, each given only after
    it authenticates. A failure at chunk `i` raises `DecryptionError` naming `i` after the
    chunks before it were given: a caller that must not keep part of a damaged stream writes
    to a temporary file and keeps it only on success, as `decrypt_file` does."""
    start = _read_full(src, len(STREAM_MAGIC) + 2)
    kid = _read_full(src, start[-1]) if len(start) == len(STREAM_MAGIC) + 2 else b""
    header = start + kid + _read_full(src, WRAPPED_KEY_BYTES + _PREFIX_BYTES + 4)
    data_key, end = keyring._open_data_key(header, STREAM_MAGIC, STREAM_VERSION)
    if len(header) != end + _PREFIX_BYTES + 4:
        raise DecryptionError("truncated: the stream header is incomplete")
    prefix, chunk_size = header[end:end + _PREFIX_BYTES], int.from_bytes(header[-4:], "big")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise DecryptionError("not a Circles ciphertext (bad chunk size)")
    aead, ad, size = AESGCM(data_key), header + aad, chunk_size + TAG_BYTES
    index = 0
    chunk = _read_full(src, size)
    while True:
        following = _read_full(src, size) if len(chunk) == size else b""
        yield _open_chunk(aead, prefix, index, chunk, ad, final=not following)
        if not following:
            return
        chunk, index = following, index + 1


def encrypt_stream(src: BinaryIO, dst: BinaryIO, keyring: Keyring, aad: bytes, *,
                   chunk_size: int = CHUNK_SIZE) -> int:
    """`encrypt_chunks` written into `dst`; returns the bytes written."""
    written = 0
    for piece in encrypt_chunks(src, keyring, aad, chunk_size=chunk_size):
        dst.write(piece)
        written += len(piece)
    return written


def decrypt_stream(src: BinaryIO, dst: BinaryIO, keyring: Keyring, aad: bytes) -> int:
    """`decrypt_chunks` written into `dst`; returns the plaintext bytes written. A failure
    leaves the chunks before it in `dst` (see `decrypt_chunks`)."""
    written = 0
    for plain in decrypt_chunks(src, keyring, aad):
        dst.write(plain)
        written += len(plain)
    return written


def plaintext_size(stored: int, key_id: str, chunk_size: int) -> int:
    """The plaintext size of a stream of `stored` bytes from `encrypt_chunks` under the key
    `key_id` with `chunk_size`: the overhead is fixed (the header, a tag per chunk, and at
    least one, possibly empty, chunk), so no byte of it needs to be read."""
    header = len(STREAM_MAGIC) + 2 + len(key_id) + WRAPPED_KEY_BYTES + _PREFIX_BYTES + 4
    body = stored - header
    chunks = max(1, -(-body // (chunk_size + TAG_BYTES)))
    return max(0, body - chunks * TAG_BYTES)


def _open_chunk(aead: AESGCM, prefix: bytes, index: int, chunk: bytes, ad: bytes, *,
                final: bool) -> bytes:
    if len(chunk) < TAG_BYTES:
        raise DecryptionError(f"truncated: chunk {index} is incomplete or missing")
    try:
        return aead.decrypt(_nonce(prefix, index, final), chunk, ad)
    except InvalidTag:
        pass
    try:  # only to say what happened: does the chunk open with the other final flag?
        aead.decrypt(_nonce(prefix, index, not final), chunk, ad)
    except InvalidTag:
        raise DecryptionError(f"chunk {index}: {AUTH_FAILED}, reordered or cut") from None
    if final:
        raise DecryptionError(f"truncated: the stream ends after chunk {index}, which is not "
                              "the final chunk")
    raise DecryptionError(f"data follows the final chunk {index} (appended or reordered)")


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    if index >= _MAX_CHUNKS:
        raise OperationalError(f"stream too long: more than {_MAX_CHUNKS} chunks")
    return prefix + index.to_bytes(4, "big") + (b"\x01" if final else b"\x00")


def _read_full(src: BinaryIO, size: int) -> bytes:
    """Exactly `size` bytes, fewer only at the end (a pipe may return short reads before it)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        piece = src.read(size - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def encrypt_file(src: Path, dst: Path, keyring: Keyring, aad: bytes, *,
                 chunk_size: int = CHUNK_SIZE) -> int:
    """`encrypt_stream` from file to file; `dst` (mode 0600) appears only once complete."""
    with open(src, "rb") as source:
        return write_atomically(dst, lambda out: encrypt_stream(source, out, keyring, aad,
                                                                 chunk_size=chunk_size))


def decrypt_file(src: Path, dst: Path, keyring: Keyring, aad: bytes) -> int:
    """`decrypt_stream` from file to file; `dst` (mode 0600) appears only if every chunk
    authenticated, so a damaged backup never leaves a partial restore behind."""
    with open(src, "rb") as source:
        return write_atomically(dst, lambda out: decrypt_stream(source, out, keyring, aad))


def _new_id(taken: set[str]) -> str:
    # Random, not k1/k2/…: a keyring made afresh can never reuse an id of a lost one, so old
    # data then fails with "unknown key id" rather than a puzzling authentication failure.
    while True:
        candidate = "k" + _random.token_hex(4)
        if candidate not in taken:
            return candidate


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

