"""The ledger primitive on a real SQLite file and on a real PostgreSQL database."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import text

from appliance import db
from appliance.ledger import Entry, Ledger, Signer
from appliance.ledger_verify import canonical, verify_bundle
from tests.helpers import circles as run_circles
from tests.helpers import circles_env


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    """A migrated ledger in a new SQLite file or a new PostgreSQL database, its key in tmp_path."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_database")
    else:
        url = db.default_url(tmp_path)
    engine = db.make_engine(url)
    assert engine.dialect.name == request.param
    db.migrate(engine)
    yield Ledger(engine, Signer.load_or_create(tmp_path), checkpoint_every=5)
    engine.dispose()


def url_of(ledger: Ledger) -> str:
    return ledger.engine.url.render_as_string(hide_password=False)


def fill(ledger: Ledger, chain: str = "acct", n: int = 12) -> None:
    ledger.append(chain, [Entry({"i": i, "px": Decimal("101.25")}, key=f"k{i}") for i in range(n)])


def test_migration_is_explicit_and_recorded(ledger: Ledger) -> None:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(db.MIGRATIONS)).get_current_head()
    assert head is not None
    for _ in range(2):  # the second time: nothing to do
        with ledger.engine.connect() as conn:
            assert conn.execute(text("select version_num from alembic_version")).scalars().all() == [head]
        db.migrate(ledger.engine)


def test_append_is_idempotent_on_keys(ledger: Ledger) -> None:
    first = ledger.append("acct", [Entry({"a": 1}, key="e1"), Entry({"a": 2}, key="e2"),
                                   Entry({"a": 1}, key="e1")])
    assert [(a.seq, a.duplicate) for a in first] == [(1, False), (2, False), (1, True)]
    again = ledger.append("acct", [Entry({"a": 2}, key="e2"), Entry({"a": 3}, key="e3")])
    assert [(a.seq, a.duplicate) for a in again] == [(2, True), (3, False)]
    assert again[0].hash == first[1].hash
    assert ledger.count("acct") == 3 and ledger.head("acct")[0] == 3
    assert ledger.append("other", [Entry({"a": 1}, key="e1")])[0].seq == 1  # chains are apart


def test_decimals_are_exact_and_floats_refused(ledger: Ledger) -> None:
    ledger.append("acct", [Entry({"qty": Decimal("0.1"), "px": Decimal("1E+2")})])
    (record,) = ledger.records("acct")
    assert record["data"] == {"qty": "0.1", "px": "100"}
    with pytest.raises(TypeError, match="floats"):
        ledger.append("acct", [Entry({"qty": 0.1})])
    with pytest.raises(ValueError):
        ledger.append("acct", [Entry({"qty": Decimal("NaN")})])
    assert ledger.count("acct") == 1


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical({"b": 1, "a": ["é", None, True]}) == '{"a":["é",null,true],"b":1}'.encode()


def test_checkpoints_are_signed_and_verify(ledger: Ledger) -> None:
    fill(ledger)
    verdict = ledger.verify("acct")
    assert verdict.ok and verdict.records == 12
    assert [c["seq"] for c in ledger.checkpoints("acct")] == [12]
    fill(ledger, n=20)  # 8 new ones
    ledger.checkpoint("acct")
    assert ledger.verify("acct").signed_through == 20


def test_a_checkpoint_signed_elsewhere_is_seen_before_signing(ledger: Ledger) -> None:
    # Each Ledger remembers the last checkpoint it saw; another one (another process) may sign
    # meanwhile, and the database, not the memory, decides whether one is due.
    other = Ledger(ledger.engine, ledger.signer, checkpoint_every=5)

    def append(to: Ledger, n: int) -> None:
        to.append("acct", [Entry({"i": i}) for i in range(n)])

    append(ledger, 1)  # the first record is signed
    append(other, 5)  # seq 6: 5 since seq 1
    append(ledger, 1)  # seq 7: 6 since the checkpoint `ledger` saw, 1 since the real last one
    assert [c["seq"] for c in ledger.checkpoints("acct")] == [1, 6]
    append(ledger, 4)  # seq 11: 5 since seq 6
    assert [c["seq"] for c in ledger.checkpoints("acct")] == [1, 6, 11]
    assert ledger.verify("acct").signed_through == 11


def test_the_head_is_signed_again_after_the_interval(ledger: Ledger) -> None:
    import time

    timed = Ledger(ledger.engine, ledger.signer, checkpoint_interval_s=1.0)
    for i in range(3):
        timed.append("acct", [Entry({"i": i})])
    assert [c["seq"] for c in timed.checkpoints("acct")] == [1]
    time.sleep(1.05)
    timed.append("acct", [Entry({"i": 3})])
    assert [c["seq"] for c in timed.checkpoints("acct")] == [1, 4]


@pytest.mark.parametrize("damage,bad_seq", [
    ("update ledger_records set data = replace(data, '101.25', '101.26') where seq = 7", 7),
    ("delete from ledger_records where seq = 5", 5),
    ("update ledger_records set seq = -1 where seq = 3;"
     "update ledger_records set seq = 3 where seq = 4;"
     "update ledger_records set seq = 4 where seq = -1", 3),
    ("update ledger_records set ts = '2020-01-01T00:00:00.000000Z' where seq = 12", 12),
])
def test_tampering_is_found_at_its_seq(ledger: Ledger, damage: str, bad_seq: int) -> None:
    fill(ledger)
    with ledger.engine.begin() as conn:
        for statement in damage.split(";"):
            conn.execute(text(statement))
    verdict = ledger.verify("acct")
    assert not verdict.ok and verdict.first_bad_seq == bad_seq, verdict


def test_bundle_verifies_alone_and_a_hand_edit_fails(ledger: Ledger, tmp_path: Path) -> None:
    fill(ledger)
    buffer = io.StringIO()
    assert ledger.export("acct", buffer) == 12
    bundle = tmp_path / "bundle.jsonl"
    bundle.write_text(buffer.getvalue())
    key = tmp_path / "keys" / "ledger-ed25519.pub"
    done = subprocess.run([sys.executable, "-m", "appliance.ledger_verify", str(bundle),
                           "--public-key", str(key)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("ok: 12 records"), done.stdout

    # A forger changes a price and recomputes every hash: only the signature can tell.
    from appliance.ledger_verify import GENESIS, record_hash

    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    prev = GENESIS
    for item in lines:
        if item["type"] == "record":
            if item["seq"] == 4:
                item["data"]["px"] = "99.00"
            item["prev_hash"] = prev
            item["hash"] = prev = record_hash(prev, "acct", item["seq"], item["ts"], item["data"])
        elif item["type"] == "checkpoint":
            item["hash"] = prev
    verdict = verify_bundle([json.dumps(i) for i in lines], key_bytes(key))
    assert not verdict.ok and "signature" in verdict.reason

    # Dropping a record is found where the chain breaks.
    kept = [line for line in buffer.getvalue().splitlines() if '"seq":6,' not in line]
    verdict = verify_bundle(kept, key_bytes(key))
    assert not verdict.ok and verdict.first_bad_seq == 6


def key_bytes(path: Path) -> bytes:
    import base64

    return base64.b64decode(path.read_text())


def test_verifier_needs_only_stdlib_and_cryptography() -> None:
    probe = ("import sys, appliance.ledger_verify; "
             "print(sorted(m for m in ('sqlalchemy', 'pydantic', 'paho', 'alembic') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


APPENDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from appliance import db
    from appliance.ledger import Entry, Ledger, Signer
    url, state, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    ledger = Ledger(db.make_engine(url), Signer.load_or_create(state), checkpoint_every=50)
    for batch in range(20):
        ledger.append("shared", [Entry({"by": name, "n": batch * 10 + i}, key=f"{name}-{batch}-{i}")
                                 for i in range(10)])
""")


def test_concurrent_appenders_keep_one_valid_chain(ledger: Ledger, tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, url_of(ledger), str(tmp_path), f"p{i}"])
             for i in range(4)]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    verdict = ledger.verify("shared")
    assert verdict.ok, verdict
    assert verdict.records == 800 and ledger.head("shared")[0] == 800
    seen = sorted((r["data"]["by"], r["data"]["n"]) for r in ledger.records("shared"))
    assert seen == sorted((f"p{i}", n) for i in range(4) for n in range(200))


def test_cli_verify_export_and_verify_bundle(ledger: Ledger, tmp_path: Path) -> None:
    env = circles_env(tmp_path, CIRCLES_DATABASE__URL=url_of(ledger))

    def circles(*args: str) -> subprocess.CompletedProcess[str]:
        return run_circles(env, *args)

    fill(ledger)
    done = circles("ledger", "verify")
    assert done.returncode == 0 and "acct: ok, 12 records" in done.stdout, done.stderr
    bundle = tmp_path / "acct.jsonl"
    assert circles("ledger", "export", "--chain", "acct", "--out", str(bundle)).returncode == 0
    assert circles("ledger", "verify-bundle", str(bundle)).returncode == 0
    bundle.write_text(bundle.read_text().replace("101.25", "101.35", 1))
    done = circles("ledger", "verify-bundle", str(bundle))
    assert done.returncode == 1 and "FAILED at seq 1" in done.stdout
    with ledger.engine.begin() as conn:
        conn.execute(text("update ledger_records set hash = 'x' where seq = 9"))
    done = circles("ledger", "verify", "--chain", "acct")
    assert done.returncode == 1 and "FAILED at seq 9" in done.stdout
