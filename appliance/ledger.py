"""The append-only, hash-chained ledger with signed checkpoints (trade journal, audit log).

Each chain is a sequence of records `seq = 1, 2, …`; every record holds the hash of the
one before it (`appliance.ledger_verify` defines the hash, the canonical JSON and the
bundle, and checks them). Every `checkpoint_every` records or `checkpoint_interval_s`
seconds the head is signed with the box's Ed25519 key. An append is one database
transaction that locks the chain's head, so several processes may append to one chain.
Entries may carry an idempotency key: one already in the chain is reported as a
duplicate, never stored twice.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import BigInteger, Column, Connection, Engine, MetaData, String, Table, Text, func, select

from appliance.config import CoreSettings
from appliance.db import open_database
from appliance.errors import OperationalError
from appliance.files import private_dir, write_atomically
from appliance.ledger_verify import (
    FORMAT,
    GENESIS,
    TS_FORMAT,
    VERSION,
    Verdict,
    canonical,
    chained_hash,
    checkpoint_message,
    verify_bundle,
    verify_records,
)

# The tables as migration 0001 creates them (appliance/migrations/versions).
metadata = MetaData()
heads = Table("ledger_heads", metadata, Column("chain", String(200), primary_key=True),
              Column("seq", BigInteger), Column("hash", String(64)))
records = Table("ledger_records", metadata, Column("chain", String(200), primary_key=True),
                Column("seq", BigInteger, primary_key=True), Column("ts", String(40)),
                Column("dedupe_key", String(400)), Column("data", Text),
                Column("prev_hash", String(64)), Column("hash", String(64)))
checkpoints = Table("ledger_checkpoints", metadata,
                    Column("chain", String(200), primary_key=True),
                    Column("seq", BigInteger, primary_key=True), Column("hash", String(64)),
                    Column("ts", String(40)), Column("signature", String(120)))
archives = Table("ledger_archives", metadata, Column("chain", String(200), primary_key=True),
                 Column("through_seq", BigInteger, primary_key=True),
                 Column("first_seq", BigInteger), Column("hash", String(64)), Column("file", Text),
                 Column("sha256", String(64)), Column("archived_at", String(40)))
_RECORD_COLUMNS = "chain, seq, ts, dedupe_key, data, prev_hash, hash"
_KEY_CHUNK = 400  # SQLite's bound-parameter limit is generous, but not unlimited


def now_iso() -> str:
    return datetime.now(UTC).strftime(TS_FORMAT)


def _epoch(ts: str) -> float:
    return datetime.strptime(ts, TS_FORMAT).replace(tzinfo=UTC).timestamp()


def _statements(dialect: str, mark: str) -> dict[str, str]:
    """The SQL run for every append, as the driver takes it (`mark`: its placeholder):
    SQLAlchemy's expression language costs ~50 µs a statement to build and look up, the
    driver's SQL ~10 µs."""
    # SQLite has no row locks: BEGIN IMMEDIATE (appliance.db) holds the write lock already.
    lock = " FOR UPDATE" if dialect == "postgresql" else ""
    sql = {
        "head": f"SELECT seq, hash FROM ledger_heads WHERE chain = ?{lock}",
        "new_head": "INSERT INTO ledger_heads (chain, seq, hash) VALUES (?, 0, ?) "
                    "ON CONFLICT DO NOTHING",
        "set_head": "UPDATE ledger_heads SET seq = ?, hash = ? WHERE chain = ?",
        "keys": "SELECT dedupe_key, seq, hash FROM ledger_records "
                "WHERE chain = ? AND dedupe_key IN ({marks})",
        "last_checkpoint": "SELECT seq, ts FROM ledger_checkpoints WHERE chain = ? "
                           "ORDER BY seq DESC LIMIT 1",
        "insert": f"INSERT INTO ledger_records ({_RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
    }
    return {name: text.replace("?", mark) for name, text in sql.items()}


class Signer:
    """The box's Ed25519 key; created on first use in the state directory (0600)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)

    def __repr__(self) -> str:
        return f"Signer(public_key={base64.b64encode(self.public_key).decode()})"

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Signer:
        path = state_dir / "keys" / "ledger-ed25519.pem"
        if path.exists() and path.stat().st_size:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            assert isinstance(key, Ed25519PrivateKey)
            return cls(key)
        private_dir(path.parent)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:  # whole or not at all, and only once: the key signs everything after
            write_atomically(path, lambda out: out.write(pem), exclusive=True)
        except FileExistsError:  # another process made it first
            return cls.load_or_create(state_dir)
        signer = cls(key)
        path.with_suffix(".pub").write_text(base64.b64encode(signer.public_key).decode() + "\n")
        return signer

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self._key.sign(message)).decode()


@dataclass(frozen=True)
class Entry:
    data: dict[str, Any]
    key: str | None = None  # idempotency key, unique within the chain
    ts: str | None = None  # default: now (UTC)


@dataclass(frozen=True)
class Appended:
    seq: int
    hash: str
    duplicate: bool = False


@dataclass(frozen=True)
class Archived:
    """A segment of a chain moved out of the database into a bundle file of its own."""

    chain: str
    first_seq: int
    through_seq: int
    hash: str  # of the record at through_seq: where the chain in the database resumes
    file: str
    sha256: str
    archived_at: str


class Ledger:
    def __init__(self, engine: Engine, signer: Signer, *, checkpoint_every: int = 1000,
                 checkpoint_interval_s: float = 60.0) -> None:
        self.engine = engine
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        # chain → (seq, signed at) of a checkpoint known to be committed: see _maybe_checkpoint
        self._signed: dict[str, tuple[int, float]] = {}
        self._mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._sql = _statements(engine.dialect.name, self._mark)

    # -- writing ----------------------------------------------------------------------------
    def append(self, chain: str, entries: Sequence[Entry]) -> list[Appended]:
        """Append in one transaction; the result is per entry, in order."""
        # Encoded before the transaction: the write lock, which other processes sharing the
        # database wait for, is held only for the statements (and a float is refused first).
        encoded = [(entry, canonical(entry.data)) for entry in entries]
        with self.engine.begin() as conn:
            result, signed = self._append(conn, chain, encoded)
        if signed is not None:  # only once committed: the memo never runs ahead of the database
            self._signed[chain] = signed
        return result

    def _append(self, conn: Connection, chain: str, encoded: Sequence[tuple[Entry, bytes]]
                ) -> tuple[list[Appended], tuple[int, float] | None]:
        """The records stored, and the chain's last checkpoint (seq, signed at) as this
        transaction found or made it, None if it did not look."""
        seq, prev = self._lock_head(conn, chain)
        known = self._known_keys(conn, chain, [e.key for e, _ in encoded if e.key])
        rows, result = [], []
        now = now_iso()
        for entry, data in encoded:
            if entry.key and entry.key in known:
                result.append(known[entry.key])
                continue
            seq += 1
            ts = entry.ts or now
            link, prev = prev, chained_hash(prev, chain, seq, ts, data)
            rows.append((chain, seq, ts, entry.key, data.decode(), link, prev))
            appended = Appended(seq, prev)
            if entry.key:
                known[entry.key] = Appended(seq, prev, duplicate=True)
            result.append(appended)
        if not rows:
            return result, None
        # The driver's executemany with tuples: this runs for every record stored.
        conn.exec_driver_sql(self._sql["insert"], rows)
        conn.exec_driver_sql(self._sql["set_head"], (seq, prev, chain))
        return result, self._maybe_checkpoint(conn, chain, seq, prev)

    def checkpoint(self, chain: str) -> dict[str, Any] | None:
        """Sign the head now (if it is not signed yet)."""
        with self.engine.begin() as conn:
            seq, hash_ = self._lock_head(conn, chain)
            if seq == 0 or self._last_checkpoint(conn, chain)[0] == seq:
                return None
            row = self._sign(conn, chain, seq, hash_)
        self._signed[chain] = seq, _epoch(row["ts"])
        return row

    def _lock_head(self, conn: Connection, chain: str) -> tuple[int, str]:
        row = conn.exec_driver_sql(self._sql["head"], (chain,)).first()
        if row is None:  # a new chain (once): its head row, then lock it as usual
            conn.exec_driver_sql(self._sql["new_head"], (chain, GENESIS))
            row = conn.exec_driver_sql(self._sql["head"], (chain,)).one()
        return int(row[0]), str(row[1])

    def _known_keys(self, conn: Connection, chain: str, keys: list[str]) -> dict[str, Appended]:
        found: dict[str, Appended] = {}
        for i in range(0, len(keys), _KEY_CHUNK):
            chunk = keys[i:i + _KEY_CHUNK]
            marks = ", ".join([self._mark] * len(chunk))
            for key, seq, hash_ in conn.exec_driver_sql(
                    self._sql["keys"].format(marks=marks), (chain, *chunk)):
                found[key] = Appended(int(seq), hash_, duplicate=True)
        return found

    def known(self, chain: str, keys: list[str]) -> set[str]:
        """The idempotency keys among `keys` that the chain holds."""
        with self.engine.connect() as conn:
            return set(self._known_keys(conn, chain, keys))

    def _last_checkpoint(self, conn: Connection, chain: str) -> tuple[int, float]:
        """The chain's last checkpoint: (seq, when it was signed in epoch seconds); (0, 0.0)
        if there is none."""
        row = conn.exec_driver_sql(self._sql["last_checkpoint"], (chain,)).first()
        return (int(row[0]), _epoch(row[1])) if row else (0, 0.0)

    def _due(self, last: tuple[int, float], seq: int) -> bool:
        return (seq - last[0] >= self.checkpoint_every
                or time.time() - last[1] >= self.checkpoint_interval_s)

    def _maybe_checkpoint(self, conn: Connection, chain: str, seq: int,
                          hash_: str) -> tuple[int, float]:
        """Sign the head if N records or T seconds passed since the last checkpoint.

        The memo of the last checkpoint saves a query per append: it only ever holds one
        that was committed, so the real last one is the same or later, and "not due" by the
        memo is not due. "Due" is checked against the database (another process may have
        signed since) before signing, as if there were no memo."""
        last = self._signed.get(chain)
        if last is not None and not self._due(last, seq):
            return last
        last = self._last_checkpoint(conn, chain)
        if self._due(last, seq):
            signed = self._sign(conn, chain, seq, hash_)
            last = seq, _epoch(signed["ts"])
        return last

    def _sign(self, conn: Connection, chain: str, seq: int, hash_: str) -> dict[str, Any]:
        ts = now_iso()
        row = {"chain": chain, "seq": seq, "hash": hash_, "ts": ts,
               "signature": self.signer.sign(checkpoint_message(chain, seq, hash_, ts))}
        conn.execute(checkpoints.insert(), row)
        return row

    # -- reading ----------------------------------------------------------------------------
    def chains(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r.chain for r in conn.execute(select(heads.c.chain).order_by(heads.c.chain))]

    def head(self, chain: str) -> tuple[int, str]:
        with self.engine.connect() as conn:
            row = conn.execute(select(heads.c.seq, heads.c.hash)
                               .where(heads.c.chain == chain)).first()
        return (int(row.seq), str(row.hash)) if row else (0, GENESIS)

    def count(self, chain: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(records)
                                    .where(records.c.chain == chain)).scalar_one())

    def records(self, chain: str, since: int = 0,
                through: int | None = None) -> Iterator[dict[str, Any]]:
        """Records after `since` (up to `through`), in order, as stored (data parsed back
        from its JSON)."""
        with self.engine.connect() as conn:
            query = (select(records.c.seq, records.c.ts, records.c.data, records.c.prev_hash,
                            records.c.hash)
                     .where(records.c.chain == chain, records.c.seq > since)
                     .order_by(records.c.seq).execution_options(yield_per=2000))
            if through is not None:
                query = query.where(records.c.seq <= through)
            for row in conn.execute(query):
                try:
                    data = json.loads(row.data)
                except ValueError:
                    data = row.data  # damaged: it will not hash to the stored value
                yield {"seq": int(row.seq), "ts": row.ts, "data": data,
                       "prev_hash": row.prev_hash, "hash": row.hash}

    def checkpoints(self, chain: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(checkpoints).where(checkpoints.c.chain == chain)
                                .order_by(checkpoints.c.seq))
            return [{"seq": int(r.seq), "hash": r.hash, "ts": r.ts, "signature": r.signature}
                    for r in rows]

    def archives(self, chain: str) -> list[Archived]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(archives).where(archives.c.chain == chain)
                                .order_by(archives.c.through_seq))
            return [Archived(r.chain, int(r.first_seq), int(r.through_seq), r.hash, r.file,
                             r.sha256, r.archived_at) for r in rows]

    def first_seq(self, chain: str) -> int:
        """The seq the records in the database start at: 1, or after the last archive."""
        with self.engine.connect() as conn:
            return self._first_seq(conn, chain)

    @staticmethod
    def _first_seq(conn: Connection, chain: str) -> int:
        last = conn.execute(select(func.max(archives.c.through_seq))
                            .where(archives.c.chain == chain)).scalar()
        return int(last) + 1 if last else 1

    def verify(self, chain: str) -> Verdict:
        """Check the chain in the database; `first_bad_seq` names the first record that is
        wrong. Archived records are checked in their files (`appliance.ledger_verify`)."""
        return verify_records(chain, self.records(chain), self.checkpoints(chain),
                              self.signer.public_key, first_seq=self.first_seq(chain))

    def verify_archives(self, chain: str, *, search: Path | None = None,
                        allow_missing: bool = False) -> list[tuple[Archived, Verdict]]:
        """Check every archived segment of `chain`: together they run from seq 1 without a gap
        up to where the database resumes, each file verifies on its own with this box's key,
        holds exactly the records archived, joins the segment before it, and is byte for byte
        the file written then. A file is looked for where it was written, then in `search`
        (where archives were moved); a missing file fails unless `allow_missing`."""
        checked: list[tuple[Archived, Verdict]] = []
        expected, anchor = 1, GENESIS
        for done in self.archives(chain):
            verdict = self._verify_segment(done, expected, anchor, search, allow_missing)
            checked.append((done, verdict))
            expected, anchor = done.through_seq + 1, done.hash
        return checked

    def _verify_segment(self, done: Archived, expected: int, anchor: str, search: Path | None,
                        allow_missing: bool) -> Verdict:
        if done.first_seq != expected:
            return Verdict().fail(expected, f"no archive holds seq {expected}..{done.first_seq - 1}")
        path = Path(done.file)
        if not path.is_file() and search is not None:
            path = search / path.name
        if not path.is_file():
            verdict = Verdict(first_seq=done.first_seq)
            reason = f"{done.file} is missing (moved? give its folder with --archive-dir)"
            if allow_missing:
                verdict.notes.append(reason + ": not checked")
                return verdict
            return verdict.fail(done.first_seq, reason)
        digest = hashlib.sha256()
        with open(path, "rb") as raw:
            while chunk := raw.read(1 << 20):
                digest.update(chunk)
        with open(path, encoding="utf-8") as lines:
            verdict = verify_bundle(lines, self.signer.public_key)
        if not verdict.ok:
            return verdict
        if (verdict.first_seq, verdict.first_seq + verdict.records - 1, verdict.anchor_hash,
                verdict.head_hash) != (done.first_seq, done.through_seq, anchor, done.hash):
            return verdict.fail(done.first_seq, f"{path} does not hold seq {done.first_seq}.."
                                f"{done.through_seq} as archived")
        if digest.hexdigest() != done.sha256:
            return verdict.fail(None, f"{path} changed since it was archived (sha256 differs)")
        return verdict

    def export(self, chain: str, out: IO[str]) -> int:
        """Write the bundle (docs/ledger.md) of the records in the database. The head is
        signed first. Returns the number of records."""
        self.checkpoint(chain)
        return self._write_bundle(chain, out, self.records(chain), self.checkpoints(chain))

    def last_seq_before(self, chain: str, ts: str) -> int:
        """The last seq in the database appended before the time `ts` (TS_FORMAT); 0 if none."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(records.c.seq)).where(
                records.c.chain == chain, records.c.ts < ts)).scalar() or 0)

    def archive(self, chain: str, through_seq: int, directory: Path, *,
                note: Callable[[Archived], dict[str, Any]] | None = None) -> Archived:
        """Move the records up to `through_seq` into a bundle file in `directory` that
        verifies on its own, then delete them from the database. The chain in the database
        then starts with an anchor: the signed checkpoint at `through_seq`, which is kept.
        `note(archived)`, if given, makes an entry appended to the chain in the same
        transaction as the deletion, so the chain itself says what was moved where. Records never change once
        written, so appenders go on meanwhile; two archivings at once: one of them fails."""
        first = self.first_seq(chain)
        head, _ = self.head(chain)
        if not first <= through_seq <= head:
            raise ValueError(f"{chain}: can archive seq {first}..{head}, not through {through_seq}")
        with self.engine.begin() as conn:
            hash_ = conn.execute(select(records.c.hash).where(
                records.c.chain == chain, records.c.seq == through_seq)).scalar_one()
            if not conn.execute(select(checkpoints.c.seq).where(
                    checkpoints.c.chain == chain, checkpoints.c.seq == through_seq)).first():
                self._sign(conn, chain, through_seq, hash_)
        directory = directory.resolve()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{chain.replace(':', '_')}-{first:012d}-{through_seq:012d}.jsonl"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        digest = hashlib.sha256()
        with open(tmp, "w", encoding="utf-8") as out:
            self._write_bundle(chain, _Hashing(out, digest), self.records(chain, through=through_seq),
                               [cp for cp in self.checkpoints(chain) if cp["seq"] <= through_seq])
            out.flush()
            os.fsync(out.fileno())
        done = Archived(chain, first, through_seq, hash_, str(path), digest.hexdigest(), now_iso())
        try:
            with self.engine.begin() as conn:
                self._lock_head(conn, chain)
                if self._first_seq(conn, chain) != first:
                    raise OperationalError(f"{chain}: archived by someone else meanwhile")
                os.replace(tmp, path)
                conn.execute(archives.insert().values(
                    chain=chain, through_seq=through_seq, first_seq=first, hash=hash_,
                    file=done.file, sha256=done.sha256, archived_at=done.archived_at))
                conn.execute(records.delete().where(records.c.chain == chain,
                                                    records.c.seq <= through_seq))
                conn.execute(checkpoints.delete().where(checkpoints.c.chain == chain,
                                                        checkpoints.c.seq < through_seq))
                if note is not None:
                    entry = Entry(note(done))
                    self._append(conn, chain, [(entry, canonical(entry.data))])
        finally:
            tmp.unlink(missing_ok=True)
        return done

    def _write_bundle(self, chain: str, out: _Writer, rows: Iterator[dict[str, Any]],
                      signed_at: list[dict[str, Any]]) -> int:
        """Header, then the anchor (the checkpoint just before the first record, when older
        records were archived), then each record followed by the checkpoints at its seq."""
        by_seq: dict[int, list[dict[str, Any]]] = {}
        for cp in signed_at:
            by_seq.setdefault(cp["seq"], []).append(cp)
        out.write(json.dumps({"type": "header", "format": FORMAT, "version": VERSION,
                              "chain": chain, "algorithm": "ed25519",
                              "public_key": base64.b64encode(self.signer.public_key).decode()})
                  + "\n")

        def line(kind: str, item: dict[str, Any]) -> None:
            out.write(canonical({"type": kind, "chain": chain, **item}).decode() + "\n")

        count = 0
        for rec in rows:
            if count == 0:
                for cp in by_seq.get(rec["seq"] - 1, []):
                    line("checkpoint", cp)
            line("record", rec)
            for cp in by_seq.get(rec["seq"], []):
                line("checkpoint", cp)
            count += 1
        return count


class _Writer(Protocol):
    def write(self, text: str, /) -> int: ...


class _Hashing:
    """A text stream that also feeds what is written, as UTF-8, to a digest."""

    def __init__(self, out: IO[str], digest: Any) -> None:
        self.out, self.digest = out, digest

    def write(self, text: str) -> int:
        self.digest.update(text.encode())
        return self.out.write(text)


def open_ledger(settings: CoreSettings, **options: Any) -> Ledger:
    """The ledger of this box: its database (migrated) and its signing key."""
    return Ledger(open_database(settings), Signer.load_or_create(settings.state_dir), **options)
