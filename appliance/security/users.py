"""People who log in to the panel: accounts, roles, passwords, reset tokens.

`Users` is the one entry point: it manages accounts (add, list, set_role, remove, the first
admin), passwords (change with the current one, or reset with a one-time token an admin
issued), and hands the login to `login.py` and TOTP to `totp.py`. Every change is appended
to the audit chain, naming people and never a password, token or code. Hashes and
encrypted secrets stay in the security core: callers get a UserInfo.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from argon2 import PasswordHasher
from sqlalchemy import BigInteger, DateTime, Engine, LargeBinary, TypeDecorator, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, select

from appliance.config import CoreSettings, SecuritySettings
from appliance.errors import AuthError, CirclesError, ValidationFailed
from appliance.security import audit as events
from appliance.security.audit import AuditLog, cli_actor
from appliance.security.passwords import (
    PasswordPolicyError,
    check_policy,
    default_hasher,
    generate_password,
    hash_password,
    verify_password,
)
from appliance.security.permissions import Role

if TYPE_CHECKING:
    from appliance.security.crypto import Keyring
    from appliance.security.login import LoginResult

log = logging.getLogger(__name__)

FIRST_ADMIN = "admin"
ANONYMOUS = "anonymous"  # the audit actor of an attempt that did not (yet) log anyone in
_USERNAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is an aware UTC datetime in Python whatever the database keeps
    (SQLite has no time zones and hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("refusing to store a naive datetime: give it a time zone")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class User(SQLModel, table=True):
    """A row of `users` (migration 0004). Secrets are kept out of its repr."""

    __tablename__ = "users"

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(max_length=64, unique=True)
    password_hash: str = Field(max_length=200, repr=False)
    role: str = Field(max_length=16)
    must_change_password: bool = False
    password_changed_at: datetime = Field(sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    last_login_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    failed_attempts: int = 0
    lockouts: int = 0
    locked_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    reset_token_hash: str | None = Field(default=None, max_length=64, repr=False)
    reset_token_expires: datetime | None = Field(default=None, sa_type=UTCDateTime)
    login_challenge_hash: str | None = Field(default=None, max_length=64, repr=False)
    login_challenge_expires: datetime | None = Field(default=None, sa_type=UTCDateTime)
    totp_secret: bytes | None = Field(default=None, sa_type=LargeBinary, repr=False)
    totp_pending: bytes | None = Field(default=None, sa_type=LargeBinary, repr=False)
    totp_enrolled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    totp_last_step: int | None = Field(default=None, sa_type=BigInteger)


class UnknownUser(CirclesError):
    """An administrative action named a user that does not exist."""


@dataclass(frozen=True)
class UserInfo:
    """What may be shown about a user: no hash, no token, no secret."""

    username: str
    role: Role
    created_at: datetime
    last_login_at: datetime | None
    password_changed_at: datetime
    must_change_password: bool
    locked_until: datetime | None
    totp_enrolled: bool

    @classmethod
    def of(cls, user: User) -> UserInfo:
        return cls(user.username, Role(user.role), user.created_at, user.last_login_at,
                   user.password_changed_at, user.must_change_password, user.locked_until,
                   user.totp_secret is not None)


@dataclass(frozen=True)
class ResetToken:
    token: str = field(repr=False)
    expires_at: datetime


def canonical_username(username: str) -> str:
    """The stored form of a username (lower-case), or ValidationFailed if it is not one:
    1–64 of `a-z 0-9 . _ -`, starting with a letter or digit."""
    name = username.strip().lower()
    if not _USERNAME.fullmatch(name):
        raise ValidationFailed("a username is 1-64 characters of a-z, 0-9, '.', '_' and '-', "
                               "starting with a letter or digit")
    return name


def parse_role(role: str | Role) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise ValidationFailed(f"unknown role {role!r}; one of "
                               f"{', '.join(r.value for r in Role)}") from None


def digest_token(token: str) -> str:
    """The stored form of a reset token or login challenge."""
    # They are 256 random bits: a fast hash is enough, a slow one would add nothing.
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(stored: str | None, expires: datetime | None, token: str, now: datetime) -> bool:
    """Whether `token` is the one whose digest is `stored`, and it has not expired."""
    return bool(stored and expires and expires > now
                and hmac.compare_digest(stored, digest_token(token)))


class Lockable(Protocol):
    """A user, or the lockout counters of a name without an account."""

    locked_until: datetime | None


def is_locked(counters: Lockable, now: datetime) -> bool:
    return counters.locked_until is not None and counters.locked_until > now


class Users:
    """The accounts of one box. `clock` returns the time as an aware UTC datetime (tests pass
    a controllable one); `keyring` is needed only for TOTP codes and enrolment."""

    def __init__(self, engine: Engine, audit: AuditLog, settings: SecuritySettings | None = None,
                 *, keyring: Keyring | None = None, clock: Callable[[], datetime] = utcnow,
                 hasher: PasswordHasher | None = None) -> None:
        # Here, not at the top: both build on this module's User table.
        from appliance.security.login import Login
        from appliance.security.totp import Totp

        self.engine, self.audit = engine, audit
        self.settings = settings or SecuritySettings()
        self.clock = clock
        self.hasher = hasher or default_hasher()
        self.totp = Totp(self, keyring)
        self.login = Login(self)

    @classmethod
    def open(cls, settings: CoreSettings, keyring: Keyring | None = None) -> Users:
        """The box's users: its database (migrated) and audit chain."""
        audit = AuditLog.open(settings)
        return cls(audit.ledger.engine, audit, settings.security, keyring=keyring)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @staticmethod
    def row(session: Session, name: str, *, lock: bool = False) -> User | None:
        """The row of `name` (locked for the transaction with `lock`, where the database can)."""
        query = select(User).where(User.username == name)
        return session.exec(query.with_for_update() if lock else query).first()

    def snapshot(self, name: str | None) -> User | None:
        if name is None:
            return None
        with self.session() as session:
            return self.row(session, name)

    def existing(self, session: Session, username: str, *, lock: bool = True) -> User:
        """The row of `username` (locked, unless `lock` is False); UnknownUser if there is none."""
        user = self.row(session, canonical_username(username), lock=lock)
        if user is None:
            raise UnknownUser(f"no user {username.strip().lower()}")
        return user

    # -- administration ---------------------------------------------------------------------
    def add(self, username: str, password: str, role: str | Role, *, actor: str,
            must_change_password: bool = False) -> UserInfo:
        """Create a user; the password must pass the policy (PasswordPolicyError otherwise),
        and ValidationFailed if the name is taken or invalid."""
        name, role = canonical_username(username), parse_role(role)
        check_policy(password, name)
        now = self.clock()
        user = User(username=name, password_hash=hash_password(password, self.hasher),
                    role=role.value, must_change_password=must_change_password,
                    password_changed_at=now, created_at=now)
        try:
            with self.session() as session:
                if self.row(session, name) is not None:
                    raise ValidationFailed(f"user {name} already exists")
                session.add(user)
                session.commit()
        except IntegrityError:  # created by another process between the check and the insert
            raise ValidationFailed(f"user {name} already exists") from None
        self.audit.record(events.USER_ADD, actor=actor, target=name, role=role.value)
        return UserInfo.of(user)

    def get(self, username: str) -> UserInfo | None:
        try:
            user = self.snapshot(canonical_username(username))
        except ValidationFailed:
            return None
        return UserInfo.of(user) if user else None

    def list_users(self) -> list[UserInfo]:
        with self.session() as session:
            return [UserInfo.of(u) for u in session.exec(select(User).order_by(User.username))]

    def _refuse_last_admin(self, session: Session, user: User, what: str) -> None:
        if user.role != Role.ADMIN:
            return
        admins = session.exec(select(func.count()).select_from(User)
                              .where(User.role == Role.ADMIN.value)).one()
        if admins <= 1:
            raise ValidationFailed(f"{user.username} is the last admin; {what} would leave "
                                   "no one able to manage users")

    def set_role(self, username: str, role: str | Role, *, actor: str) -> UserInfo:
        """Change a user's role; refused for the last admin."""
        new = parse_role(role)
        with self.session() as session:
            user = self.existing(session, username)
            previous = user.role
            if new != Role.ADMIN:
                self._refuse_last_admin(session, user, "changing the role")
            user.role = new.value
            session.add(user)
            session.commit()
        self.audit.record(events.ROLE_CHANGE, actor=actor, target=user.username,
                          previous=previous, role=new.value)
        return UserInfo.of(user)

    def remove(self, username: str, *, actor: str) -> None:
        """Delete a user (and its backup codes); refused for the last admin."""
        with self.session() as session:
            user = self.existing(session, username)
            self._refuse_last_admin(session, user, "removing it")
            session.delete(user)
            session.commit()
        self.audit.record(events.USER_REMOVE, actor=actor, target=user.username)

    def ensure_first_admin(self, *, actor: str) -> str | None:
        """On a box without any user, create `admin` with a generated password that must be
        changed at first login, and return that password (to be shown once). None when a
        user already exists."""
        with self.session() as session:
            if session.exec(select(func.count()).select_from(User)).one():
                return None
        password = generate_password()
        try:
            self.add(FIRST_ADMIN, password, Role.ADMIN, actor=actor, must_change_password=True)
        except ValidationFailed:  # another process made it first
            return None
        log.info("first admin created", extra={"user": FIRST_ADMIN})
        return password

    # -- passwords --------------------------------------------------------------------------
    def _set_password(self, session: Session, user: User, digest: str, now: datetime) -> None:
        user.password_hash, user.password_changed_at = digest, now
        user.must_change_password = False
        user.reset_token_hash = user.reset_token_expires = None
        session.add(user)

    def change_password(self, username: str, current: str, new: str, *,
                        source: str | None = None) -> None:
        """Set a new password, proving the current one. A wrong current password counts as a
        failed login from `source` (AuthError); a locked account is refused (AuthError); the
        new one must pass the policy and differ from the current one (PasswordPolicyError)."""
        name = canonical_username(username)
        user = self.snapshot(name)
        if user is None:
            raise UnknownUser(f"no user {name}")
        if until := self.login.locked_until(name, source):
            raise AuthError(f"{name} is locked until {until:%Y-%m-%d %H:%M} UTC")
        if not verify_password(user.password_hash, current, self.hasher):
            self.login.count_failure(name, "change_password", source)
            raise AuthError("the current password is wrong")
        check_policy(new, name)
        if new == current:
            raise PasswordPolicyError("password refused: it is the current password")
        digest, now = hash_password(new, self.hasher), self.clock()
        with self.session() as session:
            self._set_password(session, self.existing(session, name), digest, now)
            session.commit()
        self.audit.record(events.PASSWORD_CHANGE, actor=f"user:{name}", target=name)

    def issue_reset_token(self, username: str, *, actor: str) -> ResetToken:
        """A one-time token that lets `username` set a new password without the old one, valid
        `reset_token_minutes`; it replaces any earlier token and is stored only as a hash."""
        token = secrets.token_urlsafe(32)
        expires = self.clock() + timedelta(minutes=self.settings.reset_token_minutes)
        with self.session() as session:
            user = self.existing(session, username)
            user.reset_token_hash, user.reset_token_expires = digest_token(token), expires
            session.add(user)
            session.commit()
        self.audit.record(events.PASSWORD_RESET, actor=actor, target=user.username,
                          step="issued", expires_at=expires.isoformat())
        return ResetToken(token, expires)

    def redeem_reset_token(self, username: str, token: str, new_password: str, *,
                           source: str | None = None) -> None:
        """Set a new password with a reset token. The policy is checked first (a refused
        password leaves the token usable); then an invalid, used or expired token raises
        AuthError. Success uses up the token and lifts any lockout."""
        name = canonical_username(username)
        check_policy(new_password, name)
        digest, now = hash_password(new_password, self.hasher), self.clock()
        with self.session() as session:
            user = self.row(session, name, lock=True)
            if user is not None and token_matches(user.reset_token_hash,
                                                  user.reset_token_expires, token, now):
                self._set_password(session, user, digest, now)
                user.failed_attempts, user.lockouts, user.locked_until = 0, 0, None
                session.commit()
            else:
                user = None
        if user is None:
            self.audit.record(events.PASSWORD_RESET, actor=ANONYMOUS, target=name,
                              outcome="refused", step="redeemed", source=source)
            raise AuthError("the reset token is invalid, used or expired")
        self.audit.record(events.PASSWORD_RESET, actor=f"user:{name}", target=name,
                          step="redeemed", source=source)

    # -- the login (login.py) ---------------------------------------------------------------
    def authenticate(self, username: str, password: str, *, source: str | None = None
                     ) -> LoginResult:
        """The password step of a login: see `Login.authenticate`."""
        return self.login.authenticate(username, password, source=source)

    def authenticate_totp(self, username: str, challenge: str, code: str, *,
                          source: str | None = None) -> LoginResult:
        """The TOTP step of a login: see `Login.authenticate_totp`."""
        return self.login.authenticate_totp(username, challenge, code, source=source)


def first_start(settings: CoreSettings) -> str | None:
    """For `circles up`: create the first admin on a box without users and return its
    generated password, to be shown once; None on every later start."""
    return Users.open(settings).ensure_first_admin(actor=cli_actor())
