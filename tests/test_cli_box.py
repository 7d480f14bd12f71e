"""The command line as provisioning uses it on a box: root acting as the service user,
`circles user login` checking a password as the panel does, and `circles db` moving the
schema up and down."""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from appliance import db
from appliance.config import CoreSettings
from appliance.security import audit as events
from appliance.security.audit import AuditLog
from appliance.security.crypto import Keyring
from appliance.security.users import Users
from tests.helpers import circles, circles_env

PASSWORD = "correct horse battery staple"


# -- root acts as the service user ---------------------------------------------------------------
ACT_AS = """
import json, os, sys
from pathlib import Path
from appliance.cli import act_as

os.umask(0o022)
switched = act_as(sys.argv[1])
umask = os.umask(0)
os.umask(umask)
made = Path(sys.argv[2])
made.write_text("x")
try:
    os.setuid(0)
    root_back = True
except PermissionError:
    root_back = False
print(json.dumps({
    "switched": switched, "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
    "groups": sorted(os.getgroups()), "umask": umask, "root_back": root_back,
    "env": [os.environ.get(k) for k in ("HOME", "USER", "LOGNAME")],
    "file": [made.stat().st_uid, made.stat().st_mode & 0o777]}))
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder any user may write to (pytest's own are root's, 0700)."""
    with tempfile.TemporaryDirectory(prefix="circles-act-as-") as folder:
        os.chmod(folder, 0o777)
        yield Path(folder)


def _act_as(name: str, made: Path) -> dict:
    env = {**os.environ, "HOME": "/root", "USER": "root", "LOGNAME": "root"}
    done = subprocess.run([sys.executable, "-c", ACT_AS, name, str(made)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_root_acts_as_the_user_for_good(shared_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    seen = _act_as("nobody", shared_dir / "made")
    assert seen["switched"] is True
    assert seen["ids"] == [nobody.pw_uid] * 2 + [nobody.pw_gid] * 2
    assert seen["groups"] == sorted(set(os.getgrouplist("nobody", nobody.pw_gid)))
    assert seen["umask"] == 0o077 and seen["root_back"] is False
    assert seen["env"] == [nobody.pw_dir, "root", "root"]  # the person stays named, for the audit
    assert seen["file"] == [nobody.pw_uid, 0o600]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_without_the_user_nothing_changes(shared_dir: Path) -> None:
    seen = _act_as("no-such-user-xyz", shared_dir / "made")
    assert seen["switched"] is False
    assert seen["ids"] == [0, 0, 0, 0] and seen["umask"] == 0o022
    assert seen["env"] == ["/root", "root", "root"]
    assert seen["file"] == [0, 0o644]


HANDED = """
import json, os, sys
from pathlib import Path
from appliance.cli import act_as
from appliance.security.crypto import Keyring

act_as("nobody", credstore=Path(sys.argv[1]))
keyring = Keyring.load_or_create(Path(sys.argv[2]))
print(json.dumps({"ids": keyring.ids, "read_only": keyring.read_only,
                  "folder": os.environ["CREDENTIALS_DIRECTORY"]}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_keyring_in_the_credstore_is_handed_over_as_systemd_does(
        shared_dir: Path, tmp_path: Path) -> None:
    """The units load /etc/credstore/circles-keyring as a credential; the command, as the
    same user, must use that keyring, not make a second one in the state directory."""
    credstore, state = tmp_path / "credstore", shared_dir / "state"
    made = Keyring.load_or_create(tmp_path / "elsewhere")
    credstore.mkdir(mode=0o700)
    made.path.rename(credstore / "circles-keyring")
    done = subprocess.run([sys.executable, "-c", HANDED, str(credstore), str(state)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["ids"] == made.ids and seen["read_only"] is True
    assert not (state / "keys").exists()  # no second keyring
    assert not Path(seen["folder"]).exists()  # the copy is gone with the command


# -- circles user login --------------------------------------------------------------------------
@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def login(state: Path, name: str, stdin: str, *args: str, **env: str) -> tuple[int, str]:
    done = circles(circles_env(state, **env), "user", "login", name, *args, stdin=stdin)
    return done.returncode, (done.stdout + done.stderr).strip()


def add(state: Path, name: str, *args: str, stdin: str = PASSWORD + "\n") -> list[str]:
    done = circles(circles_env(state), "user", "add", name, *args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def audit(state: Path, action: str) -> list[events.AuditEvent]:
    return list(AuditLog.open(CoreSettings(state_dir=state)).events(action=action))


def test_login_checks_the_password_and_audit_logs_it(state: Path) -> None:
    add(state, "anna", "--role", "operator")
    ok = "login ok: anna (role operator); no authenticator app yet (the panel asks for one first)"
    assert login(state, "anna", PASSWORD + "\n") == (0, ok)
    assert login(state, "anna", "not her password\n") == (
        1, "login refused: wrong name, password or code")
    assert login(state, "nobody-here", PASSWORD + "\n") == (
        1, "login refused: wrong name, password or code")
    assert login(state, "anna", "") == (1, "error: no password given; nothing checked")
    failures = audit(state, events.LOGIN_FAILURE)  # the empty password was not an attempt
    assert [(e.target, e.details["source"], e.details["step"]) for e in failures] == [
        ("anna", "cli", "password"), (None, "cli", "password")]
    [success] = audit(state, events.LOGIN_SUCCESS)
    assert (success.target, success.outcome, success.details["source"]) == ("anna", "ok", "cli")


def test_a_generated_password_logs_in_and_must_be_changed(state: Path) -> None:
    password = add(state, "ben", "--generate", stdin="")[2]
    assert login(state, "ben", password + "\n") == (
        0, "login ok: ben (role viewer); must change the password at first panel login")


def test_a_user_with_totp_needs_the_code(state: Path) -> None:
    add(state, "carla", "--role", "admin")
    users = Users.open(CoreSettings(state_dir=state), Keyring.load_or_create(state))
    totp: pyotp.TOTP = pyotp.parse_uri(users.totp.begin_enrolment("carla").uri)  # type: ignore[assignment]
    users.totp.confirm_enrolment("carla", totp.now(), actor="cli:test")

    def next_code() -> str:  # the step after the one enrolment used: each is good once
        return totp.at(int(time.time()) + 30)

    assert login(state, "carla", PASSWORD + "\n") == (
        1, "error: no TOTP code given; the login is not finished")
    wrong = totp.at(int(time.time()) - 3600)
    assert login(state, "carla", PASSWORD + "\n", "--code", wrong) == (
        1, "login refused: wrong name, password or code")
    assert login(state, "carla", f"{PASSWORD}\n{next_code()}\n") == (
        0, "login ok: carla (role admin)")
    success = audit(state, events.LOGIN_SUCCESS)[-1]
    assert (success.details["second_factor"], success.details["source"]) == ("totp", "cli")


def test_console_failures_lock_the_console_only(state: Path) -> None:
    add(state, "dora")
    for _ in range(2):
        assert login(state, "dora", "wrong\n", CIRCLES_SECURITY__LOCKOUT_THRESHOLD="2")[0] == 1
    code, said = login(state, "dora", PASSWORD + "\n", CIRCLES_SECURITY__LOCKOUT_THRESHOLD="2")
    assert code == 1, said
    assert said.startswith("login refused: too many failed attempts; locked until "), said
    users = Users.open(CoreSettings(state_dir=state))
    assert users.authenticate("dora", PASSWORD, source="192.0.2.7").ok  # the panel still works


# -- circles db ----------------------------------------------------------------------------------
def revisions() -> list[str]:
    """This code's migrations, newest first."""
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS))
    return [script.revision for script in ScriptDirectory.from_config(config).walk_revisions()]


def run_db(state: Path, *args: str) -> tuple[int, str]:
    done = circles(circles_env(state), "db", *args)
    return done.returncode, (done.stdout + done.stderr).strip()


def test_db_upgrade_current_heads_and_downgrade(state: Path) -> None:
    head, before = revisions()[:2]
    assert run_db(state, "current") == (0, "empty")
    assert run_db(state, "heads") == (0, head)
    assert run_db(state, "upgrade") == (0, f"database at {head} (head)")
    assert run_db(state, "current") == (0, head)
    assert run_db(state, "downgrade", before) == (0, f"database at {before}")
    assert run_db(state, "current") == (0, before)
    assert run_db(state, "upgrade") == (0, f"database at {head} (head)")
    assert run_db(state, "downgrade", "no-such-revision")[0] == 1


def test_a_database_newer_than_the_release_is_refused(state: Path) -> None:
    assert run_db(state, "upgrade")[0] == 0
    with sqlite3.connect(state / "circles.db") as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    assert run_db(state, "current") == (0, "9999")
    code, said = run_db(state, "upgrade")
    assert code == 1 and "'9999'" in said, said


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return db.default_url(tmp_path)
    return str(request.getfixturevalue("postgres_database"))


def test_every_migration_goes_down_and_up_again(database_url: str) -> None:
    engine = db.make_engine(database_url)
    db.migrate(engine)
    tables = set(inspect(engine).get_table_names())
    for revision, older in zip(revisions(), [*revisions()[1:], None], strict=True):
        db.downgrade(engine, older or "base")
        assert db.current_revision(engine) == older, revision
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    db.migrate(engine)
    assert db.current_revision(engine) == db.head_revision()
    assert set(inspect(engine).get_table_names()) == tables
    engine.dispose()
