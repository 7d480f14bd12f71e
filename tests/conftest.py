from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import services
from appliance.errors import ConfigError
from appliance.supervisor import free_port, mosquitto_binary
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


@pytest.fixture(params=services.names())
def service_name(request: pytest.FixtureRequest) -> str:
    """Every registered service, for the checks every service must pass."""
    return str(request.param)
