"""`circles up` end to end: a private broker and every service, then Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from appliance.config import CoreSettings
from appliance.security.login import Outcome
from appliance.security.users import Users, first_start


def test_circles_up_runs_the_appliance_and_stops_cleanly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCLES_")}
    env["CIRCLES_HEALTH__INTERVAL_S"] = "0.5"
    up = subprocess.Popen([sys.executable, "-m", "appliance.cli", "up", "--state",
                           str(tmp_path / "state")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert up.stdout
    lines: list[str] = []
    sub_line = ""
    while not sub_line:
        line = up.stdout.readline()
        assert line, "circles up exited early:\n" + "".join(lines)
        lines.append(line)
        if line.strip().startswith("mosquitto_sub"):
            sub_line = line.strip()
    # The first start creates the first admin and shows its password, once.
    (first_admin,) = [line for line in lines if line.startswith("first admin: ")]
    match = re.fullmatch(r"first admin: admin / (\S+) — shown once, change it at first login\n",
                         first_admin)
    assert match, first_admin
    children: list[psutil.Process] = []
    try:
        # The printed line works as printed: status online, and the state updating. The line
        # comes as the services start, so on a busy machine the first watch may be early.
        deadline = time.monotonic() + 30
        while True:
            watch = subprocess.run(shlex.split(sub_line) + ["-W", "4"], capture_output=True,
                                   text=True)
            seen = watch.stdout.splitlines()
            states = [line for line in seen if line.startswith("circles/health/state ")]
            if "circles/health/status online" in seen and len(set(states)) >= 2 \
                    or time.monotonic() > deadline:
                break
        assert "circles/health/status online" in seen, seen
        assert len(set(states)) >= 2, seen
        # Without the observer's credentials the broker refuses.
        anonymous = re.sub(r"-u \S+ -P '[^']*' ", "", sub_line)
        refused = subprocess.run(shlex.split(anonymous) + ["-W", "1", "-C", "1"],
                                 capture_output=True, text=True)
        assert refused.returncode != 0
        log_path = tmp_path / "state" / "logs" / "health.jsonl"
        ready = [line for line in log_path.read_text().splitlines()
                 if json.loads(line)["message"] == "service ready"]
        assert len(ready) == 1

        # A crashed service is restarted.
        (health,) = [p for p in psutil.Process(up.pid).children(recursive=True)
                     if p.cmdline()[-2:] == ["run", "health"]]
        health.kill()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ready = [line for line in log_path.read_text().splitlines()
                     if json.loads(line)["message"] == "service ready"]
            if len(ready) == 2:
                break
            time.sleep(0.2)
        assert len(ready) == 2, "health was not restarted"
    finally:
        children = psutil.Process(up.pid).children(recursive=True)
        os.kill(up.pid, signal.SIGINT)
        up.wait(20)
    assert up.returncode == 0
    time.sleep(0.2)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    # A second start with the same state shows no password; the one shown first still works.
    again = subprocess.Popen([sys.executable, "-m", "appliance.cli", "up", "--state",
                              str(tmp_path / "state"), "--only", "health"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    assert again.stdout
    banner: list[str] = []
    try:
        # Until the service is ready: Ctrl-C is the supervisor's to handle only from then on.
        while not banner or "service ready" not in banner[-1]:
            line = again.stdout.readline()
            assert line, "the second circles up exited early:\n" + "".join(banner)
            banner.append(line)
    finally:
        os.kill(again.pid, signal.SIGINT)
        try:
            again.wait(20)
        except subprocess.TimeoutExpired:
            stuck = psutil.Process(again.pid)
            for process in [*stuck.children(recursive=True), stuck]:
                process.kill()
            raise
    assert banner[0].startswith("Circles is up") and not [b for b in banner if "first admin" in b]
    settings = CoreSettings(state_dir=tmp_path / "state")
    assert first_start(settings) is None
    users = Users.open(settings)
    assert [u.username for u in users.list_users()] == ["admin"]
    assert users.authenticate("admin", match[1]).outcome is Outcome.MUST_CHANGE_PASSWORD
