"""`circles audit …` and `circles device …`: the audit log and devices in the broker."""

from __future__ import annotations

from typing import Any


def add_commands(sub: Any) -> None:
    pass
