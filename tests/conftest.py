from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import services
from appliance.errors import ConfigError
from appliance.supervisor import free_port, mosquitto_binary
from tests import pg, s3server
from tests.helpers import TestBroker


def _require_mosquitto() -> None:
    try:
        mosquitto_binary()
    except ConfigError as exc:
        pytest.exit(f"the tests need a real broker: {exc}", returncode=3)


def _start(state: Path, port_from: int) -> TestBroker:
    _require_mosquitto()
    broker = TestBroker(state, free_port(port_from))
    broker.start()
    asyncio.run(broker.provision(services.names()))
    return broker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestBroker]:
    """One real Mosquitto for the session, started through `circles broker init`."""
    started = _start(tmp_path_factory.mktemp("broker"), 31883)
    yield started
    started.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[TestBroker]:
    """A private broker for a test that stops or restarts it."""
    started = _start(tmp_path / "state", 32883)
    yield started
    started.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for the session: the one CIRCLES_TEST_POSTGRES_URL names (its role
    needs CREATEDB), else a private cluster started with Debian's binaries."""
    if importlib.util.find_spec("psycopg") is None:
        pytest.fail("the PostgreSQL tests need psycopg: pip install -e '.[dev]'", pytrace=False)
    if url := os.environ.get(pg.URL_ENV):
        yield pg.normalize(url)
        return
    try:
        cluster = pg.Cluster.start()
    except pg.PostgresUnavailable as exc:
        reason = str(exc)
    else:
        yield cluster.url
        cluster.stop()
        return
    pytest.fail(f"the PostgreSQL tests need a server: {reason}", pytrace=False)


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[str]:
    """The URL of a new, empty database for one test; dropped afterwards."""
    with pg.fresh_database(postgres_url) as url:
        yield url


@pytest.fixture(scope="session")
def s3_server() -> Iterator[s3server.S3Server]:
    """An S3 server for the session: moto's on 127.0.0.1, or the real one CIRCLES_TEST_S3_ENDPOINT
    names. `s3_server.settings(state_dir, s3server.fresh_bucket())` gives a test its own bucket."""
    server = s3server.start()
    yield server
    server.stop()


@pytest.fixture(params=services.names())
def service_name(request: pytest.FixtureRequest) -> str:
    """Every registered service, for the checks every service must pass."""
    return str(request.param)
