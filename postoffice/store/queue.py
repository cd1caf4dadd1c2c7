"""One application's queue: the persistent object, composed of its parts.

``Queue`` is what ZODB stores, and its pickled state is its ``__dict__``:
the trees and counters the databases already hold, under the names they
hold them.  The logic is in plain helper objects over those trees, one per
kind of state, made when a method needs them:

- :class:`~postoffice.store.fifo.Fifo`: the messages, their claims, and
  how many wait; the consumer's claimer (:mod:`postoffice.store.claims`),
  which the queue finds through its connection, claims through it;
- :class:`~postoffice.store.duplicates.DuplicateLedger`;
- :class:`~postoffice.store.throttle.SenderThrottle`;
- :class:`~postoffice.store.quarantine.Quarantine`.

The methods are the consumer API of ``repoze.postoffice`` 0.25 (``len``,
``pop_next``, ``bounce``, ``quarantine`` and the rest), and what the depot,
the commands and the consumer API of this package call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from email.message import Message
from typing import Any

import transaction
from BTrees.Length import Length
from BTrees.LOBTree import LOBTree
from BTrees.OOBTree import OOBTree, OOTreeSet
from persistent import Persistent
from ZODB.blob import Blob

from postoffice import clock
from postoffice.database import has_blobs
from postoffice.decide import DUPLICATE_WINDOW, ThrottleView
from postoffice.errors import QueueEmpty, UnreadableMessage
from postoffice.store import records
from postoffice.store.claims import Claimer, claimer_of
from postoffice.store.duplicates import DuplicateLedger, ledger_pair
from postoffice.store.duplicates import new_lanes as new_ledger_lanes
from postoffice.store.fifo import Fifo, new_lanes
from postoffice.store.quarantine import ID_HEADER, Quarantine, parse_id, quarantine_id
from postoffice.store.records import (
    PICKLED_MODULE,
    PRUNE_BATCH,
    Ledger,
    LedgerTimes,
    MessageRecord,
    MessageTree,
    QuarantineRecord,
)
from postoffice.store.stored import (
    StoredMessage,
    as_bytes,
    quarantined_view,
    read_bytes,
    readable,
    stored_message,
)
from postoffice.store.throttle import (
    OLD_API_WINDOW,
    Headers,
    SenderThrottle,
    duration,
    header_values,
    normal_user,
    seconds,
    sender_of,
    split_key,
    user_key,
)
from postoffice.store.throttle import new_lanes as new_sender_lanes

log = logging.getLogger("postoffice.store")

# How many waiting messages one pop looks at to find one nobody holds.
CANDIDATES = 64

Send = Callable[[str, list[str], Message], Any]


# What each transaction added to each queue (keys, oldest first), for its own
# pops: nobody else can see those records until it commits.
_added: weakref.WeakKeyDictionary[Any, dict[int, list[int]]] = weakref.WeakKeyDictionary()


def added_in(txn: Any, queue: Queue) -> list[int]:
    """Keys ``txn`` added to ``queue`` (the list itself, to append to or pop from)."""
    per_queue = _added.get(txn)
    if per_queue is None:
        per_queue = _added[txn] = {}
    return per_queue.setdefault(id(queue), [])


class Queue(Persistent):
    """One application's FIFO queue, with its duplicate ledger and throttle state."""

    __module__ = PICKLED_MODULE

    def __init__(self) -> None:
        self._lanes = new_lanes()
        self._messages = MessageTree()  # appended to before lanes; read, never appended to
        self._length = Length()
        self._holders = LOBTree()
        self._claims = OOTreeSet()
        self._quarantine = LOBTree()
        self._quarantine_length = Length()
        self._ledger = Ledger()  # (with _ledger_by_time) written before lanes; read, pruned
        self._ledger_by_time = LedgerTimes()
        self._ledger_lanes = new_ledger_lanes()
        self._ledger_salt = os.urandom(16)
        self._senders = OOBTree()  # (with _senders_by_time) written before lanes; read, pruned
        self._senders_by_time = OOTreeSet()
        self._sender_lanes = new_sender_lanes()

    # -- the parts -----------------------------------------------------------------

    @property
    def fifo(self) -> Fifo:
        """The messages and their claims, in this connection's snapshot (also for claimers)."""
        lanes = getattr(self, "_lanes", None)  # None: written before lanes
        return Fifo(lanes, self._messages, self._length, self._holders, self._claims)

    def upgrade(self) -> bool:
        """Give a queue written before lanes its lanes; whether it had to (a write of the queue).

        ``serve`` does so for every queue as it starts (``reconcile``), and
        a writer before its first append, so that only the first write to
        an old queue writes the queue object itself.
        """
        upgraded = False
        if getattr(self, "_lanes", None) is None:
            self._lanes = new_lanes()
            self._ledger_lanes = new_ledger_lanes()
            upgraded = True
        if getattr(self, "_sender_lanes", None) is None:  # lanes came to the throttle later
            self._sender_lanes = new_sender_lanes()
            upgraded = True
        return upgraded

    def lanes_written_since(self, since: float) -> set[int]:
        """The lanes a process appended a message to, or recorded a delivery in, since then."""
        return self.fifo.lanes_written_since(since) | self._duplicates.lanes_written_since(since)

    @property
    def _duplicates(self) -> DuplicateLedger:
        return DuplicateLedger(
            (self._ledger, self._ledger_by_time),
            getattr(self, "_ledger_lanes", None),  # None: written before lanes
            self._ledger_salt,
        )

    @property
    def _throttle(self) -> SenderThrottle:
        return SenderThrottle(
            (self._senders, self._senders_by_time),
            getattr(self, "_sender_lanes", None),  # None: written before lanes
        )

    @property
    def _quarantined(self) -> Quarantine:
        return Quarantine(self._quarantine, self._quarantine_length)

    # -- size ----------------------------------------------------------------------

    def __len__(self) -> int:
        """Messages waiting to be popped, as this consumer sees them (O(1) usually).

        What this consumer claimed, popped or gave back since its snapshot
        began looks in that snapshot as it was before; its claimer says how
        each stands now, and ``Fifo.count_waiting`` counts with that.
        """
        claimer = claimer_of(self._p_jar) if self._p_jar is not None else None
        mine = claimer.now_waiting(self._p_oid) if claimer is not None else {}
        return self.fifo.count_waiting(clock.now(), mine)

    def __bool__(self) -> bool:
        return len(self) > 0

    # -- writing -------------------------------------------------------------------

    def store(self, raw: bytes | Blob, now: float, created: list[Persistent] | None = None) -> int:
        """Append raw bytes (already carrying our added lines), or a blob of them; the key.

        A blob is a message spooled to a file by a front door
        (``postoffice.spool``), stored as it is whatever its size.

        The new record is appended to ``created`` when given: the writer
        turns them into ghosts after its commit, so that its object cache
        keeps the trees it reads, not the bytes of messages it never reads
        again (up to ``BLOB_THRESHOLD`` each, ten thousand of them).
        """
        jar = self._p_jar
        # Read at each store (not imported), so the bench can move the threshold.
        use_blob = isinstance(raw, Blob) or (
            len(raw) > records.BLOB_THRESHOLD and jar is not None and has_blobs(jar.db())
        )
        self.upgrade()
        key, record = self.fifo.append(raw, now, use_blob)
        if created is not None:
            created.append(record)
        return key

    def add(self, message: Message | bytes, now: float | None = None) -> int:
        """Append a message given as an email Message or bytes (old API).

        Its Message-Id is recorded in the duplicate ledger for its recipient
        (``X-Original-To``, else ``To``), as a delivery records it; and this
        transaction's ``pop_next`` can pop it before it is committed.
        """
        raw = message if isinstance(message, bytes) else as_bytes(message)
        return self._add_raw(raw, clock.now() if now is None else now)

    def _add_raw(self, raw: bytes, now: float) -> int:
        key = self.store(raw, now)
        message_id, recipient = ledger_pair(raw)
        if message_id:
            self.record_delivery(message_id, recipient, now)
        jar = self._p_jar
        if jar is not None:
            added_in(jar.transaction_manager.get(), self).append(key)
        return key

    # -- the duplicate ledger ------------------------------------------------------

    def has_delivered(self, message_id: str, recipient: str, since: float) -> bool:
        """Stored for this recipient at ``since`` or later (to the second)?"""
        return self._duplicates.has_delivered(message_id, recipient, since)

    def record_delivery(self, message_id: str, recipient: str, now: float) -> None:
        self._duplicates.record(message_id, recipient, now)

    def prune_ledger(self, before: float, limit: int = PRUNE_BATCH) -> int:
        """Forget up to ``limit`` entries recorded before ``before``: O(log n) each."""
        return self._duplicates.prune(before, limit)

    def warm_up(self, budget: int) -> int:
        """Load up to ``budget`` leaves of the ledger into the cache; how many it loaded."""
        return self._duplicates.warm_up(budget)

    def ledger_size(self) -> int:
        return self._duplicates.size()

    def is_duplicate(self, message: Message, now: float | None = None) -> bool:
        """Old API: is this Message-Id already here for its X-Original-To (else its To)?"""
        message_id, recipient = ledger_pair(message)
        now = clock.now() if now is None else now
        return bool(message_id) and self.has_delivered(
            message_id, recipient, now - DUPLICATE_WINDOW
        )

    # -- throttle state ------------------------------------------------------------

    def throttle_view(self, key: str, now: float, window: float) -> ThrottleView:
        return self._throttle.view(key, now, window)

    def record_arrival(
        self, key: str, now: float, window: float, throttle_until: float | None = None
    ) -> None:
        """Count one arrival of this sender key; keep only what the window needs."""
        self._throttle.record_arrival(key, now, window, throttle_until)

    def set_throttle(self, key: str, until: float) -> None:
        self._throttle.set_throttle(key, until)

    def prune_senders(self, before: float, limit: int = PRUNE_BATCH) -> int:
        """Drop sender keys with no arrival and no throttle after ``before``."""
        return self._throttle.prune(before, limit)

    # The old API: ``user`` is the sender (its address, or a From value as 0.25
    # took it); times are datetimes or epoch seconds, intervals timedeltas or
    # seconds; ``headers`` a {name: value} dict as in 0.25, or the values in
    # the order of ``ooo_loop_headers``, or None for all of the user's keys
    # (docs/consumers.md, "Frequencies and throttles").
    def collect_frequency_data(
        self, message: Message, headers: Sequence[str] | None = None, now: Any = None
    ) -> None:
        values = tuple((message.get(h) or "").strip() for h in headers or ())
        now = clock.now() if now is None else seconds(now)
        self.record_arrival(user_key(sender_of(message), values), now, window=OLD_API_WINDOW)

    def _views(self, user: str, headers: Headers, now: float, window: float) -> list[ThrottleView]:
        """The throttle views of the keys a question about ``user`` and ``headers`` covers."""
        throttle = self._throttle
        values = header_values(headers)
        if values is not None and not isinstance(headers, Mapping):
            return [throttle.view(user_key(user, values), now, window)]
        address = normal_user(user)
        keys = list(throttle.keys_of(address, values)) or [user_key(address, values)]
        return [throttle.view(key, now, window) for key in keys]

    def get_instantaneous_frequency(
        self, user: str, now: Any = None, headers: Headers = None
    ) -> float:
        """Messages per minute, from the time since the user's last message (0.0: none)."""
        now = clock.now() if now is None else seconds(now)
        lasts = [v.last_arrival for v in self._views(user, headers, now, OLD_API_WINDOW)]
        known = [last for last in lasts if last is not None]
        if not known:
            return 0.0
        delta = now - max(known)
        return float("inf") if delta <= 0 else 60.0 / delta

    def get_average_frequency(
        self, user: str, now: Any = None, interval: Any = 60.0, headers: Headers = None
    ) -> float:
        """Messages per minute over the last ``interval`` (a timedelta or seconds)."""
        now = clock.now() if now is None else seconds(now)
        window = duration(interval)
        if window <= 0:
            return 0.0
        views = self._views(user, headers, now, window)
        return 60.0 * sum(v.arrivals_in_window for v in views) / window

    def throttle(self, user: str, until: Any, headers: Headers = None) -> None:
        """Refuse the user's mail until ``until`` (a datetime or epoch seconds).

        Without headers, every key of the user (a throttle of the bare
        address holds for all of them); with a dict, the keys whose
        discriminators are its values, or the key of its values if there
        is none yet.
        """
        when = seconds(until)
        values = header_values(headers)
        throttle = self._throttle
        if values is None:
            throttle.set_throttle(normal_user(user), when)
            return
        if not isinstance(headers, Mapping):
            throttle.set_throttle(user_key(user, values), when)
            return
        address = normal_user(user)
        keys = [k for k in throttle.keys_of(address, values) if k.count("\x00") == len(values)]
        for key in keys or [user_key(address, values)]:
            throttle.set_throttle(key, when)

    def throttled_senders(self, now: float) -> list[tuple[str, tuple[str, ...], float]]:
        """(sender, discriminator values, until) of each sender throttled at ``now``."""
        return [(*split_key(key), until) for key, until in self._throttle.throttled(now)]

    def clear_throttle(self, user: str) -> int:
        """Forget every key of a sender (throttle and arrivals); how many there were."""
        throttle = self._throttle
        keys = list(throttle.keys_of(normal_user(user)))
        return sum(throttle.forget(key) for key in keys)

    def is_throttled(self, user: str, now: Any = None, headers: Headers = None) -> bool:
        """Throttled at ``now``: without headers, if any key of the user is."""
        now = clock.now() if now is None else seconds(now)
        views = self._views(user, headers, now, 1)
        return any(v.throttled_until is not None and now < v.throttled_until for v in views)

    # -- consuming -----------------------------------------------------------------

    def pop_next(self) -> StoredMessage:
        """Take the oldest waiting message, for this consumer only.

        The message leaves the queue for good when the caller's transaction
        commits; if it aborts, the message is given back at the head of the
        queue (at this consumer's next pop, or when the connection closes).
        What ``add`` or a requeue put in the queue in this same transaction
        is popped too, after the committed messages (nobody else can see
        it, so it needs no claim).
        Raises :class:`postoffice.QueueEmpty` (an IndexError) when nothing
        waits, and :class:`postoffice.UnreadableMessage` when the message it
        claimed cannot be read (quarantine ``error.message``, as the loop of
        docs/consumers.md does).
        """
        return self._pop(None)

    def _pop(self, batch: int | None) -> StoredMessage:
        """``pop_next``; a claim it has to make takes at least ``batch`` messages when given.

        ``postoffice.consume`` passes what its batch still lacks, so that a
        batch costs one claim commit instead of one for every few pops (two
        consumers claiming at once conflict on the claims' trees).
        """
        jar = self._p_jar
        fifo = self.fifo
        if jar is None:  # not in a database yet (tests, scripts)
            popped, unattached = fifo.pop_unattached()
            return readable(unattached, popped)
        claimer = claimer_of(jar, make=True)
        given_back = claimer.give_back_aborted(self._p_oid, jar.transaction_manager.get())
        now = clock.now()
        key = None if given_back else self._claimed_ahead(claimer, fifo, now)
        if key is None:
            # Candidates come from this connection's snapshot; the claim looks
            # at the newest state and skips what others took meanwhile.
            candidates = fifo.first_waiting(now, CANDIDATES, jar)
            # What this consumer gave back since its transaction began (this
            # pop or an earlier one) may still look claimed here.
            waiting = claimer.now_waiting(self._p_oid)
            candidates.extend(
                key for key in sorted(waiting) if waiting[key] and key not in candidates
            )
            added = added_in(jar.transaction_manager.get(), self)
            candidates = [key for key in candidates if key not in added]
            try:
                key = claimer.claim(self._p_oid, candidates, batch)
            except QueueEmpty:
                own = self._pop_added(added)
                if own is None:
                    raise
                return own
        return readable(self._consume(claimer, key), key)

    def _pop_added(self, added: list[int]) -> StoredMessage | None:
        """The oldest message this transaction added (nobody else can see it yet).

        It leaves the queue in this transaction: committed, neither the add
        nor the pop happened for anybody else; aborted, neither happened.
        """
        while added:
            key = added.pop(0)
            record = self.fifo.record(key)
            if record is not None and not record.done:  # not rolled back to a savepoint
                self.fifo.remove_unclaimed(key)
                return readable(record, key)
        return None

    def _claimed_ahead(self, claimer: Claimer, fifo: Fifo, now: float) -> int | None:
        """The oldest message this consumer claimed ahead and may still pop."""
        while (key := claimer.take_ahead(self._p_oid, now)) is not None:
            record = fifo.record(key)
            if record is not None and not record.done:
                return key
        return None

    def _consume(self, claimer: Claimer, key: int) -> MessageRecord:
        """Mark a message this consumer holds done in its transaction (given back on abort)."""
        record = self.fifo.mark_done(key)
        claimer.hold_in(self._p_jar.transaction_manager.get(), self._p_oid, key)
        return record

    def _consume_held(self, key: int) -> MessageRecord | None:
        """Consume a message if this consumer holds it (popped, not committed); its record."""
        jar = self._p_jar
        claimer = claimer_of(jar) if jar is not None else None
        if claimer is None or not claimer.holds(self._p_oid, key) or self.fifo.record(key) is None:
            return None
        return self._consume(claimer, key)

    def messages(self) -> Iterator[tuple[int, bytes, float]]:
        """(key, raw, arrival) of each waiting message, oldest first (read only)."""
        for key, record in self.fifo.waiting(clock.now()):
            yield key, record.raw, record.arrived

    def oldest_arrival(self) -> float | None:
        """Arrival time of the oldest waiting message (reads no message bytes)."""
        for _key, record in self.fifo.waiting(clock.now()):
            return record.arrived
        return None

    def cleanup(self, holder: str = "", now: float | None = None, limit: int = PRUNE_BATCH) -> int:
        """Remove up to ``limit`` consumed records, oldest claims first (``Fifo.cleanup``)."""
        return self.fifo.cleanup(holder, clock.now() if now is None else now, limit)

    # -- bounce and quarantine -----------------------------------------------------

    def bounce(
        self,
        message: Message,
        send: Send,
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
        self._send_after_commit(send, bounce_from_addr, [to_addr], bounce)

    def quarantine(
        self,
        message: Message,
        error: Any,
        send: Send | None = None,
        notice_from: str | None = None,
    ) -> int:
        """Move a message out of the queue, with the error, for a person to look at.

        Meant for the message ``pop_next`` returned, also after the
        transaction that popped it was aborted (the consumer loop of
        docs/consumers.md): this consumer still holds it, so it goes to the
        quarantine and never back into the queue once this transaction
        commits.  Any other message is kept as a copy.  Returns the
        quarantine id (also set as ``message.__name__``).
        """
        from postoffice.notices import format_error, make_notice, message_sender

        if send is not None and notice_from is None:
            raise ValueError("notice_from is required when send is given")
        now = clock.now()
        key = getattr(message, "postoffice_id", None)
        key = key if isinstance(key, int) else None
        record = self._consume_held(key) if key is not None else None
        if record is not None:
            kept = QuarantineRecord.from_record(record, format_error(error), now)
        else:
            with contextlib.suppress(Exception):
                del message[ID_HEADER]  # of an earlier quarantine: the new id replaces it
            kept = QuarantineRecord(as_bytes(message), format_error(error), now)
        qkey = self._quarantined.add(kept, key, now)
        with contextlib.suppress(AttributeError, TypeError):
            message.__name__ = qkey  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            del message[ID_HEADER]
            message[ID_HEADER] = str(qkey)  # as 0.25 did
        if send is not None and notice_from is not None:
            to_addr = message_sender(message)
            if to_addr is not None:
                notice = make_notice(message, notice_from, to_addr)
                self._send_after_commit(send, notice_from, [to_addr], notice)
            else:
                log.warning("quarantine: message has no From address; no notice sent")
        return qkey

    def get_quarantined_messages(self) -> Iterator[tuple[StoredMessage, str]]:
        """(message, error text) of each quarantined message, oldest first."""
        for key, record in self._quarantined.items():
            yield quarantined_view(record, key)

    def quarantined(self) -> Iterator[tuple[int, bytes, float, str]]:
        """(id, bytes as kept, when quarantined, error) of each, oldest first (read only)."""
        for key, record in self._quarantined.items():
            yield key, record.raw, record.when, str(record.error)

    def get_quarantined_message(self, message_id: int | str) -> StoredMessage:
        """One quarantined message by its id (an int, or its ``X-Postoffice-Id`` text).

        KeyError when there is none.
        """
        key = parse_id(message_id)
        if key is None:
            raise KeyError(message_id)
        record = self._quarantined.get(key)
        return stored_message(record.raw, key, quarantined=True)

    def get_quarantine_error(self, message_id: int | str) -> str:
        key = parse_id(message_id)
        if key is None:
            raise KeyError(message_id)
        return str(self._quarantined.get(key).error)

    def quarantined_ids(self) -> list[int]:
        """The ids in the quarantine, oldest first (reads no record)."""
        return self._quarantined.ids()

    def count_quarantined_messages(self) -> int:
        return self._quarantined.count()

    def remove_from_quarantine(self, message: Message | int | str) -> None:
        """Forget a quarantined message; ValueError if it is not there.

        Given as itself (its ``__name__`` or ``X-Postoffice-Id``, which is
        then deleted from it, as 0.25 did) or by id, an int or its text.
        """
        key = quarantine_id(message) if isinstance(message, Message) else parse_id(message)
        quarantined = self._quarantined
        if key is None or key not in quarantined:
            raise ValueError("message is not in quarantine")
        quarantined.remove(key)
        if isinstance(message, Message):
            with contextlib.suppress(Exception):
                del message[ID_HEADER]

    def adopt_quarantine(self, other: Queue, now: float) -> int:
        """Move every quarantined record of ``other`` into this quarantine, as it is.

        Bytes, error text and, where it is free here, the id go along: what
        ``postoffice quarantine list`` showed for the old queue it shows for
        this one.  Returns how many.
        """
        theirs, ours = other._quarantined, self._quarantined
        moved = 0
        for key in theirs.ids():
            ours.add(theirs.remove(key), key, now)
            moved += 1
        return moved

    def requeue_quarantined_messages(self) -> int:
        """Put every quarantined message back at the tail of the queue; how many.

        One whose bytes cannot be read stays in the quarantine, with a
        warning: requeued, it would only come back.
        """
        requeued = 0
        for key in self._quarantined.ids():
            try:
                self.requeue_quarantined_message(key)
            except UnreadableMessage as error:
                log.warning("quarantine: %s; it stays in the quarantine", error)
            else:
                requeued += 1
        return requeued

    def requeue_quarantined_message(self, key: int) -> int:
        """Put one quarantined message back at the tail of the queue, as ``add`` does.

        :class:`postoffice.UnreadableMessage` if its bytes cannot be read
        (it stays in the quarantine).
        """
        raw = read_bytes(self._quarantined.get(key), key)
        self._quarantined.remove(key)
        return self._add_raw(raw, clock.now())

    def _send_after_commit(
        self, send: Send, from_addr: str, to_addrs: list[str], message: Message
    ) -> None:
        """Side effects wait for the commit, so an aborted or retried one sends nothing.

        ``send`` gets the message object, as in the old package (repoze.sendmail's
        mailers take one); :class:`postoffice.SMTPSender` takes bytes too.
        """
        jar = self._p_jar
        manager = jar.transaction_manager if jar is not None else transaction.manager

        def hook(status: bool) -> None:
            if not status:
                return
            try:
                send(from_addr, list(to_addrs), message)
            except Exception:
                log.exception("sending to %s failed after commit", to_addrs)

        manager.get().addAfterCommitHook(hook)
