"""The tamper-evident audit log: security events on the ledger's own chain `audit`.

Any process appends directly through the ledger primitive (one database transaction per
event, serialised by the database), so the CLI, the panel and a service may write at the
same moment and the chain stays one valid sequence. A record names who did what to
what, and how it ended; never a secret, only the names of things.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.config import CoreSettings
from appliance.ledger import Appended, Archived, Entry, Ledger, open_ledger
from appliance.ledger_verify import TS_FORMAT, Verdict

CHAIN = "audit"

# What is recorded. A test checks every action here is written somewhere.
LOGIN_SUCCESS = "login.success"
LOGIN_FAILURE = "login.failure"
LOCKOUT = "login.lockout"
LOGOUT = "login.logout"
USER_ADD = "user.add"
USER_REMOVE = "user.remove"
ROLE_CHANGE = "user.role"
PASSWORD_CHANGE = "password.change"
PASSWORD_RESET = "password.reset"
TOTP_ENROL = "totp.enrol"
TOTP_RESET = "totp.reset"
BACKUP_CODE_USED = "totp.backup_code"
BACKUP_CODES_RENEW = "totp.backup_codes"  # all backup codes replaced by new ones
SESSION_REVOKE = "session.revoke"  # a person ended one of their panel sessions
KEY_ROTATE = "keys.rotate"
KEY_REENCRYPT = "keys.reencrypt"
SECRET_READ = "secret.read"
SECRET_WRITE = "secret.write"
SECRET_DELETE = "secret.delete"
API_KEY_CREATE = "apikey.create"
API_KEY_REVOKE = "apikey.revoke"
TOKEN_CREATE = "token.create"  # a panel API token for scripts
TOKEN_REVOKE = "token.revoke"
LEDGER_EXPORT = "ledger.export"
DEVICE_ADD = "device.add"
DEVICE_REMOVE = "device.remove"
DEVICE_SWITCH = "device.switch"  # a command sent to a home entity (a relay, a dimmer)
FILE_UPLOAD = "file.upload"  # the panel's shared files: the name and size, never the bytes
FILE_DELETE = "file.delete"
FILE_SHARE = "file.share"  # a download link made, with its expiry
TRADING_HALT = "trading.halt"
TRADING_RESUME = "trading.resume"
TRADING_FLATTEN = "trading.flatten"
TRADING_MODE = "trading.mode"  # an account switched between paper and live
ARCHIVE = "audit.archive"


def cli_actor() -> str:
    """Who is acting from the command line: `cli:<person>` (the sudo caller when there is one)."""
    return f"cli:{os.environ.get('SUDO_USER') or getpass.getuser()}"


@dataclass(frozen=True)
class AuditEvent:
    seq: int
    ts: str
    action: str
    actor: str
    target: str | None
    outcome: str
    details: dict[str, Any]


class AuditLog:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @classmethod
    def open(cls, settings: CoreSettings) -> AuditLog:
        return cls(open_ledger(settings))

    def record(self, action: str, *, actor: str, target: str | None = None, outcome: str = "ok",
               **details: Any) -> Appended:
        """Append one event; it is durable when this returns."""
        data = {"action": action, "actor": actor, "target": target, "outcome": outcome,
                "details": details}
        (appended,) = self.ledger.append(CHAIN, [Entry(data)])
        return appended

    def events(self, *, user: str | None = None, action: str | None = None,
               since: datetime | None = None) -> Iterator[AuditEvent]:
        """Events in order, filtered: `user` matches the actor or the target, `action` is an
        action or a prefix ending in a dot (`login.`)."""
        after = since.strftime(TS_FORMAT) if since else None
        for rec in self.ledger.records(CHAIN):
            data = rec["data"]
            if not isinstance(data, dict):
                continue
            if after and rec["ts"] < after:
                continue
            if action and not (data.get("action") == action or (
                    action.endswith(".") and str(data.get("action", "")).startswith(action))):
                continue
            if user and user not in (data.get("actor"), data.get("target")) \
                    and data.get("actor") != f"user:{user}":
                continue
            yield AuditEvent(rec["seq"], rec["ts"], str(data.get("action")), str(data.get("actor")),
                             data.get("target"), str(data.get("outcome")), data.get("details") or {})

    def verify(self, *, archive_dir: Path | None = None, allow_missing: bool = False
               ) -> tuple[Verdict, list[tuple[Archived, Verdict]]]:
        """The chain in the database, and each archived segment's file (looked for where it
        was written, then in `archive_dir`; missing fails unless `allow_missing`)."""
        return (self.ledger.verify(CHAIN),
                self.ledger.verify_archives(CHAIN, search=archive_dir, allow_missing=allow_missing))

    def archive(self, before: datetime, directory: Path, *, actor: str) -> Archived | None:
        """Retention: move the events older than `before` into a bundle file in `directory`
        (it verifies on its own, docs/ledger.md) and out of the database. The archiving is
        itself an event, written in the same transaction, so the chain says what was moved
        where."""
        through = self.ledger.last_seq_before(CHAIN, before.strftime(TS_FORMAT))
        if not through:
            return None
        return self.ledger.archive(CHAIN, through, directory, note=lambda done: {
            "action": ARCHIVE, "actor": actor, "target": done.file, "outcome": "ok",
            "details": {"first_seq": done.first_seq, "through_seq": done.through_seq,
                        "sha256": done.sha256}})
