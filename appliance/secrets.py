"""Reading and writing named secrets: systemd credentials first, then `<state>/secrets/`.

Files are written atomically with mode 0600. Values never appear in logs or reprs.
"""

from __future__ import annotations

import os
import secrets as _random
from pathlib import Path


def secrets_dir(state_dir: Path) -> Path:
    return state_dir / "secrets"


def read_secret(name: str, state_dir: Path) -> str | None:
    """The secret `name` from `$CREDENTIALS_DIRECTORY`, else from the state directory."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    for directory in ([Path(credentials)] if credentials else []) + [secrets_dir(state_dir)]:
        path = directory / name
        if path.is_file():
            return path.read_text().strip()
    return None


def write_secret(name: str, value: str, state_dir: Path) -> Path:
    directory = secrets_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / name
    tmp = path.with_name(f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def ensure_secret(name: str, state_dir: Path) -> str:
    """The stored secret, or a new random one written first (idempotent)."""
    existing = read_secret(name, state_dir)
    if existing:
        return existing
    value = _random.token_urlsafe(24)
    write_secret(name, value, state_dir)
    return value
