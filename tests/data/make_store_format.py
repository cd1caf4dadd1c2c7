"""Writes ``store-format.fs``: a depot as the code before the store package wrote it.

The fixture of ``tests/test_store_format.py``.  It was made with the
``postoffice`` of commit fea804e, the last one before ``postoffice/store.py``
became a package, so that the test reads data in the format that code
writes, not data the code under test wrote itself::

    git archive fea804e postoffice | tar -x -C /tmp/old
    cd /tmp && PYTHONPATH=/tmp/old python3 /path/to/tests/data/make_store_format.py OUT

(It uses that code's private names, ``store.clock`` and ``store._Claimer``;
it does not run against the package.)

It holds, in the queue ``A`` of ``/postoffice``: a consumed message (done,
its claim not cleaned up yet), two waiting ones, one claimed by a consumer
that vanished (its lease ended long ago), a quarantined one, a ledger entry,
a sender's arrival and a throttled sender; and one dead letter.  Every time
is ``T``, so the leases have long ended when the test reads it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from postoffice import store
from postoffice.store import find_folder, reconcile

T = 1_700_000_000.0


def message(number: int) -> bytes:
    return (
        "From: Sender <sender@outside.example>\r\n"
        "To: rcpt@a.example\r\n"
        f"Message-Id: <{number}@outside.example>\r\n"
        f"Subject: number {number}\r\n"
        "\r\n"
        f"Body {number}.\r\n"
    ).encode()


def main(out: Path) -> None:
    store.clock = lambda: T  # type: ignore[attr-defined]
    db = ZODB.DB(FileStorage(str(out)))
    try:
        with db.transaction() as connection:
            folder = find_folder(connection.root(), "/postoffice", create=True)
            reconcile(folder, ("A",))
            queue = folder["A"]
            for number in range(4):
                queue.store(message(number), T)
            queue.record_delivery("<1@outside.example>", "rcpt@a.example", T)
            queue.record_arrival("sender@outside.example", T, 240.0)
            queue.throttle("loop@outside.example", T + 100_000_000)
            queue.quarantine(store.stored_message(message(9)), "ValueError: broken")
            folder.add_dead_letter(
                message(8), "sender@outside.example", ("rcpt@a.example",), "Traceback", T, 10
            )
        consumer = db.open(transaction_manager=transaction.TransactionManager())
        queue = find_folder(consumer.root(), "/postoffice")["A"]
        assert queue.pop_next()["Subject"] == "number 0"
        consumer.transaction_manager.commit()
        consumer.close()
        # A consumer that vanished with message 3 claimed: nobody gives it back.
        claimer = store._Claimer(db)  # type: ignore[attr-defined]
        keys = sorted(queue._messages.keys())
        claimer.claim(queue._p_oid, [keys[3]])
        claimer.closed = True  # not given back at exit either
        db.pack(time.time())  # the file holds only the current records
    finally:
        db.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
