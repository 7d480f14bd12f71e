"""The Ansible playbook, run for real into a fresh Debian root (debootstrap, minbase) through
Ansible's chroot connection, then the result inspected from outside and inside that root.

Needs root, debootstrap and the Debian mirror apt uses (the README's test command installs
debootstrap); about three minutes. MinIO's binary cannot be fetched here, so its role runs
with `minio_enable: false`; its unit is scored in tests/test_systemd_units.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.bus import BrokerAddress, MqttBus
from appliance.errors import AuthError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and chroot need root"),
    pytest.mark.skipif(shutil.which("debootstrap") is None,
                       reason="debootstrap is not installed (scripts/setup.sh dev installs it)"),
]

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "deploy" / "ansible"
BIN = Path(sys.executable).parent
OUTPUT = REPO / "test-output" / "provision"


def _mirror() -> str:
    """The Debian mirror this machine's apt uses (the only one reachable on a closed network)."""
    if os.environ.get("CIRCLES_TEST_DEBIAN_MIRROR"):
        return os.environ["CIRCLES_TEST_DEBIAN_MIRROR"]
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        text = path.read_text() if path.is_file() else ""
        found = re.search(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?\s", text, re.M)
        if found:
            return found.group(1)
    return "http://deb.debian.org/debian"


def _run(cmd: list[str], log: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if log:
        log.write_text(f"$ {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    return done


def project_version() -> str:
    found = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert found
    return found.group(1)


def wheelhouse(repo: Path, out: Path, *args: str) -> str:
    """deploy/wheelhouse.sh of `repo` into `out`; returns the release name."""
    done = _run([str(repo / "deploy" / "wheelhouse.sh"), "--out", str(out), *args],
                env={**os.environ, "PIP": str(BIN / "pip")})
    assert done.returncode == 0, done.stderr[-3000:]
    return (out / "release.txt").read_text().strip()


@dataclass
class Box:
    root: Path
    work: Path
    first: str  # the first release installed
    runs: list[str]  # the output of each playbook run

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def chroot(self, *cmd: str, stdin: str | None = None, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
        clean = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "LANG": "C.UTF-8", **(env or {})}
        return subprocess.run(["chroot", str(self.root), *cmd], input=stdin, capture_output=True,
                              text=True, env=clean, timeout=120)

    def uid(self, name: str) -> int:
        return self._id("passwd", name)

    def gid(self, name: str) -> int:
        return self._id("group", name)

    def _id(self, table: str, name: str) -> int:
        for line in self.path(f"/etc/{table}").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2])
        raise AssertionError(f"no {name} in the box's /etc/{table}")

    def playbook(self, wheels: Path, name: str, extra: str = "minio_enable: false\n") -> str:
        config = self.work / "config.yml"
        config.write_text(f"circles_wheelhouse: {wheels}\nbase_extra_names: ['IP:127.0.0.1']\n{extra}")
        inventory = self.work / "inventory.ini"
        inventory.write_text(f"[circles]\n{self.root} ansible_connection=community.general.chroot "
                             "ansible_python_interpreter=/usr/bin/python3\n")
        env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
               "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
               "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_LOCAL_TEMP": str(self.work / "ansible-tmp")}
        done = _run([str(BIN / "ansible-playbook"), "-i", str(inventory), "site.yml",
                     "-e", f"@{config}"], OUTPUT / f"{name}.log", cwd=ANSIBLE, env=env, timeout=1200)
        assert done.returncode == 0, f"playbook {name} failed:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
        self.runs.append(done.stdout)
        return done.stdout


def recap(output: str) -> dict[str, int]:
    line = next(ln for ln in output.splitlines() if re.search(r"\sok=\d+", ln))
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    work = tmp_path_factory.mktemp("provision")
    root = work / "root"
    done = _run(["debootstrap", "--variant=minbase", "bookworm", str(root), _mirror()],
                OUTPUT / "debootstrap.log", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # Package scripts must not start daemons in the chroot (they would run on this machine).
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        first = wheelhouse(REPO, work / "wheels-1", "--arch", os.uname().machine)
        made = Box(root, work, first, [])
        made.playbook(work / "wheels-1", "first-run")
        yield made
    finally:
        # The root is 1-2 GB: removed once /proc is surely no longer mounted in it.
        subprocess.run(["umount", str(root / "proc")], check=False)
        if not os.path.ismount(root / "proc"):
            shutil.rmtree(root, ignore_errors=True)


def test_a_second_run_changes_nothing(box: Box) -> None:
    again = box.playbook(box.work / "wheels-1", "second-run")
    counts = recap(again)
    assert counts["changed"] == 0 and counts["failed"] == 0, again[-4000:]


def test_user_and_directories(box: Box) -> None:
    circles, mosquitto = box.uid("circles"), box.uid("mosquitto")
    entry = next(ln for ln in box.path("/etc/passwd").read_text().splitlines()
                 if ln.startswith("circles:"))
    assert entry.endswith(":/var/lib/circles:/usr/sbin/nologin")
    expected = {
        "/etc/circles": (0, box.gid("circles"), 0o751),
        "/etc/circles/circles.toml": (0, box.gid("circles"), 0o640),
        "/etc/circles/tls/ca.key": (0, 0, 0o600),
        "/etc/circles/tls/mqtt.key": (0, box.gid("mosquitto"), 0o640),
        "/etc/circles/tls/panel.key": (0, box.gid("circles"), 0o640),
        "/var/lib/circles": (circles, box.gid("circles"), 0o711),
        "/var/lib/circles/broker": (circles, box.gid("mosquitto"), 0o2770),
        "/var/lib/circles/broker/dynamic-security.json": (mosquitto, box.gid("mosquitto"), 0o600),
        "/var/lib/circles/broker/data": (mosquitto, box.gid("mosquitto"), 0o700),
        "/var/log/circles": (circles, box.gid("circles"), 0o750),
        "/root/circles-first-admin.txt": (0, 0, 0o600),
    }
    for inside, (uid, gid, mode) in expected.items():
        st = box.path(inside).lstat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode), inside
    # What the command line made while run as root belongs to the services' user.
    for made in ("/var/lib/circles/circles.db", "/var/lib/circles/secrets",
                 "/var/lib/circles/keys/keyring.json"):
        st = box.path(made).lstat()
        assert st.st_uid == circles and not st.st_mode & 0o077, made


def test_units_installed_and_enabled(box: Box) -> None:
    system = box.path("/etc/systemd/system")
    services = box.chroot("circles", "services").stdout.split()
    assert "trade-logger" in services and "panel" in services
    for name in services:
        link = system / "circles.target.wants" / f"circles@{name}.service"
        assert link.is_symlink(), name
    assert (system / "multi-user.target.wants" / "circles.target").is_symlink()
    assert (system / "multi-user.target.wants" / "mosquitto.service").is_symlink()
    assert (system / "circles.target.wants" / "circles-broker-sync.service").is_symlink()
    assert (system / "sysinit.target.wants" / "systemd-time-wait-sync.service").is_symlink()
    assert (system / "circles@home-sensors.service.d" / "gpio.conf").is_file()
    assert (system / "mosquitto.service.d" / "circles.conf").is_file()
    assert "TimeoutStartSec=" in (system / "systemd-time-wait-sync.service.d/circles.conf").read_text()
    assert "Storage=persistent" in box.path("/etc/systemd/journald.conf.d/circles.conf").read_text()


def test_systemd_verifies_the_units_in_the_provisioned_root(box: Box) -> None:
    units = ["circles@trade-logger.service", "circles@home-sensors.service", "circles.target",
             "circles-broker-sync.service", "mosquitto.service"]
    done = _run(["systemd-analyze", "verify", "--recursive-errors=no", f"--root={box.root}",
                 *units], OUTPUT / "verify.log")
    assert done.returncode == 0, done.stderr
    # The check is real: a misspelt directive in the root fails it.
    broken = box.path("/etc/systemd/system/circles@broken-test.service")
    broken.write_text(box.path("/etc/systemd/system/circles@.service").read_text()
                      .replace("NoNewPrivileges=", "NoNewPrivilege=", 1))
    try:
        bad = _run(["systemd-analyze", "verify", "--recursive-errors=no", f"--root={box.root}",
                    "circles@broken-test.service"])
        assert "NoNewPrivilege" in bad.stderr
    finally:
        broken.unlink()


def test_nftables_rules_load_in_check_mode(box: Box) -> None:
    done = box.chroot("nft", "-c", "-f", "/etc/nftables.conf")
    assert done.returncode == 0, done.stderr
    rules = box.path("/etc/nftables.conf").read_text()
    assert "policy drop" in rules and "@lan4" in rules


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"the box's mosquitto did not listen on {port}")


async def test_the_boxs_broker_takes_a_new_device_and_refuses_anonymous(box: Box) -> None:
    """The box's own Mosquitto (its binary, its user, the generated config and file modes),
    moved to free ports, with a device made by `circles device add` inside the box."""
    conf = box.path("/var/lib/circles/broker/mosquitto.conf").read_text()
    ports = {int(p): _free_port() for p in re.findall(r"^listener (\d+)", conf, re.M)}
    assert set(ports) == {1884, 1883, 8883}
    moved = re.sub(r"^listener (\d+)", lambda m: f"listener {ports[int(m.group(1))]}", conf, flags=re.M)
    box.path("/tmp/mosquitto-test.conf").write_text(moved)
    proc = subprocess.Popen(["chroot", str(box.root), "/usr/sbin/mosquitto", "-c",
                             "/tmp/mosquitto-test.conf"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_port(ports[1883], proc)
        added = box.chroot("circles", "device", "add", "hall-node", "--kind", "esp32",
                           env={"CIRCLES_BUS__PORT": str(ports[1884])})
        assert added.returncode == 0, added.stderr
        password = re.search(r"^password: (\S+)$", added.stdout, re.M)
        assert password
        device = MqttBus("hall-node", BrokerAddress("127.0.0.1", ports[1883], "hall-node",
                                                    password.group(1)), status=False, persistent=False)
        await device.connect(timeout=10)
        await device.close()
        ca = box.path("/etc/circles/tls/ca.crt")
        over_tls = MqttBus("hall-node", BrokerAddress("localhost", ports[8883], "hall-node",
                                                      password.group(1), True, ca),
                           status=False, persistent=False)
        await over_tls.connect(timeout=10)
        await over_tls.close()
        synced = box.chroot("circles", "broker", "sync", env={"CIRCLES_BUS__PORT": str(ports[1884])})
        assert synced.returncode == 0 and "trade-logger" in synced.stdout, synced.stdout + synced.stderr
        anonymous = MqttBus("anon", BrokerAddress("127.0.0.1", ports[1883]), status=False,
                            persistent=False)
        with pytest.raises(AuthError):
            await anonymous.connect(timeout=5)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        box.path("/tmp/mosquitto-test.conf").unlink()


def test_the_first_admin_logs_in_through_the_cli(box: Box) -> None:
    note = box.path("/root/circles-first-admin.txt").read_text()
    password = re.search(r"^password: (\S+)$", note, re.M)
    assert password and "admin" in note
    assert password.group(1) not in "".join(box.runs)  # never in the playbook's output
    ok = box.chroot("circles", "user", "login", "admin", stdin=password.group(1) + "\n")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = box.chroot("circles", "user", "login", "admin", stdin="not-the-password\n")
    assert wrong.returncode == 1


NEWER_MIGRATION = '''"""A migration only the newer release has.

Revision ID: 9001
Revises: {head}
"""

import sqlalchemy as sa
from alembic import op

revision = "9001"
down_revision = "{head}"


def upgrade() -> None:
    op.create_table("upgrade_probe", sa.Column("id", sa.Integer, primary_key=True))


def downgrade() -> None:
    op.drop_table("upgrade_probe")
'''


def test_upgrade_migrates_keeps_the_previous_release_and_rollback_goes_both_ways(box: Box) -> None:
    # A newer version of the project: the same tree with another version and one migration more.
    tree = box.work / "newer"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in filter(lambda name: (REPO / name).is_file(), files):  # not what was deleted
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tree / name)
    pyproject = tree / "pyproject.toml"
    pyproject.write_text(re.sub(r'^version = "[^"]+"', 'version = "99.0.0"',
                                pyproject.read_text(), count=1, flags=re.M))
    old_head = box.chroot("circles", "db", "heads").stdout.strip()
    (tree / "appliance/migrations/versions/9001_probe.py").write_text(
        NEWER_MIGRATION.format(head=old_head))
    newer = wheelhouse(tree, box.work / "wheels-2", "--arch", os.uname().machine)
    assert newer.startswith("99.0.0-")
    # MinIO's binary cannot be fetched here: a stand-in, with its checksum, takes its place.
    minio = box.work / "minio"
    minio.write_text("#!/bin/sh\necho stand-in for the MinIO server\n")
    digest = hashlib.sha256(minio.read_bytes()).hexdigest()
    output = box.playbook(box.work / "wheels-2", "upgrade",
                          f"minio_binary_path: {minio}\nminio_binary_sha256: {digest.upper()}\n")
    assert "Upgrade the database" in output
    home = box.path("/opt/circles")

    def releases() -> tuple[str, str]:
        return os.readlink(home / "current"), os.readlink(home / "previous")

    def running() -> tuple[str, str]:
        version = re.search(r"^Version: (\S+)", box.chroot(
            "/opt/circles/current/bin/pip", "show", "circles").stdout, re.M)
        assert version
        return version.group(1), box.chroot("circles", "db", "current").stdout.strip()

    assert releases() == (f"/opt/circles/releases/{newer}", f"/opt/circles/releases/{box.first}")
    assert running() == ("99.0.0", "9001")

    env_file = box.path("/etc/circles/minio.env")
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600 and env_file.stat().st_uid == 0
    password = box.chroot("circles", "secrets", "get", "minio-root-password").stdout.strip()
    assert len(password) == 40 and f"MINIO_ROOT_PASSWORD={password}\n" in env_file.read_text()
    assert password not in output
    assert box.path("/usr/local/bin/minio").read_bytes() == minio.read_bytes()
    assert (box.path("/etc/systemd/system/multi-user.target.wants/minio.service")).is_symlink()

    back = box.chroot("circles-rollback")
    assert back.returncode == 0, back.stderr
    assert releases() == (f"/opt/circles/releases/{box.first}", f"/opt/circles/releases/{newer}")
    assert running() == (project_version(), old_head)
    assert box.chroot("circles", "user", "list").returncode == 0

    forward = box.chroot("circles-rollback")
    assert forward.returncode == 0, forward.stderr
    assert releases() == (f"/opt/circles/releases/{newer}", f"/opt/circles/releases/{box.first}")
    assert running() == ("99.0.0", "9001")


def test_wheelhouse_for_a_raspberry_pi(tmp_path: Path) -> None:
    """Download only: the wheels a 64-bit Pi installs from, its GPIO driver included."""
    release = wheelhouse(REPO, tmp_path / "pi", "--arch", "aarch64", "--extras", "pi")
    wheels = [p.name for p in (tmp_path / "pi").glob("*.whl")]
    assert any(w.startswith("circles-") for w in wheels)
    assert any(w.startswith("lgpio-") and "aarch64" in w for w in wheels)
    assert any(w.startswith("numpy-") and "aarch64" in w for w in wheels)
    assert not [w for w in wheels if "x86_64" in w]
    assert (tmp_path / "pi" / "target.txt").read_text().split()[:2] == ["aarch64", "3.11"]
    assert release.startswith(project_version() + "-")
    # The same code gives the same release (no new environment on the box for a rebuild).
    assert wheelhouse(REPO, tmp_path / "again", "--arch", "aarch64", "--extras", "pi") == release


def test_playbook_syntax_and_lint() -> None:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "NO_COLOR": "1",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    syntax = _run([str(BIN / "ansible-playbook"), "-i", "inventory.example.ini", "site.yml",
                   "--syntax-check"], cwd=ANSIBLE, env=env)
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    lint = _run([str(BIN / "ansible-lint"), "--nocolor", "--offline"], OUTPUT / "ansible-lint.log",
                cwd=ANSIBLE, env=env, timeout=600)
    assert lint.returncode == 0, lint.stdout[-4000:] + lint.stderr[-4000:]
    assert "0 failure(s), 0 warning(s)" in lint.stderr + lint.stdout
