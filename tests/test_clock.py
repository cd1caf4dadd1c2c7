"""One clock: ``postoffice.clock.now`` is the time of the depot and of the store alike.

A delivery without a time of its own, a consumer's pop and its lease, and
``len()`` all read it at the moment they need it, so one replacement moves
them together; a clock given to the ``Depot`` still wins for deliveries.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transaction

from postoffice import clock, open_queue
from postoffice.config import loads
from postoffice.database import open_db
from postoffice.deliver import Depot
from postoffice.store import CLAIM_LEASE

T = 1_700_000_000.0

CONFIG = """\
[post office]
zodb_uri = file://{folder}/Data.fs

[queue:A]
filters =
    to_hostname: a.example
"""


def message(number: int) -> bytes:
    return (
        "From: Sender <sender@outside.example>\r\n"
        "To: rcpt@a.example\r\n"
        f"Message-Id: <{number}@outside.example>\r\n"
        f"Subject: number {number}\r\n"
        "\r\n"
        "Hello.\r\n"
    ).encode()


def test_the_depot_and_the_store_share_the_one_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [T]
    monkeypatch.setattr(clock, "now", lambda: now[0])
    depot = Depot(loads(CONFIG.format(folder=tmp_path), tmp_path / "postoffice.ini"))
    try:
        for number in range(2):
            assert depot.deliver("s@x", ["rcpt@a.example"], message(number))[0].queue_key
    finally:
        depot.close()
    db = open_db(f"file://{tmp_path}/Data.fs")
    try:
        with open_queue(db, "A") as queue:
            assert queue.oldest_arrival() == T  # the delivery's time
            assert [arrived for _key, _raw, arrived in queue.messages()] == [T, T]
            queue.pop_next()  # claimed until T + CLAIM_LEASE, on the same clock
            # Another consumer, while the first holds the message (it never
            # commits, as if it hung): after the lease, it waits again.
            with open_queue(db, "A") as other:
                assert len(other) == 1
                now[0] = T + CLAIM_LEASE + 1
                assert len(other) == 2
            transaction.abort()
    finally:
        db.close()


def test_a_clock_given_to_the_depot_wins_for_its_deliveries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clock, "now", lambda: T)
    settings = loads(CONFIG.format(folder=tmp_path), tmp_path / "postoffice.ini")
    depot = Depot(settings, clock=lambda: T + 60)
    try:
        depot.deliver("s@x", ["rcpt@a.example"], message(1))
    finally:
        depot.close()
    with open_queue(f"file://{tmp_path}/Data.fs", "A") as queue:
        assert queue.oldest_arrival() == T + 60
