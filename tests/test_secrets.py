"""The encrypted secret store: files and modes, systemd credentials first, plaintext of earlier
versions migrated, re-encryption after a rotation, the audit trail, and values that never show
up in a repr, an error or a log line. The `circles secrets`/`circles keys` commands end to end."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import CoreSettings
from appliance.errors import ValidationFailed
from appliance.ledger import open_ledger
from appliance.logging import JsonFormatter
from appliance.security.audit import (
    KEY_REENCRYPT,
    KEY_ROTATE,
    SECRET_DELETE,
    SECRET_READ,
    SECRET_WRITE,
    AuditLog,
)
from appliance.security.crypto import DecryptionError, Keyring, keyring_path
from appliance.security.secrets import (
    SecretStore,
    ensure_secret,
    read_secret,
    secrets_dir,
    write_secret,
)
from tests.helpers import circles, circles_env

VALUE = "sk-live-9f8e7d6c5b4a39281706"  # looks like an exchange API key


@pytest.fixture(autouse=True)
def _no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore.open(tmp_path)


def test_set_get_list_delete(store: SecretStore, tmp_path: Path) -> None:
    assert store.get("exchange.binance") is None and store.names() == []
    store.set("exchange.binance", VALUE)
    store.set("mqtt-esp32-kitchen", "pw-1")
    assert store.get("exchange.binance") == VALUE
    assert store.names() == ["exchange.binance", "mqtt-esp32-kitchen"]
    store.set("mqtt-esp32-kitchen", "pw-2")
    assert SecretStore.open(tmp_path).get("mqtt-esp32-kitchen") == "pw-2"
    assert store.delete("mqtt-esp32-kitchen") and not store.delete("mqtt-esp32-kitchen")
    assert store.names() == ["exchange.binance"] and store.get("mqtt-esp32-kitchen") is None


def test_files_are_encrypted_private_and_atomic(store: SecretStore, tmp_path: Path) -> None:
    path = store.set("exchange.binance", VALUE)
    directory = secrets_dir(tmp_path)
    assert path == directory / "exchange.binance.enc"
    assert directory.stat().st_mode & 0o777 == 0o700 and path.stat().st_mode & 0o777 == 0o600
    assert VALUE.encode() not in path.read_bytes()
    assert {p.name for p in directory.iterdir()} == {"exchange.binance.enc", ".lock"}  # no temps
    assert keyring_path(tmp_path).stat().st_mode & 0o777 == 0o600


def test_swapped_files_do_not_decrypt(store: SecretStore) -> None:
    a, b = store.set("a", "value-of-a"), store.set("b", "value-of-b")
    blob_a, blob_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(blob_b)
    b.write_bytes(blob_a)
    with pytest.raises(DecryptionError, match="^secret a: authentication failed") as caught:
        store.get("a")
    assert "value-of" not in str(caught.value)


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../etc/passwd", "x" * 129, "sp ace",
                                  "tab\t", "secret.enc", "é"])
def test_bad_names_are_refused_clearly(store: SecretStore, tmp_path: Path, name: str) -> None:
    with pytest.raises(ValidationFailed, match="invalid secret name"):
        store.set(name, "v")
    with pytest.raises(ValidationFailed, match="invalid secret name"):
        read_secret(name, tmp_path)
    assert not (tmp_path / "etc").exists()


def test_good_names(store: SecretStore) -> None:
    for name in ("a", "A.b-c_9", "x" * 128, "_x", "-x", "broker-admin"):
        store.set(name, "v")
        assert store.get(name) == "v"


def test_empty_values_are_refused(store: SecretStore) -> None:
    with pytest.raises(ValidationFailed, match="non-empty"):
        store.set("a", "")


def test_credentials_directory_wins_over_the_store(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    write_secret("broker-admin", "from-store", tmp_path)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "broker-admin").write_text("from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert read_secret("broker-admin", tmp_path) == "from-systemd"
    assert ensure_secret("broker-admin", tmp_path) == "from-systemd"
    assert read_secret("mqtt-panel", tmp_path) is None  # neither has it
    write_secret("mqtt-panel", "only-in-store", tmp_path)
    assert read_secret("mqtt-panel", tmp_path) == "only-in-store"


def test_reading_a_missing_secret_creates_no_keyring(tmp_path: Path) -> None:
    assert read_secret("nothing", tmp_path) is None
    assert not keyring_path(tmp_path).exists()


def test_legacy_plaintext_is_encrypted_on_first_read(tmp_path: Path) -> None:
    directory = secrets_dir(tmp_path)
    directory.mkdir(mode=0o755)
    (directory / "broker-admin").write_text("old-admin-pw\n")
    (directory / "mqtt-panel").write_text("old-panel-pw")
    assert read_secret("broker-admin", tmp_path) == "old-admin-pw"
    assert not (directory / "broker-admin").exists()
    blob = (directory / "broker-admin.enc").read_bytes()
    assert b"old-admin-pw" not in blob and directory.stat().st_mode & 0o777 == 0o700
    store = SecretStore.open(tmp_path)
    assert store.names() == ["broker-admin", "mqtt-panel"]  # listing migrates the rest
    assert not (directory / "mqtt-panel").exists() and store.get("mqtt-panel") == "old-panel-pw"
    assert sorted(p.name for p in directory.iterdir()) == [".lock", "broker-admin.enc",
                                                          "mqtt-panel.enc"]


def test_a_stale_plaintext_beside_its_encrypted_file_is_removed(store: SecretStore) -> None:
    store.set("a", "current")
    (store.directory / "a").write_text("stale")
    assert store.get("a") == "current" and not (store.directory / "a").exists()


def test_ensure_secret_is_idempotent(tmp_path: Path) -> None:
    first = ensure_secret("mqtt-panel", tmp_path)
    assert len(first) >= 32 and ensure_secret("mqtt-panel", tmp_path) == first
    assert read_secret("mqtt-panel", tmp_path) == first


_ENSURE = """
import sys
from pathlib import Path
from appliance.security.secrets import ensure_secret
print(ensure_secret("broker-admin", Path(sys.argv[1])))
"""


def test_processes_racing_to_ensure_a_secret_all_get_the_stored_one(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _ENSURE, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True) for _ in range(6)]
    values = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(values) == 1 and values == {read_secret("broker-admin", tmp_path)}


def test_reencrypt_moves_every_secret_to_the_current_key(store: SecretStore, tmp_path: Path) -> None:
    for n in range(3):
        store.set(f"old-{n}", f"value-{n}")
    first = store.keyring.current_id
    second = store.keyring.rotate()
    store.set("new", "value-new")
    assert store.key_ids() == {"old-0": first, "old-1": first, "old-2": first, "new": second}
    assert store.get("old-1") == "value-1"  # rotation alone keeps old secrets readable
    assert store.reencrypt() == 3
    assert set(store.key_ids().values()) == {second}
    assert store.reencrypt() == 0
    fresh = SecretStore.open(tmp_path)
    assert [fresh.get(n) for n in ("old-0", "old-1", "old-2", "new")] == [
        "value-0", "value-1", "value-2", "value-new"]


def test_a_secret_under_a_lost_key_is_a_clear_error(store: SecretStore, tmp_path: Path) -> None:
    store.set("a", VALUE)
    keyring_path(tmp_path).unlink()
    fresh = SecretStore.open(tmp_path)  # a new keyring, made afresh
    with pytest.raises(DecryptionError, match="^secret a: unknown key id k[0-9a-f]{8} "
                                              r"\(was the keyring replaced\?\)$"):
        fresh.get("a")


def test_audit_records_names_never_values(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    audit = AuditLog(open_ledger(CoreSettings(state_dir=tmp_path)))
    store = SecretStore(tmp_path, Keyring.load_or_create(tmp_path), audit)
    store.set("exchange.kraken", VALUE, actor="cli:alice")
    assert store.get("exchange.kraken", actor="cli:alice") == VALUE
    assert store.get("nope", actor="cli:alice") is None
    store.set("quiet", "x")  # no actor: a service's own bookkeeping, not a person's action
    store.delete("exchange.kraken", actor="cli:bob")
    ensure_secret("broker-admin", tmp_path)
    seen = [(e.action, e.actor, e.target, e.outcome) for e in audit.events()]
    assert seen == [(SECRET_WRITE, "cli:alice", "exchange.kraken", "ok"),
                    (SECRET_READ, "cli:alice", "exchange.kraken", "ok"),
                    (SECRET_READ, "cli:alice", "nope", "missing"),
                    (SECRET_DELETE, "cli:bob", "exchange.kraken", "ok")]
    records = "".join(str(r["data"]) for r in audit.ledger.records("audit"))
    assert VALUE not in records
    admin = read_secret("broker-admin", tmp_path)
    assert admin and VALUE not in caplog.text and admin not in caplog.text
    # And a secret this process has read cannot reach its log lines even by mistake.
    slip = logging.LogRecord("circles", logging.ERROR, __file__, 1, "oops %s %s",
                             (VALUE, admin), None)
    line = JsonFormatter().format(slip)
    assert VALUE not in line and admin not in line and "oops *** ***" in line


def test_a_secret_this_process_creates_cannot_reach_its_log_lines(tmp_path: Path) -> None:
    created = ensure_secret("made-here", tmp_path)  # new and random: never read back
    given = "typed-in-by-hand-5e1f0c"
    SecretStore.open(tmp_path).set("set-here", given)
    slip = logging.LogRecord("circles", logging.ERROR, __file__, 1, "oops %s %s",
                             (created, given), None)
    line = JsonFormatter().format(slip)
    assert created not in line and given not in line and "oops *** ***" in line


def test_reprs_and_errors_carry_no_value(store: SecretStore, tmp_path: Path) -> None:
    store.set("a", VALUE)
    shown = [repr(store), str(store), repr(store.keyring)]
    store.path("a").write_bytes(store.path("a").read_bytes()[:-1])
    with pytest.raises(DecryptionError) as caught:
        store.get("a")
    shown.append(str(caught.value))
    with pytest.raises(ValidationFailed) as bad:
        store.set("bad/name", VALUE)
    shown.append(str(bad.value))
    assert all(VALUE not in text for text in shown)
    assert "SecretStore" in shown[0] and "secret a:" in shown[3]


# -- the command line -------------------------------------------------------------------------
def test_cli_secrets_and_keys_end_to_end(tmp_path: Path) -> None:
    env = circles_env(tmp_path)

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = circles(env, *args, stdin=stdin)
        assert VALUE not in done.stderr
        return done

    done = run("secrets", "set", "exchange.binance", stdin=VALUE + "\n")
    assert done.returncode == 0, done.stderr
    assert VALUE not in done.stdout
    done = run("secrets", "get", "exchange.binance")
    assert done.returncode == 0 and done.stdout == VALUE + "\n"
    assert run("secrets", "set", "mqtt-esp32-hall", stdin="pw").returncode == 0
    assert run("secrets", "list").stdout.split() == ["exchange.binance", "mqtt-esp32-hall"]

    first = Keyring.load_or_create(tmp_path).current_id
    assert run("keys", "list").stdout.split() == [first, "created", Keyring.load_or_create(
        tmp_path).info(first).created, "current", "2", "secrets"]
    done = run("keys", "rotate")
    second = Keyring.load_or_create(tmp_path).current_id
    assert done.returncode == 0 and second != first and f"new current key {second}" in done.stdout
    listing = run("keys", "list").stdout.splitlines()
    assert listing[0].startswith(first) and listing[0].endswith(" 2 secrets")
    assert listing[1].startswith(second) and "current" in listing[1] and listing[1].endswith(" 0 secrets")
    done = run("keys", "reencrypt")
    assert done.returncode == 0 and done.stdout.startswith("2 of 2 secrets re-wrapped")
    assert set(SecretStore.open(tmp_path).key_ids().values()) == {second}
    assert run("secrets", "get", "exchange.binance").stdout == VALUE + "\n"

    assert run("secrets", "delete", "mqtt-esp32-hall").returncode == 0
    missing = run("secrets", "get", "mqtt-esp32-hall")
    assert missing.returncode == 1 and missing.stderr == "error: no secret mqtt-esp32-hall\n"
    empty = run("secrets", "set", "blank", stdin="")
    assert empty.returncode == 1 and "nothing changed" in empty.stderr
    bad = run("secrets", "set", "../x", stdin="v")
    assert bad.returncode == 1 and "invalid secret name" in bad.stderr

    audit = AuditLog(open_ledger(CoreSettings(state_dir=tmp_path)))
    seen = [(e.action, e.target, e.actor.startswith("cli:")) for e in audit.events()]
    assert seen == [(SECRET_WRITE, "exchange.binance", True),
                    (SECRET_READ, "exchange.binance", True),
                    (SECRET_WRITE, "mqtt-esp32-hall", True),
                    (KEY_ROTATE, second, True),
                    (KEY_REENCRYPT, second, True),
                    (SECRET_READ, "exchange.binance", True),
                    (SECRET_DELETE, "mqtt-esp32-hall", True),
                    (SECRET_READ, "mqtt-esp32-hall", True)]
    assert VALUE not in "".join(str(r["data"]) for r in audit.ledger.records("audit"))


def test_cli_rotate_refuses_a_keyring_from_systemd(tmp_path: Path) -> None:
    Keyring.load_or_create(tmp_path / "provisioned")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "circles-keyring").write_bytes(keyring_path(tmp_path / "provisioned").read_bytes())
    done = circles(circles_env(tmp_path / "state", CREDENTIALS_DIRECTORY=str(credentials)),
                   "keys", "rotate")
    assert done.returncode == 1 and "read-only" in done.stderr and done.stderr.startswith("error: ")
