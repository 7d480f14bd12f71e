"""`circles backup …`: run a job now (through the service), list snapshots, verify them,
restore one into a folder or in place (disaster recovery), and the emergency kit
(docs/backup.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.cli import CREDSTORE, ask, on_bus
from appliance.errors import OperationalError, TemporaryError
from appliance.values import size_text

if TYPE_CHECKING:
    from appliance.bus.base import Bus
    from appliance.config import CoreSettings
    from appliance.security.crypto import Keyring
    from modules.backup.repo import Manifest, Repository
    from modules.backup.settings import BackupJob, BackupSettings

SERVICE = "backup"
AUDIT_RESTORE = "backup.restore"
AUDIT_KIT = "backup.emergency_kit"
WARNING = """\
!!! ANYONE WITH THIS FILE CAN READ YOUR BACKUPS (and the secrets inside them). !!!
Print it, store the paper offline (a safe, a sealed envelope at a relative's), and delete
the file. Make a new kit whenever the keyring is rotated or a backup target changes."""


# -- settings, keyring and repositories --------------------------------------------------------
def _settings() -> CoreSettings:
    from appliance import config
    from modules.backup.settings import BackupSettings

    return config.load(config.settings_class({SERVICE: BackupSettings}))


def _backup(settings: CoreSettings) -> BackupSettings:
    section: BackupSettings = getattr(settings, SERVICE)
    return section


def _keyring(settings: CoreSettings) -> Keyring:
    """The box's keyring, never a new one: a new keyring could not read a single backup."""
    from appliance.security.crypto import KEYRING_CREDENTIAL, Keyring, keyring_path

    if os.geteuid() == 0 and "CREDENTIALS_DIRECTORY" not in os.environ \
            and (CREDSTORE / KEYRING_CREDENTIAL).is_file():
        # Root kept its rights (--in-place): read root's credstore as the units do.
        os.environ["CREDENTIALS_DIRECTORY"] = str(CREDSTORE)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not (credentials and (Path(credentials) / KEYRING_CREDENTIAL).is_file()) \
            and not keyring_path(settings.state_dir).is_file():
        raise OperationalError(
            f"no keyring at {keyring_path(settings.state_dir)} (nor in $CREDENTIALS_DIRECTORY): "
            "without it no backup can be read. On a new box, put the keyring of the emergency "
            "kit there first (docs/backup.md, \"Restoring onto a new box\")")
    return Keyring.load_or_create(settings.state_dir)


def _jobs(settings: CoreSettings, name: str | None) -> list[BackupJob]:
    jobs = list(_backup(settings).jobs)
    if name is None:
        return jobs
    chosen = [job for job in jobs if job.name == name]
    if not chosen:
        raise OperationalError(f"no backup job {name!r}; the jobs are: "
                               f"{', '.join(j.name for j in jobs)}")
    return chosen


def _repositories(settings: CoreSettings, jobs: list[BackupJob]) -> list[tuple[list[str], Repository]]:
    """One repository per distinct target, with the jobs that back up into it."""
    from modules.backup.repo import Repository

    keyring = _keyring(settings)
    found: dict[str, tuple[list[str], Repository]] = {}
    for job in jobs:
        store = _backup(settings).open_target(job, settings.state_dir)
        if store.name in found:
            found[store.name][0].append(job.name)
        else:
            found[store.name] = ([job.name], Repository(store, keyring))
    return list(found.values())


def _snapshot(settings: CoreSettings, snapshot: str | None, job: str | None
              ) -> tuple[Repository, Manifest]:
    """The snapshot `snapshot` wherever it is, else the newest of `job` (of the only job)."""
    from appliance.storage import NotFound

    jobs = _jobs(settings, job)
    if snapshot is None and len(jobs) > 1:
        raise OperationalError(f"several jobs ({', '.join(j.name for j in jobs)}): name one "
                               "with --job, or give a snapshot id")
    for names, repo in _repositories(settings, jobs):
        if snapshot is None:
            found = repo.snapshots(names[0])
            if not found:
                raise OperationalError(f"job {names[0]} has no snapshot in {repo.store.name}")
            return repo, found[-1]
        try:
            return repo, repo.load(snapshot)
        except NotFound:
            continue
    raise OperationalError(f"no snapshot {snapshot} in the targets of "
                           f"{', '.join(j.name for j in jobs)}")


def _audit(settings: CoreSettings, action: str, target: str, outcome: str = "ok",
           **details: Any) -> None:
    from appliance.security.audit import AuditLog, cli_actor

    audit = AuditLog.open(settings)
    try:
        audit.record(action, actor=cli_actor(), target=target, outcome=outcome, **details)
    finally:
        audit.ledger.engine.dispose()  # closed now: an in-place restore then owns its side files


def _report(report: Any) -> int:
    for problem in report.problems:
        print(f"problem: {problem}")
    return 0 if report.ok else 1


# -- through the service -----------------------------------------------------------------------
def _cmd_now(args: argparse.Namespace) -> int:
    """`run` and `drill`: ask the service, then wait for each job's next result."""
    from appliance.bus import registry
    from appliance.bus.payloads import BackupResult

    spec = registry.BACKUP_DRILL if args.backup_command == "drill" else registry.BACKUP_RESULT

    async def work(bus: Bus) -> list[BackupResult]:
        await bus.subscribe([(spec.filter(), spec.qos)])
        try:
            reply = await bus.request(SERVICE, args.backup_command,
                                      {"job": args.job} if args.job else {}, timeout=10)
        except TemporaryError:
            raise OperationalError("the backup service did not answer within 10 s; is it running? "
                                   "(systemctl status circles@backup, or `circles run backup`)") from None
        if not reply.ok:
            raise OperationalError(f"backup refused {args.backup_command}: {reply.error}")
        waiting, results = set(reply.result["jobs"]), []
        print(f"{args.backup_command}: {', '.join(sorted(waiting))} (request {reply.result['request_id']})")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        while waiting:
            left = deadline - loop.time()
            if left <= 0:
                raise OperationalError(f"no result for {', '.join(sorted(waiting))} within "
                                       f"{args.timeout:g} s; the service goes on (see "
                                       "`circles backup status`)")
            for message in await bus.receive(100, timeout=left):
                bus.ack(message)
                if message.retain:  # the result of an earlier run
                    continue
                result = BackupResult.model_validate_json(message.payload)
                if result.job in waiting:
                    waiting.discard(result.job)
                    results.append(result)
        return results

    results = on_bus(work)
    for r in results:
        where = f"{r.target}" + (" (LOCAL ONLY: on this box's own disk)" if r.local_only else "")
        if r.ok:
            extra = (f", {size_text(r.uploaded_bytes)} sent" if r.kind == "backup" else "")
            print(f"{r.job}: ok, snapshot {r.snapshot}, {r.files} files, {size_text(r.bytes)}{extra}, "
                  f"{r.duration_s:.1f} s, {where}")
        else:
            print(f"{r.job}: FAILED: {r.error}")
    return 0 if all(r.ok for r in results) else 1


def _cmd_status(args: argparse.Namespace) -> int:
    status = ask(SERVICE, "status", {})
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    for job in status["jobs"]:
        last, drill = job["last"], job["drill"]
        print(f"{job['job']}: {job['target']}{'  LOCAL ONLY' if job['local_only'] else ''}")
        print(f"  schedule {job['schedule']} ({status['timezone']}), next {job['next_at'] or '-'}")
        print(f"  last success {job['last_success'] or 'never'}"
              + (f"; last run {'ok' if last['ok'] else 'FAILED: ' + str(last['error'])}" if last else ""))
        if drill:
            print(f"  last drill {drill['ts']}: {'ok' if drill['ok'] else 'FAILED: ' + str(drill['error'])}")
    alert = status["alert"]
    if alert and alert["alert"]:
        print(f"ALERT: {alert['reason']}")
    return 1 if alert and alert["alert"] else 0


# -- reading the repositories directly ---------------------------------------------------------
def _cmd_list(args: argparse.Namespace) -> int:
    settings = _settings()
    rows = []
    for names, repo in _repositories(settings, _jobs(settings, args.job)):
        for name in names:
            rows += [(m, repo.store.name) for m in repo.snapshots(name)]
    if args.json:
        print(json.dumps([{"id": m.id, "job": m.job, "created": m.created, "files": len(m.files),
                           "bytes": m.size, "target": target} for m, target in rows], indent=2))
        return 0
    if not rows:
        print("no snapshots")
    for m, target in rows:
        print(f"{m.id}  {m.job:<16} {m.created}  {len(m.files):>6} files  {size_text(m.size):>9}  {target}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    if not 0 < args.sample <= 1:
        raise OperationalError(f"--sample {args.sample:g}: a share of the chunks, above 0 and at most 1")
    settings = _settings()
    if args.snapshot:
        repo, snap = _snapshot(settings, args.snapshot, args.job)
        reports = [(repo, repo.verify(snapshot_id=snap.id, sample=args.sample, full=args.full))]
    else:
        reports = [(repo, repo.verify(sample=args.sample, full=args.full))
                   for _names, repo in _repositories(settings, _jobs(settings, args.job))]
    failed = 0
    for repo, report in reports:
        print(f"{repo.store.name}: {report.checked} chunks re-read ({size_text(report.bytes)}), "
              + ("ok" if report.ok else f"{len(report.problems)} problems"))
        failed += _report(report)
    return 1 if failed else 0


def _cmd_restore(args: argparse.Namespace) -> int:
    if bool(args.to) == bool(args.in_place):
        raise OperationalError("restore: give --to DIR (a scratch folder) or --in-place")
    settings = _settings()
    repo, snap = _snapshot(settings, args.snapshot, args.job)
    if args.in_place:
        from appliance.cli import backup_in_place

        return backup_in_place.restore(settings, repo, snap, args)
    report = repo.restore(snap.id, Path(args.to))
    print(f"snapshot {snap.id} of {snap.job} ({snap.created}): {report.checked} files, "
          f"{size_text(report.bytes)} restored into {args.to}; checks "
          + ("passed" if report.ok else "FAILED"))
    _audit(settings, AUDIT_RESTORE, snap.id, "ok" if report.ok else "failed", to=str(args.to),
           files=report.checked, problems=len(report.problems))
    return _report(report)


# -- the emergency kit -------------------------------------------------------------------------
def _cmd_emergency_kit(args: argparse.Namespace) -> int:
    from appliance.files import write_atomically
    from appliance.security.crypto import keyring_path
    from appliance.security.secrets import read_secret

    settings = _settings()
    keyring = _keyring(settings)
    backup = _backup(settings)
    lines = [WARNING, "", f"Circles emergency kit, made {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
             "To restore onto a new box, follow README.md, \"Restoring onto a new box\".", "",
             f"THE KEYRING (key ids {', '.join(keyring.ids)}). Put it, exactly as below, in",
             f"{keyring_path(settings.state_dir)} (owner circles, mode 0600):", "",
             keyring.path.read_text().rstrip(), "", "WHERE THE BACKUPS ARE:"]
    secrets: dict[str, str | None] = {}
    for job in backup.jobs:
        target = backup.target_of(job)
        if target.backend == "local":
            lines.append(f"  job {job.name}: the folder {target.path}" if target.path else
                         f"  job {job.name}: {settings.state_dir / 'backups'}, on this box's own disk: "
                         "lost with the box (README.md, \"Backups\")")
            continue
        lines.append(f"  job {job.name}: S3 at {target.endpoint}, bucket {target.bucket}, "
                     f"{'https' if target.secure else 'http'}, region {target.region or '-'}; keys in "
                     f"the secrets {target.access_key_secret} and {target.secret_key_secret}")
        for name in (target.access_key_secret, target.secret_key_secret):
            secrets[name] = read_secret(name, settings.state_dir)
    if secrets:
        lines += ["", "THE S3 KEYS (set each on the new box with `circles secrets set NAME`):"]
        lines += [f"  {name} = {value or '(not set on this box)'}" for name, value in secrets.items()]
    signing_key = keyring_path(settings.state_dir).parent / "ledger-ed25519.pem"  # appliance.ledger.Signer
    if any(job.config for job in backup.jobs) or not signing_key.is_file():
        lines += ["", "The ledger's signing key and every other secret are inside the backups."]
    else:  # no job backs up the key folder
        lines += ["", f"THE LEDGER'S SIGNING KEY (put it in {signing_key}, mode 0600):", "",
                  signing_key.read_text().rstrip()]
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else settings.state_dir / "emergency-kit.txt"
    write_atomically(out, lambda handle: handle.write(text.encode()))
    print(text, end="")
    print(f"\nwritten to {out} (mode 0600): print it, then delete it", file=sys.stderr)
    _audit(settings, AUDIT_KIT, str(out), keys=len(keyring.ids), targets=len(backup.jobs))
    return 0


def add_commands(sub: Any) -> None:
    top = sub.add_parser("backup", help="backups: run, list, verify, restore, emergency kit")
    bsub = top.add_subparsers(dest="backup_command", required=True)
    for command, text in (("run", "back up now (every job, or --job), through the service"),
                          ("drill", "a restore drill now, through the service")):
        now = bsub.add_parser(command, help=text)
        now.add_argument("--job")
        now.add_argument("--timeout", type=float, default=3600.0,
                         help="seconds to wait for the results (default 3600)")
        now.set_defaults(func=_cmd_now)
    status = bsub.add_parser("status", help="each job's last result, next run, and the alert")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)
    listing = bsub.add_parser("list", help="the snapshots (id, job, time, files, size)")
    listing.add_argument("--job")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_cmd_list)
    verify = bsub.add_parser("verify", help="re-read stored chunks and check their hashes")
    verify.add_argument("--job")
    verify.add_argument("--snapshot", help="only this snapshot's chunks")
    verify.add_argument("--full", action="store_true", help="every chunk, not a sample")
    verify.add_argument("--sample", type=float, default=0.1,
                        help="share of the chunks to re-read (default 0.1)")
    verify.set_defaults(func=_cmd_verify)
    restore = bsub.add_parser("restore", help="restore a snapshot (the job's newest by default) "
                                              "into a folder, or in place")
    restore.add_argument("snapshot", nargs="?")
    restore.add_argument("--job")
    restore.add_argument("--to", help="an empty or new folder; the box is left alone")
    restore.add_argument("--in-place", action=_InPlace, help="disaster recovery: stop the services, "
                         "put every file back where it came from, start them")
    restore.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    restore.add_argument("--yes-services-are-stopped", action="store_true",
                         help="the services and the broker are stopped (without systemd)")
    restore.set_defaults(func=_cmd_restore, in_place=False)
    kit = bsub.add_parser("emergency-kit", help="print and write what restoring onto a new box "
                                                "needs (the keys!)")
    kit.add_argument("--out", help="default <state_dir>/emergency-kit.txt")
    kit.set_defaults(func=_cmd_emergency_kit)


class _InPlace(argparse.Action):
    """--in-place keeps root's rights (`main` acts as the services' user otherwise): only root
    may stop and start the units and write the files of root and of mosquitto."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        namespace.in_place = True
        namespace.as_root = True
