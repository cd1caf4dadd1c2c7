"""The LMTP server as Postfix meets it: a real server on a real unix socket.

Every test talks to the server with ``smtplib.LMTP`` (or raw bytes on the
socket where the exact wire form matters) and checks what a mail
administrator relies on: one reply per recipient, in RCPT order, with code
and enhanced code; what ends up in the FileStorage (with blobs) afterwards;
the socket rules; SIGTERM and SIGHUP on a real ``python -m postoffice.lmtp``
process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue as stdlib_queue
import re
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice import config, open_queue
from postoffice.database import open_db
from postoffice.errors import ListenError
from postoffice.lmtp import LmtpServer, writer
from postoffice.store import find_folder
from tests.helpers import (
    Process,
    client,
    mail,
    reply,
    reply_codes,
    send,
    send_data,
    stored,
    stuff,
    uri_for,
    wait_for,
    write_lmtp_config,
)

LIMIT = 256 * 1024


# --- LHLO, MAIL, the null sender --------------------------------------------


def test_lhlo_advertises_the_extensions_postfix_uses(sock: Path) -> None:
    lmtp = client(sock)
    features = lmtp.esmtp_features
    for name in ("pipelining", "enhancedstatuscodes", "8bitmime", "smtputf8"):
        assert name in features
    assert features["size"] == str(LIMIT)
    code, _ = lmtp.docmd("EHLO", "client.test")
    assert code == 500, "LMTP has LHLO, not EHLO"
    lmtp.quit()


def test_no_size_advertised_without_a_limit(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    start(max_size="0")
    lmtp = client(tmp_path / "lmtp.sock")
    assert "size" not in lmtp.esmtp_features
    assert "pipelining" in lmtp.esmtp_features
    lmtp.quit()


def test_declared_size_over_the_limit_is_refused_at_mail_from(sock: Path) -> None:
    lmtp = client(sock)
    code, text = lmtp.mail("a@outside.test", [f"SIZE={LIMIT + 1}"])
    assert (code, text.split()[0]) == (552, b"5.3.4")
    # The session goes on: a message of an acceptable declared size is taken.
    replies = send(lmtp, ["user@alpha.test"], mail(), mail_options=[f"SIZE={LIMIT}"])
    assert reply_codes(replies) == [(250, "2.0.0")]
    lmtp.quit()


def test_null_sender_is_accepted_and_stored_as_such(
    server: LmtpServer, sock: Path, tmp_path: Path
) -> None:
    lmtp = client(sock)
    assert lmtp.mail("<>")[0] == 250
    assert lmtp.rcpt("user@alpha.test")[0] == 250
    replies = send_data(lmtp, stuff(mail()), 1)
    assert reply_codes(replies) == [(250, "2.0.0")]
    lmtp.quit()
    server.stop()
    (raw,) = stored(uri_for(tmp_path / "var"), "Alpha")
    assert raw.startswith(b"Return-Path: <>\r\nX-Original-To: user@alpha.test\r\n")


# --- the rules on the wire ------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "alpha", "beta"),
    [
        ("", ["X-Original-To: one@alpha.test"], ["X-Original-To: two@beta.test"]),
        # 0.25's default: the first queue any To/Cc address matches takes every copy.
        (
            ";headers=To,Cc,X-Original-To",
            ["X-Original-To: one@alpha.test", "X-Original-To: two@beta.test"],
            [],
        ),
    ],
)
def test_each_recipient_reaches_its_own_queue_by_default(
    tmp_path: Path, headers: str, alpha: list[str], beta: list[str]
) -> None:
    """To: both customers, as swaks writes it: by default each copy goes by its recipient."""
    path = write_lmtp_config(tmp_path)
    path.write_text(path.read_text().replace(";headers=X-Original-To", headers))
    rcpts = ["one@alpha.test", "two@beta.test"]
    with LmtpServer(config.load(path), settings_path=path, grace=5):
        lmtp = client(tmp_path / "lmtp.sock")
        assert reply_codes(send(lmtp, rcpts, mail(rcpts))) == [(250, "2.0.0")] * 2
        lmtp.quit()
    uri = uri_for(tmp_path / "var")
    for queue, expected in (("Alpha", alpha), ("Beta", beta)):
        lines = [raw.split(b"\r\n")[1].decode() for raw in stored(uri, queue)]
        assert sorted(lines) == expected, queue


def test_three_recipients_two_queues_one_refused(
    server: LmtpServer, sock: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="postoffice.deliver")
    lmtp = client(sock)
    rcpts = ["one@alpha.test", "nobody@unknown.test", "two@beta.test"]
    message = mail(rcpts)
    replies = send(lmtp, rcpts, message)
    assert reply_codes(replies) == [(250, "2.0.0"), (550, "5.1.1"), (250, "2.0.0")]
    assert "one@alpha.test" in replies[0][1] and "queued in Alpha as" in replies[0][1]
    assert "two@beta.test" in replies[2][1] and "queued in Beta as" in replies[2][1]
    assert lmtp.noop()[0] == 250
    lmtp.quit()
    server.stop()
    assert [r.split(b"\r\n")[1] for r in stored(uri_for(tmp_path / "var"), "Alpha")] == [
        b"X-Original-To: one@alpha.test"
    ]
    assert [r.split(b"\r\n")[1] for r in stored(uri_for(tmp_path / "var"), "Beta")] == [
        b"X-Original-To: two@beta.test"
    ]
    # One log line per recipient decision, with what an administrator greps for.
    message_id = re.search(r"Message-Id: (<[^>]+>)", message.decode()).group(1)  # type: ignore[union-attr]
    lines = [r.getMessage() for r in caplog.records if " status=" in r.getMessage()]
    assert len(lines) == 3
    for line, rcpt, queue, (code, _), status in zip(
        lines, rcpts, ["Alpha", "-", "Beta"], replies, ["sent", "refused", "sent"], strict=True
    ):
        # The keys of Postfix's own lines, in its order: one grep reads both.
        assert line.startswith(f"msgid={message_id} from=<envelope@outside.test> to=<{rcpt}> ")
        assert f" queue={queue} " in line and " reason=" in line
        assert re.search(rf" status={status} \({code} \d\.\d\.\d .*\)$", line), line


@pytest.mark.parametrize(
    ("why", "message", "expected"),
    [
        ("own bounce", mail(headers=["X-Postoffice: Bounced"]), (250, "2.0.0")),
        ("no From", mail().replace(b"From: ", b"X-From: ", 1), (250, "2.0.0")),
        ("reject filter", mail(subject="BUY NOW cheap"), (550, "5.7.1")),
        ("auto reply", mail(headers=["Precedence: bulk"]), (550, "5.7.1")),
        ("auto submitted", mail(headers=["Auto-Submitted: auto-replied"]), (550, "5.7.1")),
    ],
)
def test_one_rule_one_reply(
    server: LmtpServer,
    sock: Path,
    tmp_path: Path,
    why: str,
    message: bytes,
    expected: tuple[int, str],
) -> None:
    lmtp = client(sock)
    replies = send(lmtp, ["user@alpha.test", "other@alpha.test"], message)
    assert reply_codes(replies) == [expected, expected], why
    lmtp.quit()
    server.stop()
    assert stored(uri_for(tmp_path / "var"), "Alpha") == [], f"{why}: nothing is queued"


def test_no_from_to_an_unknown_recipient_is_discarded_not_refused(sock: Path) -> None:
    lmtp = client(sock)
    message = mail(["x@unknown.test"]).replace(b"From: ", b"X-From: ", 1)
    assert reply_codes(send(lmtp, ["x@unknown.test"], message)) == [(250, "2.0.0")]
    lmtp.quit()


def test_duplicate_message_id_is_discarded(server: LmtpServer, sock: Path, tmp_path: Path) -> None:
    lmtp = client(sock)
    message = mail()
    assert reply_codes(send(lmtp, ["user@alpha.test"], message)) == [(250, "2.0.0")]
    second = send(lmtp, ["user@alpha.test"], message)
    assert reply_codes(second) == [(250, "2.0.0")]
    assert "queued in Alpha as" not in second[0][1]
    lmtp.quit()
    server.stop()
    assert len(stored(uri_for(tmp_path / "var"), "Alpha")) == 1


def test_a_looping_sender_is_throttled(sock: Path) -> None:
    lmtp = client(sock)
    sender = "loop@outside.test"
    first = send(lmtp, ["user@alpha.test"], mail(sender=sender))
    second = send(lmtp, ["user@alpha.test"], mail(sender=sender))
    assert reply_codes(first) == [(250, "2.0.0")]
    assert reply_codes(second) == [(550, "5.7.1")]
    lmtp.quit()


def test_an_error_while_deciding_keeps_the_mail_as_a_dead_letter(
    server: LmtpServer, sock: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in a rule")

    monkeypatch.setattr("postoffice.deliver.decide", broken)
    lmtp = client(sock)
    replies = send(lmtp, ["a@alpha.test", "b@beta.test"], mail())
    assert reply_codes(replies) == [(250, "2.0.0"), (250, "2.0.0")]
    lmtp.quit()
    server.stop()
    db = open_db(uri_for(tmp_path / "var"))
    try:
        connection = db.open()
        folder = find_folder(connection.root(), "/postoffice")
        assert len(folder.dead_letters) == 1
        connection.close()
    finally:
        db.close()


def test_a_failing_commit_defers_every_recipient(
    server: LmtpServer, sock: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    lmtp = client(sock)
    with monkeypatch.context() as patch:
        patch.setattr("postoffice.store.Queue.store", disk_full)
        replies = send(lmtp, ["a@alpha.test", "x@unknown.test", "b@beta.test"], mail())
    assert reply_codes(replies) == [(451, "4.3.0")] * 3
    # Storage works again: the next message is stored, the server never stopped.
    assert reply_codes(send(lmtp, ["a@alpha.test"], mail())) == [(250, "2.0.0")]
    lmtp.quit()
    server.stop()
    assert len(stored(uri_for(tmp_path / "var"), "Alpha")) == 1


def test_an_internal_error_gives_451_per_recipient(
    sock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    lmtp = client(sock)
    with monkeypatch.context() as patch:
        patch.setattr("postoffice.deliver.Depot.deliver_batch", crash)
        replies = send(lmtp, ["a@alpha.test", "b@beta.test"], mail())
    assert reply_codes(replies) == [(451, "4.3.0"), (451, "4.3.0")]
    assert lmtp.noop()[0] == 250
    lmtp.quit()


# --- DATA: the bytes, the limits ---------------------------------------------------


def test_stored_bytes_are_the_wire_bytes_unstuffed_plus_three_lines(
    server: LmtpServer, sock: Path, tmp_path: Path
) -> None:
    # Lines that start or end with dots everywhere, 8-bit bytes, and a body
    # big enough (> the blob threshold) to arrive in many reads.
    lines = [b".", b"..", b"...leading", b"trailing.", b"a.", b"\xc3\xa9t\xc3\xa9 caf\xe9", b""]
    body = b"".join(line + b"\r\n" for line in lines * 5000)
    message = mail(body=body)
    assert 200 * 1024 < len(message) < LIMIT
    lmtp = client(sock)
    before = int(time.time())
    assert reply_codes(send(lmtp, ["user@alpha.test"], message)) == [(250, "2.0.0")]
    lmtp.quit()
    server.stop()
    (raw,) = stored(uri_for(tmp_path / "var"), "Alpha")
    added, _, rest = raw.partition(b"X-Postoffice-Date: ")
    date, _, original = rest.partition(b"\r\n")
    assert added == b"Return-Path: <envelope@outside.test>\r\nX-Original-To: user@alpha.test\r\n"
    assert before <= int(date) <= time.time()
    assert original == message


@pytest.mark.parametrize(
    "message",
    [
        b"From: a@outside.test\r\nMessage-Id: <edge-1@x>\r\n\r\nlast line is a dot:\r\n.\r\n",
        b".X-Dot: first line\r\nFrom: a@outside.test\r\nMessage-Id: <edge-2@x>\r\n\r\nb\r\n",
        b"From: a@outside.test\r\nMessage-Id: <edge-3@x>\r\n\r\n",
    ],
    ids=["dot-last-line", "dot-first-line", "empty-last-line"],
)
def test_dots_at_the_edges_of_the_data(
    server: LmtpServer, sock: Path, tmp_path: Path, message: bytes
) -> None:
    lmtp = client(sock)
    lmtp.mail("<>")
    lmtp.rcpt("user@alpha.test")
    # The final dot arrives in a packet of its own, after a pause.
    lmtp.putcmd("data")
    assert lmtp.getreply()[0] == 354
    lmtp.send(stuff(message)[:-3])
    time.sleep(0.05)
    lmtp.send(b".\r\n")
    assert reply_codes([reply(lmtp)]) == [(250, "2.0.0")]
    assert lmtp.noop()[0] == 250
    lmtp.quit()
    server.stop()
    (raw,) = stored(uri_for(tmp_path / "var"), "Alpha")
    assert raw.split(b"\r\n", 3)[3] == message


def test_a_command_pipelined_behind_the_final_dot_is_answered(sock: Path) -> None:
    lmtp = client(sock)
    lmtp.mail("a@outside.test")
    lmtp.rcpt("user@alpha.test")
    lmtp.rcpt("user@beta.test")
    lmtp.putcmd("data")
    assert lmtp.getreply()[0] == 354
    lmtp.send(stuff(mail()) + b"RSET\r\nNOOP\r\n")
    assert [reply(lmtp)[0] for _ in range(4)] == [250, 250, 250, 250]
    lmtp.quit()


def test_data_over_the_limit_gets_one_552_per_recipient(sock: Path) -> None:
    lmtp = client(sock)
    rcpts = ["a@alpha.test", "b@beta.test", "c@unknown.test"]
    message = mail(rcpts, body=b"x" * 900 + b"\r\n" * 1 + (b"y" * 78 + b"\r\n") * 3400)
    assert len(message) > LIMIT
    replies = send(lmtp, rcpts, message)
    assert reply_codes(replies) == [(552, "5.3.4")] * 3
    assert lmtp.rset()[0] == 250
    assert lmtp.noop()[0] == 250
    assert reply_codes(send(lmtp, ["a@alpha.test"], mail())) == [(250, "2.0.0")]
    lmtp.quit()


def test_a_line_of_1001_octets_gets_one_5xx_per_recipient(sock: Path) -> None:
    lmtp = client(sock)
    rcpts = ["a@alpha.test", "b@beta.test", "c@unknown.test"]
    fine = mail(rcpts, body=b"x" * 998 + b"\r\n")  # 1000 octets with CRLF: allowed
    assert reply_codes(send(lmtp, rcpts[:1], fine)) == [(250, "2.0.0")]
    too_long = mail(rcpts, body=b"short\r\n" + b"x" * 999 + b"\r\nend\r\n")
    replies = send(lmtp, rcpts, too_long)
    assert [code for code, _ in replies] == [500, 500, 500]
    assert all(text.startswith("5.5.2") for _, text in replies)
    assert [text.split()[1] for _, text in replies] == [f"<{r}>" for r in rcpts]
    assert lmtp.rset()[0] == 250
    assert lmtp.noop()[0] == 250
    lmtp.quit()


# --- the database away and back -------------------------------------------------------


def _zeo_conf(folder: Path, sock: Path) -> Path:
    path = folder / "zeo.conf"
    path.write_text(
        f"<zeo>\n  address {sock}\n</zeo>\n"
        f"<blobstorage>\n  blob-dir {folder}/zeo-blobs\n"
        f"  <filestorage>\n    path {folder}/zeo.fs\n  </filestorage>\n</blobstorage>\n"
    )
    return path


def test_unreachable_database_gives_451_and_the_server_recovers(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    zeo_sock = tmp_path / "zeo.sock"
    uri = f"zeo://{zeo_sock}?wait_timeout=1&blob_dir={tmp_path}/zeo-blobs&shared_blob_dir=true"
    start(zodb_uri=uri)  # starts although nothing serves the database
    lmtp = client(tmp_path / "lmtp.sock")
    replies = send(lmtp, ["a@alpha.test", "x@unknown.test", "b@beta.test"], mail())
    assert reply_codes(replies) == [(451, "4.3.0")] * 3
    assert lmtp.noop()[0] == 250

    zeo = subprocess.Popen(
        [sys.executable, "-m", "ZEO.runzeo", "-C", str(_zeo_conf(tmp_path, zeo_sock))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(zeo_sock.exists, 20, "the ZEO server")
        # Until the server's ZEO client has reconnected, mail still gets 451
        # (Postfix retries it); once it has, the same session gets 250.
        answers: list[list[tuple[int, str]]] = []

        def accepted() -> bool:
            answers.append(reply_codes(send(lmtp, ["a@alpha.test"], mail())))
            return answers[-1] == [(250, "2.0.0")]

        wait_for(accepted, 60, "a delivery after the ZEO server started")
        assert all(a == [(451, "4.3.0")] for a in answers[:-1])
        lmtp.quit()
        with open_queue(uri, "Alpha") as queue:
            assert len(queue) == 1
    finally:
        zeo.terminate()
        zeo.wait(20)


# --- sessions ------------------------------------------------------------------------


def test_one_session_over_max_sessions_gets_421(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    start(max_sessions=2)
    sock = tmp_path / "lmtp.sock"
    first, second = client(sock), client(sock)
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.LMTP(str(sock), local_hostname="client.test", timeout=10)
    assert refused.value.smtp_code == 421
    assert refused.value.smtp_error.startswith(b"4.3.2")
    first.quit()
    # A place is free again (connection_lost runs soon after QUIT).
    wait_for(lambda: _greeting(sock) == 220, 5, "a free session")
    second.quit()


def _greeting(sock: Path) -> int:
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(5)
        raw.connect(str(sock))
        return int(raw.recv(512)[:3])


def test_an_idle_session_is_closed_with_421(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    start(idle=0.3)
    lmtp = client(tmp_path / "lmtp.sock")
    time.sleep(0.6)
    code, text = lmtp.getreply()
    assert (code, text.split()[0]) == (421, b"4.4.2")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        lmtp.noop()


# --- the socket ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_socket_has_the_configured_mode_whatever_the_umask(
    start: Callable[..., LmtpServer], tmp_path: Path, mode: int
) -> None:
    previous = os.umask(0)
    try:
        start(mode=f"{mode:04o}")
    finally:
        os.umask(previous)
    info = (tmp_path / "lmtp.sock").stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == mode


def test_a_stale_socket_is_replaced_and_removed_at_exit(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    sock = tmp_path / "lmtp.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sock))  # a server that died without cleaning up
    dead.close()
    server = start()
    lmtp = client(sock)
    assert lmtp.noop()[0] == 250
    lmtp.quit()
    server.stop()
    assert not sock.exists()


def test_a_live_socket_is_left_alone(start: Callable[..., LmtpServer], tmp_path: Path) -> None:
    start()
    sock = tmp_path / "lmtp.sock"
    second = LmtpServer(config.load(tmp_path / "postoffice.ini"))
    with pytest.raises(ListenError, match="another server answers"):
        second.start()
    lmtp = client(sock)
    assert reply_codes(send(lmtp, ["a@alpha.test"], mail())) == [(250, "2.0.0")]
    lmtp.quit()


def test_a_file_that_is_not_a_socket_is_not_touched(tmp_path: Path) -> None:
    path = write_lmtp_config(tmp_path)
    (tmp_path / "lmtp.sock").write_text("precious")
    with pytest.raises(ListenError, match="not a socket"):
        LmtpServer(config.load(path)).start()
    assert (tmp_path / "lmtp.sock").read_text() == "precious"


def test_tcp_listens_on_loopback_only_unless_allowed(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    path = write_lmtp_config(tmp_path)
    with pytest.raises(config.ConfigError, match="allow_remote"):
        LmtpServer(config.load(path), listen="192.0.2.1:8024").start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = LmtpServer(config.load(path), listen=f"127.0.0.1:{port}").start()
    try:
        lmtp = smtplib.LMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)
        lmtp.ehlo()
        assert reply_codes(send(lmtp, ["a@alpha.test"], mail())) == [(250, "2.0.0")]
        lmtp.quit()
    finally:
        server.stop()


# --- the process: SIGTERM, SIGHUP, exit codes ---------------------------------------


@pytest.fixture
def process(tmp_path: Path) -> Iterator[Callable[[Path], Process]]:
    started: list[Process] = []

    def run(config_path: Path) -> Process:
        proc = Process(tmp_path, config_path)
        started.append(proc)
        proc.wait_for("postoffice: listening on unix:", stream="out")
        return proc

    yield run
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)


def test_sigterm_lets_the_delivery_under_way_finish(
    process: Callable[[Path], Process], tmp_path: Path
) -> None:
    sock = tmp_path / "lmtp.sock"
    proc = process(write_lmtp_config(tmp_path))
    idle = client(sock)
    busy = client(sock)
    busy.mail("a@outside.test")
    busy.rcpt("user@alpha.test")
    busy.rcpt("user@beta.test")
    busy.putcmd("data")
    assert busy.getreply()[0] == 354
    wire = stuff(mail(body=b"in flight\r\n" * 1000))
    busy.send(wire[:5000])

    proc.proc.send_signal(signal.SIGTERM)
    # It stops accepting at once ...
    wait_for(lambda: not _accepts(sock), 10, "the listener to close")
    # ... closes the idle session with a 421 ...
    assert idle.getreply()[0] == 421
    # ... and the message under way is received, committed and answered.
    busy.send(wire[5000:])
    assert reply_codes([reply(busy), reply(busy)]) == [(250, "2.0.0"), (250, "2.0.0")]
    assert proc.proc.wait(40) == 0
    assert not sock.exists()
    assert len(stored(uri_for(tmp_path / "var"), "Alpha")) == 1
    assert len(stored(uri_for(tmp_path / "var"), "Beta")) == 1


def _accepts(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(sock))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
    return True


def test_sighup_reloads_good_rules_and_keeps_them_over_a_broken_file(
    process: Callable[[Path], Process], tmp_path: Path
) -> None:
    path = write_lmtp_config(tmp_path)
    proc = process(path)
    lmtp = client(tmp_path / "lmtp.sock")
    assert reply_codes(send(lmtp, ["x@gamma.test"], mail(["x@gamma.test"]))) == [(550, "5.1.1")]

    path.write_text(path.read_text() + "\n[queue:Gamma]\nfilters =\n    to_hostname: gamma.test\n")
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_for("reloaded the rules")
    replies = send(lmtp, ["x@gamma.test"], mail(["x@gamma.test"]))
    assert reply_codes(replies) == [(250, "2.0.0")]
    assert "queued in Gamma" in replies[0][1], "the session opened before SIGHUP goes on"

    path.write_text(path.read_text().replace("[queue:Gamma]", "[queue:Gamma"))
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_for("reload refused")
    assert "postoffice.ini" in proc.err.read_text().split("reload refused")[1].splitlines()[0]
    replies = send(lmtp, ["y@gamma.test"], mail(["y@gamma.test"]))
    assert "queued in Gamma" in replies[0][1], "the old rules stay in force"
    lmtp.quit()
    assert proc.stop() == 0


def test_a_second_server_on_a_live_socket_exits_non_zero(
    process: Callable[[Path], Process], tmp_path: Path
) -> None:
    path = write_lmtp_config(tmp_path)
    # Not shared: a second server of a shared depot is refused at its ZEO
    # socket before it reaches the LMTP one (see the test below).
    path.write_text(path.read_text().replace("[post office]\n", "[post office]\nshare = no\n"))
    first = process(path)
    second = subprocess.run(
        [sys.executable, "-m", "postoffice.lmtp", "-C", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode != 0
    assert second.stderr.strip().splitlines() == [
        f"postoffice: another server answers on unix:{tmp_path / 'lmtp.sock'}; not starting"
    ]
    lmtp = client(tmp_path / "lmtp.sock")
    assert lmtp.noop()[0] == 250
    lmtp.quit()
    assert first.stop() == 0


def test_a_bad_listen_address_is_one_line_and_exit_78(tmp_path: Path) -> None:
    path = write_lmtp_config(tmp_path)
    text = path.read_text().replace(f"unix:{tmp_path / 'lmtp.sock'}", "192.0.2.1:8024")
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "postoffice.lmtp", "-C", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 78
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("postoffice: ") and "allow_remote" in line
    assert "Traceback" not in result.stderr


def test_a_file_depot_is_shared_while_the_server_runs(
    process: Callable[[Path], Process], tmp_path: Path
) -> None:
    """As ``postoffice serve``: consumers read through the URI printed; a second server gets 75."""
    path = write_lmtp_config(tmp_path)
    proc = process(path)
    printed = re.search(r"^postoffice: consumers use (\S+)$", proc.out.read_text(), re.M)
    assert printed is not None, proc.out.read_text()
    uri = printed.group(1)
    assert uri.startswith("zeo://") and str(tmp_path / "var" / "zeo.sock") in uri
    lmtp = client(tmp_path / "lmtp.sock")
    assert reply_codes(send(lmtp, ["user@alpha.test"], mail(subject="shared"))) == [(250, "2.0.0")]
    lmtp.quit()
    with open_queue(uri, "Alpha") as queue:
        (raw,) = [raw for _key, raw, _arrived in queue.messages()]
    assert b"Subject: shared" in raw

    second = subprocess.run(
        [sys.executable, "-m", "postoffice.lmtp", "-C", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 75
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith("postoffice: ") and "already shared" in line and uri in line
    assert proc.stop() == 0
    assert not (tmp_path / "var" / "zeo.sock").exists()
    assert len(stored(uri_for(tmp_path / "var"), "Alpha")) == 1


def test_writer_commits_sessions_in_groups(
    server: LmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages arriving while a commit runs share the next commit (one fsync for many)."""
    sizes: list[int] = []
    real = type(server.depot).deliver_batch

    def counting(self: object, deliveries: Sequence[object], now: float | None = None) -> object:
        sizes.append(len(deliveries))
        time.sleep(0.05)  # a slow disk: others queue up meanwhile
        return real(self, deliveries, now)  # type: ignore[arg-type]

    monkeypatch.setattr(type(server.depot), "deliver_batch", counting)
    sock = tmp_path / "lmtp.sock"
    clients = [client(sock) for _ in range(6)]
    for lmtp in clients:
        lmtp.mail("a@outside.test")
        lmtp.rcpt("user@alpha.test")
        lmtp.putcmd("data")
        assert lmtp.getreply()[0] == 354
    for lmtp in clients:
        lmtp.send(stuff(mail()))
    assert [reply_codes([reply(lmtp)]) for lmtp in clients] == [[(250, "2.0.0")]] * 6
    for lmtp in clients:
        lmtp.quit()
    assert sum(sizes) == 6
    assert max(sizes) > 1, sizes


# The commit delay of the tests below: far longer than any of them may take,
# so a reply that comes at all came because the writer stopped waiting.
LONG_DELAY = 600.0


class _WatchedJobs:
    """The writer's queue, telling when the writer waits for a message on its way."""

    def __init__(self, jobs: stdlib_queue.SimpleQueue[object]) -> None:
        self._jobs = jobs
        self.waiting = threading.Event()

    def put(self, item: object) -> None:
        self._jobs.put(item)

    def get_nowait(self) -> object:
        return self._jobs.get_nowait()

    def get(self, block: bool = True, timeout: float | None = None) -> object:
        if timeout is not None:  # only the wait for messages on their way has one
            self.waiting.set()
        return self._jobs.get(block, timeout)


@dataclasses.dataclass
class Batches:
    """A server whose commits wait up to LONG_DELAY, and the size of each commit."""

    server: LmtpServer
    sizes: list[int]
    jobs: _WatchedJobs

    def wait_until_the_writer_waits(self) -> None:
        assert self.jobs.waiting.wait(30), "the writer never waited for a message on its way"


@pytest.fixture
def batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Batches]:
    """A server on tmp_path/lmtp.sock whose commits wait up to LONG_DELAY."""
    sizes: list[int] = []
    path = write_lmtp_config(tmp_path)
    settings = config.load(path)
    settings = dataclasses.replace(
        settings, lmtp=dataclasses.replace(settings.lmtp, commit_delay=LONG_DELAY)
    )
    server = LmtpServer(settings, settings_path=path, grace=5)
    real = type(server.depot).deliver_batch

    def counting(self: object, deliveries: Sequence[object], now: float | None = None) -> object:
        sizes.append(len(deliveries))
        return real(self, deliveries, now)  # type: ignore[arg-type]

    monkeypatch.setattr(type(server.depot), "deliver_batch", counting)
    monkeypatch.setattr(writer, "SENDING_FOR", LONG_DELAY)  # however slow the machine
    jobs = _WatchedJobs(server.writer._jobs)  # type: ignore[arg-type]
    server.writer._jobs = jobs  # type: ignore[assignment]
    server.start()
    try:
        yield Batches(server, sizes, jobs)
    finally:
        server.stop()


def _in_data(lmtp: smtplib.LMTP) -> None:
    """MAIL, RCPT and DATA: the session is sending a message (after the 354)."""
    assert lmtp.mail("a@outside.test")[0] == 250
    assert lmtp.rcpt("user@alpha.test")[0] == 250
    lmtp.putcmd("data")
    assert lmtp.getreply()[0] == 354


def _one_sent_one_awaited(batches: Batches, tmp_path: Path) -> tuple[smtplib.LMTP, smtplib.LMTP]:
    """Two sessions in DATA; the second sends its message, and the writer waits for the first's."""
    sock = tmp_path / "lmtp.sock"
    awaited, sender = client(sock), client(sock)
    _in_data(awaited)
    _in_data(sender)
    sender.send(stuff(mail(subject="sent first")))
    batches.wait_until_the_writer_waits()
    return awaited, sender


def test_a_commit_waits_for_a_message_already_on_its_way(batches: Batches, tmp_path: Path) -> None:
    """A session sending its message: the message before it waits, one commit for both."""
    late, early = _one_sent_one_awaited(batches, tmp_path)
    late.send(stuff(mail(subject="late")))
    assert reply_codes([reply(early), reply(late)]) == [(250, "2.0.0")] * 2
    assert batches.sizes == [2]
    batches.server.stop()
    assert len(stored(uri_for(tmp_path / "var"), "Alpha")) == 2


@pytest.mark.parametrize("ending", ["hang up", "half-close", "a line too long", "too big"])
def test_a_message_that_will_not_come_is_not_waited_for(
    batches: Batches, tmp_path: Path, ending: str
) -> None:
    """The reply comes at once, not after the delay, when the awaited DATA brings no message."""
    other, lmtp = _one_sent_one_awaited(batches, tmp_path)
    if ending == "hang up":
        other.send(b"Subject: cut short\r\n")
        other.close()
    elif ending == "half-close":  # the client's input ends before the final dot
        other.send(b"Subject: half\r\n")
        other.sock.shutdown(socket.SHUT_WR)
    elif ending == "a line too long":
        other.send(b"x" * 1001 + b"\r\n.\r\n")
        assert reply(other)[0] == 500
    else:
        other.send((b"x" * 998 + b"\r\n") * 300 + b".\r\n")  # 300 kB, over 256k
        assert reply(other)[0] == 552
    assert reply_codes([reply(lmtp)]) == [(250, "2.0.0")]
    assert batches.sizes == [1]


def test_a_message_sent_for_long_is_not_waited_for(
    batches: Batches, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big or slow message on its way does not hold every commit for the delay."""
    monkeypatch.setattr(writer, "SENDING_FOR", 0.05)
    sock = tmp_path / "lmtp.sock"
    slow, lmtp = client(sock), client(sock)
    _in_data(slow)
    slow.send(b"Subject: a big one\r\n")  # and more, much later
    time.sleep(0.1)  # sending for longer than SENDING_FOR
    _in_data(lmtp)
    lmtp.send(stuff(mail(subject="small")))
    assert reply_codes([reply(lmtp)]) == [(250, "2.0.0")]
    assert batches.sizes == [1]


def test_sighup_applies_a_new_commit_delay(batches: Batches, tmp_path: Path) -> None:
    """The file says 2 ms (the default): after a reload a message no longer waits 600 s."""
    assert batches.server.reload()
    sock = tmp_path / "lmtp.sock"
    other, lmtp = client(sock), client(sock)
    _in_data(other)  # and it never sends its message
    _in_data(lmtp)
    lmtp.send(stuff(mail(subject="after the reload")))
    assert reply_codes([reply(lmtp)]) == [(250, "2.0.0")]
    assert batches.sizes == [1]


def test_a_session_alone_never_waits(batches: Batches, tmp_path: Path) -> None:
    lmtp = client(tmp_path / "lmtp.sock")
    for number in range(3):
        assert reply_codes(send(lmtp, ["user@alpha.test"], mail(subject=f"n{number}"))) == [
            (250, "2.0.0")
        ]
    lmtp.quit()
    assert batches.sizes == [1, 1, 1]


# --- addresses: our parse is aiosmtpd's ------------------------------------------------

ADDRESS_ARGS = [
    "",
    "<>",
    "<a@b.test>",
    " <a@b.test> SIZE=10",
    "a@b.test",
    "a@b.test BODY=8BITMIME",
    '<"quoted local"@b.test>',
    "<@relay.test:a@b.test>",
    "<a@[127.0.0.1]>",
    "<ü@bücher.test> SMTPUTF8",
    "<a@b.test",
    "a@",
    "@b.test",
    "<<a@b.test>>",
    "<a b@c.test>",
    "<" + "x" * 65 + "@b.test>",
    "<" + "x" * 64 + "@b.test>",
    "<a@b.test>\x00",
    "(comment) a@b.test",
    "<a@b.test> (comment)",
]


def _both_parses(arg: str, limit: int) -> tuple[object, object]:
    from types import SimpleNamespace

    from aiosmtpd.smtp import SMTP

    from postoffice.lmtp import LmtpSession

    holder = SimpleNamespace(local_part_limit=limit)
    try:
        theirs: object = SMTP._getaddr(holder, arg)  # type: ignore[arg-type]
    except Exception as exc:  # the same exception, or none, on both sides
        theirs = type(exc)
    try:
        ours: object = LmtpSession._getaddr(holder, arg)  # type: ignore[arg-type]
    except Exception as exc:
        ours = type(exc)
    return ours, theirs


@pytest.mark.parametrize("arg", ADDRESS_ARGS)
@pytest.mark.parametrize("limit", [0, 64])
def test_mail_and_rcpt_addresses_parse_as_aiosmtpd_parses_them(arg: str, limit: int) -> None:
    ours, theirs = _both_parses(arg, limit)
    assert ours == theirs


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_any_address_argument_parses_as_aiosmtpd_parses_it(arg: str) -> None:
    ours, theirs = _both_parses(arg, 64)
    assert ours == theirs
