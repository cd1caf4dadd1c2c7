"""Reading a message as received, without ever raising on hostile input.

Stored mail is raw bytes; this module is the one place that reads them.
:class:`ParsedMessage` splits the header block once (cheap, no MIME parse),
decodes header values (8-bit as UTF-8 else ISO-8859-1, then RFC 2047), and
parses the body only when a body filter asks for it.  Every access is
guarded: the ``email`` package can still raise on hostile headers (cpython
#74886, #75171), and a filter must see "no value", not an exception.
"""

from __future__ import annotations

import email.header
import email.policy
import email.utils
import re
from collections.abc import Iterator
from email.message import EmailMessage, Message
from email.parser import BytesParser
from functools import cached_property

# Header block ends at the first empty line, whatever the line endings are.
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n|\r\r")
_HEADER_LINE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*)$", re.DOTALL)
_FOLD = re.compile(r"\r\n|\r|\n")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


def decode_bytes(raw: bytes) -> str:
    """8-bit header or body bytes: UTF-8 when valid, else ISO-8859-1 (never fails)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def decode_rfc2047(value: str) -> str:
    """Decode encoded-words; leave the text as it is when they are broken."""
    if "=?" not in value or not _ENCODED_WORD.search(value):
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:
        return value


def split_headers(raw: bytes) -> tuple[list[tuple[str, str]], int]:
    """Return ([(name as written, raw unfolded value)], offset of the body).

    Lines that are not headers (no colon, or a continuation before any
    header) are skipped, as a lenient MTA would.  Values keep their 8-bit
    bytes decoded by :func:`decode_bytes`; RFC 2047 is left for the caller.
    """
    end = _END_OF_HEADERS.search(raw)
    if end is None:
        block, body_offset = raw, len(raw)
    else:
        block, body_offset = raw[: end.start()], end.end()
    headers: list[tuple[bytes, list[bytes]]] = []
    for line in re.split(rb"\r\n|\r|\n", block):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if headers:
                headers[-1][1].append(line)
            continue
        match = _HEADER_LINE.match(line)
        if match is None:
            continue
        headers.append((match.group(1), [match.group(2)]))
    result = []
    for name, parts in headers:
        value = b" ".join(p.strip(b" \t") for p in parts).strip(b" \t")
        result.append((name.decode("ascii"), decode_bytes(value)))
    return result, body_offset


class ParsedMessage:
    """A read-only view of one received message for the filters and the decision."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.raw_headers, self.body_offset = split_headers(raw)

    def __len__(self) -> int:
        return len(self.raw)

    @cached_property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """(name as written, value unfolded and RFC 2047-decoded), in order."""
        return tuple((name, decode_rfc2047(value)) for name, value in self.raw_headers)

    def get_raw(self, name: str) -> str | None:
        """The first header of that name, undecoded (for address parsing)."""
        lowered = name.lower()
        for header, value in self.raw_headers:
            if header.lower() == lowered:
                return value
        return None

    def get(self, name: str) -> str | None:
        """The first header of that name, decoded; None when absent."""
        value = self.get_raw(name)
        return None if value is None else decode_rfc2047(value)

    def get_all_raw(self, name: str) -> list[str]:
        lowered = name.lower()
        return [value for header, value in self.raw_headers if header.lower() == lowered]

    def addresses(self, name: str, *, first_only: bool = False) -> list[str]:
        """Lower-cased addr-specs of a header; unparseable entries are skipped."""
        values = self.get_all_raw(name)
        if first_only:
            values = values[:1]
        return parse_addresses(values)

    @cached_property
    def message_id(self) -> str | None:
        value = self.get_raw("Message-Id")
        if value is None:
            return None
        value = value.strip()
        return value or None

    @cached_property
    def from_address(self) -> str | None:
        """The first addr-spec of the first From header, lower-cased."""
        addresses = self.addresses("From", first_only=True)
        return addresses[0] if addresses else None

    @cached_property
    def body_message(self) -> Message | None:
        """The full MIME parse, made only when a body filter needs it."""
        try:
            return BytesParser(policy=email.policy.compat32).parsebytes(self.raw)
        except Exception:
            return None

    def text_parts(self) -> Iterator[str]:
        """Each ``text/*`` part, decoded by its charset, then UTF-8, then ISO-8859-1."""
        root = self.body_message
        if root is None:
            yield decode_bytes(self.raw[self.body_offset :])
            return
        try:
            parts = list(root.walk())
        except Exception:
            parts = [root]
        for part in parts:
            try:
                if part.is_multipart() or part.get_content_maintype() != "text":
                    continue
                payload = part.get_payload(decode=True)
            except Exception:
                continue
            if not isinstance(payload, bytes):
                continue
            yield decode_text(payload, _charset_of(part))


def _charset_of(part: Message) -> str | None:
    try:
        charset = part.get_content_charset()
    except Exception:
        return None
    return charset if isinstance(charset, str) else None


def decode_text(payload: bytes, charset: str | None) -> str:
    """Declared charset first; unknown or bogus ones (``utf-8//TRANSLIT``) degrade."""
    if charset:
        try:
            return payload.decode(charset)
        except (LookupError, UnicodeDecodeError, ValueError, TypeError):
            pass
    return decode_bytes(payload)


def parse_addresses(values: list[str]) -> list[str]:
    """RFC 5322 address lists -> lower-cased addr-specs (groups, quotes, comments)."""
    result: list[str] = []
    for value in values:
        try:
            pairs = email.utils.getaddresses([value])
        except Exception:
            continue
        for _display, addr in pairs:
            addr = addr.strip().lower()
            if addr and "@" in addr and not any(c.isspace() for c in addr):
                result.append(addr)
    return result


def domain_of(address: str) -> str | None:
    if "@" not in address:
        return None
    domain = address.rsplit("@", 1)[1].strip().strip(".").strip("[]").lower()
    return domain or None


def line_ending(raw: bytes) -> bytes:
    """CRLF for mail that came over LMTP, LF for mail from a pipe."""
    first = raw.find(b"\n")
    if first > 0 and raw[first - 1 : first] == b"\r":
        return b"\r\n"
    return b"\n" if first >= 0 else b"\r\n"


def added_headers(sender: str, recipient: str, arrival: int, eol: bytes) -> bytes:
    """The three lines put on top of every stored message (SPEC 5)."""
    sender_text = f"<{sender}>" if sender else "<>"
    lines = (
        f"Return-Path: {_clean(sender_text)}",
        f"X-Original-To: {_clean(recipient)}",
        f"X-Postoffice-Date: {int(arrival)}",
    )
    return b"".join(line.encode("utf-8", "surrogateescape") + eol for line in lines)


def _clean(text: str) -> str:
    """No CR, LF or NUL from an envelope address may end up in a header."""
    return re.sub(r"[\r\n\x00]", "", text)


def to_email_message(raw: bytes) -> EmailMessage:
    """The consumer's view: an EmailMessage with decoded header values.

    ``email.policy.default`` decodes RFC 2047 on access; ``as_bytes()`` of an
    unmodified message gives back the stored bytes as they were parsed.
    """
    message = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def safe_header(message: Message, name: str) -> str | None:
    """A header value from a sender, flattened to one line for our own mail."""
    try:
        value = message.get(name)
    except Exception:
        return None
    if value is None:
        return None
    text = " ".join(str(value).split())
    return _clean(text) or None
