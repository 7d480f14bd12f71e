"""The audit log: one chain written from any process, verification that names the bad record,
filters for `tail`, and retention that archives old segments into files that still verify."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.config import CoreSettings
from appliance.ledger import Entry, open_ledger
from appliance.ledger_verify import verify_bundle
from appliance.security import audit as events
from appliance.security.audit import CHAIN, AuditLog
from tests.helpers import circles, circles_env


@pytest.fixture
def settings(tmp_path: Path) -> CoreSettings:
    return CoreSettings(state_dir=tmp_path)


@pytest.fixture
def log(settings: CoreSettings) -> AuditLog:
    return AuditLog.open(settings)


def _cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return circles(circles_env(state), *args)


_WRITER = """
import sys
from appliance.config import CoreSettings
from appliance.security.audit import AuditLog, LOGIN_FAILURE
log = AuditLog.open(CoreSettings(state_dir=sys.argv[1]))
for i in range(int(sys.argv[3])):
    log.record(LOGIN_FAILURE, actor=sys.argv[2], target="owner", attempt=i)
"""


def test_two_processes_appending_at_once_keep_one_valid_chain(tmp_path: Path,
                                                              log: AuditLog) -> None:
    log.record(events.USER_ADD, actor="cli:root", target="owner")  # the tables exist first
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), f"proc-{n}", "150"],
                                env=circles_env(tmp_path)) for n in range(2)]
    assert [w.wait(120) for w in writers] == [0, 0]
    verdict, _ = log.verify()
    assert verdict.ok, verdict
    assert verdict.records == 301
    mine = [e.details["attempt"] for e in log.events(user="proc-0")]
    assert mine == list(range(150))  # each writer's events in its own order, none lost


def test_tampering_with_a_record_is_named_by_verify(tmp_path: Path, log: AuditLog) -> None:
    for n in range(12):
        log.record(events.LOGIN_SUCCESS, actor=f"user:u{n}")
    assert "audit: ok, 12 records" in _cli(tmp_path, "audit", "verify").stdout
    with sqlite3.connect(tmp_path / "circles.db") as db:
        db.execute("UPDATE ledger_records SET data = replace(data, 'user:u7', 'user:mallory') "
                   "WHERE chain = ? AND seq = 8", (CHAIN,))
    done = _cli(tmp_path, "audit", "verify")
    assert done.returncode == 1
    assert "FAILED at seq 8" in done.stdout


def test_events_are_filtered_by_user_action_and_time(log: AuditLog) -> None:
    log.ledger.append(CHAIN, [Entry({"action": events.LOGIN_FAILURE, "actor": "user:anna",
                                     "target": "anna", "outcome": "refused", "details": {}},
                                    ts="2020-01-01T00:00:00.000000Z")])
    log.record(events.LOGIN_SUCCESS, actor="user:anna", target="anna")
    log.record(events.ROLE_CHANGE, actor="cli:root", target="bob", role="operator")
    log.record(events.LOGIN_FAILURE, actor="user:bob", target="bob", outcome="refused")
    assert [e.action for e in log.events(user="anna")] == ["login.failure", "login.success"]
    assert [e.target for e in log.events(user="bob")] == ["bob", "bob"]
    assert [e.seq for e in log.events(action="login.")] == [1, 2, 4]
    assert [e.seq for e in log.events(action=events.ROLE_CHANGE)] == [3]
    assert [e.seq for e in log.events(since=datetime(2021, 1, 1, tzinfo=UTC))] == [2, 3, 4]


def test_tail_prints_the_latest_matching_events(tmp_path: Path, log: AuditLog) -> None:
    for n in range(5):
        log.record(events.SECRET_READ, actor="cli:root", target=f"exchange-key-{n}")
    log.record(events.DEVICE_ADD, actor="cli:root", target="kitchen", kind="esp32")
    out = _cli(tmp_path, "audit", "tail", "--action", "secret.", "-n", "2").stdout.splitlines()
    assert len(out) == 2 and "exchange-key-3" in out[0] and "exchange-key-4" in out[1]
    assert "kind=esp32" in _cli(tmp_path, "audit", "tail", "--user", "kitchen").stdout


def _old_and_new(log: AuditLog, old: int, new: int) -> None:
    log.ledger.append(CHAIN, [Entry({"action": events.LOGIN_SUCCESS, "actor": f"user:old{n}",
                                     "target": None, "outcome": "ok", "details": {}},
                                    ts=f"2020-01-01T00:00:{n:02d}.000000Z") for n in range(old)])
    for n in range(new):
        log.record(events.LOGIN_SUCCESS, actor=f"user:new{n}")


def test_archiving_moves_old_events_to_a_file_that_verifies(tmp_path: Path,
                                                            log: AuditLog) -> None:
    _old_and_new(log, 10, 5)
    done = log.archive(datetime(2021, 1, 1, tzinfo=UTC), tmp_path / "archive", actor="cli:root")
    assert done and (done.first_seq, done.through_seq) == (1, 10)
    assert [e.seq for e in log.events()][:2] == [11, 12]  # gone from the database
    with open(done.file, encoding="utf-8") as lines:
        alone = verify_bundle(lines, log.ledger.signer.public_key)
    assert alone.ok and alone.records == 10, alone
    verdict, segments = log.verify()
    assert verdict.ok and verdict.first_seq == 11 and verdict.records == 6, verdict  # + the archiving
    assert [s.ok for _, s in segments] == [True]
    (last,) = log.events(action=events.ARCHIVE)
    assert last.details == {"first_seq": 1, "through_seq": 10, "sha256": done.sha256}
    assert last.target == done.file and last.seq == 16

    # A second segment starts where the first ended and verifies alone, anchored by the
    # signed checkpoint at the seq before it.
    _old_and_new(log, 0, 3)
    second = log.ledger.archive(CHAIN, 14, tmp_path / "archive")
    with open(second.file, encoding="utf-8") as lines:
        assert verify_bundle(lines, log.ledger.signer.public_key).ok
    first_line = Path(second.file).read_text().splitlines()[1]
    assert '"type":"checkpoint"' in first_line and '"seq":10' in first_line
    assert _cli(tmp_path, "audit", "verify").returncode == 0


def test_a_changed_archive_or_a_deleted_record_after_it_fails_verify(tmp_path: Path,
                                                                     log: AuditLog) -> None:
    _old_and_new(log, 6, 4)
    done = log.archive(datetime(2021, 1, 1, tzinfo=UTC), tmp_path / "archive", actor="cli:root")
    assert done
    path = Path(done.file)
    original = path.read_text()
    path.write_text(original.replace("user:old3", "user:mallory"))
    out = _cli(tmp_path, "audit", "verify")
    assert out.returncode == 1 and "FAILED at seq 4" in out.stdout
    path.write_text(original)

    with sqlite3.connect(tmp_path / "circles.db") as db:
        db.execute("DELETE FROM ledger_records WHERE chain = ? AND seq = 7", (CHAIN,))
    verdict, _ = log.verify()
    assert not verdict.ok and verdict.first_bad_seq == 7


def test_an_archive_file_that_is_gone_fails_unless_allowed_or_found(tmp_path: Path,
                                                                    log: AuditLog) -> None:
    _old_and_new(log, 6, 2)
    done = log.archive(datetime(2021, 1, 1, tzinfo=UTC), tmp_path / "archive", actor="cli:root")
    assert done
    elsewhere = tmp_path / "backup"
    elsewhere.mkdir()
    Path(done.file).rename(elsewhere / Path(done.file).name)
    out = _cli(tmp_path, "audit", "verify")
    assert out.returncode == 1 and "is missing" in out.stdout
    allowed = _cli(tmp_path, "audit", "verify", "--allow-missing")
    assert allowed.returncode == 0 and "not checked" in allowed.stdout
    found = _cli(tmp_path, "audit", "verify", "--archive-dir", str(elsewhere))
    assert found.returncode == 0, found.stdout


def test_deleting_the_oldest_records_behind_a_forged_archive_fails(tmp_path: Path,
                                                                   log: AuditLog) -> None:
    """Someone with the database but not the signing key removes seq 1..5 and records an
    "archive" of them: the file it names does not exist, or, made from other records, does
    not verify against the box's key and the archived hash."""
    _old_and_new(log, 0, 12)
    log.ledger.checkpoint(CHAIN)
    with sqlite3.connect(tmp_path / "circles.db") as db:
        (hash5,) = db.execute("SELECT hash FROM ledger_records WHERE chain = ? AND seq = 5",
                              (CHAIN,)).fetchone()
        db.execute("INSERT INTO ledger_checkpoints SELECT chain, 5, hash, ts, signature FROM "
                   "ledger_checkpoints WHERE chain = ? LIMIT 1", (CHAIN,))
        db.execute("DELETE FROM ledger_records WHERE chain = ? AND seq <= 5", (CHAIN,))
        db.execute("INSERT INTO ledger_archives VALUES (?, 5, 1, ?, ?, ?, '2020')",
                   (CHAIN, hash5, str(tmp_path / "nowhere.jsonl"), "0" * 64))
    out = _cli(tmp_path, "audit", "verify")
    assert out.returncode == 1 and "FAILED" in out.stdout


def test_an_archive_row_that_leaves_a_gap_fails(tmp_path: Path, log: AuditLog) -> None:
    _old_and_new(log, 6, 4)
    done = log.archive(datetime(2021, 1, 1, tzinfo=UTC), tmp_path / "archive", actor="cli:root")
    assert done
    with sqlite3.connect(tmp_path / "circles.db") as db:
        db.execute("UPDATE ledger_archives SET first_seq = 3 WHERE chain = ?", (CHAIN,))
    _, segments = log.verify()
    assert [(s.ok, s.first_bad_seq) for _, s in segments] == [(False, 1)]


def test_a_bundle_cut_at_a_checkpoint_says_what_it_does_not_hold(tmp_path: Path,
                                                                 log: AuditLog) -> None:
    _old_and_new(log, 0, 9)
    log.ledger.checkpoint(CHAIN)
    _old_and_new(log, 0, 3)
    out = tmp_path / "audit.jsonl"
    assert _cli(tmp_path, "ledger", "export", "--chain", CHAIN, "--out", str(out)).returncode == 0
    lines = out.read_text().splitlines()
    first_checkpoint = next(i for i, line in enumerate(lines) if '"seq":9' in line
                            and '"type":"checkpoint"' in line)
    cut = [lines[0]] + lines[first_checkpoint:]
    out.write_text("\n".join(cut) + "\n")
    checked = _cli(tmp_path, "ledger", "verify-bundle", str(out))
    assert checked.returncode == 0  # intact as far as it goes, and it says how far that is
    assert "(seq 10..12)" in checked.stdout and "records before seq 10 are not here" in checked.stdout


def test_records_deleted_from_the_start_without_an_archive_are_detected(tmp_path: Path,
                                                                        log: AuditLog) -> None:
    _old_and_new(log, 0, 8)
    log.ledger.checkpoint(CHAIN)  # even a signed checkpoint in the middle does not excuse it
    with sqlite3.connect(tmp_path / "circles.db") as db:
        db.execute("DELETE FROM ledger_records WHERE chain = ? AND seq <= 3", (CHAIN,))
    verdict, _ = log.verify()
    assert not verdict.ok and verdict.first_bad_seq == 1


def test_export_after_an_archive_starts_with_its_anchor(tmp_path: Path, log: AuditLog) -> None:
    _old_and_new(log, 4, 3)
    assert log.archive(datetime(2021, 1, 1, tzinfo=UTC), tmp_path / "a", actor="cli:root")
    out = tmp_path / "audit.jsonl"
    assert _cli(tmp_path, "ledger", "export", "--chain", CHAIN, "--out", str(out)).returncode == 0
    key = tmp_path / "keys" / "ledger-ed25519.pub"
    checked = _cli(tmp_path, "ledger", "verify-bundle", str(out), "--public-key", str(key))
    assert checked.returncode == 0, checked.stdout
    assert open_ledger(CoreSettings(state_dir=tmp_path)).first_seq(CHAIN) == 5
