"""Hostile mail through both front doors: an answer for every recipient, the bytes kept.

The promise to Postfix: after the final dot, exactly one reply per
accepted recipient, each a ``250`` or a ``5xx``, and never a ``4xx`` for
mail that is merely strange (a ``4xx`` makes Postfix retry the same bytes
for days); the session goes on; the server stays up.  The promise to the
applications: a message answered ``250 ... queued`` reads back as the three
added lines plus exactly the bytes that came over the wire after
dot-unstuffing (LMTP), or exactly standard input (pipe).

The input is a generated corpus (hypothesis: header names and values,
RFC 2047 words good and broken, address lists, MIME trees, deep nesting,
CRLF / LF / CR-only / mixed line ends, NUL and 8-bit bytes, lines that
start with dots, lines and headers up to the 1000-octet limit, messages
over the size limit, odd envelope addresses), Python's own email test
corpus, and the real-world corpus in ``tests/corpus``.

Over LMTP, one server runs for the whole module and the DATA phase is
written on the socket by hand (dot-stuffed after CRLF only, as the server
unstuffs), so bare CR and LF reach it as they are; each corpus message is
also sent in the form Postfix would send it (every line end CRLF).  Through
the pipe, the real ``python -m postoffice.pipe`` runs as a subprocess for
the generated messages and for the most hostile corpus files; the whole
corpora go through the pipe's ``main()`` in this process (the same code
from standard input to exit status, without 0.25 s of interpreter start
per message).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postoffice import config, open_queue
from postoffice import pipe as pipe_module
from postoffice.database import open_db
from postoffice.deliver import log_text
from postoffice.lmtp import LmtpServer
from postoffice.store import find_folder
from tests.helpers import (
    ENVELOPE,
    HERE_URI,
    PYTHON_CORPUS,
    SHARED_CORPUS,
    client,
    config_text,
    in_ci,
    python_corpus,
    shared_corpus,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

LIMIT = 2 * 1024 * 1024  # the largest corpus file is 1.8 MB
SENDER = "sender@outside.test"
# Every queue and rule type is exercised on every message: Alpha takes the
# envelope recipient alone, Beta reads To and Cc too, Headers needs a
# header and a body regexp, the reject filters read headers and every text part.
CONFIG = config_text(
    HERE_URI,
    max_message_size=LIMIT,
    reject_filters=[
        "header_regexp: Subject: .*REJECT-ME",
        "body_regexp: ^reject this body$",
        "to_hostname: .rejected.test",
    ],
    lmtp={"listen": "unix:%(here)s/lmtp.sock", "max_sessions": 8, "idle_timeout": 120},
    queues={
        "Headers": [
            "to_hostname: headers.test" + ENVELOPE,
            "header_regexp: Subject: .*never-ever",
            r"body_regexp: (?i)^\s*never ever\s*$",
        ],
        "Alpha": "to_hostname: alpha.test" + ENVELOPE,
        "Beta": "to_hostname: .beta.test",
    },
)
RECIPIENTS = (
    "a@alpha.test",  # always Alpha (or a rule refuses or discards it)
    "b@beta.test",  # Beta
    "x@unknown.test",  # never queued: 550 5.1.1 or a discard
    "r@rejected.test",  # refused by a reject filter (to_hostname on the envelope)
    "h@headers.test",  # Headers only when the subject and body say so
)
QUEUED = re.compile(r"queued in (\S+) as (\d+)")
ADDED = re.compile(
    rb"Return-Path: <(?P<sender>[^\r\n]*)>(?P<eol>\r?\n)"
    rb"X-Original-To: (?P<rcpt>[^\r\n]*)(?P=eol)"
    rb"X-Postoffice-Date: (?P<date>\d+)(?P=eol)"
)
# Refusals of an envelope address itself (500: a command line over 512 octets).
SYNTAX = (500, 501, 553, 555)
# Reply text is one line of printable ASCII (RFC 5321 textstring).
PRINTABLE = re.compile(r"[\t\x20-\x7e]*")
ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# The reply classes a message may get, by what the protocol sees of it.
PROTOCOL_REFUSALS = {"line": (500, "5.5.2"), "size": (552, "5.3.4")}


# --- what the wire carries, and what must be stored ---------------------------------


def lmtp_wire(message: bytes) -> tuple[bytes, bytes]:
    """(DATA bytes to send, bytes the server must store) for ``message`` as it is.

    The server ends the data at CRLF.CRLF and unstuffs a dot after CRLF
    only, so a dot is stuffed there and at the very start; a bare LF or CR
    is sent as it is.  A message that does not end with CRLF gets one, as
    every SMTP client does, and that CRLF is then part of what is stored.
    """
    stored = message if not message or message.endswith(b"\r\n") else message + b"\r\n"
    wire = (b"." if stored.startswith(b".") else b"") + stored.replace(b"\r\n.", b"\r\n..")
    return wire + b".\r\n", stored


def postfix_form(message: bytes) -> bytes:
    """What Postfix's lmtp client sends: every line ending CRLF (a bare CR stays in the line)."""
    return re.sub(rb"\r?\n", b"\r\n", message)


def protocol_problem(stored: bytes, limit: int) -> set[str]:
    """What the server must refuse before deciding: a line over 1000 octets, or the size."""
    problems = set()
    if any(len(line) > 999 for line in stored.split(b"\n")):  # 1000 with the LF
        problems.add("line")
    if len(stored) > limit:
        problems.add("size")
    return problems


def clean(text: str) -> bytes:
    """An envelope address as our added lines carry it (no CR, LF or NUL)."""
    return re.sub(r"[\r\n\x00]", "", text).encode("utf-8", "surrogateescape")


def plain(address: str) -> bool:
    """An envelope address every parser reads alike: the stored lines must carry it exactly."""
    return address == "" or re.fullmatch(r"[A-Za-z0-9.+-]+@[A-Za-z0-9.-]+", address) is not None


def pop_queued(
    db_or_uri: object, queue: str, key: int, popped: dict[tuple[str, int | None], EmailMessage]
) -> EmailMessage:
    """Message ``key`` of ``queue`` as a consumer's ``pop_next()`` returns it; popped for good.

    ``popped`` keeps what one transaction's checks popped: a recipient given
    twice has one copy, and another recipient's copy may come out first.
    """
    if (queue, key) not in popped:
        with open_queue(db_or_uri, queue) as opened:  # type: ignore[arg-type]
            while (queue, key) not in popped:
                message = opened.pop_next()
                popped[(queue, message.postoffice_id)] = message
            transaction.commit()
    return popped[(queue, key)]


def check_stored(
    popped: EmailMessage, message: bytes, sender: str | None, rcpt: str | None, since: float
) -> None:
    """What ``pop_next()`` gave is our three lines on top of exactly ``message``, and readable.

    ``sender`` and ``rcpt`` are None for envelope addresses the server's
    parser may have read differently (aiosmtpd drops CFWS, and the like):
    then only their being one clean line is checked.
    """
    stored = popped.as_bytes()
    assert stored.endswith(message), "the message bytes were changed"
    prefix = stored[: len(stored) - len(message)]
    added = ADDED.fullmatch(prefix)
    assert added is not None, f"unexpected added lines: {prefix!r}"
    for value in (added["sender"], added["rcpt"]):
        assert b"\x00" not in value
    if sender is not None:
        assert added["sender"] == clean(sender)
    if rcpt is not None:
        assert added["rcpt"].lower() == clean(rcpt).lower()
    assert since - 1 <= int(added["date"]) <= time.time() + 1
    headers = [(name, str(value)) for name, value in popped.items()]  # parses every value
    assert [name for name, _value in headers[:2]] == ["Return-Path", "X-Original-To"]
    original_to = headers[1][1].encode("utf-8", "surrogateescape")
    assert original_to.lower() == added["rcpt"].lower()


# --- an LMTP client that writes DATA itself ------------------------------------------


@dataclass
class Sent:
    """One LMTP transaction: the recipients the server took, and its replies after DATA."""

    accepted: list[str]
    replies: list[tuple[int, str]]
    stored: bytes  # what the server must store for a 250 "queued"


def reply(lmtp: smtplib.LMTP) -> tuple[int, str]:
    code, text = lmtp.getreply()
    return code, text.decode("utf-8", "replace")


def transact(
    lmtp: smtplib.LMTP, sender: str, recipients: Sequence[str], message: bytes
) -> Sent | None:
    """MAIL, RCPT..., DATA with exactly ``message``; None when no recipient was taken.

    The server may refuse an envelope address at MAIL or RCPT (a syntax
    error is a 5xx there, which is fine); what counts is that every
    recipient it took gets one reply after the dot.  The NOOP afterwards
    proves the session is still there and in step: an extra reply would
    be read as the NOOP's.
    """
    utf8 = any(ord(c) > 127 for c in sender + "".join(recipients))
    code, _ = lmtp.mail(sender or "<>", ["SMTPUTF8"] if utf8 else [])
    assert code in (250, *SYNTAX), f"MAIL FROM:<{sender!r}> got {code}"
    accepted = []
    if code == 250:
        for rcpt in recipients:
            code, _ = lmtp.rcpt(rcpt)
            assert code in (250, *SYNTAX), f"RCPT TO:<{rcpt!r}> got {code}"
            if code == 250:
                accepted.append(rcpt)
    if not accepted:
        assert lmtp.rset()[0] == 250
        return None
    wire, stored = lmtp_wire(message)
    lmtp.putcmd("data")
    assert reply(lmtp)[0] == 354
    lmtp.send(wire)
    replies = [reply(lmtp) for _ in accepted]
    assert lmtp.noop() == (250, b"2.0.0 Ok"), "the session is out of step after DATA"
    return Sent(accepted, replies, stored)


@dataclass
class LmtpDepot:
    """The module's long-running server and its database (open in this process too)."""

    folder: Path
    sock: Path
    server: LmtpServer
    db: object
    checked: dict[str, int] = field(default_factory=dict)

    def count(self, what: str, by: int = 1) -> None:
        self.checked[what] = self.checked.get(what, 0) + by

    def check(self, sender: str, sent: Sent | None, since: float, label: str) -> None:
        """Every reply is a 250 or a 5xx of the right kind; every "queued" one is stored intact."""
        if sent is None:
            self.count(f"{label}: no recipient taken")
            return
        assert len(sent.replies) == len(sent.accepted)
        problems = protocol_problem(sent.stored, LIMIT)
        popped: dict[tuple[str, int | None], EmailMessage] = {}
        for rcpt, (code, text) in zip(sent.accepted, sent.replies, strict=True):
            status = text.split(" ", 1)[0]
            assert PRINTABLE.fullmatch(text), f"not printable ASCII: {text!r}"
            assert ENHANCED.fullmatch(status), f"no enhanced status: {code} {text}"
            assert status[0] == str(code)[0], f"{code} {text}"
            assert code < 400 or code >= 500, f"a 4xx for hostile input: {code} {text}"
            if problems:
                allowed = {PROTOCOL_REFUSALS[p] for p in problems}
                assert (code, status) in allowed, f"{problems}: {code} {text}"
                self.count(f"{label}: {code} ({' or '.join(sorted(problems))})")
                continue
            assert code in (250, 550), f"{code} {text}"
            domain = rcpt.rpartition("@")[2].lower()
            if domain == "alpha.test":
                assert status != "5.1.1", f"Alpha takes every alpha.test recipient: {text}"
            if domain == "unknown.test":
                assert QUEUED.search(text) is None, text
            queued = QUEUED.search(text) if code == 250 else None
            if queued is None:
                self.count(f"{label}: {'discarded' if code == 250 else 'refused by a rule'}")
                continue
            check_stored(
                pop_queued(self.db, queued[1], int(queued[2]), popped),
                sent.stored,
                sender if plain(sender) else None,
                rcpt if plain(rcpt) else None,
                since,
            )
            self.count(f"{label}: queued and read back")


@pytest.fixture(scope="module")
def lmtp_depot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LmtpDepot]:
    """One server for the whole module: hostile mail must not wear it down."""
    folder = tmp_path_factory.mktemp("hostile-lmtp")
    path = folder / "postoffice.ini"
    path.write_text(CONFIG)
    settings_ = config.load(path)
    db = open_db(settings_.zodb_uri)
    server = LmtpServer(settings_, settings_path=path, db=db, grace=5).start()
    depot = LmtpDepot(folder, folder / "lmtp.sock", server, db)
    try:
        yield depot
        # Still up and serving, with no session left behind.
        lmtp = client(depot.sock, timeout=30)
        since = time.time()
        good = b"From: a@outside.test\r\nMessage-Id: <after-all@outside.test>\r\n\r\nok\r\n"
        sent = transact(lmtp, SENDER, ["a@alpha.test"], good)
        assert sent is not None and sent.replies[0][0] == 250
        depot.check(SENDER, sent, since, "final")
        lmtp.quit()
        print("\nhostile input over LMTP, replies after DATA:")
        for what, count in sorted(depot.checked.items()):
            print(f"  {what}: {count}")
        wait_for(lambda: not server.sessions, 5, "sessions to close")
        # Nothing was an internal error in disguise (kept as a dead letter).
        connection = db.open()
        try:
            assert len(find_folder(connection.root(), "/postoffice").dead_letters) == 0
        finally:
            connection.close()
    finally:
        server.stop()
        db.close()


# --- generated mail ---------------------------------------------------------------------

CHARSETS = (
    "utf-8",
    "UTF-8",
    "iso-8859-1",
    "windows-1252",
    "shift_jis",
    "iso-2022-jp",
    "koi8-r",
    "gb2312",
    "us-ascii",
    "utf-8//TRANSLIT",
    "uft-8",
    "x-unknown",
    "utf-8*en",
    "",
)
NASTY_TEXT = (
    "a\r\nBcc: evil@x",
    "\r\n\r\nbody?",
    "\x00",
    "=?",
    "?=",
    "\u2028\u2029\x85\x0b\x0c",
    "\ufeffBOM",
    "ü" * 40,
)


def _q_encode(data: bytes) -> bytes:
    return b"".join(
        bytes([c]) if chr(c).isalnum() else b"_" if c == 32 else b"=%02X" % c for c in data
    )


@st.composite
def encoded_words(draw: st.DrawFn) -> bytes:
    """RFC 2047 words: well formed in many charsets, or broken in the ways seen in the wild."""
    charset = draw(st.sampled_from(CHARSETS))
    text = draw(st.text(max_size=24) | st.sampled_from(NASTY_TEXT))
    codec = charset.split("*")[0].split("//")[0] or "utf-8"
    try:
        data = text.encode(codec)
    except (LookupError, UnicodeEncodeError):
        data = text.encode("utf-8")
    kind = draw(st.sampled_from(["q", "b", "b-broken", "q-broken", "open", "x", "long"]))
    cs = charset.encode()
    if kind == "q":
        return b"=?" + cs + b"?q?" + _q_encode(data) + b"?="
    if kind == "b":
        return b"=?" + cs + b"?B?" + base64.b64encode(data) + b"?="
    if kind == "b-broken":
        return b"=?" + cs + b"?b?" + base64.b64encode(data)[:-1] + b"!?="
    if kind == "q-broken":
        return b"=?" + cs + b"?q?=Z" + data.replace(b"?", b"") + b"=?="
    if kind == "open":
        return b"=?" + cs + b"?q?" + _q_encode(data)
    if kind == "x":
        return b"=?" + cs + b"?x?" + _q_encode(data) + b"?="
    return b"=?utf-8?q?" + b"=C3=BC" * 150 + b"?="


ADDRESSES = (
    b"user@alpha.test",
    b"<user@beta.test>",
    b"Name <n@beta.test>",
    b'"Doe, Jane" <jane@x.test>',
    b"team: a@b.test, c@d.test;",
    b"undisclosed-recipients:;",
    b"(comment) a@b.test (more)",
    b"<unterminated@x",
    b"@@",
    b"a@",
    b"@b",
    b"r@b\xc3\xbccher.test",
    b"r@xn--bcher-kva.test",
    b"<a@[127.0.0.1]>",
    b'"unterminated <a@b.test>',
    b"a@b.test,,,c@d.test",
    b"a@rejected.test",
    b"=?utf-8?q?x:victim@other.test,?= <s@outside.test>",
    b"\xff\xfe@\xfe\xff",
)


@st.composite
def address_lists(draw: st.DrawFn) -> bytes:
    items = draw(
        st.lists(
            st.sampled_from(ADDRESSES)
            | encoded_words().map(lambda w: w + b" <w@beta.test>")
            | st.integers(1, 480).map(lambda n: b"(" * n + b"x" + b")" * n + b" a@b.test"),
            max_size=6,
        )
    )
    return b", ".join(items)


def header_values() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.text(max_size=60).map(lambda t: t.encode("utf-8")),
        st.binary(max_size=60),  # NUL, 8-bit, stray CR and LF
        st.lists(encoded_words(), min_size=1, max_size=4).map(b" ".join),
        st.lists(encoded_words(), min_size=2, max_size=4).map(b"".join),
        address_lists(),
        st.sampled_from([b"", b" ", b"\t", b"bulk", b"auto-replied", b"no", b"Bounced"]),
    )


HEADER_NAMES = (
    b"From",
    b"To",
    b"Cc",
    b"Subject",
    b"Message-Id",
    b"Date",
    b"Reply-To",
    b"Content-Type",
    b"Content-Transfer-Encoding",
    b"MIME-Version",
    b"Precedence",
    b"Auto-Submitted",
    b"X-Autoreply",
    b"X-Postoffice",
    b"X-Original-To",
    b"Received",
    b"Return-Path",
)


@st.composite
def header_lines(draw: st.DrawFn) -> list[bytes]:
    """One header, folded or not, or a line that only looks like one."""
    kind = draw(st.sampled_from(["plain", "plain", "plain", "folded", "long", "broken"]))
    name = draw(
        st.sampled_from(HEADER_NAMES) | st.from_regex(rb"\A[!-9;-~]{1,40}\Z", fullmatch=True)
    )
    value = draw(header_values())
    if kind == "plain":
        return [name + b": " + value]
    if kind == "folded":
        more = draw(st.lists(header_values(), min_size=1, max_size=4))
        return [name + b": " + value] + [draw(st.sampled_from([b" ", b"\t"])) + v for v in more]
    if kind == "long":
        # Up to the limit: 998 octets before the CRLF, 1000 with it.
        length = draw(st.integers(900, 998))
        line = name + b": " + value + b" " + b"x" * length
        return [line[:length]]
    return [
        draw(
            st.sampled_from(
                [
                    b"no colon here",
                    b" continuation before any header",
                    b": empty name",
                    b"Sp ace: in the name",
                    b"\xc3\xa9t\xc3\xa9: 8-bit name",
                    b"From : spaced colon",
                    b"From " + b"x" * 20,
                ]
            )
        )
    ]


BODY_LINES = (
    b".",
    b"..",
    b"...",
    b".leading dot",
    b". ",
    b"",
    b"From the start of a line",
    b"reject this body",
    b"never ever",
    b"--",
    b"=",
    b"=ZZ",
    b"\x00\x00",
    b"\xff\xfe\xfd",
    b"caf\xe9 \xc3\xa9t\xc3\xa9",
    b"TWFuIGlzIGRpc3Rpbmd1aXNoZWQ=",
)


def body_lines() -> st.SearchStrategy[list[bytes]]:
    return st.lists(
        st.sampled_from(BODY_LINES)
        | st.binary(max_size=80)
        | st.integers(0, 998).map(lambda n: b"y" * n),
        max_size=20,
    )


@st.composite
def mime_part(draw: st.DrawFn, depth: int = 0) -> tuple[list[bytes], list[bytes]]:
    """(header lines, body lines) of one MIME entity, multipart up to a depth of 3."""
    kinds = ["text", "text", "base64", "qp", "rfc822"] + (["multipart"] if depth < 3 else [])
    kind = draw(st.sampled_from(kinds))
    charset = draw(st.sampled_from(CHARSETS)).encode()
    if kind == "text":
        cte = draw(st.sampled_from([b"7bit", b"8bit", b"binary", b"bogus", b""]))
        return [
            b"Content-Type: text/plain; charset=" + charset,
            b"Content-Transfer-Encoding: " + cte,
        ], draw(body_lines())
    if kind == "base64":
        data = draw(st.binary(max_size=300))
        encoded = base64.encodebytes(data).splitlines()
        if draw(st.booleans()):
            encoded = [line[: len(line) // 2] + b"*!" for line in encoded] or [b"!!"]
        subtype = draw(st.sampled_from([b"text/plain", b"text/html", b"application/octet-stream"]))
        return [
            b"Content-Type: " + subtype + b"; charset=" + charset,
            b"Content-Transfer-Encoding: base64",
        ], encoded
    if kind == "qp":
        lines = [line + b"=" for line in draw(body_lines())] + [b"=E9t=C3=A9=", b"=G0"]
        return [
            b"Content-Type: text/plain; charset=" + charset,
            b"Content-Transfer-Encoding: quoted-printable",
        ], lines
    if kind == "rfc822":
        inner_headers = [line for h in draw(st.lists(header_lines(), max_size=4)) for line in h]
        return [b"Content-Type: message/rfc822"], [*inner_headers, b"", *draw(body_lines())]
    boundary = draw(st.sampled_from([b"b1", b"b2", b"==x==", b"same", b"", b"a" * 70]))
    parts = draw(st.lists(mime_part(depth + 1), max_size=3))
    body = draw(st.sampled_from([[], [b"preamble"], [b"--" + boundary + b"x"]]))
    for headers, lines in parts:
        body += [b"--" + boundary, *headers, b"", *lines]
    if draw(st.booleans()):
        body += [b"--" + boundary + b"--", b"epilogue"]
    subtype = draw(st.sampled_from([b"mixed", b"alternative", b"digest", b"report", b"mx6d"]))
    return [b"Content-Type: multipart/" + subtype + b'; boundary="' + boundary + b'"'], body


@st.composite
def deep_nesting(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """A chain of multiparts (or message/rfc822) hundreds deep, one boundary or many."""
    depth = draw(st.integers(20, 400))
    same = draw(st.booleans())
    if draw(st.booleans()):
        return [b"Content-Type: message/rfc822"], [b"Content-Type: message/rfc822", b""] * depth
    lines: list[bytes] = []
    closing: list[bytes] = []
    for level in range(depth):
        boundary = b"same" if same else b"b%d" % level
        lines += [b"--" + boundary, b'Content-Type: multipart/mixed; boundary="%s"' % boundary]
        lines.append(b"")
        closing.insert(0, b"--" + boundary + b"--")
    head = [b'Content-Type: multipart/mixed; boundary="top"']
    return head, [b"--top", *lines[1:], b"never ever", *closing, b"--top--"]


class Mail(bytes):
    """A generated message: bytes, shown shortened (a failing 2 MB example stays readable)."""

    def __repr__(self) -> str:
        text = bytes.__repr__(self)
        return text if len(text) < 3000 else f"{text[:2000]}...<{len(self)} octets>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


EOLS = {"crlf": b"\r\n", "lf": b"\n", "cr": b"\r"}
_serial = iter(range(10**9))


@st.composite
def messages(draw: st.DrawFn) -> Mail:
    """A whole message: headers (with or without From and Message-Id), body, line ends."""
    number = next(_serial)
    headers: list[bytes] = []
    if draw(st.integers(0, 9)) > 0:
        headers.append(b"From: writer%d@outside.test" % number)
    if draw(st.integers(0, 9)) > 0:
        headers.append(b"Message-Id: <%d.%d@hostile.test>" % (number, time.time_ns()))
    for lines in draw(st.lists(header_lines(), max_size=8)):
        at = draw(st.integers(0, len(headers)))
        headers[at:at] = lines
    body_kind = draw(st.sampled_from(["plain", "plain", "mime", "deep", "none"]))
    if body_kind == "plain":
        body = draw(body_lines())
    elif body_kind == "mime":
        more, body = draw(mime_part())
        headers += [b"MIME-Version: 1.0", *more]
    elif body_kind == "deep":
        more, body = draw(deep_nesting())
        headers += [b"MIME-Version: 1.0", *more]
    else:
        body = []
    padding = draw(st.sampled_from([0, 0, 0, 0, 0, 200, 5000, LIMIT // 78 + 10, LIMIT // 78 + 10]))
    body += [b"z" * 76] * padding
    lines = [*headers, b"", *body] if body_kind != "none" else headers
    style = draw(st.sampled_from(["crlf", "crlf", "crlf", "lf", "cr", "mixed"]))
    if style == "mixed":
        pattern = draw(st.lists(st.sampled_from(list(EOLS.values())), min_size=2, max_size=7))
    else:
        pattern = [EOLS[style]]
    message = b"".join(line + pattern[n % len(pattern)] for n, line in enumerate(lines))
    if draw(st.integers(0, 9)) == 0:
        message = message.rstrip(b"\r\n")  # no line end at all after the last line
    return Mail(message)


ODD_SENDERS = (
    "",
    SENDER,
    "Sender.With+Tag@outside.test",
    "\u00e9l\u00e8ve@\u00e9cole.test",
    "a\x0bb@outside.test",
    "x" * 300 + "@outside.test",
    "<nested>@outside.test",
)
ODD_RECIPIENTS = (
    "A@ALPHA.TEST",
    "a@alpha.test",
    "\u00fc@alpha.test",
    "tab\t@alpha.test",
    "nul\x00@alpha.test",
    "cr\r@alpha.test",
    "y" * 600 + "@alpha.test",
    "@alpha.test",
)

HYPOTHESIS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@HYPOTHESIS
@given(
    message=messages(),
    sender=st.sampled_from(ODD_SENDERS),
    recipients=st.lists(
        st.sampled_from(RECIPIENTS) | st.sampled_from(ODD_RECIPIENTS), min_size=1, max_size=6
    ),
)
def test_generated_mail_over_lmtp(
    lmtp_depot: LmtpDepot, message: bytes, sender: str, recipients: list[str]
) -> None:
    since = time.time()
    lmtp = client(lmtp_depot.sock, timeout=30)
    try:
        lmtp_depot.check(sender, transact(lmtp, sender, recipients, message), since, "generated")
        lmtp.quit()
    finally:
        lmtp.close()


# --- the corpora over LMTP ------------------------------------------------------------------


def corpus_files(which: str) -> list[Path]:
    """The files of one corpus; fail when it is missing (Python's own: skip, but not in CI)."""
    if which == "python":
        files = python_corpus()
        if not files:
            reason = f"Python's email test corpus is not installed ({PYTHON_CORPUS})"
            if in_ci():
                pytest.fail(f"{reason} (CI=true: a missing part is a failure, not a skip)")
            pytest.skip(reason)
        return files
    files = shared_corpus()
    if not files:
        pytest.fail(f"no corpus in {SHARED_CORPUS} (its MANIFEST.tsv is missing)")
    return files


@pytest.mark.parametrize("which", ["python", "shared"])
def test_corpus_over_lmtp_as_it_is_and_as_postfix_sends_it(
    lmtp_depot: LmtpDepot, which: str
) -> None:
    """Every corpus message, twice, in one session: the session must last the whole corpus."""
    files = corpus_files(which)
    lmtp = client(lmtp_depot.sock, timeout=30)
    since = time.time()
    queued_files = 0
    for number, path in enumerate(files):
        raw = path.read_bytes()
        before = lmtp_depot.checked.get(f"{which}: queued and read back", 0)
        for form, message in enumerate((raw, postfix_form(raw))):
            # Its own sender and recipients: no file trips the throttle or the
            # duplicate ledger (many share a Message-Id) because of another.
            sender = f"corpus{number}@outside.test"
            recipients = [
                f"c{number}-{form}@alpha.test",
                f"c{number}-{form}@beta.test",
                *RECIPIENTS[2:],
            ]
            sent = transact(lmtp, sender, recipients, message)
            lmtp_depot.check(sender, sent, since, which)
        queued_files += lmtp_depot.checked.get(f"{which}: queued and read back", 0) > before
    lmtp.quit()
    # Not vacuous (many corpus files lack a Message-Id, or are auto-replies).
    assert queued_files >= len(files) // 6, lmtp_depot.checked


# --- through the pipe -------------------------------------------------------------------------


@dataclass
class PipeDepot:
    """A depot the pipe command writes to (opened here only between runs: FileStorage locks)."""

    folder: Path
    config: Path
    uri: str
    runs: int = 0
    checked: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.checked[what] = self.checked.get(what, 0) + 1


@pytest.fixture(scope="module")
def pipe_depot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipeDepot]:
    folder = tmp_path_factory.mktemp("hostile-pipe")
    path = folder / "postoffice.ini"
    path.write_text(CONFIG)
    depot = PipeDepot(folder, path, config.load(path).zodb_uri)
    yield depot
    print(f"\nhostile input through the pipe ({depot.runs} processes):")
    for what, count in sorted(depot.checked.items()):
        print(f"  {what}: {count}")


# The decision line: the recipient, then the reply's code, status and text.
PIPE_LOGGED = re.compile(r" to=<(.*?)> size=\d+ queue=.* status=\w+ \((\d{3}) (\S+) (.*)\)$")


def check_pipe_run(
    depot: PipeDepot,
    message: bytes,
    sender: str,
    recipients: Sequence[str],
    code: int,
    stderr: str,
    logged: list[str],
    since: float,
    label: str,
) -> None:
    """Exit 0, 67 or 69, never 75; one log line per recipient; "queued" ones stored intact."""
    assert code in (0, 67, 69), f"exit {code}: {stderr}"
    depot.count(f"{label}: exit {code}")
    assert "Traceback" not in stderr
    for line in stderr.splitlines():
        assert ENHANCED.match(line) or line.startswith("(and "), line
    outcomes = [m for m in map(PIPE_LOGGED.search, logged) if m is not None]
    assert [m[1] for m in outcomes] == [log_text(r) for r in recipients]
    too_big = len(message) > LIMIT
    popped: dict[tuple[str, int | None], EmailMessage] = {}
    worst = 0
    for match, rcpt in zip(outcomes, recipients, strict=True):
        reply_code, status, text = int(match[2]), match[3], match[4]
        assert reply_code in (250, 550, 552), match[0]
        if too_big:
            assert (reply_code, status) == (552, "5.3.4")
        worst = max(worst, {250: 0, 550: 67 if status == "5.1.1" else 69, 552: 69}[reply_code])
        queued = QUEUED.search(text) if reply_code == 250 else None
        if queued is not None:
            check_stored(
                pop_queued(depot.uri, queued[1], int(queued[2]), popped),
                message,
                sender,
                rcpt,
                since,
            )
            depot.count(f"{label}: queued and read back")
        else:
            depot.count(f"{label}: {'discarded' if reply_code == 250 else reply_code}")
    assert code == worst, "the exit status is the worst outcome"


def run_pipe(
    depot: PipeDepot, message: bytes, sender: str, recipients: Sequence[str]
) -> tuple[int, str, list[str]]:
    """``python -m postoffice.pipe -C CFG -f SENDER -- RCPT...`` as pipe(8) runs it."""
    depot.runs += 1
    log = depot.folder / f"pipe-{depot.runs}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTOFFICE_")}
    env["POSTOFFICE_LOG"] = str(log)
    argv = [sys.executable, "-m", "postoffice.pipe", "-C", str(depot.config), "-f", sender, "--"]
    proc = subprocess.run(
        [*argv, *recipients], input=message, capture_output=True, env=env, timeout=60, check=False
    )
    assert proc.stdout == b""
    logged = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.exists() else []
    return proc.returncode, proc.stderr.decode("utf-8", "replace"), logged


PIPE_RECIPIENTS = ("a@alpha.test", "b@beta.test", "x@unknown.test", "h@headers.test")


@settings(HYPOTHESIS, max_examples=40)
@given(
    message=messages(),
    sender=st.sampled_from(ODD_SENDERS[:4]),
    recipients=st.lists(st.sampled_from(PIPE_RECIPIENTS), min_size=1, max_size=3, unique=True),
)
def test_generated_mail_through_the_pipe(
    pipe_depot: PipeDepot, message: bytes, sender: str, recipients: list[str]
) -> None:
    since = time.time()
    code, stderr, logged = run_pipe(pipe_depot, message, sender, recipients)
    check_pipe_run(
        pipe_depot, message, sender, recipients, code, stderr, logged, since, "generated"
    )


def most_hostile(files: Sequence[Path], per_kind: int = 2) -> list[Path]:
    """A few corpus files of each awkward kind, for real pipe processes."""
    kinds = {
        "empty": lambda raw: not raw,
        "CR only": lambda raw: b"\r" in raw and b"\n" not in raw,
        "mixed line ends": lambda raw: b"\r\n" in raw and re.search(rb"(?<!\r)\n", raw),
        "NUL": lambda raw: b"\x00" in raw,
        "BOM": lambda raw: raw.startswith(b"\xef\xbb\xbf"),
        "8-bit header": lambda raw: re.search(rb"[\x80-\xff]", raw.split(b"\n\n")[0]),
        "8-bit": lambda raw: re.search(rb"[\x80-\xff]", raw),
        "line over 998 octets": lambda raw: any(len(line) > 999 for line in raw.split(b"\n")),
        "nested multipart": lambda raw: raw.lower().count(b"multipart/") > 1,
        "over 1 MB": lambda raw: len(raw) > 1024 * 1024,
        "leading dot": lambda raw: re.search(rb"(?m)^\.", raw),
    }
    chosen: list[Path] = []
    for test in kinds.values():
        found = [p for p in files if p not in chosen and test(p.read_bytes())]
        chosen += found[:per_kind]
    return chosen


@pytest.mark.parametrize("which", ["python", "shared"])
def test_most_hostile_corpus_files_through_pipe_processes(
    pipe_depot: PipeDepot, which: str
) -> None:
    files = most_hostile(corpus_files(which))
    assert files
    for number, path in enumerate(files):
        raw = path.read_bytes()
        since = time.time()
        sender = f"pipe-{which}{number}@outside.test"
        recipients = [f"p{number}-{which}@alpha.test", "x@unknown.test"]
        code, stderr, logged = run_pipe(pipe_depot, raw, sender, recipients)
        check_pipe_run(
            pipe_depot, raw, sender, recipients, code, stderr, logged, since, f"{which} process"
        )


@pytest.mark.parametrize("which", ["python", "shared"])
def test_corpus_through_the_pipe_main(
    pipe_depot: PipeDepot,
    which: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The whole corpus through ``postoffice.pipe.main`` (stdin to exit status) in this process."""
    files = corpus_files(which)
    caplog.set_level(logging.INFO, logger="postoffice.deliver")
    queued_files = 0
    for number, path in enumerate(files):
        raw = path.read_bytes()
        since = time.time()
        sender = f"main-{which}{number}@outside.test"
        recipients = [f"m{number}-{which}@alpha.test", f"m{number}@beta.test", "x@unknown.test"]
        caplog.clear()
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
        argv = ["-C", str(pipe_depot.config), "-f", sender, "--", *recipients]
        code = pipe_module.main(argv)
        logged = [r.getMessage() for r in caplog.records if r.name == "postoffice.deliver"]
        check_pipe_run(
            pipe_depot, raw, sender, recipients, code, "", logged, since, f"{which} main"
        )
        queued_files += any("queued in" in line for line in logged)
    assert queued_files >= len(files) // 6, "not a vacuous pass"
