"""Stand-ins for the notify service's endpoints, on 127.0.0.1: an HTTP server that answers as
ntfy and the Telegram Bot API do (or fails on demand), and an SMTP server with STARTTLS
(its own certificate) and login (aiosmtpd)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.supervisor import free_port


@dataclass(frozen=True)
class Posted:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class Endpoint:
    """Keeps every POST it accepts (`posted`) and counts those it refused; while `fail_with`
    is set it answers with that HTTP status, while `garble` is set with no HTTP at all."""

    def __init__(self) -> None:
        self.posted: list[Posted] = []
        self.refused = 0
        self.fail_with: int | None = None
        self.garble = False
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if endpoint.garble:  # not HTTP at all: http.client.BadStatusLine
                    endpoint.refused += 1
                    self.wfile.write(b"garbage\r\n")
                    self.close_connection = True
                    return
                if endpoint.fail_with is not None:
                    endpoint.refused += 1
                    self._answer(endpoint.fail_with, {"ok": False, "error": "down for the test",
                                                      "description": "down for the test"})
                    return
                endpoint.posted.append(Posted(self.path, dict(self.headers.items()), body))
                self._answer(200, {"ok": True, "result": {"message_id": len(endpoint.posted)}}
                             if self.path.endswith("/sendMessage") else {"id": "x", "event": "message"})

            def _answer(self, status: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "notify test SMTP")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "smtp.crt", directory / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Mailbox:
    """An SMTP server that requires STARTTLS and a login, keeping what it receives."""

    def __init__(self, directory: Path, username: str, password: str) -> None:
        import ssl

        self.ca_file, key_file = self_signed(directory)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.ca_file, key_file)
        self.messages: list[EmailMessage] = []
        self.logins: list[tuple[str, str]] = []
        self.tls: list[bool] = []  # per message: whether it came over TLS
        self.port = free_port(42525)
        self.controller = Controller(
            _Handler(self), hostname="127.0.0.1", port=self.port, tls_context=context,
            require_starttls=True, auth_required=True,
            authenticator=self._authenticate(username, password))
        self.controller.start()

    def _authenticate(self, username: str, password: str) -> Callable[..., AuthResult]:
        def check(server: Any, session: Any, envelope: Any, mechanism: str,
                  auth_data: Any) -> AuthResult:
            if not isinstance(auth_data, LoginPassword):
                return AuthResult(success=False)
            login = (auth_data.login.decode(), auth_data.password.decode())
            self.logins.append(login)
            return AuthResult(success=login == (username, password))

        return check

    def close(self) -> None:
        self.controller.stop()


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.box.messages.append(message)
        self.box.tls.append(session.ssl is not None)
        return "250 OK"

