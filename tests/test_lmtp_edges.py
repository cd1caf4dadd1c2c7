"""The LMTP server at its edges: odd parameters, a client that half-closes, a slow start.

Each test talks raw bytes to a real server on a real unix socket (in a
thread, or ``python -m postoffice.lmtp`` where signals matter), because
what is checked is the exact wire: which reply, how many, and that the
session goes on.  A healthy run logs nothing at ERROR.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from postoffice.lmtp import LmtpServer
from postoffice.message import without_added_headers
from tests.helpers import (
    Process,
    big_message,
    mail,
    stored,
    stuff,
    uri_for,
    wait_for,
    write_lmtp_config,
)


@pytest.fixture
def no_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing at ERROR (a traceback in the log) while the test runs."""
    caplog.set_level(logging.INFO)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


class Wire:
    """A raw LMTP client: bytes out, reply lines back, as the server wrote them."""

    def __init__(self, path: Path, timeout: float = 15) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next reply line without its CRLF; b"" once the server has closed."""
        while b"\r\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self.pending = self.pending, b""
                return rest
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\r\n")
        return line

    def reply(self) -> bytes:
        """The last line of the next (possibly multi-line) reply."""
        while True:
            line = self.line()
            if line[3:4] != b"-":
                return line

    def until_closed(self) -> list[bytes]:
        """Every reply line up to the server's end of the connection."""
        lines = []
        while line := self.line():
            lines.append(line)
        return lines

    def greet(self) -> None:
        assert self.reply().startswith(b"220 ")
        self.send(b"LHLO client.test\r\n")
        assert self.reply().startswith(b"250 ")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wire(sock: Path) -> Iterator[Wire]:
    opened = Wire(sock)
    opened.greet()
    yield opened
    opened.close()


def codes(line: bytes) -> tuple[bytes, bytes]:
    """(code, enhanced code) of one reply line."""
    code, status, *_ = [*line.split(b" ", 2), b""]
    return code, status


# --- MAIL FROM: SIZE= ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["²", "１２", "٣", "1" * 21],
    ids=["superscript", "fullwidth", "arabic-indic", "21-digits"],
)
def test_a_size_that_is_not_ascii_digits_is_a_syntax_error(
    wire: Wire, no_errors: None, value: str
) -> None:
    """RFC 1870: size-value is 1*20 ASCII digits; ``"²".isdigit()`` is true, ``int("²")`` fails."""
    wire.send(f"MAIL FROM:<a@outside.test> SIZE={value}\r\n".encode())
    assert codes(wire.reply()) == (b"501", b"5.5.4")
    # The session goes on, and the refused MAIL left no sender behind.
    wire.send(b"MAIL FROM:<a@outside.test> SIZE=100\r\n")
    assert codes(wire.reply()) == (b"250", b"2.1.0")


# --- VRFY ---------------------------------------------------------------------------------


def test_vrfy_of_undecodable_bytes_is_answered_without_echoing_them(
    wire: Wire, no_errors: None
) -> None:
    wire.send(b"VRFY ((\xff\r\n")
    line = wire.reply()
    assert codes(line) == (b"502", b"5.5.1")
    assert b"\xff" not in line and b"((" not in line
    wire.send(b"NOOP\r\n")
    assert codes(wire.reply()) == (b"250", b"2.0.0")


@pytest.mark.parametrize("arg", [b"<user@alpha.test>", b"user@alpha.test", b"<\xff@alpha.test>"])
def test_vrfy_of_an_address_cannot_verify_but_mail_is_accepted(
    wire: Wire, no_errors: None, arg: bytes
) -> None:
    """Every recipient is accepted at RCPT, so VRFY is the RFC 5321 ``252``, never echoing."""
    wire.send(b"VRFY " + arg + b"\r\n")
    line = wire.reply()
    assert codes(line) == (b"252", b"2.1.5")
    assert b"alpha.test" not in line
    wire.send(b"VRFY\r\n")
    assert codes(wire.reply()) == (b"501", b"5.5.4")


# --- the client half-closes ------------------------------------------------------------------


def test_quit_pipelined_behind_the_dot_then_half_close_gets_every_reply(
    wire: Wire, server: LmtpServer, tmp_path: Path, no_errors: None
) -> None:
    """RFC 5321 4.1.1.10: the commands the server has read are answered before it closes."""
    wire.send(
        b"MAIL FROM:<a@outside.test>\r\n"
        b"RCPT TO:<user@alpha.test>\r\nRCPT TO:<user@beta.test>\r\nDATA\r\n"
    )
    assert [codes(wire.reply())[0] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
    wire.send(stuff(mail(["user@alpha.test", "user@beta.test"])) + b"QUIT\r\n")
    wire.sock.shutdown(socket.SHUT_WR)
    lines = wire.until_closed()
    assert [codes(line) for line in lines] == [
        (b"250", b"2.0.0"),
        (b"250", b"2.0.0"),
        (b"221", b"2.0.0"),
    ]
    assert b"queued in Alpha" in lines[0] and b"queued in Beta" in lines[1]
    server.stop()
    assert len(stored(uri_for(tmp_path / "var"), "Alpha")) == 1
    assert len(stored(uri_for(tmp_path / "var"), "Beta")) == 1


def test_half_close_without_quit_answers_what_was_sent_then_closes(
    wire: Wire, no_errors: None
) -> None:
    wire.send(b"NOOP\r\nRSET\r\nNOO")  # a last line without its CRLF is no command
    wire.sock.shutdown(socket.SHUT_WR)
    assert [codes(line) for line in wire.until_closed()] == [
        (b"250", b"2.0.0"),
        (b"250", b"2.0.0"),
    ]


def test_half_close_in_the_middle_of_data_stores_nothing(
    wire: Wire, server: LmtpServer, tmp_path: Path, no_errors: None
) -> None:
    wire.send(b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<user@alpha.test>\r\nDATA\r\n")
    assert [codes(wire.reply())[0] for _ in range(3)] == [b"250", b"250", b"354"]
    wire.send(stuff(mail())[:-3])  # no final dot
    wire.sock.shutdown(socket.SHUT_WR)
    assert wire.until_closed() == []
    server.stop()
    assert stored(uri_for(tmp_path / "var"), "Alpha") == []


def test_a_client_gone_while_its_commit_runs_does_not_disturb_the_next(
    sock: Path, tmp_path: Path, no_errors: None
) -> None:
    """A full close before the replies: the message may be stored; nothing breaks."""
    gone = Wire(sock)
    gone.greet()
    gone.send(b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<user@alpha.test>\r\nDATA\r\n")
    assert [codes(gone.reply())[0] for _ in range(3)] == [b"250", b"250", b"354"]
    gone.send(stuff(mail()) + b"QUIT\r\n")
    gone.close()
    after = Wire(sock)
    after.greet()
    after.send(b"NOOP\r\nQUIT\r\n")
    assert [codes(line) for line in after.until_closed()] == [
        (b"250", b"2.0.0"),
        (b"221", b"2.0.0"),
    ]
    after.close()


# --- SIGTERM while the database is still being opened ----------------------------------------


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
    return True


@pytest.fixture
def unreachable(tmp_path: Path) -> Iterator[Process]:
    """``python -m postoffice.lmtp`` whose ZEO server is nowhere: opening waits 30 s."""
    uri = f"zeo://{tmp_path}/nowhere/zeo.sock?wait_timeout=30"
    proc = Process(tmp_path, write_lmtp_config(tmp_path, zodb_uri=uri))
    try:
        wait_for(lambda: _accepts(tmp_path / "lmtp.sock"), 20, "the LMTP socket to accept")
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)


def test_mail_gets_451_per_recipient_while_the_database_is_being_opened(
    unreachable: Process, tmp_path: Path
) -> None:
    """No waiting behind the opening: a 451 per recipient straight away, Postfix retries."""
    wire = Wire(tmp_path / "lmtp.sock")
    wire.greet()
    began = time.monotonic()
    wire.send(
        b"MAIL FROM:<a@outside.test>\r\n"
        b"RCPT TO:<user@alpha.test>\r\nRCPT TO:<user@beta.test>\r\nDATA\r\n"
    )
    assert [codes(wire.reply())[0] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
    wire.send(stuff(mail(["user@alpha.test", "user@beta.test"])))
    assert [codes(wire.reply()) for _ in range(2)] == [(b"451", b"4.3.0")] * 2
    assert time.monotonic() - began < 10
    wire.send(b"NOOP\r\n")
    assert codes(wire.reply()) == (b"250", b"2.0.0")
    wire.close()
    assert unreachable.stop() == 0
    assert "Traceback" not in unreachable.err.read_text()


def test_sigterm_while_the_database_is_being_opened_stops_cleanly(
    unreachable: Process, tmp_path: Path
) -> None:
    path = tmp_path / "lmtp.sock"
    wire = Wire(path)
    assert wire.reply().startswith(b"220 ")
    unreachable.proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    assert [codes(line) for line in wire.until_closed()] == [(b"421", b"4.3.2")]
    assert unreachable.proc.wait(15) == 0
    assert time.monotonic() - began < 15, "not held by the database still being opened"
    assert not path.exists()
    err = unreachable.err.read_text()
    assert "Traceback" not in err and "ERROR" not in err


# --- big messages: spooled to the blob temporary directory -------------------------------------

MiB = 1024 * 1024


def spool_files(server: LmtpServer) -> list[str]:
    """What is in the storage's blob temporary directory, where DATA is spooled."""
    directory = server.depot.spool_directory()
    assert directory is not None
    return sorted(os.listdir(directory))


def test_a_big_message_over_lmtp_is_stored_exactly_as_sent(
    start: Callable[..., LmtpServer], tmp_path: Path, no_errors: None
) -> None:
    """Several MiB, binary octets, lines up to 900 and dots to unstuff: the very bytes stored."""
    server = start(max_size="20m")
    raw = big_message(6 * MiB, line=600)
    assert b"\r\n." in raw
    wire = Wire(tmp_path / "lmtp.sock")
    wire.greet()
    wire.send(b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<user@alpha.test>\r\nDATA\r\n")
    assert [codes(wire.reply())[0] for _ in range(3)] == [b"250", b"250", b"354"]
    wire.send(stuff(raw))
    assert codes(wire.reply()) == (b"250", b"2.0.0")
    wire.close()
    (kept,) = stored(server.depot.db(), "Alpha")
    envelope = without_added_headers(kept)
    assert envelope is not None
    assert (envelope.sender, envelope.recipient) == ("a@outside.test", "user@alpha.test")
    assert envelope.received == raw
    assert spool_files(server) == []


def test_a_client_gone_mid_data_leaves_no_spool_file_and_stores_nothing(
    start: Callable[..., LmtpServer], tmp_path: Path, no_errors: None
) -> None:
    server = start(max_size="20m")
    wire = Wire(tmp_path / "lmtp.sock")
    wire.greet()
    wire.send(b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<user@alpha.test>\r\nDATA\r\n")
    assert [codes(wire.reply())[0] for _ in range(3)] == [b"250", b"250", b"354"]
    wire.send(stuff(big_message(5 * MiB))[: 4 * MiB])  # past the threshold, no final dot
    wait_for(lambda: spool_files(server), 20, "the message to be spooled")
    wire.close()  # a full close, not a half close: the session is lost
    wait_for(lambda: not server.sessions, 20, "the session to end")
    wait_for(lambda: spool_files(server) == [], 20, "the spool file to go")
    assert stored(server.depot.db(), "Alpha") == []


def test_a_message_over_the_limit_gets_552_and_is_not_spooled(
    start: Callable[..., LmtpServer], tmp_path: Path, no_errors: None
) -> None:
    """Past the limit the rest is drained: neither memory nor a file holds it."""
    server = start(max_size="3m")
    wire = Wire(tmp_path / "lmtp.sock")
    wire.greet()
    wire.send(b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<user@alpha.test>\r\nDATA\r\n")
    assert [codes(wire.reply())[0] for _ in range(3)] == [b"250", b"250", b"354"]
    wire.send(stuff(big_message(8 * MiB)))
    assert codes(wire.reply()) == (b"552", b"5.3.4")
    assert spool_files(server) == []
    wire.send(b"QUIT\r\n")
    assert codes(wire.reply())[0] == b"221"
    wire.close()
    assert stored(server.depot.db(), "Alpha") == []
