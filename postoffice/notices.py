"""Mail we write ourselves: bounces, quarantine notices, and a ready ``send``.

Everything taken from the original message (its Subject, To, From) is
flattened to one line before it goes into our headers, so CR/LF in a
sender's header can never inject headers into our mail.
"""

from __future__ import annotations

import email.utils
import smtplib
import traceback
from collections.abc import Sequence
from email.message import EmailMessage, Message
from typing import Any

from postoffice.message import parse_addresses, safe_header

DEFAULT_BOUNCE_REASON = "Email message is invalid."

_BOUNCE_TEXT = """\
Your message to {to} could not be delivered to the application it was
addressed to, and was returned.

Reason: {reason}

The original message follows, for reference.
"""

_NOTICE_TEXT = """\
Your message to {to} arrived, but an error occurred while the application
was processing it. The message has been set aside for an administrator to
look at; you do not need to send it again.
"""


def message_sender(message: Message) -> str | None:
    """The first From address of a message, or None when it has none usable."""
    value = safe_header(message, "From")
    if value is None:
        return None
    addresses = parse_addresses([value])
    return addresses[0] if addresses else None


def format_error(error: Any) -> str:
    """An exception, an exc_info tuple or a text, as the text kept in quarantine."""
    if isinstance(error, tuple) and len(error) == 3:
        return "".join(traceback.format_exception(*error))
    if isinstance(error, BaseException):
        return "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return str(error)


def _base(original: Message, from_addr: str, subject: str) -> EmailMessage:
    reply = EmailMessage()
    reply["From"] = from_addr
    to = safe_header(original, "From")
    if to:
        reply["To"] = to
    reply["Subject"] = subject
    reply["Date"] = email.utils.formatdate(localtime=False)
    reply["Message-Id"] = email.utils.make_msgid(domain=_domain(from_addr))
    original_id = safe_header(original, "Message-Id")
    if original_id:
        reply["In-Reply-To"] = original_id
        reply["References"] = original_id
    reply["X-Postoffice"] = "Bounced"
    reply["Auto-Submitted"] = "auto-replied"
    return reply


def _domain(address: str) -> str | None:
    _name, addr = email.utils.parseaddr(address)
    return addr.rpartition("@")[2] or None if "@" in addr else None


def make_bounce(original: Message, from_addr: str, reason: str | None = None) -> EmailMessage:
    """A bounce to the original's sender, with the original attached."""
    to = safe_header(original, "To") or "the application"
    reply = _base(original, from_addr, f"Your message to {to} has bounced.")
    reply.set_content(_BOUNCE_TEXT.format(to=to, reason=reason or DEFAULT_BOUNCE_REASON))
    _attach_original(reply, original)
    return reply


def make_notice(original: Message, from_addr: str) -> EmailMessage:
    """The quarantine notice: the sender learns their mail is not lost."""
    to = safe_header(original, "To") or "the application"
    reply = _base(original, from_addr, f"An error has occurred while processing your email to {to}")
    reply.set_content(_NOTICE_TEXT.format(to=to))
    _attach_original(reply, original)
    return reply


def _attach_original(reply: EmailMessage, original: Message) -> None:
    try:
        data = original.as_bytes()
    except Exception:
        return
    reply.add_attachment(data, maintype="message", subtype="rfc822", filename="original.eml")


class SMTPSender:
    """The ready ``send(from_addr, to_addrs, message)``: one SMTP session a message.

    ``host`` may be ``unix:/path`` is not supported by smtplib; use a host and
    port (Postfix's ``localhost:25`` by default).  Errors propagate to the
    caller, which for bounces and notices is an after-commit hook that logs.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 25,
        timeout: float = 30.0,
        starttls: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.starttls = starttls
        self.username = username
        self.password = password

    def __call__(self, from_addr: str, to_addrs: Sequence[str], message: Message | bytes) -> None:
        data = message if isinstance(message, bytes) else message.as_bytes()
        _name, envelope_from = email.utils.parseaddr(from_addr)
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            if self.starttls:
                smtp.starttls()
            if self.username is not None:
                smtp.login(self.username, self.password or "")
            smtp.sendmail(envelope_from or from_addr, list(to_addrs), data)


def send_mail(from_addr: str, to_addrs: Sequence[str], message: Message | bytes) -> None:
    """``send`` through the local MTA on localhost:25."""
    SMTPSender()(from_addr, to_addrs, message)
