from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from appliance.bus.broker import ADMIN_SECRET, BrokerFiles
from appliance.security.secrets import read_secret


def init(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "broker", "init", "--state",
                           str(state), *args], capture_output=True, text=True, check=True)


def test_init_writes_the_design_settings_and_is_idempotent(tmp_path: Path) -> None:
    first = init(tmp_path, "--port", "1999", "--lan-port", "1883")
    files = BrokerFiles.under(tmp_path)
    assert "wrote" in first.stdout
    conf = files.conf.read_text().splitlines()
    for line in ("allow_anonymous false", "persistence true", "autosave_interval 5",
                 "max_queued_messages 1000000", "max_inflight_messages 1000",
                 "listener 1999 127.0.0.1", "listener 1883",
                 f"plugin_opt_config_file {files.dynsec}"):
        assert line in conf, line
    assert any(line.startswith("plugin /") and line.endswith("dynamic_security.so") for line in conf)
    dynsec = json.loads(files.dynsec.read_text())
    assert [c["username"] for c in dynsec["clients"]] == ["broker-admin"]
    assert {r["rolename"] for r in dynsec["roles"]} >= {"broker-admin", "observer", "homeassistant"}
    assert dynsec["defaultACLAccess"]["publishClientSend"] is False
    assert files.dynsec.stat().st_mode & 0o777 == 0o600
    secret = tmp_path / "secrets" / f"{ADMIN_SECRET}.enc"
    assert secret.stat().st_mode & 0o777 == 0o600 and read_secret(ADMIN_SECRET, tmp_path)

    before = {p: p.stat().st_mtime_ns for p in (files.conf, files.dynsec, secret)}
    again = init(tmp_path, "--port", "1999", "--lan-port", "1883")
    assert again.stdout.strip() == "broker files unchanged"
    assert {p: p.stat().st_mtime_ns for p in before} == before

    changed = init(tmp_path, "--port", "2000")
    assert str(files.conf) in changed.stdout and str(files.dynsec) not in changed.stdout
