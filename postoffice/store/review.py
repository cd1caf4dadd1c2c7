"""Mail kept aside in the queues folder: the review area, and recent mail kept for replay.

The review area holds messages a refusal was turned into a discard for, for a person.

``[post office] discard`` answers 250 where a rule would refuse (so that
Postfix bounces nobody) and keeps the message here instead of in an
application's queue.  It is a quarantine of its own, held by the queues
folder, not a queue: no application pops it, ``reconcile`` never touches
it, and ``postoffice review`` lists it, shows, requeues and deletes.

Attributes of the ``QueuesFolder``, made at the first use (a folder
written before has none, and reads as an empty review area):

- ``review_lanes``: a tuple of ``LANES`` pairs (``LOBTree`` id ->
  ``QuarantineRecord``, oldest first; ``Length``, how many), one for each
  lane of writers, as a queue's messages are kept: a process adds to the
  lane of its key salt (``records.own_lane``), so that two serves that
  keep messages at once do not write the same tree.  Each record's
  ``error`` is the refusal it replaced (``550 5.7.1 rejected: ...``),
  ``rule`` the rule's name, ``queue`` the queue the rule had found (None
  for no queue);
- ``review`` and ``review_count``: the one such pair of the releases
  before lanes, still read, listed and emptied, never added to.

Ids are the keys of the records: arrival times with the salt of the
process that kept them in their low bits, so the lanes together list in
arrival order, and an id names its lane.  The bound (``review_max``) is
on all lanes together; to make room a process drops the oldest record of
its own lane, or of a lane older than all of its own (a lane whose
writer is gone), never the newest ones of a lane another process writes.

With ``[post office] replay_keep = N``, ``recent_lanes``, with ``recent``
and ``recent_count`` before lanes, hold, the same way, a copy of each of
the last N deliveries (one per recipient, whatever was decided; ``error``
is then the reply), so that ``postoffice replay`` can decide again mail
that was refused, discarded or consumed.

The bytes are kept as a queue keeps them, the envelope lines
(``Return-Path``, ``X-Original-To``, ``X-Postoffice-Date``) on top.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

from BTrees.Length import Length
from BTrees.LOBTree import LOBTree
from ZODB.blob import Blob

from postoffice.store.quarantine import Quarantine
from postoffice.store.records import LANES, Laned, QuarantineRecord

# One lane of an area: its records and their count.
Lane = tuple[LOBTree, Length]


def new_lanes() -> tuple[Lane, ...]:
    """The empty lanes of an area (made with it, or at the upgrade of one written before)."""
    return tuple((LOBTree(), Length()) for _ in range(LANES))


class KeptArea:
    """Messages kept aside, over the folder's trees and counters (bounded, oldest dropped)."""

    def __init__(self, legacy: Lane, lanes: Sequence[Lane] | None) -> None:
        # lanes None: an area written before lanes, until serve's start gives it them.
        self._parts = Laned(Quarantine(*legacy), [Quarantine(*lane) for lane in lanes or ()])

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
        own = self._parts.own()
        key = own.add(record, None, now)
        dropped = 0
        excess = self.count() - max(1, keep)
        while dropped < excess:
            chosen = self._to_drop(own, key)
            if chosen is None:
                break
            lane, oldest = chosen
            lane.remove(oldest)
            dropped += 1
        return key, dropped

    def _to_drop(self, own: Quarantine, newest: int) -> tuple[Quarantine, int] | None:
        """The lane and id of the record that goes: a gone writer's oldest, else our own oldest.

        A lane whose newest record is older than all of this process's is
        one nobody writes any more (or the area before lanes): its oldest
        goes first.  Else the oldest of the own lane, but never the record
        just kept.  Never another live writer's: both would drop the same
        record at once, and conflict.
        """
        mine = own.oldest()
        assert mine is not None  # the own lane holds the record just kept
        older = [
            (first, lane)
            for lane in self._parts.all()
            if lane is not own
            and (last := lane.newest()) is not None
            and last < mine
            and (first := lane.oldest()) is not None
        ]
        if older:
            first, lane = min(older, key=lambda pair: pair[0])
            return lane, first
        return (own, mine) if mine != newest else None

    def items(self) -> Iterator[tuple[int, QuarantineRecord]]:
        """(id, record), oldest first, across the lanes."""
        return heapq.merge(*(lane.items() for lane in self._parts.all()), key=lambda item: item[0])

    def _holding(self, key: int) -> Quarantine:
        """The lane that holds an id (its writer's, by its low bits); KeyError if none does."""
        lane = self._parts.holding(int(key))
        if lane is None:
            raise KeyError(key)
        return lane

    def get(self, key: int) -> QuarantineRecord:
        """The record of an id; KeyError when there is none."""
        return self._holding(key).get(key)

    def remove(self, key: int) -> QuarantineRecord:
        return self._holding(key).remove(key)

    def count(self) -> int:
        return sum(lane.count() for lane in self._parts.all())

    def __contains__(self, key: object) -> bool:
        try:
            self._holding(int(key))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError):
            return False
        return True
