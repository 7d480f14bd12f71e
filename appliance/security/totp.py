"""The second factor: TOTP codes (RFC 6238, as any authenticator app makes them) and single-use
backup codes.

Enrolment is two calls, so a typo in the app never locks anyone out: `begin_enrolment`
makes a new secret, keeps it pending and returns the otpauth URI with its QR code (SVG);
`confirm_enrolment` with a first code from the app makes it the user's secret and returns
10 backup codes, shown once (`regenerate_backup_codes` replaces them all later). From then
on the login asks for a code (users.py).

A code is accepted for the current 30-second step and one step either side (phone clocks
drift). The matched step is stored and only a later step is accepted afterwards, so a code
seen over someone's shoulder or replayed from a log cannot be used again. Secrets are
encrypted at rest with the keyring (associated data `totp:<username>`, so a blob copied
to another user does not open); backup codes are stored as Argon2 hashes and marked used.
"""

from __future__ import annotations

import hmac
import io
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

import pyotp
import segno
from sqlalchemy import delete, func, update
from sqlmodel import Field, SQLModel, col, select

from appliance.errors import AuthError, OperationalError
from appliance.security import audit as events
from appliance.security.crypto import DecryptionError, Keyring
from appliance.security.passwords import ALPHABET, hash_password, random_groups, verify_password
from appliance.security.users import User, UTCDateTime, canonical_username

if TYPE_CHECKING:
    from appliance.security.users import Users

BACKUP_CODES = 10
STEP_WINDOW = 1  # steps accepted either side of the current one
# Two groups of five: about 50 bits each, out of reach online, where the lockout applies.
_BACKUP_GROUPS, _BACKUP_GROUP_SIZE = 2, 5


class Factor(StrEnum):
    TOTP = "totp"
    BACKUP_CODE = "backup_code"


class BackupCode(SQLModel, table=True):
    """A row of `user_backup_codes` (migration 0004); deleted with its user."""

    __tablename__ = "user_backup_codes"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", ondelete="CASCADE")
    code_hash: str = Field(max_length=200, repr=False)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Enrolment(NamedTuple):
    """What the enrolment page shows: the otpauth URI (for a link) and its QR code."""

    uri: str
    qr_svg: str

    def __repr__(self) -> str:
        return "Enrolment(uri=<holds the secret>, qr_svg=<svg>)"


class TotpError(AuthError):
    """An enrolment step was refused (no enrolment in progress, a code that does not match)."""


def match_step(secret: str, code: str, at: datetime, *, after: int | None = None,
               window: int = STEP_WINDOW) -> int | None:
    """The time step within `window` steps of `at` whose code is `code`, provided it is later
    than `after` (the last step used); None otherwise. When several match, the latest."""
    totp = pyotp.TOTP(secret)
    now = totp.timecode(at)
    matched = None
    for step in range(now - window, now + window + 1):
        # Every step is compared, in constant time: how far off a code was is not leaked.
        if hmac.compare_digest(totp.generate_otp(step), code) and (after is None or step > after):
            matched = step
    return matched


def qr_svg(uri: str) -> str:
    """An SVG QR code of `uri`, ready to inline in a page (no XML declaration)."""
    out = io.BytesIO()
    segno.make(uri, error="m").save(out, kind="svg", scale=4, xmldecl=False, svgclass="totp-qr",
                                    title="TOTP enrolment")
    return out.getvalue().decode()


def new_backup_codes(count: int = BACKUP_CODES) -> list[str]:
    """`count` random codes shaped `xxxxx-xxxxx`."""
    return [random_groups(_BACKUP_GROUPS, _BACKUP_GROUP_SIZE) for _ in range(count)]


def normalise_code(code: str) -> str:
    """A code as typed, without spaces or dashes and in lower case."""
    return "".join(code.split()).replace("-", "").lower()


def _aad(username: str) -> bytes:
    return b"totp:" + username.encode()


class Totp:
    """TOTP enrolment, verification and reset for the users of one box."""

    def __init__(self, users: Users, keyring: Keyring | None) -> None:
        self.users, self.keyring = users, keyring

    def _keys(self) -> Keyring:
        if self.keyring is None:
            raise OperationalError("TOTP needs the keyring: build Users with keyring="
                                   "Keyring.load_or_create(state_dir)")
        return self.keyring

    def _seal(self, name: str, secret: str) -> bytes:
        return self._keys().encrypt(secret.encode(), _aad(name))

    def _open(self, name: str, blob: bytes) -> str:
        try:
            return self._keys().decrypt(blob, _aad(name)).decode()
        except DecryptionError as exc:
            raise OperationalError(f"the TOTP secret of {name} cannot be decrypted ({exc}); "
                                   f"`circles user totp-reset {name}` lets them enrol again") from None

    # -- enrolment --------------------------------------------------------------------------
    def begin_enrolment(self, username: str) -> Enrolment:
        """A new secret, kept pending until confirmed (an enrolled secret stays in force until
        then); the otpauth URI and its QR code for the app."""
        name = canonical_username(username)
        secret = pyotp.random_base32()
        with self.users.session() as session:
            user = self.users.existing(session, name)
            user.totp_pending = self._seal(name, secret)
            session.add(user)
            session.commit()
        uri = pyotp.TOTP(secret).provisioning_uri(name=name,
                                                  issuer_name=self.users.settings.totp_issuer)
        return Enrolment(uri, qr_svg(uri))

    def confirm_enrolment(self, username: str, code: str, *, actor: str | None = None) -> list[str]:
        """Make the pending secret the user's, given a current code from the app (TotpError if
        it does not match); returns 10 new backup codes, to be shown once. Earlier backup
        codes stop working."""
        name = canonical_username(username)
        now = self.users.clock()
        with self.users.session() as session:
            pending = self.users.existing(session, name, lock=False).totp_pending
        if pending is None:
            raise TotpError(f"no TOTP enrolment of {name} in progress; begin one first")
        secret = self._open(name, pending)
        step = match_step(secret, normalise_code(code), now)
        if step is None:
            raise TotpError("the code does not match; check the phone's clock and type the "
                            "code the app shows now")
        codes = new_backup_codes()
        hashes = [hash_password(normalise_code(c), self.users.hasher) for c in codes]
        with self.users.session() as session:
            user = self.users.existing(session, name)
            # The secrets, not the blobs: `circles keys reencrypt` may have re-wrapped it since.
            if user.totp_pending is None or self._open(name, user.totp_pending) != secret:
                raise TotpError("the enrolment was restarted meanwhile; use the latest QR code")
            replaced = user.totp_secret is not None
            user.totp_secret, user.totp_pending = user.totp_pending, None
            user.totp_enrolled_at, user.totp_last_step = now, step
            session.add(user)
            session.exec(delete(BackupCode).where(col(BackupCode.user_id) == user.id))
            assert user.id is not None
            session.add_all(BackupCode(user_id=user.id, code_hash=h) for h in hashes)
            session.commit()
        self.users.audit.record(events.TOTP_ENROL, actor=actor or f"user:{name}", target=name,
                                replaced=replaced, backup_codes=len(codes))
        return codes

    def regenerate_backup_codes(self, username: str, *, actor: str | None = None) -> list[str]:
        """10 new backup codes in place of all earlier ones (used or not), to be shown once;
        TotpError for a user without TOTP. The caller checks the person first (a current
        code: the panel's step-up)."""
        name = canonical_username(username)
        codes = new_backup_codes()
        hashes = [hash_password(normalise_code(c), self.users.hasher) for c in codes]
        with self.users.session() as session:
            user = self.users.existing(session, name)
            if user.totp_secret is None:
                raise TotpError(f"{name} has no authenticator app set up: backup codes come "
                                "with one")
            session.exec(delete(BackupCode).where(col(BackupCode.user_id) == user.id))
            assert user.id is not None
            session.add_all(BackupCode(user_id=user.id, code_hash=h) for h in hashes)
            session.commit()
        self.users.audit.record(events.BACKUP_CODES_RENEW, actor=actor or f"user:{name}",
                                target=name, backup_codes=len(codes))
        return codes

    def reset(self, username: str, *, actor: str) -> bool:
        """Remove the user's TOTP secret (pending or enrolled) and backup codes, e.g. after a lost
        phone; they log in with the password alone and enrol again. Whether there was any."""
        name = canonical_username(username)
        with self.users.session() as session:
            user = self.users.existing(session, name)
            had = user.totp_secret is not None or user.totp_pending is not None
            user.totp_secret = user.totp_pending = None
            user.totp_enrolled_at = user.totp_last_step = None
            user.login_challenge_hash = user.login_challenge_expires = None
            session.add(user)
            session.exec(delete(BackupCode).where(col(BackupCode.user_id) == user.id))
            session.commit()
        self.users.audit.record(events.TOTP_RESET, actor=actor, target=name, had_totp=had)
        return had

    # -- verification -----------------------------------------------------------------------
    def is_enrolled(self, username: str) -> bool:
        with self.users.session() as session:
            return self.users.existing(session, username, lock=False).totp_secret is not None

    def backup_codes_left(self, username: str) -> int:
        with self.users.session() as session:
            user = self.users.existing(session, username, lock=False)
            return session.exec(select(func.count()).select_from(BackupCode).where(
                col(BackupCode.user_id) == user.id, col(BackupCode.used_at).is_(None))).one()

    def verify(self, username: str, code: str) -> Factor | None:
        """Which factor `code` is, if it is valid for `username` now: a TOTP code of a step later
        than the last one used, or an unused backup code (used up by this call). None for
        anything else, including a user without TOTP; UnknownUser for a name that does not
        exist. Does not count failures: the login does."""
        name = canonical_username(username)
        typed = normalise_code(code)
        if len(typed) == 6 and typed.isascii() and typed.isdigit():
            return Factor.TOTP if self._verify_totp(name, typed) else None
        if len(typed) == _BACKUP_GROUPS * _BACKUP_GROUP_SIZE and set(typed) <= set(ALPHABET):
            return Factor.BACKUP_CODE if self._use_backup_code(name, typed) else None
        return None

    def _verify_totp(self, name: str, code: str) -> bool:
        now = self.users.clock()
        # One transaction reads the last step and writes the new one: two requests racing
        # with the same code cannot both pass.
        with self.users.session() as session:
            user = self.users.existing(session, name)
            if user.totp_secret is None:
                return False
            step = match_step(self._open(name, user.totp_secret), code, now,
                              after=user.totp_last_step)
            if step is None:
                return False
            user.totp_last_step = step
            session.add(user)
            session.commit()
        return True

    def _use_backup_code(self, name: str, code: str) -> bool:
        with self.users.session() as session:
            user = self.users.existing(session, name, lock=False)
            if user.totp_secret is None:
                return False
            unused = session.exec(select(BackupCode).where(
                col(BackupCode.user_id) == user.id, col(BackupCode.used_at).is_(None))).all()
        # Argon2 outside any transaction: the database is not held while it runs.
        hasher = self.users.hasher
        found = next((c for c in unused if verify_password(c.code_hash, code, hasher)), None)
        if found is None:
            return False
        with self.users.session() as session:
            marked = session.exec(update(BackupCode).where(
                col(BackupCode.id) == found.id, col(BackupCode.used_at).is_(None))
                .values(used_at=self.users.clock()))
            session.commit()
        if marked.rowcount != 1:  # the same code, used by a concurrent request
            return False
        self.users.audit.record(events.BACKUP_CODE_USED, actor=f"user:{name}", target=name,
                                remaining=len(unused) - 1)
        return True

    # -- keys -------------------------------------------------------------------------------
    def rewrap_secrets(self) -> int:
        """Move every TOTP secret to the keyring's current key (after a rotation); returns how
        many blobs were rewritten."""
        keys, moved = self._keys(), 0
        with self.users.session() as session:
            for user in session.exec(select(User).with_for_update()):
                for attr in ("totp_secret", "totp_pending"):
                    blob = getattr(user, attr)
                    if blob is not None and keys.key_id_of(blob) != keys.current_id:
                        setattr(user, attr, keys.rewrap(blob))
                        moved += 1
                session.add(user)
            session.commit()
        return moved
