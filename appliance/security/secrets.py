"""Named secrets: systemd credentials first, then the encrypted store under `<state>/secrets/`.

Exchange API keys, the broker-admin password and device passwords live here. Each secret is
one file `<state>/secrets/<name>.enc` (directory 0700, files 0600, replaced atomically),
sealed by the keyring with the secret's name as associated data, so two files swapped on
disk fail to decrypt instead of handing one secret out under the other's name. A service
under systemd gets its secrets as credentials (`LoadCredential=`), read from
`$CREDENTIALS_DIRECTORY` before the store is looked at.

A value never appears in a log line, an exception message or a repr: nothing here logs, and
errors name the secret, never its content. Plaintext files left by earlier versions
(`<state>/secrets/<name>`) are encrypted the first time they are read, and then removed.
"""

from __future__ import annotations

import os
import re
import secrets as _random
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from appliance.errors import OperationalError, ValidationFailed
from appliance.files import flocked, private_dir, write_atomically
from appliance.logging import redact

if TYPE_CHECKING:
    from appliance.security.audit import AuditLog
    from appliance.security.crypto import Keyring

SUFFIX = ".enc"
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


def secrets_dir(state_dir: Path) -> Path:
    """The directory of the state directory's secret store (whether or not it exists)."""
    return state_dir / "secrets"


def check_name(name: str) -> str:
    """`name` if it is a valid secret name, else ValidationFailed saying what a name may be."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(SUFFIX):
        shown = repr(name[:64]) if isinstance(name, str) else type(name).__name__
        raise ValidationFailed(f"invalid secret name {shown}: use 1-128 of A-Z a-z 0-9 _ . -, "
                               f"not starting with a dot and not ending in {SUFFIX}")
    return name


class SecretStore:
    """The encrypted secrets of one state directory.

    With an `audit` log, every call given an `actor` records the action and the secret's
    name (never its value) on the audit chain."""

    def __init__(self, state_dir: Path, keyring: Keyring, audit: AuditLog | None = None) -> None:
        self.directory = secrets_dir(state_dir)
        self.keyring = keyring
        self.audit = audit

    @classmethod
    def open(cls, state_dir: Path, audit: AuditLog | None = None) -> SecretStore:
        """The store of `state_dir` with the box's keyring (created on first use)."""
        from appliance.security.crypto import Keyring

        return cls(state_dir, Keyring.load_or_create(state_dir), audit)

    def __repr__(self) -> str:
        return f"SecretStore({str(self.directory)!r}, key={self.keyring.current_id!r})"

    def path(self, name: str) -> Path:
        """Where the secret `name` is stored (whether or not it exists)."""
        return self.directory / f"{check_name(name)}{SUFFIX}"

    # -- the operations ---------------------------------------------------------------------
    def set(self, name: str, value: str, *, actor: str | None = None) -> Path:
        """Store `value` under `name`, replacing any earlier value; durable when this returns."""
        _check_value(value)
        path = self.path(name)
        with self._locked():
            self._write(name, value)
            self._legacy(name).unlink(missing_ok=True)  # an older plaintext must not linger
        self._record("write", name, actor)
        return path

    def get(self, name: str, *, actor: str | None = None) -> str | None:
        """The value of `name`, or None if there is no such secret. A stored secret that does not
        decrypt raises DecryptionError naming the secret."""
        value = self._read(name)
        self._record("read", name, actor, "ok" if value is not None else "missing")
        return value

    def setdefault(self, name: str, value: str, *, actor: str | None = None) -> str:
        """The stored value of `name`; if there is none, `value` is stored and returned. Two
        processes racing both get the one value that was stored."""
        _check_value(value)
        self.path(name)
        with self._locked():
            existing = self._read(name, locked=True)
            if existing:
                return existing
            self._write(name, value)
        self._record("write", name, actor)
        return value

    def delete(self, name: str, *, actor: str | None = None) -> bool:
        """Remove `name`; False if there was no such secret."""
        path = self.path(name)
        with self._locked():
            existed = path.exists() or self._legacy(name).is_file()
            path.unlink(missing_ok=True)
            self._legacy(name).unlink(missing_ok=True)
        self._record("delete", name, actor, "ok" if existed else "missing")
        return existed

    def names(self) -> list[str]:
        """Every stored secret's name, sorted (plaintext files of earlier versions are encrypted
        on the way)."""
        if not self.directory.is_dir():
            return []
        legacy = self._legacy_files()
        if legacy:
            with self._locked():
                for path in legacy:
                    self._migrate(path.name)
        return sorted(p.name[:-len(SUFFIX)] for p in self.directory.iterdir()
                      if p.name.endswith(SUFFIX) and _NAME.fullmatch(p.name[:-len(SUFFIX)]))

    def key_ids(self) -> dict[str, str]:
        """For each secret, the id of the key-encryption key it is stored under (no decryption;
        "unreadable" for a file that is not a Circles ciphertext)."""
        from appliance.security.crypto import DecryptionError

        found = {}
        for name in self.names():
            try:
                found[name] = self.keyring.key_id_of(self.path(name).read_bytes())
            except (DecryptionError, FileNotFoundError):
                found[name] = "unreadable"
        return found

    def reencrypt(self) -> int:
        """Re-wrap every secret's data key with the keyring's current key (the values are not
        re-encrypted, so this is cheap). Returns how many secrets changed key; after it, the
        older keys are no longer needed for secrets."""
        from appliance.security.crypto import DecryptionError

        names = self.names()
        moved = 0
        with self._locked():
            for name in names:
                path = self.path(name)
                try:
                    blob = path.read_bytes()
                    fresh = self.keyring.rewrap(blob)
                except FileNotFoundError:  # deleted meanwhile
                    continue
                except DecryptionError as exc:
                    raise DecryptionError(f"secret {name}: {exc}") from None
                if fresh is not blob:
                    write_atomically(path, partial(_write_bytes, fresh))
                    moved += 1
        return moved

    # -- files ------------------------------------------------------------------------------
    def _read(self, name: str, *, locked: bool = False) -> str | None:
        path = self.path(name)
        if self._legacy(name).is_file():  # plaintext of an earlier version: encrypt or drop it
            if locked:
                value = self._migrate(name)
            else:
                with self._locked():
                    value = self._migrate(name)
            if value is not None:
                return value
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        from appliance.security.crypto import DecryptionError

        try:
            value = self.keyring.decrypt(blob, _aad(name)).decode("utf-8")
        except DecryptionError as exc:
            raise DecryptionError(f"secret {name}: {exc}") from None
        redact(value)  # from now on this process's log lines cannot carry it
        return value

    def _migrate(self, name: str) -> str | None:
        """Encrypt an earlier version's plaintext file and remove it (the caller holds the lock).
        Returns the value, or None if there was nothing to migrate."""
        if self.path(name).exists():  # already encrypted (by another process): that one wins
            self._legacy(name).unlink(missing_ok=True)
            return None
        try:
            value = self._legacy(name).read_bytes().decode("utf-8").strip()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise OperationalError(f"secret {name}: the plaintext file {self._legacy(name)} is not "
                                   "UTF-8 text; replace it with `circles secrets set`") from None
        if value:
            self._write(name, value)
        self._legacy(name).unlink(missing_ok=True)
        return value or None

    def _write(self, name: str, value: str) -> None:
        redact(value)  # a process that stores a secret (a new random one too) cannot log it either
        blob = self.keyring.encrypt(value.encode("utf-8"), _aad(name))
        write_atomically(self.path(name), partial(_write_bytes, blob))

    def _legacy(self, name: str) -> Path:
        return self.directory / check_name(name)

    def _legacy_files(self) -> list[Path]:
        return [p for p in self.directory.iterdir() if _NAME.fullmatch(p.name)
                and not p.name.endswith(SUFFIX) and p.is_file()]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Writers take turns, so a reencrypt cannot put back a value a `set` just replaced."""
        with flocked(private_dir(self.directory) / ".lock"):
            yield

    def _record(self, what: str, name: str, actor: str | None, outcome: str = "ok") -> None:
        if self.audit is None or actor is None:
            return
        from appliance.security.audit import SECRET_DELETE, SECRET_READ, SECRET_WRITE

        action = {"read": SECRET_READ, "write": SECRET_WRITE, "delete": SECRET_DELETE}[what]
        self.audit.record(action, actor=actor, target=name, outcome=outcome)


def _write_bytes(data: bytes, out: BinaryIO) -> int:
    return out.write(data)


def _aad(name: str) -> bytes:
    return b"circles-secret\x00" + name.encode("ascii")


def _check_value(value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValidationFailed("a secret's value must be a non-empty string")


# -- the functions services call ---------------------------------------------------------------
def read_secret(name: str, state_dir: Path) -> str | None:
    """The secret `name` from `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`), else from
    the encrypted store in `state_dir`; None if neither has it."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / check_name(name)).is_file():
        value = (Path(credentials) / name).read_text().strip()
        redact(value)
        return value
    directory = secrets_dir(state_dir)
    if not (directory / f"{check_name(name)}{SUFFIX}").is_file() and not (directory / name).is_file():
        return None  # no keyring is needed, or created, to know a secret is absent
    return SecretStore.open(state_dir).get(name)


def write_secret(name: str, value: str, state_dir: Path) -> Path:
    """Store `value` under `name` in the encrypted store; returns the file it is in."""
    return SecretStore.open(state_dir).set(name, value)


def ensure_secret(name: str, state_dir: Path) -> str:
    """The secret `name` (credentials first, then the store), or a new random one stored first.
    Idempotent, and two processes racing get the same value."""
    existing = read_secret(name, state_dir)
    if existing:
        return existing
    return SecretStore.open(state_dir).setdefault(name, _random.token_urlsafe(24))
