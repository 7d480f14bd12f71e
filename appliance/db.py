"""The database: SQLite (WAL) under the state directory by default, PostgreSQL by URL.

Schema changes are Alembic migrations in `appliance/migrations/`, applied explicitly by
`migrate()` (services call it at start; nothing is created silently elsewhere).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event

if TYPE_CHECKING:
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


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` with Alembic."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per step otherwise
        command.upgrade(config, revision)


def open_database(settings: CoreSettings) -> Engine:
    """The box's database (`database.url`, else SQLite under the state directory), migrated."""
    engine = make_engine(settings.database.url or default_url(settings.state_dir))
    migrate(engine)
    return engine
