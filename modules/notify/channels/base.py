"""What every channel shares: the note it sends, its common settings, the one error it
raises, and the JSON POST of the channels that are web APIs (ntfy, Telegram).

A channel's `send` blocks (the service runs it in a thread) and returns only once the
endpoint accepted the note. Anything else is a ChannelError whose text is safe to log and
to show: it never holds a secret, an auth header, or a URL with a token in it.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from appliance.config import Section
from appliance.errors import TemporaryError
from appliance.logging import redact
from appliance.security.secrets import read_secret

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")
Kind = Literal["alert", "summary", "resolved", "digest", "test"]
MAX_ERROR_DETAIL = 200


def rank(severity: Severity) -> int:
    return SEVERITIES.index(severity)


@dataclass(frozen=True)
class Note:
    """One message to the owner: a one-line title and a body of plain text."""

    title: str
    body: str
    severity: Severity
    kind: Kind = "alert"
    source: str = "circles"  # the box's name


class ChannelError(TemporaryError):
    """A channel did not take a note; `retry_after` is what the endpoint asked for, if it did."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def http_url(value: str) -> str:
    """`value` if it is an http(s) URL with a host, without a trailing slash."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError("put credentials in the secret store, not in the URL")
    return value.rstrip("/")


class ChannelSettings(Section):
    min_severity: Severity = Field("info", description="notes below this severity are not sent here")
    max_per_hour: int = Field(20, ge=1, le=3600, description="beyond this, one digest")
    timeout_s: float = Field(10.0, gt=0, le=120)
    ca_file: Path | None = Field(None, description="PEM CA that signed a self-hosted server")

    @field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no file {value}")
        return value


class Channel(ABC):
    def __init__(self, name: str, settings: ChannelSettings, state_dir: Path) -> None:
        self.name = name
        self.settings = settings
        self.state_dir = state_dir
        self._secrets: set[str] = set()

    @abstractmethod
    def send(self, note: Note) -> None:
        """Deliver `note`; returns once the endpoint accepted it, else ChannelError."""

    def wants(self, severity: Severity) -> bool:
        return rank(severity) >= rank(self.settings.min_severity)

    def secret(self, name: str) -> str:
        """A secret of the box's store, read at each send (a secret set later is used at once);
        from now on it is scrubbed from every log line and every error of this channel."""
        value = read_secret(name, self.state_dir)
        if not value:
            raise ChannelError(f"no secret {name!r} (store it: circles secrets set {name})")
        redact(value)
        self._secrets.add(value)
        return value

    def error(self, text: str, retry_after: float | None = None) -> ChannelError:
        """A ChannelError of `text` with every secret this channel read replaced by `***`."""
        for value in self._secrets:
            text = text.replace(value, "***")
        return ChannelError(text, retry_after)

    def post_json(self, url: str, doc: dict[str, Any], *, what: str,
                  headers: dict[str, str] | None = None, ca_file: Path | None = None) -> dict[str, Any]:
        """POST `doc` as JSON; the answer's JSON object ({} if none). `what` names the endpoint
        in errors, since `url` may hold a token."""
        request = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "circles-notify", **(headers or {})})
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s,
                                        context=context) as answer:
                return _json_object(answer.read(65536))
        except urllib.error.HTTPError as exc:
            body = _json_object(exc.read(65536))
            detail = body.get("description") or body.get("error") or exc.reason
            retry = (body.get("parameters") or {}).get("retry_after") or exc.headers.get("Retry-After")
            raise self.error(f"{what}: HTTP {exc.code}: {str(detail)[:MAX_ERROR_DETAIL]}",
                             _seconds(retry)) from None
        except urllib.error.URLError as exc:
            raise self.error(f"{what}: cannot connect: {exc.reason}") from None
        except TimeoutError:
            raise self.error(f"{what}: no answer within {self.settings.timeout_s:g} s") from None
        except OSError as exc:  # ssl errors too
            raise self.error(f"{what}: {type(exc).__name__}: {exc}") from None
        except (http.client.HTTPException, ValueError) as exc:
            # A broken answer (BadStatusLine, IncompleteRead) or a URL urllib refuses: their text
            # may quote the URL, which may hold a token, so only the kind is told.
            raise self.error(f"{what}: {type(exc).__name__}") from None


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        found = json.loads(data)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _seconds(value: Any) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None  # an HTTP date: the backoff decides
