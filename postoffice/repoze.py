"""``postoffice import-repoze OLD_URI``: the mail of a repoze.postoffice 0.25 depot, copied.

0.25 kept, under ``/postoffice``, a ``QueuesFolder`` (an OOBTree) of
``Queue`` objects: ``_messages``, an IOBTree of ``_QueuedMessage`` (the
flattened message in a blob, ``_blob_file``), in FIFO order of their keys,
and ``_quarantine``, an IOBTree of ``(_QueuedMessage, error)``.  Its
classes need not be importable here: the old database is opened read-only
with a class factory that reads those records as plain persistent objects
of our own (ZODB's ``DB.classFactory``, the documented hook for this).
Everything else is left as ZODB reads it.
"""

from __future__ import annotations

import email
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from persistent.list import PersistentList

from postoffice import clock
from postoffice.database import open_storage, with_query
from postoffice.errors import NotFound
from postoffice.store import QueuesFolder
from postoffice.store.queue import Queue

log = logging.getLogger("postoffice.repoze")

OLD_MODULE = "repoze.postoffice.queue"
BATCH = 100


class OldFolder(OOBTree):
    """0.25's ``QueuesFolder``: an OOBTree of queue name to queue."""


class OldQueue(Persistent):
    """0.25's ``Queue``; only ``_messages`` and ``_quarantine`` are read."""


class OldMessage(Persistent):
    """0.25's ``_QueuedMessage``: the message's bytes in ``_blob_file``."""

    def raw(self) -> bytes:
        blob = self.__dict__.get("_blob_file")
        if blob is None:
            raise ValueError("a 0.25 message record without its blob")
        with blob.open("r") as handle:
            data: bytes = handle.read()
        return data


class OldFrequencies(PersistentList):  # type: ignore[misc]
    """0.25's ``_FreqData``: throttle history, not copied."""


_CLASSES: dict[str, type] = {
    "QueuesFolder": OldFolder,
    "Queue": OldQueue,
    "_QueuedMessage": OldMessage,
    "_FreqData": OldFrequencies,
}


class _OldDB(ZODB.DB):
    """A ZODB.DB that reads 0.25's classes as ours: ``classFactory`` is the hook ZODB offers.

    Overridden in a subclass, not assigned after the fact: the connection
    ``DB()`` opens for the root, reused from the pool, takes the factory then.
    """

    def classFactory(self, connection: Any, modulename: str, globalname: str) -> Any:
        if modulename == OLD_MODULE and globalname in _CLASSES:
            return _CLASSES[globalname]
        return super().classFactory(connection, modulename, globalname)


def open_old(uri: str) -> ZODB.DB:
    """The 0.25 database, read-only where the URI allows, read with our class factory."""
    if uri.startswith("file://") and "read_only" not in uri:
        uri = with_query(uri, "read_only", "true")
    storage, dbkw = open_storage(uri, make_dirs=False)
    return _OldDB(storage, **dbkw)


@dataclass(frozen=True)
class Copied:
    queue: str
    messages: int
    quarantined: int
    configured: bool


def _old_queues(root: Any, path: str) -> Iterator[tuple[str, Any]]:
    node = root
    for name in [n for n in path.strip("/").split("/") if n]:
        if name not in node:
            raise NotFound(f"no {path} in the old database")
        node = node[name]
    if not isinstance(node, OldFolder):
        raise NotFound(f"{path} in the old database is not a repoze.postoffice 0.25 folder")
    yield from node.items()


def copy(
    old_uri: str, new_folder: QueuesFolder, configured: tuple[str, ...], path: str
) -> list[Copied]:
    """Every queued and quarantined message of the old depot into the new one; commits.

    A queue the new configuration does not name is created (``queues`` and
    ``check`` then say so, and ``queues move`` can empty it).  Waiting
    messages keep their order, quarantined ones their error text.
    """
    old_db = open_old(old_uri)
    report = []
    try:
        connection = old_db.open(transaction_manager=transaction.TransactionManager())
        try:
            for name, old in _old_queues(connection.root(), path):
                report.append(_copy_queue(name, old, new_folder, configured))
        finally:
            connection.close()
    finally:
        old_db.close()
    return report


def _copy_queue(name: str, old: Any, folder: QueuesFolder, configured: tuple[str, ...]) -> Copied:
    if name not in folder:
        folder[name] = Queue()
    messages = quarantined = 0
    pending = 0
    for _key, record in getattr(old, "_messages", {}).items():
        folder[name].add(record.raw(), clock.now())
        messages += 1
        pending += 1
        if pending >= BATCH:
            transaction.commit()
            pending = 0
    for _key, (record, error) in getattr(old, "_quarantine", {}).items():
        message = email.message_from_bytes(record.raw())
        folder[name].quarantine(message, _text(error))
        quarantined += 1
    transaction.commit()
    return Copied(name, messages, quarantined, name in configured)


def _text(error: object) -> str:
    if isinstance(error, bytes):
        return error.decode("utf-8", "replace")
    return str(error)
