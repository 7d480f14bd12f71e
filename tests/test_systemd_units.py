"""The units in deploy/systemd: scored with `systemd-analyze security --offline=yes`, checked
with `systemd-analyze verify` in a throwaway root that holds them (and stand-ins for the
programs they start), and read for the settings the runtime relies on.

Scores: `pytest tests/test_systemd_units.py -s` prints them; each is also a recorded property.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.bus.broker import BrokerFiles
from appliance.config import CoreSettings
from appliance.errors import ConfigError
from appliance.runtime import STOP_TIMEOUT_S
from appliance.security.crypto import KEYRING_CREDENTIAL

pytestmark = pytest.mark.slow

UNITS = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
TEMPLATE = UNITS / "circles@.service"
DEBIAN_MOSQUITTO = Path("/lib/systemd/system/mosquitto.service")
# Programs the units start; verify needs each to exist and be executable.
PROGRAMS = ["/opt/circles/current/bin/circles", "/usr/sbin/mosquitto", "/usr/local/bin/minio",
            "/bin/mkdir", "/bin/chown", "/bin/kill"]
EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+)")

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (Debian package systemd)")


# -- reading unit files -----------------------------------------------------------------------
def settings(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; systemd allows a key many times, and an empty value
    resets the list, so this keeps every line (configparser would refuse the repeats)."""
    found, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a setting: {raw!r}"
        found.append((section, key.strip(), value.strip()))
    return found


def values(path: Path, section: str, key: str) -> list[str]:
    """The effective list of `key` in `section` of one file: what follows the last reset."""
    out: list[str] = []
    for sec, k, v in settings(path):
        if sec == section and k == key:
            out = [] if v == "" else [*out, v]
    return out


def one(path: Path, section: str, key: str) -> str:
    found = values(path, section, key)
    assert found, f"{path.name}: [{section}] {key}= is not set"
    return found[-1]


def seconds(span: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit or "s"]
    return total


# -- a throwaway root -------------------------------------------------------------------------
@dataclass
class Root:
    path: Path

    def add_units(self, *names: str) -> None:
        """Files or folders of deploy/systemd, copied to <root>/etc/systemd/system/."""
        system = self.path / "etc" / "systemd" / "system"
        for name in names:
            source, target = UNITS / name, system / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                shutil.copy(source, target)

    def add_vendor_unit(self, source: Path) -> None:
        target = self.path / "lib" / "systemd" / "system" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)

    def add_programs(self) -> None:
        for program in PROGRAMS:
            target = self.path / program.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("#!/bin/sh\nexit 0\n")
            target.chmod(0o755)

    def analyze(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemd-analyze", *args, f"--root={self.path}"],
                              capture_output=True, text=True, timeout=60)

    def exposure(self, unit: str) -> tuple[float, str]:
        done = self.analyze("security", "--offline=yes", unit)
        match = EXPOSURE.search(done.stdout)
        assert match, f"no exposure line for {unit}:\n{done.stdout}\n{done.stderr}"
        assert match.group(1) == unit
        return float(match.group(2)), done.stdout

    def verify(self, unit: str) -> subprocess.CompletedProcess[str]:
        return self.analyze("verify", "--recursive-errors=no", unit)


@pytest.fixture
def root(tmp_path: Path) -> Root:
    return Root(tmp_path / "root")


def report(record_property: pytest.RecordProperty, unit: str, score: float) -> None:
    print(f"\nexposure {unit}: {score}")
    record_property(f"exposure {unit}", score)


# -- what the runtime relies on (no systemd needed) -------------------------------------------
def test_template_runs_the_instance_with_the_settings_the_runtime_expects() -> None:
    # %i keeps trade-logger as it is; %I would unescape it to trade/logger.
    assert values(TEMPLATE, "Service", "ExecStart") == ["/opt/circles/current/bin/circles run %i"]
    assert one(TEMPLATE, "Service", "Type") == "notify"
    assert one(TEMPLATE, "Service", "NotifyAccess") == "main"
    assert seconds(one(TEMPLATE, "Service", "WatchdogSec")) > 0
    assert str(ConfigError.exit_code) in one(TEMPLATE, "Service", "RestartPreventExitStatus").split()
    assert one(TEMPLATE, "Service", "Restart") == "on-failure"
    # Above the runtime's stop budget (STOP_TIMEOUT_S, then up to 2 s to close the bus).
    assert seconds(one(TEMPLATE, "Service", "TimeoutStopSec")) > STOP_TIMEOUT_S + 2
    assert one(TEMPLATE, "Service", "User") == one(TEMPLATE, "Service", "Group") == "circles"
    assert one(TEMPLATE, "Service", "UMask") == "0077"
    assert one(TEMPLATE, "Service", "StateDirectory") == "circles"
    assert one(TEMPLATE, "Service", "StateDirectoryMode") == "0711"
    assert CoreSettings.model_fields["state_dir"].default == Path("/var/lib/circles")
    assert one(TEMPLATE, "Install", "WantedBy") == "circles.target"


@pytest.mark.parametrize("unit", ["circles@.service", "circles-broker-sync.service"])
def test_the_keyring_credential_may_be_absent(unit: str) -> None:
    """Only the name-only form is optional on systemd 252: an absolute path fails the unit when
    the file is missing, and an empty SetCredential= fallback is refused."""
    loads = values(UNITS / unit, "Service", "LoadCredential")
    assert KEYRING_CREDENTIAL in loads, loads
    assert not any(v.startswith(f"{KEYRING_CREDENTIAL}:") for v in loads)


def test_mosquitto_runs_the_configuration_circles_writes() -> None:
    dropin = UNITS / "mosquitto.service.d" / "circles.conf"
    broker = BrokerFiles.under(CoreSettings.model_fields["state_dir"].default)
    # The reset line must come first, or systemd refuses a second ExecStart=.
    starts = [v for s, k, v in settings(dropin) if s == "Service" and k == "ExecStart"]
    assert starts == ["", f"/usr/sbin/mosquitto -c {broker.conf}"]
    writable = one(dropin, "Service", "ReadWritePaths").split()
    assert f"-{broker.root}" in writable


def test_journald_keeps_a_bounded_persistent_journal() -> None:
    conf = UNITS / "journald.conf.d" / "circles.conf"
    known = {"Storage", "Compress", "Seal", "SplitMode", "SyncIntervalSec", "RateLimitIntervalSec",
             "RateLimitBurst", "SystemMaxUse", "SystemKeepFree", "SystemMaxFileSize",
             "SystemMaxFiles", "RuntimeMaxUse", "RuntimeKeepFree", "RuntimeMaxFileSize",
             "RuntimeMaxFiles", "MaxFileSec", "MaxRetentionSec", "ForwardToSyslog",
             "ForwardToKMsg", "ForwardToConsole", "ForwardToWall", "MaxLevelStore"}
    found = settings(conf)
    assert {s for s, _, _ in found} == {"Journal"}
    assert {k for _, k, _ in found} <= known
    assert one(conf, "Journal", "Storage") == "persistent"
    assert one(conf, "Journal", "SystemMaxUse")
    assert seconds(one(conf, "Journal", "SyncIntervalSec")) > 5 * 60  # the default is 5 min


def test_the_readme_says_where_every_file_goes() -> None:
    readme = (UNITS / "README.md").read_text()
    files = [p.relative_to(UNITS).as_posix() for p in UNITS.rglob("*")
             if p.is_file() and p.name != "README.md"]
    assert files
    missing = [f for f in files if f"`{f}`" not in readme]
    assert not missing, missing


# -- exposure scores --------------------------------------------------------------------------
@needs_analyze
@pytest.mark.parametrize(("file", "unit"), [
    ("circles@.service", "circles@trade-logger.service"),
    ("circles-broker-sync.service", "circles-broker-sync.service"),
    ("minio.service", "minio.service"),
])
def test_exposure(root: Root, record_property: pytest.RecordProperty, file: str, unit: str) -> None:
    root.add_units(file)
    score, _ = root.exposure(unit)
    report(record_property, unit, score)
    assert score <= 2.5


@needs_analyze
@pytest.mark.parametrize(("instance", "dropin", "shows"), [
    ("home-sensors", "circles@home-sensors.service.d", "char-gpiochip:rw"),
    ("health", "circles@health.service.d", "adjtimex is allowed"),
    ("panel", "circles@panel.service.d", "PrivateUsers="),
])
def test_dropin_exposure(root: Root, record_property: pytest.RecordProperty, instance: str,
                         dropin: str, shows: str) -> None:
    unit = f"circles@{instance}.service"
    root.add_units("circles@.service")
    plain, _ = root.exposure(unit)
    root.add_units(dropin)
    score, text = root.exposure(unit)
    report(record_property, unit, score)
    # Scored with the drop-in: it opens something, and the analyser names it.
    assert shows in text
    assert plain < score <= 2.0


@needs_analyze
@pytest.mark.skipif(not DEBIAN_MOSQUITTO.is_file(),
                    reason=f"{DEBIAN_MOSQUITTO} is missing (Debian package mosquitto)")
def test_mosquitto_exposure(root: Root, record_property: pytest.RecordProperty) -> None:
    root.add_vendor_unit(DEBIAN_MOSQUITTO)
    debian, _ = root.exposure("mosquitto.service")
    root.add_units("mosquitto.service.d")
    score, _ = root.exposure("mosquitto.service")
    report(record_property, "mosquitto.service (Debian's)", debian)
    report(record_property, "mosquitto.service", score)
    assert score < debian
    assert score <= 2.5


# -- verify -----------------------------------------------------------------------------------
@needs_analyze
@pytest.mark.skipif(not DEBIAN_MOSQUITTO.is_file(),
                    reason=f"{DEBIAN_MOSQUITTO} is missing (Debian package mosquitto)")
@pytest.mark.parametrize("unit", ["circles@trade-logger.service", "circles@home-sensors.service",
                                  "circles@health.service", "circles@panel.service",
                                  "circles-broker-sync.service",
                                  "circles.target", "mosquitto.service", "minio.service"])
def test_verify(root: Root, unit: str) -> None:
    root.add_programs()
    root.add_vendor_unit(DEBIAN_MOSQUITTO)
    root.add_units(*[p.name for p in UNITS.iterdir()
                     if p.name not in ("README.md", "minio.env.example", "journald.conf.d")])
    done = root.verify(unit)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


@needs_analyze
@pytest.mark.parametrize(("file", "unit", "change", "complaint"), [
    ("circles@.service", "circles@trade-logger.service", ("UMask=", "UMsk="), "Unknown key"),
    ("circles@home-sensors.service.d/gpio.conf", "circles@home-sensors.service",
     ("DeviceAllow=/dev/i2c-1 rw", "DeviceAllow=/dev/i2c-1 rwx"), "Invalid device rights"),
    ("circles@.service", "circles@trade-logger.service", ("bin/circles run", "bin/circle run"),
     "not executable"),
])
def test_verify_fails_on_a_broken_unit(root: Root, file: str, unit: str, change: tuple[str, str],
                                       complaint: str) -> None:
    root.add_programs()
    root.add_units("circles@.service", "circles@home-sensors.service.d")
    target = root.path / "etc" / "systemd" / "system" / file
    text = target.read_text()
    assert change[0] in text
    target.write_text(text.replace(change[0], change[1], 1))
    done = root.verify(unit)
    assert done.returncode != 0 or done.stderr.strip(), "verify accepted a broken unit"
    assert complaint in done.stderr
