"""ntfy (ntfy.sh or a self-hosted server): one JSON POST per note, with priority and tags."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from modules.notify.channels.base import Channel, ChannelSettings, Note, http_url

PRIORITY = {"info": 3, "warning": 4, "critical": 5}  # ntfy: 3 default, 4 high, 5 max
TAGS = {"info": "information_source", "warning": "warning", "critical": "rotating_light"}
KIND_TAGS = {"resolved": "white_check_mark", "summary": "hourglass", "digest": "bookmark_tabs",
             "test": "test_tube"}


class NtfySettings(ChannelSettings):
    kind: Literal["ntfy"]
    url: str = Field("https://ntfy.sh", description="the server")
    # On a public server the topic is all that keeps others from reading: pick a long one.
    topic: str = Field(pattern=r"^[-_A-Za-z0-9]{1,64}$")
    token_secret: str | None = Field(None, description="secret holding an access token (tk_…)")
    tags: list[str] = Field(default_factory=list, description="added to every note")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value)


class Ntfy(Channel):
    settings: NtfySettings

    def send(self, note: Note) -> None:
        config = self.settings
        headers = {}
        if config.token_secret:
            headers["Authorization"] = f"Bearer {self.secret(config.token_secret)}"
        tags = [KIND_TAGS.get(note.kind, TAGS[note.severity]), *config.tags]
        # The JSON form (POST to the root) carries any title; a header would need RFC 2047.
        self.post_json(config.url + "/", {
            "topic": config.topic, "title": note.title, "message": note.body,
            "priority": PRIORITY[note.severity], "tags": tags,
        }, what=f"ntfy {urlsplit(config.url).netloc}", headers=headers, ca_file=config.ca_file)
