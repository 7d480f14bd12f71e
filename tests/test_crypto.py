"""The keyring and AES-256-GCM: round trips, every kind of damage refused with a clear error,
rotation that keeps old data readable, and streams in constant memory."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import CirclesError, OperationalError
from appliance.security.crypto import (
    KEYRING_CREDENTIAL,
    TAG_BYTES,
    DecryptionError,
    KeyInfo,
    Keyring,
    decrypt_file,
    decrypt_stream,
    encrypt_file,
    encrypt_stream,
    keyring_path,
)


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    return Keyring.load_or_create(tmp_path_factory.mktemp("state"))


def seal(keyring: Keyring, data: bytes, aad: bytes, chunk_size: int) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, keyring, aad, chunk_size=chunk_size)
    return out.getvalue()


def unseal(keyring: Keyring, stream: bytes, aad: bytes) -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(stream), out, keyring, aad)
    return out.getvalue()


def chunks_of(keyring: Keyring, stream: bytes, chunk_size: int) -> tuple[bytes, list[bytes]]:
    """The header and the sealed chunks of a stream (its layout is documented)."""
    header_size = 4 + 1 + 1 + len(keyring.current_id) + 60 + 7 + 4
    body, size = stream[header_size:], chunk_size + TAG_BYTES
    return stream[:header_size], [body[i:i + size] for i in range(0, len(body), size)]


class Trickle(io.RawIOBase):
    """A source that returns at most `step` bytes per read, like a pipe."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.pos = data, step, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        piece = self.data[self.pos:self.pos + min(self.step, size if size >= 0 else self.step)]
        self.pos += len(piece)
        return piece


# -- round trips --------------------------------------------------------------------------------
@given(data=st.binary(max_size=4096), aad=st.binary(max_size=64))
def test_blob_round_trip(keyring: Keyring, data: bytes, aad: bytes) -> None:
    blob = keyring.encrypt(data, aad)
    assert keyring.decrypt(blob, aad) == data
    assert keyring.key_id_of(blob) == keyring.current_id
    if len(data) >= 8:
        assert data not in blob


@given(data=st.binary(max_size=3000), aad=st.binary(max_size=32), chunk_size=st.integers(1, 300),
       step=st.integers(1, 400))
@settings(max_examples=150)
def test_stream_round_trip_any_length_and_chunk_size(keyring: Keyring, data: bytes, aad: bytes,
                                                     chunk_size: int, step: int) -> None:
    out = io.BytesIO()
    encrypt_stream(Trickle(data, step), out, keyring, aad, chunk_size=chunk_size)
    stream = out.getvalue()
    _, chunks = chunks_of(keyring, stream, chunk_size)
    assert len(chunks) == max(1, -(-len(data) // chunk_size))  # an empty input is one chunk
    back = io.BytesIO()
    assert decrypt_stream(Trickle(stream, step), back, keyring, aad) == len(data)
    assert back.getvalue() == data


def test_two_encryptions_of_the_same_data_differ(keyring: Keyring) -> None:
    assert keyring.encrypt(b"same", b"") != keyring.encrypt(b"same", b"")
    assert seal(keyring, b"same", b"", 4) != seal(keyring, b"same", b"", 4)


# -- damage ---------------------------------------------------------------------------------------
@given(data=st.binary(max_size=200), where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_flipping_any_bit_of_a_blob_is_detected(keyring: Keyring, data: bytes, where: float,
                                                mask: int) -> None:
    blob = bytearray(keyring.encrypt(data, b"ad"))
    blob[int(where * len(blob))] ^= mask
    with pytest.raises(DecryptionError):
        keyring.decrypt(bytes(blob), b"ad")


@given(data=st.binary(max_size=600), where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_flipping_any_bit_of_a_stream_is_detected(keyring: Keyring, data: bytes, where: float,
                                                  mask: int) -> None:
    stream = bytearray(seal(keyring, data, b"ad", 64))
    stream[int(where * len(stream))] ^= mask
    with pytest.raises(DecryptionError):
        unseal(keyring, bytes(stream), b"ad")


@given(data=st.binary(max_size=300), cut=st.floats(0, 1, exclude_max=True))
def test_any_truncation_of_a_blob_or_stream_is_detected(keyring: Keyring, data: bytes,
                                                        cut: float) -> None:
    blob = keyring.encrypt(data, b"")
    with pytest.raises(DecryptionError):
        keyring.decrypt(blob[:int(cut * len(blob))], b"")
    stream = seal(keyring, data, b"", 32)
    with pytest.raises(DecryptionError):
        unseal(keyring, stream[:int(cut * len(stream))], b"")


def test_stream_truncation_reordering_and_appending_are_named(keyring: Keyring) -> None:
    data = os.urandom(5 * 100 + 30)
    stream = seal(keyring, data, b"backup", 100)
    header, chunks = chunks_of(keyring, stream, 100)
    assert len(chunks) == 6 and unseal(keyring, stream, b"backup") == data

    def fails(parts: list[bytes], expected: str) -> None:
        with pytest.raises(DecryptionError, match=expected):
            unseal(keyring, header + b"".join(parts), b"backup")

    fails(chunks[:-1], "truncated: the stream ends after chunk 4, which is not the final chunk")
    fails(chunks[:3], "truncated: the stream ends after chunk 2")
    fails(chunks[:-1] + [chunks[-1][:10]], "truncated: chunk 5 is incomplete")
    fails([], "truncated: chunk 0 is incomplete or missing")
    fails(chunks[:-1] + [chunks[-1][:-1]], "chunk 5: authentication failed")
    fails([chunks[1], chunks[0], *chunks[2:]], "chunk 0: authentication failed")
    fails([chunks[0], *chunks[2:]], "chunk 1: authentication failed")
    fails(chunks + [chunks[-1]], "chunk 5: authentication failed")  # the short final no longer ends it
    with pytest.raises(DecryptionError, match="stream header is incomplete"):
        unseal(keyring, header[:-2], b"backup")

    whole = seal(keyring, b"x" * 200, b"backup", 100)  # a final chunk of full size
    header2, two = chunks_of(keyring, whole, 100)
    with pytest.raises(DecryptionError, match="data follows the final chunk 1"):
        unseal(keyring, header2 + two[0] + two[1] + two[0], b"backup")
    with pytest.raises(DecryptionError, match="truncated"):
        unseal(keyring, header2 + two[0], b"backup")


def test_a_stream_chunk_of_another_stream_is_refused(keyring: Keyring) -> None:
    a, b = seal(keyring, b"a" * 50, b"", 10), seal(keyring, b"b" * 50, b"", 10)
    header, chunks = chunks_of(keyring, a, 10)
    _, others = chunks_of(keyring, b, 10)
    with pytest.raises(DecryptionError, match="chunk 2: authentication failed"):
        unseal(keyring, header + b"".join(chunks[:2] + others[2:3] + chunks[3:]), b"")


def test_clear_errors(keyring: Keyring, tmp_path: Path) -> None:
    blob = keyring.encrypt(b"payload", b"right")
    with pytest.raises(DecryptionError, match="^authentication failed: wrong key, wrong associated "
                                              "data, or the data was modified$"):
        keyring.decrypt(blob, b"wrong")
    with pytest.raises(DecryptionError, match="chunk 0: authentication failed"):
        unseal(keyring, seal(keyring, b"payload", b"right", 16), b"wrong")

    stranger = Keyring.load_or_create(tmp_path)
    with pytest.raises(DecryptionError, match=rf"^unknown key id {keyring.current_id} \(was the "
                                              r"keyring replaced\?\)$"):
        stranger.decrypt(blob, b"right")
    with pytest.raises(DecryptionError, match="unknown key id"):
        unseal(stranger, seal(keyring, b"payload", b"", 16), b"")

    # The same id with other key bytes: a keyring restored from the wrong copy.
    impostor = Keyring([KeyInfo(keyring.current_id, "2020-01-01T00:00:00Z", os.urandom(32))],
                       keyring.current_id, path=tmp_path / "other.json")
    with pytest.raises(DecryptionError, match="^authentication failed"):
        impostor.decrypt(blob, b"right")

    for junk in (b"", b"hello world", os.urandom(200), b"CIRB"):
        with pytest.raises(DecryptionError, match="not a Circles ciphertext"):
            keyring.decrypt(junk, b"")
    with pytest.raises(DecryptionError, match="unsupported Circles ciphertext version 9"):
        keyring.decrypt(blob[:4] + b"\x09" + blob[5:], b"right")
    with pytest.raises(DecryptionError, match="not a Circles ciphertext"):
        unseal(keyring, blob, b"right")  # a blob is not a stream
    assert issubclass(DecryptionError, CirclesError)
    with pytest.raises(ValueError):
        seal(keyring, b"", b"", 0)


# -- the keyring ----------------------------------------------------------------------------------
def test_keyring_file_is_private_and_reloads(tmp_path: Path) -> None:
    keyring = Keyring.load_or_create(tmp_path)
    path = keyring_path(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert {p.name for p in path.parent.iterdir()} <= {"keyring.json", "keyring.lock"}
    again = Keyring.load_or_create(tmp_path)
    assert again.ids == keyring.ids and again.current_id == keyring.current_id
    blob = keyring.encrypt(b"x", b"")
    assert again.decrypt(blob, b"") == b"x"


def test_a_keyring_left_readable_to_others_is_made_private_on_load(tmp_path: Path) -> None:
    keyring = Keyring.load_or_create(tmp_path)
    path = keyring_path(tmp_path)
    path.parent.chmod(0o755)  # as made by hand, or by an older version
    path.chmod(0o644)
    assert Keyring.load_or_create(tmp_path).ids == keyring.ids
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700


def test_rotation_keeps_old_data_readable_and_new_data_uses_the_new_key(tmp_path: Path) -> None:
    keyring = Keyring.load_or_create(tmp_path)
    elsewhere = Keyring.load_or_create(tmp_path)  # another process, loaded before the rotation
    first = keyring.current_id
    old_blob, old_stream = keyring.encrypt(b"old", b"a"), seal(keyring, b"old stream", b"a", 4)
    new = keyring.rotate()
    assert new != first and keyring.current_id == new and keyring.ids == [first, new]
    new_blob = keyring.encrypt(b"new", b"a")
    assert keyring.key_id_of(new_blob) == new and keyring.key_id_of(old_blob) == first
    assert keyring.decrypt(old_blob, b"a") == b"old" and unseal(keyring, old_stream, b"a") == b"old stream"
    assert elsewhere.decrypt(new_blob, b"a") == b"new"  # it picks up the new key from the file
    reloaded = Keyring.load_or_create(tmp_path)
    assert reloaded.current_id == new and reloaded.decrypt(old_blob, b"a") == b"old"

    moved = keyring.rewrap(old_blob)
    assert keyring.key_id_of(moved) == new and keyring.decrypt(moved, b"a") == b"old"
    assert moved[-(12 + 3 + TAG_BYTES):] == old_blob[-(12 + 3 + TAG_BYTES):]  # data not re-encrypted
    assert keyring.rewrap(moved) is moved


def test_keyring_and_keys_keep_key_bytes_out_of_repr(tmp_path: Path) -> None:
    keyring = Keyring.load_or_create(tmp_path)
    keyring.rotate()
    doc = json.loads(keyring_path(tmp_path).read_text())
    shown = repr(keyring) + str(keyring) + "".join(repr(keyring.info(i)) for i in keyring.ids)
    for k in doc["keys"]:
        raw = base64.b64decode(k["key"])
        assert k["key"] not in shown and raw.hex() not in shown and repr(raw) not in shown
        assert k["id"] in shown


_RACE = """
import sys
from pathlib import Path
from appliance.security.crypto import Keyring
keyring = Keyring.load_or_create(Path(sys.argv[1]))
if sys.argv[2] == "rotate":
    keyring.rotate()
print(keyring.ids[0])
"""


def test_processes_racing_share_one_keyring_and_every_rotation_lands(tmp_path: Path) -> None:
    def race(what: str) -> list[str]:
        procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path), what],
                                  stdout=subprocess.PIPE, text=True) for _ in range(6)]
        return [p.communicate(timeout=60)[0].strip() for p in procs]

    first = race("load")
    assert len(set(first)) == 1 and first[0]
    race("rotate")
    keyring = Keyring.load_or_create(tmp_path)
    assert keyring.ids[0] == first[0] and len(keyring.ids) == 7


def test_a_keyring_from_systemd_credentials_is_used_read_only(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    keyring = Keyring.load_or_create(tmp_path / "provisioned")
    blob = keyring.encrypt(b"x", b"")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / KEYRING_CREDENTIAL).write_bytes(keyring_path(tmp_path / "provisioned").read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    state = tmp_path / "state"
    from_systemd = Keyring.load_or_create(state)
    assert from_systemd.read_only and from_systemd.decrypt(blob, b"") == b"x"
    assert not keyring_path(state).exists()
    with pytest.raises(OperationalError, match="read-only"):
        from_systemd.rotate()


def test_a_damaged_keyring_file_is_a_clear_error(tmp_path: Path) -> None:
    Keyring.load_or_create(tmp_path)
    keyring_path(tmp_path).write_text("{not json")
    with pytest.raises(OperationalError, match="is not a valid keyring"):
        Keyring.load_or_create(tmp_path)


# -- files and memory -----------------------------------------------------------------------------
def test_files_appear_only_when_complete_and_authentic(keyring: Keyring, tmp_path: Path) -> None:
    plain, sealed, restored = tmp_path / "db.sqlite", tmp_path / "db.enc", tmp_path / "restored"
    plain.write_bytes(os.urandom(300_000))
    encrypt_file(plain, sealed, keyring, b"backup:1")
    assert sealed.stat().st_mode & 0o777 == 0o600
    assert decrypt_file(sealed, restored, keyring, b"backup:1") == 300_000
    assert restored.read_bytes() == plain.read_bytes()

    restored.unlink()
    damaged = bytearray(sealed.read_bytes())
    damaged[-100] ^= 1  # in the last chunk: every chunk before it decrypts fine
    sealed.write_bytes(bytes(damaged))
    with pytest.raises(DecryptionError, match="chunk 4"):
        decrypt_file(sealed, restored, keyring, b"backup:1")
    assert not restored.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.enc", "db.sqlite"]  # no temp left


class Pattern(io.RawIOBase):
    """`size` bytes made up on the fly, so the input itself takes no memory."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = bytes(range(256)) * 1024

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = min(self.left, len(self.block) if n < 0 else n, len(self.block))
        self.left -= n
        return self.block[:n]


class Digest(io.RawIOBase):
    """A sink that keeps only a hash and a count of what it was given."""

    def __init__(self) -> None:
        self.hash, self.count = hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.hash.update(data)
        self.count += len(data)
        return len(data)


def test_streams_use_constant_memory(keyring: Keyring, tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    expected = Digest()
    reference = Pattern(size)
    while piece := reference.read(1 << 20):
        expected.write(piece)
    sealed, source = tmp_path / "big.enc", Pattern(size)
    tracemalloc.start()
    try:
        with open(sealed, "wb") as out:
            encrypt_stream(source, out, keyring, b"big")
        _, encrypt_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sink = Digest()
        with open(sealed, "rb") as src:
            decrypt_stream(src, sink, keyring, b"big")
        _, decrypt_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.count == size and sink.hash.digest() == expected.hash.digest()
    assert sealed.stat().st_size > size
    # A few 64 KiB chunks at a time, against 64 MiB of data.
    assert encrypt_peak < 1024 * 1024, encrypt_peak
    assert decrypt_peak < 1024 * 1024, decrypt_peak
