"""E-mail over SMTP with STARTTLS, the server's certificate always verified (against the
system's CAs, or `ca_file` for a server with its own CA)."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Literal

from pydantic import Field

from modules.notify.channels.base import Channel, ChannelError, ChannelSettings, Note

Address = str  # checked by the server; a bad one is an error of the first send
SUBJECT_MARK = {"critical": "[!] ", "resolved": "[ok] "}


class EmailSettings(ChannelSettings):
    kind: Literal["email"]
    host: str = Field(min_length=1)
    port: int = Field(587, ge=1, le=65535)
    sender: Address = Field(min_length=3, pattern=r"^[^\s@]+@[^\s@]+$", description="the From address")
    to: list[Address] = Field(min_length=1, max_length=20)
    username: str | None = Field(None, description="log in as this user (after STARTTLS)")
    password_secret: str = Field("smtp-password", description="secret holding the password")


class Email(Channel):
    settings: EmailSettings

    def send(self, note: Note) -> None:
        config = self.settings
        where = f"smtp {config.host}:{config.port}"
        message = EmailMessage()
        mark = SUBJECT_MARK.get(note.kind, SUBJECT_MARK.get(note.severity, ""))
        message["Subject"] = f"{mark}[{note.source}] {note.title}"
        message["From"] = config.sender
        message["To"] = ", ".join(config.to)
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain=config.sender.partition("@")[2])
        message.set_content(f"{note.body}\n\n— {note.source}\n")
        password = self.secret(config.password_secret) if config.username else None
        context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
        try:
            with smtplib.SMTP(config.host, config.port, timeout=config.timeout_s) as smtp:
                smtp.ehlo()
                if not smtp.has_extn("starttls"):
                    raise self.error(f"{where}: the server offers no STARTTLS; nothing sent in clear")
                smtp.starttls(context=context)
                smtp.ehlo()
                if config.username and password:
                    smtp.login(config.username, password)
                smtp.send_message(message)
        except smtplib.SMTPResponseException as exc:
            text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) \
                else str(exc.smtp_error)
            raise self.error(f"{where}: {exc.smtp_code} {text}"[:300]) from None
        except ChannelError:
            raise
        except Exception as exc:  # noqa: BLE001 - smtplib, ssl, socket and encoding errors alike
            raise self.error(f"{where}: {type(exc).__name__}: {exc}"[:300]) from None
