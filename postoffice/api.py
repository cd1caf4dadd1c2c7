"""The consumer API: ``open_queue`` and ``find_queue``, as in repoze.postoffice 0.25.

``open_queue`` keeps the old calling convention, returning ``(queue,
closer)``, and is also a context manager::

    queue, closer = open_queue(uri, "Customer A")
    with open_queue(uri, "Customer A") as queue: ...
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import ZODB
from ZODB.POSException import ConnectionStateError

from postoffice.database import open_db
from postoffice.store import Queue, QueuesFolder, find_folder

DEFAULT_PATH = "/postoffice"


class Closer:
    """Closes what ``open_queue`` opened: the connection, and the database if it made it."""

    def __init__(self, connection: Any, db: ZODB.DB | None) -> None:
        self.connection = connection
        self.db = db

    def __call__(self) -> None:
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
        Closer(connection, db if own_db else None)()
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
        known = ", ".join(repr(n) for n in folder.names()) or "none"
        raise KeyError(f"no queue {queue_name!r} in {path} (known queues: {known})")
    return queue
