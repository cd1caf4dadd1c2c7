"""Our own servers as real processes, for integration tests: ``postoffice serve`` and ZEO.

``Serve`` runs ``postoffice -C FILE serve`` with its output in files beside the
configuration (``serve.out``, ``serve.err``: one log line per recipient
decision goes to stderr). ``ZeoServer`` runs ``python -m ZEO.runzeo`` over a
FileStorage with blobs on a unix socket. Both can be stopped and started again
on the same files, which the fault tests do; the ``servers`` and
``zeo_servers`` fixtures of ``conftest.py`` stop whatever a test left running.
``PostgresCluster`` is a private PostgreSQL server (``initdb`` into a
temporary folder, a unix socket there and loopback TCP), for RelStorage.
Those two live in ``storage_servers`` (the benchmark starts them too);
here they skip a test locally, and fail it in CI, when a part is missing.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from postoffice.sockets import MAX_SOCKET_PATH
from tests.helpers import ENVELOPE, in_ci, message
from tests.integration import storage_servers
from tests.integration.postfix_instance import PostfixInstance
from tests.integration.storage_servers import WAIT, Unavailable

__all__ = [
    "QUEUES",
    "SENDER",
    "WAIT",
    "PostgresCluster",
    "Serve",
    "ZeoServer",
    "delivery_status",
    "finished",
    "make_message",
    "parse",
    "reaped",
    "require_postgres",
    "require_relstorage",
    "require_zeo",
    "socket_path",
    "start_serve",
]

SENDER = "sender@sender.test"

# Two queues routed by the envelope recipient alone: the default also reads
# To and Cc, so both recipients of a message to both domains would go to the
# first queue.
QUEUES = {
    "App": "to_hostname: app.test" + ENVELOPE,
    "Other": "to_hostname: other.test" + ENVELOPE,
}


def make_message(to: str, token: str, body: str | None = None) -> bytes:
    """A small message from SENDER with Message-Id ``<token@sender.test>``."""
    return message(
        sender=f"Sender <{SENDER}>",
        to=to,
        message_id=f"<{token}@sender.test>",
        subject=f"order {token}",
        date=formatdate(),
        body=f"{body if body is not None else f'Body of {token}.'}\r\n".encode(),
    )


def delivery_status(pf: PostfixInstance, recipient: str, status: str) -> str:
    """The text in parentheses of Postfix's delivery log line for ``recipient``."""
    match = pf.wait_for_log(
        rf"to=<{re.escape(recipient)}>.*, status={status} \((.*)\)$", timeout=WAIT
    )
    return match.group(1)


def parse(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def socket_path(folder: Path, name: str) -> Path:
    """A unix socket path in ``folder``, refused up front when the kernel would refuse it."""
    path = folder / name
    if len(str(path)) > MAX_SOCKET_PATH:
        pytest.fail(f"unix socket path longer than {MAX_SOCKET_PATH} bytes: {path}")
    return path


def _missing(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing part is a failure, not a skip)")
    pytest.skip(reason)


def require_zeo() -> None:
    """Skip the test locally when ZEO's server is not installed; fail it in CI."""
    missing = storage_servers.zeo_missing()
    if missing is not None:
        _missing(missing)


def require_relstorage() -> None:
    """Skip locally when RelStorage (and for PostgreSQL, psycopg2) is missing; fail in CI."""
    missing = storage_servers.relstorage_missing()
    if missing is not None:
        _missing(missing)


def require_postgres() -> Path:
    """The folder of ``initdb``, ``pg_ctl`` and ``postgres``; skip locally, fail in CI."""
    try:
        return storage_servers.postgres_bin()
    except Unavailable as exc:
        _missing(str(exc))
        raise AssertionError("unreachable") from None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class Serve:
    """``postoffice -C FILE serve`` as a subprocess, its output in files for diagnostics.

    The files are appended to, so a server started again (after ``kill()``)
    keeps the log of its earlier runs: ``log()`` is every run's stderr.
    """

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.out = config_path.parent / "serve.out"
        self.err = config_path.parent / "serve.err"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        """Start it and wait until this run prints where it listens."""
        offset = _size(self.out)
        with self.out.open("ab") as stdout, self.err.open("ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "postoffice.cli", "-C", str(self.config_path), "serve"],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=self.config_path.parent,
            )
        deadline = time.monotonic() + WAIT
        while b"listening on" not in self.out.read_bytes()[offset:]:
            assert self.process.poll() is None, f"serve exited: {self.output()}"
            assert time.monotonic() < deadline, f"serve did not start: {self.output()}"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM, as an init system stops it; a clean stop exits 0."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0, self.output()

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as the OOM killer does it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(WAIT)

    def log(self) -> str:
        """What every run so far wrote on stderr (the log)."""
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def output(self) -> str:
        out = self.out.read_text(errors="replace") if self.out.exists() else ""
        return f"\n--- serve stdout ---\n{out}\n--- stderr ---\n{self.log()}"


def start_serve(servers: list[Serve], config_path: Path) -> Serve:
    """Start a ``Serve`` and add it to ``servers`` (the fixture that kills what is left)."""
    server = Serve(config_path)
    servers.append(server)
    return server.start()


class ZeoServer(storage_servers.ZeoServer):
    """``storage_servers.ZeoServer``, skipped locally (failed in CI) when ZEO is missing."""

    def start(self) -> None:
        require_zeo()
        super().start()


@contextlib.contextmanager
def reaped(processes: list[subprocess.Popen[Any]]) -> Iterator[list[subprocess.Popen[Any]]]:
    """Helper processes (consumers) of a test: any still running at the end is killed.

    So a failing assertion does not leave a consumer polling a depot that
    the test's clean-up is about to remove.
    """
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def finished(processes: list[subprocess.Popen[Any]], timeout: float) -> list[str]:
    """Wait for each process to exit 0 (its output in the failure) and return its stdout."""
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        text = [
            part.decode(errors="replace") if isinstance(part, bytes) else part or ""
            for part in (out, err)
        ]
        assert process.returncode == 0, "\n".join(text)
        outputs.append(text[0])
    return outputs


class PostgresCluster(storage_servers.PostgresCluster):
    """``storage_servers.PostgresCluster`` in /tmp; skipped locally (failed in CI) when missing."""

    def __init__(self) -> None:
        require_postgres()
        super().__init__()
