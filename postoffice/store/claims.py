"""Exclusive pops across processes: the claimer of a consumer's connection.

``pop_next`` claims the oldest waiting message in a private connection
with its own transaction manager, committed at once (its conflicts retried
there, never surfaced), so two consumers in different processes never hold
one message.  The consumer's own transaction then only marks the record
``done``: the claims live in the queue's ``_holders`` and ``_claims`` trees
(:mod:`postoffice.store.fifo`), which only claimers write, so the consumer's
commit never conflicts with a claim (and needs no conflict resolution,
which MappingStorage does not do).  A claim is a lease of ``CLAIM_LEASE``
seconds: a message popped by a consumer that crashed comes back when the
lease ends.

A consumer that pops quickly claims a few messages ahead in one claim
commit: through ZEO a commit is most of what a pop costs.

The claimer belongs to the consumer's connection: :func:`claimer_of` finds
it there (and makes it at the first pop), and it goes with the connection's
close.  The one process-wide thing is a weak set of the open claimers, for
the exit hook that gives back what a script that never closed its
connection claimed ahead.  A claimer reads and writes the queue only
through the queue's :class:`~postoffice.store.fifo.Fifo`.
"""

from __future__ import annotations

import atexit
import logging
import threading
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Literal, overload

import transaction
import ZODB
from ZODB.POSException import ConflictError

from postoffice import clock, retry
from postoffice.errors import QueueEmpty, TemporaryError
from postoffice.store.records import PRUNE_BATCH

if TYPE_CHECKING:
    from postoffice.store.fifo import Fifo

log = logging.getLogger("postoffice.store")

# A popped message whose consumer vanished comes back after this long.
CLAIM_LEASE = 3600.0
# A claim (or a give-back) retries conflicts for at least this many
# attempts and this many seconds (postoffice.retry) before it gives up.
CLAIM_ATTEMPTS = 20
CLAIM_PATIENCE = 30.0
# The claims of consumed records are removed once this many have piled up,
# with the records no writer sweeps (postoffice.store.fifo).  In batches:
# a cleanup that empties leaves of a lane a serve appends to changes the
# node its splits change, and fewer, larger cleanups made a serve retry
# less (with 128: 3.9% of its commits on ZEO; with 512: 0.1%).
CLEANUP_AT = 8 * PRUNE_BATCH
# Most consumed records are removed by the writer of their lane as it
# appends (postoffice.store.fifo); once this many claims have piled up, its
# sweeps fall behind the consumers, and a cleanup removes records of any lane.
SWEEP_BEHIND = 4 * CLEANUP_AT
# A consumer that pops quickly claims up to this many messages in one claim
# commit, and pops the rest without another one (docs/consumers.md).
CLAIM_AHEAD = 16
# ... when its previous claim was used up within this many seconds;
CLAIM_AHEAD_WHEN = 1.0
# and it pops a message claimed ahead only this long after the claim (then it
# claims it again, renewing the lease), so what it pops has most of a lease.
CLAIM_AHEAD_FOR = 10.0

Held = tuple[bytes, int]  # (queue oid, message key)

# The attribute of a ZODB connection that holds its consumer's claimer.
_ON_CONNECTION = "_postoffice_claimer"


@overload
def claimer_of(jar: Any, make: Literal[True]) -> Claimer: ...
@overload
def claimer_of(jar: Any, make: bool = False) -> Claimer | None: ...
def claimer_of(jar: Any, make: bool = False) -> Claimer | None:
    """The claimer of a consumer's connection ``jar``; with ``make``, made if it has none.

    Kept on the connection itself, so that it lives as long as the
    connection and is found from any queue loaded through it.  It is made
    at the connection's first pop and closed with the connection (back to
    its pool), giving back what it claimed ahead; the next pop after a
    reopen makes a new one.  A ZODB connection is used by one thread at a
    time, so finding and making need no lock.
    """
    claimer: Claimer | None = getattr(jar, _ON_CONNECTION, None)
    if claimer is not None and claimer.closed:
        claimer = None
    if claimer is None and make:
        made = claimer = Claimer(jar.db())
        setattr(jar, _ON_CONNECTION, made)
        jar.onCloseCallback(lambda: _closed(jar, made))
    return claimer


def _closed(jar: Any, claimer: Claimer) -> None:
    """The consumer's connection closes: its claims go back too."""
    if getattr(jar, _ON_CONNECTION, None) is claimer:
        setattr(jar, _ON_CONNECTION, None)
    claimer.close()


# Open claimers, for the exit hook alone; held weakly, so a connection
# dropped without a close takes its claimer with it.
_open: weakref.WeakSet[Claimer] = weakref.WeakSet()
_open_lock = threading.Lock()


@atexit.register
def _give_back_at_exit() -> None:
    """A script that ends without closing its connection leaves nothing claimed ahead.

    Without this, messages it claimed ahead would wait for the end of their
    lease (an hour) before another consumer could have them.  A process
    killed by a signal cannot do this; docs/consumers.md says so.
    """
    with _open_lock:
        claimers = [claimer for claimer in _open if not claimer.closed]
    for claimer in claimers:
        claimer.give_back_ahead()  # logs, never raises, when it cannot


class Claimer:
    """Claims messages for one consumer, in its own connection and transaction manager.

    The claim commits at once (retrying conflicts), so two consumers never
    hold the same message; the consumer's own transaction then only marks
    the record done, an object no claimer writes.

    ``held`` are the (queue oid, key) this consumer claimed and whose
    transaction has not committed yet; ``pending`` those among them whose
    transaction was aborted.  Pending messages stay claimed until this
    consumer's next pop (or the connection's close) gives them back, so that
    ``quarantine`` after ``abort`` (the consumer loop of docs/consumers.md)
    can still take them without another consumer popping them in between.

    ``ahead`` are messages claimed but not popped yet, per queue, oldest
    first.  A consumer that used up its last claim within
    ``CLAIM_AHEAD_WHEN`` seconds claims twice as many the next time (up to
    ``CLAIM_AHEAD``), one that did not claims half as many: this makes one
    claim serve a quick consumer's next pops, while what it holds unpopped
    stays about a second of its work.  They are given back when the
    connection closes, or at the end of a process that never closed it.
    """

    def __init__(self, db: ZODB.DB) -> None:
        self.manager = transaction.TransactionManager()
        self.connection = db.open(transaction_manager=self.manager)
        self.holder = uuid.uuid4().hex
        self.held: set[Held] = set()
        self.pending: set[Held] = set()
        self.released: set[Held] = set()
        self.ahead: dict[bytes, list[int]] = {}
        # Per queue: (time of the last claim, how many it claimed).
        self.pace: dict[bytes, tuple[float, int]] = {}
        self.lock = threading.Lock()
        self.closed = False
        with _open_lock:
            _open.add(self)

    def _fifo(self, queue_oid: bytes) -> Fifo:
        """The queue's FIFO in the claimer's own connection (the newest state)."""
        fifo: Fifo = self.connection.get(queue_oid).fifo
        return fifo

    # -- claiming ------------------------------------------------------------------

    def claim(self, queue_oid: bytes, candidates: list[int], want: int | None = None) -> int:
        """Claim the first candidates nobody else holds; conflicts are retried here.

        Returns the first, for the caller to pop; the others wait in
        ``ahead``.  What this consumer claimed ahead before (it may still
        look claimed in the caller's snapshot) is claimed again with them,
        renewing the lease.  It claims as many as the consumer's pace says,
        or ``want`` when that is more (the rest of a batch of
        ``postoffice.consume``).
        """
        with self.lock:
            renew = set(self.ahead.pop(queue_oid, ()))
            last = self.pace.get(queue_oid)
        candidates = sorted(renew.union(candidates))

        def claim_some() -> tuple[float, list[int]]:
            now = clock.now()  # each attempt's own: a retry may come much later
            found = self._claim_some(
                self._fifo(queue_oid),
                candidates,
                now,
                max(_claim_size(last, now), want or 0),
                renew,
            )
            return now, found

        try:
            if not candidates:
                raise QueueEmpty("the queue is empty")
            now, found = retry.committed(self.manager, claim_some, CLAIM_ATTEMPTS, CLAIM_PATIENCE)
        except ConflictError:
            self._keep_ahead(queue_oid, renew)
            raise TemporaryError("the queue is too busy to claim a message; try again") from None
        except BaseException:
            self._keep_ahead(queue_oid, renew)
            raise
        with self.lock:
            self.held.add((queue_oid, found[0]))
            self.ahead[queue_oid] = found[1:]
            self.pace[queue_oid] = (now, len(found))
        return found[0]

    def _keep_ahead(self, queue_oid: bytes, keys: set[int]) -> None:
        """A claim failed: what it would have renewed is still ours in the
        database, so keep it for the next pop (or the close), not stranded."""
        if keys:
            with self.lock:
                self.ahead[queue_oid] = sorted(keys)

    def _claim_some(
        self, fifo: Fifo, candidates: list[int], now: float, want: int, renew: set[int]
    ) -> list[int]:
        kept = fifo.claim_count()
        if kept >= CLEANUP_AT:
            # In batches: deleting the head of a bucket conflicts with any
            # other change to that bucket (a writer appending to a short queue).
            fifo.cleanup(
                self.holder, now, CLEANUP_AT, self.connection, everywhere=kept >= SWEEP_BEHIND
            )
        found: list[int] = []
        for key in candidates:
            if len(found) >= want and not renew.difference(found):
                break
            claimable = fifo.claimable(key, self.holder, now)
            if claimable is None:
                continue
            record, ours = claimable
            if len(found) >= want and not ours:
                continue
            fifo.take(key, self.holder, now + CLAIM_LEASE)
            # Should a late consumer mark it done meanwhile, this claim conflicts.
            self.connection.readCurrent(record)
            found.append(key)
        if not found:
            raise QueueEmpty("every waiting message is taken by another consumer")
        return found

    def take_ahead(self, queue_oid: bytes, now: float) -> int | None:
        """The oldest message claimed ahead, if its claim is recent enough to pop."""
        with self.lock:
            keys = self.ahead.get(queue_oid)
            last = self.pace.get(queue_oid)
            if not keys or last is None or not 0 <= now - last[0] <= CLAIM_AHEAD_FOR:
                return None
            return keys.pop(0)

    # -- what this consumer holds ------------------------------------------------

    def holds(self, queue_oid: bytes, key: int) -> bool:
        """Popped by this consumer, in a transaction that did not commit."""
        with self.lock:
            return (queue_oid, key) in self.held

    def now_waiting(self, queue_oid: bytes) -> dict[int, bool]:
        """Keys of a queue this consumer touched, and whether each waits now.

        Held (popped, transaction open): no.  Claimed ahead, popped in an
        aborted transaction, or given back since the consumer's transaction
        began: yes.
        """
        with self.lock:
            state = {key: False for oid, key in self.held if oid == queue_oid}
            state.update((key, True) for key in self.ahead.get(queue_oid, ()))
            for oid, key in self.pending | self.released:
                if oid == queue_oid and (oid, key) not in self.held - self.pending:
                    state[key] = True
        return state

    def hold_in(self, txn: Any, queue_oid: bytes, key: int) -> None:
        """The message is consumed if ``txn`` commits, given back if it aborts."""
        with self.lock:
            self.pending.discard((queue_oid, key))
            self.held.add((queue_oid, key))
        txn.addAfterCommitHook(self._after_commit, (queue_oid, key))
        txn.addAfterAbortHook(self._after_abort, (queue_oid, key))

    def _after_commit(self, status: bool, queue_oid: bytes, key: int) -> None:
        with self.lock:
            if status:
                self.held.discard((queue_oid, key))
                self.pending.discard((queue_oid, key))
            elif (queue_oid, key) in self.held:
                self.pending.add((queue_oid, key))

    def _after_abort(self, queue_oid: bytes, key: int) -> None:
        with self.lock:
            if (queue_oid, key) in self.held:
                self.pending.add((queue_oid, key))

    # -- giving back ---------------------------------------------------------------

    def give_back_aborted(self, queue_oid: bytes, txn: Any) -> list[int]:
        """Before a pop: give back what was popped in transactions that did not commit.

        Returns the keys given back in this queue.  Until ``txn`` (the
        consumer's) ends, its snapshot still shows them claimed, and
        :meth:`now_waiting` says they wait.
        """
        given_back = self.release_pending(queue_oid)
        if given_back:
            txn.addAfterCommitHook(self._forget_released)
            txn.addAfterAbortHook(self._forget_released)
        return given_back

    def _forget_released(self, *_args: object) -> None:
        """The consumer's transaction ended: its next snapshot shows what we gave back."""
        with self.lock:
            self.released.clear()

    def release_pending(self, queue_oid: bytes | None = None) -> list[int]:
        """Give back messages popped in transactions that did not commit.

        Returns the keys given back in the queue ``queue_oid``.  Conflicts
        are retried as a claim's are; when that fails, the messages stay
        pending for the next try, and their lease ends in any case.
        """
        with self.lock:
            pending, self.pending = self.pending, set()
        if not pending:
            return []

        def give_back() -> set[Held]:
            return {
                (oid, key)
                for oid, key in sorted(pending)
                if self._fifo(oid).give_back(key, self.holder)
            }

        try:
            given = retry.committed(self.manager, give_back, CLAIM_ATTEMPTS, CLAIM_PATIENCE)
        except Exception:
            log.exception(
                "could not give back %d popped messages; their lease will expire", len(pending)
            )
            with self.lock:
                self.pending |= pending
            return []
        with self.lock:
            self.held -= pending
            self.released |= given
        return sorted(key for oid, key in given if oid == queue_oid)

    def give_back_ahead(self) -> None:
        """Give back what was claimed ahead and not popped (and what was aborted)."""
        with self.lock:
            for oid, keys in self.ahead.items():
                self.pending.update((oid, key) for key in keys)
            self.ahead.clear()
        self.release_pending()

    def close(self) -> None:
        self.closed = True
        with _open_lock:
            _open.discard(self)
        try:
            self.give_back_ahead()
        finally:
            try:
                self.manager.abort()
                self.connection.close()
            except Exception:
                log.debug("closing the claim connection failed", exc_info=True)


def _claim_size(last: tuple[float, int] | None, now: float) -> int:
    """How many messages a claim takes: more while the consumer keeps up."""
    if last is None:
        return 1
    when, size = last
    if not 0 <= now - when < CLAIM_AHEAD_FOR:
        return 1  # a pause, or a clock that went back: start again
    if now - when < CLAIM_AHEAD_WHEN:
        return min(CLAIM_AHEAD, 2 * size)
    return max(1, size // 2)
