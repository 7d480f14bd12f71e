"""The backup engine on a real state directory (SQLite databases, a ledger, secrets, a folder)
against a real FileStore and the real `minio` SDK on moto's S3 server."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from appliance import db
from appliance.config import CoreSettings, StoreSettings
from appliance.errors import OperationalError
from appliance.ledger import Entry, Ledger, Signer
from appliance.security.crypto import DecryptionError, Keyring, keyring_path
from appliance.security.secrets import SecretStore
from appliance.storage import FileStore, Store, open_store
from appliance.storage.base import StorageCorrupt
from modules.backup import chunks, locks, manifest, retention
from modules.backup.manifest import Source
from modules.backup.repo import Repository
from modules.backup.restore import sqlite_integrity
from modules.backup.settings import BackupJob, BackupSettings, Keep
from modules.backup.sources import collect
from tests import s3server

FOLDER_MB = 4


@dataclass
class Box:
    state: Path
    settings: CoreSettings
    backup: BackupSettings
    job: BackupJob
    keyring: Keyring
    ledger: Ledger
    history: sqlite3.Connection
    folder: Path
    config: Path
    tmp: Path

    def collect(self, name: str) -> list[Source]:
        return collect(self.settings, self.backup, self.job, self.tmp / f"scratch-{name}")

    def live_files(self) -> dict[str, bytes]:
        """The files a restore must give back byte for byte, by their path in a snapshot."""
        files = {f"folders/docs/{p.relative_to(self.folder).as_posix()}": p.read_bytes()
                 for p in self.folder.rglob("*") if p.is_file() and not p.is_symlink()}
        files |= {f"secrets/{p.name}": p.read_bytes() for p in (self.state / "secrets").glob("*.enc")}
        files |= {f"keys/{p.name}": p.read_bytes() for p in (self.state / "keys").iterdir()
                  if p.name not in ("keyring.json", "keyring.lock")}
        files["config/circles.toml"] = self.config.read_bytes()
        files["mosquitto/mosquitto.db"] = (self.state / "broker/data/mosquitto.db").read_bytes()
        return files


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Box]:
    """A state directory as a box has it, with its databases in use."""
    state = tmp_path / "state"
    config = tmp_path / "etc" / "circles.toml"
    config.parent.mkdir()
    config.write_text('environment = "development"\n')
    monkeypatch.setenv("CIRCLES_CONFIG", str(config))
    settings = CoreSettings(state_dir=state)
    engine = db.make_engine(db.default_url(state))
    db.migrate(engine)
    ledger = Ledger(engine, Signer.load_or_create(state), checkpoint_every=5)
    ledger.append("acct:demo", [Entry({"i": i, "px": "101.25"}, key=f"k{i}") for i in range(12)])
    ledger.append("audit", [Entry({"event": "login", "user": "ada"})])
    keyring = Keyring.load_or_create(state)
    SecretStore(state, keyring).set("exchange-key", "s3cr3t-value")
    (state / "home").mkdir()
    history = sqlite3.connect(state / "home" / "history.db")
    history.execute("PRAGMA journal_mode=WAL")
    history.execute("CREATE TABLE samples (entity TEXT, ts REAL, value REAL)")
    history.executemany("INSERT INTO samples VALUES (?, ?, ?)", [("t", i, i / 10) for i in range(500)])
    history.commit()
    (state / "broker" / "data").mkdir(parents=True)
    (state / "broker" / "data" / "mosquitto.db").write_bytes(b"mosquitto persistence " * 100)
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "photo.jpg").write_bytes(os.urandom(FOLDER_MB << 20))  # does not compress
    (folder / "sub" / "notes.txt").write_text("shopping list\n" * 2000)
    (folder / "empty").write_bytes(b"")
    (folder / "outside").symlink_to(tmp_path / "etc")  # not followed
    backup = BackupSettings(jobs=[BackupJob(name="box", folders=[folder])])
    yield Box(state, settings, backup, backup.jobs[0], keyring, ledger, history, folder, config, tmp_path)
    history.close()
    engine.dispose()


def file_repo(box: Box) -> Repository:
    store = open_store(StoreSettings(encrypt=False), state_dir=box.state, default_path=box.state / "backups")
    assert isinstance(store, FileStore)
    return Repository(store, box.keyring)


def stored_bytes(store: Store) -> int:
    return sum(info.size for info in store.list(""))


def restored_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_round_trip_gives_back_identical_files_and_ledger(box: Box) -> None:
    repo = file_repo(box)
    first = repo.backup("box", box.collect("1"))
    files_then = box.live_files()
    box.history.execute("INSERT INTO samples VALUES ('t', 1000, 99.5)")
    box.history.commit()
    box.ledger.append("acct:demo", [Entry({"i": 12, "px": "99.00"}, key="k12")])
    second = repo.backup("box", box.collect("2"))
    assert [m.id for m in repo.snapshots("box")] == [first.id, second.id]

    paths = {f.path for f in second.files}
    assert {"db/circles.db", "db/home/history.db", "ledger/acct%3Ademo.jsonl", "ledger/audit.jsonl",
            "keys/ledger-ed25519.pem", "folders/docs/sub/notes.txt", "folders/docs/empty"} <= paths
    assert "keys/keyring.json" not in paths  # the emergency kit carries it, not a backup sealed by it
    assert not any(p.endswith(("-wal", "-shm")) or "outside" in p for p in paths)

    old = repo.restore(first.id, box.tmp / "restored-1")
    new = repo.restore(second.id, box.tmp / "restored-2")
    assert old.ok and new.ok, old.problems + new.problems
    assert new.checked == len(second.files)
    for snapshot, root in ((files_then, box.tmp / "restored-1"), (box.live_files(), box.tmp / "restored-2")):
        got = restored_files(root)
        assert {path: got.get(path) for path in snapshot} == snapshot
    rows = [sqlite3.connect(box.tmp / f"restored-{n}/db/home/history.db").execute(
        "SELECT count(*) FROM samples").fetchone()[0] for n in (1, 2)]
    assert rows == [500, 501]

    # The ledger restored in the database is the live one, record for record, and its bundle
    # is byte for byte what the live ledger exports now.
    restored_engine = db.make_engine(db.default_url(box.tmp / "restored-2" / "db"))
    restored = Ledger(restored_engine, Signer.load_or_create(box.tmp / "restored-2"))
    for chain in ("acct:demo", "audit"):
        assert list(restored.records(chain)) == list(box.ledger.records(chain))
        assert restored.checkpoints(chain) == box.ledger.checkpoints(chain)
    restored_engine.dispose()
    live_bundle = box.tmp / "live.jsonl"
    with open(live_bundle, "w", encoding="utf-8") as out:
        box.ledger.export("acct:demo", out)
    assert (box.tmp / "restored-2/ledger/acct%3Ademo.jsonl").read_bytes() == live_bundle.read_bytes()

    with pytest.raises(OperationalError, match="not an empty folder"):
        repo.restore(first.id, box.tmp / "restored-1")


def test_second_backup_of_unchanged_data_uploads_almost_nothing(box: Box) -> None:
    repo = file_repo(box)
    first = repo.backup("box", box.collect("1"))
    size_after_first = stored_bytes(repo.store)
    second = repo.backup("box", box.collect("2"))
    grown = stored_bytes(repo.store) - size_after_first
    assert first.uploaded_bytes > FOLDER_MB << 20  # the photo does not compress
    # Nothing changed, so every chunk is found in the repository: the SQLite snapshots are
    # page-for-page copies, and the ledger bundles were signed by the first export already.
    # What grows is the second manifest (a few kB).
    assert second.uploaded_bytes == 0
    assert 0 < grown < 0.02 * size_after_first
    assert [f.chunks for f in second.files] == [f.chunks for f in first.files]


def test_retention_keeps_exactly_what_restic_would() -> None:
    def at(text: str) -> datetime:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)

    times = [("a", at("2023-12-30T10:00")), ("b", at("2024-01-15T09:00")), ("c", at("2024-01-31T23:00")),
             ("d", at("2024-02-10T08:00")), ("e", at("2024-02-26T08:00")), ("f", at("2024-03-01T08:00")),
             ("g", at("2024-03-01T20:00")), ("h", at("2024-03-03T07:00")), ("i", at("2024-03-04T07:00")),
             ("j", at("2024-03-04T19:00"))]
    policy = Keep(last=1, daily=3, weekly=2, monthly=3, yearly=2)
    # last 1: j. daily 3: j (03-04), h (03-03), g (03-01). weekly 2: j (W10), h (Sunday: W09).
    # monthly 3: j (March), e (February), c (January). yearly 2: j (2024), a (2023).
    assert retention.keep(times, policy, zone=UTC) == {"j", "h", "g", "e", "c", "a"}
    # In Berlin, c (23:00 UTC on 31 January) is on 1 February: January's newest is then b.
    assert retention.keep(times, policy, zone=ZoneInfo("Europe/Berlin")) == {"j", "h", "g", "e", "b", "a"}
    assert retention.keep(times, Keep(last=4, daily=0, weekly=0, monthly=0)) == {"j", "i", "h", "g"}
    # Fewer periods than a rule asks for: as restic, the oldest snapshot is kept as well.
    few = [("p", at("2024-03-01T08:00")), ("q", at("2024-03-01T20:00")), ("r", at("2024-03-02T08:00")),
           ("s", at("2024-03-02T20:00"))]
    assert retention.keep(few, Keep(last=0, daily=7, weekly=0, monthly=0), zone=UTC) == {"s", "q", "p"}
    assert retention.keep(few, Keep(last=1, daily=0, weekly=0, monthly=2), zone=UTC) == {"s", "p"}
    assert retention.keep(few, Keep(last=0, daily=2, weekly=0, monthly=0), zone=UTC) == {"s", "q"}  # enough
    # A snapshot from after `now` (the clock went back) is kept and takes no rule's place.
    future = [*times, ("z", at("2030-01-01T00:00"))]
    assert retention.keep(future, Keep(last=1, daily=0, weekly=0, monthly=0),
                          now=at("2024-03-05T00:00")) == {"z", "j"}


def test_forget_and_prune_remove_exactly_the_other_snapshots(box: Box) -> None:
    repo = file_repo(box)
    ids = {}
    for day in (1, 2, 3, 10, 20, 40):
        when = datetime(2024, 1, 1, 12, tzinfo=UTC) + timedelta(days=day)
        own = box.tmp / f"day-{day}.txt"
        own.write_text(f"the file of day {day}\n")  # one chunk that only this snapshot holds
        ids[day] = repo.backup("box", [Source("folders/d/own.txt", str(own), "file", own, 0o600, 0)],
                               now=when).id
    removed = repo.forget("box", Keep(last=2, daily=0, weekly=0, monthly=2), zone=UTC,
                          now=datetime(2024, 3, 1, tzinfo=UTC))
    # last 2: days 40 and 20; monthly 2: February (day 40) and January (day 20).
    assert removed == [ids[1], ids[2], ids[3], ids[10]]
    assert [m.id for m in repo.snapshots("box")] == [ids[20], ids[40]]
    assert repo.prune() == 4
    assert repo.prune() == 0
    assert repo.verify(full=True).ok


def test_verify_names_each_chunk_changed_in_storage(box: Box) -> None:
    repo = file_repo(box)
    snap = repo.backup("box", box.collect("1"))
    assert repo.verify(full=True).ok
    photo = next(f for f in snap.files if f.path == "folders/docs/photo.jpg")
    flipped, gone, swapped = photo.chunks[0], photo.chunks[1], photo.chunks[2]
    blob = bytearray(repo.store.get_bytes(chunks.chunk_key(flipped)))
    blob[len(blob) // 2] ^= 0x01
    repo.store.put_bytes(chunks.chunk_key(flipped), bytes(blob))
    repo.store.delete(chunks.chunk_key(gone))
    repo.store.put_bytes(chunks.chunk_key(swapped), repo.store.get_bytes(chunks.chunk_key(photo.chunks[3])))

    report = repo.verify(full=True)
    assert not report.ok
    assert report.checked == len({c for f in snap.files for c in f.chunks})
    assert len(report.problems) == 3
    for cid, reason in ((flipped, "authentication failed"), (gone, "missing"), (swapped, "authentication failed")):
        assert any(p.startswith(f"chunk {cid}: ") and reason in p for p in report.problems), report.problems
    sampled = repo.verify(sample=0.01)
    assert sampled.checked == 1

    restore = repo.restore(snap.id, box.tmp / "out")
    assert not restore.ok
    assert [p for p in restore.problems if p.startswith("folders/docs/photo.jpg: not restored")]
    assert not (box.tmp / "out/folders/docs/photo.jpg").exists()  # never a partial file
    assert (box.tmp / "out/folders/docs/sub/notes.txt").read_bytes() == (box.folder / "sub/notes.txt").read_bytes()


def test_a_wrong_keyring_is_a_clear_error_not_garbage(box: Box) -> None:
    repo = file_repo(box)
    snap = repo.backup("box", box.collect("1"))
    other = Repository(repo.store, Keyring.load_or_create(box.tmp / "another-box"))
    for attempt in (other.snapshots, lambda: other.verify(full=True), lambda: other.restore(snap.id, box.tmp / "o")):
        with pytest.raises(DecryptionError, match=f"unknown key id {box.keyring.current_id}"):
            attempt()
    before = stored_bytes(repo.store)
    with pytest.raises(DecryptionError, match="unknown key id"):
        other.backup("box", box.collect("2"))  # before re-using chunks it could not read back
    assert stored_bytes(repo.store) == before
    assert not (box.tmp / "o").exists()


def test_chunks_sealed_by_a_lost_key_are_sent_again(box: Box) -> None:
    repo = file_repo(box)
    repo.backup("box", box.collect("1"))
    kit = keyring_path(box.state).read_bytes()  # the emergency kit, printed before a rotation
    box.keyring.rotate()
    fresh = box.tmp / "fresh.bin"
    fresh.write_bytes(os.urandom(3 << 20))
    source = [Source("folders/new/fresh.bin", str(fresh), "file", fresh, 0o600, 0)]
    # A run with the new key is killed before its manifest is written: its chunks stay.
    killed = Repository(repo.store, box.keyring).backup("box", source)
    repo.store.delete(killed.key)
    # The keyring comes back from the kit, without the new key.
    keyring_path(box.state).write_bytes(kit)
    restored_keyring = Keyring.load_or_create(box.state)
    assert box.keyring.current_id not in restored_keyring.ids

    again = Repository(repo.store, restored_keyring)
    snap = again.backup("box", source)
    assert snap.uploaded_bytes > 3 << 20  # sent again, not re-used: the key that sealed them is lost
    assert snap.key_ids == [restored_keyring.current_id]
    report = again.restore(snap.id, box.tmp / "out")
    assert report.ok, report.problems
    assert (box.tmp / "out/folders/new/fresh.bin").read_bytes() == fresh.read_bytes()


def test_a_snapshot_that_does_not_open_blocks_neither_listing_nor_backups(box: Box) -> None:
    repo = file_repo(box)
    own = box.tmp / "own.txt"
    own.write_text("the only file\n")
    source = [Source("folders/d/own.txt", str(own), "file", own, 0o600, 0)]
    good = repo.backup("box", source)
    # One manifest modified in storage; two sealed by this very keyring whose files a
    # restore could not put under its folder: one outside it, one a file and a folder at once.
    modified = manifest.snapshot_key("box", "20240101T000000Z-0000000a")
    blob = bytearray(repo.store.get_bytes(good.key))
    blob[-5] ^= 0x01
    repo.store.put_bytes(modified, bytes(blob))
    outside = replace(good, id="20240102T000000Z-0000000b", files=[replace(good.files[0], path="../x")])
    clash = replace(good, id="20240103T000000Z-0000000c",
                    files=[replace(good.files[0], path="folders/d"), good.files[0]])
    for bad in (outside, clash):
        repo.store.put_bytes(bad.key, manifest.seal(bad, box.keyring))

    assert [m.id for m in repo.snapshots()] == [good.id]
    second = repo.backup("box", source)
    assert second.uploaded_bytes == 0  # the good snapshot's chunk is still re-used
    for key in (modified, outside.key, clash.key):
        assert any(note.startswith(f"snapshot {key}: ") for note in second.notes), second.notes
    report = repo.verify(full=True)
    assert not report.ok and report.checked == 1
    assert len(report.problems) == 3
    assert any("invalid path in a snapshot: '../x'" in p for p in report.problems)
    assert any("'folders/d' is a file and also the folder of" in p for p in report.problems)
    unused = chunks.chunk_key("cd" * 32)
    repo.store.put_bytes(unused, b"named by no snapshot")
    assert repo.prune() == 0  # its chunks could look unused: nothing is deleted
    assert repo.store.exists(unused)

    with pytest.raises(StorageCorrupt, match=f"snapshot {outside.key}: invalid path"):
        repo.restore(outside.id, box.tmp / "out" / "dir")
    assert not (box.tmp / "out").exists()  # neither DIR nor DIR/../x


def test_collect_keeps_backups_working_copies_and_keys_out_of_folders(box: Box) -> None:
    file_repo(box).backup("box", box.collect("1"))  # <state>/backups now holds a repository
    (box.folder / "keyring-link").symlink_to(keyring_path(box.state))
    job = BackupJob(name="box", databases=False, config=False, mosquitto=False, ledger=False,
                    folders=[box.tmp, box.state / "keys"])
    sources = collect(box.settings, box.backup, job, box.tmp / "scratch-2")
    paths = {s.path for s in sources}
    top = f"folders/{box.tmp.name}"
    assert f"{top}/docs/photo.jpg" in paths and f"{top}/state/secrets/exchange-key.enc" in paths
    for private in ("state/keys/", "state/backups/", "scratch-2/", "docs/keyring-link"):
        assert not any(p.startswith(f"{top}/{private}") for p in paths), private
    notes = " | ".join(sources.notes)
    for why in (f"{box.state / 'backups'} skipped: a backup target", f"{box.state / 'keys'} skipped: the key folder",
                f"{box.tmp / 'scratch-2'} skipped: the backup's working copies",
                f"folders: {box.state / 'keys'} skipped: it is the key folder"):
        assert why in notes, notes

    # A file that became a link (to the keyring) or a FIFO after it was listed is not read.
    os.mkfifo(box.tmp / "fifo")
    link, fifo = box.folder / "keyring-link", box.tmp / "fifo"
    snap = file_repo(box).backup("box", [Source("folders/docs/keyring-link", str(link), "file", link, 0o600, 0),
                                         Source("folders/t/fifo", str(fifo), "file", fifo, 0o600, 0)])
    assert snap.files == []
    assert snap.notes == ["folders/docs/keyring-link: not read (a symbolic link, not followed)",
                          "folders/t/fifo: not read (not a regular file)"]


def test_a_backup_never_makes_a_ledger_signing_key(box: Box) -> None:
    key = box.state / "keys" / "ledger-ed25519.pem"
    key.rename(box.tmp / "ledger-key-aside.pem")
    job = BackupJob(name="box", databases=False, config=False, mosquitto=False)
    sources = collect(box.settings, box.backup, job, box.tmp / "scratch-l")
    assert list(sources) == [] and not key.exists()
    assert any(note.startswith("ledger: no signing key") for note in sources.notes), sources.notes


def test_restore_reports_a_ledger_bundle_that_does_not_verify_and_a_broken_database(box: Box) -> None:
    repo = file_repo(box)
    good = box.tmp / "good.jsonl"
    with open(good, "w", encoding="utf-8") as out:
        box.ledger.export("acct:demo", out)
    bad = box.tmp / "bad.jsonl"
    bad.write_text(good.read_text().replace('"i":3', '"i":4', 1))
    broken = box.tmp / "broken.db"
    with sqlite3.connect(broken) as made:
        made.execute("CREATE TABLE t (a BLOB)")
        made.executemany("INSERT INTO t VALUES (?)", [(os.urandom(100),) for _ in range(2000)])
    made.close()
    with open(broken, "r+b") as handle:  # two pages in the middle overwritten, the header intact
        handle.seek(20 * 4096)
        handle.write(b"\xff" * 8192)
    assert sqlite_integrity(broken) != "ok"
    snap = repo.backup("box", [Source("ledger/good.jsonl", "", "ledger", good, 0o600, 0),
                               Source("ledger/bad.jsonl", "", "ledger", bad, 0o600, 0),
                               Source("db/broken.db", str(broken), "sqlite", broken, 0o600, 0)])
    report = repo.restore(snap.id, box.tmp / "out")
    assert len(report.problems) == 2, report.problems
    assert report.problems[0].startswith("ledger/bad.jsonl: the ledger chain does not verify")
    assert report.problems[1].startswith("db/broken.db: PRAGMA integrity_check says")
    assert (box.tmp / "out/ledger/bad.jsonl").read_bytes() == bad.read_bytes()  # as it was stored


def test_collect_notes_what_it_skips_and_never_a_database_url(box: Box) -> None:
    (box.state / "broker/data/mosquitto.db").unlink()
    settings = CoreSettings(state_dir=box.state, database={"url": "postgresql://circles:pw-x1@db.lan/circles"})
    job = BackupJob(name="box", ledger=False, folders=[box.folder, box.tmp / "not-mounted"])
    leftover = box.state / "backup/scratch/run-killed/db/circles.db"  # a killed run's copy
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes((box.state / "home/history.db").read_bytes())
    sources = collect(settings, box.backup, job, box.state / "backup/scratch/run-now")
    notes = " | ".join(sources.notes)
    assert "PostgreSQL" in notes and "pg_dump" in notes and "pw-x1" not in notes
    assert "mosquitto: no persistence file" in notes and "not-mounted" in notes
    paths = {s.path for s in sources}
    assert "db/home/history.db" in paths and "db/circles.db" in paths  # SQLite files of the state dir
    assert not any("scratch" in p for p in paths)
    assert not any(p.startswith(("mosquitto/mosquitto.db", "ledger/")) for p in paths)
    repo = file_repo(box)
    assert repo.backup("box", sources, notes=sources.notes).notes == sources.notes


KILLED_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from appliance.security.crypto import Keyring
    from appliance.storage import FileStore
    from modules.backup.manifest import Source
    from modules.backup.repo import Repository

    state, big = Path(sys.argv[1]), Path(sys.argv[2])
    repo = Repository(FileStore(state / "backups"), Keyring.load_or_create(state), workers=1, window=2)
    repo.backup("box", [Source("folders/big/big.bin", str(big), "file", big, 0o600, 0)])
""")


def test_a_killed_run_lists_nothing_and_the_next_run_reuses_its_chunks(box: Box) -> None:
    big = box.tmp / "big.bin"
    big.write_bytes(os.urandom(64 << 20))
    repo = file_repo(box)
    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(box.state), str(big)],
                           cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 30
    while sum(1 for _ in repo.store.list(chunks.CHUNKS)) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    # While a backup runs, prune leaves the repository alone: the run's chunks are named by
    # no manifest yet.
    assert repo.prune() == 0
    assert run.poll() is None, "the run ended before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert repo.snapshots() == []  # no half backup listed
    left = sum(1 for _ in repo.store.list(chunks.CHUNKS))
    assert 8 <= left < 64
    (dead_lock,) = repo.store.list(locks.LOCKS)  # the killed run could not release its lock
    dead_lock_bytes = repo.store.get_bytes(dead_lock.key)

    snap = repo.backup("box", [Source("folders/big/big.bin", str(big), "file", big, 0o600, 0)])
    assert [m.id for m in repo.snapshots()] == [snap.id]
    assert snap.uploaded_bytes < (64 - left + 1) * (chunks.CHUNK_SIZE + 200)  # the killed run's chunks kept
    # The dead run's lock (the backup removed it on its way: put it back) does not stop a
    # prune: it runs and removes exactly the one chunk nothing names.
    repo.store.put_bytes(dead_lock.key, dead_lock_bytes)
    repo.store.put_bytes(chunks.chunk_key("ab" * 32), b"named by no snapshot")
    assert repo.prune() == 1
    assert list(repo.store.list(locks.LOCKS)) == []
    report = repo.restore(snap.id, box.tmp / "out")
    assert report.ok and (box.tmp / "out/folders/big/big.bin").read_bytes() == big.read_bytes()


def test_round_trip_on_s3(box: Box, s3_server: s3server.S3Server) -> None:
    target = s3_server.settings(box.state, s3server.fresh_bucket("backup"))
    store = open_store(target, state_dir=box.state, default_path=box.state / "backups")
    assert not store.local
    repo = Repository(store, box.keyring)
    first = repo.backup("box", box.collect("1"))
    second = repo.backup("box", box.collect("2"))
    assert second.uploaded_bytes == 0 and first.uploaded_bytes > FOLDER_MB << 20
    fresh = Repository(open_store(target, state_dir=box.state, default_path=box.state / "backups"), box.keyring)
    assert [m.id for m in fresh.snapshots()] == [first.id, second.id]
    report = fresh.restore(second.id, box.tmp / "out")
    assert report.ok, report.problems
    got = restored_files(box.tmp / "out")
    assert {path: got.get(path) for path in box.live_files()} == box.live_files()
    assert sqlite_integrity(box.tmp / "out/db/circles.db") == "ok"
    assert fresh.verify(full=True).ok
    store.close()
