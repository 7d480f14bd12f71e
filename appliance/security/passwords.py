"""Passwords: Argon2id hashes and the policy a new password must pass.

Hashes are Argon2id in the PHC string format (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`), so
each one names the parameters it was made with; `needs_rehash` tells when the hasher's
parameters have changed since, and the login rehashes then (it is the only moment the
clear password is known).

The policy follows NIST SP 800-63B: length over composition rules. A password must have
at least 12 characters, must not be (or be a thin disguise of) one of the 30,000 most
common passwords shipped with Circles, must not be the username, and must not be a
repetition of a few characters.
"""

from __future__ import annotations

import gzip
import secrets
import string
import unicodedata
from functools import cache
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from appliance.errors import ValidationFailed

MIN_LENGTH = 12
# Far beyond any real password; refusing more keeps a request body from becoming hash work.
MAX_LENGTH = 1024
MIN_DISTINCT = 5
COMMON_PASSWORDS = Path(__file__).with_name("common-passwords.txt.gz")
# What people bolt on to a common word to get past a length rule: "password2024!".
_DECORATION = string.digits + string.punctuation + " "
# No 0/o, 1/l/i: a generated password or backup code is read off a screen and typed by hand.
ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"


class PasswordPolicyError(ValidationFailed):
    """A new password was refused; the message says why, without repeating the password."""


def default_hasher() -> PasswordHasher:
    """Argon2id with argon2-cffi's current recommended parameters (RFC 9106, low memory:
    64 MiB, 3 passes, 4 lanes). A library upgrade that raises them makes old hashes
    `needs_rehash`, and they are upgraded at the next login."""
    return PasswordHasher()


def hash_password(password: str, hasher: PasswordHasher) -> str:
    """The PHC string of `password` with a fresh random salt."""
    return hasher.hash(password)


def verify_password(stored: str, password: str, hasher: PasswordHasher) -> bool:
    """Whether `password` matches the hash `stored`; False also for a damaged hash."""
    try:
        return hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str, hasher: PasswordHasher) -> bool:
    """Whether `stored` was made with parameters other than `hasher`'s."""
    try:
        return hasher.check_needs_rehash(stored)
    except InvalidHashError:
        return True


@cache
def _common() -> frozenset[str]:
    # Loaded on first use only: most processes never check a new password.
    with gzip.open(COMMON_PASSWORDS, "rt", encoding="utf-8") as lines:
        return frozenset(word for line in lines
                         if (word := line.strip()) and not word.startswith("#"))


def _normalise(text: str) -> str:
    # NFKC folds look-alikes (full-width letters, ligatures) onto the plain ones.
    return unicodedata.normalize("NFKC", text).casefold()


def check_policy(password: str, username: str) -> None:
    """Return if `password` may be set for `username`; else raise PasswordPolicyError with
    the reason (too short, too long, too few distinct characters, a common password, or the
    username)."""
    if len(password) < MIN_LENGTH:
        raise PasswordPolicyError(f"password refused: it must have at least {MIN_LENGTH} "
                                  f"characters (it has {len(password)})")
    if len(password) > MAX_LENGTH:
        raise PasswordPolicyError(f"password refused: it must have at most {MAX_LENGTH} characters")
    folded = _normalise(password)
    if len(set(folded)) < MIN_DISTINCT:
        raise PasswordPolicyError(f"password refused: it repeats too few characters (fewer than "
                                  f"{MIN_DISTINCT} different ones)")
    core = folded.strip(_DECORATION)
    name = _normalise(username).strip()
    if name and name in (folded, core):
        raise PasswordPolicyError("password refused: it is the username")
    common = _common()
    if folded in common or (core and core in common):
        raise PasswordPolicyError("password refused: it is one of the most common passwords "
                                  "(a common word with digits or symbols added counts too)")


def random_groups(groups: int, size: int) -> str:
    """`groups` groups of `size` random characters of ALPHABET joined by dashes
    (about 4.95 bits a character)."""
    return "-".join("".join(secrets.choice(ALPHABET) for _ in range(size)) for _ in range(groups))


def generate_password(groups: int = 4, size: int = 5) -> str:
    """A random password that passes the policy for any username: `groups` groups of `size`
    characters joined by dashes (the default has about 99 bits of entropy)."""
    while True:
        password = random_groups(groups, size)
        try:
            check_policy(password, "")
        except PasswordPolicyError:
            continue  # astronomically rare (too few distinct characters); draw again
        return password
