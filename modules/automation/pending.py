"""Timed actions waiting for their revert, kept in `<state_dir>/automation/pending.json`.

The file is rewritten whole (atomically) on every change, so a restart of the service, or
of the box, during a rule's `for` still sends the revert: the light turned on by motion is
turned off, late if the box was down when it was due.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ValidationError

from appliance.files import write_atomically
from modules.automation.settings import Action

log = logging.getLogger("circles.automation")


class Timed(Action):
    """A command sent by an automation whose revert (this topic and payload) is due at `due`."""

    name: str  # the rule or schedule that sent it
    due: AwareDatetime
    request_id: str | None = None  # of the firing, for the log


class PendingFile(BaseModel):
    version: Literal[1] = 1
    pending: list[Timed]


class PendingStore:
    """Loads and saves the timed actions; saves are serialised and leave the loop free."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    def load(self) -> dict[str, Timed]:
        """The saved actions by name; an unreadable file is reported and left for a person
        to look at (it is replaced at the next save)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.error("cannot read the pending timed actions", extra={"path": str(self.path),
                                                                      "error": str(exc)})
            return {}
        try:
            saved = PendingFile.model_validate_json(text)
        except ValidationError as exc:
            log.error("pending timed actions unreadable; none restored",
                      extra={"path": str(self.path), "error": str(exc).splitlines()[0]})
            return {}
        return {timed.name: timed for timed in saved.pending}

    async def save(self, pending: dict[str, Timed]) -> None:
        async with self._lock:
            # Read under the lock: the last save to finish writes the newest state.
            data = PendingFile(pending=list(pending.values())).model_dump_json(indent=1).encode()
            await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, lambda out: out.write(data))


def due_now(pending: dict[str, Timed], now: datetime) -> list[Timed]:
    """The actions whose revert is due at `now`, earliest first."""
    return sorted((t for t in pending.values() if t.due <= now), key=lambda t: t.due)
