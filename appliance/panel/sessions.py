"""Who is logged in to the panel: login sessions (a cookie) and API tokens (a bearer header).

Both are 256 random bits given to the client once; the database keeps their SHA-256 only.
A session lasts `max_age` from its login and ends earlier after `idle` without a request,
at logout, or when revoked (its owner sees their sessions and may end any of them). A
token has a scope, a role that is at most its owner's: a token acts with the lesser of its
scope and its owner's role of the moment, so demoting or removing a person reaches their
scripts too.

Lookups are cached for a few seconds (the panel answers many requests a second from a
phone's live page); `revoke` in this process clears the cache at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Column, Engine, Integer, MetaData, ScalarSelect, String, Table, select, update
from sqlmodel import col

from appliance.security.permissions import Principal, Role
from appliance.security.users import User, digest_token

metadata = MetaData()
sessions = Table("panel_sessions", metadata, Column("id", Integer, primary_key=True),
                 Column("token_hash", String(64)), Column("user_id", Integer),
                 Column("restricted", String(32)), Column("second_factor", String(16)),
                 Column("source", String(64)), Column("user_agent", String(200)),
                 Column("created_at", String(40)), Column("last_seen_at", String(40)),
                 Column("expires_at", String(40)), Column("revoked_at", String(40)))
tokens = Table("panel_tokens", metadata, Column("id", Integer, primary_key=True),
               Column("user_id", Integer), Column("label", String(200)),
               Column("scope", String(16)), Column("prefix", String(16)),
               Column("hash", String(64)), Column("created_at", String(40)),
               Column("last_used_at", String(40)), Column("revoked_at", String(40)))
TOKEN_PREFIX = "ct_"
CACHE_S = 5.0
TOUCH_EVERY = timedelta(minutes=1)  # last_seen_at is written at most this often
RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}
# A restricted session may do one thing: the step the login said must come first.
CHANGE_PASSWORD, ENROL_TOTP = "change_password", "enrol_totp"


def csrf_for(secret: str) -> str:
    """The CSRF token that goes with a session (or a pre-login cookie): derived, not stored."""
    return hmac.new(secret.encode(), b"circles-csrf", hashlib.sha256).hexdigest()


def lesser(a: Role, b: Role) -> Role:
    return a if RANK[a] <= RANK[b] else b


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def _user_id(username: str) -> ScalarSelect[int]:
    return select(col(User.id)).where(col(User.username) == username).scalar_subquery()


@dataclass(frozen=True)
class Login:
    """A live session or token, as the request handlers see it."""

    principal: Principal
    session_id: int | None = None  # None: a bearer token
    restricted: str | None = None
    second_factor: str | None = None
    secret: str = field(default="", repr=False)  # the cookie (the CSRF token's source) or token


@dataclass(frozen=True)
class SessionInfo:
    """A live session as its owner sees it in their list (never its cookie)."""

    id: int
    created_at: str
    last_seen_at: str
    expires_at: str
    source: str
    user_agent: str
    second_factor: str | None


@dataclass(frozen=True)
class TokenInfo:
    id: int
    label: str
    scope: Role
    prefix: str
    created_at: str
    last_used_at: str | None
    revoked_at: str | None


class Logins:
    """Sessions and API tokens over the box's database."""

    def __init__(self, engine: Engine, *, max_age: timedelta, idle: timedelta,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.engine, self.max_age, self.idle, self.clock = engine, max_age, idle, clock
        self._cache: dict[str, tuple[float, Login | None]] = {}

    # -- sessions ---------------------------------------------------------------------------
    def open(self, username: str, *, source: str, user_agent: str, restricted: str | None,
             second_factor: str | None) -> str:
        """A new session; returns the cookie's value (shown to nobody else)."""
        token, now = secrets.token_urlsafe(32), self.clock()
        with self.engine.begin() as conn:
            conn.execute(sessions.insert().values(
                token_hash=digest_token(token), user_id=_user_id(username), restricted=restricted,
                second_factor=second_factor, source=source[:64], user_agent=user_agent[:200],
                created_at=iso(now), last_seen_at=iso(now), expires_at=iso(now + self.max_age)))
        return token

    def session(self, token: str) -> Login | None:
        return self._cached("s" + token, lambda: self._load_session(token))

    def still(self, login: Login) -> bool:
        """Whether `login` is still live (not logged out, revoked, expired, or its user gone)."""
        again = self.session(login.secret) if login.session_id is not None \
            else self.token(login.secret)
        return again is not None and again.principal == login.principal

    def cached(self, kind: str, token: str) -> tuple[bool, Login | None]:
        """A lookup answered from the cache, without the database: (found, login); `kind`
        is "session" or "token"."""
        hit = self._cache.get(kind[0] + token)
        return (True, hit[1]) if hit is not None and hit[0] > time.monotonic() else (False, None)

    def _load_session(self, token: str) -> Login | None:
        now = self.clock()
        query = (select(sessions, col(User.username), col(User.role))
                 .join(User, col(User.id) == sessions.c.user_id)
                 .where(sessions.c.token_hash == digest_token(token), sessions.c.revoked_at.is_(None)))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None or row.expires_at <= iso(now) \
                or datetime.fromisoformat(row.last_seen_at) + self.idle <= now:
            return None
        if datetime.fromisoformat(row.last_seen_at) + TOUCH_EVERY <= now:
            with self.engine.begin() as conn:
                conn.execute(update(sessions).where(sessions.c.id == row.id)
                             .values(last_seen_at=iso(now)))
        return Login(Principal(row.username, Role(row.role)), session_id=row.id,
                     restricted=row.restricted, second_factor=row.second_factor, secret=token)

    def restrict(self, session_id: int, step: str | None) -> None:
        """What the session must do first (CHANGE_PASSWORD, ENROL_TOTP), or None: all done."""
        with self.engine.begin() as conn:
            conn.execute(update(sessions).where(sessions.c.id == session_id)
                         .values(restricted=step))
        self._cache.clear()

    def close_others(self, username: str, keep: int) -> int:
        """End every other session of `username` (after a password change)."""
        with self.engine.begin() as conn:
            done = conn.execute(update(sessions).where(
                sessions.c.user_id == _user_id(username), sessions.c.id != keep,
                sessions.c.revoked_at.is_(None)).values(revoked_at=iso(self.clock())))
        self._cache.clear()
        return int(done.rowcount)

    def close(self, session_id: int) -> None:
        """Logout: the session ends now."""
        with self.engine.begin() as conn:
            conn.execute(update(sessions).where(sessions.c.id == session_id,
                                                sessions.c.revoked_at.is_(None))
                         .values(revoked_at=iso(self.clock())))
        self._cache.clear()

    def sessions_of(self, username: str) -> list[SessionInfo]:
        """`username`'s live sessions (not logged out, revoked, expired or idle too long),
        the most recently used first."""
        now = self.clock()
        with self.engine.connect() as conn:
            rows = conn.execute(select(sessions).where(
                sessions.c.user_id == _user_id(username), sessions.c.revoked_at.is_(None),
                sessions.c.expires_at > iso(now),
                sessions.c.last_seen_at > iso(now - self.idle))
                .order_by(sessions.c.last_seen_at.desc(), sessions.c.id.desc()))
            return [SessionInfo(r.id, r.created_at, r.last_seen_at, r.expires_at, r.source or "",
                                r.user_agent or "", r.second_factor) for r in rows]

    def close_own(self, username: str, session_id: int) -> bool:
        """End one of `username`'s own sessions now (any other person's is out of reach);
        False if there is no such live session."""
        return self._revoke(sessions, username, session_id)

    # -- API tokens -------------------------------------------------------------------------
    def create_token(self, principal: Principal, label: str, scope: Role) -> tuple[TokenInfo, str]:
        """A token for `principal`'s scripts, with `scope` at most their role; the clear token
        is returned here and nowhere else."""
        if RANK[scope] > RANK[principal.role]:
            raise ValueError(f"scope {scope.value} is above your role ({principal.role.value})")
        token, now = TOKEN_PREFIX + secrets.token_urlsafe(32), iso(self.clock())
        with self.engine.begin() as conn:
            inserted = conn.execute(tokens.insert().values(
                user_id=_user_id(principal.name), label=label, scope=scope.value, prefix=token[:10],
                hash=digest_token(token), created_at=now)).inserted_primary_key
        assert inserted is not None
        return TokenInfo(int(inserted[0]), label, scope, token[:10], now, None, None), token

    def token(self, token: str) -> Login | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        return self._cached("t" + token, lambda: self._load_token(token))

    def _load_token(self, token: str) -> Login | None:
        query = (select(tokens, col(User.username), col(User.role))
                 .join(User, col(User.id) == tokens.c.user_id)
                 .where(tokens.c.hash == digest_token(token), tokens.c.revoked_at.is_(None)))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        now = self.clock()
        if row.last_used_at is None or datetime.fromisoformat(row.last_used_at) + TOUCH_EVERY <= now:
            with self.engine.begin() as conn:
                conn.execute(update(tokens).where(tokens.c.id == row.id)
                             .values(last_used_at=iso(now)))
        role = lesser(Role(row.scope), Role(row.role))
        return Login(Principal(row.username, role), secret=token)

    def tokens_of(self, username: str) -> list[TokenInfo]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(tokens).where(tokens.c.user_id == _user_id(username))
                                .order_by(tokens.c.id))
            return [TokenInfo(r.id, r.label, Role(r.scope), r.prefix, r.created_at,
                              r.last_used_at, r.revoked_at) for r in rows]

    def revoke_token(self, username: str, token_id: int) -> bool:
        """Revoke one of `username`'s own tokens; False if there is no such live token."""
        return self._revoke(tokens, username, token_id)

    def _revoke(self, table: Table, username: str, row_id: int) -> bool:
        """Revoke the live row `row_id` of `table` (sessions, tokens) if it is `username`'s."""
        with self.engine.begin() as conn:
            done = conn.execute(update(table).where(
                table.c.id == row_id, table.c.user_id == _user_id(username),
                table.c.revoked_at.is_(None)).values(revoked_at=iso(self.clock())))
        self._cache.clear()
        return bool(done.rowcount)

    # -- the cache --------------------------------------------------------------------------
    def _cached(self, key: str, load: Callable[[], Login | None]) -> Login | None:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = load()
        if len(self._cache) > 10_000:  # guesses must not grow it without bound
            self._cache.clear()
        self._cache[key] = (now + CACHE_S, found)
        return found
