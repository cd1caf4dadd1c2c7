"""The consumer loop, written once: pops in batches, conflicts retried, failures quarantined.

Through a ZEO server or a database server, a commit is a round trip to
another process and most of what a pop costs, so a consumer that commits
once a message cannot keep up with one ``serve`` at full pace on the same
host (measured in bench's drain part).  :func:`consume` commits what it
popped together, up to ``per_commit`` messages: when the consumer keeps
up, a batch is the one or two messages that are there, so nothing waits
for a batch to fill; when mail piles up, batches grow and the commits per
message shrink, until it has caught up.

A batch is all or nothing.  When ``process`` fails on one message, the
whole batch is undone, and its messages are done again one at a time, so
that only the failing one goes to the quarantine; everything ``process``
did for the others must therefore be undone by the abort (written in the
same ZODB transaction, in this database or another one that joins it) or
be safe to do twice.  ``per_commit=1`` is the one-commit-a-message loop.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import transaction
from transaction.interfaces import TransientError

from postoffice.errors import QueueEmpty, UnreadableMessage
from postoffice.store import Queue
from postoffice.store.queue import Send
from postoffice.store.stored import StoredMessage

# Measured in bench's drain part, two consumers beside one serve at
# 1 KiB x 16 sessions through its ZEO server: one a commit left 57% of the
# load queued when it ended, 10 a commit up to 0.4% (28% in a run where
# they polled every 2 ms), 50 nothing.
PER_COMMIT = 50


@dataclass(frozen=True)
class Consumed:
    """What one :func:`consume` call did.

    ``retried`` counts the transactions aborted on a ``TransientError`` (a
    conflict, ZEO's ``ClientDisconnected`` while ``serve`` restarts) and
    done again; their messages came back and were counted once, when they
    were finally processed.
    """

    processed: int = 0
    quarantined: int = 0
    commits: int = 0
    retried: int = 0


@dataclass
class _Tally:
    processed: int = 0
    quarantined: int = 0
    commits: int = 0
    retried: int = 0

    def result(self) -> Consumed:
        return Consumed(self.processed, self.quarantined, self.commits, self.retried)


def consume(
    queue: Queue,
    process: Callable[[StoredMessage], object],
    *,
    per_commit: int = PER_COMMIT,
    send: Send | None = None,
    notice_from: str | None = None,
) -> Consumed:
    """Process every message waiting in ``queue``, oldest first, each once; return the counts.

    ``process(message)`` gets the message ``pop_next()`` returns. It must
    not commit or abort: ``consume`` commits up to ``per_commit`` messages
    at once, through the transaction manager of the queue's connection. An
    exception from it quarantines that message (with a notice to the
    sender through ``send`` when one is given, from ``notice_from``); a
    ``TransientError`` aborts and tries again instead; a message whose
    stored bytes cannot be read is quarantined without a notice.

    Returns when the queue is empty as this connection sees it (mail
    delivered since shows up after the next ``transaction.abort()``, see
    docs/consumers.md). Anything else raised (``KeyboardInterrupt``, an
    error of the database) aborts the open transaction, so what was popped
    and not committed comes back, and is raised as it is.
    """
    if per_commit < 1:
        raise ValueError(f"per_commit must be at least 1, not {per_commit!r}")
    if send is not None and notice_from is None:
        raise ValueError("notice_from is required when send is given")
    loop = _Loop(queue, process, per_commit, send, notice_from)
    try:
        loop.run()
    except BaseException:
        loop.manager.abort()
        raise
    return loop.tally.result()


class _Loop:
    def __init__(
        self,
        queue: Queue,
        process: Callable[[StoredMessage], object],
        per_commit: int,
        send: Send | None,
        notice_from: str | None,
    ) -> None:
        self.queue = queue
        self.process = process
        self.per_commit = per_commit
        self.send = send
        self.notice_from = notice_from
        jar = queue._p_jar
        self.manager: Any = transaction.manager if jar is None else jar.transaction_manager
        self.tally = _Tally()

    def run(self) -> None:
        while self.queue:
            try:
                popped, unreadable = self._pop_some()
            except TransientError:
                self._retry()
                continue
            if not popped and not unreadable:
                self.manager.abort()  # what len() counted is held by other consumers
                return
            try:
                for message in popped:
                    self.process(message)
                self.manager.commit()
            except TransientError:
                self._retry()
                continue
            except Exception:
                self.manager.abort()  # all of them come back, oldest first
                self._one_at_a_time(len(popped) + unreadable)
                continue
            self.tally.processed += len(popped)
            self.tally.quarantined += unreadable
            self.tally.commits += 1

    def _pop_some(self) -> tuple[list[StoredMessage], int]:
        """Up to ``per_commit`` messages, fewer when fewer wait; unreadable ones quarantined."""
        popped: list[StoredMessage] = []
        unreadable = 0
        while len(popped) + unreadable < self.per_commit:
            try:
                # Claimed with the rest of the batch at once (Queue._pop).
                popped.append(self.queue._pop(self.per_commit - len(popped) - unreadable))
            except QueueEmpty:
                break
            except UnreadableMessage as error:
                # Its bytes read the same way at every try: a person must look.
                self.queue.quarantine(error.message, error)
                unreadable += 1
        return popped, unreadable

    def _one_at_a_time(self, count: int) -> None:
        """After a failed batch: its messages again, each in its own commit."""
        for _ in range(count):
            try:
                message = self.queue.pop_next()
            except QueueEmpty:
                self.manager.abort()
                return
            except TransientError:
                self._retry()
                continue
            except UnreadableMessage as error:
                self._quarantine(error.message, error, notify=False)
                continue
            try:
                self.process(message)
                self.manager.commit()
            except TransientError:
                self._retry()
                continue
            except Exception:
                error_info = sys.exc_info()
                self.manager.abort()  # undo what process() wrote
                self._quarantine(message, error_info, notify=True)
                continue
            self.tally.processed += 1
            self.tally.commits += 1

    def _quarantine(self, message: StoredMessage, error: Any, notify: bool) -> None:
        send = self.send if notify else None
        self.queue.quarantine(
            message, error, send=send, notice_from=self.notice_from if send else None
        )
        try:
            self.manager.commit()
        except TransientError:
            self._retry()  # it comes back, and fails again
            return
        self.tally.quarantined += 1
        self.tally.commits += 1

    def _retry(self) -> None:
        self.manager.abort()
        self.tally.retried += 1
