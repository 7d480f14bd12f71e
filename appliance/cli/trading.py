"""`circles trading …`: halt, resume or flatten trading, and see why it is halted.

Every command asks the risk service over the bus (it is the only writer of the retained
halt, and it audit-logs each change with who asked: `cli:<person>`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from appliance.cli import ask

RISK = "risk"
TIMEOUT_S = 10.0
# The risk service waits up to 25 s (its flatten_timeout_s) for the execution service.
FLATTEN_TIMEOUT_S = 30.0


def ask_risk(command: str, args: dict[str, Any], timeout: float = TIMEOUT_S) -> Any:
    return ask(RISK, command, args, timeout)


def _actor() -> str:
    from appliance.security.audit import cli_actor

    return cli_actor()


def _warn_audit(answer: Any) -> None:
    if isinstance(answer, dict) and answer.get("audit_error"):
        print(f"warning: {answer['audit_error']}", file=sys.stderr)


def _cmd_halt(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"by": _actor()}
    if args.reason:
        request["reason"] = args.reason
    answer = ask_risk("halt", request)
    _warn_audit(answer)
    if answer.get("changed"):
        print(f"trading halted: {answer['reason']}")
    else:
        print(f"trading was already halted by {answer['by']}: {answer['reason']}")
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    answer = ask_risk("resume", {"by": _actor(), "force": bool(args.force)})
    _warn_audit(answer)
    print("trading resumed" if answer.get("changed") else "trading was not halted")
    return 0


def _confirmed(question: str) -> bool:
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def _cmd_flatten(args: argparse.Namespace) -> int:
    if not args.yes and not _confirmed("Halt trading and close every open position?"):
        print("nothing done", file=sys.stderr)
        return 1
    answer = ask_risk("flatten", {"by": _actor()}, timeout=FLATTEN_TIMEOUT_S)
    _warn_audit(answer)
    print("trading halted; the execution service confirmed the flatten")
    result = answer.get("execution")
    if result not in (None, {}, []):
        print(json.dumps(result, indent=2, default=str))
    return 0


def _figure(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cmd_status(args: argparse.Namespace) -> int:
    answer = ask_risk("state", {})
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
        return 0
    halt = answer.get("halt")
    if halt is None:
        print("trading: no halt state yet (the risk service is starting)")
    elif halt["halted"]:
        print(f"trading: HALTED since {halt['ts']} by {halt['by']}: {halt['reason']}")
    else:
        print(f"trading: allowed since {halt['ts']} ({halt['by']}: {halt['reason']})")
    risk = answer["risk"]
    breaches = risk.get("breaches") or []
    print("breaches: " + ("none" if not breaches else ""))
    for text in breaches:
        print(f"  - {text}")
    print("limits:")
    for key, limit in risk.get("limits", {}).items():
        print(f"  {key:<24} {_figure(limit) if limit is not None else 'off'}")
    print("figures:")
    for key, value in sorted(risk.get("figures", {}).items()):
        print(f"  {key:<24} {_figure(value)}")
    return 0


def add_commands(sub: Any) -> None:
    trading = sub.add_parser("trading", help="halt, resume or flatten trading (via the risk service)")
    tsub = trading.add_subparsers(dest="trading_command", required=True)
    halt = tsub.add_parser("halt", help="halt trading now (every order path obeys it)")
    halt.add_argument("--reason", help="why, for the audit log and the panel")
    halt.set_defaults(func=_cmd_halt)
    resume = tsub.add_parser("resume", help="resume trading; refused while a limit is breached")
    resume.add_argument("--force", action="store_true",
                        help="accept a daily loss or drawdown beyond its limit and measure it "
                             "again from the current equity")
    resume.set_defaults(func=_cmd_resume)
    flatten = tsub.add_parser("flatten", help="halt trading and close every open position")
    flatten.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    flatten.set_defaults(func=_cmd_flatten)
    status = tsub.add_parser("status", help="the halt, the breaches and the figures vs limits")
    status.add_argument("--json", action="store_true", help="the risk service's answer as JSON")
    status.set_defaults(func=_cmd_status)
