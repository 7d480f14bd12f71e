#!/usr/bin/env bash
# The whole test suite, from a clean clone: installs what it needs, then runs pytest
# against a real Mosquitto started by the test session.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec .venv/bin/python -m pytest -ra "$@"
