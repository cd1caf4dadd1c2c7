"""A big message spooled to a file that becomes its blob: exact bytes, no copy, nothing left.

Every test uses a real FileStorage with its blob folder in ``tmp_path``
and spools into that storage's temporary directory, as the front doors do;
the only fakes are the faults injected into a commit.
"""

from __future__ import annotations

import gc
import importlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from ZODB.POSException import ConflictError

from postoffice import open_queue, spool
from postoffice.deliver import Depot
from postoffice.message import added_headers
from postoffice.spool import Spooled, Spooler
from postoffice.store import find_folder
from tests.helpers import (
    DELIVERY_DEPOT,
    T0,
    big_message,
    codes,
    message,
    settings_for,
    stored,
)

# The module of FileStorage (the package exports the class under the same name).
FileStorageModule = importlib.import_module("ZODB.FileStorage.FileStorage")
MiB = 1024 * 1024
SENDER = "sender@outside.example"


@pytest.fixture
def depot(tmp_path: Path) -> Iterator[Depot]:
    one = Depot(settings_for(tmp_path, **{**DELIVERY_DEPOT, "max_message_size": "60m"}))
    one.prepare()
    yield one
    one.close()


def spool_dir(depot: Depot) -> Path:
    directory = depot.spool_directory()
    assert directory is not None
    return Path(directory)


def spooled(depot: Depot, raw: bytes, recipient: str = "rcpt@a.example") -> Spooled:
    """``raw`` through a Spooler into the depot's spool directory, in pieces as a socket gives."""
    spooler = Spooler(depot.spool_directory(), SENDER, recipient, b"\r\n")
    for start in range(0, len(raw), 65536):
        spooler.write(raw[start : start + 65536])
    result = spooler.finish()
    assert isinstance(result, Spooled)
    return result


def left_in(directory: Path) -> list[str]:
    gc.collect()  # an aborted blob's file goes with the blob
    return sorted(os.listdir(directory))


def blob_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "blobs").rglob("*.blob"))


# --- the spooler --------------------------------------------------------------------------


def test_a_message_up_to_the_threshold_stays_bytes(tmp_path: Path) -> None:
    spooler = Spooler(str(tmp_path), SENDER, "rcpt@a.example", b"\r\n", threshold=100)
    spooler.write(b"x" * 60)
    spooler.write(b"y" * 40)
    assert spooler.finish() == b"x" * 60 + b"y" * 40
    assert os.listdir(tmp_path) == []


def test_past_the_threshold_the_file_holds_room_then_the_message(tmp_path: Path) -> None:
    raw = message(size=3000, eol="\n")
    spooler = Spooler(str(tmp_path), SENDER, "rcpt@a.example", b"\r\n", threshold=1000)
    for start in range(0, len(raw), 700):
        spooler.write(raw[start : start + 700])
    result = spooler.finish()
    assert isinstance(result, Spooled)
    assert result.size == len(result) == len(raw)
    assert result.eol == b"\n"  # seen in the message, not the door's guess
    assert result.read() == raw
    assert b"".join(result.chunks(1000)) == raw
    assert result.head == raw[: spool.HEAD]
    assert result.header_block() == raw[: raw.index(b"\n\n") + 2]
    assert os.path.getsize(result.path) == result.start + len(raw)
    assert result.fits(added_headers(SENDER, "rcpt@a.example", int(T0), b"\n"))
    result.remove()
    assert os.listdir(tmp_path) == []


def test_abandoned_spooling_leaves_nothing(tmp_path: Path) -> None:
    spooler = Spooler(str(tmp_path), SENDER, "rcpt@a.example", b"\r\n", threshold=10)
    spooler.write(b"z" * 100)
    assert spooler.spooling and len(os.listdir(tmp_path)) == 1
    spooler.abandon()
    assert os.listdir(tmp_path) == []


def test_the_line_ending_is_found_past_the_first_piece(tmp_path: Path) -> None:
    """No LF in the part kept in memory: the room is a guess, the stored lines are right."""
    raw = b"X-Long: " + b"a" * 5000 + b"\r\nFrom: a@b\r\n\r\nbody\r\n"
    spooler = Spooler(str(tmp_path), SENDER, "r@a.example", b"\n", threshold=1000)
    for start in range(0, len(raw), 500):
        spooler.write(raw[start : start + 500])
    result = spooler.finish()
    assert isinstance(result, Spooled)
    assert result.eol == b"\r\n"
    assert not result.fits(added_headers(SENDER, "r@a.example", int(T0), b"\r\n"))
    result.remove()


# --- stored by the depot --------------------------------------------------------------------


def test_a_big_message_is_stored_exactly_and_its_spool_file_is_the_blob(
    tmp_path: Path, depot: Depot
) -> None:
    raw = big_message(6 * MiB, line=5000)  # long lines: fine on a pipe
    received = spooled(depot, raw)
    assert Path(received.path).parent == spool_dir(depot)  # the storage's blob temp dir
    inode = os.stat(received.path).st_ino
    outcomes = depot.deliver(SENDER, ["rcpt@a.example"], received, now=T0)
    received.remove()
    assert codes(outcomes) == ["250 2.0.0"]
    lines = added_headers(SENDER, "rcpt@a.example", int(T0), b"\r\n")
    assert stored(depot.db(), "A") == [lines + raw]
    # No second copy: the committed blob is the very file the front door wrote.
    (blob,) = blob_files(tmp_path)
    assert os.stat(blob).st_ino == inode
    assert left_in(spool_dir(depot)) == []


def test_two_recipients_each_get_the_message_with_their_own_lines(
    tmp_path: Path, depot: Depot
) -> None:
    raw = big_message(2 * MiB, eol=b"\n")
    received = spooled(depot, raw, "first@a.example")
    outcomes = depot.deliver(SENDER, ["first@a.example", "second@a.example"], received, now=T0)
    received.remove()
    assert codes(outcomes) == ["250 2.0.0", "250 2.0.0"]
    assert stored(depot.db(), "A") == [
        added_headers(SENDER, rcpt, int(T0), b"\n") + raw
        for rcpt in ("first@a.example", "second@a.example")
    ]
    assert len(blob_files(tmp_path)) == 2
    assert left_in(spool_dir(depot)) == []


def test_a_commit_that_fails_stores_nothing_and_leaves_no_file(
    tmp_path: Path, depot: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills as the vote writes the transaction, after the blob went to the blob folder."""

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    raw = big_message(3 * MiB)
    received = spooled(depot, raw)
    monkeypatch.setattr(FileStorageModule, "cp", full)
    outcomes = depot.deliver(SENDER, ["rcpt@a.example"], received, now=T0)
    received.remove()
    monkeypatch.undo()
    assert codes(outcomes) == ["451 4.3.0"]
    assert stored(depot.db(), "A") == []
    assert blob_files(tmp_path) == []
    assert left_in(spool_dir(depot)) == []


def test_a_fault_before_the_commit_leaves_no_file(
    tmp_path: Path, depot: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blob made of the spool file, then the transaction aborted before any vote."""
    from postoffice.store.queue import Queue

    original = Queue.record_delivery

    def broken(self: Queue, *args: object) -> None:
        original(self, *args)
        raise RuntimeError("a bug after the store")

    received = spooled(depot, big_message(2 * MiB))
    monkeypatch.setattr(Queue, "record_delivery", broken)
    outcomes = depot.deliver(SENDER, ["rcpt@a.example"], received, now=T0)
    received.remove()
    assert codes(outcomes) == ["451 4.3.0"]
    assert blob_files(tmp_path) == []
    assert left_in(spool_dir(depot)) == []


def test_a_conflict_retried_stores_the_message_once_and_exactly(
    tmp_path: Path, depot: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry needs the spool file again: the first attempt consumed only a link to it."""
    original = FileStorageModule.cp
    votes = []

    def vote(*args: object) -> object:
        votes.append(args)
        if len(votes) == 1:
            raise ConflictError("injected as the vote writes")
        return original(*args)

    raw = big_message(2 * MiB)
    received = spooled(depot, raw)
    monkeypatch.setattr(FileStorageModule, "cp", vote)
    outcomes = depot.deliver(SENDER, ["rcpt@a.example"], received, now=T0)
    received.remove()
    monkeypatch.undo()
    assert len(votes) == 2
    assert codes(outcomes) == ["250 2.0.0"]
    lines = added_headers(SENDER, "rcpt@a.example", int(T0), b"\r\n")
    assert stored(depot.db(), "A") == [lines + raw]
    assert len(blob_files(tmp_path)) == 1
    assert left_in(spool_dir(depot)) == []


def test_a_body_rule_matching_in_the_last_text_part_of_30_mib_refuses_it(tmp_path: Path) -> None:
    depot = Depot(
        settings_for(
            tmp_path,
            max_message_size="40m",
            reject_filters=["body_regexp: ^unsubscribe-now$"],
            queues={"A": "to_hostname: a.example"},
        )
    )
    depot.prepare()
    try:
        raw = big_message(30 * MiB, last_text=b"unsubscribe-now")
        received = spooled(depot, raw)
        outcomes = depot.deliver(SENDER, ["rcpt@a.example"], received, now=T0)
        received.remove()
        assert codes(outcomes) == ["550 5.7.1"]
        assert "body matches" in outcomes[0].reply
        assert stored(depot.db(), "A") == []
        assert left_in(spool_dir(depot)) == []
        # The same message without the last part goes through.
        plain = spooled(depot, big_message(30 * MiB))
        assert codes(depot.deliver(SENDER, ["rcpt@a.example"], plain, now=T0)) == ["250 2.0.0"]
        plain.remove()
    finally:
        depot.close()


def test_a_discarded_refusal_keeps_the_big_message_for_review_as_a_blob(tmp_path: Path) -> None:
    depot = Depot(
        settings_for(
            tmp_path, max_message_size="10m", discard="no_queue", queues={"A": "to_hostname: a.x"}
        )
    )
    depot.prepare()
    try:
        raw = big_message(2 * MiB)
        received = spooled(depot, raw, "nobody@b.example")
        outcomes = depot.deliver(SENDER, ["nobody@b.example"], received, now=T0)
        received.remove()
        assert codes(outcomes) == ["250 2.0.0"]
        connection = depot.db().open()
        try:
            area = find_folder(connection.root(), depot.settings.zodb_path).review_area()
            assert area is not None
            ((_key, record),) = list(area.items())
            assert record.blob is not None and record.data is None
            lines = added_headers(SENDER, "nobody@b.example", int(T0), b"\r\n")
            assert record.raw == lines + raw
        finally:
            connection.close()
        assert left_in(spool_dir(depot)) == []
    finally:
        depot.close()


def test_duplicates_of_a_big_message_are_detected(depot: Depot) -> None:
    raw = big_message(2 * MiB, message_id="<twice@outside.example>")
    for _ in range(2):
        received = spooled(depot, raw)
        outcomes = depot.deliver(SENDER, ["rcpt@a.example"], received, now=T0)
        received.remove()
    assert "duplicate" in outcomes[0].reply
    with open_queue(depot.db(), "A") as queue:
        assert len(queue) == 1
