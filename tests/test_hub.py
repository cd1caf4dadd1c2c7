"""One FileStorage for serve's own database and for the ZEO server that shares it.

Real parts: a FileStorage with blobs on disk, ZEO's StorageServer on a unix
socket in a thread (as ``serve`` runs it), and a ZEO client.  What a user
would notice if the hub were wrong: an application that does not see the
message ``serve`` just queued, ``serve`` that does not see an application's
pop (and pops or counts wrongly), or two commits that overwrite each other
instead of conflicting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction
import ZEO
import ZODB
from persistent import Persistent
from ZEO.StorageServer import StorageServer
from ZODB.blob import BlobStorage
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError

from postoffice.hub import StorageHub

WAIT = 10.0


class Box(Persistent):
    """A persistent value with no conflict resolution: concurrent writes conflict."""

    def __init__(self, value: int = 0) -> None:
        self.value = value


def eventually(condition: Callable[[], bool], what: str) -> None:
    """ZEO sends invalidations asynchronously: wait (bounded) for one to arrive."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Shared:
    """serve's side (``db``), the ZEO server on the other side, and a client of it."""

    def __init__(self, folder: Path) -> None:
        storage = BlobStorage(str(folder / "blobs"), FileStorage(str(folder / "Data.fs")))
        self.hub = StorageHub(storage)
        self.served = self.hub.side()
        self.server = StorageServer(str(folder / "zeo.sock"), {"1": self.served})
        self.server.start_thread(daemon=True)
        self.db = ZODB.DB(self.hub.side())
        self.client = ZEO.DB(
            str(folder / "zeo.sock"), blob_dir=str(folder / "blobs"), shared_blob_dir=True
        )
        self.local_tm = transaction.TransactionManager()
        self.local = self.db.open(self.local_tm)
        self.remote_tm = transaction.TransactionManager()
        self.remote = self.client.open(self.remote_tm)

    def close(self) -> None:
        self.remote.close()
        self.client.close()
        self.local.close()
        self.server.close()
        self.db.close()


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Shared]:
    shared = Shared(tmp_path)
    try:
        shared.local.root()["box"] = Box()
        shared.local_tm.commit()
        # The client hears of that commit asynchronously: until it has, its
        # root is the empty one, and a test's first commit through it would
        # conflict with the fixture's instead of testing anything.
        eventually(lambda: _remote_has_box(shared), "the application to see the fixture")
        yield shared
    finally:
        shared.close()


def _remote_has_box(shared: Shared) -> bool:
    shared.remote_tm.begin()
    return "box" in shared.remote.root()


def remote_value(shared: Shared) -> int:
    shared.remote_tm.begin()  # a new transaction: the client applies the invalidations it got
    value: int = shared.remote.root()["box"].value
    return value


def test_what_serve_commits_reaches_the_applications_cache(shared: Shared) -> None:
    assert remote_value(shared) == 0  # now in the client's caches
    shared.local.root()["box"].value = 1
    shared.local_tm.commit()
    eventually(lambda: remote_value(shared) == 1, "the application to see serve's commit")


def test_what_an_application_commits_reaches_serves_connections(shared: Shared) -> None:
    box = shared.local.root()["box"]
    assert box.value == 0  # loaded into serve's cache
    shared.local_tm.commit()
    shared.remote_tm.begin()
    shared.remote.root()["box"].value = 7
    shared.remote_tm.commit()
    # Invalidated inside the commit: the very next transaction of serve sees it.
    shared.local_tm.begin()
    assert box.value == 7


def test_a_new_object_from_either_side_is_seen_by_the_other(shared: Shared) -> None:
    shared.remote_tm.begin()
    shared.remote.root()["from application"] = Box(2)
    shared.remote_tm.commit()
    shared.local_tm.begin()
    assert shared.local.root()["from application"].value == 2
    shared.local.root()["from serve"] = Box(3)
    shared.local_tm.commit()

    def seen() -> bool:
        shared.remote_tm.begin()
        box: Any = shared.remote.root().get("from serve")
        return box is not None and box.value == 3

    eventually(seen, "the application to see serve's new object")


def test_the_two_sides_conflict_as_two_connections_of_one_database_would(
    shared: Shared,
) -> None:
    shared.local_tm.begin()
    shared.local.root()["box"].value  # noqa: B018 - read in serve's transaction
    shared.remote_tm.begin()
    shared.remote.root()["box"].value = 1
    shared.remote_tm.commit()
    shared.local.root()["box"].value = 2  # written from a state the application replaced
    with pytest.raises(ConflictError):
        shared.local_tm.commit()
    shared.local_tm.abort()
    shared.local_tm.begin()
    assert shared.local.root()["box"].value == 1  # nothing overwritten

    # And the other way round, through the ZEO server.
    assert remote_value(shared) == 1
    shared.local.root()["box"].value = 3
    shared.local_tm.commit()
    shared.remote.root()["box"].value = 4
    with pytest.raises(ConflictError):
        shared.remote_tm.commit()
    shared.remote_tm.abort()
    eventually(lambda: remote_value(shared) == 3, "serve's value to stand")


def test_the_storage_closes_with_its_last_side(tmp_path: Path) -> None:
    storage = FileStorage(str(tmp_path / "Data.fs"))
    hub = StorageHub(storage)
    first, second = hub.side(), hub.side()
    first.close()
    first.close()  # twice is once
    assert storage._file is not None and not storage._file.closed
    second.close()
    assert storage._file.closed
