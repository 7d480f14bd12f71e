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
    children: list[psutil.Process] = []
    try:
        # The printed line works as printed: status online, and the state updating.
        watch = subprocess.run(shlex.split(sub_line) + ["-W", "4"], capture_output=True, text=True)
        seen = watch.stdout.splitlines()
        assert "circles/health/status online" in seen, seen
        states = [line for line in seen if line.startswith("circles/health/state ")]
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
