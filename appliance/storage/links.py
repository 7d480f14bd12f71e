"""Signed download links for stores that cannot presign (the local disk, encrypted objects).

A token is `<key, base64url>.<expiry, unix seconds>.<HMAC-SHA256, base64url>`, URL-safe, with
the HMAC over a scope, the key and the expiry under a random secret the box keeps in its secret
store. Whoever holds a token may fetch that one object until the expiry, and nothing else: the
key and the expiry cannot be changed without the secret, and a token signed for one scope (the
panel's files: "files") is no token for another. A link lasts at most `MAX_LIFETIME`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from pathlib import Path

from appliance.security.secrets import ensure_secret
from appliance.storage.base import check_key

SECRET_NAME = "storage-link-secret"
_DOMAIN = b"circles-link\x00"
MAX_LIFETIME = timedelta(days=7)  # as long as an S3 presigned URL may last


class LinkInvalid(ValueError):
    """Not a link this box signed (malformed, or altered)."""


class LinkExpired(LinkInvalid):
    """A genuine link whose time is over."""


def link_secret(state_dir: Path) -> bytes:
    """The box's link-signing secret, made at random and stored the first time."""
    return ensure_secret(SECRET_NAME, state_dir).encode("ascii")


def sign(key: str, expires_at: datetime, secret: bytes, *, scope: str = "files",
         now: datetime | None = None) -> str:
    """A token that lets its holder fetch `key` until `expires_at` (an aware datetime, at most
    `MAX_LIFETIME` after `now`, by default the current time; else ValueError), valid only
    where it is verified with the same `scope`."""
    expiry = _unix(expires_at)
    if expiry > _unix(now or datetime.now(UTC)) + MAX_LIFETIME.total_seconds():
        raise ValueError(f"a link lasts at most {MAX_LIFETIME.days} days")
    return _token(scope, check_key(key), expiry, secret)


def verify(token: str, secret: bytes, now: datetime, *, scope: str = "files") -> str:
    """The key `token` was signed for. LinkInvalid ("invalid link") if it was not signed with
    `secret` for `scope`, was altered, or claims more than `MAX_LIFETIME` from `now`;
    LinkExpired ("expired link") if it is genuine but its time is over at `now`. Both are
    ValueError: a request's bad input."""
    if not token.isascii():  # every token this box signs is
        raise LinkInvalid("invalid link")
    try:
        encoded_key, expiry_text, _ = token.split(".")
        key = check_key(_unb64(encoded_key).decode("utf-8"))
        expiry = int(expiry_text)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise LinkInvalid("invalid link") from None
    # The whole token against the one this box would sign: any other spelling of the same
    # key or expiry is refused too.
    if not hmac.compare_digest(token.encode(), _token(scope, key, expiry, secret).encode()):
        raise LinkInvalid("invalid link")
    if expiry > _unix(now) + MAX_LIFETIME.total_seconds():  # never signed so (or the clock went back)
        raise LinkInvalid("invalid link")
    if _unix(now) >= expiry:
        raise LinkExpired("expired link")
    return key


def _token(scope: str, key: str, expiry: int, secret: bytes) -> str:
    signed = b"\x00".join([_DOMAIN + scope.encode(), key.encode(), str(expiry).encode()])
    mac = hmac.new(secret, signed, hashlib.sha256)
    return f"{_b64(key.encode())}.{expiry}.{_b64(mac.digest())}"


def _unix(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("links need aware datetimes (UTC)")
    return int(moment.timestamp())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
