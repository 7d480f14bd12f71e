"""`circles home …`: the home devices, their history, and commands to them, over the bus
(the same requests and commands the panel and Home Assistant use)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from appliance.cli import ask, on_bus

if TYPE_CHECKING:
    from appliance.bus.base import Bus

SERVICE = "home-sensors"


def _cmd_devices(args: argparse.Namespace) -> int:
    devices = ask(SERVICE, "devices", {})
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    for d in devices:
        state = "online" if d["online"] else "OFFLINE"
        value = "-" if d["value"] is None else f"{d['value']}{' ' + d['unit'] if d['unit'] else ''}"
        print(f"{d['device']:<20} {d['entity']:<14} {d['kind']:<16} {state:<8} {value}")
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    answer = ask(SERVICE, "history", {"device": args.device, "entity": args.entity,
                                      "hours": args.hours, "max_points": args.points})
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(f"{args.device}/{args.entity}: means over {answer['step_s']:g} s")
    for start, mean, low, high, count in answer["points"]:
        when = datetime.fromtimestamp(start, UTC).isoformat(timespec="seconds")
        print(f"{when}  {mean:10.2f}  (min {low:g}, max {high:g}, {count} readings)")
    return 0


def _cmd_set(args: argparse.Namespace) -> int:
    from appliance.bus import registry

    async def work(bus: Bus) -> None:
        await bus.send(registry.HOME_SET, args.value, device=args.device, entity=args.entity,
                       wait=True)

    on_bus(work)
    print(f"sent {args.value!r} to {args.device}/{args.entity}; the device reports its state "
          f"on {registry.HOME_STATE.topic(device=args.device, entity=args.entity)}")
    return 0


def add_commands(sub: Any) -> None:
    home = sub.add_parser("home", help="home devices: list, history, commands")
    hsub = home.add_subparsers(dest="home_command", required=True)
    devices = hsub.add_parser("devices", help="the box's devices and their last values")
    devices.add_argument("--json", action="store_true")
    devices.set_defaults(func=_cmd_devices)
    history = hsub.add_parser("history", help="an entity's readings (any home device's)")
    history.add_argument("device")
    history.add_argument("entity")
    history.add_argument("--hours", type=float, default=24.0)
    history.add_argument("--points", type=int, default=48, help="at most this many means")
    history.add_argument("--json", action="store_true")
    history.set_defaults(func=_cmd_history)
    cmd = hsub.add_parser("set", help="send a command: ON, OFF, TOGGLE, a number")
    cmd.add_argument("device")
    cmd.add_argument("entity")
    cmd.add_argument("value")
    cmd.set_defaults(func=_cmd_set)
