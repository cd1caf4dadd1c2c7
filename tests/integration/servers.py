"""Our own servers as real processes, for integration tests: ``postoffice serve`` and ZEO.

``Serve`` runs ``postoffice -C FILE serve`` with its output in files beside the
configuration (``serve.out``, ``serve.err``: one log line per recipient
decision goes to stderr). ``ZeoServer`` runs ``python -m ZEO.runzeo`` over a
FileStorage with blobs on a unix socket. Both can be stopped and started again
on the same files, which the fault tests do; the ``servers`` and
``zeo_servers`` fixtures of ``conftest.py`` stop whatever a test left running.
``PostgresCluster`` is a private PostgreSQL server (``initdb`` into a
temporary folder, a unix socket there and loopback TCP), for RelStorage.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
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
from tests.integration.postfix_instance import PostfixInstance, free_port

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

# Every wait for Postfix, the server or ZEO is bounded by this.
WAIT = 60.0

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


def require_zeo() -> None:
    """Skip the test locally when ZEO's server is not installed; fail it in CI."""
    if importlib.util.find_spec("ZEO") is None:
        reason = "ZEO is not installed (pip install ZEO)"
        if in_ci():
            pytest.fail(f"{reason} (CI=true: a missing part is a failure, not a skip)")
        pytest.skip(reason)


def _missing(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing part is a failure, not a skip)")
    pytest.skip(reason)


def require_relstorage() -> None:
    """Skip locally when RelStorage (and for PostgreSQL, psycopg2) is missing; fail in CI."""
    for module in ("relstorage", "psycopg2"):
        if importlib.util.find_spec(module) is None:
            _missing(f"{module} is not installed (pip install 'postoffice[postgresql]')")


# Debian installs the server programs here, not on PATH.
POSTGRES_DIRS = "/usr/lib/postgresql/*/bin"


def require_postgres() -> Path:
    """The folder of ``initdb``, ``pg_ctl`` and ``postgres``; skip locally, fail in CI."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    candidates = sorted(
        glob.glob(POSTGRES_DIRS), key=lambda d: [int(p) for p in re.findall(r"\d+", d)]
    )
    for folder in reversed(candidates):
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(folder)
    _missing(f"PostgreSQL's initdb and pg_ctl are not on PATH nor in {POSTGRES_DIRS}")
    raise AssertionError("unreachable")


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


class ZeoServer:
    """``python -m ZEO.runzeo`` on a unix socket, with a FileStorage and blobs in ``folder``.

    runzeo only takes a blob folder from a configuration file, hence ``zeo.conf``.
    The socket is made 0666, so that other users (``nobody`` running a pipe
    command) may connect too. ``stop()`` then ``start()`` again is an outage.
    """

    def __init__(self, sock: Path, folder: Path) -> None:
        self.sock = sock
        self.folder = folder
        self.log_path = folder / "zeo.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        require_zeo()
        conf = self.folder / "zeo.conf"
        conf.write_text(
            f"<zeo>\n  address {self.sock}\n</zeo>\n"
            f"<filestorage>\n  path {self.folder / 'Data.fs'}\n"
            f"  blob-dir {self.folder / 'blobs'}\n</filestorage>\n"
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ZEO.runzeo", "-C", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + WAIT
        while True:
            assert self.process.poll() is None, self.log_path.read_text(errors="replace")
            with socket.socket(socket.AF_UNIX) as probe, contextlib.suppress(OSError):
                probe.connect(str(self.sock))
                break
            assert time.monotonic() < deadline, "the ZEO server did not start"
            time.sleep(0.05)
        self.sock.chmod(0o666)

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it does not end within WAIT)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(WAIT)

    def file_uri(self) -> str:
        """The depot as a file:// URI, for reading it after the server stopped."""
        return f"file://{self.folder}/Data.fs?blobstorage_dir={self.folder}/blobs"


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


class PostgresCluster:
    """A private PostgreSQL server in a temporary folder of its own, stopped at ``stop()``.

    ``initdb`` makes the cluster with a superuser ``postoffice`` whose
    password is ``PASSWORD``; the server listens on a unix socket in its
    folder (trusted, no password) and on 127.0.0.1 (password required), so
    that both spellings of a URI are tried against a real server. PostgreSQL
    refuses to run as root: as root, the folder belongs to the ``postgres``
    user (or ``nobody``) and the server programs run as that user through
    ``runuser``. The folder is made directly in /tmp, so that its socket
    path stays short and the unprivileged user can reach it.
    """

    USER = "postoffice"
    PASSWORD = "s3cret-pw"

    def __init__(self) -> None:
        self.bin = require_postgres()
        self.folder = Path(tempfile.mkdtemp(prefix="po-pg-", dir="/tmp"))
        self.data = self.folder / "data"
        self.log_path = self.folder / "postgres.log"
        self.port = free_port()
        self.owner: str | None = None
        if os.geteuid() == 0:
            self.owner = _unprivileged_user()
            entry = pwd.getpwnam(self.owner)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self.folder.chmod(0o755)
        self.running = False

    @property
    def socket_dir(self) -> Path:
        return self.folder

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.owner is not None:
            command = ["runuser", "-u", self.owner, "--", *command]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=WAIT,
            cwd=self.folder,
            check=False,
        )
        assert done.returncode == 0, f"{argv[0]} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def start(self) -> PostgresCluster:
        pwfile = self.folder / "pwfile"
        pwfile.write_text(self.PASSWORD + "\n")
        if self.owner is not None:
            entry = pwd.getpwnam(self.owner)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            self.USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-locale",
        )
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                # Two serves, two consumers and the commands each hold several.
                "max_connections = 200\n"
            )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "start")
        self.running = True
        return self

    def create_database(self, name: str) -> str:
        """A new, empty database; its name."""
        self._run(
            "createdb", "-h", str(self.socket_dir), "-p", str(self.port), "-U", self.USER, name
        )
        return name

    def socket_uri(self, database: str, **options: str) -> str:
        """The ``postgres://`` URI that reaches ``database`` through the unix socket."""
        dsn = f"host={self.socket_dir} port={self.port} user={self.USER} dbname={database}"
        query = [("dsn", dsn), *options.items()]
        return "postgres://?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)

    def tcp_uri(self, database: str, **options: str) -> str:
        """The ``postgres://`` URI over loopback TCP, with the password."""
        uri = f"postgres://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{database}"
        if options:
            uri += "?" + urllib.parse.urlencode(options)
        return uri

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """``pg_ctl stop -m fast``, then the folder goes; nothing is left behind."""
        try:
            if self.running:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
                self.running = False
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def _unprivileged_user() -> str:
    """Who runs PostgreSQL when the tests run as root: ``postgres`` if it exists."""
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    pytest.fail("running as root, and there is neither a postgres nor a nobody user")
