"""``postoffice serve`` driven by Postfix's own LMTP client, ``smtp-source -L``.

A client nobody here wrote: it pipelines, counts one reply per recipient
after DATA and gives up (exit 1) on any reply it did not expect.  The
server runs as a real process (``python -m postoffice.lmtp``) on a unix
socket, with a FileStorage and blobs; after SIGTERM the queue must hold
exactly the messages sent.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice import open_queue
from tests.helpers import HERE_URI, config_text
from tests.integration.postfix_instance import require_tool

pytestmark = pytest.mark.integration

CONFIG = config_text(
    HERE_URI,
    max_message_size="10m",
    lmtp={"listen": "unix:%(here)s/lmtp.sock", "max_sessions": 16},
    queues={"App": "to_hostname: app.test"},
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A running server process and its socket; killed if a test left it running."""
    (tmp_path / "postoffice.ini").write_text(CONFIG)
    out = tmp_path / "server.out"
    with out.open("wb") as stdout, (tmp_path / "server.err").open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "postoffice.lmtp", "-C", str(tmp_path / "postoffice.ini")],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in out.read_text():
            assert proc.poll() is None, (tmp_path / "server.err").read_text()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield proc, tmp_path / "lmtp.sock"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize(
    ("sessions", "messages", "recipients"),
    [(1, 200, 1), (8, 400, 1), (8, 100, 3)],
    ids=["one-session", "eight-sessions", "three-recipients-each"],
)
def test_every_message_from_smtp_source_is_queued(
    served: tuple[subprocess.Popen[bytes], Path],
    tmp_path: Path,
    sessions: int,
    messages: int,
    recipients: int,
) -> None:
    smtp_source = require_tool("smtp-source")
    proc, sock = served
    result = subprocess.run(
        [
            smtp_source,
            "-L",
            "-s",
            str(sessions),
            "-m",
            str(messages),
            "-r",
            str(recipients),
            "-f",
            "sender@outside.test",
            "-t",
            "rcpt@app.test",
            "-M",
            f"run-{sessions}-{messages}-{recipients}.test",
            f"unix:{sock}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    uri = f"file://{tmp_path}/var/Data.fs?blobstorage_dir={tmp_path}/var/blobs"
    with open_queue(uri, "App") as queue:
        assert len(queue) == messages * recipients
        pairs = {_recipient_and_id(raw) for _, raw, _ in queue.messages()}
    # Each message once for each of its recipients, none twice, none lost.
    assert len(pairs) == messages * recipients


def _recipient_and_id(raw: bytes) -> tuple[bytes, bytes]:
    recipient = re.search(rb"(?m)^X-Original-To: (.*)\r$", raw)
    message_id = re.search(rb"(?mi)^Message-Id: (.*)\r$", raw)
    assert recipient and message_id
    return recipient.group(1), message_id.group(1)
