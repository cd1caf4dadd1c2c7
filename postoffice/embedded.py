"""The embedded default, shared: ``serve`` opens Data.fs and serves it over ZEO (SPEC 8).

A FileStorage can be opened by one process only (it locks ``Data.fs.lock``),
yet while ``postoffice serve`` runs, applications on the same host must open
their queues.  So for a ``file://`` zodb_uri, ``serve`` opens the
FileStorage itself, delivers into it directly, and runs a ZEO server in a
thread of its own on a unix socket beside the data file (``zeo.sock``),
through which applications (and ``postoffice queues``, ``postoffice-deliver``)
open the same depot: the ``zeo://`` URI it prints.  Nothing listens on the
network.  Blobs are not copied over the socket: every client reads and
writes the blob folder itself (``shared_blob_dir``), which is why this is
for one host.

Why in-process: a ZEO server in a child process, with ``serve`` as one of
its clients, cost every delivery a round trip and every record a second
copy, for about half of the throughput of the file opened directly
(docs/performance.md).  Here ``serve``'s deliveries never leave the
process; :mod:`postoffice.hub` tells each side of the storage what the
other committed.

What ``serve`` does with it::

    with shared(settings.zodb_uri, share=True) as depot:   # None: not shared
        print(f"postoffice: consumers use {depot.client_uri}")
        ...                       # deliver into depot.db until SIGTERM
    # the ZEO server stops, then the database closes
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import ZODB

from postoffice.errors import ConfigError, StorageUnavailable
from postoffice.hub import StorageHub

log = logging.getLogger("postoffice.embedded")

SOCKET_NAME = "zeo.sock"
DEFAULT_SOCKET_MODE = 0o660
# How long stop() waits for the ZEO server's thread to end.
STOP_TIMEOUT = 5.0
# A ZEO client that holds the storage's commit lock longer than this (voted,
# then stopped or hung before it finished) is disconnected and its
# transaction aborted: the lock is serve's too, and deliveries wait on it.
TRANSACTION_TIMEOUT = 30.0
# sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107

# zodburi's file:// options that belong to the FileStorage (opened by serve;
# ZEO clients with the shared blob folder read its layout from its .layout
# file); every other option (database_name, connection_*) is for ZODB.DB
# and goes on into the client URI too.
_STORAGE_OPTIONS = ("create", "read_only", "quota", "blobstorage_layout")
_UNSHAREABLE = ("demostorage",)


class EmbeddedZeoError(StorageUnavailable):
    """The embedded ZEO server could not start; ``str()`` says why, in one line."""


@dataclass(frozen=True)
class FileDepot:
    """What a ``file://`` zodb_uri names, and the ZEO URI that shares it."""

    data_fs: Path
    blob_dir: Path | None
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
        db: list[tuple[str, str]] = []
        for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            if name == "blobstorage_dir":
                blob_dir = Path(os.path.abspath(value)) if value else None
            elif name in _UNSHAREABLE:
                raise ConfigError(
                    f"zodb_uri {uri!r}: {name} cannot be shared through ZEO (set share = no)"
                )
            elif name in _STORAGE_OPTIONS:
                continue
            else:
                db.append((name, value))
        data_fs = Path(os.path.abspath(os.path.normpath(path)))
        return cls(data_fs, blob_dir, tuple(db))

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


# --- deciding -----------------------------------------------------------------


@contextlib.contextmanager
def shared(uri: str, share: bool = True) -> Iterator[SharedDepot | None]:
    """The depot ``serve`` delivers into, shared while the block runs; None if not ours to share.

    ``file://`` with ``share``: a started :class:`SharedDepot`.  Anything
    else (``zeo://``, ``postgres://``, ...: already shared; or
    ``share=False``: nobody else opens the file): None, and ``serve`` opens
    the URI itself.
    """
    if not (share and uri.startswith("file://")):
        yield None
        return
    with SharedDepot(uri) as depot:
        yield depot


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


class SharedDepot:
    """A ``file://`` depot opened by ``serve``, and the ZEO server thread that shares it.

    ``start()`` (or ``with``) opens the FileStorage (which locks it),
    gives :attr:`db` to ``serve`` and serves the same storage on
    ``zeo.sock``; ``stop()`` stops the ZEO server (its clients are
    disconnected and reconnect to the next ``serve``), then closes the
    database and removes the socket.
    """

    def __init__(
        self,
        uri: str,
        *,
        socket_mode: int = DEFAULT_SOCKET_MODE,
        transaction_timeout: float = TRANSACTION_TIMEOUT,
    ) -> None:
        self.uri = uri
        self.depot = FileDepot.parse(uri)
        self.client_uri = self.depot.client_uri
        self.socket_path = self.depot.socket_path
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"{self.socket_path}: a unix socket path has at most {MAX_SOCKET_PATH} bytes; "
                "move Data.fs to a shorter path (or set share = no)"
            )
        self.socket_mode = socket_mode
        self.transaction_timeout = transaction_timeout
        self._db: ZODB.DB | None = None
        self._server: Any = None
        self._socket_inode: int | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SharedDepot {self.depot.data_fs} on {self.socket_path}>"

    @property
    def db(self) -> ZODB.DB:
        """``serve``'s database: the FileStorage itself, no ZEO in between."""
        if self._db is None:
            raise EmbeddedZeoError(f"{self.depot.data_fs} is not open (start() first)")
        return self._db

    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> SharedDepot:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- starting ----------------------------------------------------------------

    def start(self) -> SharedDepot:
        """Open the file and serve it; EmbeddedZeoError (one line) says why not."""
        from postoffice.store import db_for, open_storage

        with self._lock:
            if self._server is not None:
                return self
            self._clear_stale_socket()
            # Others never get the data (as the socket below).  The umask is
            # the process's: this runs before serve starts its threads.
            umask = os.umask(0o077)
            os.umask(umask | 0o007)
            try:
                storage, dbkw = open_storage(self.uri)
            except StorageUnavailable as exc:
                raise EmbeddedZeoError(self._why(exc)) from None
            finally:
                os.umask(umask)
            hub = StorageHub(storage)
            served = hub.side()
            try:
                self._db = db_for(hub.side(), dbkw, self.uri)
                self._server = self._serve(served)
            except BaseException:
                served.close()  # the storage closes with its last side
                self._close_db()
                raise
        log.info("sharing %s on %s", self.depot.data_fs, self.socket_path)
        return self

    def _serve(self, storage: Any) -> Any:
        """ZEO's StorageServer on the socket, in a thread; the socket made ``socket_mode``."""
        StorageServer = _storage_server_class()

        # Nobody else gets the socket between bind() and chmod().
        umask = os.umask(0o077)
        try:
            server = StorageServer(
                str(self.socket_path),
                {"1": storage},
                transaction_timeout=self.transaction_timeout,
            )
        except OSError as exc:
            raise EmbeddedZeoError(
                f"cannot serve {self.depot.data_fs} on {self.socket_path}: {exc}"
            ) from None
        finally:
            os.umask(umask)
        try:
            os.chmod(self.socket_path, self.socket_mode)
            self._socket_inode = os.stat(self.socket_path).st_ino
        except OSError as exc:
            server.close()
            raise EmbeddedZeoError(f"{self.socket_path}: {exc}") from None
        server.start_thread(daemon=True)
        return server

    def _why(self, exc: StorageUnavailable) -> str:
        text = str(exc)
        if "Couldn't lock" in text or "LockError" in text:
            return (
                f"{self.depot.data_fs} is locked by another process (a postoffice serve "
                "with share = no, a postoffice-deliver or a consumer that opened the "
                f"file:// URI): {text}"
            )
        return text

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

    # -- stopping ----------------------------------------------------------------

    def stop(self) -> None:
        """Stop serving, then close the database and remove our socket.  Safe to call twice."""
        with self._lock:
            server, self._server = self._server, None
            if server is not None:
                # Disconnects the clients and joins the server's thread
                # before the storage closes with serve's database below.
                server.close(join_timeout=STOP_TIMEOUT)
                self._remove_socket()
            self._close_db()

    def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _remove_socket(self) -> None:
        """Only our own socket: another serve may have started on the path since."""
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self._socket_inode:
                self.socket_path.unlink()
        self._socket_inode = None


def _storage_server_class() -> type:
    """ZEO's StorageServer, whose clients give the commit lock back when it closes them.

    When ZEO's server closes a client's connection itself (a client that
    held the commit lock past ``transaction_timeout``, or ``stop()``), ZEO
    6.2 does not abort that client's transaction: only a connection lost
    from the other end does.  The storage's commit lock stays taken, and
    here that lock is also the one ``serve`` commits under: deliveries would
    wait for it forever.  So such a close aborts the transaction, as a lost
    connection does.
    """
    from ZEO.StorageServer import StorageServer, ZEOStorage

    class ClientHandler(ZEOStorage):  # type: ignore[misc]
        def notify_connected(self, conn: Any) -> None:
            super().notify_connected(conn)
            close = conn.close

            def close_and_abort() -> None:
                closing = not conn.closed
                close()
                if closing and self.connected:
                    self.notify_disconnected()  # aborts a transaction under way

            conn.close = close_and_abort

    class Server(StorageServer):  # type: ignore[misc]
        def create_client_handler(self) -> ZEOStorage:
            return ClientHandler(self, self.read_only)

    return Server


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
