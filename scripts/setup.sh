#!/usr/bin/env bash
# Installs what Circles needs on a Debian machine, safe to run again:
# Debian packages (Mosquitto, Python venv), a virtual environment in .venv, the project.
# Usage: scripts/setup.sh [dev]   ("dev" adds the test tools, and PostgreSQL for the tests)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(mosquitto mosquitto-clients python3-venv)
# The tests start a private PostgreSQL cluster with Debian's server binaries, drive Debian's
# Chromium (the panel's browser tests; Playwright downloads no browser), score and verify the
# systemd units, and run the Ansible playbook into a Debian root made by debootstrap.
[ "${1:-}" = "dev" ] && packages+=(postgresql chromium systemd debootstrap)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    # The appliance starts its own broker; the distribution's default instance is not used.
    if command -v systemctl >/dev/null && systemctl is-active --quiet mosquitto 2>/dev/null; then
        $sudo systemctl disable --now mosquitto >/dev/null 2>&1 || true
    fi
    # Nor is the distribution's default PostgreSQL cluster: the tests start their own.
    if [[ " ${missing[*]} " == *" postgresql "* ]]; then
        if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
            $sudo systemctl disable --now postgresql >/dev/null 2>&1 || true
        elif [ -x /etc/init.d/postgresql ]; then
            $sudo /etc/init.d/postgresql stop >/dev/null 2>&1 || true
        fi
    fi
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
