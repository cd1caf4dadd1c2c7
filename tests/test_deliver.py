"""Delivery into a real depot: what is stored, what a 250 promises, the faults of 0.25.

Every test uses a FileStorage with a blob folder in ``tmp_path``; where
durability matters the depot is closed and the database opened again from
disk, the way a consumer process would see it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import transaction
import ZODB.Connection

from postoffice import database, open_queue, sockets
from postoffice.config import loads
from postoffice.deliver import Delivery, Depot, Outcome
from postoffice.message import ParsedMessage
from postoffice.pipe import exit_code
from postoffice.store import BLOB_THRESHOLD, PRUNE_BATCH, find_folder, new_key, records
from tests.helpers import (
    DAY,
    DELIVERY_DEPOT,
    T0,
    codes,
    message,
    settings_for,
    stored,
    uri_for,
    write_config,
)


@pytest.fixture
def depot(tmp_path: Path) -> Iterator[Depot]:
    one = Depot(settings_for(tmp_path, **DELIVERY_DEPOT))
    one.prepare()
    yield one
    one.close()


# --- what is stored ------------------------------------------------------------------


def test_stored_bytes_are_three_lines_then_the_message_crlf(tmp_path: Path, depot: Depot) -> None:
    original = message(eol="\r\n")
    outcomes = depot.deliver("sender@outside.example", ["rcpt@a.example"], original, now=T0 + 0.9)
    assert codes(outcomes) == ["250 2.0.0"]
    depot.close()  # a 250 is a promise: read it back from disk, in a new database
    (raw,) = stored(uri_for(tmp_path))
    assert raw == (
        b"Return-Path: <sender@outside.example>\r\n"
        b"X-Original-To: rcpt@a.example\r\n"
        b"X-Postoffice-Date: 1700000000\r\n" + original
    )


def test_stored_bytes_follow_lf_from_the_pipe(tmp_path: Path, depot: Depot) -> None:
    original = message(eol="\n")
    depot.deliver("sender@outside.example", ["rcpt@a.example"], original, now=T0)
    depot.close()
    (raw,) = stored(uri_for(tmp_path))
    assert raw == (
        b"Return-Path: <sender@outside.example>\n"
        b"X-Original-To: rcpt@a.example\n"
        b"X-Postoffice-Date: 1700000000\n" + original
    )


def test_null_sender_is_an_empty_return_path(depot: Depot) -> None:
    depot.deliver("", ["rcpt@a.example"], message(), now=T0)
    (raw,) = stored(depot.db())
    assert raw.startswith(b"Return-Path: <>\r\nX-Original-To: rcpt@a.example\r\n")


def test_bytes_as_received_are_kept_exactly(depot: Depot) -> None:
    # 8-bit headers, odd spacing, a folded header, trailing whitespace, no final newline.
    original = (
        b"From:   Ren\xc3\xa9 <sender@outside.example>  \r\n"
        b"To: rcpt@a.example\r\n"
        b"Message-Id: <odd@outside.example>\r\n"
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\tfolded\r\n"
        b"X-Latin: caf\xe9\r\n"
        b"\r\n"
        b"..leading dot kept as unstuffed\r\n\x00binary\xff\r\nno final newline"
    )
    depot.deliver("sender@outside.example", ["rcpt@a.example"], original, now=T0)
    (raw,) = stored(depot.db())
    assert raw.endswith(original)
    assert raw.count(b"\r\n") == original.count(b"\r\n") + 3


def test_each_recipient_gets_its_own_x_original_to(depot: Depot) -> None:
    outcomes = depot.deliver("s@x.example", ["one@a.example", "two@a.example"], message(), now=T0)
    assert codes(outcomes) == ["250 2.0.0", "250 2.0.0"]
    first, second = stored(depot.db())
    assert b"\r\nX-Original-To: one@a.example\r\n" in first
    assert b"\r\nX-Original-To: two@a.example\r\n" in second


def test_existing_x_original_to_stays_below_ours(depot: Depot) -> None:
    original = message(1, "X-Original-To: forged@elsewhere.example")
    depot.deliver("s@x.example", ["rcpt@a.example"], original, now=T0)
    (raw,) = stored(depot.db())
    ours = raw.index(b"X-Original-To: rcpt@a.example")
    theirs = raw.index(b"X-Original-To: forged@elsewhere.example")
    assert ours < theirs
    with open_queue(depot.db(), "A") as queue:
        popped = queue.pop_next()
        assert popped.get_all("X-Original-To") == [
            "rcpt@a.example",
            "forged@elsewhere.example",
        ]
        assert popped["X-Original-To"] == "rcpt@a.example"
        transaction.abort()


def test_reply_names_queue_and_id(depot: Depot) -> None:
    (outcome,) = depot.deliver("s@x.example", ["rcpt@a.example"], message(), now=T0)
    assert outcome.reply == f"250 2.0.0 <rcpt@a.example> queued in A as {outcome.queue_key}"
    assert exit_code(outcome.decision) == 0
    with open_queue(depot.db(), "A") as queue:
        assert [key for key, _raw, _t in queue.messages()] == [outcome.queue_key]


# --- size: the message as received ----------------------------------------------------


def test_size_limit_counts_the_message_as_received(tmp_path: Path) -> None:
    limited = Depot(settings_for(tmp_path, **DELIVERY_DEPOT | {"max_message_size": "1k"}))
    try:
        exact = message(body="x" * (1024 - len(message(body=""))))
        assert len(exact) == 1024
        # Stored, it is 1024 bytes plus our three lines: still accepted.
        assert codes(limited.deliver("s@x", ["rcpt@a.example"], exact, now=T0)) == ["250 2.0.0"]
        over = message(2, body="x" * (1025 - len(message(2, body=""))))
        (refused,) = limited.deliver("s@x", ["rcpt@a.example"], over, now=T0)
        assert refused.reply.startswith("552 5.3.4 ")
        assert exit_code(refused.decision) == 69
        assert len(stored(limited.db())) == 1
    finally:
        limited.close()


# --- inline or blob ----------------------------------------------------------------------


def test_big_messages_go_to_blobs_and_read_back_intact(tmp_path: Path, depot: Depot) -> None:
    big_body = "".join(f"line {n:07d} " + "x" * 60 + "\n" for n in range(BLOB_THRESHOLD // 60))
    big = message(1, body=big_body)
    small = message(2)
    assert len(big) > BLOB_THRESHOLD
    depot.deliver("s@x", ["rcpt@a.example"], big, now=T0)
    depot.deliver("s@x", ["rcpt@a.example"], small, now=T0 + 1)
    depot.close()

    blob_files = [p for p in (tmp_path / "blobs").rglob("*.blob")]
    assert len(blob_files) == 1
    assert blob_files[0].read_bytes().endswith(big)

    with open_queue(uri_for(tmp_path), "A") as queue:
        records = [queue.fifo.record(key) for key, _raw, _t in queue.messages()]
        assert records[0].blob is not None and records[0].data is None
        assert records[1].blob is None and records[1].data is not None
        assert records[0].raw.endswith(big)
        assert records[1].raw.endswith(small)
        popped = queue.pop_next()
        assert popped["Message-Id"] == "<1@outside.example>"
        assert popped.get_content().replace("\r\n", "\n") == big_body
        transaction.abort()


# --- the duplicate ledger --------------------------------------------------------------


def test_duplicate_within_24_hours_is_discarded(depot: Depot) -> None:
    first = depot.deliver("s@x", ["rcpt@a.example"], message(), now=T0)
    again = depot.deliver("s@x", ["rcpt@a.example"], message(), now=T0 + DAY - 1)
    assert codes(first) == codes(again) == ["250 2.0.0"]
    assert "duplicate" in again[0].reply
    assert again[0].queue_key is None
    assert len(stored(depot.db())) == 1


def test_duplicate_after_24_hours_is_stored_again(depot: Depot) -> None:
    depot.deliver("s@x", ["rcpt@a.example"], message(), now=T0)
    later = depot.deliver("s@x", ["rcpt@a.example"], message(), now=T0 + DAY + 1)
    assert later[0].queue_key is not None
    assert len(stored(depot.db())) == 2


def test_duplicate_key_is_message_id_and_recipient(depot: Depot) -> None:
    depot.deliver("s@x", ["rcpt@a.example"], message(), now=T0)
    other_rcpt = depot.deliver("s@x", ["other@a.example"], message(), now=T0 + 1)
    other_id = depot.deliver("s@x", ["rcpt@a.example"], message(2), now=T0 + 2)
    case = depot.deliver("s@x", ["RCPT@a.example"], message(), now=T0 + 3)
    assert other_rcpt[0].queue_key is not None
    assert other_id[0].queue_key is not None
    assert case[0].queue_key is None
    assert len(stored(depot.db())) == 3


def test_duplicate_ledger_is_per_queue(depot: Depot) -> None:
    depot.deliver("s@x", ["rcpt@a.example"], message(), now=T0)
    # The same recipient address cannot be in two queues, but the same
    # Message-Id to a B recipient is not a duplicate of the A copy.
    depot.deliver("s@x", ["rcpt@b.example"], message(), now=T0 + 1)
    assert len(stored(depot.db(), "A")) == 1
    assert len(stored(depot.db(), "B")) == 1


def test_duplicate_ledger_survives_a_restart(tmp_path: Path, depot: Depot) -> None:
    depot.deliver("s@x", ["rcpt@a.example"], message(), now=T0)
    depot.close()
    restarted = Depot(settings_for(tmp_path, **DELIVERY_DEPOT))
    try:
        (again,) = restarted.deliver("s@x", ["rcpt@a.example"], message(), now=T0 + 60)
        assert again.queue_key is None
        assert "duplicate" in again.reply
    finally:
        restarted.close()


def test_duplicate_recipients_in_one_envelope_are_stored_once(depot: Depot) -> None:
    rcpts = ["rcpt@a.example", "RCPT@a.example", "rcpt@a.example", "two@a.example"]
    outcomes = depot.deliver("s@x", rcpts, message(), now=T0)
    assert codes(outcomes) == ["250 2.0.0"] * 4  # one reply per RCPT, as LMTP needs
    assert [o.recipient for o in outcomes] == rcpts
    assert len({o.queue_key for o in outcomes[:3]}) == 1
    assert len(stored(depot.db())) == 2


# --- 0.25 fault: the ledger is O(log n) --------------------------------------------------


def seed_ledger(depot: Depot, count: int, at: float) -> None:
    """Fill queue A's ledger directly: quicker than ``count`` deliveries, same structures."""
    manager = transaction.TransactionManager()
    connection = depot.db().open(transaction_manager=manager)
    try:
        queue = find_folder(connection.root(), "/postoffice")["A"]
        for n in range(count):
            queue.record_delivery(f"<seed-{n}@outside.example>", f"r{n % 50}@a.example", at)
        manager.commit()
    finally:
        manager.abort()
        connection.close()


def ledger_size(depot: Depot) -> int:
    manager = transaction.TransactionManager()
    connection = depot.db().open(transaction_manager=manager)
    try:
        return find_folder(connection.root(), "/postoffice")["A"].ledger_size()
    finally:
        manager.abort()
        connection.close()


def test_a_big_ledger_does_not_slow_delivery(tmp_path: Path) -> None:
    small = Depot(settings_for(tmp_path / "small", **DELIVERY_DEPOT))
    large = Depot(settings_for(tmp_path / "large", **DELIVERY_DEPOT))
    try:
        for one in (small, large):
            one.prepare()
        seed_ledger(small, 10, T0 - 3600)
        seed_ledger(large, 20_000, T0 - 3600)
        assert ledger_size(large) == 20_000
        timings: dict[int, list[float]] = {id(small): [], id(large): []}
        for n in range(55):
            for one in (small, large) if n % 2 else (large, small):
                started = time.perf_counter()
                outcomes = one.deliver("s@x", ["rcpt@a.example"], message(n), now=T0 + n)
                elapsed = time.perf_counter() - started
                assert outcomes[0].queue_key is not None
                if n >= 5:  # the first few warm caches up
                    timings[id(one)].append(elapsed)
        ratio = statistics.median(timings[id(large)]) / statistics.median(timings[id(small)])
        assert ratio < 3, f"20,000 ledger entries made delivery {ratio:.1f} times slower"
    finally:
        small.close()
        large.close()


def test_ledger_pruning_is_bounded_per_delivery_and_catches_up(depot: Depot) -> None:
    seed_ledger(depot, 2_000, T0 - DAY - 10)
    assert ledger_size(depot) == 2_000
    depot.deliver("s@x", ["rcpt@a.example"], message(0), now=T0)
    # One delivery does a bounded amount of pruning work, never a full scan...
    assert ledger_size(depot) == 2_000 - PRUNE_BATCH + 1
    # ...and after enough deliveries only the last day is left.
    batch = [Delivery("s@x", ("rcpt@a.example",), message(n)) for n in range(1, 40)]
    depot.deliver_batch(batch, now=T0 + 1)
    assert ledger_size(depot) == 40


# --- 0.25 fault: keys never come from max(keys) + 1 --------------------------------------


def test_key_generators_with_different_salts_never_collide(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two processes differ by their salt; give both the very same clock readings.
    instants = [T0 + n / 3 for n in range(300)] + [T0] * 50
    per_salt = {}
    for salt in (5, 6):
        monkeypatch.setattr(records, "_SALT", salt)
        monkeypatch.setattr(records, "_last_key", 0)
        keys = [new_key(now) for now in instants]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)  # FIFO, never repeated
        per_salt[salt] = set(keys)
    assert not per_salt[5] & per_salt[6]


def test_two_depots_in_threads_share_one_database(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, **DELIVERY_DEPOT)
    first = Depot(settings)
    second = Depot(settings, db=first.db())
    replies: list[str] = []
    lock = threading.Lock()

    def work(one: Depot, offset: int) -> None:
        for n in range(offset, offset + 40):
            outcome = one.deliver("s@x", ["rcpt@a.example"], message(n), now=T0 + n)[0]
            with lock:
                replies.append(outcome.reply[:9])

    try:
        threads = [
            threading.Thread(target=work, args=(first, 0)),
            threading.Thread(target=work, args=(second, 1000)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert replies == ["250 2.0.0"] * 80
        assert len(stored(first.db())) == 80
    finally:
        second.close()
        first.close()


WRITER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from postoffice.config import load
    from postoffice.deliver import Depot

    config, tag, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    depot = Depot(load(config))
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    for n in range(count):
        raw = (
            f"From: s@outside.example\\r\\nTo: rcpt@a.example\\r\\n"
            f"Message-Id: <{tag}-{n}@outside.example>\\r\\n\\r\\nbody\\r\\n"
        ).encode()
        (outcome,) = depot.deliver("s@outside.example", ["rcpt@a.example"], raw)
        print(json.dumps([f"<{tag}-{n}@outside.example>", outcome.reply, outcome.queue_key]))
    depot.close()
    """
)


class ZeoServer:
    """A real ZEO server process (runzeo) on a unix socket, serving ``folder/zeo.fs``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket_dir = folder
        if sockets.too_long(folder / "zeo.sock"):
            self.socket_dir = Path(tempfile.mkdtemp(prefix="po-zeo-", dir="/tmp"))
        self.socket = self.socket_dir / "zeo.sock"
        self.log = folder / "zeo.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ZEO.runzeo",
                    "-a",
                    str(self.socket),
                    "-f",
                    str(folder / "zeo.fs"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"runzeo did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def uri(self, wait_timeout: int) -> str:
        return f"zeo://{self.socket}?wait_timeout={wait_timeout}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.socket_dir != self.folder:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.mark.integration
def test_two_writer_processes_through_zeo_never_collide(tmp_path: Path) -> None:
    server = ZeoServer(tmp_path)
    uri = server.uri(wait_timeout=20)
    try:
        config = write_config(tmp_path, zodb_uri=uri, **DELIVERY_DEPOT | {"max_message_size": "1m"})
        setup = Depot(loads(config.read_text(), config))
        setup.prepare()
        setup.close()

        go = tmp_path / "go"
        count = 100
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(config), tag, str(count), str(go)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=tmp_path,
            )
            for tag in ("one", "two")
        ]
        go.touch()
        results: dict[str, tuple[str, int]] = {}
        for writer in writers:
            out, err = writer.communicate(timeout=120)
            assert writer.returncode == 0, err.decode(errors="replace")[-3000:]
            for line in out.decode().splitlines():
                message_id, reply, key = json.loads(line)
                results[message_id] = (reply, key)

        assert len(results) == 2 * count
        assert all(reply.startswith("250 2.0.0") for reply, _key in results.values())
        keys = {key for _reply, key in results.values()}
        assert len(keys) == 2 * count

        with open_queue(uri, "A") as queue:
            in_queue = {key: ParsedMessage(raw).message_id for key, raw, _t in queue.messages()}
            assert len(queue) == 2 * count
        assert in_queue == {key: message_id for message_id, (_r, key) in results.items()}
        # Each writer's messages keep their order (FIFO per writer).
        for tag in ("one", "two"):
            mine = [results[f"<{tag}-{n}@outside.example>"][1] for n in range(count)]
            assert mine == sorted(mine)
    finally:
        server.stop()


# --- the error rows: dead letters and storage failures ------------------------------------


class Boom:
    """A filter with a bug: every call raises."""

    def __call__(self, message: ParsedMessage, recipient: str) -> str | None:
        raise RuntimeError("bug in a filter")


def test_error_while_deciding_keeps_a_dead_letter(
    tmp_path: Path, depot: Depot, caplog: pytest.LogCaptureFixture
) -> None:
    broken = dataclasses.replace(depot.settings, reject_filters=(Boom(),))
    depot.reload(broken)
    original = message()
    with caplog.at_level(logging.ERROR, logger="postoffice.deliver"):
        outcomes = depot.deliver("s@x", ["rcpt@a.example", "two@b.example"], original, now=T0)
    assert [o.reply[:9] for o in outcomes] == ["250 2.0.0", "250 2.0.0"]
    assert [exit_code(o.decision) for o in outcomes] == [0, 0]
    assert any(
        r.levelno == logging.ERROR and "dead letter" in r.getMessage() for r in caplog.records
    )
    depot.close()

    db = database.open_db(uri_for(tmp_path))
    try:
        connection = db.open()
        folder = find_folder(connection.root(), "/postoffice")
        (letter,) = list(folder.dead_letters.values())
        assert letter.data == original
        assert letter.sender == "s@x"
        assert tuple(letter.recipients) == ("rcpt@a.example", "two@b.example")
        assert "Traceback" in letter.error
        assert "RuntimeError: bug in a filter" in letter.error
        assert len(folder["A"]) == 0 and len(folder["B"]) == 0
        connection.close()
    finally:
        db.close()


def assert_all_deferred(outcomes: list[Outcome], count: int) -> None:
    assert len(outcomes) == count
    for outcome in outcomes:
        assert outcome.reply.startswith("451 4.3.0 "), outcome.reply
        assert exit_code(outcome.decision) == 75
        assert outcome.queue_key is None


def test_closed_database_defers_every_recipient(tmp_path: Path) -> None:
    db = database.open_db(uri_for(tmp_path))
    depot = Depot(settings_for(tmp_path, **DELIVERY_DEPOT), db=db)
    depot.prepare()
    db.close()
    rcpts = ["rcpt@a.example", "two@a.example", "x@unknown.example"]
    assert_all_deferred(depot.deliver("s@x", rcpts, message(), now=T0), 3)


def test_unreachable_zeo_server_defers_every_recipient(tmp_path: Path) -> None:
    uri = f"zeo://{tmp_path}/nobody.sock?wait_timeout=1"
    depot = Depot(settings_for(tmp_path, zodb_uri=uri, **DELIVERY_DEPOT))
    try:
        rcpts = ["rcpt@a.example", "two@b.example"]
        assert_all_deferred(depot.deliver("s@x", rcpts, message(), now=T0), 2)
    finally:
        depot.close()


def test_commit_failure_defers_and_stores_nothing(
    tmp_path: Path, depot: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fault strikes in the middle of the two-phase commit: the objects
    # were written to the storage's transaction buffer, the vote fails.
    def disk_full(self: object, transaction: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(ZODB.Connection.Connection, "tpc_vote", disk_full)
        outcomes = depot.deliver("s@x", ["rcpt@a.example", "two@a.example"], message(), now=T0)
    assert_all_deferred(outcomes, 2)
    # Postfix retries: this time it is stored, and the failed try left no trace
    # (no half-stored copy, no ledger entry making the retry a "duplicate").
    retry = depot.deliver("s@x", ["rcpt@a.example", "two@a.example"], message(), now=T0 + 60)
    assert codes(retry) == ["250 2.0.0", "250 2.0.0"]
    depot.close()
    assert len(stored(uri_for(tmp_path))) == 2


@pytest.mark.integration
def test_a_stopped_zeo_server_defers(tmp_path: Path) -> None:
    server = ZeoServer(tmp_path)
    uri = server.uri(wait_timeout=2)
    depot = Depot(settings_for(tmp_path, zodb_uri=uri, **DELIVERY_DEPOT))
    try:
        assert codes(depot.deliver("s@x", ["rcpt@a.example"], message(1), now=T0)) == ["250 2.0.0"]
        server.stop()
        assert_all_deferred(depot.deliver("s@x", ["rcpt@a.example"], message(2), now=T0 + 1), 1)
    finally:
        server.stop()
        depot.close()


def test_deliver_batch_commits_several_messages_together(depot: Depot) -> None:
    batch = [
        Delivery("s@x", ("rcpt@a.example",), message(1)),
        Delivery("s@x", ("rcpt@b.example", "nobody@unknown.example"), message(2)),
        Delivery("s@x", ("rcpt@a.example",), message(1)),  # duplicate of the first
    ]
    results = depot.deliver_batch(batch, now=T0)
    assert [codes(r) for r in results] == [
        ["250 2.0.0"],
        ["250 2.0.0", "550 5.1.1"],
        ["250 2.0.0"],
    ]
    assert results[2][0].queue_key is None
    assert len(stored(depot.db(), "A")) == 1
    assert len(stored(depot.db(), "B")) == 1
