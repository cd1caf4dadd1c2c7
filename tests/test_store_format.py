"""The store's data format: the class paths its records pickle under, and old data read back.

A ZODB record names its class by module and name, so those names are part
of the format.  Every persistent class pickles as ``postoffice.store.<Name>``
(as when the store was one module); these tests pin that for the records
written now, and read ``tests/data/store-format.fs``, a small depot the
single-module store wrote (``tests/data/make_store_format.py`` says how),
through the public API.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage
from ZODB.utils import get_pickle_metadata

from postoffice import QueueEmpty, open_queue, store
from postoffice.deliver import Depot
from postoffice.store import find_folder, reconcile, stored_message
from tests.helpers import settings_for

FIXTURE = Path(__file__).parent / "data" / "store-format.fs"
T = 1_700_000_000.0  # every time in the fixture

# Every persistent class of the store, and the path it has always pickled under.
PICKLED = {
    store.MessageRecord: "postoffice.store.MessageRecord",
    store.QuarantineRecord: "postoffice.store.QuarantineRecord",
    store.DeadLetter: "postoffice.store.DeadLetter",
    store.MessageTree: "postoffice.store.MessageTree",
    store.Ledger: "postoffice.store.Ledger",
    store.LedgerTimes: "postoffice.store.LedgerTimes",
    store.Queue: "postoffice.store.Queue",
    store.QueuesFolder: "postoffice.store.QueuesFolder",
}


def message(number: int) -> bytes:
    """The messages of the fixture, as make_store_format.py wrote them."""
    return (
        "From: Sender <sender@outside.example>\r\n"
        "To: rcpt@a.example\r\n"
        f"Message-Id: <{number}@outside.example>\r\n"
        f"Subject: number {number}\r\n"
        "\r\n"
        f"Body {number}.\r\n"
    ).encode()


def pickled_classes(path: Path) -> set[str]:
    """``module.name`` of the class of every record in a FileStorage."""
    storage = FileStorage(str(path), read_only=True)
    try:
        return {
            ".".join(get_pickle_metadata(record.data))
            for txn in storage.iterator()
            for record in txn
            if record.data
        }
    finally:
        storage.close()


def ours(names: set[str]) -> set[str]:
    return {name for name in names if name.startswith("postoffice.")}


@pytest.mark.parametrize("cls", list(PICKLED), ids=lambda cls: cls.__name__)
def test_each_persistent_class_pickles_under_its_old_path_and_resolves(cls: type) -> None:
    assert f"{cls.__module__}.{cls.__qualname__}" == PICKLED[cls]
    module, name = PICKLED[cls].rsplit(".", 1)
    db = ZODB.DB(None)
    try:
        assert db.classFactory(None, module, name) is cls  # how ZODB finds it on load
    finally:
        db.close()


def test_records_written_now_name_only_the_old_paths(tmp_path: Path) -> None:
    path = tmp_path / "Data.fs"
    db = ZODB.DB(FileStorage(str(path)))
    try:
        with db.transaction() as connection:
            folder = find_folder(connection.root(), "/postoffice", create=True)
            reconcile(folder, ("A",))
            queue = folder["A"]
            queue.store(message(1), T)
            queue.record_delivery("<1@outside.example>", "rcpt@a.example", T)
            queue.quarantine(stored_message(message(2)), "broken")
            folder.add_dead_letter(message(3), "s@x", ("r@x",), "Traceback", T, 10)
    finally:
        db.close()
    assert ours(pickled_classes(path)) == set(PICKLED.values())


def test_the_fixture_holds_every_persistent_class() -> None:
    assert ours(pickled_classes(FIXTURE)) == set(PICKLED.values())


@pytest.fixture
def old_depot(tmp_path: Path) -> str:
    """A copy of the fixture (reading it writes: claims, cleanup), as a URI."""
    copy = tmp_path / "Data.fs"
    shutil.copyfile(FIXTURE, copy)
    return f"file://{copy}"


def test_new_objects_keep_the_attributes_and_types_of_the_old_ones(old_depot: str) -> None:
    """The pickled state is the ``__dict__``: the same names, of the same classes."""

    def layout(obj: Any) -> dict[str, type]:
        return {name: type(value) for name, value in obj.__getstate__().items()}

    with open_queue(old_depot, "A") as queue:
        folder = find_folder(queue._p_jar.root(), "/postoffice")
        # Lanes came later: a queue gets them at its first append, or as serve starts.
        lanes = {"_lanes": tuple, "_ledger_lanes": tuple, "_sender_lanes": tuple}
        assert layout(store.Queue()) == {**layout(queue), **lanes}
        assert queue.upgrade() and not queue.upgrade()
        assert layout(store.Queue()) == layout(queue)
        assert layout(store.QueuesFolder()) == layout(folder)
        waiting = list(queue._messages.values())[1]  # 0 was consumed: it has ``done``
        assert layout(store.MessageRecord(b"x", T, use_blob=False)) == layout(waiting)


def test_a_depot_written_before_the_package_reads_back_through_the_public_api(
    old_depot: str,
) -> None:
    with open_queue(old_depot, "A") as queue:
        # 0 was consumed; 1 and 2 wait; 3's consumer vanished and its lease ended.
        assert len(queue) == 3
        assert [bytes(queue.pop_next()) for _ in range(3)] == [message(n) for n in (1, 2, 3)]
        with pytest.raises(QueueEmpty):
            queue.pop_next()
        transaction.commit()

        assert queue.count_quarantined_messages() == 1
        ((quarantined, error),) = list(queue.get_quarantined_messages())
        # Kept as written; read back under the id header 0.25's quarantine added.
        qid = quarantined.postoffice_id
        assert queue._quarantine[qid].raw == message(9) and error == "ValueError: broken"
        with_id = f"X-Postoffice-Id: {qid}\r\n".encode() + message(9)
        assert bytes(quarantined) == with_id
        assert bytes(queue.get_quarantined_message(quarantined["X-Postoffice-Id"])) == with_id

        mail = stored_message(message(1))
        mail["X-Original-To"] = "rcpt@a.example"
        assert queue.is_duplicate(mail, now=T + 1)
        assert not queue.has_delivered("<2@outside.example>", "rcpt@a.example", T - 1)
        assert queue.is_throttled("loop@outside.example", T + 1)
        assert not queue.is_throttled("sender@outside.example", T + 1)
        assert queue.throttle_view("sender@outside.example", T + 1, 240.0).arrivals_in_window == 1

        folder = find_folder(queue._p_jar.root(), "/postoffice")
        ((dead,),) = [list(folder.dead_letters.values())]
        assert (dead.data, dead.sender, dead.recipients, dead.error, dead.when) == (
            message(8),
            "sender@outside.example",
            ("rcpt@a.example",),
            "Traceback",
            T,
        )
        assert folder.dead_letter_count() == 1


def test_a_depot_written_before_the_package_takes_new_mail_and_keeps_it(old_depot: str) -> None:
    with open_queue(old_depot, "A") as queue:
        queue.requeue_quarantined_messages()
        queue.add(message(10), now=T + 10)
        transaction.commit()
    with open_queue(old_depot, "A") as queue:
        popped = [bytes(queue.pop_next()) for _ in range(len(queue))]
        transaction.commit()
        assert popped == [message(n) for n in (1, 2, 3, 9, 10)]
        assert queue.count_quarantined_messages() == 0 and len(queue) == 0


def test_serves_start_gives_the_old_queues_their_lanes_and_loses_nothing(
    old_depot: str, tmp_path: Path
) -> None:
    """The migration: serve's start (its reconcile) upgrades each queue of the configuration."""
    with open_queue(old_depot, "A") as queue:
        assert getattr(queue, "_lanes", None) is None  # as the earlier release wrote it
        assert getattr(queue, "_sender_lanes", None) is None
        # Throttle state written before lanes: a throttle, and two arrivals.
        queue.throttle("loop@outside.example", T + 3600)
        for seconds in (0, 30):
            queue.collect_frequency_data(stored_message(message(1)), now=T + seconds)
        transaction.commit()
        counted = queue.get_average_frequency("sender@outside.example", T + 60, 120)
        assert counted >= 1.0  # 60 * 2 arrivals / 120 s, and the fixture's own
    depot = Depot(settings_for(tmp_path, zodb_uri=old_depot, queues={"A": "to_hostname: a"}))
    try:
        depot.prepare()
    finally:
        depot.close()
    with open_queue(old_depot, "A") as queue:
        assert len(queue._lanes) == store.records.LANES
        assert len(queue._ledger_lanes) == store.records.LANES
        assert len(queue._sender_lanes) == store.records.LANES
        # The old throttle state still counts, with what the lanes count since.
        assert queue.is_throttled("loop@outside.example", T + 60)
        queue.collect_frequency_data(stored_message(message(1)), now=T + 60)
        sender = "sender@outside.example"
        assert queue.get_average_frequency(sender, T + 60, 120) == pytest.approx(counted + 0.5)
        assert sum(len(senders) for senders, _ in queue._sender_lanes) == 1
        assert [bytes(queue.pop_next()) for _ in range(len(queue))] == [
            message(n) for n in (1, 2, 3)
        ]
        transaction.commit()
        mail = stored_message(message(1))
        mail["X-Original-To"] = "rcpt@a.example"
        assert queue.is_duplicate(mail, now=T + 1)  # the old ledger is still read
