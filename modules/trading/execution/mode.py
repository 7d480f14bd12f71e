"""The account's trading mode chosen at run time (the `mode` command, from the panel), kept
across restarts in `<state>/execution/mode-<account>.json`.

The file is written atomically (a temporary file, fsync, rename) and wins over
`execution.mode` at the next start: a person who switched an account to paper from the
panel does not find it trading live again after a reboot, nor the other way round. Going
live this way needs no `execution.live_confirmed`: the panel asked the person for their
authenticator code and showed the warning, which is that confirmation. Deleting the file
gives the configuration back its say.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from appliance.bus.payloads import utcnow
from appliance.errors import OperationalError
from appliance.files import private_dir, write_atomically

Mode = Literal["paper", "live"]
MODES: tuple[Mode, ...] = ("paper", "live")


@dataclass(frozen=True)
class ChosenMode:
    mode: Mode
    by: str
    at: str


def mode_file(state_dir: Path, account: str) -> Path:
    """Where the chosen mode of `account` (its slug) is kept."""
    return state_dir / "execution" / f"mode-{account}.json"


def chosen_mode(state_dir: Path, account: str) -> ChosenMode | None:
    """The mode chosen at run time, or None when none was (the configuration decides).
    OperationalError for a file that is not one this module wrote: a guess could trade
    real money."""
    path = mode_file(state_dir, account)
    try:
        data = json.loads(path.read_text())
        mode = data["mode"]
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        return ChosenMode(cast(Mode, mode), str(data.get("by", "")), str(data.get("at", "")))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OperationalError(f"execution: cannot read {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise OperationalError(f"execution: {path} is not a chosen mode ({exc}); fix or "
                               "delete it (then execution.mode decides)") from None


def choose_mode(state_dir: Path, account: str, mode: Mode, by: str) -> ChosenMode:
    """Keep `mode` as the account's mode; durable when this returns."""
    chosen = ChosenMode(mode, by, utcnow())
    data = json.dumps({"mode": chosen.mode, "by": chosen.by, "at": chosen.at}).encode()
    path = mode_file(state_dir, account)
    private_dir(path.parent)
    write_atomically(path, lambda out: out.write(data))
    return chosen
