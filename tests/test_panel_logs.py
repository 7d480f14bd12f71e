"""The panel's log sources: the JSON lines files of `circles up` (read from their end, a
level, a request id across files, broken lines skipped, new lines followed) and the journal
(its `journalctl -o json` entries read back to the log schema, the command lines it runs,
accepted by the real journalctl; a stand-in journalctl for the subprocess's life); and the
bound on live tails."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import from_mapping, settings_class
from appliance.errors import ConfigError, TemporaryError
from appliance.panel.logs import (
    BLOCK,
    FileSource,
    JournalSource,
    LogQuery,
    TooManyTails,
    backwards,
    open_source,
    parse_journal_entry,
    parse_level,
)
from appliance.panel.service import PanelSettings

JOURNALCTL = shutil.which("journalctl")


def record(n: int, service: str, *, level: str = "INFO", request_id: str | None = None,
           ts: str | None = None, **extra: Any) -> str:
    """A JSON line as `appliance.logging` writes it, the `n`-th second of a day."""
    return json.dumps({
        "timestamp": ts or f"2025-03-01T10:{n // 60:02d}:{n % 60:02d}.000+00:00",
        "log_level": level, "service": service, "message": f"{service} line {n}",
        "request_id": request_id, "environment": "development", "extra": extra})


def write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def recent(source: FileSource | JournalSource, **query: Any) -> list[Any]:
    return asyncio.run(source.recent(LogQuery(**query)))


# -- files --------------------------------------------------------------------------------------
def test_the_tail_of_a_big_file_comes_from_its_end(tmp_path: Path) -> None:
    """A 6 MB file: the last lines, newest first; a line longer than a read block is whole."""
    long = "x" * (3 * BLOCK)
    with open(tmp_path / "risk.jsonl", "w", encoding="utf-8") as out:
        for n in range(40_000):
            out.write(record(n % 3600, "risk", ts="2025-03-01T00:00:00.000+00:00") + "\n")
        out.write(record(1, "risk", note=long) + "\n")
        out.write(record(2, "risk") + "\n")
    assert (tmp_path / "risk.jsonl").stat().st_size > 5_000_000
    lines = recent(FileSource(tmp_path), service="risk", limit=3)
    assert [line.message for line in lines] == ["risk line 2", "risk line 1", "risk line 399"]
    assert lines[1].extra == {"note": long}
    assert lines[0].record() == json.loads(record(2, "risk"))


def test_a_query_looks_back_only_so_far(tmp_path: Path) -> None:
    """The bound that keeps a query cheap: lines before the last `scan_bytes` are not read,
    and the line cut by that bound is left out rather than shown broken."""
    write(tmp_path / "risk.jsonl", [record(n, "risk", request_id="old-0001" if n == 0 else None)
                                    for n in range(2000)])
    size = (tmp_path / "risk.jsonl").stat().st_size
    assert recent(FileSource(tmp_path), request_id="old-0001")
    assert not recent(FileSource(tmp_path, scan_bytes=size // 2), request_id="old-0001")
    read = list(backwards(tmp_path / "risk.jsonl", 1000))
    assert read and all(json.loads(raw) for raw in read)  # whole lines only
    assert len(b"\n".join(read)) < 1000


def test_level_filter(tmp_path: Path) -> None:
    levels = ["DEBUG", "INFO", "WARN", "ERROR", "INFO", "WARNING", "CRITICAL"]
    write(tmp_path / "execution.jsonl", [record(n, "execution", level=level)
                                         for n, level in enumerate(levels)] + [
        json.dumps({"log_level": "ERROR", "message": "compact"}, separators=(",", ":")),
        json.dumps({"message": "no level"}),
        json.dumps({"log_level": "INFO", "message": 'says "log_level": "ERROR" in its text'})])
    source = FileSource(tmp_path)
    assert [line.log_level for line in recent(source, level="WARN")] == [
        "ERROR", "ERROR", "WARN", "ERROR", "WARN"]
    assert [line.message for line in recent(source, level="ERROR")] == [
        "compact", "execution line 6", "execution line 3"]
    assert [line.log_level for line in recent(source, level="INFO")].count("INFO") == 4
    assert len(recent(source)) == len(levels) + 3
    assert parse_level("warning") == "WARN" and parse_level("critical") == "ERROR"
    assert parse_level("") is None
    with pytest.raises(ValueError, match="level must be one of"):
        parse_level("LOUD")


def test_one_request_id_across_files_merged_by_time(tmp_path: Path) -> None:
    rid = "4f1c2b9e"
    write(tmp_path / "risk.jsonl", [record(1, "risk", request_id=rid), record(2, "risk"),
                                    record(5, "risk", request_id=rid, level="WARN")])
    write(tmp_path / "execution.jsonl", [record(3, "execution", request_id=rid),
                                         record(4, "execution", request_id="other-id"),
                                         record(6, "execution", request_id=rid)])
    write(tmp_path / "panel.jsonl", [record(7, "panel", request_id=rid + "0")])  # a prefix only
    lines = recent(FileSource(tmp_path), request_id=rid)
    assert [(line.service, line.message) for line in lines] == [
        ("execution", "execution line 6"), ("risk", "risk line 5"),
        ("execution", "execution line 3"), ("risk", "risk line 1")]
    assert {line.request_id for line in lines} == {rid}
    assert [line.service for line in recent(FileSource(tmp_path), request_id=rid,
                                            level="WARN")] == ["risk"]
    assert recent(FileSource(tmp_path), request_id=rid, service="risk", limit=1)[0].message \
        == "risk line 5"
    assert asyncio.run(FileSource(tmp_path).services()) == ["execution", "panel", "risk"]


def test_broken_lines_are_skipped(tmp_path: Path) -> None:
    good = [record(n, "home-sensors") for n in range(3)]
    (tmp_path / "home-sensors.jsonl").write_bytes(
        good[0].encode() + b"\nnot json at all\n[1, 2]\n" + good[1][:30].encode()
        + b"\n\xff\xfe{\"message\": 1}\n" + good[1].encode() + b"\n{\"no\": \"message\"}\n"
        + good[2].encode() + b"\n" + good[2][:40].encode())
    lines = recent(FileSource(tmp_path))
    assert [line.message for line in lines] == [f"home-sensors line {n}" for n in (2, 1, 0)]


def test_a_line_without_a_time_stays_in_its_place(tmp_path: Path) -> None:
    """What the supervisor writes for a line that was no JSON (a traceback) has no time: it
    sorts with the line written after it, not at either end."""
    write(tmp_path / "risk.jsonl", [record(1, "risk"), json.dumps(
        {"log_level": "ERROR", "service": "risk", "message": "Traceback (most recent call)"}),
        record(9, "risk")])
    write(tmp_path / "panel.jsonl", [record(0, "panel"), record(5, "panel")])
    lines = recent(FileSource(tmp_path))
    assert [line.message for line in lines] == ["risk line 9", "Traceback (most recent call)",
                                                "panel line 5", "risk line 1", "panel line 0"]
    assert lines[1].timestamp is None and lines[1].log_level == "ERROR"


def test_tokens_that_reached_a_log_line_are_not_shown(tmp_path: Path) -> None:
    token = "ct_" + "A1b2" * 10
    key = "ck_" + "Zz9-" * 10
    write(tmp_path / "panel.jsonl", [json.dumps({
        "timestamp": "2025-03-01T10:00:00.000+00:00", "log_level": "INFO", "service": "panel",
        "message": f"made {token}", "request_id": None, "extra": {"key": key}})])
    line = recent(FileSource(tmp_path))[0]
    assert token not in json.dumps(line.record()) and key not in json.dumps(line.record())
    assert line.message == "made ct_***" and line.extra == {"key": "ck_***"}


def test_follow_gives_new_whole_lines_of_new_files_too(tmp_path: Path) -> None:
    write(tmp_path / "risk.jsonl", [record(0, "risk", level="WARN")])  # before: not given

    async def run() -> list[list[str]]:
        source = FileSource(tmp_path, poll_s=0.02)
        seen: list[list[str]] = []
        follow = source.follow(LogQuery(level="WARN"))
        batch = await anext(follow)  # the follow starts at the files' ends
        seen.append([line.message for line in batch])
        with open(tmp_path / "risk.jsonl", "a", encoding="utf-8") as out:
            out.write(record(1, "risk", level="WARN") + "\n" + record(2, "risk") + "\n")
            half = record(3, "risk", level="ERROR")
            out.write(half[:20])
            out.flush()
            write(tmp_path / "execution.jsonl", [record(4, "execution", level="ERROR")])
            seen.append([line.message for line in await anext(follow)])
            out.write(half[20:] + "\n")
        seen.append([line.message for line in await anext(follow)])
        seen.append([line.message for line in await anext(follow)])  # nothing new: empty
        await follow.aclose()
        return seen

    assert asyncio.run(run()) == [[], ["risk line 1", "execution line 4"], ["risk line 3"], []]


def test_a_source_follows_a_bounded_number_of_live_tails(tmp_path: Path) -> None:
    """Refused at once beyond `max_tails`; a tail that ends, or that is dropped before it
    started (its client left first), makes room for another."""
    source = FileSource(tmp_path, poll_s=0.01)
    source.max_tails = 2

    async def run() -> None:
        first, second = source.tail(LogQuery()), source.tail(LogQuery())
        with pytest.raises(TooManyTails, match="too many live log tails"):
            source.tail(LogQuery())
        assert await anext(first) == []
        await first.aclose()
        third = source.tail(LogQuery())
        with pytest.raises(TooManyTails):
            source.tail(LogQuery())
        del second  # never started
        source.tail(LogQuery())
        await third.aclose()

    asyncio.run(run())


def test_query_bounds() -> None:
    with pytest.raises(ValueError, match="limit"):
        LogQuery(limit=2001)
    with pytest.raises(ValueError, match="service"):
        LogQuery(service="../etc/passwd")
    for bad in ("a b", "short", "x" * 65, "abc/1234", "abc\u00e9defgh"):
        with pytest.raises(ValueError, match="request_id"):
            LogQuery(request_id=bad)
    assert LogQuery(limit=2000, service="trade-logger", request_id="abc-1234").limit == 2000
    for made in ("9d0f6a1e2b3c4d5e6f708192a3b4c5d6", "ea-" + "0f" * 16,
                 "3b241101-e2bb-4255-8caf-4136c566a962"):  # the services', an EA's, a uuid
        assert LogQuery(request_id=made).request_id == made


# -- choosing the source ---------------------------------------------------------------------------
def test_auto_is_the_journal_under_systemd_else_the_files(tmp_path: Path) -> None:
    assert isinstance(open_source("auto", tmp_path, environ={}), FileSource)
    assert isinstance(open_source("files", tmp_path, environ={"INVOCATION_ID": "1"}), FileSource)
    if JOURNALCTL:
        assert isinstance(open_source("auto", tmp_path, environ={"INVOCATION_ID": "1"}),
                          JournalSource)
        assert isinstance(open_source("journal", tmp_path, environ={}), JournalSource)


def test_a_bad_setting_names_its_key() -> None:
    cls = settings_class({"panel": PanelSettings})
    with pytest.raises(ConfigError, match=r"panel\.logs:.*'syslog'"):
        from_mapping(cls, {"panel": {"logs": "syslog"}}, "circles.toml")
    ok = from_mapping(cls, {"panel": {"logs": "files", "logs_dir": "/srv/logs"}}, "circles.toml")
    assert ok.panel.logs == "files" and ok.panel.logs_dir == Path("/srv/logs")  # type: ignore[attr-defined]


# -- the journal -------------------------------------------------------------------------------
# Entries as `journalctl -o json --output-fields=…` prints them on a box: a record sent
# natively by appliance.logging; a JSON line that reached the journal on stderr; a
# traceback line on stderr; systemd's own line about the unit; a MESSAGE that is no UTF-8.
NATIVE = {
    "__CURSOR": "s=8c5f1e0c9b2d4d7f9e3a2b1c0d9e8f7a;i=1a2b;b=5e8c2f0a;m=3c4d5e6f;t=5f4e3d2c1b0a9;x=9f8e",
    "__REALTIME_TIMESTAMP": "1740823384123456", "__MONOTONIC_TIMESTAMP": "1012345678",
    "_BOOT_ID": "5e8c2f0a4b6d4e8f9a1b2c3d4e5f6a7b", "PRIORITY": "4",
    "SYSLOG_IDENTIFIER": "circles-execution", "SERVICE": "execution", "LOG_LEVEL": "WARN",
    "ENVIRONMENT": "production", "LOGGER": "circles.execution",
    "EXTRA": "{\"by\": \"user:otto\", \"reason\": \"news at 14:30\"}",
    "REQUEST_ID": "9d0f6a1e2b3c4d5e6f708192a3b4c5d6", "MESSAGE": "trading halted",
    "_SYSTEMD_UNIT": "circles@execution.service",
    "_SOURCE_REALTIME_TIMESTAMP": "1740823384120001",
}
STDERR_JSON = {
    "__REALTIME_TIMESTAMP": "1740823385000000", "PRIORITY": "6", "SYSLOG_IDENTIFIER": "circles",
    "_SYSTEMD_UNIT": "circles@risk.service", "_TRANSPORT": "stdout",
    "MESSAGE": record(7, "risk", request_id="77aa77aa", ts="2025-03-01T10:03:05.001+00:00",
                      by="cli:root"),
}
# A record at ERROR that reached the journal on stderr: priority 6, like any stderr line.
STDERR_ERROR = {"__REALTIME_TIMESTAMP": "1740823385500000", "PRIORITY": "6",
                "SYSLOG_IDENTIFIER": "circles", "_SYSTEMD_UNIT": "circles@risk.service",
                "MESSAGE": record(8, "risk", level="ERROR", ts="2025-03-01T10:03:05.501+00:00")}
STDERR_TEXT = {"__REALTIME_TIMESTAMP": "1740823386000000", "PRIORITY": "3",
               "SYSLOG_IDENTIFIER": "circles", "_SYSTEMD_UNIT": "circles@risk.service",
               "MESSAGE": "Traceback (most recent call last):"}
SYSTEMD = {"__REALTIME_TIMESTAMP": "1740823387000000", "PRIORITY": "6",
           "SYSLOG_IDENTIFIER": "systemd", "_SYSTEMD_UNIT": "init.scope",
           "UNIT": "circles@trade-logger.service",
           "MESSAGE": "Started circles@trade-logger.service - Circles service trade-logger."}
BINARY = {"__REALTIME_TIMESTAMP": "1740823388000000", "PRIORITY": "6",
          "_SYSTEMD_UNIT": "circles@panel.service",
          "MESSAGE": [98, 97, 100, 32, 255, 27, 91, 48, 109], "SERVICE": ["panel", "panel"]}


def test_journal_entries_read_back_to_the_schema() -> None:
    native = parse_journal_entry(NATIVE)
    assert native.record() == {
        "timestamp": "2025-03-01T10:03:04.120+00:00", "log_level": "WARN",
        "service": "execution", "message": "trading halted",
        "request_id": "9d0f6a1e2b3c4d5e6f708192a3b4c5d6", "environment": "production",
        "extra": {"by": "user:otto", "reason": "news at 14:30"}}
    from_stderr = parse_journal_entry(STDERR_JSON)
    assert from_stderr.record() == json.loads(STDERR_JSON["MESSAGE"])
    text = parse_journal_entry(STDERR_TEXT)
    assert (text.service, text.log_level, text.message, text.request_id) == (
        "risk", "ERROR", "Traceback (most recent call last):", None)
    assert text.timestamp == "2025-03-01T10:03:06.000+00:00"
    started = parse_journal_entry(SYSTEMD)
    assert (started.service, started.log_level) == ("trade-logger", "INFO")
    binary = parse_journal_entry(BINARY)
    assert binary.service == "panel" and binary.message.startswith("bad \ufffd")


def test_journal_command_lines() -> None:
    source = JournalSource(journalctl="journalctl")
    args = source.command(LogQuery(service="risk", level="WARN", request_id="abcd1234",
                                   limit=50))
    assert args[:3] == ["journalctl", "-o", "json"] and "--no-pager" in args
    # The level is filtered on the lines read: four times the limit are read for it.
    assert {"--reverse", "--lines=200", "--unit=circles@risk.service",
            "REQUEST_ID=abcd1234"} <= set(args)
    every = source.command(LogQuery(), follow=True)
    assert {"--follow", "--lines=0", "--unit=circles@*.service"} <= set(every)
    assert not any(a.startswith(("REQUEST_ID", "--reverse")) for a in every)
    assert "--lines=50" in source.command(LogQuery(level="DEBUG", limit=50))
    assert "--lines=8000" in source.command(LogQuery(level="INFO", limit=2000))
    for query in (LogQuery(level="ERROR"), LogQuery(level="INFO"), LogQuery()):
        assert not any(a.startswith("--priority") for a in source.command(query))


@pytest.mark.skipif(JOURNALCTL is None, reason="journalctl is not installed")
def test_the_real_journalctl_takes_those_command_lines(tmp_path: Path) -> None:
    """Against an empty journal directory: no running journald is needed, and a unit that
    has logged nothing yet is no lines, not an error."""
    assert JOURNALCTL
    source = JournalSource(journalctl=JOURNALCTL, directory=tmp_path, timeout_s=20)
    for query in (LogQuery(), LogQuery(service="risk", level="ERROR", request_id="abcd1234"),
                  LogQuery(level="INFO", limit=2000)):
        assert asyncio.run(source.recent(query)) == []
    assert asyncio.run(source.services()) == []
    broken = JournalSource(journalctl=JOURNALCTL, directory=tmp_path / "none" / "such")
    with pytest.raises(TemporaryError, match="journalctl"):
        asyncio.run(broken.services())


def stand_in(tmp_path: Path, entries: list[dict[str, Any]], then: str = "") -> Path:
    """A journalctl that prints `entries` as `journalctl -o json` does, writes its pid and
    its arguments, then runs `then` (e.g. `exec sleep 60`, as `--follow` waits)."""
    sample = tmp_path / "entries.json"
    sample.write_text("".join(json.dumps(e) + "\n" for e in entries) + "not json\n")
    script = tmp_path / "journalctl"
    script.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\necho \"$@\" > {tmp_path}/args\n"
                      f"cat {sample}\n{then}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_journal_recent_through_a_subprocess(tmp_path: Path) -> None:
    # newest first, as --reverse gives
    entries = [NATIVE, STDERR_ERROR, STDERR_JSON, STDERR_TEXT, SYSTEMD]
    source = JournalSource(journalctl=str(stand_in(tmp_path, entries)))
    lines = recent(source, level="WARN")
    assert [(line.service, line.log_level, line.message) for line in lines] == [
        ("execution", "WARN", "trading halted"), ("risk", "ERROR", "risk line 8"),
        ("risk", "ERROR", "Traceback (most recent call last):")]
    assert "--lines=800" in (tmp_path / "args").read_text().split()
    assert [line.message for line in recent(source, level="ERROR", limit=1)] == ["risk line 8"]
    assert [line.service for line in recent(source, request_id="77aa77aa")] == ["risk"]


def test_journal_queries_time_out(tmp_path: Path) -> None:
    source = JournalSource(journalctl=str(stand_in(tmp_path, [], "exec sleep 60")),
                           timeout_s=0.5)
    with pytest.raises(TemporaryError, match="did not answer"):
        recent(source)
    assert not _alive(int((tmp_path / "pid").read_text()))


def test_journal_follow_ends_its_journalctl(tmp_path: Path) -> None:
    source = JournalSource(journalctl=str(stand_in(tmp_path, [NATIVE, STDERR_JSON],
                                                   "exec sleep 60")))

    async def run() -> list[str]:
        follow = source.follow(LogQuery(service="execution"))
        got: list[str] = []
        while len(got) < 2:
            got += [line.service for line in await anext(follow)]
        await follow.aclose()
        return got

    assert asyncio.run(run()) == ["execution", "risk"]  # the unit match is journalctl's
    assert "--follow" in (tmp_path / "args").read_text()
    assert not _alive(int((tmp_path / "pid").read_text()))


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.05)
    return True
