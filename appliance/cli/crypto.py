"""`circles keys …` and `circles secrets …`: the keyring and the encrypted secret store.

A secret's value is read from stdin (or typed, hidden, at a terminal), never from the command
line, where every user of the box could see it in `ps`. Every change and every read is
written to the audit log with the secret's name only.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import TYPE_CHECKING, Any

from appliance.cli import ask_secret, load_settings
from appliance.errors import OperationalError

if TYPE_CHECKING:
    from appliance.security.audit import AuditLog
    from appliance.security.secrets import SecretStore


def _open() -> tuple[SecretStore, AuditLog]:
    from appliance.security.audit import AuditLog
    from appliance.security.secrets import SecretStore

    settings = load_settings()
    audit = AuditLog.open(settings)
    return SecretStore.open(settings.state_dir, audit), audit


def _actor() -> str:
    from appliance.security.audit import cli_actor

    return cli_actor()


def _cmd_keys_list(args: argparse.Namespace) -> int:
    from appliance.security.secrets import SecretStore

    store = SecretStore.open(load_settings().state_dir)
    keyring = store.keyring
    used = Counter(store.key_ids().values())
    for key_id in keyring.ids:
        current = "current" if key_id == keyring.current_id else ""
        print(f"{key_id}  created {keyring.info(key_id).created}  {current:<7}  "
              f"{used.get(key_id, 0)} secrets")
    if used.get("unreadable"):
        print(f"{used['unreadable']} secret files are not Circles ciphertexts")
    if keyring.read_only:
        print(f"(read-only, from {keyring.path})")
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    from appliance.security.audit import KEY_ROTATE

    store, audit = _open()
    previous = store.keyring.current_id
    new = store.keyring.rotate()
    audit.record(KEY_ROTATE, actor=_actor(), target=new, previous=previous)
    print(f"new current key {new}; data under {previous} still decrypts "
          "(`circles keys reencrypt` moves the secrets to the new key)")
    return 0


def _cmd_keys_reencrypt(args: argparse.Namespace) -> int:
    from appliance.security.audit import KEY_REENCRYPT
    from appliance.security.users import Users

    store, audit = _open()
    total = len(store.names())
    moved = store.reencrypt()
    # The other data the keyring seals: the users' TOTP secrets, in the database.
    users = Users(audit.ledger.engine, audit, load_settings().security, keyring=store.keyring)
    totp = users.totp.rewrap_secrets()
    audit.record(KEY_REENCRYPT, actor=_actor(), target=store.keyring.current_id,
                 secrets=total, rewrapped=moved, totp_secrets=totp)
    print(f"{moved} of {total} secrets re-wrapped with key {store.keyring.current_id} "
          f"({total - moved} were on it already); {totp} TOTP secrets re-wrapped")
    return 0


def _cmd_secrets_set(args: argparse.Namespace) -> int:
    from appliance.security.secrets import check_name

    check_name(args.name)  # before asking for a value
    value = ask_secret(f"value of {args.name}", multiline=True)
    store, _ = _open()
    store.set(args.name, value, actor=_actor())
    print(f"secret {args.name} stored (key {store.keyring.current_id})")
    return 0


def _cmd_secrets_get(args: argparse.Namespace) -> int:
    store, _ = _open()
    value = store.get(args.name, actor=_actor())
    if value is None:
        raise OperationalError(f"no secret {args.name}")
    print(value)
    return 0


def _cmd_secrets_list(args: argparse.Namespace) -> int:
    from appliance.security.secrets import SecretStore

    for name in SecretStore.open(load_settings().state_dir).names():
        print(name)
    return 0


def _cmd_secrets_delete(args: argparse.Namespace) -> int:
    store, _ = _open()
    if not store.delete(args.name, actor=_actor()):
        raise OperationalError(f"no secret {args.name}")
    print(f"secret {args.name} deleted")
    return 0


def add_commands(sub: Any) -> None:
    keys = sub.add_parser("keys", help="the keyring that encrypts secrets and backups")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    ksub.add_parser("list", help="every key, the current one, and how many secrets use each") \
        .set_defaults(func=_cmd_keys_list)
    ksub.add_parser("rotate", help="a new current key; old data still decrypts") \
        .set_defaults(func=_cmd_keys_rotate)
    ksub.add_parser("reencrypt", help="move every secret to the current key") \
        .set_defaults(func=_cmd_keys_reencrypt)

    sec = sub.add_parser("secrets", help="the encrypted secret store")
    ssub = sec.add_subparsers(dest="secrets_command", required=True)
    put = ssub.add_parser("set", help="store a secret; the value is read from stdin "
                                      "(typed, hidden, at a terminal)")
    put.add_argument("name")
    put.set_defaults(func=_cmd_secrets_set)
    get = ssub.add_parser("get", help="print a secret's value")
    get.add_argument("name")
    get.set_defaults(func=_cmd_secrets_get)
    ssub.add_parser("list", help="the names of the stored secrets") \
        .set_defaults(func=_cmd_secrets_list)
    delete = ssub.add_parser("delete", help="remove a secret")
    delete.add_argument("name")
    delete.set_defaults(func=_cmd_secrets_delete)
