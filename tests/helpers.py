"""What many test modules build: ini files, raw messages, an LMTP client, the mail corpora.

One builder per thing, parameterised; a test module passes what its tests
depend on and takes the defaults for the rest.  Test modules import from
here, never from each other.
"""

from __future__ import annotations

import csv
import itertools
import os
import random
import re
import signal
import smtplib
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from email.message import Message
from pathlib import Path
from types import EllipsisType
from typing import Any

from postoffice import open_queue
from postoffice.config import Settings, loads

# --- times -------------------------------------------------------------------------------

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC, a fixed "now" for deliveries
HOUR = 3600.0
DAY = 24 * HOUR


# --- ini files ---------------------------------------------------------------------------

# A to_hostname filter that reads the envelope recipient alone, written out
# (it is also the default).
ENVELOPE = ";headers=X-Original-To"

# Two queues by recipient domain, a.example and b.example.
QUEUES: Mapping[str, str] = {"A": "to_hostname: a.example", "B": "to_hostname: b.example"}
ENVELOPE_QUEUES: Mapping[str, str] = {name: line + ENVELOPE for name, line in QUEUES.items()}

# The depot of the delivery tests: queues A and B by the envelope recipient, a 2 MB limit.
DELIVERY_DEPOT: dict[str, Any] = {"max_message_size": "2m", "queues": ENVELOPE_QUEUES}

Filters = str | Sequence[str] | None


class Outbox:
    """A ``send`` callable that keeps (from, to, message) of every call."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[str], Message]] = []

    def __call__(self, from_addr: str, to_addrs: list[str], message: Message) -> None:
        self.sent.append((from_addr, to_addrs, message))


def uri_for(folder: Path | str) -> str:
    """A FileStorage with blobs in ``folder``: ``Data.fs`` and ``blobs/``."""
    return f"file://{folder}/Data.fs?blobstorage_dir={folder}/blobs"


# The depot under ``var/`` beside the ini file, as the example configuration has it.
HERE_URI = uri_for("%(here)s/var")


def _option(name: str, value: object) -> list[str]:
    """``name = value``; a sequence of strings becomes one indented line each."""
    if isinstance(value, str | int | float):
        return [f"{name} = {value}"]
    return [f"{name} =", *(f"    {line}" for line in value)]  # type: ignore[attr-defined]


def config_text(
    zodb_uri: str = "memory://",
    *,
    queues: Mapping[str, Filters] = QUEUES,
    lmtp: Mapping[str, object] | None = None,
    extra: str = "",
    **options: object,
) -> str:
    """An ini file: ``[post office]`` with ``zodb_uri`` and ``options``, ``[lmtp]``, the queues.

    ``options`` and ``lmtp`` are ini options by name (a value of None leaves
    the option out; a sequence is a multi-line value such as
    ``reject_filters``).  ``queues`` maps a queue name to its filter lines
    (one string, several, or None for a queue without filters).  ``extra``
    is text appended as it is.
    """
    post_office = ["[post office]", f"zodb_uri = {zodb_uri}"]
    for name, value in options.items():
        if value is not None:
            post_office += _option(name, value)
    sections = [post_office]
    if lmtp is not None:
        section = ["[lmtp]"]
        for name, value in lmtp.items():
            if value is not None:
                section += _option(name, value)
        sections.append(section)
    for name, filters in queues.items():
        section = [f"[queue:{name}]"]
        if filters is not None:
            section += _option("filters", [filters] if isinstance(filters, str) else filters)
        sections.append(section)
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n" + extra


def write_config(folder: Path, *, name: str = "postoffice.ini", **config: object) -> Path:
    """``folder/name`` with :func:`config_text` of ``config``; its path."""
    path = folder / name
    path.write_text(config_text(**config))  # type: ignore[arg-type]
    return path


def settings_for(folder: Path, *, zodb_uri: str | None = None, **config: object) -> Settings:
    """The settings of :func:`config_text` as ``folder/postoffice.ini``; a depot in ``folder``."""
    text = config_text(zodb_uri or uri_for(folder), **config)  # type: ignore[arg-type]
    return loads(text, folder / "postoffice.ini")


def write_lmtp_config(
    folder: Path,
    *,
    zodb_uri: str = HERE_URI,
    max_size: str = "256k",
    mode: str = "0660",
    max_sessions: int = 8,
    idle: float = 60,
    **options: object,
) -> Path:
    """The LMTP server's ini file: socket ``folder/lmtp.sock``, queues Alpha and Beta.

    One reject filter (a Subject with BUY NOW), the loop throttle at two a
    minute; ``options`` are more ``[post office]`` options (``discard=...``).
    """
    return write_config(
        folder,
        zodb_uri=zodb_uri,
        max_message_size=max_size,
        ooo_loop_frequency=2,
        reject_filters=["header_regexp: Subject: .*BUY NOW.*"],
        lmtp={
            "listen": f"unix:{folder / 'lmtp.sock'}",
            "socket_mode": mode,
            "max_sessions": max_sessions,
            "idle_timeout": idle,
        },
        queues={
            "Alpha": "to_hostname: alpha.test" + ENVELOPE,
            "Beta": "to_hostname: beta.test" + ENVELOPE,
        },
        **options,
    )


# --- raw messages ------------------------------------------------------------------------


def message_bytes(
    headers: Iterable[str | bytes], body: str | bytes = b"", eol: str | bytes = "\r\n"
) -> bytes:
    """Header lines, each ended by ``eol``, an empty line, then the body.

    A body given as text has its line ends (``\\n``) written as ``eol`` and
    is encoded as UTF-8; a body given as bytes is taken exactly as it is.
    """
    end = eol.encode() if isinstance(eol, str) else eol
    head = b"".join((h.encode() if isinstance(h, str) else h) + end for h in headers)
    if isinstance(body, str):
        body = re.sub(r"(?<!\r)\n", end.decode(), body).encode()
    return head + end + body


def message(
    number: int = 1,
    *extra: str | bytes,
    sender: str | None = "Sender <sender@outside.example>",
    to: str | None = "rcpt@a.example",
    message_id: str | EllipsisType | None = ...,
    subject: str | EllipsisType | None = ...,
    date: str | None = None,
    body: str | bytes | EllipsisType = ...,
    size: int = 0,
    eol: str | bytes = "\r\n",
) -> bytes:
    """A raw test message, by default one that every rule lets through to queue A.

    From ``sender``, To ``to``, Message-Id ``<number@outside.example>``,
    Subject ``number N``, then Date if given, then the ``extra`` header
    lines; body ``Body N.``, followed by about ``size`` octets of lines of
    ``x``.  A header given as None is left out.  See :func:`message_bytes`
    for the line ends.
    """
    if message_id is ...:
        message_id = f"<{number}@outside.example>"
    if subject is ...:
        subject = f"number {number}"
    if body is ...:
        body = f"Body {number}.\n"
    fields = [("From", sender), ("To", to), ("Message-Id", message_id), ("Subject", subject)]
    fields.append(("Date", date))
    headers: list[str | bytes] = [f"{name}: {value}" for name, value in fields if value is not None]
    headers += extra
    raw = message_bytes(headers, body, eol)
    if size:
        end = eol.encode() if isinstance(eol, str) else eol
        raw += (b"x" * 76 + end) * (size // 78)
    return raw


def big_message(
    size: int,
    *,
    eol: bytes = b"\r\n",
    line: int = 998,
    last_text: bytes | None = None,
    message_id: str | None = None,
) -> bytes:
    """A multipart message of about ``size`` octets: a text part, then a binary attachment.

    The attachment is random octets (all but CR and LF) in lines of ``line``
    octets, lines starting with a dot among them, the last one longer by
    half; ``last_text`` adds a text part after it.  Only CR and LF are
    left out so that the lines stay lines for LMTP's limit and dot-stuffing.
    """
    rng = random.Random(size)
    octets = bytes(b for b in range(256) if b not in b"\r\n")
    lines = [bytes(rng.choices(octets, k=line)) for _ in range(max(1, size // (line + 2)))]
    lines[len(lines) // 2] = b"." + lines[len(lines) // 2][1:]
    lines[-1] = lines[-1] + lines[-1][: line // 2]
    boundary = b"=_big_="
    parts = [
        b"--" + boundary + eol + b"Content-Type: text/plain; charset=utf-8" + eol + eol,
        b"Hello." + eol,
        b"--" + boundary + eol + b"Content-Type: application/octet-stream" + eol,
        b"Content-Transfer-Encoding: binary" + eol + eol,
        eol.join(lines) + eol,
    ]
    if last_text is not None:
        parts.append(b"--" + boundary + eol + b"Content-Type: text/plain" + eol + eol)
        parts.append(last_text + eol)
    parts.append(b"--" + boundary + b"--" + eol)
    headers = [
        "From: Sender <sender@outside.example>",
        "To: rcpt@a.example",
        f"Message-Id: {message_id or f'<big.{size}.{time.time_ns()}@outside.example>'}",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary.decode()}"',
    ]
    return message_bytes(headers, b"".join(parts), eol)


_mail_numbers = itertools.count(1)


def mail(
    to: Sequence[str] = ("user@alpha.test",),
    *,
    subject: str = "hello",
    headers: Sequence[str] = (),
    body: bytes = b"Hello.\r\n",
    sender: str | None = None,
) -> bytes:
    """A message that passes every rule unless told otherwise (each with its own From).

    Every call makes another message: its From and Message-Id are new, so
    neither the loop throttle nor the duplicate ledger sees two alike.
    """
    n = next(_mail_numbers)
    return message(
        n,
        *headers,
        sender=sender or f"writer{n}@outside.test",
        to=", ".join(to),
        message_id=f"<{n}.{time.time_ns()}@outside.test>",
        subject=subject,
        body=body,
    )


# --- what a depot holds, and what it answered ---------------------------------------------


def stored(db_or_uri: object, queue: str = "A") -> list[bytes]:
    """The raw bytes of every waiting message, oldest first, as a consumer reads them."""
    with open_queue(db_or_uri, queue) as opened:  # type: ignore[arg-type]
        return [raw for _key, raw, _arrived in opened.messages()]


def codes(outcomes: Iterable[object]) -> list[str]:
    """The reply code and enhanced status of each delivery outcome, e.g. ``250 2.0.0``."""
    return [" ".join(o.reply.split(" ", 2)[:2]) for o in outcomes]  # type: ignore[attr-defined]


# --- an LMTP client ----------------------------------------------------------------------


def stuff(message: bytes) -> bytes:
    """The wire form of a message body: dot-stuffed, with the final dot."""
    return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"


def client(sock: Path, timeout: float = 15) -> smtplib.LMTP:
    """An LMTP session on the unix socket ``sock``, after a successful LHLO."""
    lmtp = smtplib.LMTP(str(sock), local_hostname="client.test", timeout=timeout)
    code, _ = lmtp.ehlo()
    assert code == 250
    return lmtp


def send(
    lmtp: smtplib.LMTP,
    recipients: Sequence[str],
    message: bytes,
    sender: str = "envelope@outside.test",
    mail_options: Sequence[str] = (),
) -> list[tuple[int, str]]:
    """MAIL, RCPT..., DATA; the replies after the final dot, one per accepted recipient."""
    assert lmtp.mail(sender, list(mail_options))[0] == 250
    for rcpt in recipients:
        assert lmtp.rcpt(rcpt)[0] == 250
    return send_data(lmtp, stuff(message), len(recipients))


def send_data(lmtp: smtplib.LMTP, wire: bytes, replies: int) -> list[tuple[int, str]]:
    """DATA, then ``wire`` as it is; the ``replies`` replies that follow."""
    lmtp.putcmd("data")
    assert lmtp.getreply()[0] == 354
    lmtp.send(wire)
    return [reply(lmtp) for _ in range(replies)]


def reply(lmtp: smtplib.LMTP) -> tuple[int, str]:
    """The next reply: its code and its text."""
    code, text = lmtp.getreply()
    return code, text.decode()


def reply_codes(replies: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """(code, enhanced code) of each LMTP reply."""
    return [(code, text.split()[0]) for code, text in replies]


# --- the commands ------------------------------------------------------------------------


def run_postoffice(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``postoffice ARGS...`` as a person runs it: a subprocess, its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "postoffice.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_pipe(
    config_path: Path, sender: str, recipients: Sequence[str], raw: bytes, log: Path
) -> subprocess.CompletedProcess[bytes]:
    """``postoffice-deliver -C CONFIG -f SENDER RCPT...`` as pipe(8) runs it, log to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTOFFICE_")}
    env["POSTOFFICE_LOG"] = str(log)
    argv = ["-C", str(config_path), "-f", sender, *recipients]
    return subprocess.run(
        [sys.executable, "-m", "postoffice.pipe", *argv],
        input=raw,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


# --- waiting -----------------------------------------------------------------------------


def wait_for(check: Callable[[], object], timeout: float, what: str, pause: float = 0.02) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds, naming ``what``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(pause)


# --- a server process -----------------------------------------------------------------


class Process:
    """``python -m postoffice.lmtp -C CONFIG`` with its output in files we can poll.

    Its stdout and stderr go to ``NAME.out`` and ``NAME.err`` in ``folder``
    (``server`` unless ``name`` says otherwise).  ``module`` and ``args``
    run another command the same way: ``module="postoffice.cli",
    args=("policy",)`` is ``postoffice -C CONFIG policy``.
    """

    def __init__(
        self,
        folder: Path,
        config_path: Path,
        *,
        module: str = "postoffice.lmtp",
        args: Sequence[str] = (),
        name: str = "server",
    ) -> None:
        self.out = folder / f"{name}.out"
        self.err = folder / f"{name}.err"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, "-C", str(config_path), *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )

    def wait_for(self, text: str, stream: str = "err", timeout: float = 30) -> None:
        path = self.err if stream == "err" else self.out

        def seen() -> bool:
            if self.proc.poll() is not None and text not in path.read_text():
                raise AssertionError(f"server exited: {self.err.read_text()}")
            return text in path.read_text()

        wait_for(seen, timeout, repr(text))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(40)


# --- the mail corpora --------------------------------------------------------------------


def in_ci() -> bool:
    """True under CI, where a missing part must fail the run instead of skipping."""
    return os.environ.get("CI", "").strip().lower() == "true"


def _shared_corpus_folder() -> Path:
    """``$POSTOFFICE_CORPUS`` (another copy, a bigger corpus), else the copy in tests/corpus."""
    if os.environ.get("POSTOFFICE_CORPUS"):
        return Path(os.environ["POSTOFFICE_CORPUS"])
    return Path(__file__).resolve().parent / "corpus"


SHARED_CORPUS = _shared_corpus_folder()
PYTHON_CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"


def python_corpus() -> list[Path]:
    """Python's own email test messages, when the test suite is installed."""
    return sorted(PYTHON_CORPUS.glob("msg_*.txt")) if PYTHON_CORPUS.is_dir() else []


def shared_corpus() -> list[Path]:
    """The files of the real-world corpus, in the order of its MANIFEST.tsv."""
    manifest = SHARED_CORPUS / "MANIFEST.tsv"
    if not manifest.is_file():
        return []
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [SHARED_CORPUS / row["file"] for row in rows]
