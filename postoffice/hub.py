"""One FileStorage, two users in one process: ``serve``'s own database and the ZEO server.

A FileStorage can be opened by one process only, and ``serve`` must let
applications open the depot while it runs.  Making ``serve`` a
ZEO client of a server in another process (our first design) costs every
delivery a round trip and a second copy of each record: about half the
throughput of opening the file directly (docs/performance.md).  So ``serve``
opens the file once and hands it to two users in its own process: its own
``ZODB.DB``, which delivers, and a ZEO server thread, which serves the
applications.  Neither sees the other's commits unless told, so each side
of the hub tells the other side's "database" which objects a commit
changed, the way ZODB tells the connections of one database and ZEO tells
its clients:

- a commit by ``serve`` invalidates the objects in the caches of the ZEO
  clients (the server's ``StorageServerDB``, which is made for a storage
  that other writers share);
- a commit by a ZEO client (an application popping a message) invalidates
  them in ``serve``'s connections (their ``MVCCAdapter``).

Both happen inside the storage's ``tpc_finish`` callback, under its lock,
before the transaction id becomes the last one: the same point at which
ZODB invalidates its own connections, so no reader can see the new
transaction with a stale object.  The storage's commit lock already
serialises the two sides' commits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import zope.interface

Oid = bytes
Tid = bytes


class StorageHub:
    """Owns the storage; hands out sides; closes the storage when the last side closes."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self._sides: list[HubSide] = []
        self._lock = threading.Lock()
        self._open = 0

    def side(self) -> HubSide:
        """A storage for one user (one ``ZODB.DB`` or one ZEO server)."""
        side = HubSide(self.storage, self)
        with self._lock:
            self._sides.append(side)
            self._open += 1
        return side

    def _committed(self, source: HubSide, tid: Tid, oids: list[Oid]) -> None:
        """Tell every other side's database what ``source``'s commit changed."""
        if not oids:
            return
        for side in self._sides:
            if side is not source and side.db is not None and not side.closed:
                side.db.invalidate(tid, oids)

    def _side_closed(self) -> None:
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last:
            self.storage.close()


class HubSide:
    """The storage as one user sees it: every call goes through, commits are reported.

    It provides the interfaces of the storage it wraps (``IBlobStorage``
    among them), so ``ZODB.DB`` and ZEO's ``StorageServer`` treat it as the
    storage itself.
    """

    def __init__(self, storage: Any, hub: StorageHub) -> None:
        self._storage = storage
        self._hub = hub
        self.db: Any = None
        self.closed = False
        # The objects each transaction under way has written, by transaction.
        self._changed: dict[Any, list[Oid]] = {}
        zope.interface.directlyProvides(self, zope.interface.providedBy(storage))

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class does not define: loads, new_oid,
        # lastTransaction, tpc_vote, the blob helpers, pack, ...
        return getattr(self._storage, name)

    def __len__(self) -> int:
        return len(self._storage)

    def __repr__(self) -> str:
        return f"<HubSide of {self._storage!r}>"

    def registerDB(self, db: Any) -> None:
        self.db = db
        self._storage.registerDB(db)  # both users' transforms are the identity

    # -- writes: remember what changes ------------------------------------------------

    def tpc_begin(self, transaction: Any, *args: Any) -> None:
        self._storage.tpc_begin(transaction, *args)
        self._changed[transaction] = []

    def store(self, oid: Oid, serial: Tid, data: bytes, version: str, transaction: Any) -> Any:
        result = self._storage.store(oid, serial, data, version, transaction)
        self._changed.setdefault(transaction, []).append(oid)
        return result

    def storeBlob(
        self,
        oid: Oid,
        serial: Tid,
        data: bytes,
        blobfilename: str,
        version: str,
        transaction: Any,
    ) -> Any:
        result = self._storage.storeBlob(oid, serial, data, blobfilename, version, transaction)
        self._changed.setdefault(transaction, []).append(oid)
        return result

    def deleteObject(self, oid: Oid, serial: Tid, transaction: Any) -> None:
        self._storage.deleteObject(oid, serial, transaction)
        self._changed.setdefault(transaction, []).append(oid)

    def restore(
        self, oid: Oid, serial: Tid, data: bytes, version: str, prev_txn: Any, transaction: Any
    ) -> None:
        self._storage.restore(oid, serial, data, version, prev_txn, transaction)
        self._changed.setdefault(transaction, []).append(oid)

    def undo(self, transaction_id: Tid, transaction: Any) -> Any:
        result = self._storage.undo(transaction_id, transaction)
        oids: Iterable[Oid] = result[1] if result else ()
        self._changed.setdefault(transaction, []).extend(oids)
        return result

    def tpc_finish(self, transaction: Any, f: Callable[[Tid], None] | None = None) -> Tid:
        changed = self._changed.pop(transaction, [])

        def finished(tid: Tid) -> None:
            if f is not None:
                f(tid)
            self._hub._committed(self, tid, changed)

        return self._storage.tpc_finish(transaction, finished)  # type: ignore[no-any-return]

    def tpc_abort(self, transaction: Any) -> None:
        self._changed.pop(transaction, None)
        self._storage.tpc_abort(transaction)

    def close(self) -> None:
        """The storage closes with its last side: ``serve``'s DB or the ZEO server may go first."""
        if not self.closed:
            self.closed = True
            self._hub._side_closed()
