"""The `circles` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import CirclesError, ConfigError

if TYPE_CHECKING:
    from appliance.ledger import Ledger


def _cmd_run(args: argparse.Namespace) -> int:
    from appliance import runtime, services

    return runtime.run(services.load(args.name))


def _cmd_up(args: argparse.Namespace) -> int:
    from appliance.supervisor import up

    only = [n.strip() for n in args.only.split(",")] if args.only else None
    return asyncio.run(up(Path(args.state), only=only, config=args.config))


def _cmd_broker_init(args: argparse.Namespace) -> int:
    from appliance.bus import broker

    lan = []
    if args.lan_port:
        lan.append(broker.Listener(args.lan_port))
    if args.tls_port:
        if not (args.certfile and args.keyfile):
            raise ConfigError("broker: --tls-port needs --certfile and --keyfile")
        lan.append(broker.Listener(args.tls_port, None, args.cafile, args.certfile, args.keyfile))
    changed = broker.init(Path(args.state), port=args.port, bind=args.bind, lan=lan,
                          user=args.user)
    for path in changed:
        print(f"wrote {path}")
    if not changed:
        print("broker files unchanged")
    return 0


def _cmd_broker_sync(args: argparse.Namespace) -> int:
    from appliance import services
    from appliance.bus.admin import BrokerAdmin

    async def sync() -> list[str]:
        admin = await BrokerAdmin.connect(args.host, args.port, Path(args.state))
        try:
            return await admin.sync(services.names(), Path(args.state))
        finally:
            await admin.close()

    created = asyncio.run(sync())
    print(f"roles synced; clients created: {', '.join(created) or 'none'}")
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    from appliance import config, services

    if args.file:
        os.environ["CIRCLES_CONFIG"] = str(args.file)
    sections = {name: services.load(name).Settings for name in services.names()}
    try:
        config.load(config.settings_class(sections, forbid_unknown=True))
    except ConfigError as exc:
        # load() joins the errors on one line; a person reading `check` wants one per line.
        for line in str(exc).removeprefix("config: ").split("; "):
            print(f"error: {line}")
        return ConfigError.exit_code
    print(f"{config.config_path()}: ok")
    return 0


def _open_ledger() -> Ledger:
    from appliance import config
    from appliance.ledger import open_ledger

    return open_ledger(config.load(config.CoreSettings))


def _cmd_ledger_verify(args: argparse.Namespace) -> int:
    ledger = _open_ledger()
    chains = [args.chain] if args.chain else ledger.chains()
    failed = 0
    for chain in chains:
        verdict = ledger.verify(chain)
        if verdict.ok:
            print(f"{chain}: ok, {verdict.records} records, signed through {verdict.signed_through}")
        else:
            failed += 1
            print(f"{chain}: FAILED at seq {verdict.first_bad_seq}: {verdict.reason}")
    return 1 if failed else 0


def _cmd_ledger_export(args: argparse.Namespace) -> int:
    ledger = _open_ledger()
    with open(args.out, "w", encoding="utf-8") as out:
        count = ledger.export(args.chain, out)
    print(f"wrote {count} records of {args.chain} to {args.out}")
    return 0


def _cmd_ledger_verify_bundle(args: argparse.Namespace) -> int:
    from appliance import ledger_verify

    return ledger_verify.main([args.bundle] + (["--public-key", args.public_key]
                                               if args.public_key else []))


def _cmd_services(args: argparse.Namespace) -> int:
    from appliance import services

    for name in services.names():
        print(name)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="circles", description="The Circles home-server appliance.")
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one service in the foreground (as systemd does)")
    run.add_argument("name")
    run.set_defaults(func=_cmd_run)

    up = sub.add_parser("up", help="a private broker and every service, with simulated sources")
    up.add_argument("--state", default=".circles", help="state folder (default ./.circles)")
    up.add_argument("--only", help="comma-separated services to run (default: all)")
    up.add_argument("--config", type=Path, help="a circles.toml for the services")
    up.set_defaults(func=_cmd_up)

    brk = sub.add_parser("broker", help="Mosquitto configuration and dynamic security")
    bsub = brk.add_subparsers(dest="broker_command", required=True)
    init = bsub.add_parser("init", help="write mosquitto.conf and the dynamic-security file")
    init.add_argument("--state", required=True, help="the state directory")
    init.add_argument("--port", type=int, default=1883, help="loopback listener port")
    init.add_argument("--bind", default="127.0.0.1")
    init.add_argument("--lan-port", type=int, help="a LAN listener with passwords (e.g. 1883)")
    init.add_argument("--tls-port", type=int, help="a LAN listener with TLS (e.g. 8883)")
    init.add_argument("--cafile", type=Path)
    init.add_argument("--certfile", type=Path)
    init.add_argument("--keyfile", type=Path)
    init.add_argument("--user", help="the user Mosquitto drops to when started as root")
    init.set_defaults(func=_cmd_broker_init)
    sync = bsub.add_parser("sync", help="bring roles and service clients up to date")
    sync.add_argument("--state", required=True)
    sync.add_argument("--host", default="127.0.0.1")
    sync.add_argument("--port", type=int, default=1883)
    sync.set_defaults(func=_cmd_broker_sync)

    cfg = sub.add_parser("config", help="configuration")
    csub = cfg.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a circles.toml and print every error")
    check.add_argument("file", nargs="?", type=Path)
    check.set_defaults(func=_cmd_config_check)

    led = sub.add_parser("ledger", help="the hash-chained ledger")
    lsub = led.add_subparsers(dest="ledger_command", required=True)
    verify = lsub.add_parser("verify", help="check every chain (or one) in the database")
    verify.add_argument("--chain")
    verify.set_defaults(func=_cmd_ledger_verify)
    export = lsub.add_parser("export", help="write a chain's bundle for a third party")
    export.add_argument("--chain", required=True)
    export.add_argument("--out", required=True)
    export.set_defaults(func=_cmd_ledger_export)
    vbundle = lsub.add_parser("verify-bundle", help="check an exported bundle")
    vbundle.add_argument("bundle")
    vbundle.add_argument("--public-key", help="the owner's public key file (base64)")
    vbundle.set_defaults(func=_cmd_ledger_verify_bundle)

    svc = sub.add_parser("services", help="list the registered services")
    svc.set_defaults(func=_cmd_services)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return ConfigError.exit_code
    except CirclesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
