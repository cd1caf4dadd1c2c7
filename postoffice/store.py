"""The depot in ZODB: the queues folder, the queues, and what they remember.

Layout under ``zodb_path`` (``/postoffice`` by default)::

    QueuesFolder
      queues: OOBTree  name -> Queue
      dead_letters: LOBTree  id -> DeadLetter   (mail we failed to decide)

    Queue
      _messages:   MessageTree (LOBTree)  key -> MessageRecord    (FIFO by key)
      _length:     Length    messages waiting (not claimed by a consumer)
      _holders:    LOBTree   key -> (lease end, holder id) of claimed messages
      _claims:     OOTreeSet (lease end, key), the same claims by age (leases, cleanup)
      _quarantine: LOBTree   key -> QuarantineRecord
      _ledger:     Ledger (LLBTree)  keyed hash of (message-id, recipient)
                                 -> check bits << 32 | arrival   (duplicates, 24 h)
      _ledger_by_time: LedgerTimes (LLBTree)  time key -> ledger key   (pruning)
      _ledger_salt: bytes     the key of the ledger's hash, random per queue
      _senders:    OOBTree   throttle key -> (arrivals tuple, throttled until)
      _senders_by_time: OOTreeSet (last activity, key)

Keys of ``_messages`` come from the clock, not from ``max(keys) + 1`` (SPEC
9): ``microseconds << 10 | salt``, the salt random per process, so two
writers in different processes practically never pick the same key, and when
they do the BTree's conflict makes one of them retry.

Consuming (SPEC 6): ``pop_next`` claims the oldest waiting message in a
private connection with its own transaction manager, committed at once (its
conflicts retried there, never surfaced), so two consumers in different
processes never hold one message.  The consumer's own transaction then only
marks the record ``done``: the claims live in the queue's ``_holders`` and
``_claims`` trees, which only claimers write, so the consumer's commit never
conflicts with a claim (and needs no conflict resolution, which
MappingStorage does not do).  A claim is a lease of ``CLAIM_LEASE`` seconds: a
message popped by a consumer that crashed comes back when the lease ends.
A consumer that pops quickly claims a few messages ahead in one claim commit
(``_Claimer``): through ZEO a commit is most of what a pop costs.
"""

from __future__ import annotations

import atexit
import contextlib
import email.policy
import hashlib
import itertools
import logging
import os
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import Any

import transaction
import ZODB
from BTrees.Length import Length
from BTrees.LLBTree import LLBTree
from BTrees.LOBTree import LOBTree
from BTrees.OOBTree import OOBTree, OOTreeSet
from persistent import Persistent
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.POSException import ConflictError

from postoffice import retry
from postoffice.database import has_blobs
from postoffice.decide import DUPLICATE_WINDOW, ThrottleView, throttle_window
from postoffice.errors import ConfigError, QueueEmpty, TemporaryError

log = logging.getLogger("postoffice.store")

# Messages up to this size are kept inline in their record; bigger ones in a
# blob file.  Measured: see docs/performance.md ("inline or blob").
BLOB_THRESHOLD = 256 * 1024
# A popped message whose consumer vanished comes back after this long.
CLAIM_LEASE = 3600.0
# Bounded work per write, so pruning never makes one delivery slow.
PRUNE_BATCH = 64
CLAIM_ATTEMPTS = 20
# Seconds a pop keeps retrying conflicting claims before TemporaryError.
CLAIM_PATIENCE = 30.0
# Consumed records are removed once this many claims have piled up.
CLEANUP_AT = 2 * PRUNE_BATCH
# How many waiting messages one pop looks at to find one nobody holds.
CANDIDATES = 64
# A consumer that pops quickly claims up to this many messages in one claim
# commit, and pops the rest without another one (docs/consumers.md).
CLAIM_AHEAD = 16
# ... when its previous claim was used up within this many seconds;
CLAIM_AHEAD_WHEN = 1.0
# and it pops a message claimed ahead only this long after the claim (then it
# claims it again, renewing the lease), so what it pops has most of a lease.
CLAIM_AHEAD_FOR = 10.0
# Node sizes of the trees every delivery writes to (``MessageTree``,
# ``Ledger``, ``LedgerTimes``): a commit writes a whole leaf again, and the
# node above it at a split, so small nodes keep those writes small.
SMALL_LEAF_SIZE = 32
SMALL_INTERNAL_SIZE = 64

# The clock of claims and leases; tests replace it (``store.clock = ...``).
clock: Callable[[], float] = time.time

_SALT = random.SystemRandom().getrandbits(10)
_key_lock = threading.Lock()
_last_key = 0


def new_key(now: float | None = None) -> int:
    """A FIFO key: the arrival time in microseconds, shifted, plus this process's salt."""
    global _last_key
    micros = int((clock() if now is None else now) * 1_000_000)
    with _key_lock:
        base = max(micros, (_last_key >> 10) + 1)
        _last_key = (base << 10) | _SALT
        return _last_key


_time_lock = threading.Lock()
_last_time = -(1 << 62)


def _time_key(now: float) -> int:
    """A ledger time key: ``microseconds << 10 | salt``, ascending within a process.

    Unlike :func:`new_key` it never runs ahead of ``now`` by more than the
    keys of one second: a caller going back in time (tests do; a clock may)
    gets keys at its own time, and ``record_delivery`` moves on from one
    that is taken.
    """
    global _last_time
    micros = int(now * 1_000_000)
    with _time_lock:
        if 0 <= _last_time - micros < 1_000_000:
            micros = _last_time + 1
        _last_time = micros
    return micros << 10 | _SALT


# --- persistent classes ---------------------------------------------------


class MessageRecord(Persistent):
    """One queued message: bytes inline, or a blob for big ones, and ``done``.

    After it is stored only one transaction ever writes a record: the one
    of the consumer holding the claim on it, setting ``done``.  Claims live
    in the queue's own trees, written by the claimers, so a consumer's commit
    never conflicts with anybody's claim, on any storage (MappingStorage
    resolves no conflicts at all).
    """

    data: bytes | None = None
    blob: Blob | None = None
    arrived: float = 0.0
    done: bool = False

    def __init__(self, raw: bytes, arrived: float, use_blob: bool) -> None:
        self.arrived = arrived
        if use_blob:
            blob = Blob()
            with blob.open("w") as handle:
                handle.write(raw)
                handle.flush()
                # ZODB renames blob files into place without syncing them.
                os.fsync(handle.fileno())
            self.blob = blob
        else:
            self.data = raw

    @property
    def raw(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.blob is not None
        with self.blob.open("r") as handle:
            return handle.read()


class QuarantineRecord(Persistent):
    """A message set aside with its error; a big one shares its record's blob."""

    data: bytes | None = None
    blob: Blob | None = None

    def __init__(self, raw: bytes | None, error: str, when: float) -> None:
        self.data = raw
        self.error = error
        self.when = when

    @classmethod
    def from_record(cls, record: MessageRecord, error: str, when: float) -> QuarantineRecord:
        if record.data is not None:
            return cls(record.data, error, when)
        kept = cls(None, error, when)
        kept.blob = record.blob
        return kept

    @property
    def raw(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.blob is not None
        with self.blob.open("r") as handle:
            return handle.read()


class DeadLetter(Persistent):
    """Mail the decision failed on: kept with its traceback instead of lost."""

    def __init__(
        self, raw: bytes, sender: str, recipients: tuple[str, ...], error: str, when: float
    ) -> None:
        self.data = raw
        self.sender = sender
        self.recipients = recipients
        self.error = error
        self.when = when


class QueuesFolder(Persistent):
    """The container of all queues, at ``zodb_path``."""

    def __init__(self) -> None:
        self.queues = OOBTree()
        self.dead_letters = LOBTree()
        self.dead_letter_count = Length()

    def __getitem__(self, name: str) -> Queue:
        return self.queues[name]

    def __contains__(self, name: object) -> bool:
        return name in self.queues

    def __iter__(self) -> Iterator[str]:
        return iter(self.queues.keys())

    def __len__(self) -> int:
        return len(self.queues)

    def get(self, name: str) -> Queue | None:
        return self.queues.get(name)

    def names(self) -> list[str]:
        return list(self.queues.keys())

    def items(self) -> list[tuple[str, Queue]]:
        return list(self.queues.items())

    def add_dead_letter(
        self,
        raw: bytes,
        sender: str,
        recipients: tuple[str, ...],
        error: str,
        now: float,
        keep: int,
    ) -> int:
        key = new_key(now)
        self.dead_letters[key] = DeadLetter(raw, sender, recipients, error, now)
        self.dead_letter_count.change(1)
        while self.dead_letter_count() > keep and len(self.dead_letters):
            del self.dead_letters[self.dead_letters.minKey()]
            self.dead_letter_count.change(-1)
        return key


class MessageTree(LOBTree):
    """A queue's messages, FIFO by key: appended to at the end, consumed from the front.

    Every commit writes its last leaf again, and at every split the node
    above it: LOBTree's nodes of up to 500 children made that a write of
    12 KiB every 30 messages once a queue held tens of thousands
    (docs/performance.md).  Smaller nodes make both writes small.
    """

    max_leaf_size = SMALL_LEAF_SIZE
    max_internal_size = SMALL_INTERNAL_SIZE


class Ledger(LLBTree):
    """The duplicate ledger's main tree: 64-bit key -> check and arrival.

    Its keys are hashes, so every delivery adds to a random leaf, and the
    whole leaf is written again at the commit.  Smaller leaves than
    LLBTree's 120 entries make that write smaller (measured:
    docs/performance.md, "What was changed").
    """

    max_leaf_size = SMALL_LEAF_SIZE
    max_internal_size = SMALL_INTERNAL_SIZE


class LedgerTimes(LLBTree):
    """The ledger's time index: appended to in time order, pruned from the front.

    Every commit writes its last leaf again, and the node above it at every
    split; small nodes keep both writes small.
    """

    max_leaf_size = SMALL_LEAF_SIZE
    max_internal_size = SMALL_INTERNAL_SIZE


class Queue(Persistent):
    """One application's FIFO queue, with its duplicate ledger and throttle state."""

    def __init__(self) -> None:
        self._messages = MessageTree()
        self._length = Length()
        self._holders = LOBTree()
        self._claims = OOTreeSet()
        self._quarantine = LOBTree()
        self._quarantine_length = Length()
        self._ledger = Ledger()
        self._ledger_by_time = LedgerTimes()
        self._ledger_salt = os.urandom(16)
        self._senders = OOBTree()
        self._senders_by_time = OOTreeSet()

    # Queues made before claims had their trees get them at their first claim.
    _holders: LOBTree | None = None
    _claims: OOTreeSet | None = None

    def _holder_of(self, key: int) -> tuple[float, str] | None:
        """(lease end, holder) of the claim on a message, in this snapshot."""
        holders = self._holders
        return None if holders is None else holders.get(key)

    def _is_waiting(self, key: int, record: MessageRecord, now: float) -> bool:
        """Poppable: not consumed, and not held by a consumer whose lease still runs."""
        if record.done:
            return False
        claim = self._holder_of(key)
        return claim is None or claim[0] <= now

    # -- size ---------------------------------------------------------------

    def __len__(self) -> int:
        """Messages waiting to be popped, as this consumer sees them.

        O(1) in the usual case: the ``Length`` counter of unclaimed messages
        in this transaction's snapshot, less what this connection popped in
        this transaction, plus what it popped in a transaction that was
        aborted (given back at its next pop), plus claims whose lease ran out
        (their consumer died; normally none, found in O(log n)).
        """
        now = clock()
        count: int = self._length()
        jar = self._p_jar
        claimer = _claimers.get(jar) if jar is not None else None
        # Messages this consumer claimed or gave back since the snapshot began
        # look in it as they were; what the claimer knows now is what counts.
        mine = claimer.now_waiting(self._p_oid) if claimer is not None else {}
        count += len(self._expired_claims(now) - mine.keys())
        for key, waiting in mine.items():
            record = self._messages.get(key)
            if record is None:
                continue
            if self._holder_of(key) is None:
                count -= 1  # unclaimed in the snapshot: its Length counts it
            if waiting and not record.done:
                count += 1
        return max(count, 0)

    def __bool__(self) -> bool:
        return len(self) > 0

    def _expired_claims(self, now: float) -> set[int]:
        """Keys whose lease ended before ``now`` (read only, in this snapshot)."""
        found: set[int] = set()
        claims = self._claims
        if not claims:
            return found
        for until, key in claims:
            if until > now:
                break
            record = self._messages.get(key)
            claim = self._holder_of(key)
            if record is not None and not record.done and claim and claim[0] == until:
                found.add(key)
        return found

    # -- writing ------------------------------------------------------------

    def store(self, raw: bytes, now: float, created: list[Persistent] | None = None) -> int:
        """Append raw bytes (already carrying our added lines); return the key.

        The new record is appended to ``created`` when given: the writer
        turns them into ghosts after its commit, so that its object cache
        keeps the trees it reads, not the bytes of messages it never reads
        again (up to ``BLOB_THRESHOLD`` each, ten thousand of them).
        """
        jar = self._p_jar
        use_blob = len(raw) > BLOB_THRESHOLD and jar is not None and has_blobs(jar.db())
        key = new_key(now)
        record = MessageRecord(raw, now, use_blob)
        self._messages[key] = record
        self._length.change(1)
        if created is not None:
            created.append(record)
        return key

    def add(self, message: Message | bytes, now: float | None = None) -> int:
        """Append a message given as an email Message or bytes (old API)."""
        raw = message if isinstance(message, bytes) else _as_bytes(message)
        return self.store(raw, clock() if now is None else now)

    # -- the duplicate ledger -----------------------------------------------
    #
    # One entry per (Message-Id, recipient) stored in the last 24 h, in two
    # trees of integers (docs/performance.md measures them against the
    # strings and tuples they replace):
    #
    # - ``_ledger``: ``key -> check << 32 | arrival``.  ``key`` and ``check``
    #   are 64 and 31 bits of a BLAKE2b hash of the pair, keyed with the
    #   queue's random ``_ledger_salt``; ``arrival`` is in whole seconds.
    # - ``_ledger_by_time``: ``time key -> key``, oldest first, for pruning.
    #   Time keys are the arrival in microseconds, shifted, plus the
    #   process's salt, as the queue's own keys (:func:`new_key`): in arrival
    #   order, so a commit appends to one leaf, and unique to this process,
    #   so two writers never pick the same one.
    #
    # A different pair with the same 64-bit key is told apart by ``check``, so
    # it is taken for a duplicate only when 95 bits agree; it replaces the
    # older entry, which could then be delivered twice (a duplicate, never a
    # loss), about once in 2**64 / entries deliveries.

    # Queues written by a development version before this ledger had none.
    _ledger_salt: bytes | None = None

    def _current_salt(self) -> bytes | None:
        """The key of the ledger's hash; None while the queue has an older ledger."""
        salt = self._ledger_salt
        return salt if salt is not None and isinstance(self._ledger, Ledger) else None

    def has_delivered(self, message_id: str, recipient: str, since: float) -> bool:
        """Stored for this recipient at ``since`` or later (to the second)?"""
        salt = self._current_salt()
        if salt is None:
            return False  # an older ledger is replaced at the next record_delivery
        key, check = _ledger_hash(salt, message_id, recipient)
        value = self._ledger.get(key)
        if value is None or value >> 32 != check:
            return False
        return value & _ARRIVAL_MASK >= int(since)

    def record_delivery(self, message_id: str, recipient: str, now: float) -> None:
        salt = self._current_salt()
        if salt is None:
            # An older ledger (strings and tuples) starts again empty: a copy
            # of a message stored in the last 24 h could be stored once more.
            self._ledger, self._ledger_by_time = Ledger(), LedgerTimes()
            salt = self._ledger_salt = os.urandom(16)
        key, check = _ledger_hash(salt, message_id, recipient)
        self._ledger[key] = check << 32 | _seconds(now)
        when = _time_key(now)
        while not self._ledger_by_time.insert(when, key):
            when += 1 << 10  # taken (the clock went back): the next microsecond
        self.prune_ledger(now - DUPLICATE_WINDOW)

    def prune_ledger(self, before: float, limit: int = PRUNE_BATCH) -> int:
        """Forget up to ``limit`` entries recorded before ``before``: O(log n) each."""
        times, ledger = self._ledger_by_time, self._ledger
        end = int(before * 1_000_000) << 10
        # The truth of a tree is O(1); its len() would walk every leaf.
        if not times or times.minKey() >= end:
            return 0
        old = list(itertools.islice(times.items(max=end, excludemax=True), limit))
        cutoff = _seconds(before)
        for when, key in old:
            del times[when]
            value = ledger.get(key)
            # Unless it was recorded again since (its newer time key prunes it).
            if value is not None and value & _ARRIVAL_MASK < cutoff:
                del ledger[key]
        return len(old)

    def warm_up(self, budget: int) -> int:
        """Load up to ``budget`` leaves of the ledger into the cache; how many it loaded."""
        loaded = 0
        with contextlib.suppress(AttributeError):  # an empty tree has no first leaf
            leaf = self._ledger._firstbucket
            while leaf is not None and loaded < budget:
                leaf._p_activate()
                loaded += 1
                leaf = leaf._next
        return loaded

    def ledger_size(self) -> int:
        return len(self._ledger)

    def is_duplicate(self, message: Message, now: float | None = None) -> bool:
        """Old API: is this Message-Id already here for its X-Original-To?"""
        message_id = (message.get("Message-Id") or "").strip()
        recipient = (message.get("X-Original-To") or "").strip()
        now = clock() if now is None else now
        return bool(message_id) and self.has_delivered(
            message_id, recipient, now - DUPLICATE_WINDOW
        )

    # -- throttle state -------------------------------------------------------

    def throttle_view(self, key: str, now: float, window: float) -> ThrottleView:
        arrivals, until = self._senders.get(key, ((), None))
        in_window = sum(1 for t in arrivals if t > now - window)
        last = arrivals[-1] if arrivals else None
        return ThrottleView(throttled_until=until, last_arrival=last, arrivals_in_window=in_window)

    def record_arrival(
        self, key: str, now: float, window: float, throttle_until: float | None = None
    ) -> None:
        """Count one arrival of this sender key; keep only what the window needs."""
        arrivals, until = self._senders.get(key, ((), None))
        previous_activity = _activity(arrivals, until)
        kept = (*tuple(t for t in arrivals if t > now - window)[-_MAX_ARRIVALS:], now)
        if throttle_until is not None:
            until = max(until or 0.0, throttle_until)
        self._set_sender(key, kept, until, previous_activity)
        self.prune_senders(now - window)

    def set_throttle(self, key: str, until: float) -> None:
        arrivals, old_until = self._senders.get(key, ((), None))
        self._set_sender(key, arrivals, until, _activity(arrivals, old_until))

    def _set_sender(
        self,
        key: str,
        arrivals: tuple[float, ...],
        until: float | None,
        previous_activity: float | None,
    ) -> None:
        if previous_activity is not None:
            self._senders_by_time.discard((previous_activity, key))
        self._senders[key] = (arrivals, until)
        activity = _activity(arrivals, until)
        if activity is not None:
            self._senders_by_time.add((activity, key))

    def prune_senders(self, before: float, limit: int = PRUNE_BATCH) -> int:
        """Drop sender keys with no arrival and no throttle after ``before``."""
        removed = 0
        # The truth of a tree is O(1); its len() walks every bucket.
        while removed < limit and self._senders_by_time:
            activity, key = self._senders_by_time.minKey()
            if activity >= before:
                break
            self._senders_by_time.remove((activity, key))
            entry = self._senders.get(key)
            if entry is not None and _activity(*entry) == activity:
                del self._senders[key]
            removed += 1
        return removed

    # Old API, kept: ``user`` is the sender address, ``headers`` discriminator values.
    def collect_frequency_data(
        self, message: Message, headers: tuple[str, ...] | None = None, now: float | None = None
    ) -> None:
        user = _sender_of(message)
        values = tuple((message.get(h) or "").strip() for h in headers or ())
        self.record_arrival(
            _user_key(user, values), clock() if now is None else now, window=24 * 3600
        )

    def get_instantaneous_frequency(
        self, user: str, now: float, headers: tuple[str, ...] | None = None
    ) -> float:
        view = self.throttle_view(_user_key(user, headers), now, 24 * 3600)
        if view.last_arrival is None:
            return 0.0
        delta = now - view.last_arrival
        return float("inf") if delta <= 0 else 60.0 / delta

    def get_average_frequency(
        self, user: str, now: float, interval: float, headers: tuple[str, ...] | None = None
    ) -> float:
        """Messages per minute over the last ``interval`` seconds."""
        view = self.throttle_view(_user_key(user, headers), now, interval)
        return 60.0 * view.arrivals_in_window / interval if interval > 0 else 0.0

    def throttle(self, user: str, until: float, headers: tuple[str, ...] | None = None) -> None:
        self.set_throttle(_user_key(user, headers), until)

    def is_throttled(self, user: str, now: float, headers: tuple[str, ...] | None = None) -> bool:
        until = self.throttle_view(_user_key(user, headers), now, 1).throttled_until
        return until is not None and now < until

    # -- consuming ------------------------------------------------------------

    def pop_next(self) -> StoredMessage:
        """Take the oldest waiting message, for this consumer only.

        The message leaves the queue for good when the caller's transaction
        commits; if it aborts, the message is given back at the head of the
        queue (at this consumer's next pop, or when the connection closes).
        Raises :class:`postoffice.QueueEmpty` (an IndexError) when nothing waits.
        """
        jar = self._p_jar
        if jar is None:
            return self._pop_unattached()
        claimer = _claimer_for(jar)
        given_back = claimer.release_pending(self._p_oid)
        if given_back:
            txn = jar.transaction_manager.get()
            txn.addAfterCommitHook(claimer.forget_released)
            txn.addAfterAbortHook(claimer.forget_released)
        now = clock()
        key = None if given_back else self._claimed_ahead(claimer, now)
        if key is None:
            key = self._claim(claimer, given_back, now)
        record = self._messages[key]
        record.done = True
        claimer.hold_in(jar.transaction_manager.get(), self._p_oid, key)
        return stored_message(record.raw, key)

    def _claimed_ahead(self, claimer: _Claimer, now: float) -> int | None:
        """The oldest message this consumer claimed ahead and may still pop."""
        while (key := claimer.take_ahead(self._p_oid, now)) is not None:
            record = self._messages.get(key)
            if record is not None and not record.done:
                return key
        return None

    def _claim(self, claimer: _Claimer, given_back: list[int], now: float) -> int:
        """Claim the oldest waiting messages (one, or a few ahead), in a commit of their own."""
        # Candidates come from this connection's snapshot; the claim looks at
        # the newest state and skips what others took meanwhile.
        candidates = self._first_waiting(now, CANDIDATES)
        # What this consumer just gave back may still look claimed in its snapshot.
        candidates.extend(key for key in given_back if key not in candidates)
        return claimer.claim(self._p_oid, candidates)

    def _first_waiting(self, now: float, limit: int) -> list[int]:
        """Keys of the first ``limit`` poppable messages in this snapshot.

        Records not loaded yet are asked for a chunk at a time: through ZEO
        that is one round trip for the chunk instead of one per record.
        """
        found: list[int] = []
        items = iter(self._messages.items())
        jar = self._p_jar
        while len(found) < limit:
            chunk = list(itertools.islice(items, limit))
            if not chunk:
                break
            if jar is not None:
                jar.prefetch(record for _key, record in chunk if record._p_changed is None)
            found.extend(k for k, record in chunk if self._is_waiting(k, record, now))
        return found[:limit]

    def _pop_unattached(self) -> StoredMessage:
        """A queue not yet in a database (tests, scripts): plain FIFO."""
        for key, record in self._messages.items():
            if not record.done:
                del self._messages[key]
                self._length.change(-1)
                return stored_message(record.raw, key)
        raise QueueEmpty("the queue is empty")

    def messages(self) -> Iterator[tuple[int, bytes, float]]:
        """(key, raw, arrival) of each waiting message, oldest first (read only)."""
        now = clock()
        for key, record in self._messages.items():
            if self._is_waiting(key, record, now):
                yield key, record.raw, record.arrived

    def oldest_arrival(self) -> float | None:
        """Arrival time of the oldest waiting message (reads no message bytes)."""
        now = clock()
        for key, record in self._messages.items():
            if self._is_waiting(key, record, now):
                return record.arrived
        return None

    # -- bounce and quarantine ------------------------------------------------

    def bounce(
        self,
        message: Message,
        send: Callable[[str, list[str], Message], Any],
        bounce_from_addr: str,
        bounce_reason: str | None = None,
        bounce_message: Message | None = None,
    ) -> None:
        """Tell the sender the message bounced, once this transaction commits."""
        from postoffice.notices import make_bounce, mark_ours, message_sender

        if bounce_reason is not None and bounce_message is not None:
            raise ValueError("give bounce_reason or bounce_message, not both")
        to_addr = message_sender(message)
        if to_addr is None:
            log.warning("bounce: message has no From address; nothing sent")
            return
        if bounce_message is not None:
            bounce = bounce_message
            mark_ours(bounce)
        else:
            bounce = make_bounce(message, bounce_from_addr, bounce_reason, to_addr)
        _send_after_commit(self, send, bounce_from_addr, [to_addr], bounce)

    def quarantine(
        self,
        message: Message,
        error: Any,
        send: Callable[[str, list[str], Message], Any] | None = None,
        notice_from: str | None = None,
    ) -> int:
        """Move a message out of the queue, with the error, for a person to look at.

        Meant for the message ``pop_next`` returned, also after the
        transaction that popped it was aborted (SPEC 6 loop): this consumer
        still holds it, so it goes to the quarantine and never back into the
        queue once this transaction commits.  Any other message is kept as a
        copy.  Returns the quarantine id (also set as ``message.__name__``).
        """
        from postoffice.notices import format_error, make_notice, message_sender

        if send is not None and notice_from is None:
            raise ValueError("notice_from is required when send is given")
        key = getattr(message, "postoffice_id", None)
        record: MessageRecord | None = None
        jar = self._p_jar
        if isinstance(key, int) and jar is not None:
            claimer = _claimers.get(jar)
            if claimer is not None and claimer.holds(self._p_oid, key):
                record = self._messages.get(key)
                if record is not None:
                    record.done = True
                    claimer.hold_in(jar.transaction_manager.get(), self._p_oid, key)
        qkey = key if isinstance(key, int) and key not in self._quarantine else new_key()
        if record is not None:
            kept = QuarantineRecord.from_record(record, format_error(error), clock())
        else:
            kept = QuarantineRecord(_as_bytes(message), format_error(error), clock())
        self._quarantine[qkey] = kept
        self._quarantine_length.change(1)
        with contextlib.suppress(AttributeError, TypeError):
            message.__name__ = qkey  # type: ignore[attr-defined]
        if send is not None and notice_from is not None:
            to_addr = message_sender(message)
            if to_addr is not None:
                notice = make_notice(message, notice_from, to_addr)
                _send_after_commit(self, send, notice_from, [to_addr], notice)
            else:
                log.warning("quarantine: message has no From address; no notice sent")
        return qkey

    def get_quarantined_messages(self) -> Iterator[tuple[StoredMessage, str]]:
        """(message, error text) of each quarantined message, oldest first."""
        for key, record in self._quarantine.items():
            yield stored_message(record.raw, key, quarantined=True), record.error

    def get_quarantined_message(self, message_id: int) -> StoredMessage:
        """One quarantined message by its id; KeyError when there is none."""
        record = self._quarantine[int(message_id)]
        return stored_message(record.raw, int(message_id), quarantined=True)

    def get_quarantine_error(self, message_id: int) -> str:
        return str(self._quarantine[int(message_id)].error)

    def count_quarantined_messages(self) -> int:
        return int(self._quarantine_length())

    def remove_from_quarantine(self, message: Message | int) -> None:
        """Forget a quarantined message (given as itself or by id); ValueError if absent."""
        key = message if isinstance(message, int) else _quarantine_id(message)
        if key is None or key not in self._quarantine:
            raise ValueError("message is not in quarantine")
        del self._quarantine[key]
        self._quarantine_length.change(-1)

    def requeue_quarantined_messages(self) -> int:
        """Put every quarantined message back at the tail of the queue."""
        keys = list(self._quarantine.keys())
        for key in keys:
            self.requeue_quarantined_message(key)
        return len(keys)

    def requeue_quarantined_message(self, key: int) -> int:
        record = self._quarantine[int(key)]
        del self._quarantine[int(key)]
        self._quarantine_length.change(-1)
        return self.store(record.raw, clock())

    def cleanup(self, holder: str = "", now: float | None = None, limit: int = PRUNE_BATCH) -> int:
        """Remove up to ``limit`` consumed records, oldest claims first.

        Only records this claimer (``holder``) claimed, or whose lease has
        ended, so two consumers cleaning at once do not fight over one record.
        Runs in a claimer's transaction: it writes only what claimers write.
        """
        claims, holders = self._claims, self._holders
        if claims is None or holders is None:
            return 0
        now = clock() if now is None else now
        removed = 0
        for until, key in list(itertools.islice(claims, limit * 4)):
            if removed >= limit:
                break
            claim = holders.get(key)
            if claim is None or claim[0] != until:
                claims.remove((until, key))  # a stale index entry
                continue
            if claim[1] != holder and until > now:
                continue
            record = self._messages.get(key)
            if record is not None and not record.done:
                continue
            if record is not None:
                del self._messages[key]
                removed += 1
            del holders[key]
            claims.remove((until, key))
        return removed


def _waiting_record(queue: Queue, key: int) -> bool:
    record = queue._messages.get(key)
    return record is not None and not record.done


_MAX_ARRIVALS = 1000


def _activity(arrivals: tuple[float, ...], until: float | None) -> float | None:
    last = arrivals[-1] if arrivals else None
    if until is None:
        return last
    return until if last is None else max(last, until)


_ARRIVAL_MASK = (1 << 32) - 1


def _seconds(when: float) -> int:
    """Whole seconds since the epoch, as the ledger keeps them (32 bits: until 2106)."""
    return min(max(int(when), 0), _ARRIVAL_MASK)


def _ledger_hash(salt: bytes, message_id: str, recipient: str) -> tuple[int, int]:
    """(signed 64-bit key, 31-bit check) of a (Message-Id, recipient) pair."""
    text = f"{message_id.strip()}\x00{recipient.strip().lower()}"
    digest = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=12, key=salt
    ).digest()
    return int.from_bytes(digest[:8], "big", signed=True), int.from_bytes(digest[8:], "big") >> 1


def _user_key(user: str, headers: tuple[str, ...] | None) -> str:
    return "\x00".join([user.strip().lower(), *(headers or ())])


def _sender_of(message: Message) -> str:
    from postoffice.notices import message_sender

    return message_sender(message) or ""


def _as_bytes(message: Message) -> bytes:
    """Bytes of a message to store: as popped when unchanged, else generated."""
    try:
        return message.as_bytes()
    except Exception:
        # Hostile headers can defeat the modern policy's folding; compat32 copes.
        return message.as_bytes(policy=email.policy.compat32)


def _quarantine_id(message: Message) -> int | None:
    """The quarantine id of a message: ``__name__`` (old API) or ``postoffice_id``."""
    for name in ("__name__", "postoffice_id"):
        key = getattr(message, name, None)
        if isinstance(key, int):
            return key
    return None


def _send_after_commit(
    queue: Queue,
    send: Callable[[str, list[str], Message], Any],
    from_addr: str,
    to_addrs: list[str],
    message: Message,
) -> None:
    """Side effects wait for the commit, so an aborted or retried one sends nothing.

    ``send`` gets the message object, as in the old package (repoze.sendmail's
    mailers take one); :class:`postoffice.SMTPSender` takes bytes too.
    """
    jar = queue._p_jar
    manager = jar.transaction_manager if jar is not None else transaction.manager

    def hook(status: bool) -> None:
        if not status:
            return
        try:
            send(from_addr, list(to_addrs), message)
        except Exception:
            log.exception("sending to %s failed after commit", to_addrs)

    manager.get().addAfterCommitHook(hook)


# --- the consumer's view of a stored message -----------------------------------


class StoredMessage(EmailMessage):
    """What ``pop_next`` returns: header values decoded, and the stored bytes.

    ``as_bytes()`` (and ``bytes()``) of a message nobody changed give back
    exactly the bytes stored, which ``email``'s generator does not (it
    refolds headers, rewrites line ends and multipart boundaries).  Once any
    part is changed, the message is generated as ``email`` always does.
    """

    postoffice_id: int | None = None
    _stored: bytes | None = None
    _pristine: tuple[Any, ...] | None = None

    def as_bytes(self, unixfrom: bool = False, policy: Any = None) -> bytes:
        stored = self._stored
        if stored is not None and not unixfrom and policy is None and self._unchanged():
            return stored
        return super().as_bytes(unixfrom=unixfrom, policy=policy)

    def __bytes__(self) -> bytes:
        return self.as_bytes()

    def _unchanged(self) -> bool:
        return self._pristine is not None and _same_shape(_shape(self), self._pristine)


def _shape(message: Message) -> tuple[Any, ...]:
    """Every part with what the generator reads from it, for an identity comparison."""
    parts = []
    for part in message.walk():
        payload = part._payload  # type: ignore[attr-defined]
        parts.append(
            (
                part,
                tuple(part._headers),  # type: ignore[attr-defined]
                tuple(payload) if isinstance(payload, list) else payload,
                part.preamble,
                part.epilogue,
                part._unixfrom,  # type: ignore[attr-defined]
                part._charset,  # type: ignore[attr-defined]
                part._default_type,  # type: ignore[attr-defined]
                part.policy,
            )
        )
    return tuple(parts)


def _same_shape(now: tuple[Any, ...], then: tuple[Any, ...]) -> bool:
    if len(now) != len(then):
        return False
    for a, b in zip(now, then, strict=True):
        if len(a) != len(b):
            return False
        for x, y in zip(a, b, strict=True):
            if isinstance(x, tuple) and isinstance(y, tuple):
                if len(x) != len(y) or any(i is not j for i, j in zip(x, y, strict=True)):
                    return False
            elif x is not y:
                return False
    return True


def stored_message(raw: bytes, key: int | None = None, quarantined: bool = False) -> StoredMessage:
    """The consumer's view of stored bytes (``postoffice_id`` names the record)."""
    message = BytesParser(_class=StoredMessage, policy=email.policy.default).parsebytes(raw)
    assert isinstance(message, StoredMessage)
    message._stored = raw
    message._pristine = _shape(message)
    message.postoffice_id = key
    if quarantined and key is not None:
        message.__name__ = key  # type: ignore[attr-defined]
    return message


# --- claims: exclusive pops across processes --------------------------------


class _Claimer:
    """Claims messages in its own connection and transaction manager.

    The claim commits at once (retrying conflicts), so two consumers never
    hold the same message; the consumer's own transaction then only marks
    the record done, an object no claimer writes.

    ``held`` are the (queue oid, key) this consumer claimed and whose
    transaction has not committed yet; ``pending`` those among them whose
    transaction was aborted.  Pending messages stay claimed until this
    consumer's next pop (or the connection's close) gives them back, so that
    ``quarantine`` after ``abort`` can still take them (SPEC 6 loop) without
    another consumer popping them in between.

    ``ahead`` are messages claimed but not popped yet, per queue, oldest
    first.  A consumer that used up its last claim within
    ``CLAIM_AHEAD_WHEN`` seconds claims twice as many the next time (up to
    ``CLAIM_AHEAD``), one that did not claims half as many: through ZEO a
    commit is most of a pop's cost, and this makes one claim serve a
    quick consumer's next pops, while what it holds unpopped stays about a
    second of its work.  They are given back when the connection closes, or
    at the end of a process that never closed it.
    """

    def __init__(self, db: ZODB.DB) -> None:
        self.manager = transaction.TransactionManager()
        self.connection = db.open(transaction_manager=self.manager)
        self.holder = uuid.uuid4().hex
        self.held: set[tuple[bytes, int]] = set()
        self.pending: set[tuple[bytes, int]] = set()
        self.released: set[tuple[bytes, int]] = set()
        self.ahead: dict[bytes, list[int]] = {}
        # Per queue: (time of the last claim, how many it claimed).
        self.pace: dict[bytes, tuple[float, int]] = {}
        self.lock = threading.Lock()
        self.closed = False

    # -- claiming --------------------------------------------------------------

    def claim(self, queue_oid: bytes, candidates: list[int]) -> int:
        """Claim the first candidates nobody else holds; conflicts are retried here.

        Returns the first, for the caller to pop; the others wait in
        ``ahead``.  What this consumer claimed ahead before (it may still
        look claimed in the caller's snapshot) is claimed again with them,
        renewing the lease.
        """
        with self.lock:
            renew = set(self.ahead.pop(queue_oid, ()))
            last = self.pace.get(queue_oid)
        candidates = sorted(renew.union(candidates))

        def claim_some() -> tuple[float, list[int]]:
            now = clock()
            queue = self.connection.get(queue_oid)
            return now, self._claim_some(queue, candidates, now, _claim_size(last, now), renew)

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
        self, queue: Queue, candidates: list[int], now: float, want: int, renew: set[int]
    ) -> list[int]:
        if queue._holders is None or queue._claims is None:
            queue._holders = LOBTree()
            queue._claims = OOTreeSet()
        holders, claims = queue._holders, queue._claims
        if len(claims) >= CLEANUP_AT:
            # In batches: deleting the head of a bucket conflicts with any
            # other change to that bucket (a writer appending to a short queue).
            queue.cleanup(self.holder, now, CLEANUP_AT)
        found: list[int] = []
        for key in candidates:
            if len(found) >= want and not renew.difference(found):
                break
            record = queue._messages.get(key)
            if record is None or record.done:
                continue
            claim = holders.get(key)
            ours = claim is not None and claim[1] == self.holder
            if claim is not None and claim[0] > now and not ours:
                continue
            if len(found) >= want and not ours:
                continue
            if claim is not None:
                # A lease that ran out (its consumer is gone) or our own: move it.
                claims.discard((claim[0], key))
            else:
                queue._length.change(-1)
            until = now + CLAIM_LEASE
            holders[key] = (until, self.holder)
            claims.add((until, key))
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

    # -- what this consumer holds -------------------------------------------------

    def holds(self, queue_oid: bytes, key: int) -> bool:
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

    def forget_released(self, *_args: object) -> None:
        """The consumer's transaction ended: its next snapshot shows what we gave back."""
        with self.lock:
            self.released.clear()

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

    def release_pending(self, queue_oid: bytes | None = None) -> list[int]:
        """Give back messages popped in transactions that did not commit.

        Returns the keys given back in the queue ``queue_oid``.
        """
        with self.lock:
            pending, self.pending = self.pending, set()
        if not pending:
            return []
        given: set[tuple[bytes, int]] = set()
        try:
            for attempt in self.manager.attempts(CLAIM_ATTEMPTS):
                with attempt:
                    given = set()
                    for oid, key in sorted(pending):
                        if self._give_back(self.connection.get(oid), key):
                            given.add((oid, key))
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

    def _give_back(self, queue: Queue, key: int) -> bool:
        record = queue._messages.get(key)
        claim = queue._holder_of(key)
        if record is None or record.done or claim is None or claim[1] != self.holder:
            return False
        assert queue._holders is not None and queue._claims is not None
        del queue._holders[key]
        queue._claims.discard((claim[0], key))
        queue._length.change(1)
        return True

    def give_back_ahead(self) -> None:
        """Give back what was claimed ahead and not popped (and what was aborted)."""
        with self.lock:
            for oid, keys in self.ahead.items():
                self.pending.update((oid, key) for key in keys)
            self.ahead.clear()
        self.release_pending()

    def close(self) -> None:
        self.closed = True
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


_claimers: weakref.WeakKeyDictionary[Any, _Claimer] = weakref.WeakKeyDictionary()
_claimers_lock = threading.Lock()


def _claimer_for(jar: Any) -> _Claimer:
    """The claimer of a consumer's connection, made at its first pop."""
    with _claimers_lock:
        claimer = _claimers.get(jar)
        if claimer is None or claimer.closed:
            claimer = _Claimer(jar.db())
            _claimers[jar] = claimer
            jar.onCloseCallback(lambda: _close_claimer(jar, claimer))
        return claimer


@atexit.register
def _give_back_at_exit() -> None:
    """A script that ends without closing its connection leaves nothing claimed ahead.

    Without this, messages it claimed ahead would wait for the end of their
    lease (an hour) before another consumer could have them.  A process
    killed by a signal cannot do this; docs/consumers.md says so.
    """
    with _claimers_lock:
        claimers = [c for c in _claimers.values() if not c.closed]
    for claimer in claimers:
        claimer.give_back_ahead()  # logs, never raises, when it cannot


def _close_claimer(jar: Any, claimer: _Claimer) -> None:
    """The consumer's connection closes (back to the pool): its claims go back too."""
    with _claimers_lock:
        if _claimers.get(jar) is claimer:
            del _claimers[jar]
    claimer.close()


# --- the folder at zodb_path ---------------------------------------------------


def find_folder(root: Any, path: str, create: bool = False) -> QueuesFolder:
    """The QueuesFolder at ``path`` under the root mapping (created if asked)."""
    names = [n for n in path.strip("/").split("/") if n]
    if not names:
        raise ConfigError("zodb_path must name at least one folder, e.g. /postoffice")
    node = root
    for name in names[:-1]:
        if name not in node:
            if not create:
                raise KeyError(f"no {path} in the database (has postoffice serve run?)")
            node[name] = PersistentMapping()
        node = node[name]
    last = names[-1]
    if last not in node:
        if not create:
            raise KeyError(f"no {path} in the database (has postoffice serve run?)")
        node[last] = QueuesFolder()
    folder = node[last]
    if not isinstance(folder, QueuesFolder):
        raise ConfigError(f"{path} in the database is not a postoffice queues folder")
    return folder


def reconcile(folder: QueuesFolder, names: tuple[str, ...]) -> list[str]:
    """Create queues the config names; retire those it dropped, unless they hold mail.

    Returns warnings for the log: a removed queue that still holds messages
    (or quarantined ones) is kept, so nothing is lost by editing the config.
    """
    warnings = []
    for name in names:
        if name not in folder.queues:
            folder.queues[name] = Queue()
    for name in list(folder.queues.keys()):
        if name in names:
            continue
        queue = folder.queues[name]
        if len(queue) or queue.count_quarantined_messages():
            warnings.append(
                f"queue {name!r} is no longer in the configuration but holds "
                f"{len(queue)} messages and {queue.count_quarantined_messages()} "
                "quarantined ones; kept until they are consumed"
            )
        else:
            del folder.queues[name]
    return warnings


class FolderState:
    """The read-only view of the queues that ``decide`` asks questions of."""

    def __init__(self, folder: QueuesFolder) -> None:
        self.folder = folder

    def is_duplicate(self, queue: str, message_id: str, recipient: str, since: float) -> bool:
        target = self.folder.get(queue)
        return target is not None and target.has_delivered(message_id, recipient, since)

    def throttle_view(self, queue: str, key: str, now: float, window: float) -> ThrottleView:
        target = self.folder.get(queue)
        if target is None:
            return ThrottleView(None, None, 0)
        return target.throttle_view(key, now, window)


__all__ = [
    "BLOB_THRESHOLD",
    "FolderState",
    "MessageRecord",
    "Queue",
    "QueuesFolder",
    "find_folder",
    "new_key",
    "reconcile",
    "throttle_window",
]
