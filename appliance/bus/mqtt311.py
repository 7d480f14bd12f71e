"""MQTT 3.1.1 as the MT5 expert advisor speaks it: a small codec and an asyncio client.

The expert advisor cannot use a client library: its include file (`CirclesBridge.mqh`)
encodes the packets itself. This module encodes them the same way, byte for byte (the
packet test vectors of docs/mt5_protocol.md), so the simulator (`circles simulate mt5`)
talks to the broker exactly as a terminal does. It covers what the EA needs and nothing
more: CONNECT with credentials and a will, PUBLISH QoS 0/1 (retain, DUP), PUBACK,
SUBSCRIBE/SUBACK, PINGREQ/PINGRESP, DISCONNECT, and received PUBLISHes (QoS 1 answered
with PUBACK). Optional TLS checks the broker against a CA file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from appliance.errors import AuthError, OperationalError, TemporaryError

_T = TypeVar("_T")

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
MAX_REMAINING = 268_435_455  # four bytes of remaining length
_AUTH_CODES = {4, 5}  # bad user name or password, not authorized
_CONNACK_REASONS = {1: "unacceptable protocol version", 2: "client identifier rejected",
                    3: "server unavailable", 4: "bad user name or password",
                    5: "not authorized"}


class MalformedPacket(TemporaryError):
    """Bytes from the broker that are not an MQTT 3.1.1 packet a client may receive; the
    connection is dropped and made again."""


class ConnectionLost(TemporaryError):
    """The connection closed (or was never made); the caller reconnects."""


# -- the codec --------------------------------------------------------------------------------
def encode_length(value: int) -> bytes:
    """The remaining length as MQTT's variable-length integer (1 to 4 bytes)."""
    if not 0 <= value <= MAX_REMAINING:
        raise ValueError(f"remaining length {value} outside 0..{MAX_REMAINING}")
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def decode_length(data: bytes, at: int = 0) -> tuple[int, int]:
    """(the remaining length that starts at `data[at]`, the offset after it)."""
    value = 0
    for i in range(4):
        if at + i >= len(data):
            raise MalformedPacket("the remaining length is cut short")
        digit = data[at + i]
        value += (digit & 0x7F) << (7 * i)
        if not digit & 0x80:
            return value, at + i + 1
    raise MalformedPacket("a remaining length longer than four bytes")


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    if len(data) > 0xFFFF:
        raise ValueError(f"a string of {len(data)} bytes is longer than 65535")
    return len(data).to_bytes(2, "big") + data


def _packet_id(value: int) -> bytes:
    if not 1 <= value <= 0xFFFF:
        raise ValueError(f"packet id {value} outside 1..65535")
    return value.to_bytes(2, "big")


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_length(len(body)) + body


@dataclass(frozen=True)
class Will:
    """What the broker publishes for the client when its connection drops without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def encode_connect(client_id: str, *, username: str | None = None, password: str | None = None,
                   will: Will | None = None, keepalive: int = 60,
                   clean_session: bool = True) -> bytes:
    if password is not None and username is None:
        raise ValueError("MQTT 3.1.1 sends a password only with a user name")
    if not 0 <= keepalive <= 0xFFFF:
        raise ValueError(f"keep alive {keepalive} outside 0..65535")
    flags = 0x02 if clean_session else 0
    payload = _string(client_id)
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError(f"will QoS {will.qos}")
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        payload += _string(will.topic) + _string(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        flags |= 0x40
        payload += _string(password)
    header = _string("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
    return _packet(CONNECT << 4, header + payload)


def encode_publish(topic: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                   dup: bool = False, packet_id: int | None = None) -> bytes:
    if not topic or "+" in topic or "#" in topic:
        raise ValueError(f"{topic!r} is not a topic name one may publish to")
    if qos not in (0, 1):
        raise ValueError(f"QoS {qos}: this client publishes QoS 0 or 1")
    if qos == 0 and (dup or packet_id is not None):
        raise ValueError("a QoS 0 PUBLISH has neither DUP nor a packet id")
    if qos and packet_id is None:
        raise ValueError("a QoS 1 PUBLISH needs a packet id")
    first = PUBLISH << 4 | (0x08 if dup else 0) | qos << 1 | (0x01 if retain else 0)
    body = _string(topic) + (_packet_id(packet_id) if packet_id is not None else b"") + payload
    return _packet(first, body)


def encode_puback(packet_id: int) -> bytes:
    return _packet(PUBACK << 4, _packet_id(packet_id))


def encode_subscribe(packet_id: int, filters: Sequence[tuple[str, int]]) -> bytes:
    if not filters:
        raise ValueError("a SUBSCRIBE needs at least one filter")
    body = _packet_id(packet_id)
    for flt, qos in filters:
        if not flt or qos not in (0, 1, 2):
            raise ValueError(f"filter {flt!r} with QoS {qos}")
        body += _string(flt) + bytes([qos])
    return _packet(SUBSCRIBE << 4 | 0x02, body)  # flags 0010: fixed by the standard


def encode_pingreq() -> bytes:
    return _packet(PINGREQ << 4, b"")


def encode_disconnect() -> bytes:
    return _packet(DISCONNECT << 4, b"")


@dataclass(frozen=True)
class Connack:
    session_present: bool
    return_code: int


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(frozen=True)
class Puback:
    packet_id: int


@dataclass(frozen=True)
class Suback:
    packet_id: int
    granted: tuple[int, ...]  # 0, 1, 2 or 0x80 (refused), one per filter


@dataclass(frozen=True)
class Pingresp:
    pass


Packet = Connack | Publish | Puback | Suback | Pingresp


def parse(first: int, body: bytes) -> Packet:
    """The packet of fixed-header byte `first` and the `body` after the remaining length."""
    kind, flags = first >> 4, first & 0x0F
    if kind == PUBLISH:
        qos = flags >> 1 & 0x03
        if qos == 3:
            raise MalformedPacket("PUBLISH with QoS 3")
        if len(body) < 2:
            raise MalformedPacket("PUBLISH without a topic")
        size = int.from_bytes(body[:2], "big")
        at = 2 + size
        if len(body) < at + (2 if qos else 0):
            raise MalformedPacket("PUBLISH shorter than its topic and packet id")
        try:
            topic = body[2:at].decode()
        except UnicodeDecodeError:
            raise MalformedPacket("PUBLISH topic is not UTF-8") from None
        packet_id = None
        if qos:
            packet_id = int.from_bytes(body[at:at + 2], "big")
            at += 2
        return Publish(topic, bytes(body[at:]), qos, bool(flags & 0x01), bool(flags & 0x08),
                       packet_id)
    expected = {CONNACK: 0, PUBACK: 0, SUBACK: 0, PINGRESP: 0}
    if kind not in expected:
        raise MalformedPacket(f"packet type {kind} is not one a client receives")
    if flags != expected[kind]:
        raise MalformedPacket(f"packet type {kind} with reserved flags {flags:#x}")
    if kind == CONNACK:
        if len(body) != 2 or body[0] & 0xFE:
            raise MalformedPacket("CONNACK is two bytes, the first 0 or 1")
        return Connack(bool(body[0] & 0x01), body[1])
    if kind == PUBACK:
        if len(body) != 2:
            raise MalformedPacket("PUBACK is two bytes")
        return Puback(int.from_bytes(body, "big"))
    if kind == SUBACK:
        if len(body) < 3:
            raise MalformedPacket("SUBACK without a grant")
        return Suback(int.from_bytes(body[:2], "big"), tuple(body[2:]))
    if body:
        raise MalformedPacket("PINGRESP has no body")
    return Pingresp()


def decode(data: bytes) -> Packet:
    """Exactly one whole packet."""
    if not data:
        raise MalformedPacket("no bytes")
    length, at = decode_length(data, 1)
    if len(data) != at + length:
        raise MalformedPacket(f"remaining length {length}, but {len(data) - at} bytes follow")
    return parse(data[0], data[at:])


async def read_packet(reader: asyncio.StreamReader) -> Packet:
    """The next packet from the stream; ConnectionLost when it ends."""
    try:
        first = (await reader.readexactly(1))[0]
        length, multiplier = 0, 1
        for _ in range(4):
            digit = (await reader.readexactly(1))[0]
            length += (digit & 0x7F) * multiplier
            multiplier *= 128
            if not digit & 0x80:
                break
        else:
            raise MalformedPacket("a remaining length longer than four bytes")
        body = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        raise ConnectionLost("the broker closed the connection") from None
    except OSError as exc:
        raise ConnectionLost(f"connection lost: {exc}") from None
    return parse(first, body)


# -- the client -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Address:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None


class Client:
    """One MQTT 3.1.1 connection. It is not remade when it drops: `wait_closed()` says when
    (and why), and the owner connects a new one, as the EA does."""

    def __init__(self, address: Address, client_id: str, *, will: Will | None = None,
                 keepalive: int = 60, clean_session: bool = True) -> None:
        self.address, self.client_id, self.will = address, client_id, will
        self.keepalive, self.clean_session = keepalive, clean_session
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._write_lock = asyncio.Lock()
        self._next_id = 0
        self._pubacks: dict[int, asyncio.Future[None] | None] = {}
        self._subacks: dict[int, asyncio.Future[tuple[int, ...]]] = {}
        self._pings: list[asyncio.Future[None]] = []
        self._ping_sent: float | None = None
        self._last_sent = self._last_received = 0.0
        self._incoming: asyncio.Queue[Publish | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()
        self._error: BaseException | None = None
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    async def connect(self, timeout: float = 10.0) -> Connack:
        """Open the connection and wait for CONNACK. AuthError when the broker refuses the
        credentials, ConnectionLost when it cannot be reached."""
        a = self.address
        context = None
        if a.tls:
            context = ssl.create_default_context(cafile=str(a.ca_file) if a.ca_file else None)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(a.host, a.port, ssl=context,
                                        server_hostname=a.host if context else None), timeout)
            self._reader, self._writer = reader, writer
            writer.write(encode_connect(
                self.client_id, username=a.username, password=a.password, will=self.will,
                keepalive=self.keepalive, clean_session=self.clean_session))
            await writer.drain()
            packet = await asyncio.wait_for(read_packet(reader), timeout)
        except (OSError, TimeoutError) as exc:
            self._drop()
            raise ConnectionLost(f"broker {a.host}:{a.port} not reachable: "
                                 f"{exc or type(exc).__name__}") from None
        except TemporaryError:
            self._drop()
            raise
        if not isinstance(packet, Connack):
            self._drop()
            raise MalformedPacket(f"expected CONNACK, got {type(packet).__name__}")
        if packet.return_code:
            self._drop()
            reason = _CONNACK_REASONS.get(packet.return_code, f"code {packet.return_code}")
            if packet.return_code in _AUTH_CODES:
                raise AuthError(f"broker refused {a.username!r}: {reason}")
            if packet.return_code == 3:
                raise ConnectionLost(f"broker refused the connection: {reason}")
            raise OperationalError(f"broker refused the connection: {reason}")
        loop = asyncio.get_running_loop()
        self._connected, self._last_sent = True, loop.time()
        self._last_received = self._last_sent
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._keep_alive())]
        return packet

    async def publish(self, topic: str, payload: bytes | str, *, qos: int = 0,
                      retain: bool = False, wait: bool = False, timeout: float = 10.0) -> int:
        """Send a PUBLISH; returns its packet id (0 for QoS 0). With `wait`, returns once
        the broker's PUBACK came."""
        data = payload.encode() if isinstance(payload, str) else payload
        if not qos:
            await self._send(encode_publish(topic, data, retain=retain))
            return 0
        packet_id = self._new_id()
        future = asyncio.get_running_loop().create_future() if wait else None
        self._pubacks[packet_id] = future
        try:
            await self._send(encode_publish(topic, data, qos=qos, retain=retain,
                                            packet_id=packet_id))
            if future is not None:
                await self._wait(future, timeout, f"PUBACK for {topic}")
        finally:
            if future is not None:
                self._pubacks.pop(packet_id, None)
        return packet_id

    async def subscribe(self, filters: Sequence[tuple[str, int]],
                        timeout: float = 10.0) -> tuple[int, ...]:
        """Subscribe and return the granted QoS; AuthError when the broker refuses one."""
        packet_id = self._new_id()
        future: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()
        self._subacks[packet_id] = future
        try:
            await self._send(encode_subscribe(packet_id, filters))
            granted = await self._wait(future, timeout, "SUBACK")
        finally:
            self._subacks.pop(packet_id, None)
        refused = [f for (f, _), code in zip(filters, granted, strict=False) if code == 0x80]
        if refused or len(granted) != len(filters):
            raise AuthError(f"broker refused the subscription to {', '.join(refused) or filters}")
        return granted

    async def ping(self, timeout: float = 10.0) -> None:
        """PINGREQ, and wait for the PINGRESP."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings.append(future)
        await self._send_ping()
        await self._wait(future, timeout, "PINGRESP")

    async def messages(self) -> AsyncIterator[Publish]:
        """Every PUBLISH received, in order, until the connection ends."""
        while True:
            item = await self._incoming.get()
            if item is None:
                self._incoming.put_nowait(None)  # later readers end too
                return
            yield item

    async def wait_closed(self) -> BaseException | None:
        """Wait for the end of the connection: None after `disconnect()`, else why it ended."""
        await self._closed.wait()
        return self._error

    async def disconnect(self) -> None:
        """DISCONNECT and close: the broker discards the will."""
        if self._connected:
            with contextlib.suppress(TemporaryError):
                await self._send(encode_disconnect())
        self._lose(None)
        await self._finish()

    async def abort(self) -> None:
        """Close the socket without DISCONNECT, as a crash would: the broker sends the will."""
        if self._writer is not None:
            self._writer.transport.abort()
        self._lose(ConnectionLost("aborted"))
        await self._finish()

    # -- inside ---------------------------------------------------------------------------
    def _new_id(self) -> int:
        for _ in range(0xFFFF):
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self._pubacks and self._next_id not in self._subacks:
                return self._next_id
        raise TemporaryError("65535 packets wait for their acknowledgement")

    async def _send(self, data: bytes) -> None:
        if not self._connected or self._writer is None:
            raise ConnectionLost(f"not connected ({self._error or 'closed'})")
        async with self._write_lock:
            try:
                self._writer.write(data)
                self._last_sent = asyncio.get_running_loop().time()
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                self._lose(ConnectionLost(f"connection lost: {exc}"))
                raise ConnectionLost(f"connection lost: {exc}") from None

    async def _send_ping(self) -> None:
        if self._ping_sent is None:
            self._ping_sent = asyncio.get_running_loop().time()
        await self._send(encode_pingreq())

    async def _wait(self, future: asyncio.Future[_T], timeout: float, what: str) -> _T:
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise TemporaryError(f"no {what} within {timeout:g} s") from None

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while True:
                packet = await read_packet(self._reader)
                self._last_received = asyncio.get_running_loop().time()
                if isinstance(packet, Publish):
                    self._incoming.put_nowait(packet)
                    if packet.qos == 1 and packet.packet_id is not None:
                        await self._send(encode_puback(packet.packet_id))
                elif isinstance(packet, Puback):
                    puback = self._pubacks.pop(packet.packet_id, None)
                    if puback is not None and not puback.done():
                        puback.set_result(None)
                elif isinstance(packet, Suback):
                    suback = self._subacks.get(packet.packet_id)
                    if suback is not None and not suback.done():
                        suback.set_result(packet.granted)
                elif isinstance(packet, Pingresp):
                    self._ping_sent = None
                    pings, self._pings = self._pings, []
                    for ping in pings:
                        if not ping.done():
                            ping.set_result(None)
                else:
                    raise MalformedPacket(f"unexpected {type(packet).__name__}")
        except TemporaryError as exc:
            self._lose(exc)

    async def _keep_alive(self) -> None:
        """PINGREQ when nothing was sent, or nothing received, for half the keep alive (a
        client that keeps publishing would otherwise never learn that the broker went
        silent); a PINGRESP missing for a whole keep alive means the connection is dead."""
        if not self.keepalive:
            return
        loop, half = asyncio.get_running_loop(), self.keepalive / 2
        try:
            while self._connected:
                now = loop.time()
                if self._ping_sent is not None and now - self._ping_sent >= self.keepalive:
                    self._lose(ConnectionLost(f"no PINGRESP within {self.keepalive} s"))
                    return
                if self._ping_sent is None and now - min(self._last_sent, self._last_received) >= half:
                    await self._send_ping()
                await asyncio.sleep(min(1.0, half / 4))
        except TemporaryError:
            pass  # _send() recorded why

    def _lose(self, error: BaseException | None) -> None:
        """Mark the connection ended (once) and fail everything waiting on it."""
        if self._closed.is_set():
            return
        self._connected, self._error = False, error
        reason = error or ConnectionLost("disconnected")
        waiting: list[asyncio.Future[None] | None] = [*self._pubacks.values(), *self._pings]
        for future in [*waiting, *self._subacks.values()]:
            if future is not None and not future.done():
                future.set_exception(reason)
                future.exception()  # retrieved: nobody else may be waiting for it
        self._pubacks.clear()
        self._pings.clear()
        self._incoming.put_nowait(None)
        self._drop()
        self._closed.set()

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()

    async def _finish(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current),
                             return_exceptions=True)
        if self._writer is not None:
            with contextlib.suppress(OSError, ssl.SSLError):
                await self._writer.wait_closed()

