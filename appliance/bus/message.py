"""What travels on the bus: a message as received, and one matched to its registry spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.bus.topics import TopicSpec


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    request_id: str | None = None
    sender: str | None = None
    sent_at: str | None = None
    response_topic: str | None = None
    correlation: bytes | None = None
    # The transport's handle for acknowledging this message; None when there is nothing to ack.
    token: Any = None

    @property
    def text(self) -> str:
        return self.payload.decode(errors="replace")


@dataclass(frozen=True, slots=True)
class Received:
    """A message matched to the spec whose filter it arrived on, with its payload validated."""

    message: Message
    spec: TopicSpec
    params: dict[str, str]
    data: Any

    @property
    def topic(self) -> str:
        return self.message.topic
