"""The other ways in: HTTP with a per-account API key, and the command line (test trade,
simulated fills, import, metrics, export). Both go through the running trade logger."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance import db
from appliance.bus.trade_event import chain_for
from appliance.ledger import Ledger, Signer
from appliance.panel import api_keys
from appliance.simulate import simulated_trades
from appliance.supervisor import free_port, port_open
from tests.helpers import ServiceProcess, TestBroker, services_online


@dataclass
class Box:
    broker: TestBroker
    env: dict[str, str]
    url: str
    port: int
    procs: list[ServiceProcess]

    def ledger(self) -> Ledger:
        return Ledger(db.make_engine(self.url), Signer.load_or_create(self.broker.state))

    def circles(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def http(self, method: str, path: str, body: Any = None, key: str | None = None,
             raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         method=method, headers={"Content-Type": "application/json"})
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def box(broker: TestBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    tmp = tmp_path_factory.mktemp("ingest")
    port = free_port(38180)
    url = f"sqlite:///{tmp / 'journal.db'}"
    env = broker.env(CIRCLES_DATABASE__URL=url, CIRCLES_PANEL__PORT=str(port))
    procs = [ServiceProcess(name, env, tmp) for name in ("trade-logger", "panel")]
    try:
        asyncio.run(services_online(broker, ["trade-logger", "panel"]))
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", port):
            assert time.monotonic() < deadline, procs[1].log
            time.sleep(0.1)
        yield Box(broker, env, url, port, procs)
    finally:
        for proc in procs:
            proc.stop()
            print(f"--- {proc.name}\n{proc.log[-5000:]}")


def account() -> str:
    return f"http-{uuid.uuid4().hex[:8]}"


def test_http_ingest_needs_a_key_of_that_account(box: Box) -> None:
    acct = account()
    _, key = api_keys.create(db.make_engine(box.url), acct, "test")
    _, other = api_keys.create(db.make_engine(box.url), "someone-else")
    events = [json.loads(e.model_dump_json()) for e in simulated_trades(5, acct, seed=2)]

    assert box.http("POST", "/api/v1/trade_events", events[0])[0] == 401
    assert box.http("POST", "/api/v1/trade_events", events[0], key="ck_wrong")[0] == 401
    code, answer = box.http("POST", "/api/v1/trade_events", events[0], key=other)
    assert code == 422 and "this API key is for account 'someone-else'" in answer["detail"][0]["reason"]

    code, answer = box.http("POST", "/api/v1/trade_events", events[0], key=key)
    assert code == 200 and answer["status"] == "ok" and answer["seq"] == 1, answer
    code, answers = box.http("POST", "/api/v1/trade_events", events, key=key)
    assert code == 200 and [a["seq"] for a in answers] == [1, 2, 3, 4, 5]
    assert [a["duplicate"] for a in answers] == [True, False, False, False, False]
    records = list(box.ledger().records(chain_for(acct)))
    assert [r["hash"] for r in records] == [a["hash"] for a in answers]

    bad = dict(events[1], qty="0")
    code, answer = box.http("POST", "/api/v1/trade_events", [events[2], bad], key=key)
    assert code == 422 and answer["detail"] == [{"index": 1, "reason": "qty: Input should be greater than 0"}]
    code, answer = box.http("POST", "/api/v1/trade_events", raw=b"{nope", key=key)
    assert code == 400 and "invalid JSON" in answer["detail"]
    assert box.ledger().count(chain_for(acct)) == 5

    code, metrics = box.http("GET", f"/api/v1/metrics?account={acct}", key=key)
    assert code == 200 and metrics["fills"] == 4, metrics
    code, curve = box.http("GET", f"/api/v1/equity?account={acct}&max_points=10", key=key)
    assert code == 200 and curve[0]["equity"] == 10000
    assert box.http("GET", "/api/v1/metrics?account=someone-else", key=key)[0] == 403


def test_cli_key_create_list_revoke(box: Box) -> None:
    acct = account()
    done = box.circles("ledger", "key", "create", "--account", acct, "--label", "ea-host")
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip().splitlines()[-1]
    assert key.startswith("ck_")
    listing = box.circles("ledger", "key", "list").stdout
    assert acct in listing and key not in listing and key[:10] in listing
    event = json.loads(next(simulated_trades(1, acct, seed=4)).model_dump_json())
    assert box.http("POST", "/api/v1/trade_events", event, key=key)[0] == 200
    key_id = next(line.split()[0] for line in listing.splitlines() if acct in line)
    assert box.circles("ledger", "key", "revoke", key_id).returncode == 0
    assert box.http("POST", "/api/v1/trade_events", event, key=key)[0] == 401
    tail = box.circles("audit", "tail", "--action", "apikey.").stdout
    assert "apikey.create      ok       cli:" in tail and f"{acct}  key_id={key_id} label=ea-host" in tail
    assert "apikey.revoke      ok       cli:" in tail and key not in tail


def test_cli_simulate_import_metrics_export(box: Box, tmp_path: Path) -> None:
    acct = account()
    done = box.circles("send-test-trade", "--account", acct)
    assert done.returncode == 0 and "1 stored" in done.stdout and "seq 1 hash" in done.stdout, done
    done = box.circles("simulate", "trades", "--n", "300", "--account", acct, "--seed", "9", "--timeout", "20")
    assert done.returncode == 0 and "300 stored, 0 duplicates" in done.stdout, done
    again = box.circles("simulate", "trades", "--n", "300", "--account", acct, "--seed", "9")
    assert "0 stored, 300 duplicates" in again.stdout

    lines = [e.model_dump_json() for e in simulated_trades(20, acct, seed=10)]
    good = tmp_path / "events.jsonl"
    good.write_text("\n".join(lines) + "\n")
    done = box.circles("ledger", "import", str(good))
    assert done.returncode == 0 and "20 stored" in done.stdout, done
    broken = tmp_path / "broken.jsonl"
    broken.write_text(lines[0] + "\n" + lines[1].replace('"sim"', '"nope"') + "\n")
    done = box.circles("ledger", "import", str(broken))
    assert done.returncode == 1 and "line 2: source" in done.stderr, done

    metrics = json.loads(box.circles("ledger", "metrics", "--account", acct).stdout)
    assert metrics["fills"] == 1 + 299 + 19 and metrics["deposits"] == 20000
    bundle = tmp_path / "bundle.jsonl"
    done = box.circles("ledger", "export", "--account", acct, "--out", str(bundle))
    assert done.returncode == 0 and "wrote 321 records" in done.stdout, done
    done = box.circles("ledger", "verify-bundle", str(bundle))
    assert done.returncode == 0 and done.stdout.startswith("ok: 321 records"), done


def test_no_secret_reaches_a_log_line(box: Box) -> None:
    """Runs last: every key this module made, the services' broker passwords and a key that
    was refused must appear in no service log and in no line of the broker's log."""
    acct = account()
    done = box.circles("ledger", "key", "create", "--account", acct)
    key = done.stdout.strip().splitlines()[-1]
    wrong = "ck_" + uuid.uuid4().hex * 2
    assert box.http("GET", f"/api/v1/metrics?account={acct}", key=wrong)[0] == 401
    event = json.loads(next(simulated_trades(1, acct, seed=5)).model_dump_json())
    assert box.http("POST", "/api/v1/trade_events", event, key=key)[0] == 200
    secrets = [key, wrong] + [box.broker.password(n) for n in ("trade-logger", "panel", "cli")]
    logs = {p.name: p.log for p in box.procs}
    logs["mosquitto"] = (box.broker.state / "logs" / "mosquitto.log").read_text(errors="replace")
    assert all(logs.values())
    for name, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"a secret is in the log of {name}"
