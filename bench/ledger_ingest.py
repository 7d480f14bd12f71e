"""TRADE_EVENT ingest: QoS 1 publish → committed in the ledger, against raw paho, same run.

Baseline: plain paho publisher → plain paho subscriber, QoS 1, the same serialised events.
Ingest: the same publisher → `circles run trade-logger` (validation, canonical JSON, sha256,
group commit into SQLite) → counted when its ack topic confirms the commit.
Prints `raw_events_per_s`, `ingest_events_per_s`, and last `ingest/raw` (target ≥ 0.7).
Usage: python bench/ledger_ingest.py [--events 50000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RAW_TOPIC = "circles/bench-sub/cmd/data"
WINDOW = 1000


def _events(n: int, account: str) -> list[bytes]:
    from appliance.simulate import simulated_trades

    return [e.model_dump_json().encode() for e in simulated_trades(n, account)]


def _accepted(payload: bytes) -> int:
    return len(json.loads(payload)["accepted"])


def role_pub(port: int, password: str, n: int, topic: str, account: str) -> None:
    from _harness import paho_publish

    events = _events(n, account)  # made before the clock starts
    print(paho_publish(port, "bench-pub", password, topic, events, WINDOW))


def role_sub(port: int, password: str, n: int, topic: str, acks: bool) -> None:
    from _harness import paho_count

    print(*paho_count(port, "bench-sub", password, topic, n, _accepted if acks else lambda p: 1))


def _start_logger(port: int, state: Path) -> subprocess.Popen[bytes]:
    from appliance.bus import registry

    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCLES_")}
    (state / "empty.toml").touch()
    env.update(CIRCLES_STATE_DIR=str(state), CIRCLES_BUS__PORT=str(port),
               CIRCLES_CONFIG=str(state / "empty.toml"), CIRCLES_ENVIRONMENT="development",
               CIRCLES_LOG__LEVEL="WARN")
    logger = subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "trade-logger"], env=env)
    status = str(registry.SERVICE_STATUS.topic(service="trade-logger"))
    sub = subprocess.run(["mosquitto_sub", "-p", str(port), "-u", "bench-sub", "-P",
                          _password(state, "bench-sub"), "-t", status, "-C", "1", "-W", "30"],
                         capture_output=True, text=True)
    if sub.stdout.strip() != "online":
        logger.kill()
        raise SystemExit(f"trade-logger did not come online: {sub.stdout!r} {sub.stderr!r}")
    return logger


def _password(state: Path, client: str) -> str:
    from _harness import password

    return password(state, client)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--role", choices=["pub", "sub"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--password")
    parser.add_argument("--topic")
    parser.add_argument("--account", default="bench")
    parser.add_argument("--acks", action="store_true")
    args = parser.parse_args()
    if args.role == "pub":
        role_pub(args.port, args.password, args.events, args.topic, args.account)
        return
    if args.role == "sub":
        role_sub(args.port, args.password, args.events, args.topic, args.acks)
        return

    from _harness import private_broker, run_pair

    from appliance.bus import registry

    me = str(Path(__file__).resolve())
    with private_broker(["bench-pub", "bench-sub", "trade-logger"]) as (port, state):
        def cmd(role: str, client: str, topic: str, *extra: str) -> list[str]:
            return [me, "--role", role, "--port", str(port),
                    f"--password={_password(state, client)}", "--events", str(args.events),
                    f"--topic={topic}", *extra]

        logger = _start_logger(port, state)
        raw, ingest = [], []
        try:
            for round_ in range(args.rounds):  # interleaved, so drift in machine load hits both
                raw.append(run_pair(cmd("sub", "bench-sub", RAW_TOPIC),
                                    cmd("pub", "bench-pub", RAW_TOPIC)))
                account = f"bench-{round_}"
                ingest.append(run_pair(
                    cmd("sub", "bench-sub", str(registry.TRADE_ACK.topic(account=account)), "--acks"),
                    cmd("pub", "bench-pub", str(registry.TRADE_EVENT.topic(account=account)),
                        f"--account={account}")))
        finally:
            logger.terminate()
            logger.wait(10)
    raw_rate, ingest_rate = statistics.median(raw), statistics.median(ingest)
    print(f"events = {args.events}")
    print(f"raw_events_per_s = {raw_rate:.0f}")
    print(f"ingest_events_per_s = {ingest_rate:.0f}")
    print(f"ingest/raw = {ingest_rate / raw_rate:.2f}")


if __name__ == "__main__":
    main()
