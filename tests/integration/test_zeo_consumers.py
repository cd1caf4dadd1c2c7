"""Two consumer processes share one queue through a real ZEO server.

The test starts ``python -m ZEO.runzeo`` on a unix socket over a FileStorage
with blobs, puts 200 messages in a queue (ten of which make the consumer's
processing fail), and runs two consumer processes at once, each the documented
loop.  Afterwards every good message was processed exactly once, every bad
one is in the quarantine exactly once, nothing is left in the queue, and
neither consumer ever saw an exception other than ``QueueEmpty``: the
conflicts between their claims were retried inside postoffice, and their
commits never conflict with a claim.  The server cannot import postoffice:
a stock ZEO server does.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import transaction

from postoffice import open_queue
from postoffice.deliver import Delivery, Depot
from tests.helpers import message, settings_for, wait_for
from tests.integration.servers import finished, reaped

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MESSAGES = 200
POISON = {7, 33, 64, 99, 120, 121, 150, 177, 188, 199}
DEADLINE = 90.0

CONSUMER = textwrap.dedent(
    """
    import json, sys, time
    import transaction
    from postoffice import QueueEmpty, open_queue

    uri, out, go, deadline = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    processed, quarantined, errors, empty = [], [], [], 0
    queue, closer = open_queue(uri, "A")
    len(queue)  # connected and reading
    open(out + ".ready", "w").close()
    stop = time.monotonic() + deadline
    while not __import__("os").path.exists(go) and time.monotonic() < stop:
        time.sleep(0.01)

    def process(message):
        if "poison" in message["Subject"]:
            raise ValueError("cannot process " + message["Message-Id"])
        time.sleep(0.002)  # some work, so the two consumers overlap

    while time.monotonic() < stop:
        try:
            if not queue:
                break
            message = queue.pop_next()
        except QueueEmpty:
            # The other consumer holds the last ones; look again.
            empty += 1
            transaction.abort()
            time.sleep(0.01)
            continue
        except Exception as exc:
            errors.append("pop: " + repr(exc))
            transaction.abort()
            continue
        try:
            process(message)
            transaction.commit()
            processed.append(message["Message-Id"])
        except ValueError as exc:
            try:
                transaction.abort()
                queue.quarantine(message, sys.exc_info())
                transaction.commit()
                quarantined.append(message["Message-Id"])
            except Exception as exc2:
                errors.append("quarantine: " + repr(exc2))
                transaction.abort()
        except Exception as exc:
            errors.append("commit: " + repr(exc))
            transaction.abort()
    closer()
    with open(out, "w") as handle:
        json.dump({"processed": processed, "quarantined": quarantined,
                   "errors": errors, "empty": empty}, handle)
    """
)


# runzeo with postoffice made unimportable: a stock ZEO server is enough,
# since no object of ours ever needs conflict resolution on the server.
STOCK_SERVER = (
    "import sys; sys.modules['postoffice'] = None; "
    "from ZEO.runzeo import main; sys.argv[0] = 'runzeo'; main()"
)


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            raise RuntimeError(f"runzeo exited with {process.returncode}: {output}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            return
        time.sleep(0.05)
    raise RuntimeError(f"runzeo did not listen on {path} within {timeout}s")


@pytest.fixture
def zeo_uri(tmp_path: Path) -> Iterator[str]:
    """A ZEO server over FileStorage with blobs; the URI clients open it by."""
    sock = tmp_path / "zeo.sock"
    conf = tmp_path / "zeo.conf"
    # runzeo has no blob option: blobs need a configuration file.
    conf.write_text(
        textwrap.dedent(
            f"""
            <zeo>
              address {sock}
            </zeo>
            <filestorage 1>
              path {tmp_path / "Data.fs"}
              blob-dir {tmp_path / "blobs"}
            </filestorage>
            """
        )
    )
    server = subprocess.Popen(
        [sys.executable, "-c", STOCK_SERVER, "-C", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        _wait_for_socket(sock, server, 30)
        yield f"zeo://{sock}?blob_dir={tmp_path / 'blobs'}&shared_blob_dir=1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()


def _message(number: int) -> bytes:
    subject = f"poison {number}" if number in POISON else f"number {number}"
    return message(number, subject=subject, body=f"Body of {number}.\n")


def _fill(tmp_path: Path, uri: str) -> None:
    depot = Depot(settings_for(tmp_path, zodb_uri=uri, queues={"A": "to_hostname: a.example"}))
    try:
        deliveries = [
            Delivery("sender@outside.example", ("rcpt@a.example",), _message(n))
            for n in range(MESSAGES)
        ]
        for start in range(0, MESSAGES, 50):
            for outcomes in depot.deliver_batch(deliveries[start : start + 50]):
                assert [o.reply[:3] for o in outcomes] == ["250"]
    finally:
        depot.close()


def test_two_consumer_processes_pop_every_message_exactly_once(
    tmp_path: Path, zeo_uri: str
) -> None:
    _fill(tmp_path, zeo_uri)
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    go = tmp_path / "go"
    outputs = [tmp_path / f"consumer-{n}.json" for n in (1, 2)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    consumers = [
        subprocess.Popen(
            [sys.executable, str(script), zeo_uri, str(out), str(go), str(DEADLINE)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for out in outputs
    ]
    with reaped(consumers):
        # Both are connected and waiting: start them together.
        wait_for(
            lambda: all(Path(f"{out}.ready").exists() for out in outputs),
            DEADLINE,
            "both consumers connected",
        )
        go.touch()
        finished(consumers, DEADLINE + 20)

    results = [json.loads(out.read_text()) for out in outputs]
    assert [r["errors"] for r in results] == [[], []]
    processed = Counter(mid for r in results for mid in r["processed"])
    quarantined = Counter(mid for r in results for mid in r["quarantined"])
    good = {f"<{n}@outside.example>" for n in range(MESSAGES) if n not in POISON}
    bad = {f"<{n}@outside.example>" for n in POISON}
    assert set(processed) == good
    assert set(quarantined) == bad
    assert max(processed.values()) == 1
    assert max(quarantined.values()) == 1
    # Both really consumed: the exclusivity was tested, not one consumer alone.
    assert all(r["processed"] for r in results), [len(r["processed"]) for r in results]

    with open_queue(zeo_uri, "A") as queue:
        assert len(queue) == 0
        assert not queue
        assert list(queue.messages()) == []
        assert queue.count_quarantined_messages() == len(POISON)
        in_quarantine = {m["Message-Id"] for m, _error in queue.get_quarantined_messages()}
        assert in_quarantine == bad
        errors = [error for _m, error in queue.get_quarantined_messages()]
        assert all("ValueError: cannot process" in error for error in errors)


UNCLOSED = textwrap.dedent(
    """
    import sys, transaction
    from postoffice import open_queue
    queue, closer = open_queue(sys.argv[1], "A")
    for _number in range(20):
        queue.pop_next()
        transaction.commit()
    # Ends without closer(), as scripts do: what it claimed ahead goes back.
    """
)


def test_a_consumer_that_ends_without_closing_leaves_nothing_claimed_ahead(
    tmp_path: Path, zeo_uri: str
) -> None:
    _fill(tmp_path, zeo_uri)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    ended = subprocess.run(
        [sys.executable, "-c", UNCLOSED, zeo_uri],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert ended.returncode == 0, ended.stderr
    # Claims of 1, 2, 4, 8 and 16 served its 20 pops: 11 were claimed ahead.
    # They wait for any consumer now, not after the hour of the lease.
    with open_queue(zeo_uri, "A") as queue:
        assert len(queue) == MESSAGES - 20
        assert queue.pop_next()["Message-Id"] == "<20@outside.example>"  # FIFO
        transaction.abort()
