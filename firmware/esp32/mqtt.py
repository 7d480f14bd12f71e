"""A small MQTT 3.1.1 client: CONNECT with credentials and last will, PUBLISH QoS 0/1,
SUBSCRIBE, PINGREQ, optional TLS.

Single-threaded and poll driven, so the node's loop decides when the network is served.
QoS 1 publishes stay in `inflight` until their PUBACK: resent with the DUP flag when no
PUBACK came within `retry_ms`, and again after every reconnect, oldest first. A broker that
answers nothing for a keepalive period while an answer is due (a PUBACK, a PINGRESP) counts
as gone: Wi-Fi that drops without a word would otherwise look like a slow broker forever.
"""

import select
import socket
import time

CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
SUBSCRIBE = 0x82
SUBACK = 0x90
PINGREQ = b"\xc0\x00"
PINGRESP = 0xD0
DISCONNECT = b"\xe0\x00"

REFUSED = {1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
           4: "bad user name or password", 5: "not authorized"}


class MQTTError(Exception):
    """The broker refused something (CONNACK code, SUBACK failure) or broke the protocol."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


def _string(value):
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def _packet(first, body):
    n = len(body)
    head = bytearray([first])
    while True:
        byte = n & 0x7F
        n >>= 7
        head.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(head) + body


class MQTTClient:
    def __init__(self, client_id, host, port=1883, username=None, password=None, keepalive_s=30,
                 tls=False, ca_cert=None, server_hostname=None, timeout_s=10, retry_ms=10000,
                 max_inflight=10):
        self.client_id = client_id
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.keepalive_ms = keepalive_s * 1000
        self.tls = tls
        self.ca_cert = ca_cert
        self.server_hostname = server_hostname or host
        self.timeout_s = timeout_s
        self.retry_ms = retry_ms
        self.max_inflight = max_inflight
        self.will = None
        self.on_message = None  # (topic, payload bytes, retained) -> None
        self.sock = None
        self.poller = None
        # [packet id, packet with the DUP flag unset, ticks when last sent], oldest first
        self.inflight = []
        self._pid = 0
        self._last_out = 0
        self._ping_sent = None
        self._waiting_since = None  # ticks since when an answer is due and none has come
        # Set while a packet is half read or half written: an interrupt (Ctrl-C) that lands
        # there leaves the stream out of step, and nothing more may be sent on it.
        self._torn = False

    @property
    def connected(self):
        return self.sock is not None

    @property
    def usable(self):
        return self.sock is not None and not self._torn

    def set_last_will(self, topic, payload, retain=True, qos=1):
        self.will = (topic, payload, retain, qos)

    # -- connection --------------------------------------------------------------------------
    def connect(self, clean_session=True):
        """Connect and wait for CONNACK; then resend every unacknowledged publish.
        OSError when the broker cannot be reached, MQTTError when it refuses."""
        self.close()
        addr = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0][-1]
        sock = socket.socket()
        try:
            sock.settimeout(self.timeout_s)
            sock.connect(addr)
            if self.tls:
                sock = self._wrap(sock)
        except ValueError as exc:
            # MicroPython's ssl reports a certificate it does not trust as ValueError.
            sock.close()
            why = " ".join(str(exc).split())
            raise MQTTError(f"TLS: {why}") from None
        except Exception:
            sock.close()
            raise
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        try:
            self._write(_packet(CONNECT, self._connect_body(clean_session)))
            kind, body = self._read_packet()
            if kind != CONNACK or len(body) != 2:
                raise MQTTError(f"expected CONNACK, got packet type {kind:#04x}")
            if body[1]:
                why = REFUSED.get(body[1], body[1])
                raise MQTTError(f"broker refused the connection: {why}", body[1])
            self._ping_sent = None
            self._waiting_since = None
            for entry in self.inflight:
                self._send_publish(entry, dup=True)
        except Exception:
            self.close()
            raise

    def _wrap(self, sock):
        import ssl  # only nodes that use TLS pay for it

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cadata=self.ca_cert)
        except Exception:  # noqa: BLE001 - older MicroPython takes one DER certificate only
            ctx.load_verify_locations(cadata=_pem_to_der(self.ca_cert))
        return ctx.wrap_socket(sock, server_hostname=self.server_hostname)

    def _connect_body(self, clean_session):
        flags = 0x02 if clean_session else 0
        payload = _string(self.client_id)
        if self.will:
            topic, message, retain, qos = self.will
            flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
            payload += _string(topic) + _string(message)
        if self.username is not None:
            flags |= 0x80
            payload += _string(self.username)
            if self.password is not None:
                flags |= 0x40
                payload += _string(self.password)
        keepalive = (self.keepalive_ms // 1000).to_bytes(2, "big")
        return _string("MQTT") + bytes([4, flags]) + keepalive + payload

    def disconnect(self):
        """A clean DISCONNECT: the broker then does not publish the last will."""
        if self.sock is not None:
            try:
                self._write(DISCONNECT)
            except OSError:
                pass
        self.close()

    def close(self):
        """Drop the connection; what is in flight stays, to be resent on the next connect."""
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.poller = None
        self._torn = False

    # -- sending -----------------------------------------------------------------------------
    def can_publish(self):
        return self.sock is not None and len(self.inflight) < self.max_inflight

    def publish(self, topic, payload, qos=0, retain=False):
        """Send a PUBLISH; for QoS 1 its packet id, in `inflight` until acknowledged.
        A QoS 1 message is kept even when sending it fails (OSError), and resent after
        reconnecting; OSError before anything is kept when there is no connection."""
        if self.sock is None:
            raise OSError("not connected")
        if isinstance(payload, str):
            payload = payload.encode()
        first = PUBLISH | (qos << 1) | (1 if retain else 0)
        if not qos:
            self._write(_packet(first, _string(topic) + payload))
            return None
        pid = self._next_pid()
        entry = [pid, _packet(first, _string(topic) + pid.to_bytes(2, "big") + payload), 0]
        self.inflight.append(entry)
        self._send_publish(entry, dup=False)
        return pid

    def _send_publish(self, entry, dup):
        packet = entry[1]
        if dup:
            packet = bytes([packet[0] | 0x08]) + packet[1:]
        entry[2] = time.ticks_ms()
        if self._waiting_since is None:
            self._waiting_since = entry[2]
        self._write(packet)

    def _next_pid(self):
        busy = [entry[0] for entry in self.inflight]
        while True:
            self._pid = self._pid % 65535 + 1
            if self._pid not in busy:
                return self._pid

    def subscribe(self, filters):
        """Subscribe to [(filter, qos)] and wait for the SUBACK; MQTTError names the filters
        the broker refused (its ACL), which are the only ones not subscribed."""
        pid = self._next_pid()
        body = pid.to_bytes(2, "big")
        for topic, qos in filters:
            body += _string(topic) + bytes([qos])
        self._write(_packet(SUBSCRIBE, body))
        deadline = time.ticks_add(time.ticks_ms(), self.timeout_s * 1000)
        while time.ticks_diff(deadline, time.ticks_ms()) > 0:
            kind, body = self._read_packet()
            if kind == SUBACK and int.from_bytes(body[:2], "big") == pid:
                codes = body[2:]
                refused = [filters[i][0] for i in range(min(len(filters), len(codes))) if codes[i] & 0x80]
                if refused:
                    names = ", ".join(refused)
                    raise MQTTError(f"subscription refused: {names}")
                return
            self._dispatch(kind, body)
        raise OSError(f"no SUBACK within {self.timeout_s} s")

    def _write(self, data):
        sent = 0
        self._torn = True
        try:
            while sent < len(data):
                n = self.sock.write(data[sent:] if sent else data)
                if n is None:
                    continue
                if not n:
                    raise OSError("connection closed")
                sent += n
        except Exception:
            self.close()
            raise
        self._torn = False
        self._last_out = time.ticks_ms()

    # -- receiving ---------------------------------------------------------------------------
    def poll(self, timeout_ms=0):
        """Wait up to `timeout_ms` for the broker, handle what it sent, keep the connection
        alive and resend overdue publishes. OSError when the connection is lost."""
        if self.sock is None:
            raise OSError("not connected")
        wait = timeout_ms
        handled = 0
        while handled < 20:  # bounded, so a chatty broker cannot starve the node's readings
            events = self.poller.poll(wait)
            if not events:
                break
            if events[0][1] & (select.POLLHUP | select.POLLERR) and not events[0][1] & select.POLLIN:
                self.close()
                raise OSError("connection closed by the broker")
            kind, body = self._read_packet()
            self._dispatch(kind, body)
            handled += 1
            wait = 0
        self._keepalive()
        self._retry()

    def _read_exactly(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.read(n - len(data))
            if chunk is None:
                continue  # a TLS record not complete yet
            if not chunk:
                raise OSError("connection closed by the broker")
            data += chunk
        return data

    def _read_packet(self):
        self._torn = True
        try:
            first = self._read_exactly(1)[0]
            length, shift = 0, 0
            while True:
                byte = self._read_exactly(1)[0]
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise MQTTError("malformed remaining length")
            body = self._read_exactly(length) if length else b""
        except Exception:
            self.close()
            raise
        self._torn = False
        self._waiting_since = time.ticks_ms()  # whatever it is, the broker is alive
        return first, body

    def _dispatch(self, first, body):
        kind = first & 0xF0
        if kind == PUBLISH:
            self._received(first, body)
        elif kind == PUBACK:
            pid = int.from_bytes(body[:2], "big")
            for i, entry in enumerate(self.inflight):
                if entry[0] == pid:
                    del self.inflight[i]
                    break
        elif kind == PINGRESP:
            self._ping_sent = None

    def _received(self, first, body):
        qos = (first >> 1) & 0x03
        n = int.from_bytes(body[:2], "big")
        topic = body[2:2 + n].decode()
        at = 2 + n
        if qos:
            pid = body[at:at + 2]
            at += 2
            # Acknowledged before handling: a command is not worth a redelivery loop on a
            # node that has no outputs to drive.
            self._write(_packet(PUBACK, pid))
        if self.on_message:
            self.on_message(topic, body[at:], bool(first & 0x01))

    def _keepalive(self):
        if not self.keepalive_ms:
            return
        now = time.ticks_ms()
        if not self.inflight and self._ping_sent is None:
            self._waiting_since = None
        elif self._waiting_since is not None and time.ticks_diff(now, self._waiting_since) > self.keepalive_ms:
            self.close()
            raise OSError(f"no answer from the broker for {self.keepalive_ms // 1000} s")
        if self._ping_sent is None and time.ticks_diff(now, self._last_out) >= self.keepalive_ms // 2:
            self._write(PINGREQ)
            self._ping_sent = now
            if self._waiting_since is None:
                self._waiting_since = now

    def _retry(self):
        now = time.ticks_ms()
        for entry in self.inflight:
            if time.ticks_diff(now, entry[2]) >= self.retry_ms:
                self._send_publish(entry, dup=True)


def _pem_to_der(pem):
    import binascii

    text = pem.decode() if isinstance(pem, bytes) else pem
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ValueError("broker.ca_cert holds no PEM certificate")
    return binascii.a2b_base64("".join(text[start + len(begin):stop].split()))
