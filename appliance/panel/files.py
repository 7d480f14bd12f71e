"""The box's shared files: one space for the owner and the household, kept in the personal
cloud's store (`[storage]`) under `files/`, so backups or other users of the same bucket
never meet them. Folders are `/` in names; a folder exists while a file is in it.

What the routes need beyond HTTP: names checked and mapped to keys, a folder listed one
level at a time, a file streamed out in chunks, and share links: the store's own presigned
URL when it can make one (plain MinIO or S3), else a link to the panel signed with the
box's link secret (`appliance.storage.links`) for that version of the file: once it is
deleted or replaced, the link serves nothing.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, BinaryIO
from urllib.parse import quote

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from appliance.config import CoreSettings
from appliance.errors import ConfigError
from appliance.security.crypto import Keyring
from appliance.storage import links, open_store
from appliance.storage.base import NotFound, ObjectInfo, StorageError, Store, check_key

log = logging.getLogger("circles.panel")
PREFIX = "files/"
CHUNK = 256 * 1024  # bytes read from the store per step of a download
MAX_LISTED = 1000  # files and folders a listing gives at most
MAX_NAME_BYTES = 255
# How long a share link lasts; seven days is the most an S3 presigned URL may.
EXPIRIES = {"1h": timedelta(hours=1), "1d": timedelta(days=1), "7d": timedelta(days=7)}
EXPIRY_WORDS = {"1h": "1 hour", "1d": "1 day", "7d": "7 days"}
SHARED_PATH = "/files/shared/"
UPLOAD_SLACK = 1024 * 1024  # a multipart body's own headers and fields, beyond the file


class Shown:
    """Share links just made on the page, kept a few minutes for the page the form leads to
    (a reload of it shows the link again and makes no new one), for the session that made
    them only."""

    def __init__(self, keep_s: float = 600, most: int = 100) -> None:
        self.keep_s, self.most = keep_s, most
        self._links: dict[str, tuple[float, int | None, dict[str, Any]]] = {}

    def add(self, session: int | None, shown: dict[str, Any]) -> str:
        """Keep `shown` for `session`; the reference the page asks for it by."""
        now = time.monotonic()
        self._links = {ref: kept for ref, kept in self._links.items() if kept[0] > now}
        while len(self._links) >= self.most:
            del self._links[next(iter(self._links))]
        ref = secrets.token_urlsafe(16)
        self._links[ref] = (now + self.keep_s, session, shown)
        return ref

    def get(self, session: int | None, ref: str) -> dict[str, Any] | None:
        kept = self._links.get(ref)
        if kept is None or kept[0] <= time.monotonic() or kept[1] != session:
            return None
        return kept[2]


@dataclass
class FileSpace:
    """The files as the panel serves them: the store (None when it could not be opened,
    `problem` then says why), the secret of its signed links, the largest upload."""

    store: Store | None
    link_secret: bytes = field(repr=False)
    max_upload: int  # bytes
    problem: str | None = None
    shown: Shown = field(default_factory=Shown)

    @property
    def max_body(self) -> int:
        """The largest request body an upload may have: the file and the form around it."""
        return self.max_upload + UPLOAD_SLACK

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def open_space(settings: CoreSettings, keyring: Keyring, max_upload_mb: int) -> FileSpace:
    """The panel's files, in the store of `[storage]` (blocking: call it in a thread). A
    store that cannot be opened (S3 without its keys, a folder it may not write) leaves the
    rest of the panel working: the Files page says why."""
    secret = links.link_secret(settings.state_dir)
    try:
        store = open_store(settings.storage, state_dir=settings.state_dir,
                           default_path=settings.state_dir / "storage", keyring=keyring)
    except (ConfigError, OSError, StorageError) as exc:
        log.error(f"files: {exc}", extra={"problem": str(exc)})
        return FileSpace(None, secret, max_upload_mb * 1024 * 1024, problem=str(exc))
    return FileSpace(store, secret, max_upload_mb * 1024 * 1024)


# -- names ---------------------------------------------------------------------------------
def key_of(path: str) -> str:
    """The store key of the file at `path` ("photos/cat.jpg"); ValueError saying why when
    it is no usable name (empty, a leading `/`, an empty, `.` or `..` part, a control
    character, too long in all or in one part)."""
    if not path:
        raise ValueError("a file needs a name")
    try:
        key = check_key(PREFIX + path)
    except ValueError:
        raise ValueError(f"invalid name {path[:100]!r}: at most {1024 - len(PREFIX)} characters, no "
                         "control character, no empty, '.' or '..' part") from None
    # What a disk's file system takes as one name (the local store keeps a file per key).
    if any(len(part.encode()) > MAX_NAME_BYTES for part in path.split("/")):
        raise ValueError(f"invalid name {path[:100]!r}: a file or folder name of at most "
                         f"{MAX_NAME_BYTES} bytes")
    return key


def folder_of(folder: str) -> str:
    """`folder` as a listing prefix: "" (the top) or "a/b/"; ValueError like `key_of`."""
    folder = folder.strip().strip("/")
    if folder:
        key_of(folder + "/x")
        folder += "/"
    return folder


def join(folder: str, name: str) -> str:
    """The path of `name` in `folder` (a name may hold folders of its own: "2024/a.jpg"),
    unchecked: `key_of` says whether it is usable."""
    folder = folder.strip().strip("/")
    return f"{folder}/{name.strip()}" if folder else name.strip()


def parent(path: str) -> str:
    """The folder `path` is in: "" (the top) or "a/b/"."""
    return path.rsplit("/", 1)[0] + "/" if "/" in path else ""


def crumbs(folder: str) -> list[tuple[str, str]]:
    """The way down to `folder`: (label, folder) from "Files" at the top."""
    out, at = [("Files", "")], ""
    for part in folder.strip("/").split("/") if folder.strip("/") else []:
        at += part + "/"
        out.append((part, at))
    return out


def content_type(name: str, given: str | None) -> str:
    """What the uploader said the file is, unless it said nothing useful: then what its
    name says, else bytes."""
    if given and given != "application/octet-stream" and given.isascii() and given.isprintable() \
            and "/" in given and len(given) <= 127:
        return given
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def disposition(name: str) -> str:
    """A Content-Disposition that saves the file as `name`: an ASCII stand-in for old
    clients, the exact name in UTF-8 (RFC 5987) for the others."""
    plain = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"


# -- the store -----------------------------------------------------------------------------
def file_row(info: ObjectInfo) -> dict[str, Any]:
    path = info.key.removeprefix(PREFIX)
    return {"name": path.rsplit("/", 1)[-1], "path": path, "size": info.size,
            "modified": info.modified.isoformat(), "content_type": info.content_type}


def listing(store: Store, folder: str, *, recursive: bool = False) -> dict[str, Any]:
    """One folder: its sub-folders (with how many files each holds) and its files, in name
    order; every file below it instead when `recursive`. At most MAX_LISTED of each, and
    `truncated` says when there were more. Blocking: call it in a thread."""
    folder = folder_of(folder)
    folders: dict[str, int] = {}
    files: list[dict[str, Any]] = []
    truncated = False
    for info in store.list(PREFIX + folder):
        rest = info.key[len(PREFIX) + len(folder):]
        if "/" in rest and not recursive:
            name = rest.split("/", 1)[0]
            if name in folders or len(folders) < MAX_LISTED:
                folders[name] = folders.get(name, 0) + 1
            else:
                truncated = True
        elif len(files) < MAX_LISTED:
            files.append(file_row(info))
        else:
            truncated = True
    return {"folder": folder,
            "folders": [{"name": name, "path": folder + name + "/", "files": count}
                        for name, count in folders.items()],
            "files": files, "truncated": truncated}


def version(info: ObjectInfo) -> str:
    """What tells this file from another put under the same name later (its hash as the store
    keeps it, and its time): a signed link names it, and serves nothing else."""
    return hashlib.sha256(f"{info.etag}\x00{info.modified.isoformat()}".encode()).hexdigest()[:16]


def link_token(key: str, of: str, expires_at: datetime, secret: bytes) -> str:
    """The token of `/files/shared/<token>`: the file's `version` `of`, then a link signed for
    that version (`appliance.storage.links`)."""
    return f"{of}.{links.sign(key, expires_at, secret, scope=f'files:{of}')}"


def read_link(token: str, secret: bytes, now: datetime) -> tuple[str, str]:
    """The key and version `token` was made for; links.LinkExpired once it is over,
    links.LinkInvalid when this box did not make it for one of the files."""
    of, _, signed = token.partition(".")
    if len(of) != 16:  # what `version` gives; the signature then vouches for it
        raise links.LinkInvalid("invalid link")
    key = links.verify(signed, secret, now, scope=f"files:{of}")
    if not key.startswith(PREFIX):
        raise links.LinkInvalid("invalid link")
    return key, of


@dataclass
class Opened:
    """A file opened for reading, with what the store says of it."""

    info: ObjectInfo
    src: BinaryIO
    handle: AbstractContextManager[BinaryIO]

    def close(self) -> None:
        self.handle.__exit__(None, None, None)


def open_file(store: Store, key: str, *, of: str | None = None) -> Opened:
    """The file at `key`, opened (blocking: call it in a thread). NotFound when there is none,
    or, with `of`, when it is no longer that `version` (replaced since)."""
    info = store.stat(key)
    if of is not None and version(info) != of:
        raise NotFound(f"{key}: replaced since the link was made")
    handle = store.open(key)
    return Opened(info, handle.__enter__(), handle)


class Download(StreamingResponse):
    """An opened file as an attachment: its length and type, CHUNK bytes per read in a
    thread; sent with a sandbox CSP, so a browser runs nothing it holds. The file is closed
    once the answer is over however it ends, also when the client left before it began (a
    read is never abandoned while the close runs)."""

    def __init__(self, opened: Opened) -> None:
        self.opened = opened
        info = opened.info
        super().__init__(self._blocks(), headers={
            "content-type": info.content_type, "content-length": str(info.size),
            "content-disposition": disposition(info.key.rsplit("/", 1)[-1]),
            "content-security-policy": "sandbox; default-src 'none'"})

    async def _blocks(self) -> AsyncIterator[bytes]:
        try:
            while block := await anyio.to_thread.run_sync(self.opened.src.read, CHUNK):
                yield block
        except StorageError as exc:  # the client sees fewer bytes than the length said
            log.error(f"files: download of {self.opened.info.key} broke off: {exc}",
                      extra={"key": self.opened.info.key})
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.opened.close)


@dataclass(frozen=True)
class Share:
    url: str
    expires_at: datetime
    kind: str  # "presigned": the store's own URL; "signed": a link to this panel


def share(space: FileSpace, store: Store, info: ObjectInfo, expires: timedelta, base_url: str,
          now: datetime) -> Share:
    """A link anyone may download the file of `info` from until `now + expires`; a signed
    one serves only this version of it. Blocking."""
    expires_at = now + expires
    url = store.presigned_get(info.key, expires)
    if url is not None:
        return Share(url, expires_at, "presigned")
    token = link_token(info.key, version(info), expires_at, space.link_secret)
    return Share(f"{base_url.rstrip('/')}{SHARED_PATH}{token}", expires_at, "signed")
