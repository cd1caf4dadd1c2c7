"""The store under consumers: claims, leases, counts, blobs, reconcile, old-API state.

Every test runs on a real FileStorage with a blob folder in ``tmp_path``
(a few on storages without blob support), messages put in with
``Depot.deliver`` or ``Queue.add``.  Where durability matters the database
is closed and opened again from disk.  The only thing replaced is the
depot's clock (``postoffice.clock``), to make a claim's lease run out
without waiting an hour.
"""

from __future__ import annotations

import datetime
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import transaction
import ZODB
from BTrees.Length import Length
from BTrees.LOBTree import LOBTree
from ZODB.POSException import ConflictError

from postoffice import QueueEmpty, UnreadableMessage, consume, open_queue, store
from postoffice import clock as depot_clock
from postoffice.database import open_db
from postoffice.deliver import Depot
from postoffice.errors import TemporaryError
from postoffice.store import (
    BLOB_THRESHOLD,
    CLAIM_LEASE,
    CLEANUP_AT,
    Queue,
    QueuesFolder,
    choose_lane,
    claims,
    duplicates,
    find_folder,
    reconcile,
    records,
)
from postoffice.store.claims import SWEEP_BEHIND
from postoffice.store.fifo import IDLE_LANE, SWEEP_EVERY
from postoffice.store.folder import LANE_IN_USE
from postoffice.store.records import key_time
from tests.helpers import message, settings_for, uri_for


def fill(folder: Path, count: int, size: int = 0, uri: str | None = None, start: int = 0) -> None:
    """Deliver ``count`` messages to queue A the way the LMTP server does."""
    depot = Depot(settings_for(folder, zodb_uri=uri))
    try:
        depot.prepare()
        for number in range(start, start + count):
            raw = message(number, size=size)
            outcomes = depot.deliver("sender@outside.example", ["rcpt@a.example"], raw)
            assert outcomes[0].reply.startswith("250 "), outcomes[0].reply
    finally:
        depot.close()


def refilled(folder: Path, db: ZODB.DB, count: int, size: int = 0) -> ZODB.DB:
    """Close ``db``, deliver ``count`` messages as the server does, open it again."""
    db.close()
    fill(folder, count, size=size)
    return open_db(uri_for(folder))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[ZODB.DB]:
    fill(tmp_path, 0)  # creates the queues
    opened = open_db(uri_for(tmp_path))
    yield opened
    opened.close()


def subjects_left(uri_or_db: object, queue: str = "A") -> list[str]:
    """Subjects of the waiting messages, oldest first, read in a fresh connection."""
    with open_queue(uri_or_db, queue) as opened:  # type: ignore[arg-type]
        return [store.stored_message(raw)["Subject"] for _key, raw, _arrived in opened.messages()]


class Consumer:
    """One consumer: its own connection and transaction manager, as a second process has."""

    def __init__(self, db: ZODB.DB, name: str = "A") -> None:
        self.manager = transaction.TransactionManager()
        self.connection = db.open(transaction_manager=self.manager)
        self.queue: Queue = find_folder(self.connection.root(), "/postoffice")[name]

    def pop(self) -> str:
        return str(self.queue.pop_next()["Subject"])

    def drain(self) -> list[str]:
        """Pop and commit one message at a time while ``len()`` says any wait."""
        popped = []
        while self.queue:
            popped.append(self.pop())
            self.manager.commit()
        return popped

    def close(self) -> None:
        self.manager.abort()
        self.connection.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The depot's clock, settable: ``clock[0] += CLAIM_LEASE`` ends every lease."""
    now = [depot_clock.now()]
    monkeypatch.setattr(depot_clock, "now", lambda: now[0])
    yield now


# --- FIFO, len, truthiness -------------------------------------------------------------


def test_queue_add_keeps_fifo_order_even_within_one_clock_tick(db: ZODB.DB) -> None:
    consumer = Consumer(db)
    for number in range(20):
        consumer.queue.add(message(number), now=1_700_000_000.0)  # one timestamp for all
    consumer.manager.commit()
    assert [consumer.pop() for _ in range(20)] == [f"number {n}" for n in range(20)]
    consumer.manager.commit()
    consumer.close()


def _deliver(folder: QueuesFolder, writer: int, round_number: int) -> None:
    """Ten deliveries: appended to the queue, recorded in the ledger."""
    queue = folder["A"]
    for number in range(10):
        now = time.time()
        queue.store(message(round_number * 10 + number), now)
        queue.record_delivery(f"<{writer}.{round_number}.{number}@x>", "r@a", now)


def _count_arrivals(folder: QueuesFolder, writer: int, round_number: int) -> None:
    """Ten arrivals of senders of their own counted, as ``ooo_loop_frequency`` counts them."""
    queue = folder["A"]
    for number in range(10):
        sender = f"s{writer}.{round_number}.{number}@outside.example"
        queue.record_arrival(sender, time.time(), window=60.0)


def _write_concurrently(
    db: ZODB.DB,
    salts: tuple[int, int],
    rounds: int,
    work: Callable[[QueuesFolder, int, int], None] = _deliver,
) -> int:
    """Two writers with the key salts of two processes, committing at once; conflicts met.

    Each round both begin, each does ``work`` (ten deliveries), then both
    commit: the second commit meets whatever the first changed under it.
    """
    managers = (transaction.TransactionManager(), transaction.TransactionManager())
    connections = [db.open(manager) for manager in managers]
    conflicts = 0
    try:
        for round_number in range(rounds):
            folders = []
            for manager, connection in zip(managers, connections, strict=True):
                manager.begin()
                folders.append(find_folder(connection.root(), "/postoffice"))
            for writer, (salt, folder) in enumerate(zip(salts, folders, strict=True)):
                store.records._SALT = salt  # this writer's process, as far as keys go
                work(folder, writer, round_number)
            for manager in managers:
                try:
                    manager.commit()
                except ConflictError:
                    manager.abort()
                    conflicts += 1
    finally:
        for connection in connections:
            connection.close()
    return conflicts


def test_writers_in_two_processes_append_to_one_queue_without_conflicts(
    db: ZODB.DB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each process appends to its own lane: no leaf, no split, is written by both."""
    monkeypatch.setattr(store.records, "_SALT", store.records._SALT)
    first, second = 3, 4  # two lanes
    assert store.records.lane_of(first) != store.records.lane_of(second)
    assert _write_concurrently(db, (first, second), rounds=40) == 0
    with open_queue(db, "A") as queue:
        assert len(queue) == 800
        # Each writer's deliveries are duplicates for the other (and anyone).
        since = time.time() - 60
        assert all(
            queue.has_delivered(f"<{writer}.{r}.{n}@x>", "r@a", since)
            for writer in (0, 1)
            for r in range(40)
            for n in range(10)
        )

    # The same lane (salts 3 and 3 + LANES): the shared last leaf splits under both.
    same = (first, first + store.records.LANES)
    assert _write_concurrently(db, same, rounds=40) > 0


def test_writers_in_two_processes_count_sender_arrivals_without_conflicts(
    db: ZODB.DB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ooo_loop_frequency on, each delivery counts its sender: in the writer's own lane."""
    monkeypatch.setattr(store.records, "_SALT", store.records._SALT)
    first, second = 3, 4  # two lanes
    assert _write_concurrently(db, (first, second), rounds=40, work=_count_arrivals) == 0
    with open_queue(db, "A") as queue:
        # Both writers' arrivals count, and a sender both count is counted once each.
        for writer in (0, 1):
            view = queue.throttle_view(f"s{writer}.39.9@outside.example", time.time(), 60.0)
            assert view.arrivals_in_window == 1
        queue.record_arrival("s0.39.9@outside.example", time.time(), window=60.0)
        view = queue.throttle_view("s0.39.9@outside.example", time.time(), 60.0)
        assert view.arrivals_in_window == 2

    # The same lane (salts 3 and 3 + LANES): the shared newest leaf of the
    # activity index splits under both.
    same = (first, first + store.records.LANES)
    assert _write_concurrently(db, same, rounds=40, work=_count_arrivals) > 0


def test_a_sender_counted_by_two_processes_is_throttled_by_their_arrivals_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Arrivals from two lanes add up; a throttle set in one lane, lifted in another, ends."""
    queue = Queue()
    sender = "loop@outside.example"
    monkeypatch.setattr(store.records, "_SALT", 3)
    queue.record_arrival(sender, T, window=60.0)
    store.records._SALT = 4
    queue.record_arrival(sender, T + 1, window=60.0, throttle_until=T + 3600)
    view = queue.throttle_view(sender, T + 2, 60.0)
    assert (view.arrivals_in_window, view.last_arrival) == (2, T + 1)
    assert view.throttled_until == T + 3600

    store.records._SALT = 3  # the other process makes the throttle shorter
    queue.throttle(sender, T + 60)
    assert queue.throttle_view(sender, T + 2, 60.0).throttled_until == T + 60
    assert not queue.is_throttled(sender, T + 61)
    assert queue.clear_throttle(sender) == 1  # one key, forgotten in both lanes
    assert queue.throttle_view(sender, T + 2, 60.0).arrivals_in_window == 0


def test_a_gone_writers_sender_lane_is_pruned_by_the_arrivals_of_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store.records, "_SALT", 3)
    queue = Queue()
    for number in range(100):
        queue.record_arrival(f"old-{number}@outside.example", T, window=60.0)
    gone = queue._sender_lanes[store.records.own_lane()]
    assert len(gone[0]) == len(gone[1]) == 100

    store.records._SALT = 4  # the next serve, in another lane
    arrivals = 0
    while len(gone[1]) and arrivals < 2000:  # each arrival prunes one other lane too
        queue.record_arrival(f"new-{arrivals}@outside.example", T + 3600 + arrivals, window=60.0)
        arrivals += 1
    assert len(gone[0]) == len(gone[1]) == 0


def _keep_for_review(folder: QueuesFolder, writer: int, round_number: int) -> None:
    """Ten refusals discarded and kept for review, as ``discard`` keeps them."""
    area = folder.review_area(create=True)
    assert area is not None
    for number in range(10):
        raw = message(round_number * 10 + number)
        area.add(raw, "reject_filter", "A", "550 5.7.1 rejected", time.time(), keep=10_000)


def test_writers_in_two_processes_keep_mail_for_review_without_conflicts(
    db: ZODB.DB, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store.records, "_SALT", store.records._SALT)
    with open_queue(db, "A") as queue:  # made as serve's start makes it
        find_folder(queue._p_jar.root(), "/postoffice").review_area(create=True)
        transaction.commit()
    first, second = 3, 4  # two lanes
    assert _write_concurrently(db, (first, second), rounds=40, work=_keep_for_review) == 0
    same = (first, first + store.records.LANES)
    conflicts = _write_concurrently(db, same, rounds=40, work=_keep_for_review)
    assert conflicts > 0
    with open_queue(db, "A") as queue:
        area = find_folder(queue._p_jar.root(), "/postoffice").review_area()
        assert area is not None
        keys = [key for key, _record in area.items()]
        # Every commit that held kept its ten, and nothing else is there.
        assert len(keys) == area.count() == 10 * (80 + 80 - conflicts)
        assert keys == sorted(keys)  # across the lanes, in arrival order


def test_a_kept_area_holds_its_bound_over_every_lane_and_drops_a_gone_writers_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = QueuesFolder()
    area = folder.review_area(create=True)
    assert area is not None
    monkeypatch.setattr(store.records, "_SALT", 3)
    gone = [area.add(message(n), "rule", "A", "550", T + n, keep=5)[0] for n in range(5)]

    store.records._SALT = 4  # the next serve, in another lane
    kept, dropped = zip(
        *(area.add(message(n), "rule", "A", "550", T + 10 + n, keep=5) for n in range(3)),
        strict=True,
    )
    assert dropped == (1, 1, 1) and area.count() == 5
    assert [key for key, _ in area.items()] == [*gone[3:], *kept]  # the gone writer's oldest went
    assert bytes(area.get(gone[4]).raw) == message(4)  # an id names its lane
    assert bytes(area.remove(kept[0]).raw) == message(0)
    assert kept[0] not in area and gone[4] in area

    store.records._SALT = 3  # the first writer is back: both lanes are live now
    area.add(message(9), "rule", "A", "550", T + 20, keep=5)
    area.add(message(9), "rule", "A", "550", T + 21, keep=5)
    assert area.count() == 5 and gone[3] not in area  # still the oldest first


def test_a_review_area_written_before_lanes_is_read_emptied_and_dropped_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = QueuesFolder()
    folder.review = LOBTree()  # as a folder of the release before lanes has it
    folder.review_count = Length()
    old = folder.review_area()
    assert old is not None
    old_keys = [old.add(message(n), "rule", "A", "550", T + n, keep=5)[0] for n in range(3)]
    assert getattr(folder, "review_lanes", None) is None and old.count() == 3

    monkeypatch.setattr(store.records, "_SALT", 4)
    area = folder.review_area(create=True)  # serve's start gives it lanes
    assert area is not None and len(folder.review_lanes) == store.records.LANES
    new_keys = [area.add(message(n), "rule", "A", "550", T + 10 + n, keep=4)[0] for n in range(2)]
    assert [key for key, _ in area.items()] == [*old_keys[1:], *new_keys]
    assert len(folder.review) == 2 and bytes(area.remove(old_keys[2]).raw) == message(2)


def test_a_gone_writers_ledger_lane_is_pruned_by_the_deliveries_of_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store.records, "_SALT", 3)
    queue = Queue()
    for number in range(100):
        queue.record_delivery(f"<old-{number}@x>", "r@a.example", T)
    gone = queue._ledger_lanes[store.records.own_lane()]
    assert len(gone[1]) == 100

    store.records._SALT = 4  # the next serve, in another lane
    deliveries = 0
    while len(gone[1]) and deliveries < 2000:  # each delivery prunes one other lane too
        queue.record_delivery(f"<new-{deliveries}@x>", "r@a.example", T + DAY + deliveries)
        deliveries += 1
    assert len(gone[1]) == len(gone[0]) == 0
    assert not queue.has_delivered("<old-1@x>", "r@a.example", T)


def test_the_queue_pops_in_arrival_order_across_lanes(
    db: ZODB.DB, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store.records, "_SALT", store.records._SALT)
    with open_queue(db, "A") as queue:
        start = time.time()
        for number in range(40):
            store.records._SALT = random.choice((1, 2, 5, 6))  # four processes
            queue.store(message(number), start + number)
        transaction.commit()
        lanes = {store.records.lane_of(key) for key, _raw, _t in queue.messages()}
        assert len(lanes) > 1
        popped = [queue.pop_next()["Message-Id"] for _ in range(40)]
        transaction.commit()
    assert popped == [f"<{number}@outside.example>" for number in range(40)]


def test_len_and_truth_follow_pops_commits_and_aborts(tmp_path: Path, db: ZODB.DB) -> None:
    consumer = Consumer(db)
    assert len(consumer.queue) == 0
    assert not consumer.queue
    consumer.close()
    db = refilled(tmp_path, db, 3)
    consumer = Consumer(db)
    assert len(consumer.queue) == 3 and consumer.queue
    consumer.pop()
    assert len(consumer.queue) == 2  # popped in this transaction: no longer waiting
    consumer.manager.abort()
    assert len(consumer.queue) == 3  # given back
    consumer.pop()
    consumer.pop()
    consumer.manager.commit()
    assert len(consumer.queue) == 1
    consumer.pop()
    assert len(consumer.queue) == 0 and not consumer.queue
    consumer.manager.commit()
    consumer.close()
    db.close()


def test_pop_from_an_empty_queue_raises_queue_empty_an_index_error(db: ZODB.DB) -> None:
    consumer = Consumer(db)
    with pytest.raises(QueueEmpty) as raised:
        consumer.queue.pop_next()
    assert isinstance(raised.value, IndexError)
    consumer.close()


# --- exclusive pops, conflicts, leases ---------------------------------------------------


def test_two_consumers_never_get_the_same_message_and_both_commit(
    tmp_path: Path, db: ZODB.DB
) -> None:
    db.close()
    fill(tmp_path, 4, size=BLOB_THRESHOLD + 1000)  # blob records: resolution must cope
    db = open_db(uri_for(tmp_path))
    first, second = Consumer(db), Consumer(db)
    assert first.pop() == "number 0"
    assert second.pop() == "number 1"  # 0 is held by the first, uncommitted
    assert first.pop() == "number 2"
    first.manager.commit()  # each commit conflicts with the other's claims: resolved
    second.manager.commit()
    first.close()
    second.close()
    db.close()
    assert subjects_left(uri_for(tmp_path)) == ["number 3"]


def test_many_threads_consume_every_message_once_without_conflict_errors(
    tmp_path: Path, db: ZODB.DB
) -> None:
    db = refilled(tmp_path, db, 120)
    seen: list[list[str]] = [[], [], []]
    errors: list[BaseException] = []

    def work(number: int) -> None:
        consumer = Consumer(db)
        try:
            while consumer.queue:
                try:
                    subject = consumer.pop()
                except QueueEmpty:
                    consumer.manager.abort()
                    continue
                consumer.manager.commit()
                seen[number].append(subject)
        except BaseException as exc:
            errors.append(exc)
        finally:
            consumer.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    everything = [s for part in seen for s in part]
    assert sorted(everything) == sorted(f"number {n}" for n in range(120))
    assert len(set(everything)) == 120
    db.close()
    assert subjects_left(uri_for(tmp_path)) == []


def test_popped_and_committed_is_gone_after_reopening_from_disk(
    tmp_path: Path, db: ZODB.DB
) -> None:
    db.close()
    fill(tmp_path, 2)
    with open_queue(uri_for(tmp_path), "A") as queue:
        assert queue.pop_next()["Subject"] == "number 0"
        transaction.commit()
    assert subjects_left(uri_for(tmp_path)) == ["number 1"]


def test_popped_and_aborted_comes_back_first_also_to_another_consumer(
    tmp_path: Path, db: ZODB.DB
) -> None:
    db = refilled(tmp_path, db, 3)
    first = Consumer(db)
    assert first.pop() == "number 0"
    first.manager.abort()
    assert first.pop() == "number 0"  # this consumer's next pop
    first.manager.abort()
    first.close()  # closing gives it back to everybody
    second = Consumer(db)
    assert second.pop() == "number 0"
    second.manager.commit()
    second.close()
    db.close()
    assert subjects_left(uri_for(tmp_path)) == ["number 1", "number 2"]


def test_a_whole_aborted_batch_is_popped_again_in_the_next_transaction(
    tmp_path: Path, db: ZODB.DB
) -> None:
    """After an abort, every message given back is poppable: len() and pop_next() agree.

    The pop that gives them back claims only a few; the others must still
    be candidates for the next pops, though this transaction's snapshot
    shows them claimed by this consumer.
    """
    db = refilled(tmp_path, db, 12)
    consumer = Consumer(db)
    assert [consumer.pop() for _ in range(12)] == [f"number {n}" for n in range(12)]
    consumer.manager.abort()
    again = []
    while consumer.queue:
        again.append(consumer.pop())
    assert again == [f"number {n}" for n in range(12)]
    consumer.manager.commit()
    consumer.close()
    db.close()
    assert subjects_left(uri_for(tmp_path)) == []


CRASHING_CONSUMER = textwrap.dedent(
    """
    import os, sys
    from postoffice import open_queue
    queue, closer = open_queue(sys.argv[1], "A")
    print(queue.pop_next()["Subject"], flush=True)
    os._exit(0)  # dies holding the message: no commit, no abort, no close
    """
)


def test_a_message_held_by_a_consumer_that_died_comes_back_after_the_lease(
    tmp_path: Path, db: ZODB.DB, clock: list[float]
) -> None:
    db.close()
    fill(tmp_path, 2)
    died = subprocess.run(
        [sys.executable, "-c", CRASHING_CONSUMER, uri_for(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert died.stdout.strip() == "number 0", died.stderr
    db = open_db(uri_for(tmp_path))
    consumer = Consumer(db)
    assert len(consumer.queue) == 1  # number 0 is still held by the dead consumer
    assert consumer.pop() == "number 1"
    consumer.manager.commit()
    assert not consumer.queue
    with pytest.raises(QueueEmpty):
        consumer.queue.pop_next()
    consumer.manager.abort()
    clock[0] += CLAIM_LEASE + 1
    assert len(consumer.queue) == 1 and consumer.queue  # `while queue:` sees it again
    assert len(list(consumer.queue.messages())) == 1  # the CLI's depth and oldest see it too
    assert consumer.pop() == "number 0"
    consumer.manager.commit()
    assert len(consumer.queue) == 0
    consumer.close()
    db.close()
    assert subjects_left(uri_for(tmp_path)) == []


def test_a_consumer_whose_lease_ran_out_cannot_commit_a_message_another_took(
    tmp_path: Path, db: ZODB.DB, clock: list[float]
) -> None:
    db = refilled(tmp_path, db, 1)
    slow, fast = Consumer(db), Consumer(db)
    assert slow.pop() == "number 0"
    clock[0] += CLAIM_LEASE + 1
    assert fast.pop() == "number 0"
    fast.manager.commit()
    # Processed twice would be wrong: the slow consumer is told, and its work undone.
    with pytest.raises(ConflictError):
        slow.manager.commit()
    slow.manager.abort()
    assert len(slow.queue) == 0
    slow.close()
    fast.close()
    db.close()
    assert subjects_left(uri_for(tmp_path)) == []


# --- claiming ahead ------------------------------------------------------------------------


def transactions(db: ZODB.DB) -> int:
    return sum(1 for _txn in db.storage.iterator())


def test_a_quick_consumer_claims_ahead_so_a_pop_costs_about_one_commit(
    tmp_path: Path, db: ZODB.DB, clock: list[float]
) -> None:
    """Through ZEO a commit is most of a pop's cost: one claim serves several pops."""
    db = refilled(tmp_path, db, 100)
    consumer = Consumer(db)
    before = transactions(db)
    popped = []
    for _number in range(100):
        popped.append(consumer.pop())
        consumer.manager.commit()
    assert popped == [f"number {n}" for n in range(100)]  # FIFO all the same
    commits = transactions(db) - before
    # 100 of the consumer's own, and claims of 1, 2, 4, 8, 16, 16, ...: not 100 more.
    assert 100 < commits <= 100 + 12
    with pytest.raises(QueueEmpty):
        consumer.queue.pop_next()
    consumer.close()
    db.close()
    assert subjects_left(uri_for(tmp_path)) == []


def test_messages_claimed_ahead_are_only_for_their_consumer_until_it_closes(
    tmp_path: Path, db: ZODB.DB, clock: list[float]
) -> None:
    db = refilled(tmp_path, db, 10)
    first, second = Consumer(db), Consumer(db)
    for number in range(4):  # claims of 1, 2 and 4: numbers 4, 5 and 6 claimed ahead
        assert first.pop() == f"number {number}"
        first.manager.commit()
    assert len(first.queue) == 6  # its own claimed-ahead messages wait for it
    second.manager.begin()  # a transaction that sees those claims
    assert len(second.queue) == 3  # ... and they are not another consumer's to take
    assert second.pop() == "number 7"
    assert first.pop() == "number 4"
    first.manager.commit()
    first.close()  # gives 5 and 6 back
    second.manager.commit()
    assert len(second.queue) == 4
    assert second.drain() == ["number 5", "number 6", "number 8", "number 9"]
    second.close()
    db.close()
    assert subjects_left(uri_for(tmp_path)) == []


def test_a_claim_ahead_that_waited_is_renewed_before_its_message_is_popped(
    tmp_path: Path, db: ZODB.DB, clock: list[float]
) -> None:
    """What a consumer pops always has (nearly) a whole lease to be worked on."""
    db = refilled(tmp_path, db, 10)
    first, second = Consumer(db), Consumer(db)
    for _number in range(4):
        first.pop()
        first.manager.commit()  # 4, 5, 6 claimed ahead, their lease from now
    clock[0] += store.CLAIM_AHEAD_FOR + 1
    assert first.pop() == "number 4"  # claimed again: the lease starts anew
    first.manager.commit()
    clock[0] += CLAIM_LEASE - 5  # the first lease has ended, the renewed one has not
    second.manager.begin()
    assert len(second.queue) == 3
    assert second.pop() == "number 7"
    second.manager.commit()
    assert first.pop() == "number 5"
    first.manager.commit()
    first.close()
    second.close()
    db.close()
    assert subjects_left(uri_for(tmp_path)) == ["number 6", "number 8", "number 9"]


def test_a_slow_consumer_claims_one_message_at_a_time(
    tmp_path: Path, db: ZODB.DB, clock: list[float]
) -> None:
    """One that takes seconds a message holds no others back from other consumers."""
    db = refilled(tmp_path, db, 6)
    slow, other = Consumer(db), Consumer(db)
    for number in range(6):
        clock[0] += store.CLAIM_AHEAD_WHEN + 1
        assert slow.pop() == f"number {number}"
        other.manager.begin()
        assert len(other.queue) == 5 - number
        slow.manager.commit()
    slow.close()
    other.close()


def test_a_claim_that_gives_up_keeps_what_the_consumer_claimed_ahead(
    tmp_path: Path, db: ZODB.DB, clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pop that fails with "too busy" loses none of the messages this consumer holds."""
    db = refilled(tmp_path, db, 10)
    first = Consumer(db)
    for _number in range(4):
        first.pop()
        first.manager.commit()  # 4, 5, 6 claimed ahead
    clock[0] += store.CLAIM_AHEAD_FOR + 1  # so the next pop claims them again
    claimer = claims.claimer_of(first.connection)
    assert claimer is not None
    commit = claimer.manager.commit

    def conflict() -> None:  # a fault injected into every claim commit
        raise ConflictError("injected")

    monkeypatch.setattr(claims, "CLAIM_ATTEMPTS", 2)
    monkeypatch.setattr(claims, "CLAIM_PATIENCE", 0.05)
    monkeypatch.setattr(claimer.manager, "commit", conflict)
    with pytest.raises(TemporaryError):
        first.queue.pop_next()
    first.manager.abort()
    monkeypatch.setattr(claimer.manager, "commit", commit)
    assert [first.pop() for _ in range(6)] == [f"number {n}" for n in range(4, 10)]
    first.manager.commit()
    first.close()
    db.close()
    assert subjects_left(uri_for(tmp_path)) == []


UNCLOSED_QUICK_CONSUMER = textwrap.dedent(
    """
    import sys, transaction
    from postoffice import open_queue
    queue, closer = open_queue(sys.argv[1], "A")
    for _number in range(4):
        print(queue.pop_next()["Subject"], flush=True)
        transaction.commit()
    # Ends without closer(): what it claimed ahead is given back all the same.
    """
)


def test_a_consumer_that_exits_without_closing_gives_back_what_it_claimed_ahead(
    tmp_path: Path, db: ZODB.DB
) -> None:
    db.close()
    fill(tmp_path, 12)
    ended = subprocess.run(
        [sys.executable, "-c", UNCLOSED_QUICK_CONSUMER, uri_for(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ended.stdout.split() == ["number", "0", "number", "1", "number", "2", "number", "3"]
    assert ended.returncode == 0, ended.stderr
    # At once, not after the lease: numbers 4 to 6 were claimed ahead, now given back.
    assert subjects_left(uri_for(tmp_path)) == [f"number {n}" for n in range(4, 12)]


DYING_QUICK_CONSUMER = textwrap.dedent(
    """
    import os, sys, transaction
    from postoffice import open_queue
    queue, closer = open_queue(sys.argv[1], "A")
    for _number in range(4):
        print(queue.pop_next()["Subject"], flush=True)
        transaction.commit()
    print(queue.pop_next()["Subject"], flush=True)
    os._exit(0)  # dies holding a popped message and those it claimed ahead
    """
)


def test_messages_claimed_ahead_by_a_consumer_that_died_come_back_after_the_lease(
    tmp_path: Path, db: ZODB.DB, clock: list[float]
) -> None:
    db.close()
    fill(tmp_path, 12)
    died = subprocess.run(
        [sys.executable, "-c", DYING_QUICK_CONSUMER, uri_for(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    done = died.stdout.split("\n")[:4]
    assert done == [f"number {n}" for n in range(4)], died.stderr
    db = open_db(uri_for(tmp_path))
    consumer = Consumer(db)
    before_the_lease = consumer.drain()
    held = 12 - 4 - len(before_the_lease)
    assert 1 <= held <= 1 + store.CLAIM_AHEAD  # the popped one and at most a claim ahead
    # Past the leases the dead process took, on its own (real) clock.
    clock[0] = time.time() + CLAIM_LEASE + 1
    assert len(consumer.queue) == held
    after_the_lease = consumer.drain()
    everything = done + before_the_lease + after_the_lease
    assert sorted(everything) == sorted(f"number {n}" for n in range(12))
    assert after_the_lease == sorted(after_the_lease, key=lambda s: int(s.split()[1]))
    consumer.close()
    db.close()
    assert subjects_left(uri_for(tmp_path)) == []


def test_len_matches_the_waiting_messages_through_a_random_run(tmp_path: Path, db: ZODB.DB) -> None:
    """A model of the queue against len(), messages() and a reopened database."""
    db = refilled(tmp_path, db, 30)
    consumer = Consumer(db)
    rng = random.Random(20240601)
    waiting = 30  # in the database
    unseen = 0  # added by a writer after this consumer's transaction began
    popped_now = 0
    added = 0
    for _step in range(150):
        action = rng.choice(["pop", "pop", "commit", "abort", "quarantine", "add"])
        if action == "pop":
            try:
                last = consumer.queue.pop_next()
            except QueueEmpty:
                assert waiting - unseen - popped_now == 0
                continue
            popped_now += 1
        elif action == "commit":
            consumer.manager.commit()
            waiting -= popped_now
            popped_now = unseen = 0
        elif action == "abort":
            consumer.manager.abort()
            popped_now = unseen = 0
        elif action == "quarantine" and popped_now:
            consumer.manager.abort()
            consumer.queue.quarantine(last, "broken")
            consumer.manager.commit()
            waiting -= 1
            popped_now = unseen = 0
        elif action == "add":  # a writer's transaction, as the LMTP server's
            writer = Consumer(db)
            writer.queue.add(message(1000 + added))
            writer.manager.commit()
            writer.close()
            added += 1
            waiting += 1
            unseen += 1
        assert len(consumer.queue) == waiting - unseen - popped_now
        assert bool(consumer.queue) == (waiting - unseen - popped_now > 0)
    consumer.manager.commit()
    waiting -= popped_now
    consumer.close()
    db.close()
    assert len(subjects_left(uri_for(tmp_path))) == waiting
    with open_queue(uri_for(tmp_path), "A") as queue:
        assert len(queue) == waiting


def records_kept(tmp_path: Path) -> tuple[int, int]:
    """(records in queue A's trees, of which waiting), as a new connection sees them."""
    with open_queue(uri_for(tmp_path), "A") as queue:
        kept = [record for _key, record in queue.fifo.items()]
        return len(kept), sum(1 for record in kept if not record.done)


def test_the_writer_sweeps_consumed_records_from_its_lane_as_it_appends(
    tmp_path: Path, db: ZODB.DB
) -> None:
    """Consumed records go without a consumer writing the tree a serve appends to."""
    db.close()
    fill(tmp_path, 40)  # this process's lane
    with open_queue(uri_for(tmp_path), "A") as queue:
        assert consume(queue, lambda message: None).processed == 40
    assert records_kept(tmp_path) == (40, 0)  # 40 claims: no consumer cleans up yet
    fill(tmp_path, SWEEP_EVERY, start=40)  # one sweep among them
    assert records_kept(tmp_path) == (SWEEP_EVERY, SWEEP_EVERY)
    assert subjects_left(uri_for(tmp_path)) == [f"number {n}" for n in range(40, 56)]


def test_a_writer_never_sweeps_a_message_a_consumer_holds(tmp_path: Path, db: ZODB.DB) -> None:
    db = refilled(tmp_path, db, 20)
    consumer, writer = Consumer(db), Consumer(db)

    def append(start: int) -> None:
        for number in range(start, start + SWEEP_EVERY):  # one sweep among them
            writer.queue.add(message(number))
            writer.manager.commit()

    assert [consumer.pop() for _ in range(5)] == [f"number {n}" for n in range(5)]
    append(20)  # the consumer's transaction is open: claimed, not consumed
    consumer.manager.commit()
    consumer.close()
    writer.close()
    db.close()
    assert records_kept(tmp_path) == (20 + SWEEP_EVERY, 15 + SWEEP_EVERY)
    db = open_db(uri_for(tmp_path))
    writer = Consumer(db)
    append(20 + SWEEP_EVERY)
    writer.close()
    db.close()
    assert records_kept(tmp_path) == (15 + 2 * SWEEP_EVERY, 15 + 2 * SWEEP_EVERY)


def test_consumers_remove_consumed_records_of_a_lane_nobody_appends_to(
    tmp_path: Path, db: ZODB.DB, clock: list[float]
) -> None:
    """A serve gone (or idle): its lane does not keep what was consumed."""
    db.close()
    fill(tmp_path, 3 * CLEANUP_AT)
    with open_queue(uri_for(tmp_path), "A") as queue:
        newest = max(key for key, _record in queue.fifo.items())
    # Keys never go back, so they may run ahead of a clock an earlier test moved.
    clock[0] = max(clock[0], key_time(newest)) + IDLE_LANE + 1
    with open_queue(uri_for(tmp_path), "A") as queue:
        assert consume(queue, lambda message: None).processed == 3 * CLEANUP_AT
        assert len(list(queue.fifo.items())) <= CLEANUP_AT  # consumed records do not pile up
        assert len(queue._claims) <= CLEANUP_AT


def test_a_cleanup_drops_stale_claim_index_entries_and_the_pop_goes_on(
    tmp_path: Path, db: ZODB.DB
) -> None:
    """Index entries with no claim behind them are removed while the cleanup walks the index."""
    db = refilled(tmp_path, db, 3)
    consumer = Consumer(db)
    for number in range(CLEANUP_AT):
        consumer.queue._claims.add((float(number), -1 - number))  # no holder: stale
    consumer.manager.commit()
    assert consumer.pop() == "number 0"
    consumer.manager.commit()
    # All of them: walking the index while removing from it skipped every other one.
    kept = [key for _until, key in consumer.queue._claims]
    assert len(kept) == 1 and kept[0] > 0  # the claim of the message popped, no stale one
    consumer.close()
    db.close()
    assert subjects_left(uri_for(tmp_path)) == ["number 1", "number 2"]


def test_consumers_remove_consumed_records_a_busy_writer_has_not_swept(
    tmp_path: Path, db: ZODB.DB, clock: list[float]
) -> None:
    """The lane is written to (its newest message is new), but its writer's sweeps fall
    behind: past SWEEP_BEHIND claims, consumers remove records there too."""
    db.close()
    fill(tmp_path, SWEEP_BEHIND + CLEANUP_AT)
    with open_queue(uri_for(tmp_path), "A") as queue:
        assert consume(queue, lambda message: None).processed == SWEEP_BEHIND + CLEANUP_AT
        assert len(list(queue.fifo.items())) <= SWEEP_BEHIND
        assert len(queue._claims) <= SWEEP_BEHIND


@pytest.fixture
def salt(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's key salt, given back after the test (``choose_lane`` changes it)."""
    monkeypatch.setattr(records, "_SALT", records._SALT)


def chosen(tmp_path: Path, now: float) -> tuple[int, set[int]]:
    with open_queue(uri_for(tmp_path), "A") as queue:
        return choose_lane(find_folder(queue._p_jar.root(), "/postoffice"), now)


def test_a_serve_starting_beside_another_appends_to_another_lane(
    tmp_path: Path, db: ZODB.DB, salt: None
) -> None:
    db.close()
    fill(tmp_path, 3)  # the other serve: this process's lane, just now
    other = records.own_lane()
    lane, busy = chosen(tmp_path, depot_clock.now())
    assert busy == {other} and lane != other and records.own_lane() == lane
    fill(tmp_path, 3, start=3)
    with open_queue(uri_for(tmp_path), "A") as queue:
        keys = [key for key, _record in queue.fifo.items()]
    assert [records.lane_of(key) for key in keys] == [other] * 3 + [lane] * 3
    assert subjects_left(uri_for(tmp_path)) == [f"number {n}" for n in range(6)]


def test_when_every_lane_but_one_is_in_use_a_serve_takes_that_one(
    tmp_path: Path, db: ZODB.DB, salt: None
) -> None:
    db.close()
    for lane in range(records.LANES - 1):
        records.use_lane(lane)
        fill(tmp_path, 1, start=lane)
    records.use_lane(0)
    assert chosen(tmp_path, depot_clock.now()) == (
        records.LANES - 1,
        set(range(records.LANES - 1)),
    )


def test_a_lane_nobody_wrote_to_for_an_hour_is_free_again(
    tmp_path: Path, db: ZODB.DB, salt: None, clock: list[float]
) -> None:
    db.close()
    fill(tmp_path, 3)
    with open_queue(uri_for(tmp_path), "A") as queue:
        newest = max(key for key, _record in queue.fifo.items())
    mine = records.own_lane()
    assert chosen(tmp_path, max(clock[0], key_time(newest)) + LANE_IN_USE + 1) == (mine, set())


# --- blobs and inline bytes ----------------------------------------------------------------


def test_large_messages_go_to_blobs_small_ones_stay_inline(tmp_path: Path, db: ZODB.DB) -> None:
    db.close()
    fill(tmp_path, 1, size=100)
    fill(tmp_path, 1, size=BLOB_THRESHOLD + 1, start=1)
    with open_queue(uri_for(tmp_path), "A") as queue:
        small, large = [record for _key, record in queue.fifo.items()]
        assert small.blob is None and small.data is not None
        assert large.data is None and large.blob is not None
        raw = large.raw
        assert len(raw) > BLOB_THRESHOLD
        assert any(path.suffix == ".blob" for path in (tmp_path / "blobs").rglob("*"))
        assert queue.pop_next()["Subject"] == "number 0"
        popped = queue.pop_next()
        assert popped["Subject"] == "number 1"
        assert popped.as_bytes() == raw
        transaction.commit()


def test_a_message_whose_blob_is_gone_is_quarantined_not_a_wall(
    tmp_path: Path, db: ZODB.DB
) -> None:
    """A blob file removed by hand: the consumer sets that message aside and goes on.

    Without that, every start of the consumer would stop at the same head
    message; the quarantine keeps the record, with why.
    """
    db.close()
    fill(tmp_path, 1, size=BLOB_THRESHOLD + 1)
    fill(tmp_path, 1, size=100, start=1)
    for blob_file in (tmp_path / "blobs").rglob("*.blob"):
        blob_file.unlink()
    with open_queue(uri_for(tmp_path), "A") as queue:
        with pytest.raises(UnreadableMessage) as raised:
            queue.pop_next()
        assert "cannot be read" in str(raised.value)
        queue.quarantine(raised.value.message, raised.value)
        transaction.commit()
        assert queue.pop_next()["Subject"] == "number 1"
        transaction.commit()
        assert not queue
        # Listing the quarantine still works, and says why the bytes are missing.
        ((kept, error),) = list(queue.get_quarantined_messages())
        assert f"message {raised.value.key} cannot be read" in error
        assert kept["X-Postoffice-Id"] == str(kept.__name__)
        # Requeued, it would only come back: it stays where a person sees it.
        assert queue.requeue_quarantined_messages() == 0
        transaction.commit()
        assert queue.count_quarantined_messages() == 1 and not queue


@pytest.mark.parametrize("kind", ["memory", "file without blobstorage_dir"])
def test_large_messages_are_stored_inline_without_blob_support(tmp_path: Path, kind: str) -> None:
    uri = "memory://" if kind == "memory" else f"file://{tmp_path}/Data.fs"
    db = open_db(uri)
    try:
        big = message(1, size=BLOB_THRESHOLD * 2)
        with open_queue_created(db) as queue:
            queue.add(big)
            transaction.commit()
            ((_key, record),) = queue.fifo.items()
            assert record.blob is None
            assert queue.pop_next().as_bytes() == big
            transaction.commit()
            assert not queue
    finally:
        db.close()


class open_queue_created:
    """open_queue on a database whose queues folder this test makes first."""

    def __init__(self, db: ZODB.DB) -> None:
        connection = db.open()
        reconcile(find_folder(connection.root(), "/postoffice", create=True), ("A",))
        transaction.commit()
        connection.close()
        self.opened = open_queue(db, "A")

    def __enter__(self) -> Queue:
        return self.opened.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.opened.__exit__(None, None, None)


# --- reconcile ---------------------------------------------------------------------------


def test_reconcile_creates_and_retires_queues_but_keeps_ones_with_mail(db: ZODB.DB) -> None:
    connection = db.open()
    folder = find_folder(connection.root(), "/postoffice")
    assert reconcile(folder, ("A", "B", "C")) == []
    assert folder.names() == ["A", "B", "C"]
    folder["A"].add(message(1))
    folder["B"].quarantine(store.stored_message(message(2)), "broken")
    transaction.commit()
    warnings = reconcile(folder, ("D",))
    assert folder.names() == ["A", "B", "D"]  # C was empty: retired
    assert len(warnings) == 2
    assert "'A'" in warnings[0] and "1 messages" in warnings[0]
    assert "'B'" in warnings[1] and "1 quarantined" in warnings[1]
    transaction.commit()
    connection.close()


# --- the old API's frequency and throttle methods --------------------------------------------


def test_frequency_and_throttle_methods_of_the_old_api(db: ZODB.DB) -> None:
    consumer = Consumer(db)
    queue = consumer.queue
    t0 = 1_700_000_000.0
    mail = store.stored_message(message(1))
    for offset in (0.0, 10.0, 20.0, 30.0):
        queue.collect_frequency_data(mail, now=t0 + offset)
    consumer.manager.commit()
    user = "sender@outside.example"
    assert queue.get_instantaneous_frequency(user, t0 + 40.0) == pytest.approx(6.0)
    assert queue.get_average_frequency(user, t0 + 40.0, 60.0) == pytest.approx(4.0)
    assert queue.get_instantaneous_frequency("nobody@example.org", t0) == 0.0
    # With discriminator headers, another To is another key.
    queue.collect_frequency_data(mail, headers=("To",), now=t0)
    assert queue.get_average_frequency(user, t0 + 1, 60.0, headers=("rcpt@a.example",)) == 1.0
    assert not queue.is_throttled(user, t0 + 40.0)
    queue.throttle(user, t0 + 300.0)
    consumer.manager.commit()
    assert queue.is_throttled(user, t0 + 299.0)
    assert not queue.is_throttled(user, t0 + 300.0)
    consumer.close()


# --- the duplicate ledger's structures ---------------------------------------------------

T = 1_800_000_000.0  # an arrival time, in seconds since the epoch
DAY = 24 * 3600


def test_ledger_remembers_pairs_for_the_window_per_recipient_case_blind() -> None:
    queue = Queue()
    queue.record_delivery(" <a@x> ", "Rcpt@A.example", T)
    assert queue.has_delivered("<a@x>", "rcpt@a.example", T - DAY)
    assert queue.has_delivered("<a@x>", " RCPT@a.example ", T)
    assert not queue.has_delivered("<a@x>", "other@a.example", T - DAY)
    assert not queue.has_delivered("<b@x>", "rcpt@a.example", T - DAY)
    # Arrival times are kept to the second.
    assert not queue.has_delivered("<a@x>", "rcpt@a.example", T + 1)
    assert queue.ledger_size() == 1


def test_ledger_pruning_forgets_only_entries_before_the_cutoff_oldest_first() -> None:
    queue = Queue()
    for n in range(10):
        queue.record_delivery(f"<{n}@x>", "r@a.example", T + n)
    assert queue.prune_ledger(T + 4, limit=3) == 3
    assert queue.ledger_size() == 7
    assert not queue.has_delivered("<0@x>", "r@a.example", 0)
    assert not queue.has_delivered("<2@x>", "r@a.example", 0)
    assert queue.has_delivered("<3@x>", "r@a.example", 0)
    assert queue.prune_ledger(T + 4) == 1  # only <3@x> is older than T + 4
    assert queue.prune_ledger(T + 4) == 0
    assert [queue.has_delivered(f"<{n}@x>", "r@a.example", 0) for n in range(10)] == [False] * 4 + [
        True
    ] * 6
    assert queue.prune_ledger(T + 100) == 6
    assert queue.ledger_size() == 0
    assert queue._duplicates.time_entries() == 0


def test_a_pair_recorded_again_is_pruned_by_its_newest_arrival_only() -> None:
    queue = Queue()
    queue.record_delivery("<a@x>", "r@a.example", T)
    queue.record_delivery("<a@x>", "r@a.example", T + DAY)  # stored again after the window
    queue.prune_ledger(T + 10)  # the first time entry goes, the pair stays
    assert queue.has_delivered("<a@x>", "r@a.example", T + DAY)
    assert queue.ledger_size() == 1
    queue.prune_ledger(T + DAY + 10)
    assert queue.ledger_size() == 0


def test_ledger_time_keys_are_unique_also_when_the_clock_goes_back() -> None:
    queue = Queue()
    for n in range(50):
        queue.record_delivery(f"<late-{n}@x>", "r@a.example", T + 100)
    for n in range(50):  # earlier than what this process recorded before
        queue.record_delivery(f"<early-{n}@x>", "r@a.example", T)
    for n in range(50):  # the same instants again
        queue.record_delivery(f"<again-{n}@x>", "r@a.example", T)
    assert queue._duplicates.time_entries() == 150 == queue.ledger_size()
    assert queue.prune_ledger(T + 50, limit=1000) == 100
    assert queue.ledger_size() == 50
    assert queue.has_delivered("<late-0@x>", "r@a.example", T)


def test_ledger_keys_are_fixed_size_integers_keyed_per_queue() -> None:
    one, two = Queue(), Queue()
    one.record_delivery("<a@x>", "r@a.example", T)
    two.record_delivery("<a@x>", "r@a.example", T)
    lane = store.records.own_lane()  # a process records in its own lane
    (key_one,) = one._ledger_lanes[lane][0].keys()
    (key_two,) = two._ledger_lanes[lane][0].keys()
    assert isinstance(key_one, int) and -(2**63) <= key_one < 2**63
    assert key_one != key_two  # each queue hashes with its own random salt
    (value,) = one._ledger_lanes[lane][0].values()
    assert value & 0xFFFFFFFF == int(T)


def test_a_hash_collision_is_never_taken_for_a_duplicate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Force every pair onto the same 64-bit key, with a check that differs.
    real = duplicates._ledger_hash

    def colliding(salt: bytes, message_id: str, recipient: str) -> tuple[int, int]:
        return 42, real(salt, message_id, recipient)[1]

    monkeypatch.setattr(duplicates, "_ledger_hash", colliding)
    queue = Queue()
    queue.record_delivery("<a@x>", "r@a.example", T)
    assert queue.has_delivered("<a@x>", "r@a.example", T)
    # Another pair on the same key: not a duplicate, so it is stored...
    assert not queue.has_delivered("<b@x>", "r@a.example", T)
    queue.record_delivery("<b@x>", "r@a.example", T + 1)
    # ...and takes the key over: the older pair could come once more (never a loss).
    assert queue.has_delivered("<b@x>", "r@a.example", T)
    assert not queue.has_delivered("<a@x>", "r@a.example", T)
    # Pruning the older pair's time entry leaves the newer pair's entry alone.
    assert queue.prune_ledger(T + 1) == 1
    assert queue.has_delivered("<b@x>", "r@a.example", T)
    assert queue.prune_ledger(T + 2) == 1
    assert queue.ledger_size() == 0


def test_ledger_survives_a_reopen_with_its_salt(tmp_path: Path) -> None:
    fill(tmp_path, 3)
    depot = Depot(settings_for(tmp_path))
    try:
        outcomes = depot.deliver("sender@outside.example", ["rcpt@a.example"], message(1))
        assert "duplicate" in outcomes[0].reply
        outcomes = depot.deliver("sender@outside.example", ["other@a.example"], message(1))
        assert outcomes[0].queue_key is not None
    finally:
        depot.close()


def test_the_writer_keeps_no_message_bytes_in_its_cache_after_the_commit(tmp_path: Path) -> None:
    depot = Depot(settings_for(tmp_path))
    try:
        depot.prepare()
        outcomes = depot.deliver(
            "sender@outside.example", ["rcpt@a.example"], message(7, size=4000)
        )
        assert outcomes[0].queue_key is not None
        connection = depot.db().open()
        try:
            records = [
                obj
                for obj in connection._cache.lru_items()  # type: ignore[attr-defined]
                if isinstance(obj[1], store.MessageRecord)
            ]
            assert records == []  # ghosts are not in the LRU list
        finally:
            connection.close()
    finally:
        depot.close()


def test_the_servers_start_reads_the_ledger_into_the_writers_cache(tmp_path: Path) -> None:
    fill(tmp_path, 300)

    def leaf_states(warm: bool) -> list[bool | None]:
        depot = Depot(settings_for(tmp_path))
        try:
            depot.prepare(warm=warm)
            connection = depot.db().open()  # the pool hands the prepared connection back
            try:
                states = []
                queue = find_folder(connection.root(), "/postoffice")["A"]
                for entries, _times in queue._ledger_lanes:
                    leaf = getattr(entries, "_firstbucket", None)  # None: an empty lane
                    while leaf is not None:
                        states.append(leaf._p_changed)  # None for a ghost; reading loads nothing
                        leaf = leaf._next
                return states
            finally:
                connection.close()
        finally:
            depot.close()

    cold, warm = leaf_states(False), leaf_states(True)
    assert len(cold) == len(warm) > 5
    assert None in cold
    assert warm == [False] * len(warm)  # every leaf loaded, none of them changed


# --- the old API's types: datetimes, timedeltas, header dicts -----------------------------


def test_throttle_methods_take_datetimes_and_timedeltas_and_store_only_numbers(
    db: ZODB.DB,
) -> None:
    consumer = Consumer(db)
    queue = consumer.queue
    t0 = datetime.datetime(2023, 11, 14, 12, 0, 0)  # naive: local time, as datetime.now()
    mail = store.stored_message(message(1))
    for minutes in (0, 1, 2, 3):
        queue.collect_frequency_data(
            mail, now=(t0 + datetime.timedelta(minutes=minutes)).timestamp()
        )
    user = "Sender <sender@outside.example>"  # the From header, as 0.25 took it
    later = t0 + datetime.timedelta(minutes=4)
    assert queue.get_instantaneous_frequency(user, later) == pytest.approx(1.0)
    assert queue.get_average_frequency(
        user, later, datetime.timedelta(minutes=10)
    ) == pytest.approx(0.4)
    queue.throttle(user, later + datetime.timedelta(hours=1))
    queue.throttle("new@outside.example", later.astimezone(datetime.UTC))
    consumer.manager.commit()
    assert queue.is_throttled(user, later)
    assert not queue.is_throttled(user, later + datetime.timedelta(hours=2))
    assert queue.is_throttled("new@outside.example", later.timestamp() - 1)
    entries = [e for senders, _ in queue._sender_lanes for e in senders.values()]
    assert len(entries) == 2  # the user's key, and new@outside.example's
    for arrivals, until in entries:
        assert all(type(t) is float for t in arrivals)
        assert until is None or type(until) is float
    with pytest.raises(TypeError):
        queue.throttle(user, "tomorrow")  # type: ignore[arg-type]
    consumer.close()


def test_a_datetime_stored_by_an_earlier_version_reads_as_seconds(db: ZODB.DB) -> None:
    consumer = Consumer(db)
    queue = consumer.queue
    until = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    queue._senders["sender@outside.example"] = ((), until)
    assert queue.is_throttled("sender@outside.example", until.timestamp() - 1)
    assert queue.throttle_view("sender@outside.example", 0.0, 60).throttled_until == (
        until.timestamp()
    )
    consumer.close()


def test_header_dicts_name_discriminators_and_no_headers_covers_every_key(db: ZODB.DB) -> None:
    consumer = Consumer(db)
    queue = consumer.queue
    t0 = 1_700_000_000.0
    one = store.stored_message(message(1, subject="ping"))
    two = store.stored_message(message(2, subject="pong"))
    queue.collect_frequency_data(one, headers=("To", "Subject"), now=t0)
    queue.collect_frequency_data(two, headers=("To", "Subject"), now=t0 + 30)
    user = "sender@outside.example"
    ping = {"To": "rcpt@a.example", "Subject": "ping"}
    # A dict is read by its values: the key of the arrivals with those header values.
    assert queue.get_average_frequency(user, t0 + 60, 120.0, headers=ping) == 0.5
    assert queue.get_instantaneous_frequency(user, t0 + 60, headers=ping) == 1.0
    # The same values in another order name the same key.
    swapped = {"Subject": "ping", "To": "rcpt@a.example"}
    assert queue.get_average_frequency(user, t0 + 60, 120.0, headers=swapped) == 0.5
    # A dict naming fewer headers covers every key that has those values.
    assert (
        queue.get_average_frequency(user, t0 + 60, 120.0, headers={"To": "rcpt@a.example"}) == 1.0
    )
    # No headers: every arrival of the user, whatever its discriminators.
    assert queue.get_average_frequency(user, t0 + 60, 120.0) == 1.0
    assert queue.get_instantaneous_frequency(user, t0 + 60) == 2.0
    assert not queue.is_throttled(user, t0 + 60)
    queue.throttle(user, t0 + 600, headers=swapped)
    consumer.manager.commit()
    assert queue.is_throttled(user, t0 + 60, headers=ping)
    assert not queue.is_throttled(
        user, t0 + 60, headers={"To": "rcpt@a.example", "Subject": "pong"}
    )
    assert queue.is_throttled(user, t0 + 60)  # some key of the user is throttled
    # The delivery's own key for ping is the one throttled.
    key = "\x00".join([user, "rcpt@a.example", "ping"])
    assert queue.throttle_view(key, t0 + 60, 60).throttled_until == t0 + 600
    consumer.close()


def test_throttling_a_user_without_headers_throttles_every_key_of_the_user(db: ZODB.DB) -> None:
    consumer = Consumer(db)
    queue = consumer.queue
    t0 = 1_700_000_000.0
    queue.collect_frequency_data(
        store.stored_message(message(1, subject="ping")), headers=("Subject",), now=t0
    )
    queue.throttle("sender@outside.example", t0 + 600)
    consumer.manager.commit()
    for key in ("sender@outside.example\x00ping", "sender@outside.example\x00never seen"):
        assert queue.throttle_view(key, t0 + 60, 60).throttled_until == t0 + 600
    assert not queue.is_throttled("other@outside.example", t0 + 60)
    consumer.close()


# --- add and requeue: the duplicate ledger, and pops in the same transaction --------------


def test_add_and_requeue_record_the_message_id_as_a_delivery_does(
    tmp_path: Path, db: ZODB.DB
) -> None:
    consumer = Consumer(db)
    added = store.stored_message(b"X-Original-To: rcpt@a.example\r\n" + message(1))
    consumer.queue.add(added)
    to_only = store.stored_message(message(2, to="Someone <rcpt@a.example>"))
    consumer.queue.add(to_only)
    quarantined = store.stored_message(message(3))
    consumer.queue.quarantine(quarantined, "kept")
    consumer.manager.commit()
    assert consumer.queue.is_duplicate(added)
    assert consumer.queue.is_duplicate(to_only)
    assert not consumer.queue.is_duplicate(quarantined)
    assert consumer.queue.requeue_quarantined_messages() == 1
    consumer.manager.commit()
    assert consumer.queue.is_duplicate(quarantined)
    consumer.close()
    db.close()
    depot = Depot(settings_for(tmp_path))
    try:
        depot.prepare()
        for number in (1, 2, 3):
            (outcome,) = depot.deliver("s@outside.example", ["rcpt@a.example"], message(number))
            assert outcome.reply.startswith("250 2.0.0"), outcome.reply
            assert "duplicate" in outcome.decision.reason, outcome.decision.reason
    finally:
        depot.close()
    assert len(subjects_left(uri_for(tmp_path))) == 3


def test_pop_next_sees_what_its_own_transaction_added(db: ZODB.DB) -> None:
    fill_one = Consumer(db)
    fill_one.queue.add(message(0))
    fill_one.manager.commit()
    fill_one.close()
    consumer = Consumer(db)
    other = Consumer(db)
    consumer.queue.add(message(1))
    consumer.queue.add(message(2))
    assert len(consumer.queue) == 3
    # The committed one first, then what this transaction added, in order.
    assert [consumer.pop() for _ in range(3)] == ["number 0", "number 1", "number 2"]
    assert len(consumer.queue) == 0
    with pytest.raises(QueueEmpty):
        consumer.queue.pop_next()
    consumer.manager.commit()
    other.manager.abort()  # a fresh snapshot
    with pytest.raises(QueueEmpty):
        other.queue.pop_next()
    assert len(other.queue) == 0
    assert subjects_left(db) == []
    # Added and popped, then aborted: neither happened.
    consumer.queue.add(message(4))
    assert consumer.pop() == "number 4"
    consumer.manager.abort()
    assert len(consumer.queue) == 0
    # A requeue, then a pop, in one transaction.
    consumer.queue.quarantine(store.stored_message(message(5)), "kept")
    consumer.manager.commit()
    consumer.queue.requeue_quarantined_messages()
    assert consumer.pop() == "number 5"
    consumer.manager.commit()
    other.manager.abort()
    assert len(other.queue) == 0 and subjects_left(db) == []
    consumer.close()
    other.close()


def test_an_added_message_popped_after_a_savepoint_rollback_is_not_there(db: ZODB.DB) -> None:
    consumer = Consumer(db)
    savepoint = consumer.manager.savepoint()
    consumer.queue.add(message(1))
    savepoint.rollback()
    with pytest.raises(QueueEmpty):
        consumer.queue.pop_next()
    consumer.close()


# --- quarantine: the X-Postoffice-Id header, any error value -------------------------------


def test_quarantined_messages_carry_their_id_as_x_postoffice_id(db: ZODB.DB) -> None:
    consumer = Consumer(db)
    queue = consumer.queue
    queue.add(message(1))
    consumer.manager.commit()
    popped = queue.pop_next()
    stored_bytes = popped.as_bytes()
    qid = queue.quarantine(popped, "kept")
    consumer.manager.commit()
    assert popped["X-Postoffice-Id"] == str(qid)
    ((kept, error),) = queue.get_quarantined_messages()
    assert kept["X-Postoffice-Id"] == str(qid) and error == "kept"
    again = queue.get_quarantined_message(kept["X-Postoffice-Id"])
    assert again.as_bytes() == f"X-Postoffice-Id: {qid}\r\n".encode() + stored_bytes
    queue.remove_from_quarantine(str(qid))
    consumer.manager.abort()
    queue.remove_from_quarantine(qid)
    consumer.manager.abort()
    plain = store.stored_message(again.as_bytes())  # only the header says which it is
    queue.remove_from_quarantine(plain)
    assert "X-Postoffice-Id" not in plain
    consumer.manager.commit()
    assert queue.count_quarantined_messages() == 0
    with pytest.raises(ValueError):
        queue.remove_from_quarantine(str(qid))
    with pytest.raises(ValueError):
        queue.remove_from_quarantine("not an id")
    # Requeued, the message has no X-Postoffice-Id.
    queue.quarantine(store.stored_message(stored_bytes), "again")
    queue.requeue_quarantined_messages()
    consumer.manager.commit()
    assert "X-Postoffice-Id" not in queue.pop_next()
    consumer.close()


@pytest.mark.parametrize(
    ("error", "kept"),
    [
        (("a", "three", "tuple"), "('a', 'three', 'tuple')"),
        ((ValueError, "not an exception", None), "not an exception"),
        (42, "42"),
        (None, "None"),
    ],
)
def test_quarantine_keeps_any_error_value_as_text(db: ZODB.DB, error: object, kept: str) -> None:
    consumer = Consumer(db)
    consumer.queue.quarantine(store.stored_message(message(1)), error)
    consumer.manager.commit()
    ((_message, text),) = consumer.queue.get_quarantined_messages()
    assert kept in text
    consumer.close()


def test_a_queue_an_earlier_version_let_a_datetime_throttle_into_takes_mail_again(
    tmp_path: Path, db: ZODB.DB
) -> None:
    """``throttle(user, datetime)`` on a queue without throttle state stored the datetime in
    both trees; every later delivery then failed its commit with TypeError (451)."""
    consumer = Consumer(db)
    until = datetime.datetime.now() + datetime.timedelta(hours=1)
    consumer.queue._senders["loop@outside.example"] = ((), until)
    consumer.queue._senders_by_time.add((until, "loop@outside.example"))
    consumer.manager.commit()
    consumer.close()
    db.close()
    depot = Depot(settings_for(tmp_path, ooo_loop_frequency=1))
    try:
        depot.prepare()
        (queued,) = depot.deliver("s@outside.example", ["rcpt@a.example"], message(1))
        assert queued.reply.startswith("250 2.0.0"), queued.reply
        looping = message(2, sender="loop@outside.example")
        (refused,) = depot.deliver("loop@outside.example", ["rcpt@a.example"], looping)
        assert refused.reply.startswith("550 5.7.1"), refused.reply
    finally:
        depot.close()
    with open_queue(uri_for(tmp_path), "A") as queue:
        ((sender, _values, until_seen),) = queue.throttled_senders(time.time())
        assert (sender, until_seen) == ("loop@outside.example", until.timestamp())
        # The old entry is read as seconds where it is; a prune reads every
        # lane's index, which heals the old one.
        queue.prune_senders(0.0)
        assert all(type(when) is float for when, _key in queue._senders_by_time)
        for senders, by_time in queue._sender_lanes:
            assert all(type(when) is float for when, _key in by_time)
            assert all(type(entry[1]) in (float, type(None)) for entry in senders.values())
