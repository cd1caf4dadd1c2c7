"""The consumer API: ``open_queue`` and ``find_queue``, as in repoze.postoffice 0.25.

``open_queue`` keeps the old calling convention, returning ``(queue,
closer)``, and is also a context manager::

    queue, closer = open_queue(uri, "Customer A")
    with open_queue(uri, "Customer A") as queue: ...
"""

from __future__ import annotations

import logging
import weakref
from types import TracebackType
from typing import Any

import ZODB
from ZODB.POSException import ConnectionStateError

from postoffice.database import open_db
from postoffice.store import Queue, QueuesFolder, find_folder

DEFAULT_PATH = "/postoffice"

log = logging.getLogger("postoffice.api")


class _Opened:
    """The connection ``open_queue`` opened, and the database if it made it."""

    def __init__(self, connection: Any, db: ZODB.DB | None) -> None:
        self.connection = connection
        self.db = db

    def close(self) -> None:
        """Close; work not committed through this connection is abandoned (aborted)."""
        connection, self.connection = self.connection, None
        try:
            if connection is not None:
                try:
                    connection.close()
                except ConnectionStateError:
                    # It has uncommitted changes: abandon them, as closing means.
                    connection.transaction_manager.abort()
                    connection.close()
        finally:
            db, self.db = self.db, None
            if db is not None:
                db.close()


def _close_dropped(opened: _Opened) -> None:
    """A closer dropped without being called (or the end of the process): close anyway."""
    try:
        opened.close()
    except Exception:
        log.debug("closing a dropped open_queue failed", exc_info=True)


class Closer:
    """Closes what ``open_queue`` opened: the connection, and the database if it made it.

    Dropped without being called, it closes them when it is collected (or
    at the end of the process), as 0.25's closer did; a ``ZODB.DB`` the
    caller passed in is never closed.  Keep the closer as long as you use
    the queue.
    """

    def __init__(self, connection: Any, db: ZODB.DB | None) -> None:
        self._opened = _Opened(connection, db)
        self._finalizer = weakref.finalize(self, _close_dropped, self._opened)

    @property
    def connection(self) -> Any:
        return self._opened.connection

    @property
    def db(self) -> ZODB.DB | None:
        return self._opened.db

    def __call__(self) -> None:
        """Close; work not committed through this connection is abandoned (aborted)."""
        self._finalizer.detach()
        self._opened.close()

    close = __call__


class OpenQueue(tuple):  # type: ignore[type-arg]
    """``(queue, closer)``, usable as a context manager that yields the queue."""

    def __new__(cls, queue: Queue, closer: Closer) -> OpenQueue:
        return super().__new__(cls, (queue, closer))

    @property
    def queue(self) -> Queue:
        return self[0]  # type: ignore[no-any-return]

    @property
    def closer(self) -> Closer:
        return self[1]  # type: ignore[no-any-return]

    def __enter__(self) -> Queue:
        return self.queue

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.closer()


def open_queue(db_or_uri: str | ZODB.DB, queue_name: str, path: str = DEFAULT_PATH) -> OpenQueue:
    """Open one queue by database URI (or an open ZODB.DB, which is left open).

    The connection uses the thread's default transaction manager, so the
    application commits with ``transaction.commit()`` as usual.
    """
    own_db = isinstance(db_or_uri, str)
    db = open_db(db_or_uri) if isinstance(db_or_uri, str) else db_or_uri
    connection = None
    try:
        connection = db.open()
        queue = find_queue(connection.root(), queue_name, path)
    except BaseException:
        _Opened(connection, db if own_db else None).close()
        raise
    return OpenQueue(queue, Closer(connection, db if own_db else None))


def find_queue(root: Any, queue_name: str, path: str = DEFAULT_PATH) -> Queue:
    """The queue named ``queue_name`` under ``path`` of a root (or a QueuesFolder).

    An unknown name raises KeyError naming the queue and the known ones.
    """
    if isinstance(root, QueuesFolder):
        folder = root
    else:
        if hasattr(root, "root") and callable(root.root):
            root = root.root()
        folder = find_folder(root, path, create=False)
    queue = folder.get(queue_name)
    if queue is None:
        raise KeyError(folder.unknown_queue(queue_name, f" in {path}"))
    return queue
