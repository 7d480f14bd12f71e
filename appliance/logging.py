"""The JSON log schema of every Circles process, and journald's native protocol under systemd.

Each record carries `timestamp`, `log_level`, `service`, `message`, `request_id`,
`environment` and `extra` (the keyword `extra=` of the logging call). The request id
comes from a context variable that the bus sets for every handled message.
With `JOURNAL_STREAM` set (a systemd unit), records go to journald as native fields
(`MESSAGE`, `PRIORITY`, `SYSLOG_IDENTIFIER`, `SERVICE`, `REQUEST_ID`, `ENVIRONMENT`, …)
so `journalctl REQUEST_ID=…` follows one request across services.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING,
           "ERROR": logging.ERROR}
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
_redacted: set[str] = set()


def redact(value: str | None) -> None:
    """Never let `value` (a password, a token) reach a log line, even by accident."""
    if value and len(value) >= 4:
        _redacted.add(value)


def _scrub(text: str) -> str:
    for value in _redacted:
        if value in text:
            text = text.replace(value, "***")
    return text


def level_name(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARN"
    return "INFO" if levelno >= logging.INFO else "DEBUG"


class _Context:
    service = "circles"
    environment = "production"


def build_record(record: logging.LogRecord) -> dict[str, Any]:
    """The schema fields of one log record."""
    extra = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
    if record.exc_info:
        extra["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
    return {
        "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "log_level": level_name(record.levelno),
        "service": _Context.service,
        "message": record.getMessage(),
        "request_id": request_id.get(),
        "environment": _Context.environment,
        "extra": extra,
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _scrub(json.dumps(build_record(record), default=str, ensure_ascii=False))


class JournalHandler(logging.Handler):
    """Sends records to journald over its native datagram protocol."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__()
        self.socket_path = str(socket_path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            doc = build_record(record)
            fields = {
                "MESSAGE": doc["message"],
                "PRIORITY": str(_SYSLOG_PRIORITY.get(record.levelno, 6)),
                "SYSLOG_IDENTIFIER": f"circles-{doc['service']}",
                "SERVICE": doc["service"],
                "LOG_LEVEL": doc["log_level"],
                "ENVIRONMENT": doc["environment"],
                "LOGGER": record.name,
                "EXTRA": json.dumps(doc["extra"], default=str, ensure_ascii=False),
            }
            if doc["request_id"]:
                fields["REQUEST_ID"] = doc["request_id"]
            self.sock.sendto(encode_journal_fields(fields), self.socket_path)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def encode_journal_fields(fields: dict[str, str]) -> bytes:
    """journald's native format: `KEY=value\\n`, or `KEY\\n<le64 length><value>\\n` for
    values that contain a newline."""
    out = bytearray()
    for key, value in fields.items():
        data = _scrub(value).encode()
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def setup(service: str, *, level: str = "INFO", environment: str = "production",
          journal_socket: Path | None = None) -> None:
    """Configure the root logger once per process, for journald or JSON lines on stderr."""
    _Context.service = service
    _Context.environment = environment
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    chosen: logging.Handler
    if os.environ.get("JOURNAL_STREAM") and journal_socket and journal_socket.exists():
        chosen = JournalHandler(journal_socket)
    else:
        chosen = logging.StreamHandler(sys.stderr)
        chosen.setFormatter(JsonFormatter())
    root.addHandler(chosen)
    root.setLevel(_LEVELS[level])
    # paho logs at DEBUG per packet; keep it quiet unless asked for.
    logging.getLogger("paho").setLevel(max(_LEVELS[level], logging.INFO))
