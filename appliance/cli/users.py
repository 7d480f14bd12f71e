"""`circles user …`: people who may log in to the panel."""

from __future__ import annotations

from typing import Any


def add_commands(sub: Any) -> None:
    pass
