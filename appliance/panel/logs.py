"""Where the panel reads the services' log lines: the journal under systemd, else the JSON
lines files that `circles up` writes (`<state>/logs/<service>.jsonl`).

Both sources answer the same questions: the most recent lines of one service or of all, at
or above a level, or every line of one request id across services (newest first); and the
lines logged from now on (`follow`). Each line comes back as the record of the JSON log
schema (`appliance/logging.py`): `timestamp`, `log_level`, `service`, `message`,
`request_id`, `environment`, `extra`.

Files are read from their end in blocks, never whole, and a query looks back through at
most `SCAN_BYTES` of each file, so a large file costs neither memory nor much time; a line
is parsed only when its bytes may match (its request id, its `"log_level": "ERROR"`), and
at most two such scans run at once. The journal is asked with `journalctl -o json`, as a
subprocess with a timeout; the services write their records to it as native fields
(`SERVICE`, `REQUEST_ID`, …), and a record that reached it as a JSON line on stderr is read
back from its `MESSAGE` (its journal priority is 6 whatever its level, so the level is
filtered here, not by journalctl). A query with a level therefore reads the newest
`limit × 4` entries (at most `MAX_LIMIT × 4`) and keeps those at or above the level: when
fewer than one entry in four is, it shows fewer than `limit` lines.

Each source follows at most `MAX_TAILS` live tails at once (`TooManyTails` beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from appliance.bus.base import REQUEST_ID
from appliance.errors import ConfigError, TemporaryError

# The schema's levels (appliance/logging.py writes WARN, and folds CRITICAL into ERROR).
LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")
_RANK = {"DEBUG": 10, "INFO": 20, "WARN": 30, "ERROR": 40}
_ALIASES = {"WARNING": "WARN", "CRITICAL": "ERROR", "FATAL": "ERROR", "NOTICE": "INFO"}
_FROM_PRIORITY = {7: "DEBUG", 6: "INFO", 5: "INFO", 4: "WARN"}  # syslog PRIORITY → level
DEFAULT_LIMIT, MAX_LIMIT = 200, 2000
JOURNAL_READ = 4  # with a level, the journal is read this many times `limit` entries back
MAX_TAILS = 8  # live tails one source follows at once
MAX_SCANS = 2  # file scans at once (each reads up to SCAN_BYTES of every file)
SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
UNIT = re.compile(r"circles@(.+)\.service")
# An API token or an ingest key that reached a log line by mistake is not shown again.
_KEYS = re.compile(r"\b(c[tk]_)[A-Za-z0-9_-]{16,}")

BLOCK = 64 * 1024  # read backwards this much at a time
MAX_LINE = 1 << 20  # a longer line is cut (and then skipped: it is no JSON)
SCAN_BYTES = 32 << 20  # how far back one query looks in each file
FOLLOW_BYTES = 256 * 1024  # what a poll reads of a file at most; more is skipped
POLL_S = 0.5


def _spelt(name: str | None) -> str:
    """`name` as the schema would spell it, if it is a level: upper case, WARNING → WARN."""
    upper = (name or "").strip().upper()
    return _ALIASES.get(upper, upper)


def level_of(name: str | None) -> str:
    """A level name as the schema spells it; an unknown or missing one counts as INFO."""
    level = _spelt(name)
    return level if level in _RANK else "INFO"


def parse_level(name: str | None) -> str | None:
    """A level asked for (any case, WARNING and CRITICAL too); None for "any"; ValueError
    for a name that is no level."""
    level = _spelt(name)
    if not level:
        return None
    if level not in _RANK:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {name!r}")
    return level


_LEVEL_KEY = b'"log_level":'


def _level_needles(level: str) -> tuple[bytes, ...]:
    """The values of `"log_level"` in a JSON line at or above `level`, as appliance.logging
    and the supervisor write them (`"ERROR"`, `"WARNING"`, …)."""
    names = [n for n in (*_RANK, *_ALIASES) if _RANK[_ALIASES.get(n, n)] >= _RANK[level]]
    return tuple(f'"{name}"'.encode() for name in names)


# Above INFO only: a line with no level, or one of no known name, counts as INFO.
_NEEDLES = {level: _level_needles(level) for level in ("WARN", "ERROR")}


def _mask(text: str) -> str:
    return _KEYS.sub(r"\1***", text)


@dataclass(frozen=True, slots=True)
class LogLine:
    """One record of the JSON log schema."""

    timestamp: str | None
    log_level: str
    service: str
    message: str
    request_id: str | None = None
    environment: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, doc: Mapping[str, Any], service: str = "",
                    timestamp: str | None = None) -> LogLine:
        """The line of a schema record as a service wrote it (missing fields tolerated), not
        masked yet: `masked()` is for the lines shown."""
        extra = doc.get("extra")
        request = doc.get("request_id")
        return cls(timestamp=_text(doc.get("timestamp")) or timestamp,
                   log_level=level_of(_text(doc.get("log_level"))),
                   service=_text(doc.get("service")) or service,
                   message=_text(doc.get("message")),
                   request_id=str(request) if request not in (None, "") else None,
                   environment=_text(doc.get("environment")) or None,
                   extra=extra if isinstance(extra, dict) else {})

    def masked(self) -> LogLine:
        """This line with any API token or ingest key in it cut to its prefix (`ct_***`)."""
        return replace(self, message=_mask(self.message), extra=_masked(self.extra))

    def record(self) -> dict[str, Any]:
        return {"timestamp": self.timestamp, "log_level": self.log_level,
                "service": self.service, "message": self.message,
                "request_id": self.request_id, "environment": self.environment,
                "extra": self.extra}


def _text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def _masked(extra: dict[str, Any]) -> dict[str, Any]:
    try:
        text = json.dumps(extra, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return {}
    if _KEYS.search(text) is None:
        return extra
    masked: dict[str, Any] = json.loads(_mask(text))
    return masked


@dataclass(frozen=True, slots=True)
class LogQuery:
    """What to show: one service or all (None), at or above `level`, one request id."""

    service: str | None = None
    level: str | None = None
    request_id: str | None = None
    limit: int = DEFAULT_LIMIT

    def __post_init__(self) -> None:
        if self.service is not None and not SERVICE_NAME.fullmatch(self.service):
            raise ValueError(f"service: not a service name: {self.service[:70]!r}")
        if self.request_id is not None and not REQUEST_ID.fullmatch(self.request_id):
            raise ValueError("request_id: 8 to 64 letters, digits, '.', '_', ':' or '-'")
        if self.level is not None and self.level not in _RANK:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ValueError(f"limit must be from 1 to {MAX_LIMIT}")

    def accepts(self, line: LogLine) -> bool:
        """Level and request id (the service is chosen by the source: a file, a unit)."""
        if self.level is not None and _RANK[line.log_level] < _RANK[self.level]:
            return False
        return self.request_id is None or line.request_id == self.request_id

    def pick(self, line: LogLine | None) -> LogLine | None:
        """`line` masked, if the query accepts it: the one way a line leaves a source."""
        return line.masked() if line is not None and self.accepts(line) else None

    def may_match(self, raw: bytes) -> bool:
        """Whether a file's raw JSON line may match: False for one that lacks the request id
        or any level at or above the one asked, which is then not parsed (parsing every
        line of a large file takes a second)."""
        if self.request_id is not None and self.request_id.encode() not in raw:
            return False
        needles = _NEEDLES.get(self.level or "")
        if needles is None:
            return True
        at = raw.find(_LEVEL_KEY)  # the schema's first keys: its own, not one in `extra`
        return at >= 0 and raw[at + len(_LEVEL_KEY):at + 32].lstrip().startswith(needles)


class TooManyTails(TemporaryError):
    """A source follows as many live tails as it may; another must wait for one to end."""


class LogSource:
    """The interface of both sources."""

    name = ""
    max_tails = MAX_TAILS
    _tails = 0  # live tails open now

    def tail(self, query: LogQuery) -> AsyncGenerator[list[LogLine], None]:
        """`follow(query)` as one of at most `max_tails` live tails of this source:
        TooManyTails at once (not at the first batch) when as many are open. The tail's
        place is free again when it ends, or when it is dropped without being started (a
        client that left before its stream began)."""
        if self._tails >= self.max_tails:
            raise TooManyTails("too many live log tails: close one or try again later")
        self._tails += 1
        freed = False

        def free() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self._tails -= 1

        tail = self._tail(query, free)
        weakref.finalize(tail, free)  # never started: its `finally` never runs
        return tail

    async def _tail(self, query: LogQuery,
                    free: Callable[[], None]) -> AsyncGenerator[list[LogLine], None]:
        try:
            async with contextlib.aclosing(self.follow(query)) as batches:
                async for batch in batches:
                    yield batch
        finally:
            free()

    async def services(self) -> list[str]:
        """The services the source has lines of."""
        raise NotImplementedError

    async def recent(self, query: LogQuery) -> list[LogLine]:
        """At most `query.limit` lines that match, the newest first, merged by time."""
        raise NotImplementedError

    def follow(self, query: LogQuery) -> AsyncGenerator[list[LogLine], None]:
        """The matching lines logged from now on, oldest first, in batches; an empty batch
        now and then (at least every second or so) while nothing is logged, so that the
        caller can check whether to go on. Ends when the caller stops iterating."""
        raise NotImplementedError


# -- files --------------------------------------------------------------------------------------
def backwards(path: Path, max_bytes: int = SCAN_BYTES) -> Iterator[bytes]:
    """The lines of `path` from the last to the first, reading at most the last `max_bytes`
    in blocks of `BLOCK` (a line cut at that bound is left out)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        stop = max(0, end - max_bytes)
        pos, head = end, b""  # head: the start of a line whose beginning is further back
        while pos > stop:
            size = min(BLOCK, pos - stop)
            pos -= size
            f.seek(pos)
            parts = (f.read(size) + head).split(b"\n")
            head = parts[0][:MAX_LINE]
            yield from (line for line in reversed(parts[1:]) if line)
        if stop == 0 and head:
            yield head


def parse_file_line(raw: bytes, service: str) -> LogLine | None:
    """The record of one JSON line, or None for a line that is not one (cut, or not JSON)."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or "message" not in doc:
        return None
    return LogLine.from_record(doc, service)


class FileSource(LogSource):
    """`<dir>/<service>.jsonl`, one JSON record a line (what `circles up` writes)."""

    name = "files"

    def __init__(self, directory: Path, *, scan_bytes: int = SCAN_BYTES,
                 poll_s: float = POLL_S) -> None:
        self.directory, self.scan_bytes, self.poll_s = directory, scan_bytes, poll_s
        self._scans = asyncio.Semaphore(MAX_SCANS)

    def _files(self, service: str | None) -> list[Path]:
        if service is not None:
            path = self.directory / f"{service}.jsonl"
            return [path] if path.is_file() else []
        return sorted(self.directory.glob("*.jsonl")) if self.directory.is_dir() else []

    async def services(self) -> list[str]:
        return [path.stem for path in await asyncio.to_thread(self._files, None)]

    def _scan(self, path: Path, query: LogQuery) -> list[tuple[str, LogLine]]:
        """The newest matching lines of one file, each with the time it sorts by (a line
        without a time takes that of the line after it)."""
        found: list[tuple[str, LogLine]] = []
        try:
            after = _iso(path.stat().st_mtime)  # when the last line was written
            for raw in backwards(path, self.scan_bytes):
                if not query.may_match(raw):
                    continue
                line = parse_file_line(raw, path.stem)
                if line is None:
                    continue
                after = line.timestamp or after
                if (picked := query.pick(line)) is not None:
                    found.append((after, picked))
                    if len(found) >= query.limit:
                        break
        except FileNotFoundError:  # removed meanwhile
            pass
        return found

    def _recent(self, query: LogQuery) -> list[LogLine]:
        found = [item for path in self._files(query.service) for item in self._scan(path, query)]
        found.sort(key=lambda item: item[0], reverse=True)  # stable: a file's order is kept
        return [line for _, line in found[:query.limit]]

    async def recent(self, query: LogQuery) -> list[LogLine]:
        async with self._scans:  # a few at once: each may read SCAN_BYTES of every file
            return await asyncio.to_thread(self._recent, query)

    def _sizes(self, query: LogQuery) -> dict[Path, int]:
        sizes = {}
        for path in self._files(query.service):
            with contextlib.suppress(FileNotFoundError):
                sizes[path] = path.stat().st_size
        return sizes

    def _read_new(self, query: LogQuery, offsets: dict[Path, int]) -> list[LogLine]:
        """The whole lines added to each file since `offsets` (updated); a file that shrank
        was started again, a file that appeared is read from its start."""
        lines: list[LogLine] = []
        for path in self._files(query.service):
            try:
                with open(path, "rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    start = offsets.get(path, 0)
                    if size < start:
                        start = 0
                    start = max(start, size - FOLLOW_BYTES)  # a flood: the last part only
                    f.seek(start)
                    data = f.read(size - start)
            except FileNotFoundError:
                offsets.pop(path, None)
                continue
            whole = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
            offsets[path] = start + whole
            for raw in data[:whole].split(b"\n"):
                line = parse_file_line(raw, path.stem) if raw and query.may_match(raw) else None
                if (picked := query.pick(line)) is not None:
                    lines.append(picked)
        lines.sort(key=lambda line: line.timestamp or "")
        return lines

    async def follow(self, query: LogQuery) -> AsyncGenerator[list[LogLine], None]:
        offsets = await asyncio.to_thread(self._sizes, query)
        while True:
            await asyncio.sleep(self.poll_s)
            yield await asyncio.to_thread(self._read_new, query, offsets)


# -- the journal ------------------------------------------------------------------------------
JOURNAL_FIELDS = ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "SERVICE", "LOG_LEVEL",
                  "REQUEST_ID", "ENVIRONMENT", "EXTRA", "_SYSTEMD_UNIT", "UNIT",
                  "_SOURCE_REALTIME_TIMESTAMP")


def _field(entry: Mapping[str, Any], key: str) -> str | None:
    """A field of `journalctl -o json`: a string, a list of byte values (a value that is not
    valid UTF-8 or holds control characters), or a list of those (a field given twice)."""
    value = entry.get(key)
    if isinstance(value, list):
        if value and all(isinstance(b, int) for b in value):
            return bytes(b & 0xFF for b in value).decode(errors="replace")
        value = value[0] if value else None
        if isinstance(value, list):
            return bytes(b & 0xFF for b in value if isinstance(b, int)).decode(errors="replace")
    return None if value is None else str(value)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def _journal_time(entry: Mapping[str, Any]) -> str | None:
    micros = _field(entry, "_SOURCE_REALTIME_TIMESTAMP") or _field(entry, "__REALTIME_TIMESTAMP")
    try:
        return _iso(int(micros or "") / 1e6)
    except (ValueError, OverflowError, OSError):
        return None


def parse_journal_entry(entry: Mapping[str, Any]) -> LogLine:
    """The schema's record of one journal entry: native fields as `appliance.logging` sends
    them; a JSON record in MESSAGE (a line on stderr); or anything else in a circles unit
    (a traceback, systemd's own "Started …"), named after the unit."""
    message = _field(entry, "MESSAGE") or ""
    timestamp = _journal_time(entry)
    unit = UNIT.fullmatch(_field(entry, "_SYSTEMD_UNIT") or "") \
        or UNIT.fullmatch(_field(entry, "UNIT") or "")
    service = _field(entry, "SERVICE") or (unit.group(1) if unit else None)
    if _field(entry, "SERVICE") is None and message.startswith("{"):
        with contextlib.suppress(ValueError, RecursionError):
            doc = json.loads(message)
            if isinstance(doc, dict) and "message" in doc:
                return LogLine.from_record(doc, service or "", timestamp)
    try:
        priority = int(_field(entry, "PRIORITY") or 6)
    except ValueError:
        priority = 6
    extra: Any = {}
    with contextlib.suppress(ValueError, RecursionError):
        extra = json.loads(_field(entry, "EXTRA") or "{}")
    return LogLine.from_record({
        "message": message, "service": service or _field(entry, "SYSLOG_IDENTIFIER") or "",
        "log_level": _field(entry, "LOG_LEVEL") or _FROM_PRIORITY.get(priority, "ERROR"),
        "request_id": _field(entry, "REQUEST_ID"), "environment": _field(entry, "ENVIRONMENT"),
        "extra": extra}, timestamp=timestamp)


class JournalSource(LogSource):
    """`journalctl -o json`: the units `circles@<service>.service`, with field matches
    (`REQUEST_ID=…`); the level is filtered here (a JSON line on stderr has priority 6)."""

    name = "journal"

    def __init__(self, *, journalctl: str = "journalctl", directory: Path | None = None,
                 timeout_s: float = 10.0, restart_s: float = 2.0) -> None:
        self.journalctl, self.directory = journalctl, directory
        self.timeout_s, self.restart_s = timeout_s, restart_s

    def command(self, query: LogQuery, *, follow: bool = False) -> list[str]:
        """The journalctl command line of `query`: the newest `limit` entries (with a level,
        `JOURNAL_READ` times as many, to filter), newest first; or, with `follow`, the
        entries from now on."""
        args = [self.journalctl, "-o", "json", "--no-pager",
                "--output-fields=" + ",".join(JOURNAL_FIELDS)]
        if self.directory is not None:
            args.append(f"--directory={self.directory}")
        lines = query.limit if query.level in (None, "DEBUG") else query.limit * JOURNAL_READ
        args += ["--follow", "--lines=0"] if follow else ["--reverse", f"--lines={lines}"]
        args.append(f"--unit=circles@{query.service or '*'}.service")
        if query.request_id is not None:
            args.append(f"REQUEST_ID={query.request_id}")
        return args

    async def _run(self, args: list[str]) -> list[str]:
        process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=MAX_LINE)
        try:
            out, err = await asyncio.wait_for(process.communicate(), self.timeout_s)
        except TimeoutError:
            raise TemporaryError(f"journalctl did not answer within {self.timeout_s} s") from None
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode != 0:
            text = err.decode(errors="replace").strip()
            # A unit pattern that matches no unit yet: nothing logged, not an error.
            if "No data available" in text or not text:
                return []
            raise TemporaryError(f"journalctl: {text[-300:]}")
        return out.decode(errors="replace").splitlines()

    async def services(self) -> list[str]:
        args = [self.journalctl, "--no-pager", "--field=_SYSTEMD_UNIT"]
        if self.directory is not None:
            args.append(f"--directory={self.directory}")
        units = await self._run(args)
        return sorted({m.group(1) for u in units if (m := UNIT.fullmatch(u.strip()))})

    async def recent(self, query: LogQuery) -> list[LogLine]:
        lines = []
        for text in await self._run(self.command(query)):
            if (picked := query.pick(self._parse(text))) is not None:
                lines.append(picked)
                if len(lines) >= query.limit:
                    break
        return lines

    @staticmethod
    def _parse(text: str) -> LogLine | None:
        try:
            entry = json.loads(text)
        except (ValueError, RecursionError):
            return None
        return parse_journal_entry(entry) if isinstance(entry, dict) else None

    async def follow(self, query: LogQuery) -> AsyncGenerator[list[LogLine], None]:
        args = self.command(query, follow=True)
        while True:
            process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, limit=MAX_LINE)
            assert process.stdout is not None
            try:
                while True:
                    try:
                        raw = await asyncio.wait_for(process.stdout.readline(), POLL_S * 2)
                    except TimeoutError:
                        yield []
                        continue
                    except ValueError:  # a line over MAX_LINE: dropped
                        continue
                    if not raw:
                        break  # journalctl ended (no such unit yet, say): start it again
                    picked = query.pick(self._parse(raw.decode(errors="replace")))
                    yield [picked] if picked is not None else []
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await asyncio.sleep(self.restart_s)
            yield []


def under_systemd(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(environ.get("INVOCATION_ID") or environ.get("JOURNAL_STREAM"))


def open_source(kind: Literal["auto", "journal", "files"], directory: Path,
                timeout_s: float = 10.0, environ: Mapping[str, str] = os.environ) -> LogSource:
    """The source the setting `panel.logs` names: "auto" is the journal under systemd (when
    journalctl is there), else the files in `directory`."""
    journalctl = shutil.which("journalctl")
    if kind == "journal" and journalctl is None:
        raise ConfigError("config: panel.logs: \"journal\" needs journalctl, which is not "
                          "installed")
    if kind == "journal" or (kind == "auto" and journalctl and under_systemd(environ)):
        return JournalSource(journalctl=journalctl or "journalctl", timeout_s=timeout_s)
    return FileSource(directory)
