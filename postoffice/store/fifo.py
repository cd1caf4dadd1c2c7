"""A queue's messages and the claims on them: what is waiting, who holds what.

Five of the queue's attributes are this state, and only this part reads
or writes them:

- ``_lanes``: a tuple of ``LANES`` ``MessageTree``, key -> ``MessageRecord``:
  a process appends to the lane of its key salt (``records.lane_of``), so
  writers in different processes rarely write the same tree; the queue's
  FIFO is the lanes merged by key (arrival time);
- ``_messages``: ``MessageTree``, where releases before lanes appended
  every message: still read and consumed (merged with the lanes), never
  appended to;
- ``_length``: ``Length``, the messages waiting (not claimed by anybody);
- ``_holders``: ``LOBTree`` key -> (lease end, holder id) of claimed messages;
- ``_claims``: ``OOTreeSet`` of (lease end, key): the same claims by age,
  for leases that ran out and for cleaning up consumed records.

Consumed records (``done``) are removed from a lane by the process that
appends to it, as it appends (:meth:`Fifo.sweep`): it is the lane's only
writer, so removing them never conflicts with an append.  When consumers
removed them, in their claims, while they kept up with a ``serve``, the
removals emptied leaves under the node the serve's appends split, and
both sides retried: the serve 1.4-4.6% of its commits, the consumers a
third of theirs (bench's servers part).  Consumers still remove the
claims of records gone, and remove records themselves only where no
writer sweeps: from a lane nobody appended to for ``IDLE_LANE`` seconds
(the serve is idle, stopped, or restarted into another lane), from the
tree of before lanes, and from any lane once ``claims.SWEEP_BEHIND``
claims have piled up (a writer whose sweeps fall behind its consumers).

A :class:`Fifo` is a plain object over those trees, made afresh whenever
it is needed (``Queue.fifo``): the queue's pickled state stays the trees
themselves.  Claimers (``postoffice.store.claims``) write claims through
it in their own connection; consumers read it in theirs, and write only
``done`` of a record they hold, so a consumer's commit never conflicts
with a claim.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from BTrees.Length import Length
from BTrees.LOBTree import LOBTree
from BTrees.OOBTree import OOTreeSet
from ZODB.blob import Blob

from postoffice.errors import QueueEmpty
from postoffice.store.records import (
    LANES,
    PRUNE_BATCH,
    Laned,
    MessageRecord,
    MessageTree,
    new_key,
    newest_time,
    written_since,
)

# A writer sweeps its lane every SWEEP_EVERY appends (of this process),
# looking at up to SWEEP_LOOK claimed records at the head: it can remove
# four times as many consumed records as it appends.
SWEEP_EVERY = 16
SWEEP_LOOK = 64
# A lane whose newest message is older than this has no writer sweeping it
# now: consumers remove its consumed records themselves.
IDLE_LANE = 2.0
_appends = itertools.count()


def new_lanes() -> tuple[MessageTree, ...]:
    """The empty lanes of a new queue (or of one written before lanes, at its upgrade)."""
    return tuple(MessageTree() for _ in range(LANES))


def _first(item: tuple[int, MessageRecord]) -> int:
    return item[0]


class Fifo:
    """The FIFO and claims state of one queue, over the queue's own trees."""

    def __init__(
        self,
        lanes: Sequence[MessageTree] | None,
        messages: MessageTree,
        length: Length,
        holders: LOBTree,
        claims: OOTreeSet,
    ) -> None:
        # lanes None: a queue written before lanes, read as it is until its upgrade.
        self._trees = Laned(messages, lanes)
        self._length = length
        self._holders = holders
        self._claims = claims

    # -- the trees -----------------------------------------------------------------

    def items(self) -> Iterator[tuple[int, MessageRecord]]:
        """(key, record) of every record, in key (arrival) order, across the trees."""
        # The truth of a tree is O(1); empty lanes cost no iterator.
        trees = [tree for tree in self._trees.all() if tree]
        if len(trees) == 1:
            return iter(trees[0].items())
        return heapq.merge(*(tree.items() for tree in trees), key=_first)

    # -- adding and reading ------------------------------------------------------

    def append(self, raw: bytes | Blob, now: float, use_blob: bool) -> tuple[int, MessageRecord]:
        """A new waiting message at the tail of this process's lane; its key and record."""
        key = new_key(now)
        lane = self._trees.of_key(key)
        if lane is None:
            raise RuntimeError("a queue written before lanes is upgraded before it is appended to")
        record = MessageRecord(raw, now, use_blob)
        lane[key] = record
        self._length.change(1)
        if next(_appends) % SWEEP_EVERY == 0:
            self.sweep(lane)
        return key, record

    def sweep(self, lane: MessageTree, look: int = SWEEP_LOOK) -> int:
        """Remove consumed records at the head of the lane this process appends to; how many.

        Only claimed records can be consumed, so the look stops at the first
        unclaimed one (a waiting message, and mostly all after it wait too):
        with a backlog, a sweep costs one look at the claims.  The records
        it looks at are asked of the database at once (one ZEO round trip).
        """
        keys: list[int] = []
        for key in lane:
            if len(keys) >= look or self._holders.get(key) is None:
                break
            keys.append(key)
        if not keys:
            return 0
        records = [lane[key] for key in keys]
        jar = lane._p_jar
        if jar is not None:
            jar.prefetch(r for r in records if r._p_changed is None)
        removed = 0
        for key, record in zip(keys, records, strict=True):
            if record.done:
                del lane[key]
                removed += 1
        return removed

    def record(self, key: int) -> MessageRecord | None:
        lane = self._trees.of_key(key)
        record: MessageRecord | None = None if lane is None else lane.get(key)
        if record is None:
            record = self._trees.legacy.get(key)
        return record

    def holder_of(self, key: int) -> tuple[float, str] | None:
        """(lease end, holder) of the claim on a message, in this snapshot."""
        claim: tuple[float, str] | None = self._holders.get(key)
        return claim

    def is_waiting(self, key: int, record: MessageRecord, now: float) -> bool:
        """Poppable: not consumed, and not held by a consumer whose lease still runs."""
        if record.done:
            return False
        claim = self.holder_of(key)
        return claim is None or claim[0] <= now

    def waiting(self, now: float) -> Iterator[tuple[int, MessageRecord]]:
        """(key, record) of each poppable message, oldest first (read only)."""
        for key, record in self.items():
            if self.is_waiting(key, record, now):
                yield key, record

    def first_waiting(self, now: float, limit: int, jar: Any = None) -> list[int]:
        """Keys of the first ``limit`` poppable messages in this snapshot.

        Records not loaded yet are asked of ``jar`` a chunk at a time:
        through ZEO that is one round trip for the chunk instead of one per
        record.
        """
        found: list[int] = []
        items = self.items()
        while len(found) < limit:
            chunk = list(itertools.islice(items, limit))
            if not chunk:
                break
            if jar is not None:
                jar.prefetch(record for _key, record in chunk if record._p_changed is None)
            found.extend(k for k, record in chunk if self.is_waiting(k, record, now))
        return found[:limit]

    # -- how many wait -------------------------------------------------------------

    def count_waiting(self, now: float, mine: dict[int, bool]) -> int:
        """Messages waiting to be popped, as a consumer sees them.

        ``mine`` are the keys this consumer claimed, popped or gave back,
        and whether each waits now (``Claimer.now_waiting``): in this
        snapshot they still look as they were when it began.  O(1) in the
        usual case: the ``Length`` of unclaimed messages, corrected for
        ``mine``, plus claims whose lease ran out (their consumer died;
        normally none, found in O(log n)).
        """
        count: int = self._length()
        count += len(self.expired_claims(now) - mine.keys())
        for key, waiting in mine.items():
            record = self.record(key)
            if record is None:
                continue
            if self.holder_of(key) is None:
                count -= 1  # unclaimed in the snapshot: its Length counts it
            if waiting and not record.done:
                count += 1
        return max(count, 0)

    def expired_claims(self, now: float) -> set[int]:
        """Keys whose lease ended before ``now`` (read only, in this snapshot)."""
        found: set[int] = set()
        if not self._claims:  # the truth of a tree is O(1)
            return found
        for until, key in self._claims:
            if until > now:
                break
            record = self.record(key)
            claim = self.holder_of(key)
            if record is not None and not record.done and claim and claim[0] == until:
                found.add(key)
        return found

    # -- consuming -----------------------------------------------------------------

    def mark_done(self, key: int) -> MessageRecord:
        """Consume a message the caller holds (the consumer's only write); its record.

        KeyError when there is no such record.
        """
        record = self.record(key)
        if record is None:
            raise KeyError(key)
        record.done = True
        return record

    def remove_unclaimed(self, key: int) -> None:
        """Take out a waiting message nobody claimed (one this transaction added)."""
        self._remove(key)
        self._length.change(-1)

    def _remove(self, key: int) -> None:
        tree = self._trees.holding(key)
        if tree is None:
            raise KeyError(key)
        del tree[key]

    def pop_unattached(self) -> tuple[int, MessageRecord]:
        """A queue not yet in a database (tests, scripts): plain FIFO, no claims."""
        for key, record in self.items():
            if not record.done:
                self._remove(key)
                self._length.change(-1)
                return key, record
        raise QueueEmpty("the queue is empty")

    # -- claims (written by claimers, in their own connection) ---------------------

    def claimable(self, key: int, holder: str, now: float) -> tuple[MessageRecord, bool] | None:
        """The record if ``holder`` may claim it, and whether it holds it already.

        Not when it is consumed, gone, or held by another whose lease runs.
        """
        record = self.record(key)
        if record is None or record.done:
            return None
        claim = self.holder_of(key)
        ours = claim is not None and claim[1] == holder
        if claim is not None and claim[0] > now and not ours:
            return None
        return record, ours

    def take(self, key: int, holder: str, until: float) -> None:
        """Claim a message for ``holder`` until ``until``.

        A claim already there (a lease that ran out, or the holder's own)
        is moved; an unclaimed message stops counting as waiting.
        """
        claim = self.holder_of(key)
        if claim is not None:
            self._claims.discard((claim[0], key))
        else:
            self._length.change(-1)
        self._holders[key] = (until, holder)
        self._claims.add((until, key))

    def give_back(self, key: int, holder: str) -> bool:
        """End ``holder``'s claim on a message it did not consume; False if it has none."""
        record = self.record(key)
        claim = self.holder_of(key)
        if record is None or record.done or claim is None or claim[1] != holder:
            return False
        del self._holders[key]
        self._claims.discard((claim[0], key))
        self._length.change(1)
        return True

    def lanes_written_since(self, since: float) -> set[int]:
        """The lanes whose newest message arrived at ``since`` or later."""
        return written_since(self._trees.lanes, since)

    def _unswept(self, tree: MessageTree, now: float, idle: dict[int, bool]) -> bool:
        """No writer sweeps this tree now: the tree of before lanes, or an idle lane."""
        if tree is self._trees.legacy:
            return True
        if id(tree) not in idle:
            newest = newest_time(tree)
            idle[id(tree)] = newest is None or newest < now - IDLE_LANE
        return idle[id(tree)]

    def claim_count(self) -> int:
        """Claims kept, consumed ones included until :meth:`cleanup` removes them."""
        return len(self._claims)

    def cleanup(
        self,
        holder: str,
        now: float,
        limit: int = PRUNE_BATCH,
        jar: Any = None,
        everywhere: bool = False,
    ) -> int:
        """Remove the claims of up to ``limit`` consumed records, oldest first, and records
        no writer sweeps (module docstring); ``everywhere``: records of every lane.

        Only claims ``holder`` made, or whose lease has ended, so two
        consumers cleaning at once do not fight over one record.  Runs in a
        claimer's transaction: it writes only what claimers write, and
        records of lanes no writer sweeps.  The records it removes are asked
        of ``jar`` at once: through ZEO, one round trip instead of one a
        record, which keeps the transaction short.  Returns how many
        claims it removed.
        """
        claims, holders = self._claims, self._holders
        idle: dict[int, bool] = {}
        found: list[tuple[float, int, MessageTree | None]] = []
        # A list: stale entries are removed from ``claims`` along the way.
        for until, key in list(itertools.islice(claims, limit * 4)):
            if len(found) >= limit:
                break
            claim = holders.get(key)
            if claim is None or claim[0] != until:
                claims.remove((until, key))  # a stale index entry
                continue
            if claim[1] != holder and until > now:
                continue
            tree = self._trees.holding(key)
            if tree is not None and not (everywhere or self._unswept(tree, now, idle)):
                continue  # its lane's writer sweeps it
            found.append((until, key, tree))
        records = [(u, key, tree, None if tree is None else tree[key]) for u, key, tree in found]
        if jar is not None:
            jar.prefetch(r for *_, r in records if r is not None and r._p_changed is None)
        removed = 0
        for until, key, tree, record in records:
            if record is not None:
                if not record.done:
                    continue
                assert tree is not None
                del tree[key]
            del holders[key]
            claims.remove((until, key))
            removed += 1
        return removed
