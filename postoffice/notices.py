"""Mail we write ourselves: bounces, quarantine notices, and a ready ``send``.

Everything taken from the original message (its Subject, To, From) is
flattened to one line before it goes into our headers, so CR/LF in a
sender's header (raw, or hidden in an RFC 2047 encoded-word) can never
inject headers into our mail.  Every message made here carries
``X-Postoffice: Bounced`` (so a bounce that comes back is discarded,
rule 2) and ``Auto-Submitted: auto-replied`` (so well-behaved auto-responders
do not answer it).
"""

from __future__ import annotations

import email.policy
import email.utils
import re
import smtplib
import traceback
from collections.abc import Sequence
from email.message import EmailMessage, Message
from typing import Any

from postoffice.message import parse_addresses, safe_header

DEFAULT_BOUNCE_REASON = "Email message is invalid."

_BOUNCE_TEXT = """\
Your message to {to}, sent on {date}, could not be delivered to the
application it was addressed to, and was returned.

Reason: {reason}

The headers of your message follow, for reference.
"""

_NOTICE_TEXT = """\
Your message to {to}, sent on {date}, arrived, but an error occurred while
the application was processing it. The message has been set aside for an
administrator to look at, and will be tried again once the error is fixed;
you do not need to send it again.
"""

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_ENCODED_WORD = re.compile(r"=\?[^?\s]*\?[bBqQ]\?[^?\s]*\?=")


def message_sender(message: Message) -> str | None:
    """The first usable ``From`` address of a message, as written, or None.

    Parsed from the header as it was received, before any RFC 2047
    decoding: a display name that decodes to ``a@b, c@d`` cannot add a
    recipient to our reply.  Encoded-words belong in display names and
    comments only, never in an address, so each is read as one opaque
    word: ``=?utf-8?q?x:victim@example.org,?= <a@b>`` holds a colon and a
    comma that would otherwise make a group and a second address of it,
    and our reply would go to ``victim@example.org``.
    """
    try:
        items = message.raw_items()
        values = [str(value) for name, value in items if name.lower() == "from"][:1]
        pairs = email.utils.getaddresses([_ENCODED_WORD.sub("word", v) for v in values])
    except Exception:
        return None
    for _name, addr in pairs:
        addr = addr.strip()
        if addr and parse_addresses([addr]) == [addr.lower()]:
            return addr
    return None


def format_error(error: Any) -> str:
    """An exception, an exc_info tuple or a text, as the text kept in quarantine.

    Anything else (a tuple that is no ``exc_info``, a number) is kept as
    ``str(error)``, as 0.25 kept whatever it was given.
    """
    if (
        isinstance(error, tuple)
        and len(error) == 3
        and isinstance(error[1], BaseException)
        and isinstance(error[0], type)
        and isinstance(error[1], error[0])
    ):
        return "".join(traceback.format_exception(*error))
    if isinstance(error, BaseException):
        return "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return str(error)


def mark_ours(message: Message) -> None:
    """Our own mail says so: loops back are discarded (rule 2) and not answered."""
    for name, value in (("X-Postoffice", "Bounced"), ("Auto-Submitted", "auto-replied")):
        del message[name]
        message[name] = value


def _base(original: Message, from_addr: str, to_addr: str | None, subject: str) -> EmailMessage:
    reply = EmailMessage()
    reply["From"] = from_addr
    to_addr = to_addr or message_sender(original)
    if to_addr:
        reply["To"] = to_addr
    reply["Subject"] = subject
    reply["Date"] = email.utils.formatdate(localtime=False)
    reply["Message-Id"] = email.utils.make_msgid(domain=_domain(from_addr))
    original_id = safe_header(original, "Message-Id")
    if original_id and re.fullmatch(r"<[^<>\s]+>", original_id):
        reply["In-Reply-To"] = original_id
        reply["References"] = original_id
    mark_ours(reply)
    return reply


def _domain(address: str) -> str | None:
    _name, addr = email.utils.parseaddr(address)
    return addr.rpartition("@")[2] or None if "@" in addr else None


def _sent_on(original: Message) -> str:
    return safe_header(original, "Date") or "an unknown date"


def make_bounce(
    original: Message, from_addr: str, reason: str | None = None, to_addr: str | None = None
) -> EmailMessage:
    """A bounce to the original's sender (``to_addr``), with the original attached."""
    to = safe_header(original, "To") or "the application"
    reply = _base(original, from_addr, to_addr, f"Your message to {to} has bounced.")
    text = " ".join(str(reason).split()) if reason else DEFAULT_BOUNCE_REASON
    reply.set_content(_BOUNCE_TEXT.format(to=to, date=_sent_on(original), reason=text))
    _attach_original(reply, original)
    return reply


def make_notice(original: Message, from_addr: str, to_addr: str | None = None) -> EmailMessage:
    """The quarantine notice: the sender learns their mail is not lost."""
    to = safe_header(original, "To") or "the application"
    reply = _base(
        original, from_addr, to_addr, f"An error has occurred while processing your email to {to}"
    )
    reply.set_content(_NOTICE_TEXT.format(to=to, date=_sent_on(original)))
    return reply


def _attach_original(reply: EmailMessage, original: Message) -> None:
    """The returned message's header block, as ``text/rfc822-headers`` (RFC 6522).

    Headers only: the body can be megabytes, and a bounce goes to a ``From``
    address anyone can forge, so returning it whole would amplify abuse.
    """
    try:
        raw = original.as_bytes()
    except Exception:
        return
    end = re.search(rb"\r?\n\r?\n", raw)
    block = raw[: end.start()] if end else raw
    text = block.decode("utf-8", "replace").replace("\r\n", "\n")
    reply.add_attachment(text + "\n", subtype="rfc822-headers", filename="original-headers.txt")


def to_wire(message: Message | bytes) -> bytes:
    """Bytes for SMTP DATA: CRLF line ends throughout (bare LF is refused by many MTAs)."""
    if isinstance(message, bytes):
        data = message
    else:
        try:
            data = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
        except Exception:
            data = message.as_bytes(policy=email.policy.compat32)
    return _LINE_ENDS.sub(b"\r\n", data)


class SMTPSender:
    """The ready ``send(from_addr, to_addrs, message)``: one SMTP session a message.

    Speaks SMTP to ``host``:``port`` (Postfix's ``localhost:25`` by
    default).  ``message`` is an email ``Message`` or bytes.  Errors
    propagate to the caller, which for bounces and notices is the
    after-commit hook: it logs them, since the transaction is already done.
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
        data = to_wire(message)
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
