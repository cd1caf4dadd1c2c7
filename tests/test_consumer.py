"""``consume``: the consumer loop an application calls instead of writing its own.

Real FileStorage with blobs in ``tmp_path``, filled through
``Depot.deliver`` as the LMTP server fills it; the application's own state
is a list in the same database, so what an abort undoes is seen.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transaction
from persistent.list import PersistentList
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError

from postoffice import Consumed, QueueEmpty, consume, find_queue, open_queue
from postoffice.database import open_db
from postoffice.deliver import Depot
from postoffice.store import BLOB_THRESHOLD, Queue
from postoffice.store.stored import StoredMessage
from tests.helpers import Outbox, message, settings_for, uri_for


def fill(tmp_path: Path, subjects: list[str], size: int | None = None) -> None:
    """Deliver one message a subject, oldest first, to queue A; the depot closed after."""
    depot = Depot(settings_for(tmp_path))
    depot.prepare()
    try:
        for number, subject in enumerate(subjects):
            raw = message(number, subject=subject) if size is None else message(number, size=size)
            (outcome,) = depot.deliver("sender@outside.example", ["rcpt@a.example"], raw)
            assert outcome.reply.startswith("250 2.0.0"), outcome.reply
    finally:
        depot.close()


def numbered(count: int) -> list[str]:
    return [f"number {n}" for n in range(count)]


class App:
    """An application whose state lives in the queue's database: an abort undoes it."""

    def __init__(self, queue: Queue, poison: str = "poison") -> None:
        root = queue._p_jar.root()
        root["processed"] = self.processed = PersistentList()
        transaction.commit()
        self.poison = poison

    def __call__(self, message: StoredMessage) -> None:
        if message["Subject"] == self.poison:
            raise RuntimeError("cannot digest " + message["Message-Id"])
        self.processed.append(message["Subject"])


def test_every_message_once_oldest_first_and_a_failure_quarantined_alone(tmp_path: Path) -> None:
    subjects = numbered(25)
    subjects[13] = "poison"
    fill(tmp_path, subjects)
    outbox = Outbox()
    with open_queue(uri_for(tmp_path), "A") as queue:
        app = App(queue)

        done = consume(
            queue, app, per_commit=10, send=outbox, notice_from="Help Desk <help@example.com>"
        )

        # 0-9 in one commit; 10-19 undone at the poison and done again one a
        # commit; 20-24 in one commit.
        assert done == Consumed(processed=24, quarantined=1, commits=12, retried=0)
        assert list(app.processed) == [s for s in subjects if s != "poison"]
        assert not queue
    with open_queue(uri_for(tmp_path), "A") as queue:  # from disk
        assert len(queue) == 0 and list(queue.messages()) == []
        ((kept, error),) = list(queue.get_quarantined_messages())
        assert kept["Subject"] == "poison"
        assert "RuntimeError: cannot digest <13@outside.example>" in error
    ((from_addr, to_addrs, _notice),) = outbox.sent
    assert "help@example.com" in from_addr and to_addrs == ["sender@outside.example"]


def test_a_conflict_undoes_the_batch_and_it_is_done_again_once(tmp_path: Path) -> None:
    fill(tmp_path, numbered(5))
    with open_queue(uri_for(tmp_path), "A") as queue:
        app = App(queue)
        conflicts = [3]

        def process(message: StoredMessage) -> None:
            app(message)
            if conflicts and message["Subject"] == "number 3":
                conflicts.pop()
                raise ConflictError("another writer changed what this one read")

        done = consume(queue, process)

        assert done == Consumed(processed=5, quarantined=0, commits=1, retried=1)
        assert list(app.processed) == numbered(5)
        assert queue.count_quarantined_messages() == 0 and not queue


def test_an_unreadable_message_is_quarantined_in_the_batch_without_a_notice(
    tmp_path: Path,
) -> None:
    fill(tmp_path, ["large"], size=BLOB_THRESHOLD + 1)
    with open_queue(uri_for(tmp_path), "A") as queue:  # two small ones after it
        queue.add(message(1, subject="number 1"))
        queue.add(message(2, subject="number 2"))
        transaction.commit()
    for blob_file in (tmp_path / "blobs").rglob("*.blob"):
        blob_file.unlink()
    outbox = Outbox()
    with open_queue(uri_for(tmp_path), "A") as queue:
        app = App(queue)

        done = consume(queue, app, send=outbox, notice_from="help@example.com")

        assert done == Consumed(processed=2, quarantined=1, commits=1, retried=0)
        assert list(app.processed) == ["number 1", "number 2"]
        ((_kept, error),) = list(queue.get_quarantined_messages())
        assert "cannot be read" in error
    assert outbox.sent == []  # nothing of it could be read to tell its sender


def test_one_a_commit(tmp_path: Path) -> None:
    fill(tmp_path, numbered(4))
    with open_queue(uri_for(tmp_path), "A") as queue:
        app = App(queue)
        assert consume(queue, app, per_commit=1) == Consumed(4, 0, 4, 0)
        assert list(app.processed) == numbered(4)


def transactions(tmp_path: Path) -> int:
    """Transactions committed in the depot so far: the consumer's and its claims'."""
    storage = FileStorage(str(tmp_path / "Data.fs"), read_only=True)
    try:
        return sum(1 for _txn in storage.iterator())
    finally:
        storage.close()


@pytest.mark.parametrize(("per_commit", "most"), [(1, 100 + 12), (50, 2 + 2)])
def test_claims_are_few_one_a_commit_or_in_batches(
    tmp_path: Path, per_commit: int, most: int
) -> None:
    """Through ZEO a commit is most of a pop's cost, and claims are commits of their own.

    One a commit, a claim serves several pops as they speed up (1, 2, 4,
    8, 16, 16, ...); in batches, one claim takes the rest of the batch.
    """
    fill(tmp_path, numbered(100))
    with open_queue(uri_for(tmp_path), "A") as queue:
        app = App(queue)
        transaction.commit()
        before = transactions(tmp_path)
        done = consume(queue, app, per_commit=per_commit)
        assert done.processed == 100 and done.commits == 100 // per_commit
        assert list(app.processed) == numbered(100)
        assert done.commits < transactions(tmp_path) - before <= most


def test_an_interrupted_consume_loses_nothing(tmp_path: Path) -> None:
    """Ctrl-C (or any error that is not the message's) aborts: what was popped comes back."""
    fill(tmp_path, numbered(5))
    with open_queue(uri_for(tmp_path), "A") as queue:
        app = App(queue)

        def process(message: StoredMessage) -> None:
            if message["Subject"] == "number 2":
                raise KeyboardInterrupt
            app(message)

        with pytest.raises(KeyboardInterrupt):
            consume(queue, process)
        assert len(queue) == 5 and list(app.processed) == []
    with open_queue(uri_for(tmp_path), "A") as queue:
        app = App(queue)
        assert consume(queue, app) == Consumed(5, 0, 1, 0)
        assert list(app.processed) == numbered(5)


def test_it_returns_when_what_waits_is_held_by_another_consumer(tmp_path: Path) -> None:
    fill(tmp_path, numbered(3))
    db = open_db(uri_for(tmp_path))
    try:
        mine = db.open(transaction_manager=transaction.TransactionManager())
        theirs = db.open(transaction_manager=transaction.TransactionManager())
        other = find_queue(theirs.root(), "A")
        held = [other.pop_next() for _ in range(3)]  # their transaction stays open
        with pytest.raises(QueueEmpty):
            other.pop_next()
        queue = find_queue(mine.root(), "A")

        assert consume(queue, lambda message: None) == Consumed()

        theirs.transaction_manager.commit()
        assert [m["Subject"] for m in held] == numbered(3)
        mine.close()
        theirs.close()
    finally:
        db.close()


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"per_commit": 0}, "per_commit must be at least 1"),
        ({"send": Outbox()}, "notice_from is required"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_popped(
    tmp_path: Path, options: dict[str, object], complaint: str
) -> None:
    fill(tmp_path, numbered(1))
    with open_queue(uri_for(tmp_path), "A") as queue:
        with pytest.raises(ValueError, match=complaint):
            consume(queue, lambda message: None, **options)  # type: ignore[arg-type]
        assert len(queue) == 1
