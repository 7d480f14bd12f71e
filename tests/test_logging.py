from __future__ import annotations

import json
import logging
import socket
import struct
from pathlib import Path

import pytest

from appliance import logging as clog


def parse_journal(data: bytes) -> dict[str, str]:
    """journald's native format, as the journal itself reads it."""
    fields, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            i = end + 1
        else:
            size = struct.unpack("<Q", data[end + 1:end + 9])[0]
            fields[line.decode()] = data[end + 9:end + 9 + size].decode()
            i = end + 9 + size + 1
    return fields


@pytest.fixture(autouse=True)
def restore_root() -> None:
    yield
    logging.getLogger().handlers.clear()


def test_json_lines_follow_the_schema(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    clog.setup("demo", level="DEBUG", environment="development")
    token = clog.request_id.set("req-1")
    try:
        logging.getLogger("x").warning("hello %s", "world", extra={"port": 1883})
    finally:
        clog.request_id.reset(token)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert set(first) == {"timestamp", "log_level", "service", "message", "request_id",
                          "environment", "extra"}
    assert first["log_level"] == "WARN" and first["message"] == "hello world"
    assert first["service"] == "demo" and first["environment"] == "development"
    assert first["request_id"] == "req-1" and first["extra"] == {"port": 1883}
    assert first["timestamp"].endswith("+00:00")
    assert second["log_level"] == "ERROR" and "ValueError: boom" in second["extra"]["exception"]
    assert second["request_id"] is None


def test_redacted_values_never_reach_a_line(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    clog.setup("demo")
    clog.redact("hunter2-secret")
    logging.getLogger("x").info("password is hunter2-secret", extra={"pw": "hunter2-secret"})
    assert "hunter2-secret" not in capsys.readouterr().err


def test_journald_native_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal.sock"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(path))
    journal.settimeout(2)
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    clog.setup("trade-logger", environment="staging", journal_socket=path)
    token = clog.request_id.set("abc123")
    try:
        logging.getLogger("x").error("line one\nline two", extra={"account": "demo"})
    finally:
        clog.request_id.reset(token)
    fields = parse_journal(journal.recv(65536))
    journal.close()
    assert fields["MESSAGE"] == "line one\nline two"
    assert fields["PRIORITY"] == "3"
    assert fields["SYSLOG_IDENTIFIER"] == "circles-trade-logger"
    assert fields["SERVICE"] == "trade-logger" and fields["ENVIRONMENT"] == "staging"
    assert fields["REQUEST_ID"] == "abc123"
    assert json.loads(fields["EXTRA"]) == {"account": "demo"}
