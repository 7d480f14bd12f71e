"""`circles db …`: the schema of the box's database (`database.url`, else SQLite under the
state directory), for provisioning and for going back to an older release.

A release's migrations end at its head (`circles db heads`). Going back to an older
release, the newer code takes the schema down to the older release's head first
(`circles db downgrade REVISION`): the older code does not know the newer migrations, so
it cannot undo them.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from appliance.cli import load_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine


def _engine() -> Engine:
    from appliance import db

    return db.make_engine(db.database_url(load_settings()))


def _at(engine: Engine) -> str:
    """Where the database is now, e.g. `0006 (head)`, `0005`, `empty`."""
    from appliance import db

    current = db.current_revision(engine)
    return f"{current} (head)" if current == db.head_revision() else current or "empty"


def _cmd_current(args: argparse.Namespace) -> int:
    from appliance import db

    print(db.current_revision(_engine()) or "empty")
    return 0


def _cmd_heads(args: argparse.Namespace) -> int:
    from appliance import db

    print(db.head_revision())
    return 0


def _cmd_upgrade(args: argparse.Namespace) -> int:
    from appliance import db

    engine = _engine()
    db.migrate(engine)
    print(f"database at {_at(engine)}")
    return 0


def _cmd_downgrade(args: argparse.Namespace) -> int:
    from appliance import db

    engine = _engine()
    db.downgrade(engine, args.revision)
    print(f"database at {_at(engine)}")
    return 0


def add_commands(sub: Any) -> None:
    top = sub.add_parser("db", help="the database's schema (migrations)")
    dsub = top.add_subparsers(dest="db_command", required=True)
    dsub.add_parser("current", help="the revision the database is at (`empty`: none)") \
        .set_defaults(func=_cmd_current)
    dsub.add_parser("heads", help="the newest revision this release's migrations know") \
        .set_defaults(func=_cmd_heads)
    dsub.add_parser("upgrade", help="apply every migration the database lacks") \
        .set_defaults(func=_cmd_upgrade)
    down = dsub.add_parser("downgrade", help="undo migrations down to REVISION "
                                             "(what they added is dropped with its data)")
    down.add_argument("revision", help="e.g. 0005, or `base` for an empty database")
    down.set_defaults(func=_cmd_downgrade)
