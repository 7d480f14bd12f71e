"""Telegram: the Bot API's `sendMessage` to one chat. The bot token is part of the URL, so
the URL is never logged or put in an error."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from modules.notify.channels.base import Channel, ChannelSettings, Note, http_url

MAX_TEXT = 4096  # Telegram's limit for one message
ICON = {"info": "ℹ️", "warning": "⚠️", "critical": "🚨"}
KIND_ICON = {"resolved": "✅", "test": "🧪"}


class TelegramSettings(ChannelSettings):
    kind: Literal["telegram"]
    chat_id: str = Field(min_length=1, max_length=64, description="a chat's id, or @channelname")
    token_secret: str = Field("telegram-bot-token", description="secret holding the bot token")
    api_url: str = "https://api.telegram.org"

    @field_validator("chat_id", mode="before")
    @classmethod
    def _text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value)


class Telegram(Channel):
    settings: TelegramSettings

    def send(self, note: Note) -> None:
        config = self.settings
        token = self.secret(config.token_secret)
        icon = KIND_ICON.get(note.kind, ICON[note.severity])
        text = f"{icon} {note.title}\n{note.body}\n— {note.source}"
        answer = self.post_json(f"{config.api_url}/bot{token}/sendMessage", {
            "chat_id": config.chat_id, "text": text[:MAX_TEXT],
            "disable_notification": note.severity == "info",  # silent on the phone
        }, what="telegram sendMessage", ca_file=config.ca_file)
        if answer.get("ok") is not True:
            raise self.error(f"telegram sendMessage: not accepted: "
                             f"{str(answer.get('description', 'no reason given'))[:200]}")
