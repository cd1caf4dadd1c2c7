"""Mail kept aside in the queues folder: the review area, and recent mail kept for replay.

The review area holds messages a refusal was turned into a discard for, for a person.

``[post office] discard`` answers 250 where a rule would refuse (so that
Postfix bounces nobody) and keeps the message here instead of in an
application's queue.  It is a quarantine of its own, held by the queues
folder, not a queue: no application pops it, ``reconcile`` never touches
it, and ``postoffice review`` lists it, shows, requeues and deletes.

Two attributes of the ``QueuesFolder``, made at the first use (a folder
written before has neither, and reads as an empty review area):

- ``review``: ``LOBTree`` id -> ``QuarantineRecord``, oldest first; each
  record's ``error`` is the refusal it replaced (``550 5.7.1 rejected:
  ...``), ``rule`` the rule's name, ``queue`` the queue the rule had found
  (None for no queue);
- ``review_count``: ``Length``, how many.

With ``[post office] replay_keep = N``, ``recent`` and ``recent_count``
hold, the same way, a copy of each of the last N deliveries (one per
recipient, whatever was decided; ``error`` is then the reply), so that
``postoffice replay`` can decide again mail that was refused, discarded or
consumed.

The bytes are kept as a queue keeps them, the envelope lines
(``Return-Path``, ``X-Original-To``, ``X-Postoffice-Date``) on top.
"""

from __future__ import annotations

from collections.abc import Iterator

from BTrees.Length import Length
from BTrees.LOBTree import LOBTree
from ZODB.blob import Blob

from postoffice.store.quarantine import Quarantine
from postoffice.store.records import QuarantineRecord


class KeptArea:
    """Messages kept aside, over a tree and a counter of the folder (bounded, oldest dropped)."""

    def __init__(self, records: LOBTree, length: Length) -> None:
        self._kept = Quarantine(records, length)
        self._records = records

    def add(
        self,
        raw: bytes | Blob,
        rule: str,
        queue: str | None,
        refusal: str,
        now: float,
        keep: int,
    ) -> tuple[int, int]:
        """Keep one message (its bytes, or a blob); its id and how many of the oldest made room."""
        if isinstance(raw, Blob):
            record = QuarantineRecord(None, refusal, now)
            record.blob = raw
        else:
            record = QuarantineRecord(raw, refusal, now)
        record.rule = rule
        record.queue = queue
        key = self._kept.add(record, None, now)
        dropped = 0
        while self._kept.count() > max(1, keep) and len(self._records) > 1:
            self._kept.remove(self._records.minKey())
            dropped += 1
        return key, dropped

    def items(self) -> Iterator[tuple[int, QuarantineRecord]]:
        """(id, record), oldest first."""
        return self._kept.items()

    def get(self, key: int) -> QuarantineRecord:
        """The record of an id; KeyError when there is none."""
        return self._kept.get(key)

    def remove(self, key: int) -> QuarantineRecord:
        return self._kept.remove(key)

    def count(self) -> int:
        return self._kept.count()

    def __contains__(self, key: object) -> bool:
        return key in self._kept
