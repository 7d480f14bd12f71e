"""TOTP: enrolment, the ±1 step window, replay protection, backup codes, encryption at rest;
the whole login on PostgreSQL, and a scan of the logs for anything secret."""

from __future__ import annotations

import base64
import logging
import re
import urllib.parse
from datetime import timedelta
from pathlib import Path
from typing import Literal

import pyotp
import pytest
from argon2 import PasswordHasher
from sqlalchemy import text

from appliance.errors import CirclesError, OperationalError
from appliance.security import audit as events
from appliance.security.crypto import Keyring
from appliance.security.login import Outcome
from appliance.security.permissions import Role
from appliance.security.totp import Factor, TotpError, match_step
from appliance.security.users import Users
from tests.helpers import circles, circles_env
from tests.test_users import FAST, PASSWORD, Box, fail, make_box


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return make_box(tmp_path)


def secret_of(uri: str) -> str:
    """The secret an authenticator app reads from the otpauth URI."""
    return urllib.parse.parse_qs(urllib.parse.urlparse(uri).query)["secret"][0]


def enrol(box: Box, name: str = "alice", role: Role = Role.OPERATOR) -> tuple[pyotp.TOTP, list[str]]:
    """A user with TOTP enrolled at the clock's current step; the app and the backup codes."""
    box.users.add(name, PASSWORD, role, actor="cli:t")
    app = pyotp.TOTP(secret_of(box.users.totp.begin_enrolment(name).uri))
    codes = box.users.totp.confirm_enrolment(name, app.at(box.clock.now))
    box.clock.advance(minutes=5)  # away from the step the confirmation used
    return app, codes


def at_step(box: Box, app: pyotp.TOTP, steps: int) -> str:
    return app.at(box.clock.now + timedelta(seconds=30 * steps))


def test_enrolment_gives_the_uri_and_a_qr_code(box: Box) -> None:
    box.users.add("alice", PASSWORD, Role.OPERATOR, actor="cli:t")
    enrolment = box.users.totp.begin_enrolment("alice")
    uri, svg = enrolment  # unpacks as (uri, qr_svg)
    parsed = urllib.parse.urlparse(uri)
    assert (parsed.scheme, parsed.netloc, parsed.path) == ("otpauth", "totp", "/Circles:alice")
    assert urllib.parse.parse_qs(parsed.query)["issuer"] == ["Circles"]
    assert len(secret_of(uri)) == 32 and secret_of(uri) not in repr(enrolment)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>") and "<path" in svg
    # Pending is not enrolled: the login does not ask for a code yet.
    assert not box.users.totp.is_enrolled("alice")
    assert box.users.authenticate("alice", PASSWORD).must_enrol_totp
    app = pyotp.TOTP(secret_of(uri))
    wrong = f"{(int(app.at(box.clock.now)) + 1) % 1_000_000:06d}"
    with pytest.raises(TotpError, match="does not match"):
        box.users.totp.confirm_enrolment("alice", wrong)
    codes = box.users.totp.confirm_enrolment("alice", app.at(box.clock.now))  # pending was kept
    assert len(codes) == len(set(codes)) == 10
    assert box.users.totp.is_enrolled("alice") and box.users.totp.backup_codes_left("alice") == 10
    with pytest.raises(TotpError, match="no TOTP enrolment"):
        box.users.totp.confirm_enrolment("alice", app.at(box.clock.now))
    assert [e.target for e in box.audit.events(action=events.TOTP_ENROL)] == ["alice"]


def test_one_step_either_side_is_accepted_two_are_not(box: Box) -> None:
    app, _ = enrol(box)
    verify = box.users.totp.verify
    assert verify("alice", at_step(box, app, -2)) is None
    assert verify("alice", at_step(box, app, +2)) is None
    assert verify("alice", at_step(box, app, -1)) is Factor.TOTP
    assert verify("alice", at_step(box, app, 0)) is Factor.TOTP
    assert verify("alice", at_step(box, app, +1)) is Factor.TOTP


def test_a_code_cannot_be_used_twice(box: Box) -> None:
    app, _ = enrol(box)
    verify = box.users.totp.verify
    code, earlier = at_step(box, app, 0), at_step(box, app, -1)
    assert verify("alice", code) is Factor.TOTP
    assert verify("alice", code) is None  # the same step again
    assert verify("alice", earlier) is None  # an earlier step, still inside the window
    box.clock.advance(seconds=30)
    assert verify("alice", code) is None  # now the previous step: used already
    assert verify("alice", at_step(box, app, 0)) is Factor.TOTP
    # Through the login: a replayed code is a failed attempt, not a login.
    first = box.users.authenticate("alice", PASSWORD)
    assert first.outcome is Outcome.NEEDS_TOTP and first.challenge
    assert box.users.authenticate_totp("alice", first.challenge, at_step(box, app, 0)).outcome \
        is Outcome.REFUSED


def test_match_step_reports_the_latest_new_step() -> None:
    from datetime import UTC, datetime

    app, now = pyotp.TOTP(pyotp.random_base32()), datetime(2031, 3, 1, tzinfo=UTC)
    step = app.timecode(now)
    assert match_step(app.secret, app.at(now), now) == step
    assert match_step(app.secret, app.at(now), now, after=step) is None
    assert match_step(app.secret, app.at(now), now, after=step - 1) == step
    assert match_step(app.secret, "12345", now) is None


def test_the_login_needs_the_code_once_enrolled(box: Box) -> None:
    app, _ = enrol(box, role=Role.OPERATOR)
    box.users.add("vera", PASSWORD, Role.VIEWER, actor="cli:t")
    assert not box.users.authenticate("vera", PASSWORD).must_enrol_totp  # a viewer may skip it
    step = box.users.authenticate("alice", PASSWORD)
    assert step.outcome is Outcome.NEEDS_TOTP and step.role is Role.OPERATOR and step.challenge
    assert not step.ok and step.challenge not in repr(step)
    code = at_step(box, app, 0)
    # The TOTP step without the password step, or with another challenge, is refused.
    assert box.users.authenticate_totp("alice", "made-up", code).outcome is Outcome.REFUSED
    assert box.users.authenticate_totp("vera", step.challenge, code).outcome is Outcome.REFUSED
    done = box.users.authenticate_totp("alice", step.challenge, code)
    assert done.ok and done.second_factor is Factor.TOTP and not done.must_enrol_totp
    # The challenge is used up by the login.
    box.clock.advance(seconds=30)
    again = box.users.authenticate_totp("alice", step.challenge, at_step(box, app, 0))
    assert again.outcome is Outcome.REFUSED
    # And it expires.
    late = box.users.authenticate("alice", PASSWORD)
    assert late.challenge
    box.clock.advance(minutes=5, seconds=1)
    assert box.users.authenticate_totp("alice", late.challenge, at_step(box, app, 0)).outcome \
        is Outcome.REFUSED
    successes = list(box.audit.events(action=events.LOGIN_SUCCESS, user="alice"))
    assert [e.details["second_factor"] for e in successes] == ["totp"]


def test_wrong_codes_lock_the_account_and_a_new_password_step_does_not_reset(box: Box) -> None:
    app, _ = enrol(box)
    wrong = f"{(int(at_step(box, app, 0)) + 500_000) % 1_000_000:06d}"
    step = box.users.authenticate("alice", PASSWORD)
    assert step.challenge
    for _ in range(4):
        assert box.users.authenticate_totp("alice", step.challenge, wrong).outcome is Outcome.REFUSED
    step = box.users.authenticate("alice", PASSWORD)  # the password again: still 4 failures
    assert step.challenge
    locked = box.users.authenticate_totp("alice", step.challenge, wrong)
    assert locked.outcome is Outcome.LOCKED and locked.locked_until
    assert box.users.authenticate("alice", PASSWORD).outcome is Outcome.LOCKED
    box.clock.advance(minutes=16)
    step = box.users.authenticate("alice", PASSWORD)
    assert step.challenge
    assert box.users.authenticate_totp("alice", step.challenge, at_step(box, app, 0)).ok


def test_a_step_up_code_counts_as_the_login_step_does(box: Box) -> None:
    """A code asked again before a money move: good once; good codes take their count back
    (five in a row lock nobody); wrong ones lock the person, for the login too."""
    app, _ = enrol(box)
    login = box.users.login
    for _ in range(5):
        box.clock.advance(seconds=30)
        assert login.step_up("alice", at_step(box, app, 0)).ok
    assert login.step_up("alice", at_step(box, app, 0)).outcome is Outcome.REFUSED  # used
    wrong = f"{(int(at_step(box, app, 1)) + 500_000) % 1_000_000:06d}"
    outcomes = [login.step_up("alice", wrong).outcome for _ in range(5)]
    assert outcomes == [Outcome.REFUSED] * 3 + [Outcome.LOCKED] * 2, outcomes
    assert login.step_up("alice", at_step(box, app, 1)).outcome is Outcome.LOCKED
    assert box.users.authenticate("alice", PASSWORD).outcome is Outcome.LOCKED


def test_a_lockout_ends_the_pending_totp_step(box: Box) -> None:
    from appliance.config import SecuritySettings

    users = box.again(settings=SecuritySettings(lockout_minutes=1))
    app, _ = enrol(box)
    step = users.authenticate("alice", PASSWORD)
    assert step.challenge
    wrong = f"{(int(at_step(box, app, 0)) + 500_000) % 1_000_000:06d}"
    assert [users.authenticate_totp("alice", step.challenge, wrong).outcome for _ in range(5)] \
        == [Outcome.REFUSED] * 4 + [Outcome.LOCKED]
    box.clock.advance(seconds=61)  # the lockout is over; the challenge would still be fresh
    assert users.authenticate_totp("alice", step.challenge, at_step(box, app, 0)).outcome \
        is Outcome.REFUSED


def test_backup_codes_are_single_use_and_stored_hashed(box: Box) -> None:
    app, codes = enrol(box)
    with box.engine.connect() as conn:
        stored = conn.execute(text("select code_hash, used_at from user_backup_codes")).all()
    assert len(stored) == 10 and all(h.startswith("$argon2id$") and u is None for h, u in stored)
    dump = repr(stored)
    assert not [c for c in codes if c in dump or c.replace("-", "") in dump]
    verify = box.users.totp.verify
    assert verify("alice", codes[0]) is Factor.BACKUP_CODE
    assert verify("alice", codes[0]) is None
    assert verify("alice", f" {codes[1].upper().replace('-', ' ')} ") is Factor.BACKUP_CODE
    assert box.users.totp.backup_codes_left("alice") == 8
    step = box.users.authenticate("alice", PASSWORD)
    assert step.challenge
    assert box.users.authenticate_totp("alice", step.challenge, codes[1]).outcome is Outcome.REFUSED
    done = box.users.authenticate_totp("alice", step.challenge, codes[2])
    assert done.ok and done.second_factor is Factor.BACKUP_CODE
    used = list(box.audit.events(action=events.BACKUP_CODE_USED))
    assert [e.details["remaining"] for e in used] == [9, 8, 7]
    # Enrolling again replaces the secret and the codes.
    new_app = pyotp.TOTP(secret_of(box.users.totp.begin_enrolment("alice").uri))
    assert verify("alice", at_step(box, app, 0)) is Factor.TOTP  # the old app until confirmed
    box.clock.advance(seconds=30)
    fresh = box.users.totp.confirm_enrolment("alice", new_app.at(box.clock.now))
    assert verify("alice", codes[3]) is None and set(fresh).isdisjoint(codes)
    box.clock.advance(seconds=30)
    assert verify("alice", at_step(box, app, 0)) is None
    assert verify("alice", at_step(box, new_app, 0)) is Factor.TOTP


def test_the_secret_is_encrypted_at_rest(box: Box, tmp_path: Path) -> None:
    app, _ = enrol(box)
    secret = app.secret
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("x.db*"))
    assert b"alice" in raw  # the scan does read the rows
    assert secret.encode() not in raw and base64.b32decode(secret) not in raw
    assert secret.lower().encode() not in raw
    # Another box's keyring (or a copy of the blob to another user) does not open it.
    other = box.again(keyring=Keyring.load_or_create(tmp_path / "elsewhere"))
    with pytest.raises(OperationalError, match="cannot be decrypted"):
        other.totp.verify("alice", at_step(box, app, 0))
    box.users.add("mallory", PASSWORD, Role.VIEWER, actor="cli:t")
    with box.engine.begin() as conn:
        conn.execute(text("update users set totp_secret = (select totp_secret from users where "
                          "username = 'alice') where username = 'mallory'"))
    with pytest.raises(OperationalError, match="cannot be decrypted"):
        box.users.totp.verify("mallory", at_step(box, app, 0))
    assert box.users.totp.verify("alice", at_step(box, app, 0)) is Factor.TOTP


def test_reset_removes_totp_and_backup_codes(box: Box) -> None:
    app, codes = enrol(box, role=Role.ADMIN)
    assert box.users.totp.reset("alice", actor="cli:t")
    assert not box.users.totp.reset("alice", actor="cli:t")
    result = box.users.authenticate("alice", PASSWORD)
    assert result.ok and result.must_enrol_totp
    assert box.users.totp.verify("alice", codes[0]) is None
    with box.engine.connect() as conn:
        assert conn.execute(text("select count(*) from user_backup_codes")).scalar_one() == 0
    resets = list(box.audit.events(action=events.TOTP_RESET))
    assert [(e.actor, e.details["had_totp"]) for e in resets] == [("cli:t", True), ("cli:t", False)]


def test_removing_a_user_removes_its_backup_codes(box: Box) -> None:
    enrol(box, name="alice")
    box.users.add("root", PASSWORD, Role.ADMIN, actor="cli:t")
    box.users.remove("alice", actor="cli:t")
    with box.engine.connect() as conn:
        assert conn.execute(text("select count(*) from user_backup_codes")).scalar_one() == 0


def test_keys_reencrypt_moves_totp_secrets_to_the_current_key(box: Box) -> None:
    app, _ = enrol(box)
    keyring = box.users.totp.keyring
    assert keyring
    old = keyring.current_id
    env = circles_env(box.state, CIRCLES_DATABASE__URL=str(box.engine.url))
    assert circles(env, "keys", "rotate").returncode == 0
    done = circles(env, "keys", "reencrypt")
    assert done.returncode == 0 and "1 TOTP secrets re-wrapped" in done.stdout, done.stderr
    keyring.reload()  # this process loaded the keyring before the rotation
    assert box.users.totp.rewrap_secrets() == 0
    with box.engine.connect() as conn:
        blob = conn.execute(text("select totp_secret from users")).scalar_one()
    assert keyring.key_id_of(blob) == keyring.current_id != old
    assert box.users.totp.verify("alice", at_step(box, app, 0)) is Factor.TOTP


class KeysReencryptedMeanwhile(PasswordHasher):
    """Argon2, with `circles keys rotate` and `circles keys reencrypt` run by another process
    during the first hash: while `confirm_enrolment` hashes the new backup codes, between its
    read of the pending secret and its write."""

    def __init__(self, box: Box) -> None:
        super().__init__(**FAST)
        self.box, self.done = box, False

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        if not self.done:
            self.done = True
            other = self.box.again()
            assert other.totp.keyring
            other.totp.keyring.rotate()
            assert other.totp.rewrap_secrets() == 1  # the pending secret, under the new key
        return super().hash(password, salt=salt)


def test_an_enrolment_survives_keys_reencrypt_while_it_is_confirmed(box: Box) -> None:
    box.users.add("alice", PASSWORD, Role.OPERATOR, actor="cli:t")
    app = pyotp.TOTP(secret_of(box.users.totp.begin_enrolment("alice").uri))
    users = box.again(hasher=KeysReencryptedMeanwhile(box))
    assert len(users.totp.confirm_enrolment("alice", app.at(box.clock.now))) == 10
    box.clock.advance(minutes=5)
    assert box.users.totp.verify("alice", app.at(box.clock.now)) is Factor.TOTP


def test_a_backup_code_used_by_two_requests_at_once_works_once(box: Box) -> None:
    _, codes = enrol(box)

    class Racing(PasswordHasher):
        """Lets another request use the same code between this one's check and its write."""

        def __init__(self) -> None:
            super().__init__(time_cost=1, memory_cost=8, parallelism=1)
            self.rival: Users | None = None

        def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
            matched = super().verify(hash, password)
            if self.rival:
                rival, self.rival = self.rival, None
                assert rival.totp.verify("alice", codes[0]) is Factor.BACKUP_CODE
            return matched

    racing = Racing()
    slow = box.again(hasher=racing)
    racing.rival = box.again()
    assert slow.totp.verify("alice", codes[0]) is None
    assert racing.rival is None  # the race did happen
    assert box.users.totp.backup_codes_left("alice") == 9


# -- nothing secret in the logs ------------------------------------------------------------------
def test_no_password_token_or_code_reaches_a_log_line(box: Box, caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")  # statements and parameters
    caplog.set_level(logging.DEBUG)  # last: it also sets the capturing handler's level
    users, shown = box.users, [PASSWORD, "a brand new passphrase", "not the password at all"]
    users.add("alice", PASSWORD, Role.OPERATOR, actor="cli:t")
    fail(users, 5)
    box.clock.advance(hours=1)
    issued = users.issue_reset_token("alice", actor="cli:t")
    users.redeem_reset_token("alice", issued.token, shown[1])
    enrolment = users.totp.begin_enrolment("alice")
    secret = secret_of(enrolment.uri)
    first = pyotp.TOTP(secret).at(box.clock.now)
    codes = users.totp.confirm_enrolment("alice", first)
    box.clock.advance(seconds=30)
    step = users.authenticate("alice", shown[1])
    assert step.challenge
    late = pyotp.TOTP(secret).at(box.clock.now - timedelta(seconds=90))
    assert users.authenticate_totp("alice", step.challenge, late).outcome is Outcome.REFUSED
    code = pyotp.TOTP(secret).at(box.clock.now)
    assert users.authenticate_totp("alice", step.challenge, code).ok
    step = users.authenticate("alice", shown[1])
    assert step.challenge
    assert users.authenticate_totp("alice", step.challenge, codes[0]).ok
    with pytest.raises(CirclesError):
        users.add("carol", "password1234", Role.VIEWER, actor="cli:t")

    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    assert "user locked after 5 failed attempts" in caplog.text
    assert "INSERT INTO users" in caplog.text  # the scan covers the database statements too
    audit = repr([e for e in box.audit.events()])
    for value in [*shown, issued.token, step.challenge, secret, *codes, "password1234",
                  *(c.replace("-", "") for c in codes)]:
        assert value not in logged, value
        assert value not in audit, value
    for digits in (first, late, code):  # six digits: only where they stand alone, not inside a hash
        alone = re.compile(rf"(?<![0-9A-Za-z+/$]){digits}(?![0-9A-Za-z+/$])")
        assert not alone.search(logged) and not alone.search(audit), digits


def test_the_same_on_postgresql(postgres_database: str, tmp_path: Path) -> None:
    """Row locks, time zones and the cascade on PostgreSQL, through one life of an account."""
    box = make_box(tmp_path, postgres_database)
    assert box.engine.dialect.name == "postgresql"
    users, clock = box.users, box.clock
    users.add("root", PASSWORD, Role.ADMIN, actor="cli:t")
    users.add("alice", PASSWORD, Role.OPERATOR, actor="cli:t")
    assert fail(users, 5)[-1].locked_until == clock.now + timedelta(minutes=15)
    clock.advance(minutes=16)
    app = pyotp.TOTP(secret_of(users.totp.begin_enrolment("alice").uri))
    codes = users.totp.confirm_enrolment("alice", app.at(clock.now))
    clock.advance(seconds=30)
    step = users.authenticate("alice", PASSWORD)
    assert step.outcome is Outcome.NEEDS_TOTP and step.challenge
    done = users.authenticate_totp("alice", step.challenge, app.at(clock.now))
    assert done.ok and users.totp.verify("alice", app.at(clock.now)) is None
    assert users.totp.verify("alice", codes[0]) is not None
    assert users.totp.verify("alice", codes[0]) is None
    info = users.get("alice")
    assert info and info.last_login_at == clock.now and info.totp_enrolled
    token = users.issue_reset_token("alice", actor="cli:t").token
    users.redeem_reset_token("alice", token, "a brand new passphrase")
    users.remove("alice", actor="cli:t")
    with box.engine.connect() as conn:
        assert conn.execute(text("select count(*) from user_backup_codes")).scalar_one() == 0
    box.engine.dispose()
