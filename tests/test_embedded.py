"""serve's own database and the applications', as clients of one ZEO server.

Real parts: a FileStorage with blobs on disk, ZEO's StorageServer on a unix
socket in a thread, started by ``SharedDepot`` as ``serve`` starts it, and
a second ZEO client for the application.  What a user would notice if the
arrangement were wrong: an application that does not see the message
``serve`` just queued, ``serve`` that does not see an application's pop
(and pops or counts wrongly), or two commits that overwrite each other
instead of conflicting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction
import ZODB
from persistent import Persistent
from ZODB.POSException import ConflictError

from postoffice.database import open_db
from postoffice.embedded import SharedDepot

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
    """serve's database (``db``), and an application's (``client``), on one shared depot."""

    def __init__(self, folder: Path) -> None:
        self.depot = SharedDepot(f"file://{folder}/Data.fs?blobstorage_dir={folder}/blobs")
        self.depot.start()
        self.db: ZODB.DB = self.depot.db
        self.client = open_db(self.depot.client_uri)
        self.local_tm = transaction.TransactionManager()
        self.local = self.db.open(self.local_tm)
        self.remote_tm = transaction.TransactionManager()
        self.remote = self.client.open(self.remote_tm)

    def close(self) -> None:
        self.remote.close()
        self.client.close()
        self.local.close()
        self.depot.stop()


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

    def seen() -> bool:
        shared.local_tm.begin()
        value: int = box.value
        return value == 7

    eventually(seen, "serve to see the application's commit")


def test_a_new_object_from_either_side_is_seen_by_the_other(shared: Shared) -> None:
    shared.remote_tm.begin()
    shared.remote.root()["from application"] = Box(2)
    shared.remote_tm.commit()

    def serve_sees() -> bool:
        shared.local_tm.begin()
        box: Any = shared.local.root().get("from application")
        return box is not None and box.value == 2

    eventually(serve_sees, "serve to see the application's new object")
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

    def application_value_stands() -> bool:
        shared.local_tm.begin()
        value: int = shared.local.root()["box"].value
        return value == 1

    eventually(application_value_stands, "the application's value to stand")

    # And the other way round, through the ZEO server.
    assert remote_value(shared) == 1
    shared.local.root()["box"].value = 3
    shared.local_tm.commit()
    shared.remote.root()["box"].value = 4
    with pytest.raises(ConflictError):
        shared.remote_tm.commit()
    shared.remote_tm.abort()
    eventually(lambda: remote_value(shared) == 3, "serve's value to stand")


def test_the_clients_speak_msgpack_and_a_conflict_still_names_its_object(
    shared: Shared,
) -> None:
    """The server thread speaks ZEO's msgpack protocol; clients follow it unasked.

    Under msgpack, ZEO rebuilds the exceptions it knows from their
    attributes: a conflict must still be a ConflictError that says which
    object (retry logs it), not ZEO's generic ServerException.
    """
    assert shared.db.storage.protocol_version[:1] == b"M"
    assert shared.client.storage.protocol_version[:1] == b"M"

    shared.remote_tm.begin()
    box = shared.remote.root()["box"]
    box.value  # noqa: B018 - read in the application's transaction
    shared.local_tm.begin()
    shared.local.root()["box"].value = 5
    shared.local_tm.commit()
    box.value = 6  # written from the state serve's commit replaced
    with pytest.raises(ConflictError) as raised:
        shared.remote_tm.commit()
    shared.remote_tm.abort()
    assert raised.value.oid == box._p_oid
    assert raised.value.class_name.endswith("Box")


def test_serves_own_client_keeps_no_copy_of_what_it_commits(shared: Shared) -> None:
    """serve's client has no ZEO client cache; an application's keeps what it loads.

    (``ClientStorage._cache`` is ZEO's, private: the count of objects in
    the client's cache file.)
    """
    for value in range(5):
        shared.local_tm.begin()
        shared.local.root()[f"box {value}"] = Box(value)
        shared.local_tm.commit()
    assert len(shared.db.storage._cache) == 0

    def seen() -> bool:
        shared.remote_tm.begin()
        return "box 4" in shared.remote.root()

    eventually(seen, "the application to see serve's last commit")
    assert shared.remote.root()["box 4"].value == 4
    assert len(shared.client.storage._cache) > 0


def test_stop_closes_the_file_only_after_the_server_has_stopped_running(tmp_path: Path) -> None:
    """A consumer's vote still running in the server must not find Data.fs closed under it.

    ZEO's own ``close()`` closes the storage first and joins the server's
    thread after; a commit in flight there then fails with "truncate of
    closed file" instead of the client seeing itself disconnected.
    """
    depot = SharedDepot(f"file://{tmp_path}/Data.fs?blobstorage_dir={tmp_path}/blobs").start()
    storage = depot._server.storages["1"]
    close = storage.close
    running_at_close: list[list[str]] = []

    def recording_close() -> None:
        running_at_close.append(
            [t.name for t in threading.enumerate() if t.name.startswith("StorageServer(")]
        )
        close()

    storage.close = recording_close
    depot.stop()
    assert running_at_close == [[]]
