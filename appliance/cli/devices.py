"""`circles device …`: devices in the broker (ESP32 nodes, MT5 expert advisors, Home
Assistant, observers)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from appliance.cli import load_settings


def _devices(work: Any) -> Any:
    """Run `work(devices)` with the broker-admin client of this box."""
    from appliance import services
    from appliance.bus.admin import BrokerAdmin
    from appliance.security.audit import AuditLog
    from appliance.security.devices import Devices
    from appliance.security.secrets import SecretStore

    settings = load_settings()

    async def main() -> Any:
        admin = await BrokerAdmin.connect(settings.bus.host, settings.bus.port, settings.state_dir)
        try:
            devices = Devices(admin, SecretStore.open(settings.state_dir), AuditLog.open(settings),
                              reserved=set(services.names()))
            return await work(devices)
        finally:
            await admin.close()

    return asyncio.run(main())


def _cmd_add(args: argparse.Namespace) -> int:
    from appliance.security.audit import cli_actor
    from appliance.security.devices import Endpoint, device_file, lan_address, write_device_file

    # Checked before the device exists, so a bad --out or --ca-file leaves nothing half made.
    endpoint = None
    if args.out:
        device_file(args.kind)
        endpoint = Endpoint(args.host or lan_address(), args.port or (8883 if args.tls else 1883),
                            args.tls, args.ca_file)
    device = _devices(lambda devices: devices.add(args.name, args.kind, actor=cli_actor()))
    print(f"device {device.name} ({device.kind}) added; it may connect now")
    if endpoint and args.out:
        write_device_file(device, endpoint, args.out)
        print(f"wrote {args.out} (it holds the password: copy it to the device, then delete it)")
    else:
        print(f"username: {device.name}\npassword: {device.password}\n"
              "(shown once; also kept as the secret mqtt-" + device.name + ")")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from appliance.security.audit import cli_actor

    device = _devices(lambda devices: devices.remove(args.name, actor=cli_actor()))
    print(f"device {device.name} ({device.kind}) removed and disconnected")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    async def work(devices: Any) -> list[Any]:
        return list(await devices.list())

    for device in _devices(work):
        print(f"{device.kind:<14} {device.name}")
    return 0


def add_commands(sub: Any) -> None:
    from appliance.bus.roles import DEVICE_KINDS  # light: `circles run` builds this parser

    dev = sub.add_parser("device", help="devices in the broker: ESP32 nodes, MT5 EAs, Home Assistant")
    dsub = dev.add_subparsers(dest="device_command", required=True)
    add = dsub.add_parser("add", help="a device with a random password (shown once)")
    add.add_argument("name", help="its name and topic level, e.g. kitchen or ftmo-1")
    add.add_argument("--kind", required=True, choices=DEVICE_KINDS)
    add.add_argument("--out", type=Path, help="esp32: its config.json; mt5: the EA's inputs (.set)")
    add.add_argument("--host", help="the broker address the device uses (default: this box's LAN address)")
    add.add_argument("--port", type=int, help="default 1883, or 8883 with --tls")
    add.add_argument("--tls", action="store_true", help="connect with TLS (needs --ca-file)")
    add.add_argument("--ca-file", type=Path, help="the CA certificate the device trusts")
    add.set_defaults(func=_cmd_add)
    remove = dsub.add_parser("remove", help="delete a device; it is disconnected at once")
    remove.add_argument("name")
    remove.set_defaults(func=_cmd_remove)
    dsub.add_parser("list", help="every device and its kind").set_defaults(func=_cmd_list)
