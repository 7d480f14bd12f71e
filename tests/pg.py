"""A private PostgreSQL cluster for the tests, and a fresh database per test.

The cluster is made with Debian's server binaries (`/usr/lib/postgresql/<version>/bin`,
package `postgresql`) in a temporary directory: its own port on 127.0.0.1, its unix socket
inside that directory, password (SCRAM) logins over TCP. initdb and the server refuse to run
as root, so as root they run as the `postgres` user.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import URL, create_engine, make_url, text
from sqlalchemy.pool import NullPool

from appliance.supervisor import free_port

URL_ENV = "CIRCLES_TEST_POSTGRES_URL"
DEBIAN_ROOT = Path("/usr/lib/postgresql")
USER = "circles"
DATABASE = "circles_test"


class PostgresUnavailable(Exception):
    """No PostgreSQL server can be started here; the message says why."""


def server_binaries(root: Path | None = None) -> Path:
    """The `bin` directory of the newest installed server version."""

    def version(path: Path) -> tuple[int, ...]:
        name = path.parent.name
        return tuple(int(part) for part in name.split(".")) if name.replace(".", "").isdigit() else ()

    root = root or DEBIAN_ROOT
    found = [p for p in root.glob("*/bin") if (p / "initdb").is_file() and (p / "pg_ctl").is_file()]
    if not found:
        raise PostgresUnavailable(
            f"no initdb/pg_ctl under {root}/<version>/bin; install Debian's `postgresql` package "
            "(scripts/setup.sh dev does), or point CIRCLES_TEST_POSTGRES_URL at a server")
    return max(found, key=version)


def normalize(url: str) -> str:
    """The URL with the psycopg 3 driver (the `postgres` extra) when it names none."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


@dataclass
class Cluster:
    """A running private cluster; `url` reaches its test database as a non-superuser."""

    root: Path
    bin: Path
    port: int
    password: str
    as_postgres: bool

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def url(self) -> str:
        return URL.create("postgresql+psycopg", username=USER, password=self.password,
                          host="127.0.0.1", port=self.port,
                          database=DATABASE).render_as_string(hide_password=False)

    @classmethod
    def start(cls, port_from: int = 25432) -> Cluster:
        """initdb, start and provision a cluster; raises PostgresUnavailable with the reason."""
        binaries = server_binaries()
        as_postgres = os.geteuid() == 0
        # Under /tmp rather than pytest's per-user directory, which the `postgres` user cannot
        # enter; short, too, because a unix socket path is limited to about 100 bytes.
        root = Path(tempfile.mkdtemp(prefix="circles-pg-"))
        cluster = cls(root, binaries, free_port(port_from), secrets.token_hex(12), as_postgres)
        try:
            cluster._init()
            cluster._run("pg_ctl", "-D", str(cluster.data), "-l", str(root / "server.log"),
                         "-w", "-t", "60", "start")
            cluster._provision()
        except BaseException:
            with suppress(Exception):
                cluster.stop()
            raise
        return cluster

    def _init(self) -> None:
        self.socket_dir.mkdir()
        if self.as_postgres:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root, but there is no `postgres` user to run "
                                          "initdb and the server as") from None
            for path in (self.root, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--no-locale",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        # A throwaway cluster: durability is not what is tested, speed is welcome.
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.socket_dir}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")

    def _provision(self) -> None:
        """A login role that may create databases, owning the test database (as an
        application's role would own its database on a real server)."""
        import psycopg  # the `postgres` extra: imported here so that SQLite-only runs need not have it
        from psycopg import sql

        with psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                sql.Identifier(USER), sql.Literal(self.password)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(DATABASE), sql.Identifier(USER)))

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PostgresUnavailable(f"{' '.join(command)} failed ({done.returncode}):\n"
                                      f"{done.stdout}{done.stderr}{tail}")


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """A new, empty database on the server `url` points at (its role needs CREATEDB);
    yields its URL and drops it afterwards, closing any connection left open."""
    base = make_url(normalize(url))
    name = f"circles_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
