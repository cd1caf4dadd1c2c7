"""Storage servers several processes share a depot through: ZEO's ``runzeo`` and PostgreSQL.

The integration tests and the benchmark (``bench/run.py``) both start them,
so both import this one module; it needs neither pytest nor the tests
package (the benchmark runs where pytest is not installed) and imports
postoffice only to greet a ZEO server.  A part that is not installed
raises ``Unavailable`` with the reason, a server that will not start
raises ``ServerError`` with its log: the tests skip or fail on the first
(``tests/integration/servers.py``), the benchmark reports either as its
row's error.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

# Every wait for a server to start or stop is bounded by this.
WAIT = 60.0

# The ZEO server's configuration as an operator gets it (docs/scaling.md).
EXAMPLE_ZEO_CONF = Path(__file__).resolve().parents[2] / "postfix-examples" / "zeo.conf"

# Debian installs the PostgreSQL server programs here, not on PATH.
POSTGRES_DIRS = "/usr/lib/postgresql/*/bin"


class Unavailable(Exception):
    """A part this machine lacks (ZEO, RelStorage, PostgreSQL's programs): the reason."""


class ServerError(Exception):
    """A server that did not start or stop as it should: what it said."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def zeo_missing() -> str | None:
    """Why ZEO's server cannot run here, or None."""
    if importlib.util.find_spec("ZEO") is None:
        return "ZEO is not installed (pip install ZEO)"
    return None


def relstorage_missing() -> str | None:
    """Why a ``postgres://`` depot cannot be opened here (RelStorage or psycopg2 lacking)."""
    for module in ("relstorage", "psycopg2"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'postoffice[postgresql]')"
    return None


def postgres_bin() -> Path:
    """The folder of ``initdb``, ``pg_ctl`` and ``postgres``; ``Unavailable`` when none."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    candidates = sorted(
        glob.glob(POSTGRES_DIRS), key=lambda d: [int(p) for p in re.findall(r"\d+", d)]
    )
    for folder in reversed(candidates):
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(folder)
    raise Unavailable(f"PostgreSQL's initdb and pg_ctl are not on PATH nor in {POSTGRES_DIRS}")


def example_zeo_conf(folder: Path, sock: Path | None = None) -> str:
    """postfix-examples/zeo.conf with its files and log moved into ``folder``.

    The socket too (``folder/zeo.sock``), unless ``sock`` says where.
    """
    text = EXAMPLE_ZEO_CONF.read_text()
    if sock is not None:
        text = text.replace("/var/lib/postoffice/zeo.sock", str(sock))
    for path in ("/var/lib/postoffice", "/var/log/postoffice"):
        text = text.replace(path, str(folder))
    return text


def zeo_answers(path: Path) -> bool:
    """Whether a ZEO server answers on ``path`` (asked ``ruok``, so it logs no ERROR)."""
    from postoffice.database import zeo_greet

    with contextlib.suppress(OSError, ValueError), socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(WAIT)
        probe.connect(str(path))
        zeo_greet(probe)
        return True
    return False


class ZeoServer:
    """``python -m ZEO.runzeo`` on a unix socket, with a FileStorage and blobs in ``folder``.

    runzeo only takes a blob folder from a configuration file, hence
    ``zeo.conf``: a minimal one by default (the log on the server's
    stderr, in ``zeo.log``), or ``example=True`` for postfix-examples/zeo.conf
    with its paths moved into ``folder`` (its own log in ``zeo.log``, its
    stderr in ``zeo.err``).  The server runs on
    the Python running this, with the same environment, so postoffice is
    importable in it for conflict resolution wherever it is here.  The
    socket is made 0666, so that other users (``nobody`` running a pipe
    command) may connect too.  ``stop()`` then ``start()`` again is an outage.
    """

    def __init__(self, sock: Path, folder: Path, example: bool = False) -> None:
        self.sock = sock
        self.folder = folder
        self.example = example
        self.log_path = folder / "zeo.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        missing = zeo_missing()
        if missing is not None:
            raise Unavailable(missing)
        conf = self.folder / "zeo.conf"
        conf.write_text(
            example_zeo_conf(self.folder, self.sock)
            if self.example
            else f"<zeo>\n  address {self.sock}\n</zeo>\n"
            f"<filestorage>\n  path {self.folder / 'Data.fs'}\n"
            f"  blob-dir {self.folder / 'blobs'}\n</filestorage>\n"
        )
        output = self.folder / "zeo.err" if self.example else self.log_path
        with output.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ZEO.runzeo", "-C", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
            )
        deadline = time.monotonic() + WAIT
        while not zeo_answers(self.sock):
            if self.process.poll() is not None:
                raise ServerError(f"runzeo exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the ZEO server did not answer within {WAIT:.0f}s")
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

    def log(self) -> str:
        """What the server logged (with ``example``, its log file and then its stderr)."""
        paths = [self.log_path] + ([self.folder / "zeo.err"] if self.example else [])
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def uri(self) -> str:
        """The ``zeo://`` URI of docs/scaling.md: clients on this host share the blob folder."""
        return f"zeo://{self.sock}?blob_dir={self.folder}/blobs&shared_blob_dir=true"

    def file_uri(self) -> str:
        """The depot as a file:// URI, for reading it after the server stopped."""
        return f"file://{self.folder}/Data.fs?blobstorage_dir={self.folder}/blobs"


class PostgresCluster:
    """A private PostgreSQL server in a temporary folder of its own, stopped at ``stop()``.

    ``initdb`` makes the cluster with a superuser ``postoffice`` whose
    password is ``PASSWORD``; the server listens on a unix socket in its
    folder (trusted, no password) and on 127.0.0.1 (password required), so
    that both spellings of a URI are tried against a real server. PostgreSQL
    refuses to run as root: as root, the folder belongs to the ``postgres``
    user (or ``nobody``) and the server programs run as that user through
    ``runuser``. The folder is made in ``parent`` (by default directly in
    /tmp, so that its socket path stays short); the unprivileged user must
    be able to reach it.
    """

    USER = "postoffice"
    PASSWORD = "s3cret-pw"

    def __init__(self, parent: Path | None = None) -> None:
        self.bin = postgres_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="po-pg-", dir=parent or "/tmp"))
        self.data = self.folder / "data"
        self.log_path = self.folder / "postgres.log"
        self.port = free_port()
        self.owner: str | None = None
        if os.geteuid() == 0:
            self.owner = unprivileged_user()
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
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=WAIT,
                cwd=self.folder,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ServerError(f"{argv[0]} did not finish within {WAIT:.0f}s") from None
        if done.returncode != 0:
            raise ServerError(f"{argv[0]} failed:\n{done.stdout}\n{done.stderr}")
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


def unprivileged_user() -> str:
    """Who runs PostgreSQL when we are root: ``postgres`` if it exists, else ``nobody``."""
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise Unavailable("running as root, and there is neither a postgres nor a nobody user")
