"""The embedded default, shared: ``serve`` runs ZEO's server on Data.fs and is its first client.

A FileStorage can be opened by one process only (it locks ``Data.fs.lock``),
yet while ``postoffice serve`` runs, applications on the same host must open
their queues.  So for a ``file://`` zodb_uri, ``serve`` opens the
FileStorage, serves it with ZEO's own ``StorageServer`` in a thread of its
own on a unix socket beside the data file (``zeo.sock``), and delivers into
it as an ordinary ZEO client of that socket, exactly as applications,
``postoffice queues`` and ``postoffice-deliver`` do through the ``zeo://``
URI it prints.  Nothing listens on the network.  Blobs are not copied over
the socket: every client reads and writes the blob folder itself
(``shared_blob_dir``), which is why this is for one host.

Only ZODB's and ZEO's supported parts are involved: the server owns the
storage, every user is a client of it, and ZEO keeps the clients' caches
right (its invalidations, its conflict resolution in the server, where
the storage's records are).  What ``serve`` pays for being a client is a
round trip to the server thread per commit; the LMTP server's group
commit (one transaction for whatever arrived while the previous commit
ran) makes that one round trip per batch of messages
(docs/performance.md has the figures).  The server speaks ZEO's msgpack
protocol (its ``msgpack`` option): every object stored and loaded crosses
the socket, and msgpack packs those messages with less CPU than pickle.
A client follows the protocol the server announces, so nothing is set on
the clients' side, but each needs the ``msgpack`` package (a dependency of
postoffice).  ``serve``'s own client keeps no ZEO client cache
(``OWN_CLIENT_CACHE_SIZE``): it would only copy what ``serve`` commits.

What ``serve`` does with it::

    with shared(settings.zodb_uri, share=True) as depot:   # None: not shared
        print(f"postoffice: consumers use {depot.client_uri}")
        ...                       # deliver into depot.db until SIGTERM
    # serve's client closes, then the ZEO server stops and closes the storage
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

log = logging.getLogger("postoffice.embedded")
# ZEO's server logs each client connection it loses here.
ZEO_SERVER_LOGGER = "ZEO.asyncio.server"

DEFAULT_SOCKET_MODE = 0o660
# How long stop() waits for the ZEO server's thread to end.
STOP_TIMEOUT = 5.0
# A ZEO client that holds the storage's commit lock longer than this (voted,
# then stopped or hung before it finished) is disconnected and its
# transaction aborted: the lock is serve's too, and deliveries wait on it.
TRANSACTION_TIMEOUT = 30.0
# ZEO's protocol between the server thread and its clients: msgpack, not
# pickle (measured in docs/performance.md, "The default path pays for ZEO").
MSGPACK = True
# The ZEO client cache of serve's own client, in bytes: none.  A client
# writes every object it commits into its cache file, but what serve
# wrote is in its connection's object cache already, and what it must load
# again is mostly what others changed, which the cache has dropped anyway.
# What it evicts from its object cache (a ledger bigger than that) is then
# a load from the server thread instead of from the cache file: with
# 100,000 messages queued and ledgered it delivered no slower.  (ZEO caches
# no object bigger than its whole cache, so a cache of 0 bytes holds none.)
OWN_CLIENT_CACHE_SIZE = 0


# --- the server's log -------------------------------------------------------------


class ClientGoneFilter(logging.Filter):
    """A client that went away while the server wrote to it is routine, not an ERROR.

    ZEO 6.2's server logs ``ERROR Disconnected BrokenPipeError`` (or
    ``ConnectionResetError``) when a client closes its end while the server
    is sending it something, which is how every short-lived client ends
    now and then: a ``postoffice-deliver`` that exits while ``serve``'s
    commit is being announced to it.  Nothing is lost (the client had
    finished), so the line is kept at INFO, where an administrator looking
    for real errors does not trip over it.  Other errors of the server are
    left as they are.
    """

    GONE = ("BrokenPipeError", "ConnectionResetError")

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno == logging.ERROR
            and record.msg == "Disconnected %s:%s"
            and isinstance(record.args, tuple)
            and bool(record.args)
            and record.args[0] in self.GONE
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _calm_zeo_server_log() -> None:
    """Put :class:`ClientGoneFilter` on ZEO's server logger, once per process."""
    logger = logging.getLogger(ZEO_SERVER_LOGGER)
    if not any(isinstance(f, ClientGoneFilter) for f in logger.filters):
        logger.addFilter(ClientGoneFilter())


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
    """A ``file://`` depot served by a ZEO server thread in ``serve``, and ``serve``'s client of it.

    ``start()`` (or ``with``) opens the FileStorage (which locks it), serves
    it on ``zeo.sock`` and opens :attr:`db`, ``serve``'s own ZEO client of
    that socket; ``stop()`` closes that client, then stops the ZEO server
    (the other clients are disconnected and reconnect to the next
    ``serve``), which closes the storage, and removes the socket.
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
        """``serve``'s database: a ZEO client of the server thread, like any consumer's."""
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
        """Open the file, serve it, connect to it; EmbeddedZeoError (one line) says why not."""
        with self._lock:
            if self._server is not None:
                return self
            self._clear_stale_socket()
            # Others never get the data (as the socket below).
            try:
                with sockets.umask_at_least(0o007):
                    storage, _ = open_storage(self.uri)
            except StorageUnavailable as exc:
                raise EmbeddedZeoError(self._why(exc)) from None
            self._server = self._serve(storage)  # which closes the storage if it fails
            try:
                own = _own_client_uri(self.client_uri)
                client, dbkw = open_storage(own, make_dirs=False)
                self._db = db_for(client, dbkw, own)
            except BaseException:
                self._shut()
                raise
        log.info("sharing %s on %s", self.depot.data_fs, self.socket_path)
        return self

    def _serve(self, storage: Any) -> Any:
        """ZEO's StorageServer on the socket, in a thread; the socket made ``socket_mode``."""
        StorageServer = _storage_server_class()
        _calm_zeo_server_log()

        # Nobody else gets the socket between bind() and chmod().
        try:
            with sockets.umask_at_least(0o777 & ~self.socket_mode):
                server = StorageServer(
                    str(self.socket_path),
                    {"1": storage},
                    transaction_timeout=self.transaction_timeout,
                    msgpack=MSGPACK,
                )
        except OSError as exc:
            storage.close()
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
        """Close serve's client, stop serving, remove our socket.  Safe to call twice."""
        with self._lock:
            self._shut()

    def _shut(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
        server, self._server = self._server, None
        if server is not None:
            # Disconnects the other clients, closes the storage and joins the
            # server's thread.
            server.close(join_timeout=STOP_TIMEOUT)
            self._remove_socket()

    def _remove_socket(self) -> None:
        """Only our own socket: another serve may have started on the path since."""
        sockets.remove_if_ours(self.socket_path, self._socket_id)
        self._socket_id = None


def _own_client_uri(uri: str) -> str:
    """The URI serve's own client opens: the consumers' URI, without the ZEO client cache."""
    joiner = "&" if "?" in uri else "?"
    return f"{uri}{joiner}cache_size={OWN_CLIENT_CACHE_SIZE}"


def _storage_server_class() -> type:
    """ZEO's StorageServer, whose clients give the commit lock back when it closes them.

    When ZEO's server closes a client's connection itself (a client that
    held the commit lock past ``transaction_timeout``, or ``stop()``), ZEO
    6.2 does not abort that client's transaction: only a connection lost
    from the other end does.  The storage's commit lock stays taken, and
    here that lock is also the one ``serve`` commits under: deliveries would
    wait for it forever.  So such a close aborts the transaction, as a lost
    connection does.

    And its ``close()`` closes the storage before the server's thread has
    ended: a client's vote still running there then fails with ``ValueError:
    truncate of closed file`` (a consumer's commit under way while ``serve``
    stops), where the client should just see itself disconnected.  So the
    storage closes after the thread (``StorageServer.storages``, the mapping
    ``close()`` closes, is swapped for the time of that call).
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

        def close(self, join_timeout: float = 1) -> None:
            server: Any = self  # ZEO has no type hints
            storages: dict[str, Any] = server.storages
            server.storages = {}
            try:
                super().close(join_timeout)  # disconnects, stops and joins the thread
            finally:
                server.storages = storages
                for storage in storages.values():
                    storage.close()

    return Server
