"""The consumer API, as an application uses it.

Real FileStorage with blobs in ``tmp_path``; messages put in with
``Depot.deliver`` as the LMTP server does.  ``send`` is a plain function
that records what it is given (any callable is a valid ``send``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import transaction
import ZODB
from persistent.list import PersistentList
from ZODB.FileStorage import FileStorage

from postoffice import Queue, QueueEmpty, find_queue, open_queue
from postoffice.api import Closer
from postoffice.database import open_db
from postoffice.deliver import Depot
from postoffice.store import find_folder
from tests.helpers import Outbox, message, python_corpus, settings_for, uri_for


@pytest.fixture
def depot(tmp_path: Path) -> Iterator[Depot]:
    one = Depot(settings_for(tmp_path))
    one.prepare()
    yield one
    one.close()


def deliver(depot: Depot, raw: bytes) -> int:
    (outcome,) = depot.deliver("sender@outside.example", ["rcpt@a.example"], raw)
    assert outcome.reply.startswith("250 2.0.0") and outcome.queue_key, outcome.reply
    return outcome.queue_key


def reopen_ok(tmp_path: Path) -> None:
    """The FileStorage lock is free: nobody left it open."""
    FileStorage(str(tmp_path / "Data.fs")).close()


def open_connections(db: ZODB.DB) -> list[dict[str, Any]]:
    return [info for info in db.connectionDebugInfo() if info["opened"]]


# --- open_queue and find_queue -----------------------------------------------------------


def test_open_queue_old_form_returns_queue_and_a_closer_that_releases_the_file(
    tmp_path: Path, depot: Depot
) -> None:
    deliver(depot, message(1))
    depot.close()
    queue, closer = open_queue(uri_for(tmp_path), "A")
    assert isinstance(queue, Queue) and isinstance(closer, Closer)
    assert len(queue) == 1
    closer()
    reopen_ok(tmp_path)
    closer()  # twice is harmless


def test_open_queue_with_form_closes_at_the_end_of_the_block(tmp_path: Path, depot: Depot) -> None:
    deliver(depot, message(1))
    depot.close()
    with open_queue(uri_for(tmp_path), "A") as queue:
        assert queue.pop_next()["Subject"] == "number 1"
        transaction.commit()
    reopen_ok(tmp_path)


def test_open_queue_with_an_open_db_leaves_it_open(tmp_path: Path, depot: Depot) -> None:
    deliver(depot, message(1))
    db = depot.db()
    with open_queue(db, "A") as queue:
        assert len(queue) == 1
    assert open_connections(db) == []
    connection = db.open()  # still usable: open_queue did not close it
    assert len(find_queue(connection.root(), "A")) == 1
    connection.close()


def test_unknown_queue_names_the_known_ones_and_leaves_nothing_open(
    tmp_path: Path, depot: Depot
) -> None:
    depot.close()
    with pytest.raises(KeyError) as raised:
        open_queue(uri_for(tmp_path), "Nope")
    text = str(raised.value)
    assert "'Nope'" in text and "'A'" in text and "'B'" in text
    reopen_ok(tmp_path)  # the database it opened is closed again

    db = open_db(uri_for(tmp_path))
    try:
        with pytest.raises(KeyError, match="Nope"):
            open_queue(db, "Nope")
        assert open_connections(db) == []
    finally:
        db.close()


def test_unknown_queue_does_not_abort_the_callers_transaction(tmp_path: Path, depot: Depot) -> None:
    """A failed open_queue must not throw away work the caller has under way."""
    with open_queue(depot.db(), "A") as queue:
        queue.add(message(5))  # uncommitted work in the thread's transaction
        with pytest.raises(KeyError):
            open_queue(depot.db(), "Nope")
        transaction.commit()
    with open_queue(depot.db(), "A") as queue:
        assert len(queue) == 1


def test_find_queue_takes_a_root_a_connection_or_a_folder(depot: Depot) -> None:
    connection = depot.db().open()
    try:
        root = connection.root()
        by_root = find_queue(root, "A")
        assert find_queue(connection, "A") is by_root
        assert find_queue(find_folder(root, "/postoffice"), "A") is by_root
        with pytest.raises(KeyError, match="known queues: 'A', 'B'"):
            find_queue(root, "C")
        with pytest.raises(KeyError, match="/elsewhere"):
            find_queue(root, "A", path="/elsewhere")
    finally:
        connection.close()


def test_the_old_form_closes_its_database_when_the_closer_is_dropped(
    tmp_path: Path, depot: Depot
) -> None:
    """As 0.25's closer did in ``__del__``: a script that forgets ``closer()`` frees the file."""
    deliver(depot, message(1))
    depot.close()
    queue, closer = open_queue(uri_for(tmp_path), "A")
    assert len(queue) == 1
    storage = queue._p_jar.db().storage
    del queue, closer
    gc.collect()
    assert storage._file.closed  # closed, not only unreachable
    reopen_ok(tmp_path)


def test_a_dropped_closer_leaves_a_db_the_caller_passed_open(depot: Depot) -> None:
    deliver(depot, message(1))
    db = depot.db()
    queue, closer = open_queue(db, "A")
    assert len(queue) == 1
    del queue, closer
    gc.collect()
    assert open_connections(db) == []
    with open_queue(db, "A") as queue:  # the database is still open
        assert len(queue) == 1


def test_the_queues_folder_is_a_full_mapping_of_queues(depot: Depot) -> None:
    connection = depot.db().open()
    try:
        folder = find_folder(connection.root(), "/postoffice")
        assert folder.keys() == ["A", "B"] and list(folder) == ["A", "B"]
        assert folder.values() == [folder["A"], folder["B"]]
        assert folder.items() == [("A", folder["A"]), ("B", folder["B"])]
        assert folder.get("C") is None and folder.get("C", 5) == 5
        folder["C"] = Queue()
        assert "C" in folder and len(folder) == 3
        with pytest.raises(TypeError):
            folder["D"] = PersistentList()
        del folder["C"]
        assert "C" not in folder
        with pytest.raises(KeyError):
            del folder["C"]
        transaction.abort()
    finally:
        connection.close()


OLD_APPLICATION = """
import datetime, sys
import transaction
from postoffice import open_queue

queue, closer = open_queue(sys.argv[1], "A")
now = datetime.datetime.now()
while len(queue):
    message = queue.pop_next()
    user = message["From"]
    queue.collect_frequency_data(message, headers=["To"])
    headers = {"To": message["To"]}
    soon = now + datetime.timedelta(seconds=30)
    print("instant", queue.get_instantaneous_frequency(user, soon, headers) > 0)
    print("average", queue.get_average_frequency(user, now, datetime.timedelta(minutes=5), headers))
    queue.throttle(user, now + datetime.timedelta(minutes=10), headers)
    print("throttled", queue.is_throttled(user, now, headers), queue.is_throttled(user, now))
    print("other", queue.is_throttled("someone@else.example", now))
    try:
        raise ValueError("cannot handle " + message["Subject"])
    except ValueError:
        queue.quarantine(message, sys.exc_info())
    transaction.commit()
# A sender this queue never saw: no throttle state yet.
queue.throttle("Fresh <fresh@outside.example>", now + datetime.timedelta(minutes=10))
transaction.commit()
for message, error in queue.get_quarantined_messages():
    again = queue.get_quarantined_message(message["X-Postoffice-Id"])
    print("quarantined", again["Subject"], error.strip().splitlines()[-1])
    queue.remove_from_quarantine(again)
transaction.commit()
print("left", len(queue), queue.count_quarantined_messages())
closer()
"""


def test_an_old_application_script_runs_and_deliveries_still_get_250_or_550(
    tmp_path: Path,
) -> None:
    """A consumer written for 0.25, run as it runs: a process of its own.

    Datetimes, timedeltas and header dicts, ``queue, closer = open_queue(...)``,
    quarantined messages found by their ``X-Postoffice-Id``; afterwards the
    loop throttle of the depot still decides 250 or 550, never 451.
    """
    settings = settings_for(tmp_path, ooo_loop_frequency=1, ooo_loop_headers="To")
    depot = Depot(settings)
    depot.prepare()
    try:
        (outcome,) = depot.deliver("s@outside.example", ["rcpt@a.example"], message(1))
        assert outcome.reply.startswith("250 "), outcome.reply
    finally:
        depot.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    script = tmp_path / "old_application.py"
    script.write_text(OLD_APPLICATION)
    result = subprocess.run(
        [sys.executable, str(script), uri_for(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "instant True",
        "average 0.4",  # the delivery and the script's own count
        "throttled True True",
        "other False",
        "quarantined number 1 ValueError: cannot handle number 1",
        "left 0 0",
    ], result.stderr
    depot = Depot(settings)
    try:
        # The sender the script throttled, to the same To: refused, not deferred.
        (refused,) = depot.deliver("s@outside.example", ["rcpt@a.example"], message(2))
        assert refused.reply.startswith("550 5.7.1"), refused.reply
        # The sender throttled before it had any state: refused.
        fresh = message(4, sender="fresh@outside.example")
        (refused,) = depot.deliver("f@outside.example", ["rcpt@a.example"], fresh)
        assert refused.reply.startswith("550 5.7.1"), refused.reply
        # Another sender: queued.
        other = message(3, sender="other@outside.example")
        (queued,) = depot.deliver("o@outside.example", ["rcpt@a.example"], other)
        assert queued.reply.startswith("250 2.0.0"), queued.reply
    finally:
        depot.close()


# --- what a consumer reads ------------------------------------------------------------------


def test_messages_read_back_as_the_stored_bytes_with_decoded_headers(depot: Depot) -> None:
    raw = message(1, subject="=?utf-8?q?Caf=C3=A9_cr=C3=A8me?=")
    deliver(depot, raw)
    with open_queue(depot.db(), "A") as queue:
        (stored,) = [r for _k, r, _t in queue.messages()]
        popped = queue.pop_next()
        transaction.commit()
    assert stored.endswith(raw)
    assert popped.as_bytes() == stored
    assert bytes(popped) == stored
    assert popped["Subject"] == "Café crème"
    assert popped["X-Original-To"] == "rcpt@a.example"
    assert popped.get_content().rstrip() == "Body 1."


@pytest.mark.skipif(not python_corpus(), reason="no email test corpus in this Python")
def test_every_corpus_message_reads_back_byte_for_byte(depot: Depot) -> None:
    """email's own generator would refold headers and rewrite boundaries: ours must not."""
    db = depot.db()
    originals = [path.read_bytes() for path in python_corpus()]
    with open_queue(db, "A") as queue:
        for raw in originals:
            queue.add(raw)
        transaction.commit()
        popped = [queue.pop_next().as_bytes() for _ in originals]
        transaction.commit()
    assert popped == originals


def test_a_changed_message_is_generated_again(depot: Depot) -> None:
    deliver(depot, message(1))
    with open_queue(depot.db(), "A") as queue:
        popped = queue.pop_next()
        transaction.abort()
    popped["X-Seen-By"] = "app"
    assert b"X-Seen-By: app" in popped.as_bytes()
    del popped["X-Seen-By"]
    popped.set_content("Other body.\n")
    assert b"Other body." in popped.as_bytes()


def test_fifo_across_deliveries(depot: Depot) -> None:
    for number in range(5):
        deliver(depot, message(number))
    with open_queue(depot.db(), "A") as queue:
        subjects = [queue.pop_next()["Subject"] for _ in range(5)]
        with pytest.raises(QueueEmpty):
            queue.pop_next()
        transaction.commit()
    assert subjects == [f"number {n}" for n in range(5)]


# --- the documented loop --------------------------------------------------------------------


def test_the_spec_loop_quarantines_a_failure_and_consumes_the_rest(
    tmp_path: Path, depot: Depot
) -> None:
    for number in range(4):
        deliver(depot, message(number, subject="poison" if number == 1 else f"number {number}"))
    depot.close()
    processed = []

    def process(message: Message) -> None:
        if message["Subject"] == "poison":
            raise RuntimeError("cannot digest " + message["Message-Id"])
        processed.append(message["Subject"])

    with open_queue(uri_for(tmp_path), "A") as queue:
        rounds = 0
        while queue:
            rounds += 1
            assert rounds <= 10, "the failing message came back into the queue"
            message_ = queue.pop_next()
            try:
                process(message_)
                transaction.commit()
            except Exception:
                transaction.abort()
                queue.quarantine(message_, sys.exc_info())
                transaction.commit()
        assert len(queue) == 0
    assert processed == ["number 0", "number 2", "number 3"]

    with open_queue(uri_for(tmp_path), "A") as queue:  # from disk
        assert len(queue) == 0 and list(queue.messages()) == []
        assert queue.count_quarantined_messages() == 1
        ((kept, error),) = list(queue.get_quarantined_messages())
        assert kept["Subject"] == "poison"
        assert "RuntimeError: cannot digest <1@outside.example>" in error
        assert "Traceback" in error


def test_the_batched_loop_of_the_docs_does_every_message_once_and_quarantines_a_failure(
    tmp_path: Path, depot: Depot
) -> None:
    """docs/consumers.md: ten pops a commit, one at a time again after a failure."""
    for number in range(25):
        deliver(depot, message(number, subject="poison" if number == 13 else f"number {number}"))
    depot.close()
    with open_queue(uri_for(tmp_path), "A") as queue:
        root = queue._p_jar.root()
        root["processed"] = processed = PersistentList()  # the application's own state
        transaction.commit()

        def process(message: Message) -> None:
            if message["Subject"] == "poison":
                raise RuntimeError("cannot digest " + message["Message-Id"])
            processed.append(message["Subject"])

        def consume_one() -> None:
            message = queue.pop_next()
            try:
                process(message)
                transaction.commit()
            except Exception:
                transaction.abort()
                queue.quarantine(message, sys.exc_info())
                transaction.commit()

        commits = 0
        while queue:
            commits += 1
            assert commits <= 20
            popped = []
            with contextlib.suppress(QueueEmpty):
                while len(popped) < 10:
                    popped.append(queue.pop_next())
            try:
                for message_ in popped:
                    process(message_)
                transaction.commit()
            except Exception:
                transaction.abort()  # the whole batch comes back, oldest first
                for _message in popped:
                    consume_one()
        assert len(queue) == 0
    # The batch that met the failure was undone and done again: no message twice.
    assert list(processed) == [f"number {n}" for n in range(25) if n != 13]
    with open_queue(uri_for(tmp_path), "A") as queue:
        assert len(queue) == 0 and list(queue.messages()) == []
        ((kept, _error),) = list(queue.get_quarantined_messages())
        assert kept["Subject"] == "poison"


# --- quarantine -----------------------------------------------------------------------------


def test_quarantine_keeps_error_text_and_can_be_read_removed_and_requeued(
    tmp_path: Path, depot: Depot
) -> None:
    for number in range(3):
        deliver(depot, message(number))
    depot.close()
    with open_queue(uri_for(tmp_path), "A") as queue:
        first, second = queue.pop_next(), queue.pop_next()
        first_bytes = first.as_bytes()
        first_id = queue.quarantine(first, "broken one")
        second_id = queue.quarantine(second, ValueError("broken two"))
        transaction.commit()
        assert queue.count_quarantined_messages() == 2
        assert len(queue) == 1
        assert queue.get_quarantined_message(first_id)["Subject"] == "number 0"
        # The bytes as stored, under the id header that 0.25's quarantine added.
        assert queue.get_quarantined_message(first_id).as_bytes() == (
            f"X-Postoffice-Id: {first_id}\r\n".encode() + first_bytes
        )
        errors = {m["Subject"]: e for m, e in queue.get_quarantined_messages()}
        assert errors["number 0"] == "broken one"
        assert "ValueError: broken two" in errors["number 1"]
        with pytest.raises(KeyError):
            queue.get_quarantined_message(12345)

        queue.remove_from_quarantine(first)  # the message object itself, as the old API
        transaction.commit()
        with pytest.raises(ValueError):
            queue.remove_from_quarantine(first)
        with pytest.raises(ValueError):
            queue.remove_from_quarantine(queue.get_quarantined_message(second_id).__class__())
        assert queue.count_quarantined_messages() == 1

        assert queue.requeue_quarantined_messages() == 1
        transaction.commit()
        assert queue.count_quarantined_messages() == 0
        assert len(queue) == 2
        # Requeued at the tail.
        assert [queue.pop_next()["Subject"] for _ in range(2)] == ["number 2", "number 1"]
        transaction.commit()


def test_quarantine_with_send_needs_notice_from(depot: Depot) -> None:
    deliver(depot, message(1))
    with open_queue(depot.db(), "A") as queue:
        popped = queue.pop_next()
        with pytest.raises(ValueError, match="notice_from"):
            queue.quarantine(popped, "broken", send=Outbox())
        transaction.abort()


def test_quarantine_notice_is_sent_after_commit_only(depot: Depot) -> None:
    deliver(depot, message(1))
    deliver(depot, message(2))
    outbox = Outbox()
    with open_queue(depot.db(), "A") as queue:
        popped = queue.pop_next()
        queue.quarantine(popped, "broken", send=outbox, notice_from="app@a.example")
        assert outbox.sent == []
        transaction.abort()  # decided, then undone: no notice
        assert outbox.sent == []
        assert len(queue) == 2
        popped = queue.pop_next()
        queue.quarantine(popped, "broken", send=outbox, notice_from="App <app@a.example>")
        transaction.commit()
    ((from_addr, to_addrs, notice),) = outbox.sent
    assert from_addr == "App <app@a.example>"
    assert to_addrs == ["sender@outside.example"]
    assert notice["X-Postoffice"] == "Bounced"
    assert notice["Auto-Submitted"] == "auto-replied"
    assert notice["To"] == "sender@outside.example"
    assert "number 1" not in notice["Subject"]
    assert "rcpt@a.example" in notice["Subject"]


# --- bounce ------------------------------------------------------------------------------------


def test_bounce_refuses_both_a_reason_and_a_message(depot: Depot) -> None:
    deliver(depot, message(1))
    with open_queue(depot.db(), "A") as queue:
        popped = queue.pop_next()
        with pytest.raises(ValueError):
            queue.bounce(popped, Outbox(), "app@a.example", "why", Message())
        transaction.abort()


def test_bounce_is_sent_after_commit_marked_as_ours(depot: Depot) -> None:
    deliver(depot, message(1))
    outbox = Outbox()
    with open_queue(depot.db(), "A") as queue:
        popped = queue.pop_next()
        queue.bounce(popped, outbox, "bounces@a.example", bounce_reason="No such ticket.")
        assert outbox.sent == []
        transaction.commit()
    ((from_addr, to_addrs, bounce),) = outbox.sent
    assert from_addr == "bounces@a.example"
    assert to_addrs == ["sender@outside.example"]
    assert bounce["X-Postoffice"] == "Bounced"
    assert bounce["Auto-Submitted"] == "auto-replied"
    assert bounce["Subject"] == "Your message to rcpt@a.example has bounced."
    assert bounce["In-Reply-To"] == "<1@outside.example>"
    assert "No such ticket." in bounce.get_body(("plain",)).get_content()


def test_bounce_in_an_aborted_transaction_sends_nothing(depot: Depot) -> None:
    deliver(depot, message(1))
    outbox = Outbox()
    with open_queue(depot.db(), "A") as queue:
        popped = queue.pop_next()
        queue.bounce(popped, outbox, "bounces@a.example")
        transaction.abort()
        transaction.commit()  # a later commit does not send it either
    assert outbox.sent == []


def test_bounce_with_a_given_message_sends_it_marked(depot: Depot) -> None:
    deliver(depot, message(1))
    outbox = Outbox()
    custom = Message()
    custom["Subject"] = "We could not file your ticket"
    custom.set_payload("Sorry.")
    with open_queue(depot.db(), "A") as queue:
        queue.bounce(queue.pop_next(), outbox, "bounces@a.example", bounce_message=custom)
        transaction.commit()
    ((_from, _to, sent),) = outbox.sent
    assert sent["Subject"] == "We could not file your ticket"
    assert sent["X-Postoffice"] == "Bounced"
    assert sent["Auto-Submitted"] == "auto-replied"


def test_a_senders_headers_cannot_inject_headers_into_our_bounce_or_notice(
    depot: Depot,
) -> None:
    hostile = (
        b"From: =?utf-8?q?Eve=0D=0ABcc=3A_victim=40else=2Eexample?= <eve@outside.example>\r\n"
        b"To: =?utf-8?q?rcpt=40a=2Eexample=0D=0ABcc=3A_victim=40else=2Eexample?=\r\n"
        b"Message-Id: <9@outside.example>\r\n"
        b"Subject: =?utf-8?q?hi=0D=0ABcc=3A_victim=40else=2Eexample?=\r\n"
        b"\r\n"
        b"Body.\r\n"
    )
    deliver(depot, hostile)
    outbox = Outbox()
    with open_queue(depot.db(), "A") as queue:
        popped = queue.pop_next()
        assert "\n" in popped["Subject"]  # the decoded value really carries a line break
        queue.bounce(popped, outbox, "bounces@a.example")
        queue.quarantine(popped, "broken", send=outbox, notice_from="app@a.example")
        transaction.commit()
    assert len(outbox.sent) == 2
    for _from, to_addrs, sent in outbox.sent:
        assert to_addrs == ["eve@outside.example"]
        wire = sent.as_bytes()
        head = wire.split(b"\n\n", 1)[0]
        assert b"\nBcc:" not in head and not head.startswith(b"Bcc:")
        assert sent.get_all("Bcc") is None
        assert len(sent.get_all("Subject")) == 1
        assert "\n" not in sent["Subject"] and "\r" not in sent["Subject"]


def test_mail_delivered_meanwhile_shows_up_at_the_next_transaction(depot: Depot) -> None:
    """The documented poll: abort (or commit) between looks, and new mail is seen."""
    with open_queue(depot.db(), "A") as queue:
        assert not queue
        deliver(depot, message(1))  # the LMTP server's transaction, elsewhere
        assert not queue  # this transaction's snapshot predates it
        transaction.abort()
        assert len(queue) == 1
        assert queue.pop_next()["Subject"] == "number 1"
        transaction.commit()
