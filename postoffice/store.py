"""The depot in ZODB: the queues folder, the queues, and what they remember.

Layout under ``zodb_path`` (``/postoffice`` by default)::

    QueuesFolder
      queues: OOBTree  name -> Queue
      dead_letters: LOBTree  id -> DeadLetter   (mail we failed to decide)

    Queue
      _messages:   LOBTree   key -> MessageRecord    (FIFO by key)
      _length:     Length    messages waiting (not claimed by a consumer)
      _quarantine: LOBTree   key -> QuarantineRecord
      _ledger:     OOBTree   "message-id NUL recipient" -> arrival   (duplicates, 24 h)
      _ledger_by_time: OOTreeSet (arrival, key)   for O(log n) pruning
      _senders:    OOBTree   throttle key -> (arrivals tuple, throttled until)
      _senders_by_time: OOTreeSet (last activity, key)

Keys of ``_messages`` come from the clock, not from ``max(keys) + 1`` (SPEC
9): ``microseconds << 10 | salt``, the salt random per process, so two
writers in different processes practically never pick the same key, and when
they do the BTree's conflict makes one of them retry.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import threading
import time
import urllib.parse
import uuid
import weakref
from collections.abc import Callable, Iterator
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import transaction
import ZODB
import zodburi
from BTrees.Length import Length
from BTrees.LOBTree import LOBTree
from BTrees.OOBTree import OOBTree, OOTreeSet
from persistent import Persistent
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.interfaces import IBlobStorage
from ZODB.POSException import ConflictError

from postoffice.decide import DUPLICATE_WINDOW, ThrottleView, throttle_window
from postoffice.errors import ConfigError, QueueEmpty, StorageUnavailable, TemporaryError
from postoffice.message import to_email_message

log = logging.getLogger("postoffice.store")

# Messages up to this size are kept inline in their record; bigger ones in a
# blob file.  Measured: see docs/performance.md ("inline or blob").
BLOB_THRESHOLD = 256 * 1024
# A popped message whose consumer vanished comes back after this long.
CLAIM_LEASE = 3600.0
# Bounded work per write, so pruning never makes one delivery slow.
PRUNE_BATCH = 64
CLAIM_ATTEMPTS = 20
# How many waiting messages one pop looks at to find one nobody holds.
CANDIDATES = 64

_SALT = random.SystemRandom().getrandbits(10)
_key_lock = threading.Lock()
_last_key = 0


def new_key(now: float | None = None) -> int:
    """A FIFO key: the arrival time in microseconds, shifted, plus this process's salt."""
    global _last_key
    micros = int((time.time() if now is None else now) * 1_000_000)
    with _key_lock:
        base = max(micros, (_last_key >> 10) + 1)
        _last_key = (base << 10) | _SALT
        return _last_key


# --- opening the database -------------------------------------------------


def open_db(uri: str) -> ZODB.DB:
    """Open a database by zodburi URI; StorageUnavailable when it cannot be reached."""
    try:
        factory, dbkw = zodburi.resolve_uri(uri)
    except Exception as exc:
        raise ConfigError(f"zodb_uri {uri!r}: {exc}") from None
    _make_file_dirs(uri)
    try:
        storage = factory()
    except Exception as exc:
        raise StorageUnavailable(f"cannot open {uri}: {exc}") from None
    try:
        return ZODB.DB(storage, **dbkw)
    except Exception as exc:
        with contextlib.suppress(Exception):
            storage.close()
        raise StorageUnavailable(f"cannot open {uri}: {exc}") from None


def _make_file_dirs(uri: str) -> None:
    """A file:// depot creates its folders (the embedded default lives in ``var/``)."""
    if not uri.startswith("file://"):
        return
    parts = urllib.parse.urlsplit(uri)
    paths = [Path(parts.path).parent]
    blob_dir = dict(urllib.parse.parse_qsl(parts.query)).get("blobstorage_dir")
    if blob_dir:
        paths.append(Path(blob_dir).parent)
    for path in paths:
        # On failure FileStorage will say what is wrong, in its own words.
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True, mode=0o750)


def has_blobs(db: ZODB.DB) -> bool:
    return IBlobStorage.providedBy(db.storage)


# --- persistent classes ---------------------------------------------------


class MessageRecord(Persistent):
    """One queued message: bytes inline, or a blob for big ones.

    Two writers touch a record: the claim (``claimed_until``, ``holder``,
    in the claimer's own transaction) and the consumer marking it ``done``
    in the application's transaction.  :meth:`_p_resolveConflict` merges
    those two, so the application's commit never sees a ConflictError for
    a message it popped.
    """

    data: bytes | None = None
    blob: Blob | None = None
    arrived: float = 0.0
    claimed_until: float = 0.0
    holder: str = ""
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

    @property
    def claimed(self) -> bool:
        return self.claimed_until > 0

    def _p_resolveConflict(
        self, old: dict[str, Any], saved: dict[str, Any], new: dict[str, Any]
    ) -> dict[str, Any]:
        result = dict(saved)
        for name in ("done",):
            if new.get(name) != old.get(name):
                result[name] = new.get(name)
        for name in ("claimed_until", "holder"):
            ours, theirs = new.get(name), saved.get(name)
            if ours != old.get(name):
                if theirs != old.get(name) and theirs != ours:
                    raise ConflictError("two claims of one message")
                result[name] = ours
        return result


class QuarantineRecord(Persistent):
    def __init__(self, raw: bytes, error: str, when: float) -> None:
        self.data = raw
        self.error = error
        self.when = when


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


class Queue(Persistent):
    """One application's FIFO queue, with its duplicate ledger and throttle state."""

    def __init__(self) -> None:
        self._messages = LOBTree()
        self._length = Length()
        self._quarantine = LOBTree()
        self._quarantine_length = Length()
        self._ledger = OOBTree()
        self._ledger_by_time = OOTreeSet()
        self._senders = OOBTree()
        self._senders_by_time = OOTreeSet()

    # -- size ---------------------------------------------------------------

    def __len__(self) -> int:
        """Messages waiting to be popped, in O(1)."""
        return self._length()

    def __bool__(self) -> bool:
        return self._length() > 0

    # -- writing ------------------------------------------------------------

    def store(self, raw: bytes, now: float) -> int:
        """Append raw bytes (already carrying our added lines); return the key."""
        jar = self._p_jar
        use_blob = len(raw) > BLOB_THRESHOLD and jar is not None and has_blobs(jar.db())
        key = new_key(now)
        self._messages[key] = MessageRecord(raw, now, use_blob)
        self._length.change(1)
        return key

    def add(self, message: Message | bytes, now: float | None = None) -> int:
        """Append a message given as an email Message or bytes (old API)."""
        raw = message if isinstance(message, bytes) else _as_bytes(message)
        return self.store(raw, time.time() if now is None else now)

    # -- the duplicate ledger -----------------------------------------------

    def has_delivered(self, message_id: str, recipient: str, since: float) -> bool:
        arrival = self._ledger.get(_ledger_key(message_id, recipient))
        return arrival is not None and arrival >= since

    def record_delivery(self, message_id: str, recipient: str, now: float) -> None:
        key = _ledger_key(message_id, recipient)
        previous = self._ledger.get(key)
        if previous is not None:
            self._ledger_by_time.remove((previous, key))
        self._ledger[key] = now
        self._ledger_by_time.add((now, key))
        self.prune_ledger(now - DUPLICATE_WINDOW)

    def prune_ledger(self, before: float, limit: int = PRUNE_BATCH) -> int:
        """Forget up to ``limit`` entries older than ``before``: O(log n) each."""
        removed = 0
        while removed < limit and len(self._ledger_by_time):
            arrival, key = self._ledger_by_time.minKey()
            if arrival >= before:
                break
            self._ledger_by_time.remove((arrival, key))
            if self._ledger.get(key) == arrival:
                del self._ledger[key]
            removed += 1
        return removed

    def ledger_size(self) -> int:
        return len(self._ledger)

    def is_duplicate(self, message: Message, now: float | None = None) -> bool:
        """Old API: is this Message-Id already here for its X-Original-To?"""
        message_id = (message.get("Message-Id") or "").strip()
        recipient = (message.get("X-Original-To") or "").strip()
        now = time.time() if now is None else now
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
        while removed < limit and len(self._senders_by_time):
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
            _user_key(user, values), time.time() if now is None else now, window=24 * 3600
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

    def pop_next(self) -> EmailMessage:
        """Take the oldest waiting message, for this consumer only.

        The message leaves the queue for good when the caller's transaction
        commits; if it aborts, the message is given back at the head of the
        queue (at this consumer's next pop, or when the connection closes).
        """
        jar = self._p_jar
        if jar is None:
            return self._pop_unattached()
        claimer = _claimer_for(jar)
        claimer.release_pending()
        candidates = list(
            itertools.islice(
                (key for key, record in self._messages.items() if not record.done), CANDIDATES
            )
        )
        if not candidates:
            raise QueueEmpty("the queue is empty")
        key, raw = claimer.claim(self._p_oid, candidates)
        record = self._messages[key]
        record.done = True
        txn = jar.transaction_manager.get()
        txn.addAfterCommitHook(_after_commit, (claimer, key, self._p_oid))
        txn.addAfterAbortHook(_after_abort, (claimer, key, self._p_oid))
        message = to_email_message(raw)
        message.postoffice_id = key  # type: ignore[attr-defined]
        return message

    def _pop_unattached(self) -> EmailMessage:
        """A queue not yet in a database (tests, scripts): plain FIFO."""
        for key, record in self._messages.items():
            if not record.done:
                del self._messages[key]
                self._length.change(-1)
                message = to_email_message(record.raw)
                message.postoffice_id = key  # type: ignore[attr-defined]
                return message
        raise QueueEmpty("the queue is empty")

    def messages(self) -> Iterator[tuple[int, bytes, float]]:
        """(key, raw, arrival) of each waiting message, oldest first (read only)."""
        for key, record in self._messages.items():
            if not record.done and not record.claimed:
                yield key, record.raw, record.arrived

    def oldest_arrival(self) -> float | None:
        for _key, _raw, arrived in self.messages():
            return arrived
        return None

    # -- bounce and quarantine ------------------------------------------------

    def bounce(
        self,
        message: Message,
        send: Callable[[str, list[str], bytes], Any],
        bounce_from_addr: str,
        bounce_reason: str | None = None,
        bounce_message: Message | None = None,
    ) -> None:
        """Tell the sender the message bounced, once this transaction commits."""
        from postoffice.notices import make_bounce, message_sender

        if bounce_reason is not None and bounce_message is not None:
            raise ValueError("give bounce_reason or bounce_message, not both")
        to_addr = message_sender(message)
        if to_addr is None:
            log.warning("bounce: message has no From address; nothing sent")
            return
        bounce = bounce_message or make_bounce(message, bounce_from_addr, bounce_reason)
        _mark_ours(bounce)
        _send_after_commit(self, send, bounce_from_addr, [to_addr], bounce)

    def quarantine(
        self,
        message: Message,
        error: Any,
        send: Callable[[str, list[str], bytes], Any] | None = None,
        notice_from: str | None = None,
    ) -> int:
        """Move a message out of the queue, with the error, for a person to look at."""
        from postoffice.notices import format_error, make_notice, message_sender

        if send is not None and notice_from is None:
            raise ValueError("notice_from is required when send is given")
        key = _postoffice_id(message)
        raw = None
        if key is not None:
            record = self._messages.get(key)
            if record is not None:
                raw = record.raw
                record.done = True
                jar = self._p_jar
                if jar is not None:
                    claimer = _claimer_for(jar)
                    claimer.adopt(key)
                    txn = jar.transaction_manager.get()
                    txn.addAfterCommitHook(_after_commit, (claimer, key, self._p_oid))
                    txn.addAfterAbortHook(_after_abort, (claimer, key, self._p_oid))
        if raw is None:
            raw = _as_bytes(message)
        qkey = key if key is not None and key not in self._quarantine else new_key()
        self._quarantine[qkey] = QuarantineRecord(raw, format_error(error), time.time())
        self._quarantine_length.change(1)
        if send is not None and notice_from is not None:
            to_addr = message_sender(message)
            if to_addr is not None:
                notice = make_notice(message, notice_from)
                _mark_ours(notice)
                _send_after_commit(self, send, notice_from, [to_addr], notice)
        return qkey

    def get_quarantined_messages(self) -> Iterator[tuple[EmailMessage, str]]:
        for key, record in self._quarantine.items():
            message = to_email_message(record.data)
            message.postoffice_id = key  # type: ignore[attr-defined]
            yield message, record.error

    def get_quarantined_message(self, message_id: int) -> EmailMessage:
        record = self._quarantine[int(message_id)]
        message = to_email_message(record.data)
        message.postoffice_id = int(message_id)  # type: ignore[attr-defined]
        return message

    def get_quarantine_error(self, message_id: int) -> str:
        return self._quarantine[int(message_id)].error

    def count_quarantined_messages(self) -> int:
        return self._quarantine_length()

    def remove_from_quarantine(self, message: Message | int) -> None:
        key = message if isinstance(message, int) else _postoffice_id(message)
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
        record = self._quarantine[key]
        del self._quarantine[key]
        self._quarantine_length.change(-1)
        return self.store(record.data, time.time())

    def cleanup(self, limit: int = PRUNE_BATCH) -> int:
        """Remove up to ``limit`` consumed records from the head of the queue."""
        removed = 0
        for key, record in list(self._messages.items()[: limit * 4]):
            if record.done and removed < limit:
                del self._messages[key]
                removed += 1
        return removed


_MAX_ARRIVALS = 1000


def _activity(arrivals: tuple[float, ...], until: float | None) -> float | None:
    last = arrivals[-1] if arrivals else None
    if until is None:
        return last
    return until if last is None else max(last, until)


def _ledger_key(message_id: str, recipient: str) -> str:
    return f"{message_id.strip()}\x00{recipient.strip().lower()}"


def _user_key(user: str, headers: tuple[str, ...] | None) -> str:
    return "\x00".join([user.strip().lower(), *(headers or ())])


def _sender_of(message: Message) -> str:
    from postoffice.notices import message_sender

    return message_sender(message) or ""


def _as_bytes(message: Message) -> bytes:
    from email import policy

    try:
        return message.as_bytes(policy=policy.compat32)
    except Exception:
        return message.as_bytes()


def _postoffice_id(message: Message) -> int | None:
    key = getattr(message, "postoffice_id", None)
    if isinstance(key, int):
        return key
    header = message.get("X-Postoffice-Id")
    try:
        return int(str(header).strip()) if header is not None else None
    except ValueError:
        return None


def _mark_ours(message: Message) -> None:
    """Our own mail says so: loops back are discarded (rule 2) and not answered."""
    for name, value in (("X-Postoffice", "Bounced"), ("Auto-Submitted", "auto-replied")):
        del message[name]
        message[name] = value


def _send_after_commit(
    queue: Queue,
    send: Callable[[str, list[str], bytes], Any],
    from_addr: str,
    to_addrs: list[str],
    message: Message,
) -> None:
    """Side effects wait for the commit, so an aborted or retried one sends nothing."""
    jar = queue._p_jar
    manager = jar.transaction_manager if jar is not None else transaction.manager
    data = _as_bytes(message)

    def hook(status: bool) -> None:
        if not status:
            return
        try:
            send(from_addr, to_addrs, data)
        except Exception:
            log.exception("sending to %s failed after commit", to_addrs)

    manager.get().addAfterCommitHook(hook)


# --- claims: exclusive pops across processes --------------------------------


class _Claimer:
    """Claims messages in its own connection and transaction manager.

    The claim commits at once (retrying conflicts), so two consumers never
    hold the same message; the consumer's own transaction then only marks
    the record done, which :meth:`MessageRecord._p_resolveConflict` merges.
    """

    def __init__(self, db: ZODB.DB) -> None:
        self.manager = transaction.TransactionManager()
        self.connection = db.open(transaction_manager=self.manager)
        self.holder = uuid.uuid4().hex
        self.pending: set[tuple[bytes, int]] = set()
        self.lock = threading.Lock()

    def claim(self, queue_oid: bytes, candidates: list[int]) -> tuple[int, bytes]:
        """Claim the first candidate nobody else holds; conflicts are retried here."""
        for number in range(CLAIM_ATTEMPTS):
            try:
                self.manager.begin()
                queue = self.connection.get(queue_oid)
                found = self._claim_one(queue, candidates, time.time())
                self.manager.commit()
                return found
            except ConflictError:
                self.manager.abort()
                time.sleep(random.uniform(0, 0.005) * (number + 1))
            except BaseException:
                self.manager.abort()
                raise
        raise TemporaryError("the queue is too busy to claim a message; try again")

    def _claim_one(self, queue: Queue, candidates: list[int], now: float) -> tuple[int, bytes]:
        queue.cleanup()
        for key in candidates:
            record = queue._messages.get(key)
            if record is None or record.done:
                continue
            if record.claimed_until > now and record.holder != self.holder:
                continue
            if not record.claimed:
                queue._length.change(-1)
            record.claimed_until = now + CLAIM_LEASE
            record.holder = self.holder
            return key, record.raw
        raise QueueEmpty("every waiting message is taken by another consumer")

    def adopt(self, key: int) -> None:
        with self.lock:
            self.pending = {p for p in self.pending if p[1] != key}

    def give_back(self, queue_oid: bytes, key: int) -> None:
        with self.lock:
            self.pending.add((queue_oid, key))

    def forget(self, key: int) -> None:
        self.adopt(key)

    def release_pending(self) -> None:
        """Give back messages popped in transactions that did not commit."""
        with self.lock:
            pending, self.pending = self.pending, set()
        if not pending:
            return
        try:
            for attempt in self.manager.attempts(CLAIM_ATTEMPTS):
                with attempt:
                    for queue_oid, key in sorted(pending):
                        queue = self.connection.get(queue_oid)
                        record = queue._messages.get(key)
                        if record is None or record.done or record.holder != self.holder:
                            continue
                        if record.claimed:
                            record.claimed_until = 0.0
                            queue._length.change(1)
        except Exception:
            log.exception(
                "could not give back %d popped messages; their lease will expire", len(pending)
            )

    def close(self) -> None:
        try:
            self.release_pending()
        finally:
            try:
                self.manager.abort()
                self.connection.close()
            except Exception:
                log.debug("closing the claim connection failed", exc_info=True)


_claimers: weakref.WeakKeyDictionary[Any, _Claimer] = weakref.WeakKeyDictionary()
_claimers_lock = threading.Lock()


def _claimer_for(jar: Any) -> _Claimer:
    with _claimers_lock:
        claimer = _claimers.get(jar)
        if claimer is None:
            claimer = _Claimer(jar.db())
            _claimers[jar] = claimer
            jar.onCloseCallback(claimer.close)
        return claimer


def _after_commit(status: bool, claimer: _Claimer, key: int, queue_oid: bytes) -> None:
    if status:
        claimer.forget(key)
    else:
        claimer.give_back(queue_oid, key)


def _after_abort(claimer: _Claimer, key: int, queue_oid: bytes) -> None:
    claimer.give_back(queue_oid, key)


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
    "open_db",
    "reconcile",
    "throttle_window",
]
