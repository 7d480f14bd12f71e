"""The login: a password step, then a TOTP step for people who enrolled an app.

`authenticate(username, password)` answers with a LoginResult; when its outcome is
NEEDS_TOTP it carries a one-time `challenge`, and `authenticate_totp(username, challenge,
code)` finishes the login with a code from the app or a backup code. The TOTP step cannot
be reached without the password step, and the failure counter is reset only by a complete
login, so knowing the password does not buy unlimited guesses at the code.

Every attempt is counted before its password or code is checked, in one locked
transaction, so requests sent at once get no more than `lockout_threshold` guesses between
them; at the threshold the account is locked for `lockout_minutes`, doubled for each
further lockout in a row until a successful login. While locked, every attempt is answered
LOCKED without the password being looked at.

Password attempts that say where they come from (`source`, the client's address) are
counted per name *and* source, in the table `login_throttle`: a stranger who fails a name
from their address locks that name for their address only, so they cannot lock the owner
out from elsewhere, and one address (a proxy) that fails for one name does not lock
everyone behind it out of every account. Codes (the TOTP step) are counted on the user's
own row whatever the address: whoever gets there knows the password, and changing address
must not buy more guesses at the code. Attempts without a source count on the user's row.

A name without an account goes through the same steps on its own counters (its row of
`login_throttle`): the same Argon2 work, the same writes, and the same answers, REFUSED and
in time LOCKED, so the login does not tell which names exist.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, Session, SQLModel, col, select

from appliance.errors import ValidationFailed
from appliance.security import audit as events
from appliance.security.passwords import MAX_LENGTH, hash_password, needs_rehash, verify_password
from appliance.security.permissions import TOTP_ROLES, Role
from appliance.security.users import (
    ANONYMOUS,
    User,
    UTCDateTime,
    canonical_username,
    digest_token,
    is_locked,
    token_matches,
)

if TYPE_CHECKING:
    from appliance.security.totp import Factor
    from appliance.security.users import Users

log = logging.getLogger(__name__)

CHALLENGE_TTL = timedelta(minutes=5)  # from the password step to the TOTP step


class Outcome(StrEnum):
    OK = "ok"  # logged in
    NEEDS_TOTP = "needs_totp"  # password right; call authenticate_totp with the challenge
    MUST_CHANGE_PASSWORD = "must_change_password"  # logged in, but only to change the password
    EXPIRED = "expired"  # logged in, but the password is older than password_max_age_days
    LOCKED = "locked"  # too many failures; see locked_until
    REFUSED = "refused"  # wrong name, password, code or challenge (which one is not said)


@dataclass(frozen=True)
class LoginResult:
    """The answer to a login step. `username` and `role` are set once the password matched.
    `must_enrol_totp`: an admin or operator without TOTP, whom the panel should send to
    enrolment before anything else."""

    outcome: Outcome
    username: str | None = None
    role: Role | None = None
    challenge: str | None = field(default=None, repr=False)
    locked_until: datetime | None = None
    must_enrol_totp: bool = False
    second_factor: Factor | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


class Throttle(SQLModel, table=True):
    """The lockout counters of a name that has no account (migration 0004)."""

    __tablename__ = "login_throttle"

    key: str = Field(primary_key=True, max_length=64)
    failed_attempts: int = 0
    lockouts: int = 0
    locked_until: datetime | None = Field(default=None, sa_type=UTCDateTime)


Counters = User | Throttle


class Login:
    """The login steps over the accounts of `users` (its database, audit log, clock, hasher,
    settings and TOTP)."""

    def __init__(self, users: Users) -> None:
        self.users = users
        self._dummy_hash: str | None = None

    def _burn(self, password: str) -> None:
        """The Argon2 work of checking a password, against a hash no password matches."""
        verify_password(self._dummy(), password, self.users.hasher)

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = hash_password(secrets.token_urlsafe(32), self.users.hasher)
        return self._dummy_hash

    def authenticate(self, username: str, password: str, *, source: str | None = None
                     ) -> LoginResult:
        """The password step. `source` (e.g. the client's address) goes into the audit record.
        Outcomes: OK, NEEDS_TOTP (with a challenge), MUST_CHANGE_PASSWORD, EXPIRED, LOCKED
        (with locked_until) or REFUSED."""
        users = self.users
        self._dummy()  # made before any lookup, so the first attempt costs the same either way
        try:
            name: str = canonical_username(username)
        except ValidationFailed:
            name = username.strip().lower()[:MAX_LENGTH]
        now = users.clock()
        user, early = self._open(name, now, "password", source)
        if early:
            self._burn(password[:MAX_LENGTH])
            return early
        if user is None or len(password) > MAX_LENGTH:  # no password is that long (the policy)
            self._burn(password[:MAX_LENGTH])
            return self._failed(name, now, "password", source)
        if not verify_password(user.password_hash, password, users.hasher):
            return self._failed(name, now, "password", source)
        # The only moment the clear password is known: upgrade an old hash now.
        fresh = hash_password(password, users.hasher) if needs_rehash(user.password_hash,
                                                                      users.hasher) else None
        with users.session() as session:
            user, counters = self._counters(session, name, source)
            if user is None:
                return LoginResult(Outcome.REFUSED)
            if fresh:
                user.password_hash = fresh
                session.add(user)
            if is_locked(counters, now):  # locked by other attempts in the meantime
                session.commit()
                return self._refused_while_locked(user.username, True, counters, "password",
                                                  source)
            if user.totp_secret is not None:
                # The password was right: this attempt no longer counts; the code's will.
                counters.failed_attempts = max(counters.failed_attempts - 1, 0)
                challenge = secrets.token_urlsafe(32)
                user.login_challenge_hash = digest_token(challenge)
                user.login_challenge_expires = now + CHALLENGE_TTL
                session.add_all([user, counters])
                session.commit()
                return LoginResult(Outcome.NEEDS_TOTP, username=name, role=Role(user.role),
                                   challenge=challenge)
            outcome = self._complete(session, user, counters, now)
            session.commit()
        return self._succeeded(user, outcome, None, source)

    def authenticate_totp(self, username: str, challenge: str, code: str, *,
                          source: str | None = None) -> LoginResult:
        """The TOTP step: `challenge` from the password step (valid 5 minutes, until a lockout
        or a complete login) and a code from the app or a backup code. A wrong code counts as
        a failed login. Outcomes as for `authenticate`, never NEEDS_TOTP."""
        users = self.users
        try:
            name = canonical_username(username)
        except ValidationFailed:
            return LoginResult(Outcome.REFUSED)
        now = users.clock()
        user, early = self._open(name, now, "totp", source, challenge=challenge)
        if early:
            return early
        factor = users.totp.verify(name, code)
        if factor is None:
            return self._failed(name, now, "totp", source)
        with users.session() as session:
            user, counters = self._counters(session, name, None)
            # Another request may have finished this login with the same challenge.
            if user is None or not token_matches(user.login_challenge_hash,
                                                 user.login_challenge_expires, challenge, now):
                return LoginResult(Outcome.REFUSED)
            outcome = self._complete(session, user, counters, now)
            session.commit()
        return self._succeeded(user, outcome, factor, source)

    # -- counting attempts --------------------------------------------------------------------
    def _counters(self, session: Session, name: str, source: str | None
                  ) -> tuple[User | None, Counters]:
        """The user of `name` (locked for this transaction) and the counters its attempts go
        to: the user's own row for attempts without a source; else, and for a name without
        an account, the row of `login_throttle` of the name and source."""
        user = self.users.row(session, name, lock=True)
        if user is not None and source is None:
            return user, user
        key = digest_token(name if source is None else f"{name}\n{source}")
        dialect = postgresql if session.connection().dialect.name == "postgresql" else sqlite
        session.connection().execute(dialect.insert(Throttle).values(
            key=key, failed_attempts=0, lockouts=0).on_conflict_do_nothing())
        throttle = session.exec(select(Throttle).where(col(Throttle.key) == key)
                                .with_for_update()).one()
        return user, throttle

    def _open(self, name: str, now: datetime, step: str, source: str | None, *,
              challenge: str | None = None) -> tuple[User | None, LoginResult | None]:
        """Begin an attempt: answer now if the name is locked (or the attempts in flight have
        reached the threshold), else count this attempt before anything is checked. Returns
        the user as it was (None for a name without an account) and the answer, if any. With
        `challenge` (the TOTP step), only the user whose password step issued it may go on."""
        threshold = self.users.settings.lockout_threshold
        with self.users.session() as session:
            user, counters = self._counters(session, name, _per_address(step, source))
            if challenge is not None and (user is None or not token_matches(
                    user.login_challenge_hash, user.login_challenge_expires, challenge, now)):
                session.rollback()
                self.users.audit.record(events.LOGIN_FAILURE, actor=ANONYMOUS,
                                        target=name if user else None, outcome="refused",
                                        step=step, reason="no password step", source=source)
                return user, LoginResult(Outcome.REFUSED)
            if not is_locked(counters, now) and counters.failed_attempts >= threshold:
                self._lock(user, counters, now)  # as many attempts in flight as are allowed
                session.add(counters)
                session.commit()
                return user, self._locked_now(name, user is not None, counters, step, source)
            if is_locked(counters, now):
                session.commit()
                return user, self._refused_while_locked(name, user is not None, counters, step,
                                                         source)
            counters.failed_attempts += 1
            session.add(counters)
            session.commit()
        return user, None

    def _failed(self, name: str, now: datetime, step: str, source: str | None) -> LoginResult:
        """End an attempt that failed (it was counted when it began): lock the name when the
        failures reach the threshold. REFUSED or LOCKED."""
        with self.users.session() as session:
            user, counters = self._counters(session, name, _per_address(step, source))
            account = user is not None
            if is_locked(counters, now):
                session.commit()
                return self._refused_while_locked(name, account, counters, step, source)
            attempts = counters.failed_attempts
            locked = attempts >= self.users.settings.lockout_threshold
            if locked:
                self._lock(user, counters, now)
            session.add(counters)
            session.commit()
        # A name without an account is not recorded: people type their password into it.
        self.users.audit.record(events.LOGIN_FAILURE, actor=ANONYMOUS,
                                target=name if account else None, outcome="refused", step=step,
                                attempts=attempts, source=source,
                                **({} if account else {"reason": "unknown user"}))
        return self._locked_now(name, account, counters, step, source) if locked else \
            LoginResult(Outcome.REFUSED)

    def count_failure(self, name: str, step: str, source: str | None = None) -> LoginResult:
        """Count one failure of `name` that was checked elsewhere (a wrong current password
        when changing it). REFUSED or LOCKED."""
        now = self.users.clock()
        _, early = self._open(name, now, step, source)
        return early or self._failed(name, now, step, source)

    def step_up(self, name: str, code: str, *, source: str | None = None) -> LoginResult:
        """A fresh code of a logged-in person, asked again before an action that moves money
        or hands out a factor. It is counted as the login's TOTP step is, before it is
        checked, so that requests sent at once share the same five guesses; a good code takes
        its count back. OK with the factor, REFUSED or LOCKED."""
        now = self.users.clock()
        _, early = self._open(name, now, "totp", source)
        if early:
            return early
        factor = self.users.totp.verify(name, code)
        if factor is None:
            return self._failed(name, now, "totp", source)
        with self.users.session() as session:
            _, counters = self._counters(session, name, None)
            counters.failed_attempts = max(counters.failed_attempts - 1, 0)
            session.add(counters)
            session.commit()
        return LoginResult(Outcome.OK, username=name, second_factor=factor)

    def locked_until(self, name: str, source: str | None = None) -> datetime | None:
        """Until when attempts for `name` from `source` are refused; None if they are not."""
        with self.users.session() as session:
            _, counters = self._counters(session, name, source)
            session.commit()
        return counters.locked_until if is_locked(counters, self.users.clock()) else None

    def _lock(self, user: User | None, counters: Counters, now: datetime) -> None:
        counters.lockouts += 1
        counters.failed_attempts = 0
        counters.locked_until = now + self.lockout_length(counters.lockouts)
        if counters is user:  # the user's own lockout ends a TOTP step begun anywhere
            user.login_challenge_hash = user.login_challenge_expires = None

    def _locked_now(self, name: str, account: bool, counters: Counters, step: str,
                    source: str | None) -> LoginResult:
        assert counters.locked_until is not None
        if account:
            self.users.audit.record(events.LOCKOUT, actor=ANONYMOUS, target=name,
                                    outcome="locked", until=counters.locked_until.isoformat(),
                                    lockouts=counters.lockouts, step=step, source=source)
            log.warning("user locked after %d failed attempts",
                        self.users.settings.lockout_threshold,
                        extra={"user": name, "locked_until": counters.locked_until.isoformat()})
        return LoginResult(Outcome.LOCKED, locked_until=counters.locked_until)

    def _complete(self, session: Session, user: User, counters: Counters, now: datetime
                  ) -> Outcome:
        """Book a complete login on `user` and say what the panel must do next."""
        counters.failed_attempts, counters.lockouts, counters.locked_until = 0, 0, None
        session.add(counters)
        user.login_challenge_hash = user.login_challenge_expires = None
        user.last_login_at = now
        session.add(user)
        if user.must_change_password:
            return Outcome.MUST_CHANGE_PASSWORD
        max_age = self.users.settings.password_max_age_days
        if max_age and user.password_changed_at + timedelta(days=max_age) <= now:
            return Outcome.EXPIRED
        return Outcome.OK

    def _succeeded(self, user: User, outcome: Outcome, factor: Factor | None,
                   source: str | None) -> LoginResult:
        role = Role(user.role)
        self.users.audit.record(events.LOGIN_SUCCESS, actor=f"user:{user.username}",
                                target=user.username, outcome=outcome.value,
                                second_factor=factor.value if factor else None, source=source)
        return LoginResult(outcome, username=user.username, role=role,
                           must_enrol_totp=role in TOTP_ROLES and user.totp_secret is None,
                           second_factor=factor)

    def _refused_while_locked(self, name: str, account: bool, counters: Counters, step: str,
                              source: str | None) -> LoginResult:
        self.users.audit.record(events.LOGIN_FAILURE, actor=ANONYMOUS,
                                target=name if account else None,
                                outcome="locked", step=step, source=source)
        return LoginResult(Outcome.LOCKED, locked_until=counters.locked_until)

    def lockout_length(self, lockouts: int) -> timedelta:
        """How long the `lockouts`-th lockout in a row lasts: 15, 30, 60 … minutes by default,
        at most `lockout_max_minutes`."""
        settings = self.users.settings
        minutes = settings.lockout_minutes * 2 ** min(max(lockouts, 1) - 1, 30)
        return timedelta(minutes=min(minutes, settings.lockout_max_minutes))


def _per_address(step: str, source: str | None) -> str | None:
    """The source that keys the counters of `step`: codes count on the user's own row."""
    return None if step == "totp" else source
