"""Per-account API keys for the HTTP ingest (`circles ledger key create --account X`).

A key is shown once, when it is made; the database keeps only its SHA-256 (a key is 256
random bits, so a slow password hash adds nothing) and its first characters, to tell keys
apart in a list.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, select, update

from appliance.bus.topics import slug
from appliance.ledger import now_iso
from appliance.security import audit as events

if TYPE_CHECKING:
    from appliance.security.audit import AuditLog

metadata = MetaData()
api_keys = Table("api_keys", metadata, Column("id", Integer, primary_key=True),
                 Column("account", String(200)), Column("label", String(200)),
                 Column("prefix", String(16)), Column("hash", String(64)),
                 Column("created_at", String(40)), Column("revoked_at", String(40)))
PREFIX = "ck_"


@dataclass(frozen=True)
class ApiKey:
    id: int
    account: str
    label: str
    prefix: str
    created_at: str
    revoked_at: str | None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(engine: Engine, account: str, label: str = "") -> tuple[ApiKey, str]:
    """A new key for `account`; the clear key is returned here and nowhere else."""
    key = PREFIX + secrets.token_urlsafe(32)
    made = ApiKey(id=0, account=slug(account), label=label, prefix=key[:10],
                  created_at=now_iso(), revoked_at=None)
    with engine.begin() as conn:
        inserted = conn.execute(api_keys.insert().values(
            account=made.account, label=made.label, prefix=made.prefix, hash=_digest(key),
            created_at=made.created_at)).inserted_primary_key
    assert inserted is not None
    return replace(made, id=int(inserted[0])), key


def account_for(engine: Engine, key: str) -> str | None:
    """The account a valid, unrevoked key belongs to."""
    if not key.startswith(PREFIX):
        return None
    with engine.connect() as conn:
        row = conn.execute(select(api_keys.c.account).where(
            api_keys.c.hash == _digest(key), api_keys.c.revoked_at.is_(None))).first()
    return str(row.account) if row else None


def listing(engine: Engine) -> list[ApiKey]:
    with engine.connect() as conn:
        rows = conn.execute(select(api_keys).order_by(api_keys.c.id))
        return [ApiKey(id=r.id, account=r.account, label=r.label, prefix=r.prefix,
                       created_at=r.created_at, revoked_at=r.revoked_at) for r in rows]


def revoke(engine: Engine, key_id: int) -> bool:
    with engine.begin() as conn:
        done = conn.execute(update(api_keys).where(api_keys.c.id == key_id,
                                                   api_keys.c.revoked_at.is_(None))
                            .values(revoked_at=now_iso()))
    return bool(done.rowcount)


def issue(audit: AuditLog, account: str, label: str, *, actor: str) -> tuple[ApiKey, str]:
    """`create`, audit-logged as done by `actor`."""
    made, key = create(audit.ledger.engine, account, label)
    audit.record(events.API_KEY_CREATE, actor=actor, target=made.account, key_id=made.id,
                 label=made.label)
    return made, key


def withdraw(audit: AuditLog, key_id: int, *, actor: str) -> bool:
    """`revoke`, audit-logged as done by `actor` when there was such a key."""
    if not revoke(audit.ledger.engine, key_id):
        return False
    audit.record(events.API_KEY_REVOKE, actor=actor, target=str(key_id), key_id=key_id)
    return True
