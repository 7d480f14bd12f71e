"""The storage layer: one suite run against every backend (the local disk, S3 through the real
`minio` SDK against moto or a real MinIO, and both under the encryption wrapper); then what
only one of them does: the disk's layout and modes, the wrapper's ciphertext, S3's errors,
signed links and `open_store`."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.config import StoreSettings
from appliance.errors import ConfigError
from appliance.security.crypto import CHUNK_SIZE, STREAM_MAGIC, Keyring
from appliance.security.secrets import write_secret
from appliance.storage import (
    PART_SIZE,
    FileStore,
    NotFound,
    StorageCorrupt,
    StorageDenied,
    StorageUnavailable,
    Store,
    open_store,
)
from appliance.storage.encrypted import KEY_ID, EncryptedStore
from appliance.storage.links import LinkExpired, LinkInvalid, link_secret, sign, verify
from appliance.storage.s3 import S3Store
from appliance.supervisor import free_port
from tests import s3server

BIG = 40 * 1024 * 1024
KINDS = ["fs", "s3", "fs+encrypted", "s3+encrypted"]


@pytest.fixture(autouse=True)
def _no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@dataclass
class Case:
    kind: str
    store: Store
    state: Path
    keyring: Keyring | None = None

    @property
    def inner(self) -> Store:
        return self.store.inner if isinstance(self.store, EncryptedStore) else self.store

    def expected_metadata(self, given: dict[str, str]) -> dict[str, str]:
        return {**given, KEY_ID: self.keyring.current_id} if self.keyring else given


def _open(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    state = tmp_path / "state"
    encrypt = kind.endswith("+encrypted")
    if kind.startswith("s3"):
        server: s3server.S3Server = request.getfixturevalue("s3_server")
        settings = server.settings(state, s3server.fresh_bucket(), encrypt=encrypt)
    else:
        settings = StoreSettings(backend="local", path=tmp_path / "objects", encrypt=encrypt)
    keyring = Keyring.load_or_create(state) if encrypt else None
    store = open_store(settings, state_dir=state, default_path=tmp_path / "unused", keyring=keyring)
    return Case(kind, store, state, keyring)


def _cleanup(case: Case) -> None:
    """Leave nothing behind on a real server."""
    inner = case.inner
    if isinstance(inner, S3Store) and inner.client.bucket_exists(inner.bucket):
        for info in inner.list():
            inner.delete(info.key)
        inner.client.remove_bucket(inner.bucket)
    case.store.close()


@pytest.fixture(params=KINDS)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    opened = _open(request.param, request, tmp_path)
    yield opened
    _cleanup(opened)


@pytest.fixture(params=["fs+encrypted", "s3+encrypted"])
def encrypted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    opened = _open(request.param, request, tmp_path)
    yield opened
    _cleanup(opened)


class Generated(io.RawIOBase):
    """`size` pseudo-random bytes made as they are read (never all in memory), hashed on the
    way; with `fail_at`, raises once that many bytes were given."""

    def __init__(self, size: int, *, seed: int = 7, fail_at: int | None = None) -> None:
        self.left, self.given, self.fail_at = size, 0, fail_at
        self.random = random.Random(seed)
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.fail_at is not None and self.given >= self.fail_at:
            raise RuntimeError("the source broke")
        count = min(len(buffer), self.left, 1024 * 1024)
        data = self.random.randbytes(count)
        buffer[:count] = data
        self.sha256.update(data)
        self.left -= count
        self.given += count
        return count


def _sha256(store: Store, key: str) -> str:
    digest = hashlib.sha256()
    with store.open(key) as src:
        while piece := src.read(1024 * 1024):
            digest.update(piece)
    return digest.hexdigest()


# -- the suite every backend passes --------------------------------------------------------------
def test_put_and_get_bytes(case: Case) -> None:
    info = case.store.put_bytes("notes/today.txt", b"hello")
    assert (info.key, info.size) == ("notes/today.txt", 5)
    assert case.store.get_bytes("notes/today.txt") == b"hello"
    case.store.put_bytes("notes/today.txt", b"replaced, longer")
    assert case.store.get_bytes("notes/today.txt") == b"replaced, longer"
    assert case.store.stat("notes/today.txt").size == len(b"replaced, longer")
    case.store.put_bytes("empty", b"")
    assert case.store.get_bytes("empty") == b"" and case.store.stat("empty").size == 0


def test_large_stream_of_unknown_length(case: Case) -> None:
    # A first put that can be sent again makes the bucket (test_s3_the_first_put_makes_the_bucket).
    case.store.put_bytes("videos/index.txt", b"holiday.mp4")
    source = Generated(BIG)
    info = case.store.put("videos/holiday.mp4", io.BufferedReader(source), content_type="video/mp4")
    assert info.size == BIG and case.store.stat("videos/holiday.mp4").size == BIG
    assert _sha256(case.store, "videos/holiday.mp4") == source.sha256.hexdigest()
    if case.kind.startswith("s3"):  # went up in parts: S3's etag of a multipart upload says how many
        assert case.inner.stat("videos/holiday.mp4").etag.endswith(f"-{-(-BIG // PART_SIZE)}")


def test_list_with_prefix_in_key_order(case: Case) -> None:
    for key in ["b/2", "a/b", "a-c", "a/a", "c", "a/sub/deep"]:
        case.store.put_bytes(key, key.encode())
    listed = list(case.store.list())
    assert [i.key for i in listed] == ["a-c", "a/a", "a/b", "a/sub/deep", "b/2", "c"]
    assert all(i.size == len(i.key) for i in listed)
    assert [i.key for i in case.store.list("a/")] == ["a/a", "a/b", "a/sub/deep"]
    assert [i.key for i in case.store.list("a")] == ["a-c", "a/a", "a/b", "a/sub/deep"]
    assert [i.key for i in case.store.list("a/s")] == ["a/sub/deep"]
    assert list(case.store.list("nothing/")) == []
    assert list(case.store.list("../")) == list(case.store.list("a//")) == []


def test_stat_has_content_type_and_metadata(case: Case) -> None:
    metadata = {"owner": "alice", "content-type": "a name S3 would take for a header"}
    case.store.put_bytes("photos/cat.jpg", b"\xff\xd8jpeg", content_type="image/jpeg", metadata=metadata)
    info = case.store.stat("photos/cat.jpg")
    assert (info.key, info.size, info.content_type) == ("photos/cat.jpg", 6, "image/jpeg")
    assert info.metadata == case.expected_metadata(metadata)
    assert info.modified.tzinfo is not None
    assert abs(info.modified - datetime.now(UTC)) < timedelta(minutes=5)
    assert case.store.exists("photos/cat.jpg") and not case.store.exists("photos/dog.jpg")


def test_delete_is_idempotent(case: Case) -> None:
    case.store.put_bytes("a/b", b"x")
    case.store.delete("a/b")
    case.store.delete("a/b")
    assert not case.store.exists("a/b") and list(case.store.list()) == []


def test_missing_object_is_not_found(case: Case) -> None:
    with pytest.raises(NotFound, match="nope"):
        case.store.get_bytes("nope")
    with pytest.raises(NotFound, match="nope"):
        case.store.stat("nope")
    with pytest.raises(NotFound):
        case.store.open("dir/nope")


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/.", "a\x00b", "tab\there",
                                 "x" * 1025])
def test_invalid_keys_are_refused(case: Case, key: str) -> None:
    for call in (lambda: case.store.put_bytes(key, b"x"), lambda: case.store.get_bytes(key),
                 lambda: case.store.stat(key), lambda: case.store.delete(key)):
        with pytest.raises(ValueError):
            call()
    assert list(case.store.list()) == []


def test_invalid_metadata_is_refused(case: Case) -> None:
    for metadata in ({"Upper": "x"}, {"ok": "caf\u00e9"}, {"ok": "line\nbreak"}):
        with pytest.raises(ValueError):
            case.store.put_bytes("k", b"x", metadata=metadata)
    assert not case.store.exists("k")


def test_a_put_that_fails_midway_changes_nothing(case: Case) -> None:
    case.store.put_bytes("kept", b"the old bytes", metadata={"version": "1"})
    # Past one part, so that S3 has a multipart upload under way when the source breaks.
    for key in ("kept", "fresh"):
        with pytest.raises(RuntimeError, match="the source broke"):
            case.store.put(key, io.BufferedReader(Generated(PART_SIZE * 2, fail_at=PART_SIZE + 1)))
    assert case.store.get_bytes("kept") == b"the old bytes"
    assert case.store.stat("kept").metadata == case.expected_metadata({"version": "1"})
    assert [i.key for i in case.store.list()] == ["kept"]
    assert not case.store.exists("fresh")
    if isinstance(case.inner, S3Store):  # the multipart uploads under way were aborted, not left
        assert case.inner.client._list_multipart_uploads(case.inner.bucket).uploads == []
    if isinstance(case.inner, FileStore):
        assert list((case.inner.root / "tmp").iterdir()) == []


def test_a_stream_of_another_length_than_announced_is_refused(case: Case) -> None:
    case.store.put_bytes("other", b"makes the bucket")
    with pytest.raises(ValueError, match="gave 5 bytes, 10 were announced"):
        case.store.put("short", io.BytesIO(b"12345"), length=10)
    with pytest.raises(ValueError, match="more than the 3 bytes announced"):
        case.store.put("long", io.BytesIO(b"12345"), length=3)
    assert [i.key for i in case.store.list()] == ["other"]


def test_presigned_link(case: Case) -> None:
    case.store.put_bytes("share/report.pdf", b"%PDF-1.7 report")
    url = case.store.presigned_get("share/report.pdf", timedelta(minutes=5))
    if case.kind != "s3":  # the disk has no URL; encrypted bytes must not be handed out
        assert url is None
        return
    assert url is not None
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"%PDF-1.7 report"


# -- the encryption wrapper ------------------------------------------------------------------------
def test_at_rest_the_bytes_are_ciphertext(encrypted: Case) -> None:
    plaintext = b"my bank statement " * 100
    encrypted.store.put_bytes("private/statement.txt", plaintext)
    stored = encrypted.inner.get_bytes("private/statement.txt")
    assert stored.startswith(STREAM_MAGIC) and b"bank statement" not in stored
    assert encrypted.store.get_bytes("private/statement.txt") == plaintext
    assert encrypted.store.stat("private/statement.txt").metadata[KEY_ID] == encrypted.keyring.current_id  # type: ignore[union-attr]


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 5])
def test_sizes_are_plaintext_sizes(encrypted: Case, size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert encrypted.store.put_bytes("f", data).size == size
    assert encrypted.store.stat("f").size == size
    assert [i.size for i in encrypted.store.list()] == [size]
    assert encrypted.store.get_bytes("f") == data


def test_old_objects_read_after_rotation(encrypted: Case) -> None:
    keyring = encrypted.keyring
    assert keyring is not None
    old = keyring.current_id
    encrypted.store.put_bytes("before", b"written under the first key")
    new = keyring.rotate()
    encrypted.store.put_bytes("after", b"written under the second key")
    assert encrypted.store.get_bytes("before") == b"written under the first key"
    assert encrypted.store.stat("before").metadata[KEY_ID] == old
    assert encrypted.store.stat("after").metadata[KEY_ID] == new != old


def test_an_object_copied_to_another_key_does_not_decrypt(encrypted: Case) -> None:
    encrypted.store.put_bytes("salary.txt", b"secret figures")
    stored = encrypted.inner.get_bytes("salary.txt")
    encrypted.inner.put_bytes("public.txt", stored, metadata=encrypted.inner.stat("salary.txt").metadata)
    with pytest.raises(StorageCorrupt, match="public.txt"):
        encrypted.store.get_bytes("public.txt")


def test_a_flipped_byte_is_corruption_not_data(encrypted: Case) -> None:
    data = random.Random(1).randbytes(3 * CHUNK_SIZE)
    encrypted.store.put_bytes("doc", data)
    stored = bytearray(encrypted.inner.get_bytes("doc"))
    stored[len(stored) // 2] ^= 0x01
    encrypted.inner.put_bytes("doc", bytes(stored), metadata=encrypted.inner.stat("doc").metadata)
    with pytest.raises(StorageCorrupt, match="doc.*does not decrypt"):
        encrypted.store.get_bytes("doc")
    # Read as a stream, the damaged object also ends in the error, never in a short read.
    with pytest.raises(StorageCorrupt), encrypted.store.open("doc") as src:
        while src.read(4096):
            pass


def test_a_truncated_object_is_corruption(encrypted: Case) -> None:
    encrypted.store.put_bytes("doc", random.Random(2).randbytes(2 * CHUNK_SIZE + 10))
    stored = encrypted.inner.get_bytes("doc")
    # Cut after the first chunk: what is left authenticates, chunk by chunk, but is not whole.
    cut = len(stored) - (CHUNK_SIZE + 16) - (10 + 16)
    encrypted.inner.put_bytes("doc", stored[:cut], metadata=encrypted.inner.stat("doc").metadata)
    with pytest.raises(StorageCorrupt, match="doc: does not decrypt: truncated"):
        encrypted.store.get_bytes("doc")


def test_another_keyring_cannot_read(encrypted: Case, tmp_path: Path) -> None:
    encrypted.store.put_bytes("doc", b"for this box only")
    stranger = EncryptedStore(encrypted.inner, Keyring.load_or_create(tmp_path / "another-box"))
    with pytest.raises(StorageCorrupt, match="unknown key id"):
        stranger.get_bytes("doc")


def test_closing_early_stops_the_decryption(encrypted: Case) -> None:
    encrypted.store.put_bytes("big", random.Random(3).randbytes(64 * CHUNK_SIZE))
    with encrypted.store.open("big") as src:
        assert len(src.read(10)) == 10
    # The reader thread ended with the block: the same object opens and reads again.
    assert len(encrypted.store.get_bytes("big")) == 64 * CHUNK_SIZE


def test_reserved_metadata_is_refused(encrypted: Case) -> None:
    with pytest.raises(ValueError, match="reserved"):
        encrypted.store.put_bytes("k", b"x", metadata={KEY_ID: "kforged"})


# In a child process whose files may not grow past 1 MiB (RLIMIT_FSIZE; Python ignores SIGXFSZ,
# so a write past it fails with EFBIG): a disk that fails for real in the middle of a put.
_SMALL_DISK = """
import io, resource, sys
from pathlib import Path
from appliance.security.crypto import Keyring
from appliance.storage.encrypted import EncryptedStore
from appliance.storage.fs import FileStore

store = EncryptedStore(FileStore(Path(sys.argv[1])), Keyring.load_or_create(Path(sys.argv[2])))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    store.put("k", io.BufferedReader(io.BytesIO(bytes(8 << 20))))
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_failing_inner_store_stops_the_encryption(tmp_path: Path) -> None:
    root, state = tmp_path / "objects", tmp_path / "state"
    store = EncryptedStore(FileStore(root), Keyring.load_or_create(state))
    store.put_bytes("k", b"the old bytes")
    child = subprocess.run([sys.executable, "-c", _SMALL_DISK, str(root), str(state)],
                           capture_output=True, text=True, timeout=120, check=True)
    assert child.stdout.startswith("StorageUnavailable") and "File too large" in child.stdout, child
    assert store.get_bytes("k") == b"the old bytes"
    assert list((root / "tmp").iterdir()) == []


# -- the local disk -----------------------------------------------------------------------------
def test_disk_layout_modes_and_what_is_listed(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    store.put_bytes("docs/a.txt", b"a", metadata={"k": "v"})
    with pytest.raises(RuntimeError):
        store.put("docs/b.txt", io.BufferedReader(Generated(3 * 1024 * 1024, fail_at=1)))
    root = tmp_path / "root"
    assert (root / "objects/docs/a.txt").read_bytes() == b"a"
    assert (root / "meta/docs/a.txt").is_file()
    assert list((root / "tmp").iterdir()) == []  # the failed write left nothing
    (root / "tmp" / "leftover.tmp").write_bytes(b"from a killed writer")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/secret").write_bytes(b"not the store's")
    assert [i.key for i in store.list()] == ["docs/a.txt"]
    assert list(store.list("../../outside/")) == [] and list(store.list("docs/../../../")) == []
    for path in [root / "objects/docs/a.txt", root / "meta/docs/a.txt"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for path in [root, root / "objects", root / "objects/docs", root / "meta/docs", root / "tmp"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_disk_key_clashes_are_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    store.put_bytes("a/b", b"x")
    with pytest.raises(ValueError, match="clashes"):
        store.put_bytes("a", b"y")
    with pytest.raises(ValueError, match="clashes"):
        store.put_bytes("a/b/c", b"z")
    assert [i.key for i in store.list()] == ["a/b"] and store.get_bytes("a/b") == b"x"
    store.delete("a/b")
    assert not (tmp_path / "root/objects/a").exists()  # empty folders go with their last object
    store.put_bytes("a", b"now a file")


def test_disk_gone_is_unavailable(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "usb")
    store.put_bytes("a", b"x")
    shutil.rmtree(tmp_path / "usb")  # the disk was unplugged
    with pytest.raises(StorageUnavailable, match="usb"):
        store.put_bytes("b", b"y")
    with pytest.raises(NotFound):
        store.get_bytes("a")
    assert list(store.list()) == []


def test_disk_refuses_a_segment_too_long_for_a_file_name(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    with pytest.raises(ValueError, match="too long"):
        store.put_bytes("d/" + "x" * 300, b"x")
    assert list(store.list()) == [] and list((tmp_path / "root/tmp").iterdir()) == []


def test_disk_file_copied_in_by_hand_is_an_object(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    (tmp_path / "root/objects/by-hand.txt").write_bytes(b"dropped on the USB disk")
    info = store.stat("by-hand.txt")
    assert (info.size, info.metadata, info.content_type) == (23, {}, "application/octet-stream")
    assert store.get_bytes("by-hand.txt") == b"dropped on the USB disk"


def test_disk_metadata_follows_the_bytes_across_overwrites(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    for version in range(3):
        store.put_bytes("k", b"v" * (version + 1), content_type=f"text/v{version}", metadata={"n": str(version)})
        info = store.stat("k")
        assert (info.size, info.content_type, info.metadata) == (version + 1, f"text/v{version}", {"n": str(version)})
    # A new store on the same root (another process, or after a restart) sees the same.
    assert FileStore(tmp_path / "root").stat("k").metadata == {"n": "2"}


class Held(io.RawIOBase):
    """A source that gives a few bytes, then waits until `go` is set before it ends."""

    def __init__(self) -> None:
        self.go, self.waiting, self.given = threading.Event(), threading.Event(), False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if not self.given:
            self.given = True
            buffer[:5] = b"first"
            return 5
        self.waiting.set()
        assert self.go.wait(60)
        return 0


def test_disk_sweeps_the_temporary_files_of_dead_writers_only(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    dead = tmp_path / "root/tmp/0123456789abcdef.tmp"
    dead.write_bytes(b"left by a writer that was killed: nobody holds its lock")
    source = Held()
    writer = threading.Thread(target=store.put, args=("k", source))
    writer.start()
    try:
        assert source.waiting.wait(60)
        FileStore(tmp_path / "root")  # another process opening the store sweeps tmp/
        assert not dead.exists()
        assert len(list((tmp_path / "root/tmp").iterdir())) == 1  # the live write's, kept
    finally:
        source.go.set()
        writer.join()
    assert store.get_bytes("k") == b"first" and list((tmp_path / "root/tmp").iterdir()) == []


# Puts the same key over and over, alternating sizes and metadata ("c" has "a"'s size), until
# it is killed.
_WRITER = """
import sys
from pathlib import Path
from appliance.storage.fs import FileStore

store = FileStore(Path(sys.argv[1]))
versions = [(name, name.encode() * size) for name, size in (("a", 1000), ("b", 300_000), ("c", 1000))]
count = 0
while True:
    name, data = versions[count % 3]
    store.put_bytes("k", data, content_type=f"text/{name}", metadata={"n": name})
    count += 1
    if count == 4:
        print("writing", flush=True)
"""


def test_disk_stays_consistent_when_a_writer_is_killed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for round_ in range(12):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline() == "writing\n"
            # Not a timing check: only to land the kill at a different step of a put each round.
            time.sleep(random.Random(round_).uniform(0, 0.05))
        finally:
            child.kill()
            child.wait()
            assert child.stdout is not None
            child.stdout.close()
        store = FileStore(root)  # sweeps what the killed writer left in tmp/
        assert list((root / "tmp").iterdir()) == []
        info, data = store.stat("k"), store.get_bytes("k")
        name = data[:1].decode()
        assert (info.size, info.etag) == (len(data), hashlib.sha256(data).hexdigest())
        assert (info.content_type, info.metadata) == (f"text/{name}", {"n": name})
        assert data == name.encode() * len(data)


@pytest.mark.parametrize("copy", [shutil.copy2, shutil.copy], ids=["times-kept", "times-lost"])
def test_disk_metadata_survives_a_copy_of_the_store(tmp_path: Path, copy: object) -> None:
    keyring = Keyring.load_or_create(tmp_path / "state")
    store = EncryptedStore(FileStore(tmp_path / "root"), keyring)
    first, second = random.Random(4).randbytes(3 * CHUNK_SIZE + 5), random.Random(5).randbytes(3 * CHUNK_SIZE + 5)
    store.put_bytes("docs/a.pdf", first, content_type="application/pdf", metadata={"owner": "alice"})
    # The same size again: two entries for one size in the sidecar; the latest one is the bytes'.
    store.put_bytes("docs/a.pdf", second, content_type="application/pdf", metadata={"owner": "bob"})
    shutil.copytree(tmp_path / "root", tmp_path / "copy", copy_function=copy)  # type: ignore[arg-type]
    copied = EncryptedStore(FileStore(tmp_path / "copy"), keyring)
    info = copied.stat("docs/a.pdf")
    assert (info.size, info.content_type) == (len(second), "application/pdf")
    assert info.metadata == {"owner": "bob", KEY_ID: keyring.current_id}
    assert [i.size for i in copied.list()] == [len(second)]
    assert copied.get_bytes("docs/a.pdf") == second


def test_disk_follows_no_link_and_opens_no_fifo(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "root")
    objects, outside = tmp_path / "root/objects", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not the store's")
    (objects / "linked-dir").symlink_to(outside)
    (objects / "linked-file").symlink_to(outside / "secret")
    os.mkfifo(objects / "fifo")
    for key in ["linked-dir/secret", "linked-file", "fifo"]:
        with pytest.raises(NotFound):
            store.get_bytes(key)
        with pytest.raises(NotFound):
            store.stat(key)
    assert list(store.list()) == [] and list(store.list("linked-dir/")) == []
    for key in ["linked-dir/new", "linked-dir/deeper/new"]:
        with pytest.raises(ValueError, match="clashes"):
            store.put_bytes(key, b"written through a link")
    store.delete("linked-dir/secret")
    (tmp_path / "root/meta/docs").symlink_to(outside)  # in the metadata tree as well
    with pytest.raises(ValueError, match="clashes"):
        store.put_bytes("docs/a", b"written through a link")
    assert [p.name for p in outside.iterdir()] == ["secret"]
    assert (outside / "secret").read_bytes() == b"not the store's"
    # A put under the name of a link replaces the link; nothing is written through it.
    store.put_bytes("linked-file", b"mine")
    assert store.get_bytes("linked-file") == b"mine" and (outside / "secret").read_bytes() == b"not the store's"


def test_local_means_the_state_directory_disk(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    settings = StoreSettings(encrypt=False)
    store = open_store(settings, state_dir=state, default_path=state / "storage")
    assert isinstance(store, FileStore) and store.local and store.name == f"local:{state / 'storage'}"
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to stand for a USB disk")
    usb = other / f"circles-test-{os.getpid()}"
    try:
        assert not open_store(settings.model_copy(update={"path": usb}), state_dir=state,
                              default_path=state / "storage").local
    finally:
        for path in sorted(usb.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        usb.rmdir()


# -- S3's errors --------------------------------------------------------------------------------
def test_s3_the_first_put_makes_the_bucket(s3_server: s3server.S3Server, tmp_path: Path) -> None:
    store = open_store(s3_server.settings(tmp_path, s3server.fresh_bucket()), state_dir=tmp_path,
                       default_path=tmp_path / "unused")
    assert isinstance(store, S3Store)
    try:
        # Reads of a bucket not made yet find nothing, and make nothing.
        with pytest.raises(NotFound):
            store.get_bytes("k")
        with pytest.raises(NotFound):
            store.stat("k")
        assert list(store.list()) == []
        store.delete("k")
        assert not store.client.bucket_exists(store.bucket)
        # A stream that cannot be read again: the bucket is made, the caller asked to send again.
        with pytest.raises(StorageUnavailable, match="send the object again"):
            store.put("k", io.BufferedReader(Generated(10)))
        assert store.client.bucket_exists(store.bucket) and list(store.list()) == []
        source = Generated(10)
        store.put("k", io.BufferedReader(source))
        assert hashlib.sha256(store.get_bytes("k")).hexdigest() == source.sha256.hexdigest()
    finally:
        _cleanup(Case("s3", store, tmp_path))


def test_s3_a_first_put_that_can_be_sent_again_just_works(s3_server: s3server.S3Server, tmp_path: Path) -> None:
    """Into a missing bucket, a stream that can seek (an uploaded file), also through the
    encryption, which then starts over."""
    for encrypt in (False, True):
        store = open_store(s3_server.settings(tmp_path, s3server.fresh_bucket(), encrypt=encrypt),
                           state_dir=tmp_path, default_path=tmp_path / "unused")
        try:
            with open(tmp_path / "upload", "wb") as upload:
                upload.write(b"skipped|" + b"the upload" * 1000)
            with open(tmp_path / "upload", "rb") as upload:
                upload.seek(len(b"skipped|"))
                assert store.put("k", upload, length=10_000).size == 10_000
            assert store.get_bytes("k") == b"the upload" * 1000
        finally:
            _cleanup(Case("s3", store, tmp_path))
def test_s3_wrong_secret_key_is_denied(s3_server: s3server.S3Server) -> None:
    with s3server.checking_auth(s3_server) as server:
        bucket = s3server.fresh_bucket()
        good = S3Store.connect(server.endpoint, bucket, access_key=server.access_key,
                               secret_key=server.secret_key, secure=server.secure, region=server.region)
        good.put_bytes("k", b"v")  # the keys themselves work
        wrong = "not-" + server.secret_key
        bad = S3Store.connect(server.endpoint, bucket, access_key=server.access_key, secret_key=wrong,
                              secure=server.secure, region=server.region)
        with pytest.raises(StorageDenied) as caught:
            bad.get_bytes("k")
        assert wrong not in str(caught.value) and server.secret_key not in str(caught.value)
        assert bucket in str(caught.value)
        good.delete("k")
        good.client.remove_bucket(bucket)


def test_s3_nothing_listening_is_unavailable() -> None:
    port = free_port(39700)  # free: nothing listens there
    store = S3Store.connect(f"127.0.0.1:{port}", "circles", access_key="a", secret_key="b",
                            secure=False, region="us-east-1", connect_timeout=1, retries=0)
    with pytest.raises(StorageUnavailable, match=f"127.0.0.1:{port}"):
        store.put_bytes("k", b"v")
    with pytest.raises(StorageUnavailable):
        list(store.list())


class OddServer(http.server.BaseHTTPRequestHandler):
    """Answers every request with the status and body the test sets on the server."""

    def _answer(self) -> None:
        status, content_type, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


def _s3_error(code: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{code}</Message><Resource>/circles</Resource></Error>").encode()


@pytest.mark.parametrize(("status", "content_type", "body", "error", "words"), [
    (503, "application/xml", _s3_error("SlowDown"), StorageUnavailable, "cannot reach|cannot serve"),
    (500, "application/xml", _s3_error("InternalError"), StorageUnavailable, "cannot reach|cannot serve"),
    (403, "application/xml", _s3_error("AccessDenied"), StorageDenied, "refused .AccessDenied."),
    (404, "text/html", b"<html>a web server, not S3</html>", StorageUnavailable, "not an S3 answer"),
])
def test_s3_server_answers_become_storage_errors(status: int, content_type: str, body: bytes,
                                                 error: type[Exception], words: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OddServer)
    server.answer = (status, content_type, body)  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = S3Store.connect(f"127.0.0.1:{server.server_port}", "circles", access_key="a",
                                secret_key="secret-b", secure=False, region="us-east-1", retries=0)
        with pytest.raises(error, match=words) as caught:
            store.get_bytes("k")
        assert "secret-b" not in str(caught.value)
    finally:
        server.shutdown()
        server.server_close()


# -- signed links -------------------------------------------------------------------------------
NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def test_link_round_trip(tmp_path: Path) -> None:
    secret = link_secret(tmp_path)
    assert link_secret(tmp_path) == secret and len(secret) >= 32
    token = sign("photos/2026/été.jpg", NOW + timedelta(hours=1), secret, now=NOW)
    assert urllib.parse.quote(token, safe="") == token  # URL-safe as it is
    assert verify(token, secret, NOW) == "photos/2026/été.jpg"
    assert verify(token, secret, NOW + timedelta(minutes=59)) == "photos/2026/été.jpg"


def test_link_expired(tmp_path: Path) -> None:
    secret = link_secret(tmp_path)
    token = sign("a.txt", NOW + timedelta(hours=1), secret, now=NOW)
    with pytest.raises(LinkExpired, match="expired"):
        verify(token, secret, NOW + timedelta(hours=1))


def test_link_tampered(tmp_path: Path) -> None:
    secret = link_secret(tmp_path)
    token = sign("a.txt", NOW + timedelta(hours=1), secret, now=NOW)
    key, expiry, mac = token.split(".")
    other_key = sign("b.txt", NOW + timedelta(hours=1), secret, now=NOW).split(".")[0]
    forged = [
        f"{other_key}.{expiry}.{mac}",  # another object
        f"{key}.{int(expiry) + 86400}.{mac}",  # a longer life
        f"{key}.0{expiry}.{mac}",  # the same expiry spelt otherwise
        f"{key}.{expiry}.{mac[:-2]}AA",
        f"{key}.{expiry}",
        "garbage", "", "a.b.c.d", "\u00e9.1.x",
    ]
    for token_ in forged:
        with pytest.raises(LinkInvalid, match="invalid") as caught:
            verify(token_, secret, NOW)
        assert not isinstance(caught.value, LinkExpired)
    with pytest.raises(LinkInvalid, match="invalid"):
        verify(token, b"another box's secret", NOW)
    with pytest.raises(LinkInvalid, match="invalid"):  # signed for the files, shown elsewhere
        verify(token, secret, NOW, scope="backups")
    assert verify(sign("a.txt", NOW + timedelta(hours=1), secret, scope="backups", now=NOW), secret, NOW,
                  scope="backups") == "a.txt"


def test_link_lasts_at_most_seven_days(tmp_path: Path) -> None:
    secret = link_secret(tmp_path)
    week = sign("a.txt", NOW + timedelta(days=7), secret, now=NOW)
    assert verify(week, secret, NOW) == "a.txt"
    with pytest.raises(ValueError, match="at most 7 days"):
        sign("a.txt", NOW + timedelta(days=7, seconds=1), secret, now=NOW)
    # Genuine, but more than seven days ahead of the verifier's clock (set back since): refused.
    with pytest.raises(LinkInvalid, match="invalid"):
        verify(week, secret, NOW - timedelta(minutes=1))


# -- open_store -----------------------------------------------------------------------------------
def test_open_store_needs_an_endpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="storage.endpoint"):
        open_store(StoreSettings(backend="s3"), state_dir=tmp_path, default_path=tmp_path / "s")


def test_open_store_names_a_missing_secret_never_a_value(tmp_path: Path) -> None:
    settings = StoreSettings(backend="s3", endpoint="127.0.0.1:9000", encrypt=False)
    with pytest.raises(ConfigError, match="s3-access-key"):
        open_store(settings, state_dir=tmp_path, default_path=tmp_path / "s")
    write_secret("s3-access-key", "AKIA-looks-secret-1234", tmp_path)
    with pytest.raises(ConfigError, match="s3-secret-key") as caught:
        open_store(settings, state_dir=tmp_path, default_path=tmp_path / "s")
    assert "AKIA-looks-secret-1234" not in str(caught.value)


@pytest.mark.parametrize("endpoint", ["http://nas.lan:9000", "nas.lan:9000/bucket", "nas.lan:http",
                                      "owner:pa55word@nas.lan:9000"])
def test_open_store_wants_host_and_port(tmp_path: Path, endpoint: str) -> None:
    write_secret("s3-access-key", "a", tmp_path)
    write_secret("s3-secret-key", "b", tmp_path)
    with pytest.raises(ConfigError, match="storage.endpoint: host:port, no scheme") as caught:
        open_store(StoreSettings(backend="s3", endpoint=endpoint), state_dir=tmp_path, default_path=tmp_path / "s")
    assert "pa55word" not in str(caught.value)


def test_open_store_names_an_invalid_secret_name(tmp_path: Path) -> None:
    write_secret("s3-access-key", "a", tmp_path)
    for setting in ("access_key_secret", "secret_key_secret"):
        settings = StoreSettings(backend="s3", endpoint="127.0.0.1:9000", **{setting: "../keys"})
        with pytest.raises(ConfigError, match=f"storage.{setting}: invalid secret name"):
            open_store(settings, state_dir=tmp_path, default_path=tmp_path / "s")


def test_open_store_makes_no_folder_on_an_unmounted_disk(tmp_path: Path) -> None:
    settings = StoreSettings(path=tmp_path / "media/usb/circles", encrypt=False)
    with pytest.raises(StorageUnavailable, match="not mounted"):
        open_store(settings, state_dir=tmp_path, default_path=tmp_path / "storage")
    assert not (tmp_path / "media").exists()
    (tmp_path / "media/usb").mkdir(parents=True)  # mounted: the store's own folder is made on it
    store = open_store(settings, state_dir=tmp_path, default_path=tmp_path / "storage")
    assert store.put_bytes("k", b"v").size == 1 and (tmp_path / "media/usb/circles/objects/k").is_file()


def test_open_store_encrypts_by_default_with_the_box_keyring(tmp_path: Path) -> None:
    store = open_store(StoreSettings(), state_dir=tmp_path, default_path=tmp_path / "storage")
    assert isinstance(store, EncryptedStore) and isinstance(store.inner, FileStore)
    store.put_bytes("k", b"plaintext")
    assert store.stat("k").metadata[KEY_ID] == Keyring.load_or_create(tmp_path).current_id
    assert (tmp_path / "storage/objects/k").read_bytes().startswith(STREAM_MAGIC)
