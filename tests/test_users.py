"""Users: password policy, hashing, lockout, reset tokens, roles, the first admin, the CLI."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from argon2 import PasswordHasher
from sqlalchemy import Engine, text

from appliance.config import CoreSettings, SecuritySettings
from appliance.db import make_engine, migrate
from appliance.errors import AuthError, ValidationFailed
from appliance.ledger import Ledger, Signer
from appliance.security import audit as events
from appliance.security.audit import AuditLog
from appliance.security.crypto import Keyring
from appliance.security.login import LoginResult, Outcome
from appliance.security.passwords import PasswordPolicyError, check_policy, generate_password
from appliance.security.permissions import Role
from appliance.security.users import FIRST_ADMIN, UnknownUser, Users, first_start
from tests.helpers import circles as run_circles
from tests.helpers import circles_env

# Cheap Argon2 parameters: the tests hash hundreds of times.
FAST: dict[str, Any] = dict(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "correct horse battery staple"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class CountingHasher(PasswordHasher):
    """Argon2 that counts its work, to compare two code paths without timing them."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls = 0

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self.calls += 1
        return super().hash(password, salt=salt)

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.calls += 1
        return super().verify(hash, password)


@dataclass
class Box:
    users: Users
    audit: AuditLog
    clock: Clock
    engine: Engine
    state: Path

    def actions(self) -> list[str]:
        return [e.action for e in self.audit.events()]

    def again(self, **kw: Any) -> Users:
        """Another Users over the same database (another process, other settings)."""
        options: dict[str, Any] = dict(keyring=Keyring.load_or_create(self.state), clock=self.clock,
                                       hasher=PasswordHasher(**FAST))
        options.update(kw)
        settings = options.pop("settings", self.users.settings)
        return Users(self.engine, self.audit, settings, **options)


def make_box(tmp_path: Path, url: str | None = None) -> Box:
    """Users over a new SQLite file (or the database `url`), its audit chain and keyring in
    `tmp_path`."""
    engine = make_engine(url or f"sqlite:///{tmp_path / 'x.db'}")
    migrate(engine)
    audit = AuditLog(Ledger(engine, Signer.load_or_create(tmp_path)))
    clock = Clock()
    users = Users(engine, audit, SecuritySettings(), keyring=Keyring.load_or_create(tmp_path),
                  clock=clock, hasher=PasswordHasher(**FAST))
    return Box(users, audit, clock, engine, tmp_path)


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return make_box(tmp_path)


# -- the password policy ---------------------------------------------------------------------
@pytest.mark.parametrize(("password", "username", "reason"), [
    ("Tr0ub4dor&3", "alice", "at least 12 characters"),
    ("aaaaaaaaaaaaaaaa", "alice", "too few characters"),
    ("abababababab12", "alice", "too few characters"),
    ("1qaz2wsx3edc", "alice", "most common passwords"),
    ("Password2024!", "alice", "most common passwords"),
    ("!!baseball1234567", "alice", "most common passwords"),
    ("Zebrafinch-77x", "zebrafinch-77x", "the username"),
    ("zebrafinch-77x!!!", "zebrafinch-77x", "the username"),
    ("x" * 1025 + "abcde", "alice", "at most 1024"),
])
def test_policy_refuses_with_a_reason(password: str, username: str, reason: str) -> None:
    with pytest.raises(PasswordPolicyError, match=reason) as refused:
        check_policy(password, username)
    assert password not in str(refused.value)
    assert isinstance(refused.value, ValidationFailed)


def test_policy_accepts_long_uncommon_passwords() -> None:
    for password in (PASSWORD, "Vh7#kq2Lm9!pZ", "zebrafinch-77x-oak"):
        check_policy(password, "zebrafinch-77x")
    generated = {generate_password() for _ in range(20)}
    assert len(generated) == 20
    for password in generated:
        check_policy(password, FIRST_ADMIN)


def test_add_refuses_a_weak_password_and_bad_names(box: Box) -> None:
    with pytest.raises(PasswordPolicyError):
        box.users.add("alice", "password1234", Role.VIEWER, actor="cli:t")
    with pytest.raises(ValidationFailed, match="username"):
        box.users.add("al ice", PASSWORD, Role.VIEWER, actor="cli:t")
    with pytest.raises(ValidationFailed, match="unknown role"):
        box.users.add("alice", PASSWORD, "root", actor="cli:t")
    box.users.add("Alice", PASSWORD, Role.VIEWER, actor="cli:t")
    with pytest.raises(ValidationFailed, match="already exists"):
        box.users.add("ALICE", PASSWORD, Role.VIEWER, actor="cli:t")
    assert [u.username for u in box.users.list_users()] == ["alice"]
    assert box.users.authenticate("  ALICE ", PASSWORD).ok


# -- hashing -----------------------------------------------------------------------------------
def stored_hash(box: Box, name: str) -> str:
    with box.engine.connect() as conn:
        return str(conn.execute(text("select password_hash from users where username = :n"),
                                {"n": name}).scalar_one())


def test_passwords_are_argon2id_and_rehashed_when_parameters_change(box: Box) -> None:
    box.users.add("alice", PASSWORD, Role.VIEWER, actor="cli:t")
    before = stored_hash(box, "alice")
    assert before.startswith("$argon2id$") and "t=1" in before and PASSWORD not in before
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    assert stronger.check_needs_rehash(before)
    upgraded = box.again(hasher=stronger)
    assert not upgraded.authenticate("alice", "wrong password entirely").ok
    assert stored_hash(box, "alice") == before  # only the right password may rehash
    assert upgraded.authenticate("alice", PASSWORD).ok
    after = stored_hash(box, "alice")
    assert after != before and "t=2" in after and not stronger.check_needs_rehash(after)
    assert upgraded.authenticate("alice", PASSWORD).ok
    assert stored_hash(box, "alice") == after


# -- lockout -----------------------------------------------------------------------------------
def fail(users: Users, times: int, name: str = "alice") -> list[LoginResult]:
    return [users.authenticate(name, "not the password at all") for _ in range(times)]


def test_lockout_grows_and_a_success_resets_it(box: Box) -> None:
    users, clock = box.users, box.clock
    users.add("alice", PASSWORD, Role.OPERATOR, actor="cli:t")
    results = fail(users, 5)
    assert [r.outcome for r in results] == [Outcome.REFUSED] * 4 + [Outcome.LOCKED]
    assert results[-1].locked_until == clock.now + timedelta(minutes=15)
    # Locked: even the right password is not accepted.
    assert users.authenticate("alice", PASSWORD).outcome is Outcome.LOCKED
    clock.advance(minutes=14, seconds=59)
    assert users.authenticate("alice", PASSWORD).outcome is Outcome.LOCKED
    clock.advance(seconds=2)
    # The next lockout in a row lasts twice as long, then four times.
    results = fail(users, 5)
    assert results[-1].outcome is Outcome.LOCKED
    assert results[-1].locked_until == clock.now + timedelta(minutes=30)
    clock.advance(minutes=31)
    assert fail(users, 5)[-1].locked_until == clock.now + timedelta(minutes=60)
    clock.advance(minutes=61)
    # A success resets both counters: the next lockout is 15 minutes again.
    assert users.authenticate("alice", PASSWORD).ok
    assert [r.outcome for r in fail(users, 4)] == [Outcome.REFUSED] * 4
    assert users.authenticate("alice", PASSWORD).ok
    assert [r.outcome for r in fail(users, 4)] == [Outcome.REFUSED] * 4
    last = fail(users, 1)[0]
    assert last.outcome is Outcome.LOCKED and last.locked_until == clock.now + timedelta(minutes=15)
    assert box.actions().count(events.LOCKOUT) == 4
    assert users.get("alice") and users.get("alice").locked_until == last.locked_until  # type: ignore[union-attr]


def test_lockout_is_kept_per_address(box: Box) -> None:
    """Failures from one address lock the name for that address only: the owner still logs
    in from another, and other names still log in from the failing one (a shared proxy)."""
    users = box.users
    users.add("alice", PASSWORD, Role.OPERATOR, actor="cli:t")
    users.add("bob", PASSWORD, Role.VIEWER, actor="cli:t")
    results = [users.authenticate("alice", "wrong guess here", source="10.0.0.9")
               for _ in range(5)]
    assert results[-1].outcome is Outcome.LOCKED
    assert users.authenticate("alice", PASSWORD, source="10.0.0.9").outcome is Outcome.LOCKED
    assert users.authenticate("alice", PASSWORD, source="10.0.0.2").ok
    assert users.authenticate("bob", PASSWORD, source="10.0.0.9").ok
    # A wrong current password when changing it counts for its address too.
    with pytest.raises(AuthError, match="locked"):
        users.change_password("alice", PASSWORD, "another long passphrase", source="10.0.0.9")
    users.change_password("alice", PASSWORD, "another long passphrase", source="10.0.0.2")
    # A name without an account answers the same way, per address.
    ghost = [users.authenticate("ghost", "wrong guess here", source="10.0.0.9") for _ in range(5)]
    assert ghost[-1].outcome is Outcome.LOCKED
    assert users.authenticate("ghost", "x", source="10.0.0.3").outcome is Outcome.REFUSED


def test_lockout_is_capped_and_configurable(box: Box) -> None:
    settings = SecuritySettings(lockout_threshold=2, lockout_minutes=10, lockout_max_minutes=25)
    users = box.again(settings=settings)
    users.add("alice", PASSWORD, Role.VIEWER, actor="cli:t")
    lengths = []
    for _ in range(3):
        result = fail(users, 2)[-1]
        assert result.locked_until
        lengths.append(result.locked_until - box.clock.now)
        box.clock.advance(hours=1)
    assert lengths == [timedelta(minutes=10), timedelta(minutes=20), timedelta(minutes=25)]


def test_an_unknown_user_gets_the_same_answer_for_the_same_work(box: Box) -> None:
    box.users.add("alice", PASSWORD, Role.VIEWER, actor="cli:t")
    answers, work = [], []
    for name in ("alice", "mallory", "not a valid name!"):
        counting = CountingHasher(**FAST)
        users = box.again(hasher=counting)
        answers.append(users.authenticate(name, "not the password at all"))
        work.append(counting.calls)
    assert answers[0] == answers[1] == answers[2] == LoginResult(Outcome.REFUSED)
    assert work[0] == work[1] == work[2] >= 2  # the dummy hash, then one verification
    failures = list(box.audit.events(action=events.LOGIN_FAILURE))
    assert [f.target for f in failures] == ["alice", None, None]


def test_a_name_without_an_account_locks_like_one_with_an_account(box: Box) -> None:
    box.users.add("alice", PASSWORD, Role.VIEWER, actor="cli:t")
    for name in ("alice", "mallory"):
        results = fail(box.users, 5, name)
        assert [r.outcome for r in results] == [Outcome.REFUSED] * 4 + [Outcome.LOCKED], name
        assert results[-1].locked_until == box.clock.now + timedelta(minutes=15)
    with box.engine.connect() as conn:  # the name itself is not kept
        assert "mallory" not in str(conn.execute(text("select * from login_throttle")).all())


def test_requests_at_once_get_no_more_guesses_than_the_threshold(box: Box) -> None:
    """Attempts are counted before they are checked: with five still being checked, a sixth
    is refused without a look at its password (even the right one)."""
    class Watching(CountingHasher):
        checked: list[str] = []

        def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
            self.checked.append(str(hash))
            return super().verify(hash, password)

    box.users.add("alice", PASSWORD, Role.VIEWER, actor="cli:t")
    users = box.again(hasher=Watching(**FAST))
    for _ in range(5):
        _, early = users.login._open("alice", box.clock.now, "password", None)
        assert early is None
    sixth = users.authenticate("alice", PASSWORD)
    assert sixth.outcome is Outcome.LOCKED and sixth.locked_until
    stored = users.snapshot("alice")
    assert stored and stored.password_hash not in Watching.checked  # never looked at


def test_an_overlong_password_is_refused_without_hashing_all_of_it(box: Box) -> None:
    box.users.add("alice", PASSWORD, Role.VIEWER, actor="cli:t")
    assert box.users.authenticate("alice", PASSWORD + "x" * 5000).outcome is Outcome.REFUSED
    assert box.users.authenticate("alice", PASSWORD).ok


# -- passwords: change, expiry, reset tokens ------------------------------------------------
def test_first_admin_must_change_password(box: Box) -> None:
    password = box.users.ensure_first_admin(actor="cli:t")
    assert password and box.users.ensure_first_admin(actor="cli:t") is None
    result = box.users.authenticate(FIRST_ADMIN, password)
    assert result.outcome is Outcome.MUST_CHANGE_PASSWORD and result.role is Role.ADMIN
    assert result.must_enrol_totp
    with pytest.raises(AuthError, match="current password is wrong"):
        box.users.change_password(FIRST_ADMIN, "not the password at all", PASSWORD)
    with pytest.raises(PasswordPolicyError):
        box.users.change_password(FIRST_ADMIN, password, "admin1234567")
    with pytest.raises(PasswordPolicyError, match="current password"):
        box.users.change_password(FIRST_ADMIN, password, password)
    box.users.change_password(FIRST_ADMIN, password, PASSWORD)
    assert box.users.authenticate(FIRST_ADMIN, PASSWORD).ok
    assert box.users.authenticate(FIRST_ADMIN, password).outcome is Outcome.REFUSED
    assert events.PASSWORD_CHANGE in box.actions()


def test_password_expiry_is_off_by_default_and_works_when_set(box: Box) -> None:
    box.users.add("alice", PASSWORD, Role.VIEWER, actor="cli:t")
    box.clock.advance(days=3650)
    assert box.users.authenticate("alice", PASSWORD).ok
    users = box.again(settings=SecuritySettings(password_max_age_days=90))
    assert users.authenticate("alice", PASSWORD).outcome is Outcome.EXPIRED
    users.change_password("alice", PASSWORD, "a brand new passphrase")
    box.clock.advance(days=89)
    assert users.authenticate("alice", "a brand new passphrase").ok
    box.clock.advance(days=1)
    assert users.authenticate("alice", "a brand new passphrase").outcome is Outcome.EXPIRED


def test_reset_token_is_single_use_expires_and_is_stored_hashed(box: Box) -> None:
    users, new = box.users, "a brand new passphrase"
    users.add("alice", PASSWORD, Role.VIEWER, actor="cli:t")
    fail(users, 5)  # locked: the reset lifts it
    issued = users.issue_reset_token("alice", actor="cli:t")
    assert issued.expires_at == box.clock.now + timedelta(minutes=30)
    assert issued.token not in repr(issued)
    with box.engine.connect() as conn:
        row = conn.execute(text("select * from users")).one()
    assert issued.token not in str(tuple(row))
    with pytest.raises(AuthError, match="invalid, used or expired"):
        users.redeem_reset_token("alice", issued.token + "x", new)
    with pytest.raises(PasswordPolicyError):  # a refused password does not use up the token
        users.redeem_reset_token("alice", issued.token, "password1234")
    users.redeem_reset_token("alice", issued.token, new)
    assert users.authenticate("alice", new).ok
    with pytest.raises(AuthError):
        users.redeem_reset_token("alice", issued.token, "another fine passphrase")
    late = users.issue_reset_token("alice", actor="cli:t")
    box.clock.advance(minutes=30, seconds=1)
    with pytest.raises(AuthError):
        users.redeem_reset_token("alice", late.token, "another fine passphrase")
    resets = list(box.audit.events(action=events.PASSWORD_RESET))
    assert [(e.details["step"], e.outcome) for e in resets] == [
        ("issued", "ok"), ("redeemed", "refused"), ("redeemed", "ok"), ("redeemed", "refused"),
        ("issued", "ok"), ("redeemed", "refused")]


# -- roles ---------------------------------------------------------------------------------------
def test_roles_change_and_the_last_admin_stays(box: Box) -> None:
    users = box.users
    users.add("root", PASSWORD, Role.ADMIN, actor="cli:t")
    users.add("alice", PASSWORD, Role.VIEWER, actor="cli:t")
    with pytest.raises(ValidationFailed, match="last admin"):
        users.set_role("root", Role.OPERATOR, actor="cli:t")
    with pytest.raises(ValidationFailed, match="last admin"):
        users.remove("root", actor="cli:t")
    assert users.set_role("alice", "admin", actor="cli:t").role is Role.ADMIN
    users.set_role("root", Role.VIEWER, actor="cli:t")
    users.remove("root", actor="cli:t")
    with pytest.raises(UnknownUser):
        users.set_role("root", Role.ADMIN, actor="cli:t")
    assert users.get("root") is None
    change = list(box.audit.events(action=events.ROLE_CHANGE))
    assert [(e.target, e.details) for e in change] == [
        ("alice", {"previous": "viewer", "role": "admin"}),
        ("root", {"previous": "admin", "role": "viewer"})]
    assert events.USER_REMOVE in box.actions()


def test_first_start_creates_the_admin_once(tmp_path: Path) -> None:
    settings = CoreSettings(state_dir=tmp_path)
    password = first_start(settings)
    assert password and first_start(settings) is None
    users = Users.open(settings)
    assert [(u.username, u.role, u.must_change_password) for u in users.list_users()] == [
        (FIRST_ADMIN, Role.ADMIN, True)]
    assert users.authenticate(FIRST_ADMIN, password).outcome is Outcome.MUST_CHANGE_PASSWORD


# -- the command line ------------------------------------------------------------------------
def circles(state: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return run_circles(circles_env(state), "user", *args, stdin=stdin)


def test_cli_end_to_end(tmp_path: Path) -> None:
    state = tmp_path / "state"
    runs: list[subprocess.CompletedProcess[str]] = []

    def ok(*args: str, stdin: str = "") -> list[str]:
        done = circles(state, *args, stdin=stdin)
        assert done.returncode == 0, done.stderr
        runs.append(done)
        return done.stdout.splitlines()

    def refused(*args: str, stdin: str = "") -> str:
        done = circles(state, *args, stdin=stdin)
        assert done.returncode == 1, done.stdout
        runs.append(done)
        return done.stderr

    assert ok("add", "alice", "--role", "operator", stdin=PASSWORD + "\n") == [
        "user alice added (role operator)"]
    added = ok("add", "bob", "--generate")
    assert added[:2] == ["user bob added (role viewer)",
                         "password (shown once; bob must change it at first login):"]
    bob_password = added[2]
    assert "password refused" in refused("add", "carol", stdin="password1234\n")
    assert "no password for carol given" in refused("add", "carol", stdin="\n")
    assert "already exists" in refused("add", "alice", stdin=PASSWORD + "\n")
    listing = ok("list")
    assert listing[0].split() == ["NAME", "ROLE", "TOTP", "LAST", "LOGIN", "STATE"]
    assert listing[1].split() == ["alice", "operator", "no", "never", "-"]
    assert listing[2].split() == ["bob", "viewer", "no", "never", "must", "change", "password"]
    assert ok("set-role", "alice", "admin") == ["user alice is now admin"]
    reset = ok("reset-password", "bob")
    assert reset[0].startswith("one-time reset token for bob, valid until ")
    token = reset[1]
    assert ok("totp-reset", "alice") == ["alice had no TOTP enrolled; nothing to remove"]
    assert "no user zed" in refused("set-role", "zed", "viewer")

    users = Users.open(CoreSettings(state_dir=state))
    assert users.authenticate("alice", PASSWORD).outcome is Outcome.OK
    assert users.authenticate("bob", bob_password).outcome is Outcome.MUST_CHANGE_PASSWORD
    users.redeem_reset_token("bob", token, "a brand new passphrase")
    assert users.authenticate("bob", "a brand new passphrase").ok
    assert ok("remove", "bob") == ["user bob removed"]
    assert "last admin" in refused("remove", "alice")

    done = [(e.action, e.target) for e in users.audit.events() if e.actor.startswith("cli:")]
    assert done == [(events.USER_ADD, "alice"), (events.USER_ADD, "bob"),
                    (events.ROLE_CHANGE, "alice"), (events.PASSWORD_RESET, "bob"),
                    (events.TOTP_RESET, "alice"), (events.USER_REMOVE, "bob")]
    # Nothing printed repeats a secret, except the two lines that exist to show one once.
    shown = {bob_password, token}
    printed = [line for run in runs for line in (run.stdout + run.stderr).splitlines()
               if line not in shown]
    assert len(printed) > 10
    for secret in (PASSWORD, bob_password, token, "password1234"):
        assert not [line for line in printed if secret in line]
