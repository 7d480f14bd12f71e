"""The Mosquitto transport: paho-mqtt 2.x (MQTT v5) driven by the asyncio loop.

paho's socket hooks put its reads and writes on the event loop, so there is no network
thread and no cross-thread hand-off per message. QoS 1 messages are acknowledged
only when `ack()` is called (paho's manual acks) and sessions persist across
reconnects, so a message received but not yet handled is redelivered after a crash.
This file and `admin.py` are the only places that import paho.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from appliance.bus.base import BaseBus
from appliance.bus.message import Message
from appliance.bus.mqtt311 import encode_length
from appliance.bus.topics import Filter
from appliance.errors import AuthError, TemporaryError

log = logging.getLogger("circles.bus")
_AUTH_CODES = {134, 135}  # Bad user name or password, Not authorized


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    keepalive_s: int = 30
    receive_maximum: int = 1000
    session_expiry_s: int = 7 * 86400
    reconnect_max_s: float = 10.0

    def __repr__(self) -> str:  # never show the password
        return f"BrokerAddress({self.host}:{self.port}, user={self.username!r}, tls={self.tls})"


def _utf8(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


class _PublishProperties(Properties):
    """The PUBLISH properties we send (response topic, correlation data, user properties),
    packed once, byte for byte as paho would: paho's generic Properties costs ~80 µs per
    message to build and pack, more than the rest of a publish."""

    _packed: bytes
    _template = Properties(PacketTypes.PUBLISH)  # paho's tables, for its __str__ and logging
    types, names, properties = _template.types, _template.names, _template.properties

    def __init__(self, message: Message) -> None:
        body = bytearray()
        if message.response_topic:
            body += b"\x08" + _utf8(message.response_topic)
        if message.correlation:
            body += b"\x09" + _utf8(message.correlation)
        for key, value in (("request_id", message.request_id), ("sender", message.sender),
                           ("sent_at", message.sent_at)):
            if value:
                body += b"\x26" + _utf8(key) + _utf8(value)
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_packed", encode_length(len(body)) + bytes(body))

    def pack(self) -> bytes:
        return self._packed


class _NoTopicCallbacks:
    def iter_match(self, topic: str) -> tuple[()]:
        return ()


class _BufferedReads:
    """A socket whose recv() serves small reads from one large read."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = b""
        self._at = 0

    def recv(self, size: int) -> bytes:
        if self._at >= len(self._buffer):
            self._buffer, self._at = self._sock.recv(65536), 0  # BlockingIOError passes on
            if not self._buffer:
                return b""  # the peer closed the connection
        chunk = self._buffer[self._at:self._at + size]
        self._at += len(chunk)
        return chunk

    def pending(self) -> int:
        """Bytes received and not yet read (TLS: decrypted ones included)."""
        tls = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buffer) - self._at + tls

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class MqttBus(BaseBus):
    """A Mosquitto client. `persistent` keeps the session (and QoS 1 messages queued for
    it) across disconnects; short-lived tools pass False."""

    def __init__(self, name: str, address: BrokerAddress, *, client_id: str | None = None,
                 status: bool = True, persistent: bool = True) -> None:
        super().__init__(name, status=status)
        self.address = address
        self.client_id = client_id or f"circles-{name}"
        self.persistent = persistent
        # QoS 1 messages sent and not yet acknowledged by the broker, at most `_window`:
        # the smaller of our Receive Maximum setting and the broker's.
        self._window = address.receive_maximum
        self._unacked: dict[int, asyncio.Future[None] | None] = {}
        self._drained = asyncio.Event()
        self._subacks: dict[int, tuple[asyncio.Future[None], list[str]]] = {}
        self._connack: asyncio.Future[None] | None = None
        self._is_connected = False
        self._generation = 0
        self._writing = False
        self._backoff = 0.1
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnecting: asyncio.Task[None] | None = None
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def connected(self) -> bool:
        return self._is_connected

    # -- connecting -------------------------------------------------------------------------
    def _build_client(self) -> mqtt.Client:
        a = self.address
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        if a.username:
            client.username_pw_set(a.username, a.password)
        if a.tls:
            client.tls_set(ca_certs=str(a.ca_file) if a.ca_file else None,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will := self.status_will():
            client.will_set(will[0], will[1], qos=1, retain=True)
        # The in-flight window is kept here (`_send`): paho's own costs O(window) per PUBACK.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        # paho looks every received topic up in its per-topic callback tree, which we never
        # fill (everything arrives through on_message): an empty lookup saves that walk.
        client._on_message_filtered = _NoTopicCallbacks()  # type: ignore[assignment]
        return client

    async def connect(self, timeout: float = 30.0) -> None:
        """Connect, retrying with backoff for up to `timeout` s; AuthError at once if the
        broker refuses the credentials."""
        self._loop = asyncio.get_running_loop()
        self._client = self._build_client()
        deadline = self._loop.time() + timeout
        while True:
            self._connack = self._loop.create_future()
            try:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.address.session_expiry_s if self.persistent else 0
                props.ReceiveMaximum = self.address.receive_maximum
                self._client.connect(self.address.host, self.address.port,
                                     self.address.keepalive_s, clean_start=not self.persistent,
                                     properties=props)
                await asyncio.wait_for(self._connack, max(0.1, deadline - self._loop.time()))
                return
            except AuthError:
                raise
            except (OSError, TemporaryError, TimeoutError) as exc:
                if self._loop.time() + self._backoff >= deadline:
                    await self.close()
                    raise TemporaryError(
                        f"broker {self.address.host}:{self.address.port} unreachable: {exc}"
                    ) from None
                log.warning("broker not reachable, retrying",
                            extra={"error": str(exc), "retry_in_s": self._backoff})
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, self.address.reconnect_max_s)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            err: Exception = (AuthError if reason.value in _AUTH_CODES else TemporaryError)(
                f"broker refused the connection: {reason}")
            if self._connack and not self._connack.done():
                self._connack.set_exception(err)
            else:
                log.error("broker refused the connection", extra={"reason": str(reason)})
            return
        self._is_connected = True
        self._generation += 1
        self._window = min(self.address.receive_maximum,
                           getattr(properties, "ReceiveMaximum", 65535) or 65535)
        self._backoff = 0.1
        if self._connack and not self._connack.done():
            self._connack.set_result(None)
        else:
            log.info("reconnected to the broker", extra={"session_present": flags.session_present})
            self._spawn(self._resume())

    async def _resume(self) -> None:
        """After a reconnect: renew subscriptions, then say online again."""
        try:
            if self._filters:
                await self._subscribe([(Filter(f), q) for f, q in self._filters.items()])
            if self._online:
                await self.announce_online()
        except Exception:  # noqa: BLE001 - drop the connection: the reconnect resumes again
            log.exception("resuming after reconnect failed; reconnecting")
            if self._client is not None and self._is_connected:
                self._client.disconnect()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        was_connected, self._is_connected = self._is_connected, False
        if self._closing:
            return
        if was_connected:
            log.warning("disconnected from the broker", extra={"reason": str(reason)})
        # Before the first CONNACK connect() does its own retrying; paho may report one lost
        # connection twice (keepalive and ping timeouts), so only one reconnect task runs.
        if self._generation and (self._reconnecting is None or self._reconnecting.done()):
            self._reconnecting = self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        assert self._client is not None
        while not self._closing and not self._is_connected:
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, self.address.reconnect_max_s)
            try:
                self._client.reconnect()
                return  # CONNACK (or the refusal and a new disconnect) follows on the loop
            except OSError as exc:
                log.debug("reconnect failed", extra={"error": str(exc)})

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the socket on the event loop -------------------------------------------------------
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        # Without TCP_NODELAY a small packet (a PUBACK, a reply) written while an earlier one
        # is unacknowledged waits for the peer's delayed ACK: ~40 ms on every hop.
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # paho reads a packet in three or more recv() calls of a few bytes; the buffer turns
        # that into one recv() per 64 KiB. paho keeps the socket it calls back with here.
        sock = client._sock = _BufferedReads(sock)
        self._loop.add_reader(sock, self._readable, sock)
        self._spawn(self._misc_loop(sock))

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._writing = False

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if not self._writing:
            assert self._loop is not None
            self._loop.add_writer(sock, self._writable)
            self._writing = True

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)
        self._writing = False

    def _readable(self, sock: _BufferedReads) -> None:
        assert self._client is not None
        self._client.loop_read()
        # Every packet already read from the file descriptor, which no longer signals them.
        while sock.pending() and self._client.socket() is sock:
            self._client.loop_read()

    def _writable(self) -> None:
        assert self._client is not None
        self._client.loop_write()

    async def _misc_loop(self, sock: Any) -> None:
        assert self._client is not None
        while self._client.socket() is sock:
            self._client.loop_misc()  # keepalive pings and timeouts
            await asyncio.sleep(1.0)

    # -- messages ---------------------------------------------------------------------------
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            props = msg.properties
            user = dict(getattr(props, "UserProperty", None) or ())
            self._deliver(Message(
                msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain),
                request_id=user.get("request_id"), sender=user.get("sender"),
                sent_at=user.get("sent_at"), response_topic=getattr(props, "ResponseTopic", None),
                correlation=getattr(props, "CorrelationData", None),
                token=(self._generation, msg.mid) if msg.qos else None))
        except Exception:  # noqa: BLE001 - never let one message break the read loop
            log.exception("could not take a received message", extra={"topic": msg.topic})

    def _ack(self, message: Message) -> None:
        generation, mid = message.token
        # An ack from before a reconnect is dropped: the broker redelivers that message.
        if generation == self._generation and self._is_connected and self._client:
            self._client.ack(mid, message.qos)

    async def _send(self, message: Message, wait: bool) -> None:
        if self._client is None:
            raise TemporaryError("the bus is not connected")
        while message.qos and len(self._unacked) >= self._window:
            self._drained.clear()
            await self._drained.wait()
        info = self._client.publish(message.topic, message.payload, message.qos, message.retain,
                                    properties=_PublishProperties(message))
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise TemporaryError(f"publish to {message.topic} failed: {mqtt.error_string(info.rc)}")
        if message.qos == 0:
            return
        future = asyncio.get_running_loop().create_future() if wait else None
        self._unacked[info.mid] = future
        if future is not None:
            await future

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        future = self._unacked.pop(mid, None)
        if future is None and reason.is_failure:
            log.warning("broker refused a publish", extra={"mid": mid, "reason": str(reason)})
        if future is not None and not future.done():
            if reason.is_failure:
                future.set_exception(AuthError(f"broker refused the publish: {reason}"))
            else:
                future.set_result(None)
        if len(self._unacked) < self._window:
            self._drained.set()

    async def _subscribe(self, filters: Sequence[tuple[Filter, int]]) -> None:
        if self._client is None or not self._is_connected:
            raise TemporaryError("the bus is not connected")
        wanted = [(str(f), SubscribeOptions(qos=q)) for f, q in filters]
        rc, mid = self._client.subscribe(wanted)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise TemporaryError(f"subscribe failed: {mqtt.error_string(rc)}")
        future = asyncio.get_running_loop().create_future()
        self._subacks[mid] = (future, [f for f, _ in wanted])
        try:
            await asyncio.wait_for(future, 10.0)
        except TimeoutError:
            raise TemporaryError(f"no SUBACK for {[f for f, _ in wanted]} within 10 s") from None
        finally:
            self._subacks.pop(mid, None)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Any) -> None:
        future, names = self._subacks.pop(mid, (None, []))
        if future is None or future.done():
            return
        refused = [f"{name} ({r})" for name, r in zip(names, reasons, strict=False) if r.is_failure]
        if refused:
            future.set_exception(AuthError("subscription refused: " + ", ".join(refused)))
        else:
            future.set_result(None)

    async def _disconnect(self) -> None:
        if self._client is None:
            return
        sock = self._client.socket()
        self._client.disconnect()
        # The DISCONNECT goes out on the loop; paho closes the socket once it is written.
        for _ in range(25):
            if self._client.socket() is not sock or sock is None:
                break
            await asyncio.sleep(0.02)
        for task in list(self._tasks):
            task.cancel()
        self._is_connected = False
