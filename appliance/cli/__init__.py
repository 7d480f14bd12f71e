"""The `circles` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from appliance.errors import CirclesError, ConfigError, OperationalError, TemporaryError

if TYPE_CHECKING:
    from appliance.bus.base import Bus
    from appliance.bus.trade_event import TradeEvent
    from appliance.config import CoreSettings
    from appliance.ledger import Ledger

T = TypeVar("T")
SERVICE_USER = "circles"  # the system user the services run as on a box


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

    settings = load_settings()
    state = Path(args.state) if args.state else settings.state_dir

    async def sync() -> list[str]:
        admin = await BrokerAdmin.connect(args.host or settings.bus.host,
                                          args.port or settings.bus.port, state)
        try:
            return await admin.sync(services.names(), state)
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


CREDSTORE = Path("/etc/credstore")


def act_as(name: str, credstore: Path = CREDSTORE) -> bool:
    """Run as the system user `name` from now on, for good, when running as root and that
    user exists: its groups, gid and uid, its HOME, and umask 077, so the files made in the
    state directory belong to it and stay private to it (root-owned files there would be
    unreadable to the services). LOGNAME keeps naming the person, whom the audit log records.
    A keyring kept in `credstore` (root's, which the units load as a systemd credential) is
    handed over the same way, so the command uses the services' keys. Returns whether it
    switched: False when not root, or when there is no such user (a developer's machine)."""
    import pwd

    if os.geteuid() != 0:
        return False
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        return False
    os.environ.setdefault("LOGNAME", pwd.getpwuid(os.getuid()).pw_name)
    _hand_credentials(credstore, user.pw_uid, user.pw_gid)
    try:
        os.initgroups(name, user.pw_gid)  # groups first: only root may set them
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    except OSError as exc:
        raise OperationalError(f"cannot act as the user {name}: {exc.strerror}") from None
    if {os.getuid(), os.geteuid()} != {user.pw_uid} or {os.getgid(), os.getegid()} != {
            user.pw_gid}:
        raise OperationalError(f"cannot act as the user {name}: the switch did not take")
    try:
        os.setuid(0)
    except PermissionError:
        pass  # as it must: root is gone for good
    else:
        raise OperationalError(f"acting as the user {name}, yet root could be taken back")
    os.environ["HOME"] = user.pw_dir
    os.umask(0o077)
    return True


def _hand_credentials(credstore: Path, uid: int, gid: int) -> None:
    """As systemd does for a unit's `LoadCredential=`: the keyring from `credstore`, copied
    while still root into a private folder of the user's (0700), named by
    $CREDENTIALS_DIRECTORY and removed when the command ends."""
    import atexit
    import shutil
    import tempfile

    from appliance.security.crypto import KEYRING_CREDENTIAL

    source = credstore / KEYRING_CREDENTIAL
    if "CREDENTIALS_DIRECTORY" in os.environ or not source.is_file():
        return
    # In memory where there is a tmpfs everyone may use (the user removes it at the end).
    folder = Path(tempfile.mkdtemp(prefix="circles-credentials-",
                                   dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    copy = folder / KEYRING_CREDENTIAL
    copy.write_bytes(source.read_bytes())
    copy.chmod(0o400)
    for path in (copy, folder):
        os.chown(path, uid, gid)
    os.environ["CREDENTIALS_DIRECTORY"] = str(folder)
    atexit.register(shutil.rmtree, folder, True)


def load_settings() -> CoreSettings:
    from appliance import config

    return config.load(config.CoreSettings)


def box_ledger() -> Ledger:
    from appliance.ledger import open_ledger

    return open_ledger(load_settings())


def read_line(prompt: str) -> str:
    """One line typed, hidden, at a terminal after `prompt`; else the next line of stdin
    ('' at its end). Never from the command line, where `ps` shows it."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(prompt)
    return sys.stdin.readline().rstrip("\r\n")


def ask_secret(label: str, *, multiline: bool = False) -> str:
    """A secret typed twice, hidden, at a terminal; else read from stdin (one line, or all of
    it with `multiline`, e.g. a PEM key)."""
    if multiline and not sys.stdin.isatty():
        # One trailing newline is how `echo` and files end; it is not part of the secret.
        value = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    else:
        value = read_line(f"{label}: ")
        if sys.stdin.isatty() and read_line("again: ") != value:
            raise OperationalError(f"the two {label}s differ; nothing changed")
    if not value:
        raise OperationalError(f"no {label} given; nothing changed")
    return value


def on_bus(work: Callable[[Bus], Awaitable[T]]) -> T:
    """Run `work` with a bus client of the command line (the broker's `cli` client)."""
    from appliance.bus.admin import CLI_CLIENT
    from appliance.bus.mqtt import MqttBus
    from appliance.runtime import address_for

    async def main() -> T:
        bus = MqttBus(CLI_CLIENT, address_for(load_settings(), CLI_CLIENT), status=False,
                      persistent=False, client_id=f"{CLI_CLIENT}-{uuid.uuid4().hex[:8]}")
        await bus.connect(timeout=10)
        try:
            return await work(bus)
        finally:
            await bus.close()

    return asyncio.run(main())


def ask(service: str, command: str, args: dict[str, Any], timeout: float = 10.0) -> Any:
    """A service's answer to a command over the bus; OperationalError with its error when it
    refuses, or when it does not answer in time."""

    async def work(bus: Bus) -> Any:
        try:
            reply = await bus.request(service, command, args, timeout=timeout)
        except TemporaryError:
            raise OperationalError(
                f"the {service} service did not answer within {timeout:g} s; is it running? "
                f"(systemctl status circles@{service}, or `circles run {service}`)") from None
        if not reply.ok:
            raise OperationalError(f"{service} refused {command}: {reply.error}")
        return reply.result

    return on_bus(work)


def _send_events(events: Sequence[TradeEvent], timeout: float) -> int:
    """Send events through the trade logger, waiting for each confirmation; print a summary."""
    from appliance.bus.trade_event import AcceptedEvent
    from appliance.trade_sender import TradeSender

    async def work(bus: Bus) -> int:
        sender = TradeSender(bus)
        pump = await sender.listen()
        try:
            outcomes = await sender.send(events, timeout=timeout)
        finally:
            pump.cancel()
        accepted = [o for o in outcomes if isinstance(o, AcceptedEvent)]
        duplicates = sum(o.duplicate for o in accepted)
        for outcome in outcomes:
            if not isinstance(outcome, AcceptedEvent):
                print(f"rejected {outcome.event_id}: {outcome.reason}")
        print(f"{len(accepted) - duplicates} stored, {duplicates} duplicates, "
              f"{len(outcomes) - len(accepted)} rejected")
        if len(outcomes) == 1 and accepted:
            print(f"seq {accepted[0].seq} hash {accepted[0].hash}")
        return 0 if len(accepted) == len(outcomes) else 1

    return on_bus(work)


def _chain(args: argparse.Namespace) -> str:
    from appliance.bus.trade_event import chain_for

    return str(args.chain) if args.chain else chain_for(args.account)


def _cmd_ledger_verify(args: argparse.Namespace) -> int:
    ledger = box_ledger()
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
    ledger, chain = box_ledger(), _chain(args)
    if not ledger.count(chain):
        raise OperationalError(f"chain {chain} has no records")
    with open(args.out, "w", encoding="utf-8") as out:
        count = ledger.export(chain, out)
    print(f"wrote {count} records of {chain} to {args.out}")
    return 0


def _cmd_ledger_import(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from appliance.bus.topics import describe
    from appliance.bus.trade_event import TradeEvent
    from appliance.errors import ValidationFailed

    events, bad = [], 0
    with open(args.file, encoding="utf-8", errors="surrogateescape") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                events.append(TradeEvent.model_validate_json(line))
            except (ValidationFailed, ValidationError) as exc:
                bad += 1
                reason = describe(exc) if isinstance(exc, ValidationError) else str(exc)
                print(f"line {number}: {reason}", file=sys.stderr)
    if bad:
        print(f"{bad} invalid lines; nothing sent (fix them and import again)", file=sys.stderr)
        return 1
    return _send_events(events, args.timeout)


def _cmd_ledger_metrics(args: argparse.Namespace) -> int:
    print(json.dumps(ask("trade-logger", "metrics", {"account": args.account}, timeout=30), indent=2))
    return 0


def _cmd_ledger_key(args: argparse.Namespace) -> int:
    from appliance.panel import api_keys
    from appliance.security.audit import AuditLog, cli_actor

    audit = AuditLog.open(load_settings())
    engine = audit.ledger.engine
    if args.key_command == "create":
        made, key = api_keys.issue(audit, args.account, args.label or "", actor=cli_actor())
        print(f"API key {made.id} for account {made.account} (shown once, keep it safe):\n{key}")
    elif args.key_command == "list":
        for k in api_keys.listing(engine):
            state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
            print(f"{k.id:>4}  {k.account:<20} {k.prefix}…  {k.label or '-':<16} "
                  f"created {k.created_at}  {state}")
    elif not api_keys.withdraw(audit, args.id, actor=cli_actor()):
        raise OperationalError(f"no active API key {args.id}")
    else:
        print(f"API key {args.id} revoked")
    return 0


def _cmd_simulate_trades(args: argparse.Namespace) -> int:
    from appliance.simulate import simulated_trades

    return _send_events(list(simulated_trades(args.n, args.account, seed=args.seed)), args.timeout)


def _cmd_simulate_mt5(args: argparse.Namespace) -> int:
    """An MT5 expert advisor, simulated: the device's own credentials, the EA's protocol."""
    import logging

    from appliance import logging as circles_logging
    from appliance.bus.admin import client_secret
    from appliance.bus.mqtt311 import Address
    from appliance.mt5_sim import Simulator
    from appliance.security.secrets import read_secret

    settings = load_settings()
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = read_secret(client_secret(args.account), settings.state_dir) or ""
    if not password:
        raise OperationalError(
            f"no password for {args.account}: no secret {client_secret(args.account)} in "
            f"{settings.state_dir} (add the device with `circles device add {args.account} "
            "--kind mt5`), and no --password-stdin")
    circles_logging.redact(password)
    bus = settings.bus
    address = Address(bus.host, bus.port, args.account, password, bus.tls, bus.ca_file)
    queue = args.queue or settings.state_dir / "mt5-sim" / f"{args.account}.queue"
    if args.log_json:  # as the services log: `circles up` keeps it with theirs
        circles_logging.setup(args.account, environment=settings.environment,
                              journal_socket=settings.log.journal_socket)
    else:
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("circles.mt5-sim")
        logger.addHandler(out)
        logger.setLevel(logging.INFO)
        logger.propagate = False

    async def main() -> int:
        sim = Simulator(args.account, address, queue, seed=args.seed,
                        gmt_offset_s=args.gmt_offset_s, skip=args.skip,
                        resend_after_s=args.resend_after, heartbeat_s=args.heartbeat_every,
                        snapshot_every_s=args.snapshot_every, reconnect_max_s=args.reconnect_max)
        await sim.start(wait=False)
        # SIGTERM (systemd, `circles up`) stops it as Ctrl-C does: offline, then DISCONNECT.
        this = asyncio.current_task()
        assert this is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
        try:
            made = await sim.generate(args.deals, args.every)
            await sim.wait_acked()
            print(f"{made} deals made; every deal sent was acknowledged")
        except asyncio.CancelledError:
            return 0
        finally:
            await sim.stop()
        return 0

    return asyncio.run(main())


def _cmd_send_test_trade(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime
    from decimal import Decimal

    from appliance.bus.trade_event import TradeEvent

    event = TradeEvent(event_id=f"test-{uuid.uuid4().hex}", source="manual",
                       account_id=args.account, strategy_id="test", symbol="TEST/USD", side="buy",
                       qty=Decimal("1"), price=Decimal("1.00"), ts=datetime.now(UTC),
                       extra={"note": "circles send-test-trade"})
    return _send_events([event], args.timeout)


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
    sync.add_argument("--state", help="the state directory (default: the configuration's)")
    sync.add_argument("--host", help="the broker (default: the configuration's bus.host)")
    sync.add_argument("--port", type=int, help="default: the configuration's bus.port")
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
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--account", help="a trading account (its chain trade:<account>)")
    which.add_argument("--chain", help="any chain, e.g. audit")
    export.add_argument("--out", required=True)
    export.set_defaults(func=_cmd_ledger_export)
    imp = lsub.add_parser("import", help="send a file of TRADE_EVENTs (one per line) to the ledger")
    imp.add_argument("file")
    imp.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the commit")
    imp.set_defaults(func=_cmd_ledger_import)
    met = lsub.add_parser("metrics", help="an account's metrics, from the trade logger")
    met.add_argument("--account", required=True)
    met.set_defaults(func=_cmd_ledger_metrics)
    key = lsub.add_parser("key", help="API keys of the HTTP ingest, one account each")
    ksub = key.add_subparsers(dest="key_command", required=True)
    kcreate = ksub.add_parser("create", help="a new key (printed once)")
    kcreate.add_argument("--account", required=True)
    kcreate.add_argument("--label", help="what the key is for, e.g. the EA's host")
    ksub.add_parser("list", help="every key, without the secret part")
    krevoke = ksub.add_parser("revoke", help="revoke a key at once")
    krevoke.add_argument("id", type=int)
    key.set_defaults(func=_cmd_ledger_key)
    vbundle = lsub.add_parser("verify-bundle", help="check an exported bundle")
    vbundle.add_argument("bundle")
    vbundle.add_argument("--public-key", help="the owner's public key file (base64)")
    vbundle.set_defaults(func=_cmd_ledger_verify_bundle)

    sim = sub.add_parser("simulate", help="simulated sources")
    simsub = sim.add_subparsers(dest="simulate_command", required=True)
    trades = simsub.add_parser("trades", help="publish simulated fills over MQTT")
    trades.add_argument("--n", type=int, default=1000, help="events, the first a deposit")
    trades.add_argument("--account", default="demo")
    trades.add_argument("--seed", type=int, help="the same events every time (ids included)")
    trades.add_argument("--timeout", type=float, default=120.0)
    trades.set_defaults(func=_cmd_simulate_trades)
    mt5 = simsub.add_parser("mt5", help="an MT5 expert advisor: deals over its own MQTT 3.1.1 "
                                        "connection, store and forward (docs/mt5_protocol.md)")
    mt5.add_argument("--account", required=True, help="the mt5 device (circles device add)")
    mt5.add_argument("--deals", type=int, help="stop once this many deals are made and acked "
                                               "(default: run until Ctrl-C)")
    mt5.add_argument("--every", type=float, default=2.0, help="seconds between deals")
    mt5.add_argument("--seed", type=int, help="the same deals every time")
    mt5.add_argument("--skip", type=int, nargs="+", action="extend", default=[],
                     metavar="TICKET", help="deals kept in the history but never sent")
    mt5.add_argument("--queue", type=Path, help="the queue file "
                                               "(default <state>/mt5-sim/<account>.queue)")
    mt5.add_argument("--password-stdin", action="store_true",
                     help="read the device's password from stdin (default: its secret)")
    mt5.add_argument("--gmt-offset-s", type=int, default=7200, help="the trade server's offset")
    mt5.add_argument("--resend-after", type=float, default=10.0,
                     help="seconds before a deal without an ack is sent again")
    mt5.add_argument("--heartbeat-every", type=float, default=30.0)
    mt5.add_argument("--snapshot-every", type=float, default=900.0)
    mt5.add_argument("--reconnect-max", type=float, default=60.0,
                     help="longest wait between two connection attempts")
    mt5.add_argument("--log-json", action="store_true",
                     help="log as the services do (JSON lines on stderr, or the journal)")
    mt5.set_defaults(func=_cmd_simulate_mt5)

    test = sub.add_parser("send-test-trade", help="one TRADE_EVENT through the trade logger")
    test.add_argument("--account", default="demo")
    test.add_argument("--timeout", type=float, default=15.0)
    test.set_defaults(func=_cmd_send_test_trade)

    svc = sub.add_parser("services", help="list the registered services")
    svc.set_defaults(func=_cmd_services)

    from appliance.cli import audit, backtest, backup, crypto, db, devices, home, notify, trading, users

    for area in (users, crypto, audit, devices, trading, home, db, backtest, backup, notify):
        area.add_commands(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if not getattr(args, "as_root", False):  # only a disaster recovery keeps root's rights
            act_as(SERVICE_USER)  # root on a box: as the services, so they can read what it makes
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return ConfigError.exit_code
    except CirclesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
