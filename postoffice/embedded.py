"""The embedded default, shared: ``serve`` runs a ZEO server next to Data.fs (SPEC 8).

A FileStorage can be opened by one process only (it locks ``Data.fs.lock``),
yet while ``postoffice serve`` runs, applications on the same host must open
their queues.  So for a ``file://`` zodb_uri, ``serve`` starts a ZEO server
as a child process on a unix socket beside the data file (``zeo.sock``),
opens the depot through it like any other client, and prints the
``zeo://`` URI that consumers use.  Nothing listens on the network.  Blobs
are not copied over the socket: every client reads and writes the server's
blob folder itself (``shared_blob_dir``), which is why this is for one host.

Sharing costs throughput (every commit is a round trip to another
process); ``bench/sharing.py`` measures how much and ``docs/embedded.md``
has the numbers.  Where nobody shares (``share = False``), the URI is left
alone and the server opens the FileStorage itself.

What ``serve`` does with it::

    with shared(settings.zodb_uri, share=True) as uri:
        print(f"postoffice: consumers use {uri}")
        db = open_db(uri)
        try:
            ...                       # serve until SIGTERM
        finally:
            db.close()                # before the ZEO server stops

The child runs ``python -m postoffice.embedded CONFIG``: ZEO's own ``runzeo``
(which takes a blob folder only from a configuration file), plus a watch on
its stdin so that it stops cleanly when its parent dies, however it died.
It runs in a session of its own, so a Ctrl-C meant for ``serve`` does not
stop the database under the DATA that ``serve`` is still finishing.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from postoffice.errors import ConfigError, StorageUnavailable

log = logging.getLogger("postoffice.embedded")
# The ZEO server's own log lines, forwarded into the server's log.
zeo_log = logging.getLogger("postoffice.zeo")

SOCKET_NAME = "zeo.sock"
DEFAULT_SOCKET_MODE = 0o660
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# A ZEO server that dies is started again, at most this often.
RESTARTS = 3
RESTART_WINDOW = 60.0
RESTART_DELAY = 1.0
# sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107

# zodburi's file:// options that belong to the FileStorage (the server side);
# every other option (database_name, connection_*) is for ZODB.DB and goes
# on into the client URI.
_STORAGE_OPTIONS = {"create": "create", "read_only": "read-only", "quota": "quota"}
_BLOB_OPTIONS = ("blobstorage_dir", "blobstorage_layout")
_UNSHAREABLE = ("demostorage",)
_BOOLEAN = {"1": "true", "on": "true", "true": "true", "t": "true", "yes": "true"}


class EmbeddedZeoError(StorageUnavailable):
    """The embedded ZEO server could not start; ``str()`` says why, in one line."""


@dataclass(frozen=True)
class FileDepot:
    """What a ``file://`` zodb_uri names, and the ZEO URI that shares it."""

    data_fs: Path
    blob_dir: Path | None
    storage_options: tuple[tuple[str, str], ...]
    db_options: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, uri: str) -> FileDepot:
        """Read a ``file://`` URI as zodburi does (the path is not %-decoded)."""
        if not uri.startswith("file://"):
            raise ConfigError(f"zodb_uri {uri!r}: not a file:// URI")
        path, _, query = uri[len("file://") :].partition("?")
        if not path:
            raise ConfigError(f"zodb_uri {uri!r}: no file path")
        blob_dir: Path | None = None
        storage: list[tuple[str, str]] = []
        db: list[tuple[str, str]] = []
        for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            if name == "blobstorage_dir":
                blob_dir = Path(os.path.abspath(value)) if value else None
            elif name == "blobstorage_layout":
                # An existing blob folder says its layout in its .layout file,
                # which the server reads; a new one gets ZODB's default.
                continue
            elif name in _UNSHAREABLE:
                raise ConfigError(
                    f"zodb_uri {uri!r}: {name} cannot be shared through ZEO (set share = no)"
                )
            elif name in _STORAGE_OPTIONS:
                if name != "quota":
                    value = _BOOLEAN.get(value.lower(), "false")
                storage.append((_STORAGE_OPTIONS[name], value))
            else:
                db.append((name, value))
        data_fs = Path(os.path.abspath(os.path.normpath(path)))
        return cls(data_fs, blob_dir, tuple(storage), tuple(db))

    @property
    def socket_path(self) -> Path:
        """``zeo.sock`` beside Data.fs: found from the config alone, by every tool."""
        return self.data_fs.parent / SOCKET_NAME

    @property
    def client_uri(self) -> str:
        """The ``zeo://`` URI of the shared depot, for ``serve`` and for consumers."""
        sock = str(self.socket_path)
        if "?" in sock or "#" in sock:
            raise ConfigError(f"{sock}: a ZEO socket path cannot contain '?' or '#'")
        query: list[tuple[str, str]] = []
        if self.blob_dir is not None:
            query += [("shared_blob_dir", "true"), ("blob_dir", str(self.blob_dir))]
        query += self.db_options
        text = urllib.parse.urlencode(query, safe="/", quote_via=urllib.parse.quote)
        return f"zeo://{sock}?{text}" if text else f"zeo://{sock}"

    def zeo_config(self, log_level: str = "WARNING") -> str:
        """runzeo's ZConfig text: the socket, the FileStorage with its blobs, the log."""

        def value(text: object) -> str:
            return str(text).replace("$", "$$")  # ZConfig substitutes $name

        lines = ["<zeo>", f"  address {value(self.socket_path)}", "</zeo>", "<filestorage 1>"]
        lines.append(f"  path {value(self.data_fs)}")
        if self.blob_dir is not None:
            lines.append(f"  blob-dir {value(self.blob_dir)}")
        lines += [f"  {name} {value(text)}" for name, text in self.storage_options]
        lines += [
            "</filestorage>",
            "<eventlog>",
            f"  level {log_level}",
            "  <logfile>",
            "    path STDERR",
            "    format %(levelname)s %(name)s %(message)s",
            "  </logfile>",
            "</eventlog>",
        ]
        return "\n".join(lines) + "\n"


# --- deciding -----------------------------------------------------------------


def sharing_uri(uri: str, share: bool = True) -> tuple[str, EmbeddedZeo | None]:
    """The URI ``serve`` opens, and the ZEO server to run for it (not started).

    ``file://`` with ``share``: the embedded ZEO's client URI and the server.
    Anything else (``zeo://``, ``postgres://``, ...: already shared; or
    ``share=False``: nobody else opens the file): the URI itself and None.
    """
    if share and uri.startswith("file://"):
        server = EmbeddedZeo(uri)
        return server.client_uri, server
    return uri, None


@contextlib.contextmanager
def shared(uri: str, share: bool = True) -> Iterator[str]:
    """Run the ZEO server :func:`sharing_uri` asks for, if any; yield the URI to open."""
    client_uri, server = sharing_uri(uri, share)
    if server is None:
        yield client_uri
        return
    with server:
        yield client_uri


def running_client_uri(uri: str) -> str | None:
    """The consumer URI when a ``serve`` is sharing this ``file://`` depot right now.

    Tools such as ``postoffice queues`` use it to read a depot while
    ``serve`` holds the file.  None when the URI is not ``file://`` or no
    ZEO server answers on its socket.
    """
    if not uri.startswith("file://"):
        return None
    try:
        depot = FileDepot.parse(uri)
        client_uri = depot.client_uri
    except ConfigError:
        return None
    return client_uri if _probe(depot.socket_path) == "alive" else None


# --- the server -----------------------------------------------------------------


class EmbeddedZeo:
    """A ZEO server for one ``file://`` depot, run as a child process.

    ``start()`` (or ``with``) returns once the server answers on its
    socket; ``stop()`` ends it with SIGTERM (then SIGKILL) and removes the
    socket.  While it runs, a server that dies is started again (at most
    ``RESTARTS`` times a minute): its clients reconnect by themselves, and
    deliveries meanwhile get 451, which Postfix retries.
    """

    def __init__(
        self,
        uri: str,
        *,
        socket_mode: int = DEFAULT_SOCKET_MODE,
        log_level: str = "WARNING",
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        restart: bool = True,
    ) -> None:
        self.depot = FileDepot.parse(uri)
        self.client_uri = self.depot.client_uri
        self.socket_path = self.depot.socket_path
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"{self.socket_path}: a unix socket path has at most {MAX_SOCKET_PATH} bytes; "
                "move Data.fs to a shorter path (or set share = no)"
            )
        self.socket_mode = socket_mode
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.restart = restart
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._socket_inode: int | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=50)
        self._restarts: collections.deque[float] = collections.deque(maxlen=RESTARTS)

    def __repr__(self) -> str:
        return f"<EmbeddedZeo {self.socket_path} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        """The ZEO server's process id while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def running(self) -> bool:
        return self.pid is not None

    def __enter__(self) -> EmbeddedZeo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- starting ----------------------------------------------------------------

    def start(self) -> EmbeddedZeo:
        """Start the server and wait until it answers; EmbeddedZeoError says why not."""
        with self._lock:
            if self.running():
                return self
            self._stopping.clear()
            self._launch()
        return self

    def _launch(self) -> None:
        """Spawn runzeo, wait for its socket, set the socket's mode, watch it."""
        for folder in {self.depot.data_fs.parent, *self._blob_parent()}:
            folder.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._clear_stale_socket()
        self._tail.clear()
        proc = subprocess.Popen(
            [sys.executable, "-m", "postoffice.embedded", self.depot.zeo_config(self.log_level)],
            stdin=subprocess.PIPE,  # never written: its EOF tells the child we are gone
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.depot.data_fs.parent,
            env=_child_env(),
            start_new_session=True,
            umask=_current_umask() | 0o007,  # others never get the socket, nor the data
        )
        self._proc = proc
        self._reader = threading.Thread(
            target=self._read_log, args=(proc,), name="zeo-log", daemon=True
        )
        self._reader.start()
        try:
            self._wait_ready(proc)
            os.chmod(self.socket_path, self.socket_mode)
            self._socket_inode = os.stat(self.socket_path).st_ino
        except BaseException:
            _end(proc, self.stop_timeout)
            self._finish_reader()
            self._proc = None
            raise
        log.info(
            "ZEO server (pid %d) shares %s on %s", proc.pid, self.depot.data_fs, self.socket_path
        )
        if self.restart:
            threading.Thread(
                target=self._watch, args=(proc,), name="zeo-watch", daemon=True
            ).start()

    def _blob_parent(self) -> list[Path]:
        return [self.depot.blob_dir.parent] if self.depot.blob_dir is not None else []

    def _clear_stale_socket(self) -> None:
        """Remove a socket left by a server that died; refuse to touch a live one."""
        state = _probe(self.socket_path)
        if state == "absent":
            return
        if state == "alive":
            raise EmbeddedZeoError(
                f"{self.depot.data_fs} is already shared by a running ZEO server on "
                f"{self.socket_path} (another postoffice serve?); consumers use {self.client_uri}"
            )
        if state == "forbidden":
            raise EmbeddedZeoError(f"{self.socket_path} exists and may not be connected to")
        if state == "not a socket":
            raise EmbeddedZeoError(f"{self.socket_path} exists and is not a socket")
        log.info("removing stale socket %s", self.socket_path)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                self._finish_reader()
                raise EmbeddedZeoError(
                    f"the ZEO server for {self.depot.data_fs} did not start: {self._why()}"
                )
            if _probe(self.socket_path) == "alive":
                return
            if time.monotonic() > deadline:
                raise EmbeddedZeoError(
                    f"the ZEO server for {self.depot.data_fs} did not answer on "
                    f"{self.socket_path} within {self.start_timeout:g} s: {self._why()}"
                )
            time.sleep(0.02)

    def _why(self) -> str:
        """The useful line of what the child said before it died."""
        lines = [line for line in self._tail if line.strip()]
        for line in reversed(lines):
            if "LockError" in line or "Couldn't lock" in line:
                return (
                    f"{self.depot.data_fs} is locked by another process (a postoffice serve, "
                    "a postoffice-deliver or a consumer that opened the file:// URI): "
                    f"{line.strip()}"
                )
        for line in reversed(lines):
            if "Error" in line or "error" in line:
                return line.strip()
        return lines[-1].strip() if lines else "no output"

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        """Forward the child's log into ours, and keep its tail for error messages."""
        assert proc.stderr is not None
        level = logging.WARNING
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self._tail.append(line)
            word = line.split(" ", 1)[0]
            if word in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
                level = logging.getLevelName(word)
            zeo_log.log(level, "%s", line)
        proc.stderr.close()

    def _finish_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5.0)

    # -- watching ----------------------------------------------------------------

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        """Start the server again when it dies under a running ``serve``."""
        code = proc.wait()
        if self._stopping.wait(0.2):  # stop() may not have taken the lock yet
            return
        self._finish_reader()
        log.error("ZEO server (pid %d) exited with %s: %s", proc.pid, code, self._why())
        while not self._stopping.is_set():
            now = time.monotonic()
            if len(self._restarts) == RESTARTS and now - self._restarts[0] < RESTART_WINDOW:
                log.critical(
                    "ZEO server died %d times in %g s; not restarting (deliveries get 451)",
                    RESTARTS,
                    RESTART_WINDOW,
                )
                return
            if self._stopping.wait(RESTART_DELAY):
                return
            self._restarts.append(time.monotonic())
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._launch()
                    return
                except EmbeddedZeoError as exc:
                    log.error("restarting the ZEO server: %s", exc)

    # -- stopping ----------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL; then remove our socket.  Safe to call twice."""
        self._stopping.set()
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            code = _end(proc, self.stop_timeout)
            self._finish_reader()
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            self._remove_socket()
        log.info("ZEO server (pid %d) stopped (%s)", proc.pid, code)

    def _remove_socket(self) -> None:
        """runzeo removes its socket itself; after a SIGKILL, we do (only ours)."""
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self._socket_inode:
                self.socket_path.unlink()
        self._socket_inode = None


def _end(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL: the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "ZEO server (pid %d) ignored SIGTERM for %g s; killing it", proc.pid, timeout
            )
            proc.kill()
    return proc.wait()


def _probe(path: Path) -> str:
    """``absent``, ``alive``, ``stale``, ``forbidden`` or ``not a socket``.

    A live server is asked ZEO's ``ruok`` (what ``ZEO.nagios`` sends): a
    bare connect-and-close makes the server log an ERROR every time.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISSOCK(mode):
        return "not a socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except PermissionError:
            return "forbidden"
        except FileNotFoundError:
            return "absent"
        except OSError:
            return "stale"
        # Something answers: alive, whatever it says (a busy server may say nothing).
        with contextlib.suppress(OSError, ValueError):
            probe.sendall(struct.pack(">I", 4) + b"ruok")
            _read_message(probe)  # the server's protocol announcement
            json.loads(_read_message(probe))
    return "alive"


def _read_message(sock: socket.socket) -> bytes:
    """One of ZEO's size-prefixed messages."""
    (size,) = struct.unpack(">I", _read_exactly(sock, 4))
    return _read_exactly(sock, size)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ValueError("connection closed")
        data += chunk
    return data


def _current_umask() -> int:
    """This process's umask, read without changing it (other threads may create files)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _child_env() -> dict[str, str]:
    """The child imports this very postoffice (the server resolves conflicts with its classes)."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


# --- the child ------------------------------------------------------------------


def _exit_with_parent() -> None:
    """Our stdin is a pipe from the parent: EOF means it is gone, so stop cleanly.

    SIGTERM goes to the main thread, whose select() it interrupts: runzeo's
    handler runs there and closes the storage.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)


def child_main(argv: Sequence[str]) -> None:
    """``python -m postoffice.embedded CONFIG_TEXT``: runzeo with that configuration."""
    from ZEO.runzeo import ZEOOptions, ZEOServer

    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    options = ZEOOptions()
    with tempfile.NamedTemporaryFile("w", suffix=".conf", prefix="postoffice-zeo.") as conf:
        conf.write(argv[0])
        conf.flush()
        options.realize(["-C", conf.name])
    ZEOServer(options).main()


if __name__ == "__main__":
    child_main(sys.argv[1:])
