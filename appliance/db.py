"""The database: SQLite (WAL) under the state directory by default, PostgreSQL by URL.

Schema changes are Alembic migrations in `appliance/migrations/`, applied explicitly by
`migrate()` (services call it at start; nothing is created silently elsewhere), and by
`circles db upgrade | downgrade REVISION`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event

from appliance.errors import OperationalError

if TYPE_CHECKING:
    from alembic.config import Config

    from appliance.config import CoreSettings

MIGRATIONS = Path(__file__).with_name("migrations")


def default_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'circles.db'}"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine; for SQLite: WAL, a busy timeout, and every transaction `BEGIN IMMEDIATE`,
    so that a transaction that reads then writes (a ledger append) holds the write lock
    from its first statement and concurrent appenders queue instead of failing."""
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60}, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when it returns, so what was acknowledged after
            # a commit survives a power cut, not only a killed process.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _alembic(connection: Connection | None = None) -> Config:
    """Alembic's configuration for this code's migrations, working on `connection`."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per step otherwise
    return config


def _run(engine: Engine, step: Callable[[Config, str], None], revision: str) -> None:
    from alembic.util import CommandError

    with engine.begin() as connection:
        try:
            step(_alembic(connection), revision)
        except CommandError as exc:
            # Most often a database a newer release migrated: that release's
            # `circles db downgrade` takes it back to what this one knows.
            raise OperationalError(f"database: {exc} (this release's migrations end at "
                                   f"{head_revision()})") from None


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to `revision` with Alembic."""
    from alembic import command

    _run(engine, command.upgrade, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Take the schema down to `revision` (`base`: empty), undoing the newer migrations;
    what they added is dropped with its data."""
    from alembic import command

    _run(engine, command.downgrade, revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for a database no migration has touched."""
    from alembic.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest revision of this code's migrations."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic()).get_current_head()
    assert head is not None, "no migrations"
    return head


def database_url(settings: CoreSettings) -> str:
    """The box's database: `database.url`, else SQLite under the state directory."""
    return settings.database.url or default_url(settings.state_dir)


def open_database(settings: CoreSettings) -> Engine:
    """The box's database (`database.url`, else SQLite under the state directory), migrated."""
    engine = make_engine(database_url(settings))
    migrate(engine)
    return engine
