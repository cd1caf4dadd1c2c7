"""The embedded default, shared: ``serve`` opens Data.fs and serves it over ZEO.

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
import logging
import os
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import ZODB

from postoffice import sockets
from postoffice.database import FileDepot, db_for, open_storage, zeo_greet
from postoffice.errors import ConfigError, EmbeddedZeoError, ListenError, StorageUnavailable
from postoffice.hub import StorageHub

log = logging.getLogger("postoffice.embedded")

DEFAULT_SOCKET_MODE = 0o660
# How long stop() waits for the ZEO server's thread to end.
STOP_TIMEOUT = 5.0
# A ZEO client that holds the storage's commit lock longer than this (voted,
# then stopped or hung before it finished) is disconnected and its
# transaction aborted: the lock is serve's too, and deliveries wait on it.
TRANSACTION_TIMEOUT = 30.0


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
        if sockets.too_long(self.socket_path):
            raise ConfigError(
                f"{self.socket_path}: a unix socket path has at most "
                f"{sockets.MAX_SOCKET_PATH} bytes; "
                "move Data.fs to a shorter path (or set share = no)"
            )
        self.socket_mode = socket_mode
        self.transaction_timeout = transaction_timeout
        self._db: ZODB.DB | None = None
        self._server: Any = None
        self._socket_id: tuple[int, int] | None = None
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
        with self._lock:
            if self._server is not None:
                return self
            self._clear_stale_socket()
            # Others never get the data (as the socket below).
            try:
                with sockets.umask_at_least(0o007):
                    storage, dbkw = open_storage(self.uri)
            except StorageUnavailable as exc:
                raise EmbeddedZeoError(self._why(exc)) from None
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
        try:
            with sockets.umask_at_least(0o777 & ~self.socket_mode):
                server = StorageServer(
                    str(self.socket_path),
                    {"1": storage},
                    transaction_timeout=self.transaction_timeout,
                )
        except OSError as exc:
            raise EmbeddedZeoError(
                f"cannot serve {self.depot.data_fs} on {self.socket_path}: {exc}"
            ) from None
        try:
            os.chmod(self.socket_path, self.socket_mode)
            self._socket_id = sockets.file_id(self.socket_path)
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
        try:
            sockets.clear_stale(
                self.socket_path,
                greet=zeo_greet,
                alive=f"{self.depot.data_fs} is already shared by a running ZEO server on "
                f"{self.socket_path} (another postoffice serve?); consumers use {self.client_uri}",
            )
        except ListenError as exc:
            raise EmbeddedZeoError(str(exc)) from None

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
        sockets.remove_if_ours(self.socket_path, self._socket_id)
        self._socket_id = None


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
