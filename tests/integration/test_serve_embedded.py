"""The embedded default as the README runs it: `postoffice serve` on the example config.

While `serve` runs on its `file://` depot, an application in another
process reads the queues through the URI `serve` printed, and Postfix's own
LMTP client keeps delivering: every message is consumed exactly once.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from postoffice import open_queue
from tests.helpers import wait_for
from tests.integration.postfix_instance import require_tool
from tests.integration.servers import finished, reaped

REPO = Path(__file__).resolve().parents[2]
MESSAGES = 240
SESSIONS = 4

# An application's consumer, as docs/consumers.md writes it: it pops and
# commits until it has EXPECTED messages (0: no limit) or, once STOP_FILE
# exists (""): never), the queue is empty; PAUSE seconds of work per message.
# OUT.progress says, whenever it changes, how far it is: what the tests wait on.
CONSUMER = textwrap.dedent(
    """
    import json, os, sys, time
    import transaction
    from transaction.interfaces import TransientError
    from postoffice import QueueEmpty, open_queue

    uri, name, out, expected, stop_file, pause = sys.argv[1:7]
    expected, pause = int(expected), float(pause)
    seen, crlf, sizes, errors, transient = [], [], [], [], []
    deadline = time.monotonic() + 150
    progress = None

    def tell():
        global progress
        if progress != (len(seen), len(transient)):
            progress = (len(seen), len(transient))
            with open(out + ".part", "w") as handle:
                json.dump({"seen": progress[0], "transient": progress[1]}, handle)
            os.replace(out + ".part", out + ".progress")

    with open_queue(uri, name) as queue:
        while time.monotonic() < deadline and not (expected and len(seen) >= expected):
            tell()
            try:
                transaction.begin()
                if not queue:
                    if stop_file and os.path.exists(stop_file):
                        break
                    time.sleep(0.02)
                    continue
                message = queue.pop_next()
                time.sleep(pause)
                transaction.commit()
            except QueueEmpty:
                continue
            except TransientError as exc:  # as docs/consumers.md says: abort, go on
                transient.append(repr(exc))
                transaction.abort()
                continue
            except Exception as exc:
                errors.append(repr(exc))
                transaction.abort()
                continue
            seen.append(message["Message-Id"])
            crlf.append(b"\\r\\n" in message.as_bytes())
            sizes.append(len(message.as_bytes()))
    with open(out, "w") as handle:
        result = {"seen": seen, "crlf": crlf, "sizes": sizes, "errors": errors}
        json.dump({**result, "transient": transient}, handle)
    """
)


def start_consumer(
    uri: str, out: Path, expected: int = 0, stop_file: str = "", pause: float = 0.0
) -> subprocess.Popen[bytes]:
    """CONSUMER in a process of its own, on queue Customer A; its stderr in ``OUT.stderr``."""
    with Path(f"{out}.stderr").open("wb") as stderr:
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                CONSUMER,
                uri,
                "Customer A",
                str(out),
                str(expected),
                stop_file,
                str(pause),
            ],
            cwd=REPO,
            stderr=stderr,
        )


def assert_quiet(*logs: Path) -> None:
    """A healthy run logs nothing at ERROR and no traceback, in any of its processes."""
    for log in logs:
        text = log.read_text(errors="replace")
        bad = [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line]
        assert not bad, f"{log.name}:\n{text[-4000:]}"


def progress(out: Path) -> dict[str, int]:
    """How far a CONSUMER writing ``out`` is: messages seen, transient errors."""
    try:
        return dict(json.loads(Path(f"{out}.progress").read_text()))
    except FileNotFoundError:
        return {"seen": -1, "transient": 0}  # not connected yet


def start_serve(config: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start `postoffice serve`; return it, the consumer URI and the socket it printed.

    Its output goes to a file: a pipe nobody reads would fill with the log
    lines (one per recipient) and stop the server.
    """
    log = config.parent / "serve.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "postoffice.cli", "-C", str(config), "serve"],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    uri = socket = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (uri is None or socket is None):
        text = log.read_text(errors="replace")
        if match := re.search(r"^postoffice: consumers use (\S+)", text, re.M):
            uri = match.group(1)
        if match := re.search(r"^postoffice: listening on unix:(\S+)", text, re.M):
            socket = Path(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    if uri is None or socket is None:
        proc.kill()
        pytest.fail(f"serve did not print its URI and socket: {log.read_text()}")
    return proc, uri, socket


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    return proc.returncode


@pytest.mark.timeout(240)
def test_consumer_reads_while_smtp_source_delivers(tmp_path: Path) -> None:
    smtp_source = require_tool("smtp-source")
    shutil.copytree(REPO / "etc", tmp_path / "etc")
    config = tmp_path / "etc" / "postoffice.ini"
    proc, uri, socket = start_serve(config)
    try:
        assert socket == tmp_path / "var" / "lmtp.sock"
        assert uri.startswith("zeo://") and str(tmp_path / "var" / "zeo.sock") in uri
        out = tmp_path / "consumed.json"
        consumer = start_consumer(uri, out, expected=MESSAGES)
        # The consumer is polling before the first message comes.
        wait_for(lambda: progress(out)["seen"] == 0, 60, "the consumer polling")
        sent = subprocess.run(
            [
                smtp_source,
                "-L",
                "-s",
                str(SESSIONS),
                "-m",
                str(MESSAGES),
                "-f",
                "sender@example.org",
                "-t",
                "user@app.customera.example",
                "-M",
                "embedded.example",
                f"unix:{socket}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        assert consumer.wait(timeout=120) == 0
        result = json.loads(out.read_text())
    finally:
        code = stop(proc)
    assert code == 0
    assert result["errors"] == []
    assert result["transient"] == [], "a pop's conflict reached the application"
    seen = result["seen"]
    assert len(seen) == MESSAGES
    assert len(set(seen)) == MESSAGES, "a message was consumed twice"
    assert all(m.endswith("@embedded.example>") for m in seen)
    # After serve stopped, the file itself is free again and holds nothing left over.
    assert not (tmp_path / "var" / "zeo.sock").exists()
    with open_queue(
        f"file://{tmp_path}/var/Data.fs?blobstorage_dir={tmp_path}/var/blobs", "Customer A"
    ) as queue:
        assert len(queue) == 0


@pytest.mark.timeout(120)
def test_a_consumer_reads_a_large_message_through_the_printed_uri(tmp_path: Path) -> None:
    """A 300 KiB message is a blob: the URI serve prints lets a consumer process read it."""
    shutil.copytree(REPO / "etc", tmp_path / "etc")
    proc, uri, socket = start_serve(tmp_path / "etc" / "postoffice.ini")
    try:
        body = b"".join(b"line %06d " % n + b"x" * 60 + b"\r\n" for n in range(4400))
        raw = (
            b"From: sender@example.org\r\nTo: user@app.customera.example\r\n"
            b"Message-Id: <large@example.org>\r\nSubject: large\r\n\r\n" + body
        )
        assert len(raw) > 300 * 1024
        with smtplib.LMTP(str(socket), local_hostname="client.test", timeout=60) as lmtp:
            refused = lmtp.sendmail("sender@example.org", ["user@app.customera.example"], raw)
        assert refused == {}
        out = tmp_path / "consumed.json"
        consumer = start_consumer(uri, out, expected=1)
        assert consumer.wait(timeout=60) == 0
        result = json.loads(out.read_text())
    finally:
        assert stop(proc) == 0
    assert result["errors"] == [] and result["seen"] == ["<large@example.org>"]
    (size,) = result["sizes"]
    assert size > len(raw)  # what was sent, and the three lines put on top


@pytest.mark.timeout(240)
def test_a_consumer_carries_on_across_a_restart_of_serve(tmp_path: Path) -> None:
    """serve stopped and started again under a consumer: nothing lost, nothing twice.

    The consumer's transaction under way fails with ZEO's ClientDisconnected;
    it aborts and goes on, as docs/consumers.md says, and its next pop waits
    for the new serve.
    """
    smtp_source = require_tool("smtp-source")
    shutil.copytree(REPO / "etc", tmp_path / "etc")
    config = tmp_path / "etc" / "postoffice.ini"
    proc, uri, socket = start_serve(config)
    consumer = None
    try:
        sent = subprocess.run(
            [
                *(smtp_source, "-L", "-s", str(SESSIONS), "-m", str(MESSAGES)),
                *("-f", "sender@example.org", "-t", "user@app.customera.example"),
                *("-M", "restart.example", f"unix:{socket}"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        out = tmp_path / "consumed.json"
        # 10 ms of work per message, inside its transaction: the restart
        # comes while it consumes, and almost always in a transaction.
        consumer = start_consumer(uri, out, expected=MESSAGES, pause=0.01)
        wait_for(lambda: progress(out)["seen"] >= 10, 60, "the consumer consuming")
        assert progress(out)["seen"] < MESSAGES, "the consumer finished before the restart"
        assert stop(proc) == 0
        # serve stays away until the consumer has noticed; then it comes back.
        wait_for(lambda: progress(out)["transient"] > 0, 60, "the consumer noticing the stop")
        proc, again, socket = start_serve(config)
        assert again == uri
        assert consumer.wait(timeout=120) == 0
        result = json.loads(out.read_text())
    finally:
        if consumer is not None and consumer.poll() is None:
            consumer.kill()
        stop(proc)
    seen = result["seen"]
    assert len(seen) == MESSAGES
    assert len(set(seen)) == MESSAGES, "a message was consumed twice"
    assert result["errors"] == []
    assert result["transient"], "the restart went unnoticed: it came too late"
    assert all("ClientDisconnected" in error for error in result["transient"]), result["transient"]
    with open_queue(
        f"file://{tmp_path}/var/Data.fs?blobstorage_dir={tmp_path}/var/blobs", "Customer A"
    ) as queue:
        assert len(queue) == 0


LOAD = 4000
BOTH_DOORS = 40


@pytest.mark.timeout(300)
def test_lmtp_pipe_and_two_consumers_at_once_on_the_shared_depot(tmp_path: Path) -> None:
    """serve, the pipe and two consumers all write through the ZEO server of serve.

    4,000 messages from smtp-source, and 40 more that arrive both over LMTP
    and through the pipe at the same time (the duplicate ledger must keep
    one copy), all popped exactly once by two consumer processes, none of
    whom sees an error; and no process logs an ERROR or a traceback.
    """
    smtp_source = require_tool("smtp-source")
    shutil.copytree(REPO / "etc", tmp_path / "etc")
    config = tmp_path / "etc" / "postoffice.ini"
    proc, uri, socket = start_serve(config)
    stop_file = tmp_path / "stop"
    outs = [tmp_path / f"consumer{n}.json" for n in range(2)]
    # Two applications pop until told to stop and the queue is empty.
    consumers = [start_consumer(uri, out, stop_file=str(stop_file)) for out in outs]
    rcpt = "user@app.customera.example"

    def twin(number: int, eol: bytes) -> bytes:
        lines = [
            b"From: Twin <twin@example.org>",
            b"To: " + rcpt.encode(),
            b"Message-Id: <twin-%d@example.org>" % number,
            b"Subject: twin %d" % number,
            b"",
            b"sent over LMTP and through the pipe",
            b"",
        ]
        return eol.join(lines)

    def by_lmtp(numbers: range) -> None:
        with smtplib.LMTP(str(socket)) as lmtp:
            for number in numbers:
                lmtp.sendmail("twin@example.org", [rcpt], twin(number, b"\r\n"))

    pipe_codes: list[int] = []
    pipe_stderr = tmp_path / "pipe.stderr"

    def by_pipe(numbers: range) -> None:
        for number in numbers:
            piped = subprocess.run(
                [
                    *(sys.executable, "-m", "postoffice.pipe", "-C", str(config)),
                    *("-f", "twin@example.org", rcpt),
                ],
                input=twin(number, b"\n"),
                capture_output=True,
                timeout=60,
            )
            pipe_codes.append(piped.returncode)
            with pipe_stderr.open("ab") as handle:
                handle.write(piped.stderr)

    half = BOTH_DOORS // 2

    def both_doors() -> None:
        """Each twin first through one door, then the other: both must see the first."""
        by_lmtp(range(half, BOTH_DOORS))
        by_pipe(range(half))
        by_pipe(range(half, BOTH_DOORS))  # serve stored these: the pipe must see them
        by_lmtp(range(half))  # the pipe stored these through ZEO: serve must see them

    try:
        with reaped(consumers):
            doors = threading.Thread(target=both_doors)
            doors.start()
            sent = subprocess.run(
                [
                    *(smtp_source, "-L", "-s", "8", "-m", str(LOAD)),
                    *("-f", "sender@example.org", "-t", rcpt, "-M", "load.example"),
                    f"unix:{socket}",
                ],
                capture_output=True,
                text=True,
                timeout=180,
            )
            doors.join(timeout=180)
            stop_file.touch()
            finished(consumers, 180)
    finally:
        stop_file.touch()
        code = stop(proc)
    assert sent.returncode == 0, sent.stderr
    assert code == 0
    assert pipe_codes == [0] * BOTH_DOORS
    results = [json.loads(out.read_text()) for out in outs]
    assert [r["errors"] for r in results] == [[], []]
    assert [r["transient"] for r in results] == [[], []]
    ids = results[0]["seen"] + results[1]["seen"]
    assert len(set(ids)) == len(ids), "a message was consumed twice"
    assert sum(m.endswith("@load.example>") for m in ids) == LOAD
    crlf = results[0]["crlf"] + results[1]["crlf"]
    twins = {m: lines for m, lines in zip(ids, crlf, strict=True) if m.startswith("<twin-")}
    assert sorted(twins) == sorted(f"<twin-{n}@example.org>" for n in range(BOTH_DOORS))
    # The copy kept is the first one: pipe mail has LF line ends, LMTP mail CRLF.
    assert [twins[f"<twin-{n}@example.org>"] for n in range(BOTH_DOORS)] == (
        [False] * half + [True] * half
    )
    assert all(r["seen"] for r in results), "one consumer got nothing: they did not share"
    assert_quiet(config.parent / "serve.log", pipe_stderr, *(Path(f"{out}.stderr") for out in outs))


def test_commands_work_while_serve_runs(tmp_path: Path) -> None:
    """`postoffice queues` and postoffice-deliver find the running server by themselves."""
    shutil.copytree(REPO / "etc", tmp_path / "etc")
    config = tmp_path / "etc" / "postoffice.ini"
    proc, _uri, _socket = start_serve(config)
    try:
        message = (
            b"From: a@example.org\nTo: x@app.customera.example\n"
            b"Message-Id: <pipe-1@example.org>\nSubject: by pipe\n\nhello\n"
        )
        piped = subprocess.run(
            [
                sys.executable,
                "-m",
                "postoffice.pipe",
                "-C",
                str(config),
                "-f",
                "a@example.org",
                "x@app.customera.example",
            ],
            input=message,
            capture_output=True,
            timeout=60,
        )
        assert piped.returncode == 0, piped.stderr
        listed = subprocess.run(
            [sys.executable, "-m", "postoffice.cli", "-C", str(config), "queues", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        depths = {row["name"]: row["depth"] for row in json.loads(listed.stdout)["queues"]}
        assert depths == {"Customer A": 1, "Customer B": 0}
    finally:
        assert stop(proc) == 0
    # Whatever the umask it was started with, serve's files are not for other users.
    var = tmp_path / "var"
    made = [path for path in var.rglob("*") if not path.is_socket()]
    assert var / "Data.fs" in made
    assert {path: path.stat().st_mode & 0o007 for path in made} == dict.fromkeys(made, 0)


def documented_loop(uri: str, out: Path, written_out: bool = False) -> str:
    """The consumer loop of docs/consumers.md, as written, on ``uri``.

    The page's first example, which calls ``consume``; with
    ``written_out``, the loop it shows written out instead, after the
    first example's imports, ``send`` and ``URI``.  Only what the page
    leaves to the reader is filled in: ``process`` keeps each message's
    Message-Id and bytes, and ``send`` keeps the notices instead of
    mailing them.
    """
    page = (REPO / "docs" / "consumers.md").read_text()
    flags = re.S | re.M
    first = re.search(r"^## The loop\n.*?```python\n(.*?)```", page, flags)
    assert first is not None, "docs/consumers.md has no loop"
    preamble, process, code = re.split(
        r"^(def process\(message\):.*?\n)\n", first.group(1), maxsplit=1, flags=flags
    )
    assert "..." in process, "the example's process() is no longer left to the reader"
    if written_out:
        loop = re.search(r"^### The same loop, written out\n.*?```python\n(.*?)```", page, flags)
        assert loop is not None, "docs/consumers.md no longer writes the loop out"
        code = loop.group(1)
    preamble, uris = re.subn(r"^URI = \(.*?\)\n", f"URI = {uri!r}\n", preamble, flags=flags)
    preamble, sends = re.subn(r"^send = .*\n", "send = lambda *n: None\n", preamble, flags=re.M)
    assert uris == sends == 1, "the loop no longer sets URI and send"
    fill_in = textwrap.dedent(
        f"""
        import atexit, json
        kept = []
        def process(message):
            kept.append([message["Message-Id"], message.as_bytes().decode("latin-1")])
        atexit.register(lambda: open({str(out)!r}, "w").write(json.dumps(kept)))
        """
    )
    return preamble + fill_in + code


@pytest.mark.timeout(180)
@pytest.mark.parametrize("written_out", [False, True], ids=["consume", "written out"])
def test_the_documented_loop_quarantines_a_message_it_cannot_read(
    tmp_path: Path, written_out: bool
) -> None:
    """A consumer whose URI has no blob folder meets a 300 KiB message.

    The loop of docs/consumers.md sets that message aside in the quarantine
    and carries on with the next; once the administrator requeues it, the
    same loop on the URI serve printed reads it, bytes as sent.
    """
    shutil.copytree(REPO / "etc", tmp_path / "etc")
    config = tmp_path / "etc" / "postoffice.ini"
    proc, uri, socket = start_serve(config)
    rcpt = "user@app.customera.example"

    def message(name: str, body: bytes) -> bytes:
        return (
            b"From: sender@example.org\r\nTo: %s\r\nMessage-Id: <%s@example.org>\r\n"
            b"Subject: %s\r\n\r\n%s" % (rcpt.encode(), name.encode(), name.encode(), body)
        )

    big = message("big", b"".join(b"line %06d " % n + b"x" * 60 + b"\r\n" for n in range(4400)))
    assert len(big) > 300 * 1024

    def consume(on: str, out: Path) -> list[list[str]]:
        ran = subprocess.run(
            [sys.executable, "-c", documented_loop(on, out, written_out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
        # ZODB itself logs the blob it could not load, with its traceback;
        # nothing else may escape the loop.
        tracebacks = ran.stderr.count("Traceback")
        assert tracebacks == ran.stderr.count("Couldn't load state for ZODB.blob.Blob"), ran.stderr
        return json.loads(out.read_text())

    def postoffice(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "postoffice.cli", "-C", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        with smtplib.LMTP(str(socket), local_hostname="client.test", timeout=60) as lmtp:
            for raw in (message("first", b"one\r\n"), big, message("last", b"two\r\n")):
                assert lmtp.sendmail("sender@example.org", [rcpt], raw) == {}
        # The URI as an application might first write it: no blob folder.
        bare = uri.split("?", 1)[0]
        assert "blob_dir" not in bare
        done = consume(bare, tmp_path / "bare.json")
        assert [message_id for message_id, _ in done] == [
            "<first@example.org>",
            "<last@example.org>",
        ]
        listed = postoffice("quarantine", "list", "Customer A")
        assert listed.returncode == 0, listed.stderr
        assert "cannot be read" in listed.stdout and "blob" in listed.stdout, listed.stdout
        requeued = postoffice("quarantine", "requeue", "Customer A")
        assert requeued.returncode == 0, requeued.stderr
        done = consume(uri, tmp_path / "printed.json")
    finally:
        assert stop(proc) == 0
    ((message_id, text),) = done
    assert message_id == "<big@example.org>"
    assert text.encode("latin-1").endswith(big)  # the bytes sent, under the lines put on top
    assert "ERROR" not in (config.parent / "serve.log").read_text()
