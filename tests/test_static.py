"""Static properties of the code: types and lint (mypy, ruff), and what a light service imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes_on_appliance() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_passes() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_bus_only_services_stay_light() -> None:
    """`circles run <service>` of a service that needs only the bus loads no database,
    cryptography or exchange library (each costs tens of MB in every such process)."""
    code = ("import sys; import appliance.cli as c; c.parser()\n"
            "import modules.health.service, modules.trading.market.service\n"
            "import modules.trading.alpha.service, modules.trading.ensemble.service\n"
            "import modules.trading.sizing.service, modules.automation.service\n"
            "import modules.home_sensors.service\n"
            "print(' '.join(m for m in ('sqlalchemy', 'cryptography', 'ccxt', 'pyarrow')"
            " if m in sys.modules))\n"
            "print(' '.join(m for m in ('gpiozero',) if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert loaded == []
