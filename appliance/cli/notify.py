"""`circles notify …`: try a channel of the notify service, and read its last alerts, over the
bus (the service holds the channels and their secrets; the command line never reads them)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from appliance.cli import ask

SERVICE = "notify"
# The service answers within 10 s, whatever the channel's own timeout.
TEST_TIMEOUT_S = 20.0


def _cmd_test(args: argparse.Namespace) -> int:
    answer = ask(SERVICE, "test", {"channel": args.channel}, timeout=TEST_TIMEOUT_S)
    if not answer.get("sent"):
        print(f"{answer['channel']}: {answer.get('detail', 'not sent yet')}")
        return 1
    print(f"test message sent through {answer['channel']}")
    return 0


def _cmd_recent(args: argparse.Namespace) -> int:
    recent = ask(SERVICE, "recent", {})
    if args.json:
        print(json.dumps(recent, indent=2, ensure_ascii=False))
        return 0
    print(f"{recent['active']} alerts active, {recent['queued']} deliveries waiting")
    for alert in recent["alerts"]:
        waiting = f"  (waiting: {', '.join(alert['pending'])})" if alert["pending"] else ""
        print(f"{alert['ts']}  {alert['severity']:<8} {alert['kind']:<8} {alert['title']}: "
              f"{alert['text']}{waiting}")
    return 0


def add_commands(sub: Any) -> None:
    notify = sub.add_parser("notify", help="alerts to your phone: try a channel, the last alerts")
    nsub = notify.add_subparsers(dest="notify_command", required=True)
    test = nsub.add_parser("test", help="send a test message through a channel now")
    test.add_argument("--channel", required=True, help="a channel of [notify.channels]")
    test.set_defaults(func=_cmd_test)
    recent = nsub.add_parser("recent", help="the last alerts and what still waits to be sent")
    recent.add_argument("--json", action="store_true")
    recent.set_defaults(func=_cmd_recent)
