"""A box for the panel's tests: the trade logger, the risk service, paper execution, the
home sensors (simulated) and the panel as their own processes on the session broker, with
a database of their own, the root certificate of a CA of its own, and three people (an
admin and an operator with TOTP, a viewer without), and an HTTP client that logs in as a
browser does."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyotp
from argon2 import PasswordHasher

from appliance import db
from appliance.ledger import Ledger, Signer
from appliance.security.audit import AuditLog
from appliance.security.crypto import Keyring
from appliance.security.permissions import Role
from appliance.security.users import Users
from appliance.supervisor import free_port, port_open
from tests.helpers import ServiceProcess, TestBroker, services_online
from tests.test_firmware import write_tls_files

PASSWORD = "correct horse battery staple"
SERVICES = ("trade-logger", "risk", "execution", "home-sensors", "panel")
ACCOUNT = "panel-box"  # the paper execution's account
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Person:
    name: str
    role: Role
    totp: pyotp.TOTP | None = None
    last_step: int = 0


@dataclass
class PanelBox:
    broker: TestBroker
    url: str
    port: int
    users: Users
    procs: list[ServiceProcess]
    ca_cert: Path
    storage: Path  # where the panel keeps its files (the [storage] section's local path)
    people: dict[Role, Person] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=30)

    def add_person(self, name: str, role: Role, *, totp: bool) -> Person:
        self.users.add(name, PASSWORD, role, actor="cli:test")
        person = Person(name, role)
        if totp:
            uri = self.users.totp.begin_enrolment(name).uri
            person.totp = pyotp.parse_uri(uri)  # type: ignore[assignment]
            self.users.totp.confirm_enrolment(name, self.code(person), actor="cli:test")
        return person

    def code(self, person: Person) -> str:
        """A TOTP code not used yet: a step is good once, so take the next step the box
        accepts (one ahead), or wait for a new one."""
        assert person.totp is not None
        while True:
            step = int(time.time()) // 30
            ahead = max(step, person.last_step + 1)
            if ahead <= step + 1:
                person.last_step = ahead
                return person.totp.at(ahead * 30)
            time.sleep(30 - time.time() % 30 + 0.05)

    def login(self, person: Person, *, source: str | None = None) -> tuple[httpx.Client, str]:
        """A logged-in client and its CSRF token (password, then the TOTP step if enrolled)."""
        client = self.client()
        csrf = _CSRF.search(client.get("/login").text).group(1)  # type: ignore[union-attr]
        answer = client.post("/login", data={"username": person.name, "password": PASSWORD,
                                             "csrf": csrf})
        assert answer.status_code == 303, answer.text
        if answer.headers["location"].startswith("/login/totp"):
            answer = client.post("/login/totp", data={"code": self.code(person), "csrf": csrf})
            assert answer.status_code == 303, answer.text
        page = client.get("/account")
        assert page.status_code == 200, page.text
        return client, _CSRF.search(page.text).group(1)  # type: ignore[union-attr]

    def audit(self) -> list[Any]:
        return list(self.users.audit.events())


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, html[:500]
    return found.group(1)


def start_box(broker: TestBroker, tmp: Path, services: tuple[str, ...] = SERVICES,
              **env: str) -> Iterator[PanelBox]:
    """Start the services (the panel last); yield the box; stop them and print their logs."""
    port = free_port(38280)
    ca_cert = write_tls_files(tmp / "tls")[0]
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    url = f"sqlite:///{tmp / 'panel.db'}"
    engine = db.make_engine(url)
    db.migrate(engine)
    users = Users(engine, AuditLog(Ledger(engine, Signer.load_or_create(broker.state))),
                  keyring=Keyring.load_or_create(broker.state),
                  hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    # The risk service watches only an account of its own, and nothing of the box, so what
    # other tests left retained on the shared broker (positions, feeds, health) cannot
    # breach a limit and refuse a resume here.
    environment = broker.env(CIRCLES_DATABASE__URL=url, CIRCLES_PANEL__PORT=str(port),
                             CIRCLES_RISK__REQUIRE_CLOCK_SYNC="false",
                             CIRCLES_RISK__HALT_ON_STALE_MARKET="false",
                             CIRCLES_RISK__MAX_DISK_PERCENT="off",
                             CIRCLES_RISK__ACCOUNTS="panel-box-only",
                             CIRCLES_EXECUTION__ACCOUNT=ACCOUNT,
                             CIRCLES_PANEL__TRUSTED_PROXIES='["127.0.0.1"]',
                             CIRCLES_PANEL__CA_CERT=str(ca_cert),
                             # each service's JSON lines where the Logs page reads them
                             CIRCLES_PANEL__LOGS="files", CIRCLES_PANEL__LOGS_DIR=str(logs),
                             # the files of this box apart from any other's on the broker
                             **{"CIRCLES_STORAGE__PATH": str(tmp / "storage"), **env})
    procs = [ServiceProcess(name, environment, tmp, log_path=logs / f"{name}.jsonl")
             for name in services]
    box = PanelBox(broker, url, port, users, procs, ca_cert, tmp / "storage")
    try:
        asyncio.run(services_online(broker, services))
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", port):
            assert time.monotonic() < deadline, procs[-1].log
            time.sleep(0.1)
        box.people = {Role.ADMIN: box.add_person("ada", Role.ADMIN, totp=True),
                      Role.OPERATOR: box.add_person("otto", Role.OPERATOR, totp=True),
                      Role.VIEWER: box.add_person("vera", Role.VIEWER, totp=False)}
        yield box
    finally:
        for proc in procs:
            proc.stop()
            print(f"--- {proc.name}\n{proc.log[-5000:]}")
        engine.dispose()
