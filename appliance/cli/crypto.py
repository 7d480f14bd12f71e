"""`circles keys …` and `circles secrets …`: the keyring and the encrypted secret store."""

from __future__ import annotations

from typing import Any


def add_commands(sub: Any) -> None:
    pass
