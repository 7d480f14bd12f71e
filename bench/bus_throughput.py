"""QoS 1 publisher→subscriber throughput: raw paho against the appliance bus, same run.

Separate processes, 200-byte payloads, the project's broker config. Prints
`raw_msgs_per_s`, `bus_msgs_per_s`, and last `bus/raw` (target ≥ 0.7).
Usage: python bench/bus_throughput.py [--messages 50000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# A command topic: any service may publish it and the named service may subscribe to it.
TOPIC = "circles/bench-sub/cmd/data"
PAYLOAD = b"x" * 200
WINDOW = 1000  # in-flight QoS 1 messages, the same for both sides


def raw_sub(port: int, password: str, n: int) -> None:
    from _harness import paho_count

    print(*paho_count(port, "bench-sub", password, TOPIC, n))


def raw_pub(port: int, password: str, n: int) -> None:
    from _harness import paho_publish

    print(paho_publish(port, "bench-pub", password, TOPIC, (PAYLOAD for _ in range(n)), WINDOW))


def bus_sub(port: int, password: str, n: int) -> None:
    from appliance.bus import BrokerAddress, Filter, MqttBus

    async def main() -> None:
        bus = MqttBus("bench-sub", BrokerAddress("127.0.0.1", port, "bench-sub", password),
                      status=False, persistent=False)
        await bus.connect()
        await bus.subscribe([(Filter(TOPIC), 1)])
        print("READY", flush=True)
        count, last = 0, 0.0
        while count < n:
            for message in await bus.receive(500):
                bus.ack(message)
                count += 1
        last = time.time()
        await bus.close()
        print(count, last)

    asyncio.run(main())


def bus_pub(port: int, password: str, n: int) -> None:
    from appliance.bus import BrokerAddress, MqttBus

    async def main() -> None:
        bus = MqttBus("bench-pub", BrokerAddress("127.0.0.1", port, "bench-pub", password,
                                                 receive_maximum=WINDOW),
                      status=False, persistent=False)
        await bus.connect()
        started = time.time()
        for _ in range(n - 1):
            await bus.publish(TOPIC, PAYLOAD, qos=1)
        await bus.publish(TOPIC, PAYLOAD, qos=1, wait=True)
        print(started)
        await bus.close()

    asyncio.run(main())


ROLES = {"raw_sub": raw_sub, "raw_pub": raw_pub, "bus_sub": bus_sub, "bus_pub": bus_pub}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--role", choices=sorted(ROLES))
    parser.add_argument("--port", type=int)
    parser.add_argument("--password")
    args = parser.parse_args()
    if args.role:
        ROLES[args.role](args.port, args.password, args.messages)
        return

    from _harness import password, private_broker, run_pair

    me = str(Path(__file__).resolve())
    with private_broker(["bench-pub", "bench-sub"]) as (port, state):
        def cmd(role: str, client: str) -> list[str]:
            return [me, "--role", role, "--port", str(port), f"--password={password(state, client)}",
                    "--messages", str(args.messages)]

        raw, bus = [], []
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits both
            raw.append(run_pair(cmd("raw_sub", "bench-sub"), cmd("raw_pub", "bench-pub")))
            bus.append(run_pair(cmd("bus_sub", "bench-sub"), cmd("bus_pub", "bench-pub")))
    raw_rate, bus_rate = statistics.median(raw), statistics.median(bus)
    print(f"messages = {args.messages}")
    print(f"raw_msgs_per_s = {raw_rate:.0f}")
    print(f"bus_msgs_per_s = {bus_rate:.0f}")
    print(f"bus/raw = {bus_rate / raw_rate:.2f}")


if __name__ == "__main__":
    main()
