"""The login: a password step, then a TOTP step for people who enrolled an app.

`authenticate(username, password)` answers with a LoginResult; when its outcome is
NEEDS_TOTP it carries a one-time `challenge`, and `authenticate_totp(username, challenge,
code)` finishes the login with a code from the app or a backup code. The TOTP step cannot
be reached without the password step, and the failure counter is reset only by a complete
login, so knowing the password does not buy unlimited guesses at the code.

An unknown username costs the same Argon2 work as a wrong password and gets the identical
answer (REFUSED), so the login does not tell which names exist. Failures (password or code)
are counted per account; at `lockout_threshold` in a row the account is locked for
`lockout_minutes`, doubled for each further lockout in a row until a successful login.
While locked, every attempt is answered LOCKED without the password being looked at.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from sqlmodel import Session

from appliance.errors import ValidationFailed
from appliance.security import audit as events
from appliance.security.passwords import hash_password, needs_rehash, verify_password
from appliance.security.permissions import TOTP_ROLES, Role
from appliance.security.users import (
    ANONYMOUS,
    User,
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
            name: str | None = canonical_username(username)
        except ValidationFailed:
            name = None
        user, now = users.snapshot(name), users.clock()
        if user is None or name is None:
            self._burn(password)
            # The name is not recorded: people type their password into the name field.
            users.audit.record(events.LOGIN_FAILURE, actor=ANONYMOUS, outcome="refused",
                               step="password", reason="unknown user", source=source)
            return LoginResult(Outcome.REFUSED)
        if is_locked(user, now):
            self._burn(password)
            return self._refused_while_locked(user, "password", source)
        if not verify_password(user.password_hash, password, users.hasher):
            return self.count_failure(name, "password", source)
        # The only moment the clear password is known: upgrade an old hash now.
        fresh = hash_password(password, users.hasher) if needs_rehash(user.password_hash,
                                                                      users.hasher) else None
        with users.session() as session:
            user = users.row(session, name, lock=True)
            if user is None:
                return LoginResult(Outcome.REFUSED)
            if fresh:
                user.password_hash = fresh
                session.add(user)
            if is_locked(user, now):  # locked by another attempt in the meantime
                session.commit()
                return self._refused_while_locked(user, "password", source)
            if user.totp_secret is not None:
                challenge = secrets.token_urlsafe(32)
                user.login_challenge_hash = digest_token(challenge)
                user.login_challenge_expires = now + CHALLENGE_TTL
                session.add(user)
                session.commit()
                return LoginResult(Outcome.NEEDS_TOTP, username=name, role=Role(user.role),
                                   challenge=challenge)
            outcome = self._complete(session, user, now)
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
        user, now = users.snapshot(name), users.clock()
        if user is None or not token_matches(user.login_challenge_hash,
                                             user.login_challenge_expires, challenge, now):
            users.audit.record(events.LOGIN_FAILURE, actor=ANONYMOUS,
                               target=name if user else None, outcome="refused", step="totp",
                               reason="no password step", source=source)
            return LoginResult(Outcome.REFUSED)
        if is_locked(user, now):
            return self._refused_while_locked(user, "totp", source)
        factor = users.totp.verify(name, code)
        if factor is None:
            return self.count_failure(name, "totp", source)
        with users.session() as session:
            user = users.row(session, name, lock=True)
            # Another request may have finished this login with the same challenge.
            if user is None or not token_matches(user.login_challenge_hash,
                                                 user.login_challenge_expires, challenge, now):
                return LoginResult(Outcome.REFUSED)
            outcome = self._complete(session, user, now)
            session.commit()
        return self._succeeded(user, outcome, factor, source)

    def _complete(self, session: Session, user: User, now: datetime) -> Outcome:
        """Book a complete login on `user` and say what the panel must do next."""
        user.failed_attempts, user.lockouts, user.locked_until = 0, 0, None
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

    def _refused_while_locked(self, user: User, step: str, source: str | None) -> LoginResult:
        self.users.audit.record(events.LOGIN_FAILURE, actor=ANONYMOUS, target=user.username,
                                outcome="locked", step=step, source=source)
        return LoginResult(Outcome.LOCKED, locked_until=user.locked_until)

    def lockout_length(self, lockouts: int) -> timedelta:
        """How long the `lockouts`-th lockout in a row lasts: 15, 30, 60 … minutes by default,
        at most `lockout_max_minutes`."""
        settings = self.users.settings
        minutes = settings.lockout_minutes * 2 ** min(max(lockouts, 1) - 1, 30)
        return timedelta(minutes=min(minutes, settings.lockout_max_minutes))

    def count_failure(self, name: str, step: str, source: str | None = None) -> LoginResult:
        """Count a failure (a wrong password or code) of `name`; at the threshold, lock the
        account and return LOCKED, else REFUSED."""
        users, now = self.users, self.users.clock()
        with users.session() as session:
            user = users.row(session, name, lock=True)
            if user is None:
                return LoginResult(Outcome.REFUSED)
            if is_locked(user, now):
                session.commit()
                return self._refused_while_locked(user, step, source)
            user.failed_attempts += 1
            attempts = user.failed_attempts
            locked = attempts >= users.settings.lockout_threshold
            if locked:
                user.lockouts += 1
                user.failed_attempts = 0
                user.locked_until = now + self.lockout_length(user.lockouts)
                user.login_challenge_hash = user.login_challenge_expires = None
            session.add(user)
            session.commit()
        users.audit.record(events.LOGIN_FAILURE, actor=ANONYMOUS, target=name, outcome="refused",
                           step=step, attempts=attempts, source=source)
        if not locked:
            return LoginResult(Outcome.REFUSED)
        assert user.locked_until is not None
        users.audit.record(events.LOCKOUT, actor=ANONYMOUS, target=name, outcome="locked",
                           until=user.locked_until.isoformat(), lockouts=user.lockouts,
                           source=source)
        log.warning("user locked after %d failed attempts", attempts,
                    extra={"user": name, "locked_until": user.locked_until.isoformat()})
        return LoginResult(Outcome.LOCKED, locked_until=user.locked_until)
