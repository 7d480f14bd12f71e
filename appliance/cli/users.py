"""`circles user …`: people who may log in to the panel.

The command line acts as an admin: whoever has a shell on the box (and can read its state
directory) may manage its users. Each change is audit-logged as `cli:<unix user>`.
Passwords are read from the terminal without echo, or from standard input when it is not
a terminal (`… | circles user add NAME`), never from the arguments, which other users of
the machine can see in the process list.

`circles user login NAME` checks a password (and a TOTP code) as the panel's login does,
counted and audit-logged the same way, from the source `cli`; it opens no session.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import TYPE_CHECKING, Any

from appliance.cli import ask_secret, read_line
from appliance.errors import OperationalError

if TYPE_CHECKING:
    from appliance.security.login import LoginResult
    from appliance.security.users import UserInfo, Users

_ROLES = ("admin", "operator", "viewer")
SOURCE = "cli"  # where console logins come from: their lockout is the console's own


def _users(*, keyring: bool = False) -> Users:
    """The box's users; with the keyring that TOTP codes need."""
    from appliance.cli import load_settings
    from appliance.security.crypto import Keyring
    from appliance.security.users import Users

    settings = load_settings()
    return Users.open(settings, Keyring.load_or_create(settings.state_dir) if keyring else None)


def _actor() -> str:
    from appliance.security.audit import cli_actor

    return cli_actor()


def _when(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M UTC") if ts else "never"


def _cmd_add(args: argparse.Namespace) -> int:
    from appliance.security.passwords import generate_password

    password = generate_password() if args.generate else ask_secret(f"password for {args.name}")
    made = _users().add(args.name, password, args.role, actor=_actor(),
                        must_change_password=args.generate)
    print(f"user {made.username} added (role {made.role})")
    if args.generate:
        print(f"password (shown once; {made.username} must change it at first login):")
        print(password)
    return 0


def _cmd_login(args: argparse.Namespace) -> int:
    from appliance.security.login import Outcome

    password = read_line("password: ")
    if not password:
        raise OperationalError("no password given; nothing checked")
    users = _users(keyring=True)
    result = users.authenticate(args.name, password, source=SOURCE)
    if result.outcome is Outcome.NEEDS_TOTP:
        assert result.username and result.challenge
        code = args.code or read_line("TOTP code: ")
        if not code:
            raise OperationalError("no TOTP code given; the login is not finished")
        result = users.authenticate_totp(result.username, result.challenge, code, source=SOURCE)
    print(_verdict(result))
    return 0 if result.username else 1


_NEXT: dict[str, str] = {  # by outcome: what the panel will ask for first
    "must_change_password": "must change the password at first panel login",
    "expired": "the password has expired: a new one at the next panel login"}


def _verdict(result: LoginResult) -> str:
    """What a login's answer means for the person, in one line."""
    if result.username is None:
        if result.locked_until:
            until = _when(result.locked_until)
            return f"login refused: too many failed attempts; locked until {until}"
        return "login refused: wrong name, password or code"
    notes = [_NEXT[result.outcome]] if result.outcome in _NEXT else []
    if result.must_enrol_totp:
        notes.append("no authenticator app yet (the panel asks for one first)")
    return "; ".join([f"login ok: {result.username} (role {result.role})", *notes])


def _state(user: UserInfo) -> str:
    notes = []
    if user.locked_until and user.locked_until > datetime.now(user.locked_until.tzinfo):
        notes.append(f"locked until {_when(user.locked_until)}")
    if user.must_change_password:
        notes.append("must change password")
    return ", ".join(notes) or "-"


def _cmd_list(args: argparse.Namespace) -> int:
    users = _users().list_users()
    if not users:
        print("no users (`circles up` creates the first admin; or `circles user add`)")
        return 0
    print(f"{'NAME':<20} {'ROLE':<9} {'TOTP':<5} {'LAST LOGIN':<21} STATE")
    for user in users:
        print(f"{user.username:<20} {user.role:<9} {'yes' if user.totp_enrolled else 'no':<5} "
              f"{_when(user.last_login_at):<21} {_state(user)}")
    return 0


def _cmd_set_role(args: argparse.Namespace) -> int:
    changed = _users().set_role(args.name, args.role, actor=_actor())
    print(f"user {changed.username} is now {changed.role}")
    return 0


def _cmd_reset_password(args: argparse.Namespace) -> int:
    name = args.name.strip().lower()
    issued = _users().issue_reset_token(name, actor=_actor())
    print(f"one-time reset token for {name}, valid until {_when(issued.expires_at)} "
          f"(they set a new password with it on the panel's login page):")
    print(issued.token)
    return 0


def _cmd_totp_reset(args: argparse.Namespace) -> int:
    name = args.name.strip().lower()
    had = _users().totp.reset(name, actor=_actor())
    if had:
        print(f"TOTP of {name} removed with its backup codes; they enrol again after logging in")
    else:
        print(f"{name} had no TOTP enrolled; nothing to remove")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    name = args.name.strip().lower()
    _users().remove(name, actor=_actor())
    print(f"user {name} removed")
    return 0


def add_commands(sub: Any) -> None:
    user = sub.add_parser("user", help="people who may log in to the panel")
    usub = user.add_subparsers(dest="user_command", required=True)

    add = usub.add_parser("add", help="a new user; the password is asked for (or read from "
                                      "stdin), never given as an argument")
    add.add_argument("name")
    add.add_argument("--role", choices=_ROLES, default="viewer", help="default: viewer")
    add.add_argument("--generate", action="store_true",
                     help="generate the password, print it once, and make them change it")
    add.set_defaults(func=_cmd_add)

    usub.add_parser("list", help="every user, role, TOTP and lockout state") \
        .set_defaults(func=_cmd_list)

    role = usub.add_parser("set-role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("role", choices=_ROLES)
    role.set_defaults(func=_cmd_set_role)

    reset = usub.add_parser("reset-password", help="print a one-time token to set a new password")
    reset.add_argument("name")
    reset.set_defaults(func=_cmd_reset_password)

    totp = usub.add_parser("totp-reset", help="remove a user's TOTP (a lost phone)")
    totp.add_argument("name")
    totp.set_defaults(func=_cmd_totp_reset)

    login = usub.add_parser("login", help="check a password (and TOTP code) as the panel's "
                                          "login does; exit 0 if it would log in")
    login.add_argument("name")
    login.add_argument("--code", help="the TOTP code or a backup code (default: asked for, "
                                      "or the second line of stdin)")
    login.set_defaults(func=_cmd_login)

    remove = usub.add_parser("remove", help="delete a user")
    remove.add_argument("name")
    remove.set_defaults(func=_cmd_remove)
