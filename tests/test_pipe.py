"""``postoffice-deliver`` as Postfix's pipe(8) runs it: a process, stdin, argv, an exit status.

Every test runs the real command (``python -m postoffice.pipe``) as a
subprocess against a FileStorage with blobs in ``tmp_path`` and reads the
result the way Postfix and a consumer do: the exit status, the lines on
stderr (which pipe(8) puts into the bounce, its first word being the
enhanced status), and the queue read back from disk.  The command's log
goes to a file (``$POSTOFFICE_LOG``), so the tests can also check that
tracebacks land there and never on stderr.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from postoffice import open_queue
from postoffice.config import load
from postoffice.database import open_db
from postoffice.decide import Rule, discard, reject
from postoffice.deliver import Depot, Outcome
from postoffice.pipe import CONFIG_FAILED, INTERNAL_ERROR, parse_args, report_lines
from tests.helpers import ENVELOPE, big_message, message, stored, uri_for, write_config

SENDER = "sender@sender.test"
LIMIT = 1024 * 1024  # max_message_size = 1m
TIMEOUT = 60.0

# Queue App by the envelope recipient; two reject filters (a Subject, one recipient).
DEPOT: dict[str, Any] = {
    "reject_filters": [
        r"header_regexp: Subject: .*[Vv]iagra",
        r"header_regexp: X-Original-To: spam@app\.test",
    ],
    "queues": {"App": "to_hostname: app.test" + ENVELOPE},
}


@dataclass
class Result:
    """What Postfix sees of one run: the exit status and stderr (and stdout, always empty)."""

    code: int
    stderr: str
    stdout: str


@dataclass
class PipeDepot:
    """One test's depot: its config file, its URI, and the command's log file."""

    folder: Path
    config: Path
    uri: str
    log: Path

    def run(
        self,
        recipients: Sequence[str],
        stdin: bytes | int = b"",
        *,
        sender: str | None = SENDER,
        config: Path | None = None,
        args: Sequence[str] | None = None,
    ) -> Result:
        """``postoffice-deliver -C CONFIG -f SENDER RECIPIENT...`` with ``stdin``."""
        argv = list(args) if args is not None else ["-C", str(config or self.config)]
        if args is None and sender is not None:
            argv += ["-f", sender]
        argv += list(recipients)
        proc = subprocess.run(
            command(argv),
            input=stdin if isinstance(stdin, bytes) else None,
            stdin=None if isinstance(stdin, bytes) else stdin,
            capture_output=True,
            env=env_for(self.log),
            timeout=TIMEOUT,
            check=False,
        )
        return Result(proc.returncode, proc.stderr.decode(), proc.stdout.decode())

    def stored(self, queue: str = "App") -> list[bytes]:
        """The waiting messages of ``queue``, read back from disk as a consumer does."""
        return stored(self.uri, queue)

    def logged(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def command(argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "postoffice.pipe", *argv]


def env_for(log: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTOFFICE_")}
    env["POSTOFFICE_LOG"] = str(log)
    return env


def pipe_config(folder: Path, uri: str, limit: str = "1m", name: str = "postoffice.ini") -> Path:
    return write_config(folder, name=name, zodb_uri=uri, max_message_size=limit, **DEPOT)


@pytest.fixture
def depot(tmp_path: Path) -> PipeDepot:
    uri = uri_for(tmp_path / "var")
    config = pipe_config(tmp_path, uri)
    return PipeDepot(tmp_path, config, uri, tmp_path / "pipe.log")


def pipe_message(token: str = "m1", to: str = "alice@app.test", eol: bytes = b"\n") -> bytes:
    """A message as pipe(8) writes it: LF line ends (LMTP would have CRLF)."""
    return message(
        sender=f"Sender <{SENDER}>",
        to=to,
        message_id=f"<{token}@sender.test>",
        subject=f"order {token}",
        body="Body.\n",
        eol=eol,
    )


def ours(sender: str, recipient: str, raw: bytes, before: float, after: float) -> bytes:
    """The three lines we put on top, checked against the time of the run; the rest of raw."""
    lines = raw.split(b"\n", 3)
    assert lines[0] == f"Return-Path: <{sender}>".encode()
    assert lines[1] == f"X-Original-To: {recipient}".encode()
    name, _, stamp = lines[2].partition(b": ")
    assert name == b"X-Postoffice-Date"
    assert int(before) <= int(stamp) <= after
    return lines[3]


# --- exit 0: queued, or discarded -------------------------------------------------------


def test_accepted_message_is_stored_as_received_with_lf_and_our_lines(depot: PipeDepot) -> None:
    original = pipe_message("m1")
    before = time.time()
    result = depot.run(["alice@app.test"], original)
    after = time.time()

    assert result == Result(0, "", "")
    (raw,) = depot.stored()
    # Exactly the bytes pipe(8) wrote, LF line ends kept, our three lines on top.
    assert ours(SENDER, "alice@app.test", raw, before, after) == original
    assert "250 2.0.0 <alice@app.test> queued in App as" in depot.logged()


@pytest.mark.parametrize("sender_args", [["-f", ""], []], ids=["f-empty", "no-f"])
def test_null_sender_is_an_empty_return_path(depot: PipeDepot, sender_args: list[str]) -> None:
    # Postfix passes the null sender as an empty word (null_sender= in master.cf).
    args = ["-C", str(depot.config), *sender_args]
    result = depot.run(["alice@app.test"], pipe_message("bounce"), args=args)
    assert result.code == 0, result
    (raw,) = depot.stored()
    assert raw.startswith(b"Return-Path: <>\nX-Original-To: alice@app.test\n")


def test_discarded_message_exits_0_and_stores_nothing(depot: PipeDepot) -> None:
    no_from = pipe_message("m2").replace(f"From: Sender <{SENDER}>\n".encode(), b"")
    result = depot.run(["alice@app.test"], no_from)
    assert result == Result(0, "", "")
    assert depot.stored() == []
    assert "accepted, not queued: no usable From header" in depot.logged()


def test_same_message_twice_through_the_pipe_is_stored_once(depot: PipeDepot) -> None:
    assert depot.run(["alice@app.test"], pipe_message("twice")).code == 0
    assert depot.run(["alice@app.test"], pipe_message("twice")).code == 0
    assert len(depot.stored()) == 1
    assert "duplicate of <twice@sender.test> already queued in App" in depot.logged()


def test_duplicate_ledger_is_shared_with_the_lmtp_path(depot: PipeDepot) -> None:
    # First as the LMTP server stores it: CRLF bytes through Depot.deliver.
    settings = load(depot.config)
    lmtp = Depot(settings)
    (outcome,) = lmtp.deliver(SENDER, ["alice@app.test"], pipe_message("both", eol=b"\r\n"))
    assert outcome.reply.startswith("250 2.0.0 <alice@app.test> queued in App")
    lmtp.close()

    # Then the same message (LF, as pipe(8) writes it) through the pipe.
    result = depot.run(["alice@app.test"], pipe_message("both"))

    assert result == Result(0, "", "")
    (raw,) = depot.stored()
    assert raw.endswith(pipe_message("both", eol=b"\r\n"))  # the LMTP copy, the only one
    assert "duplicate of <both@sender.test> already queued in App" in depot.logged()


# --- 67 and 69: refused, Postfix bounces with our line ----------------------------------


def test_no_queue_exits_67_with_the_reason(depot: PipeDepot) -> None:
    result = depot.run(["nobody@unknown.test"], pipe_message("m3", to="nobody@unknown.test"))
    assert result == Result(67, "5.1.1 <nobody@unknown.test>: no queue for this recipient", "")
    assert depot.stored() == []


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        (b"Subject: order m4", b"Subject: cheap Viagra", "5.7.1 rejected: header matches"),
        (b"Subject:", b"Auto-Submitted: auto-replied\nSubject:", "5.7.1 automatic reply refused"),
    ],
    ids=["reject-filter", "auto-reply"],
)
def test_refused_message_exits_69_with_the_reason(
    depot: PipeDepot, old: bytes, new: bytes, reason: str
) -> None:
    result = depot.run(["alice@app.test"], pipe_message("m4").replace(old, new))
    assert result.code == 69, result
    assert result.stderr.startswith(reason)
    assert "\n" not in result.stderr
    assert depot.stored() == []


def test_message_at_the_size_limit_is_accepted_one_byte_more_is_refused(depot: PipeDepot) -> None:
    head = pipe_message("big")
    at_limit = head + b"x" * (LIMIT - len(head) - 1) + b"\n"
    assert len(at_limit) == LIMIT
    assert depot.run(["alice@app.test"], at_limit).code == 0

    over = pipe_message("bigger") + b"x" * (LIMIT - len(head)) + b"\n"
    result = depot.run(["alice@app.test"], over)
    assert result == Result(69, f"5.3.4 message size exceeds the limit of {LIMIT} bytes", "")

    (raw,) = depot.stored()
    assert raw.endswith(at_limit)


def chunks_of(total: int, head: bytes, size: int = 1024 * 1024) -> Iterator[bytes]:
    yield head
    line = b"x" * 1023 + b"\n"
    block = line * (size // len(line))
    for _ in range(total // size):
        yield block


@dataclass
class Streamed:
    code: int
    stderr: str
    written: int
    max_rss_kib: int


def stream_into(argv: Sequence[str], env: dict[str, str], data: Iterable[bytes]) -> Streamed:
    """Feed ``data`` into the command's stdin as fast as it reads; its peak memory from wait4."""
    proc = subprocess.Popen(
        command(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        bufsize=0,
    )
    assert proc.stdin is not None and proc.stderr is not None
    fd = proc.stdin.fileno()
    written = 0

    def feed() -> None:
        nonlocal written
        try:
            for chunk in data:
                view = memoryview(chunk)
                while view:
                    done = os.write(fd, view)
                    written += done
                    view = view[done:]
        except BrokenPipeError:  # the command stopped reading and exited: what we test
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    feeder.join(TIMEOUT)
    proc.stdin.close()  # end of the message (if it was read to the end)
    deadline = time.monotonic() + TIMEOUT
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("postoffice-deliver did not finish")
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    return Streamed(proc.returncode, stderr, written, usage.ru_maxrss)


def test_huge_input_is_refused_without_reading_it_into_memory(depot: PipeDepot) -> None:
    argv = ["-C", str(depot.config), "-f", SENDER, "alice@app.test"]
    env = env_for(depot.log)
    small = stream_into(argv, env, [pipe_message("small")])
    assert small.code == 0, small

    total = 200 * 1024 * 1024
    huge = stream_into(argv, env, chunks_of(total, pipe_message("huge")))

    assert huge.code == 69
    assert huge.stderr == f"5.3.4 message size exceeds the limit of {LIMIT} bytes"
    # It stopped reading just past the 1 MiB limit: Postfix gets EPIPE, then our status.
    assert huge.written < 16 * 1024 * 1024
    # And its memory is that of a small delivery, not of 200 MB.
    assert huge.max_rss_kib < small.max_rss_kib + 8 * 1024, (small, huge)
    assert len(depot.stored()) == 1


def test_a_large_accepted_message_is_not_held_in_memory_by_the_pipe(tmp_path: Path) -> None:
    """Past the spool threshold stdin goes to a file that becomes the blob: memory stays flat."""
    uri = uri_for(tmp_path / "var")
    config = pipe_config(tmp_path, uri, limit="100m")
    argv = ["-C", str(config), "-f", SENDER, "alice@app.test"]
    env = env_for(tmp_path / "pipe.log")
    small = stream_into(argv, env, [pipe_message("small")])

    size = 24 * 1024 * 1024
    big = stream_into(argv, env, chunks_of(size, pipe_message("large")))

    assert big.code == 0, big
    # The threshold and a few pieces of it in memory, not the message (not even a quarter).
    growth_kib = big.max_rss_kib - small.max_rss_kib
    assert growth_kib < size / 4 / 1024, (small, big)
    with open_queue(uri, "App") as queue:
        (_, _small, _), (_, large, _) = queue.messages()
    assert b"Message-Id: <large@sender.test>" in large[:400]
    assert len(large) > size
    assert os.listdir(tmp_path / "var" / "blobs" / "tmp") == []


def test_a_big_binary_message_is_stored_exactly_as_piped(depot: PipeDepot) -> None:
    raw = big_message(5 * 1024 * 1024, eol=b"\n", line=4000)
    raw = raw.replace(b"To: rcpt@a.example", b"To: alice@app.test")
    before = time.time()
    bigger = pipe_config(depot.folder, depot.uri, "8m", name="big.ini")
    result = depot.run(["alice@app.test"], raw, config=bigger)
    assert result.code == 0, result
    (kept,) = depot.stored()
    assert ours(SENDER, "alice@app.test", kept, before, time.time()) == raw
    assert os.listdir(depot.folder / "var" / "blobs" / "tmp") == []


# --- 75: Postfix keeps the message and retries --------------------------------------------


def test_unreachable_database_exits_75(depot: PipeDepot, tmp_path: Path) -> None:
    nobody_serves = tmp_path / "zeo.sock"
    uri = f"zeo://{nobody_serves}?wait_timeout=1&blob_dir={tmp_path}/zeo-blobs"
    config = pipe_config(tmp_path, uri, name="zeo.ini")

    result = depot.run(["alice@app.test"], pipe_message("m5"), config=config)

    assert result == Result(75, "4.3.0 storage temporarily unavailable, try again later", "")
    # The details are for the administrator's log, not for a bounce.
    assert "timed out waiting for connection" in depot.logged()


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        (None, "no such configuration file"),
        ("[post office]\nzodb_uri = memory://\nflavour = vanilla\n", "flavour"),
        (
            "[post office]\nzodb_uri = memory://\nreject_filters =\n    body_regexp: (\n",
            "body_regexp",
        ),
        ("not an ini file\n", "postoffice.ini"),
    ],
    ids=["missing", "unknown-option", "bad-regexp", "garbage"],
)
def test_bad_configuration_exits_75_with_one_line(
    depot: PipeDepot, tmp_path: Path, text: str | None, logged: str
) -> None:
    config = tmp_path / "bad" / "postoffice.ini"
    if text is not None:
        config.parent.mkdir()
        config.write_text(text)

    result = depot.run(["alice@app.test"], pipe_message("m6"), config=config)

    assert result == Result(75, CONFIG_FAILED + "", "")
    assert logged in depot.logged()


def test_unexpected_error_exits_75_and_the_traceback_goes_to_the_log(
    depot: PipeDepot, tmp_path: Path
) -> None:
    # stdin open for writing only: reading it fails (EBADF), which no rule foresees.
    unreadable = tmp_path / "write-only"
    unreadable.touch()
    fd = os.open(unreadable, os.O_WRONLY)
    try:
        result = depot.run(["alice@app.test"], fd)
    finally:
        os.close(fd)

    assert result == Result(75, INTERNAL_ERROR + "", "")
    assert "Traceback (most recent call last)" in depot.logged()
    assert "Bad file descriptor" in depot.logged()


def test_a_consumer_holding_the_file_briefly_does_not_defer_the_message(depot: PipeDepot) -> None:
    # FileStorage opens in one process only; the command waits for the lock a while.
    depot.run(["alice@app.test"], pipe_message("first"))  # creates the depot
    db = open_db(depot.uri)
    try:
        proc = subprocess.Popen(
            command(["-C", str(depot.config), "-f", SENDER, "alice@app.test"]),
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env_for(depot.log),
        )
        assert proc.stdin is not None and proc.stderr is not None
        with proc.stdin:
            proc.stdin.write(pipe_message("second"))
        deadline = time.monotonic() + TIMEOUT
        while "database locked by another process, waiting" not in depot.logged():
            assert proc.poll() is None, depot.logged()  # it waits, it does not give up
            assert time.monotonic() < deadline, depot.logged()
            time.sleep(0.05)
        time.sleep(0.5)  # a consumer's short transaction
        assert proc.poll() is None
    finally:
        db.close()
    assert proc.wait(TIMEOUT) == 0
    with proc.stderr:
        assert proc.stderr.read() == b""
    assert len(depot.stored()) == 2


# --- broken input still gets a decision ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        (
            pipe_message("8bit").replace(b"order", b"caf\xe9 \xff\xfe")
            + b"\xc3\x28 bad utf-8 \x80\n",
            True,
        ),
        (pipe_message("nul").replace(b"order", b"a\x00b") + b"\x00\x00 binary body \x00\n", True),
        (b"no headers at all, just text\nand more text\n", False),
        (bytes(range(256)) * 64, False),
        (b"", False),
    ],
    ids=["8bit-garbage", "nul-bytes", "no-headers", "binary", "empty"],
)
def test_broken_message_gets_a_decision_not_a_retry(
    depot: PipeDepot, raw: bytes, stored: bool
) -> None:
    before = time.time()
    result = depot.run(["alice@app.test"], raw)
    assert result == Result(0, "", ""), depot.logged()
    kept = depot.stored()
    if stored:
        (copy,) = kept
        assert ours(SENDER, "alice@app.test", copy, before, time.time()) == raw
    else:
        assert kept == []
        assert "accepted, not queued" in depot.logged()


# --- several recipients ----------------------------------------------------------------


def test_each_recipient_is_stored_once_with_its_own_x_original_to(depot: PipeDepot) -> None:
    result = depot.run(["alice@app.test", "bob@app.test", "ALICE@app.test"], pipe_message("m7"))
    assert result == Result(0, "", "")
    kept = depot.stored()
    assert sorted(raw.split(b"\n")[1] for raw in kept) == [
        b"X-Original-To: alice@app.test",
        b"X-Original-To: bob@app.test",
    ]


def test_several_recipients_exit_with_the_worst_outcome(depot: PipeDepot) -> None:
    recipients = ["nobody@unknown.test", "alice@app.test", "spam@app.test"]
    result = depot.run(recipients, pipe_message("m8"))

    # 69 (refused by a filter) wins over 67 (no queue) and 0; its line comes first,
    # so that the status Postfix reads from the output agrees with the exit status.
    assert result.code == 69
    assert result.stderr.splitlines() == [
        "5.7.1 <spam@app.test>: rejected: header matches 'X-Original-To: spam@app\\\\.test'"
        " (header_regexp: X-Original-To: spam@app\\.test)",
        "5.1.1 <nobody@unknown.test>: no queue for this recipient",
    ]
    (raw,) = depot.stored()
    assert raw.split(b"\n")[1] == b"X-Original-To: alice@app.test"


def test_no_queue_and_queued_exit_67(depot: PipeDepot) -> None:
    result = depot.run(["alice@app.test", "nobody@unknown.test"], pipe_message("m9"))
    assert result == Result(67, "5.1.1 <nobody@unknown.test>: no queue for this recipient", "")
    assert len(depot.stored()) == 1


def test_deferral_of_all_recipients_is_one_line(depot: PipeDepot, tmp_path: Path) -> None:
    uri = f"zeo://{tmp_path}/none.sock?wait_timeout=1&blob_dir={tmp_path}/zeo-blobs"
    config = pipe_config(tmp_path, uri, name="zeo.ini")
    result = depot.run(["alice@app.test", "bob@app.test"], pipe_message("m10"), config=config)
    assert result == Result(75, "4.3.0 storage temporarily unavailable, try again later", "")


# --- the command line -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ([], "at least one RECIPIENT is required"),
        (["-x", "alice@app.test"], "option -x not recognized"),
        (["-f"], "option -f requires argument"),
    ],
    ids=["no-recipient", "unknown-option", "f-without-value"],
)
def test_wrong_usage_exits_64_with_the_usage_line(
    depot: PipeDepot, args: list[str], why: str
) -> None:
    result = depot.run([], pipe_message("m11"), args=["-C", str(depot.config), *args])
    assert result.code == 64
    assert result.stderr.splitlines() == [
        "usage: postoffice-deliver [-C FILE] [-f SENDER] [--version] [--] RECIPIENT...",
        f"postoffice-deliver: {why}",
    ]
    assert not (depot.folder / "var").exists()  # the database was not even opened


def test_version_prints_the_installed_version_and_delivers_nothing(depot: PipeDepot) -> None:
    from importlib import metadata

    result = depot.run([], pipe_message("m12"), args=["--version", "alice@app.test"])
    assert result.code == 0
    assert result.stdout.strip() == f"postoffice-deliver {metadata.version('postoffice')}"
    assert not (depot.folder / "var").exists()


def test_sender_and_recipients_are_taken_as_written() -> None:
    # getopt, as MDAs do: -f takes the next word even when it starts with "-",
    # and "--" ends the options, so any address Postfix passes gets through.
    args = parse_args(["-C", "x.ini", "-f", "-odd@sender.test", "--", "-x@app.test", "b@app.test"])
    assert (args.config, args.sender, args.recipients) == (
        "x.ini",
        "-odd@sender.test",
        ("-x@app.test", "b@app.test"),
    )
    assert parse_args(["a@app.test", "-f", ""]).sender == ""
    assert parse_args(["--config=y.ini", "a@app.test"]).config == "y.ini"


def test_the_console_script_is_the_same_command(depot: PipeDepot) -> None:
    script = Path(sys.executable).parent / "postoffice-deliver"
    if not script.exists():
        pytest.skip(f"{script} not installed (pip install -e .)")
    proc = subprocess.run(
        [str(script), "-C", str(depot.config), "-f", SENDER, "alice@app.test"],
        input=pipe_message("script"),
        capture_output=True,
        env=env_for(depot.log),
        timeout=TIMEOUT,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert len(depot.stored()) == 1


def test_many_refused_recipients_stay_within_what_postfix_keeps() -> None:
    # pipe(8) keeps about 4 KB of a command's output for the log and the bounce.
    decision = reject(Rule.REJECT_FILTER, 550, "5.7.1", "rejected: " + "x" * 300)
    outcomes = [Outcome(f"user{n}@app.test", decision) for n in range(50)]
    lines = report_lines([Outcome("ok@app.test", discard(Rule.DUPLICATE, "dup")), *outcomes])
    assert len("\n".join(lines)) < 4096
    assert lines[0].startswith("5.7.1 <user0@app.test>: rejected: xxx")
    assert lines[-1].startswith("(and ") and lines[-1].endswith(" more)")


# --- beside a running `postoffice serve` ------------------------------------------------


@pytest.mark.integration
def test_delivers_through_the_zeo_server_of_a_running_serve(depot: PipeDepot) -> None:
    # The embedded default: serve holds Data.fs and shares it through a ZEO socket
    # beside it. The pipe finds that socket instead of finding the file locked.
    sock = depot.folder / "lmtp.sock"
    text = depot.config.read_text() + f"\n[lmtp]\nlisten = unix:{sock}\n"
    depot.config.write_text(text)
    out = depot.folder / "serve.out"
    with out.open("wb") as stdout:
        serve = subprocess.Popen(
            [sys.executable, "-m", "postoffice.cli", "-C", str(depot.config), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            env=env_for(depot.log),
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while b"listening on" not in out.read_bytes():
            assert serve.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)

        result = depot.run(["alice@app.test"], pipe_message("shared"))

        assert result == Result(0, "", "")
        assert "database locked" not in depot.logged()

        # serve delivers into the file itself, with the duplicate ledger in
        # its cache: it must see what the pipe committed through its ZEO
        # server, so the same message over LMTP is a duplicate, not a copy.
        with smtplib.LMTP(str(sock)) as lmtp:
            assert (
                lmtp.sendmail(SENDER, ["alice@app.test"], pipe_message("shared", eol=b"\r\n")) == {}
            )
            # And the other way round: what serve stored, the pipe sees.
            assert (
                lmtp.sendmail(SENDER, ["alice@app.test"], pipe_message("second", eol=b"\r\n")) == {}
            )
        assert depot.run(["alice@app.test"], pipe_message("second")) == Result(0, "", "")
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(TIMEOUT) == 0, out.read_text()
    stored = depot.stored()
    assert [raw.count(b"Message-Id: <shared@sender.test>") for raw in stored] == [1, 0]
    assert [raw.count(b"Message-Id: <second@sender.test>") for raw in stored] == [0, 1]
