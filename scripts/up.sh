#!/usr/bin/env bash
# Runs the appliance on this machine: a private Mosquitto and every service,
# with simulated sources and paper trading. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/circles up "$@"
