from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import services
from appliance.supervisor import free_port
from tests.helpers import TestBroker


def _require_mosquitto() -> None:
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.exit("mosquitto is not installed: the tests need a real broker "
                    "(apt-get install mosquitto mosquitto-clients)", returncode=3)


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
