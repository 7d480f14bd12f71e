"""`circles audit …` and `circles device …`: the audit log and devices in the broker."""

from __future__ import annotations

import argparse
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from appliance.cli import load_settings


def _audit() -> Any:
    from appliance.security.audit import AuditLog

    return AuditLog.open(load_settings())


def _cmd_verify(args: argparse.Namespace) -> int:
    verdict, segments = _audit().verify(archive_dir=args.archive_dir,
                                        allow_missing=args.allow_missing)
    failed = 0
    for done, check in segments:
        state = "ok" if check.ok else f"FAILED at seq {check.first_bad_seq}: {check.reason}"
        print(f"archive seq {done.first_seq}..{done.through_seq} ({done.file}): {state}")
        for note in check.notes:
            print(f"  note: {note}")
        failed += not check.ok
    if verdict.ok:
        print(f"audit: ok, {verdict.records} records from seq {verdict.first_seq}, "
              f"signed through {verdict.signed_through}")
    else:
        failed += 1
        print(f"audit: FAILED at seq {verdict.first_bad_seq}: {verdict.reason}")
    return 1 if failed else 0


def _since(text: str) -> datetime:
    """`2026-11-01`, an ISO time, or a duration back from now: `30m`, `12h`, `7d`."""
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time or a duration: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _cmd_tail(args: argparse.Namespace) -> int:
    events = deque(_audit().events(user=args.user, action=args.action, since=args.since),
                   maxlen=args.n)
    for e in events:
        details = " ".join(f"{k}={v}" for k, v in sorted(e.details.items()))
        print(f"{e.seq:>6}  {e.ts}  {e.action:<18} {e.outcome:<8} {e.actor:<20} "
              f"{e.target or '-'}  {details}".rstrip())
    return 0


def _cmd_archive(args: argparse.Namespace) -> int:
    from appliance.security.audit import AuditLog, cli_actor

    settings = load_settings()
    directory = args.dir or settings.state_dir / "archive" / "audit"
    before = datetime.now(UTC) - timedelta(days=args.older_than_days)
    done = AuditLog.open(settings).archive(before, directory, actor=cli_actor())
    if done is None:
        print(f"nothing older than {args.older_than_days} days")
    else:
        print(f"archived seq {done.first_seq}..{done.through_seq} to {done.file} "
              f"(sha256 {done.sha256})")
    return 0


def add_commands(sub: Any) -> None:
    aud = sub.add_parser("audit", help="the tamper-evident audit log")
    asub = aud.add_subparsers(dest="audit_command", required=True)
    verify = asub.add_parser("verify", help="check the audit chain and its archived segments")
    verify.add_argument("--archive-dir", type=Path,
                        help="where archive files are now, if they were moved off the box")
    verify.add_argument("--allow-missing", action="store_true",
                        help="report an archive file that cannot be found instead of failing")
    verify.set_defaults(func=_cmd_verify)
    tail = asub.add_parser("tail", help="the latest audit events")
    tail.add_argument("--user", help="events by or about this user (or actor, e.g. cli:root)")
    tail.add_argument("--action", help="an action (login.failure) or a prefix ending in '.' (login.)")
    tail.add_argument("--since", type=_since, help="a time (2026-11-01T08:00) or a duration (12h, 7d)")
    tail.add_argument("-n", type=int, default=50, help="how many (default 50)")
    tail.set_defaults(func=_cmd_tail)
    arch = asub.add_parser("archive", help="move old events to a file that verifies on its own")
    arch.add_argument("--older-than-days", type=int, default=365)
    arch.add_argument("--dir", type=Path, help="default <state>/archive/audit")
    arch.set_defaults(func=_cmd_archive)
