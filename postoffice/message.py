"""Reading a message as received, without ever raising on hostile input.

Stored mail is raw bytes; this module is the one place that reads them.
:class:`ParsedMessage` splits the header block once (cheap, no MIME parse),
decodes header values (8-bit as UTF-8 else ISO-8859-1, then RFC 2047), and
parses the body only when a body filter asks for it.  Every access is
guarded: the ``email`` package can still raise on hostile headers (cpython
#74886, #75171), and a filter must see "no value", not an exception.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import email.utils
import inspect
import quopri
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email.feedparser import BytesFeedParser
from email.message import Message
from email.parser import BytesParser
from functools import cached_property
from typing import Any

# Header block ends at the first empty line, whatever the line endings are.
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n|\r\r")
_HEADER_LINE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*)$", re.DOTALL)
_MSG_ID = re.compile(r"<[^<>\s]+>")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")


def decode_bytes(raw: bytes) -> str:
    """8-bit header or body bytes: UTF-8 when valid, else ISO-8859-1 (never fails)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def decode_rfc2047(value: str) -> str:
    """Decode RFC 2047 encoded-words; text around them, and broken ones, stay as written.

    Written here rather than with ``email.header.decode_header``: that one
    gives up on a value mixing raw 8-bit text with encoded-words (common in
    the wild) and then leaves every word undecoded.  Adjacent words of one
    charset are joined before decoding (encoders split multi-byte
    characters across words), the whitespace between encoded-words is
    dropped (RFC 2047 section 6.2), an unknown charset falls back to UTF-8
    then ISO-8859-1.
    """
    if "=?" not in value:
        return value
    pieces: list[str] = []
    run_charset: str | None = None
    run: list[bytes] = []

    def flush() -> None:
        nonlocal run_charset
        if run:
            pieces.append(decode_text(b"".join(run), run_charset))
            run.clear()
        run_charset = None

    position = 0
    after_word = False
    for match in _ENCODED_WORD.finditer(value):
        between = value[position : match.start()]
        decoded = _word_bytes(match.group(2), match.group(3))
        if decoded is None:
            flush()
            pieces.append(between + match.group(0))
            after_word = False
        else:
            charset = match.group(1).split("*", 1)[0].lower()
            if not (after_word and not between.strip(" \t\r\n")):
                flush()
                pieces.append(between)
            elif charset != run_charset:
                flush()
            run_charset = charset
            run.append(decoded)
            after_word = True
        position = match.end()
    flush()
    pieces.append(value[position:])
    return "".join(pieces)


def _word_bytes(encoding: str, text: str) -> bytes | None:
    """The bytes of one encoded-word's text, or None when it is broken."""
    try:
        if encoding in "bB":
            text = text.rstrip("=")
            return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        return quopri.decodestring(text.encode("ascii"), header=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return None


def split_headers(raw: bytes) -> tuple[list[tuple[str, str]], int]:
    """Return ([(name as written, raw unfolded value)], offset of the body).

    Lines that are not headers (no colon, or a continuation before any
    header) are skipped, as a lenient MTA would.  Values keep their 8-bit
    bytes decoded by :func:`decode_bytes`; RFC 2047 is left for the caller.
    """
    end = _END_OF_HEADERS.search(raw)
    if raw[:1] in (b"\r", b"\n"):
        # An empty line first: no headers at all, everything is body.
        block, body_offset = b"", 2 if raw.startswith(b"\r\n") else 1
    elif end is None:
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
    """A read-only view of one received message for the filters and the decision.

    ``raw`` is the whole message; or, for a message spooled to a file
    (``postoffice.spool``), only its header block, with ``size`` the size
    of the whole and ``pieces`` a function giving the whole again, in
    pieces: the body rules then scan it as it streams by
    (:func:`streamed_text_parts`), and it is never in memory at once.
    """

    def __init__(
        self,
        raw: bytes,
        size: int | None = None,
        pieces: Callable[[], Iterable[bytes]] | None = None,
    ) -> None:
        self.raw = raw
        self.raw_headers, self.body_offset = split_headers(raw)
        self._size = len(raw) if size is None else size
        self._pieces = pieces
        self._addresses: dict[tuple[str, bool], list[str]] = {}
        self._parsed: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return self._size

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
        """Lower-cased addr-specs of a header; unparseable entries are skipped.

        Parsed once per header name: every filter asks again for every recipient.
        """
        key = (name.lower(), first_only)
        found = self._addresses.get(key)
        if found is None:
            values = self.get_all_raw(name)
            if first_only:
                values = values[:1]
            found = []
            for value in values:
                # Each value once: rule 3 asks for the first To, a filter for all of them.
                parsed = self._parsed.get(value)
                if parsed is None:
                    parsed = self._parsed[value] = parse_addresses([value])
                found.extend(parsed)
            self._addresses[key] = found
        return list(found)

    @cached_property
    def message_id(self) -> str | None:
        """The first Message-Id, as its ``<...>`` token; None when absent or unusable.

        Rule 3 discards mail whose Message-Id is missing, empty or
        unparseable, and the duplicate ledger keys on this value, so a
        trailing comment or extra spaces must not make two copies differ.
        A bare id without angle brackets (sloppy but common) is kept as it is.
        """
        return normalize_message_id(self.get_raw("Message-Id"))

    @cached_property
    def from_address(self) -> str | None:
        """The first addr-spec of the first From header, lower-cased."""
        addresses = self.addresses("From", first_only=True)
        return addresses[0] if addresses else None

    @cached_property
    def body_message(self) -> Message | None:
        """The full MIME parse, made only when a body filter needs it (not for a spooled one)."""
        if self._pieces is not None:
            return None
        try:
            return BytesParser(policy=email.policy.compat32).parsebytes(self.raw)
        except Exception:
            return None

    @cached_property
    def _streamed(self) -> list[str]:
        assert self._pieces is not None
        return streamed_text_parts(self._pieces, self.body_offset)

    def text_parts(self) -> Iterator[str]:
        """Each ``text/*`` part, decoded by its charset, then UTF-8, then ISO-8859-1.

        Line ends come out as LF whatever arrived (CRLF over LMTP, LF from
        a pipe or a Maildir), so one body regexp works for every door.
        """
        if self._pieces is not None:
            yield from self._streamed
            return
        root = self.body_message
        if root is None:
            yield _lf(decode_bytes(self.raw[self.body_offset :]))
            return
        yield from _texts_of(root)


class _TextOnly(Message):
    """A part as the feed parser builds it, with its payload dropped unless it is text.

    What a body rule reads is the ``text/*`` parts; an attachment's
    payload, the bulk of a big message, is let go as soon as the parser
    has it, rather than kept in the tree until the whole message is parsed.
    """

    def set_payload(self, payload: Any, charset: Any = None) -> None:
        try:
            text = self.get_content_maintype() == "text"
        except Exception:
            text = False
        super().set_payload(payload if text else "", charset)


def streamed_text_parts(pieces: Callable[[], Iterable[bytes]], body_offset: int) -> list[str]:
    """:meth:`ParsedMessage.text_parts` of a message given in pieces, parsed as they come.

    The email package's own feed parser, fed piece by piece, with
    :class:`_TextOnly` parts: the same parts and payloads as the parse of
    the whole message in memory, without keeping the non-text ones.  When
    the parser gives up (a nesting too deep for it), the body is read as
    one text, as for a message in memory.
    """
    parser = BytesFeedParser(_factory=_TextOnly, policy=email.policy.compat32)
    try:
        for piece in pieces():
            parser.feed(piece)
        root = parser.close()
        return list(_texts_of(root))
    except Exception:
        body = b"".join(pieces())[body_offset:]
        return [_lf(decode_bytes(body))]


def _texts_of(root: Message) -> Iterator[str]:
    """The decoded ``text/*`` parts of a parsed message, in order."""
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
        yield _lf(decode_text(payload, _charset_of(part)))


def _lf(text: str) -> str:
    """Line ends as ``\\n``, so ``$`` in a MULTILINE body regexp works on CRLF mail (LMTP)."""
    return _LINE_END.sub("\n", text) if "\r" in text else text


_LINE_END = re.compile(r"\r\n?")


def _charset_of(part: Message) -> str | None:
    try:
        charset = part.get_content_charset()
    except Exception:
        return None
    return charset if isinstance(charset, str) else None


def normalize_message_id(value: str | None) -> str | None:
    """``<id@host> (comment)`` -> ``<id@host>``; a bare token stays; else None."""
    if value is None:
        return None
    match = _MSG_ID.search(value)
    if match is not None:
        return match.group(0)
    value = value.strip()
    if value and not any(c.isspace() or c in "<>()" for c in value):
        return value
    return None


def decode_text(payload: bytes, charset: str | None) -> str:
    """Declared charset first; unknown or bogus ones (``utf-8//TRANSLIT``) degrade."""
    if charset:
        try:
            return payload.decode(charset)
        except (LookupError, UnicodeDecodeError, ValueError, TypeError):
            pass
    return decode_bytes(payload)


def parse_addresses(values: list[str]) -> list[str]:
    """RFC 5322 address lists -> lower-cased addr-specs (groups, quotes, comments).

    ``email.utils.getaddresses`` in its lenient form: it reads groups,
    quoted commas and comments, keeps the good addresses around a broken
    one, and runs in linear time.  (The header registry's parser is
    stricter but quadratic: a 400 KB ``To`` line of 20,000 addresses took
    15 seconds, per filter and per recipient.)  Newer Pythons default to a
    strict mode that drops the whole list when one address is odd, hence
    ``strict=False`` where it exists.  An addr-spec needs a local part and
    a domain without spaces; anything else is skipped, never fatal.

    An empty ``<>`` is a mailbox with no address: ``karin@example.com <>``
    is one broken mailbox (a display name and nothing to deliver to), not
    the address ``karin@example.com``, which the lenient parser would
    make of it.  So a mailbox that ends in ``<>`` is dropped whole before
    the list is parsed.
    """
    result: list[str] = []
    for value in values:
        try:
            pairs = _getaddresses([_EMPTY_MAILBOX.sub("", value)])
        except Exception:  # RecursionError on deeply nested comments, and the like
            continue
        for _name, addr in pairs:
            local, at, domain = addr.strip().rpartition("@")
            if not (at and local.strip() and domain.strip()):
                continue
            local, domain = local.strip(), domain.strip()
            if _BAD_DOMAIN.search(domain) or not _good_local(local):
                continue
            result.append(f"{local}@{domain}".lower())
    return result


def _lenient_getaddresses(values: list[str]) -> list[tuple[str, str]]:
    if _HAS_STRICT:
        return email.utils.getaddresses(values, strict=False)  # type: ignore[call-arg]
    return email.utils.getaddresses(values)


def _good_local(local: str) -> bool:
    """A dot-atom, or a quoted string: ``"unterminated <a`` is not a local part."""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        return not _CONTROL.search(local)
    return not _BAD_LOCAL.search(local)


_HAS_STRICT = "strict" in inspect.signature(email.utils.getaddresses).parameters
_getaddresses = _lenient_getaddresses
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A mailbox (from a list's start or comma, not into quotes or comments) that
# ends in an empty angle address.
_EMPTY_MAILBOX = re.compile(r'(?:^|(?<=,))[^,<>"()]*<\s*>')
_BAD_DOMAIN = re.compile(r"[\s\x00-\x1f\x7f@<>(),;:\\\"]")
_BAD_LOCAL = re.compile(r"[\s\x00-\x1f\x7f<>()\[\],;:\\\"@]")


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
    """The three lines put on top of every stored message: sender, recipient, arrival."""
    sender_text = f"<{sender}>" if sender else "<>"
    lines = (
        f"Return-Path: {_clean(sender_text)}",
        f"X-Original-To: {_clean(recipient)}",
        f"X-Postoffice-Date: {int(arrival)}",
    )
    return b"".join(line.encode("utf-8", "surrogateescape") + eol for line in lines)


@dataclass(frozen=True)
class Stored:
    """A stored message taken apart again: the envelope lines on top, and what arrived."""

    sender: str
    recipient: str
    arrival: int
    received: bytes


_ADDED = re.compile(
    rb"Return-Path: <([^\r\n]*)>(\r?\n)X-Original-To: ([^\r\n]*)\2X-Postoffice-Date: (\d+)\2"
)


def without_added_headers(raw: bytes) -> Stored | None:
    """The inverse of :func:`added_headers`; None when ``raw`` does not begin with them."""
    match = _ADDED.match(raw)
    if match is None:
        return None
    sender = match.group(1).decode("utf-8", "surrogateescape")
    recipient = match.group(3).decode("utf-8", "surrogateescape").strip()
    return Stored(sender, recipient, int(match.group(4)), raw[match.end() :])


def _clean(text: str) -> str:
    """No CR, LF or NUL from an envelope address may end up in a header."""
    return re.sub(r"[\r\n\x00]", "", text)


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
