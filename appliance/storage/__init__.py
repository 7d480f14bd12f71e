"""Object storage: one `Store` interface over the local disk or MinIO/any S3, optionally
envelope-encrypted (docs/storage.md). `open_store` builds the store a setting describes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import ConfigError, ValidationFailed
from appliance.storage.base import (
    PART_SIZE,
    NotFound,
    ObjectInfo,
    StorageCorrupt,
    StorageDenied,
    StorageError,
    StorageUnavailable,
    Store,
    check_key,
    check_metadata,
)
from appliance.storage.fs import FileStore

if TYPE_CHECKING:
    from appliance.config import StoreSettings
    from appliance.security.crypto import Keyring

__all__ = ["PART_SIZE", "FileStore", "NotFound", "ObjectInfo", "StorageCorrupt", "StorageDenied",
           "StorageError", "StorageUnavailable", "Store", "check_key", "check_metadata", "open_store"]


def open_store(settings: StoreSettings, *, state_dir: Path, default_path: Path,
               keyring: Keyring | None = None, must_exist: bool = False) -> Store:
    """The store `settings` describe: the local disk at `settings.path or default_path`, or S3
    at `settings.endpoint` with its keys from the secret store of `state_dir`; wrapped in
    `EncryptedStore` when `settings.encrypt` (with `keyring`, else the box's keyring).

    ConfigError names the setting or the secret that is wrong or missing, never a secret's
    value. StorageUnavailable when the folder that should hold `settings.path` is missing (its
    disk is not mounted): the store is not made on the box's own disk instead. With
    `must_exist`, the local folder itself (`settings.path or default_path`) must be there as
    well: it is made once, by hand, on the disk it names (backup targets)."""
    inner: Store
    if settings.backend == "s3":
        inner = _s3(settings, state_dir)
    else:
        if settings.path is not None and not settings.path.parent.is_dir():
            raise StorageUnavailable(f"local:{settings.path}: the folder {settings.path.parent} is missing; "
                                     "is its disk not mounted?")
        root = settings.path or default_path
        if must_exist and not root.is_dir():
            raise StorageUnavailable(f"local:{root}: the folder {root} is missing; is its disk mounted? "
                                     "(make the folder once, on the disk)")
        inner = FileStore(root, local=_same_device(root, state_dir))
    if not settings.encrypt:
        return inner
    from appliance.security.crypto import Keyring
    from appliance.storage.encrypted import EncryptedStore

    return EncryptedStore(inner, keyring or Keyring.load_or_create(state_dir))


def _s3(settings: StoreSettings, state_dir: Path) -> Store:
    from appliance.security.secrets import read_secret
    from appliance.storage.s3 import S3Store

    if not settings.endpoint:
        raise ConfigError("storage.endpoint: the s3 backend needs host:port of MinIO or S3")
    if "/" in settings.endpoint:  # the value is not echoed: a URL may carry a user and password
        raise ConfigError("storage.endpoint: host:port, no scheme (and no path), e.g. nas.lan:9000")
    keys = []
    for setting in ("access_key_secret", "secret_key_secret"):
        name = getattr(settings, setting)
        try:
            value = read_secret(name, state_dir)
        except ValidationFailed as exc:
            raise ConfigError(f"storage.{setting}: {exc}") from None
        if not value:
            raise ConfigError(f"storage.{setting}: no secret {name!r}; set it with "
                              f"`circles secrets set {name}`")
        keys.append(value)
    try:
        return S3Store.connect(settings.endpoint, settings.bucket, access_key=keys[0], secret_key=keys[1],
                               secure=settings.secure, region=settings.region)
    except ValueError as exc:  # the SDK's check of the endpoint: "invalid port", "username in endpoint …"
        raise ConfigError(f"storage.endpoint: host:port, no scheme ({exc})") from None


def _same_device(root: Path, state_dir: Path) -> bool:
    """Whether `root` is on the state directory's file system: a USB disk mounted elsewhere
    is not the box's own disk (a backup there is not "local only")."""
    def device(path: Path) -> int:
        # The folder may not exist yet: the nearest existing parent is where it will be made.
        while not path.exists() and path != path.parent:
            path = path.parent
        return os.stat(path).st_dev

    return device(root) == device(state_dir)
