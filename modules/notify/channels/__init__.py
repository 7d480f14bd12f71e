"""The channels alerts go out on, one file each behind `base.Channel`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from modules.notify.channels.base import Channel, ChannelError, Note
from modules.notify.channels.email import Email, EmailSettings
from modules.notify.channels.ntfy import Ntfy, NtfySettings
from modules.notify.channels.telegram import Telegram, TelegramSettings

ChannelConfig = Annotated[NtfySettings | TelegramSettings | EmailSettings, Field(discriminator="kind")]
_CLASSES: dict[str, type[Channel]] = {"ntfy": Ntfy, "telegram": Telegram, "email": Email}

__all__ = ["Channel", "ChannelConfig", "ChannelError", "Note", "build"]


def build(name: str, settings: NtfySettings | TelegramSettings | EmailSettings,
          state_dir: Path) -> Channel:
    return _CLASSES[settings.kind](name, settings, state_dir)
