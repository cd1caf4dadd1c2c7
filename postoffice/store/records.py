"""What the depot keeps in ZODB besides its containers: records, trees, keys.

The small persistent records (a queued message, a quarantined one, a dead
letter), the BTree subclasses with small nodes that every delivery writes
to, and the keys of the FIFO and of the ledger's time index.

Every persistent class here sets ``__module__ = "postoffice.store"``: a
ZODB record names its class by module and name, and the databases written
before the store became a package name ``postoffice.store.MessageRecord``
and so on.  The package re-exports each class under that name, so those
records load, and new ones are written exactly as before
(``tests/test_store_format.py`` pins both).
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Container, Iterable, Sequence
from typing import Any, Generic, TypeVar

from BTrees.LLBTree import LLBTree
from BTrees.LOBTree import LOBTree
from persistent import Persistent
from ZODB.blob import Blob

from postoffice import clock

# The module under which the persistent classes were first pickled.
PICKLED_MODULE = "postoffice.store"

# Messages up to this size are kept inline in their record; bigger ones in a
# blob file.  Measured: see docs/performance.md ("inline or blob").
BLOB_THRESHOLD = 256 * 1024
# Bounded work per write, so pruning never makes one delivery slow.
PRUNE_BATCH = 64
# Node sizes of the trees every delivery writes to (``MessageTree``,
# ``Ledger``, ``LedgerTimes``): a commit writes a whole leaf again, and the
# node above it at a split, so small nodes keep those writes small.
SMALL_LEAF_SIZE = 32
SMALL_INTERNAL_SIZE = 64

# --- keys -------------------------------------------------------------------
#
# Keys of a queue's messages come from the clock, not from ``max(keys) + 1``:
# ``microseconds << 10 | salt``, the salt random per process, so two writers
# in different processes practically never pick the same key, and when they
# do the BTree's conflict makes one of them retry.

_SALT = random.SystemRandom().getrandbits(10)

# A queue's messages are kept in LANES trees, and a process appends to the
# one its salt names: two writers (two serves, a serve and a pipe run)
# then rarely touch the same tree, whose last leaf each commit rewrites
# and splits every few commits.  A key's lane is in its low bits.
LANES = 16


def lane_of(key: int) -> int:
    """The lane of a FIFO or ledger time key: its salt's, as this process's keys are."""
    return (key & 1023) % LANES


def own_lane() -> int:
    """The lane this process appends to."""
    return _SALT % LANES


def use_lane(lane: int) -> None:
    """Append to ``lane`` from now on: a new random salt that names it.

    For ``serve`` at its start, before it writes anything (``choose_lane``),
    so that it does not share a lane with another writer by the chance of
    two random salts.
    """
    global _SALT
    _SALT = random.SystemRandom().randrange(lane % LANES, 1024, LANES)


LaneT = TypeVar("LaneT")
# Lanes that are trees keyed by FIFO keys (or a view of such a tree).
KeyedT = TypeVar("KeyedT", bound=Container[Any])


class Laned(Generic[LaneT]):
    """The lanes of one part of the state, with its one tree (or pair) of before lanes.

    Each process writes to its own lane (``own_lane``), so that two writers
    in different processes never write the same tree; a question reads
    ``all()``, the tree of before lanes first.  No lanes (a queue or area
    written before them, until its upgrade): the tree of before lanes is
    the own one too.
    """

    def __init__(self, legacy: LaneT, lanes: Sequence[LaneT] | None) -> None:
        self.legacy = legacy
        self.lanes: Sequence[LaneT] = lanes or ()

    def all(self) -> tuple[LaneT, ...]:
        return (self.legacy, *self.lanes)

    def own(self) -> LaneT:
        """The lane this process writes to."""
        return self.lanes[own_lane()] if self.lanes else self.legacy

    def of_key(self, key: int) -> LaneT | None:
        """The lane whose writer made ``key`` (its salt bits); None without lanes."""
        return self.lanes[lane_of(key)] if self.lanes else None

    def holding(self: Laned[KeyedT], key: int) -> KeyedT | None:
        """The tree that holds ``key``: its lane, or the tree of before lanes; None if neither."""
        lane = self.of_key(key)
        if lane is not None and key in lane:
            return lane
        return self.legacy if key in self.legacy else None

    def to_prune(self, everywhere: bool) -> list[LaneT]:
        """The lanes a prune looks at, in order: this process's own, then the others.

        The own lane first, which only this process writes; then every
        other lane, or (not ``everywhere``: at each delivery) one of them
        picked at random, so that the entries of a process that is gone
        (another serve's, the tree of before lanes) leave too, while two
        live writers seldom prune the same lane.
        """
        own = self.own()
        others = [lane for lane in self.all() if lane is not own]
        if not everywhere and others:
            others = [random.choice(others)]
        return [own, *others]


_key_lock = threading.Lock()
_last_key = 0


def new_key(now: float | None = None) -> int:
    """A FIFO key: the arrival time in microseconds, shifted, plus this process's salt.

    Ascending within a process also when ``now`` repeats or goes back.
    """
    global _last_key
    micros = int((clock.now() if now is None else now) * 1_000_000)
    with _key_lock:
        base = max(micros, (_last_key >> 10) + 1)
        _last_key = (base << 10) | _SALT
        return _last_key


def key_time(key: int) -> float:
    """The arrival time a FIFO key was made from, in seconds since the epoch."""
    return (key >> 10) / 1_000_000


def newest_time(tree: Any) -> float | None:
    """The time of the newest key of a tree keyed by FIFO or time keys; None when empty."""
    return key_time(tree.maxKey()) if tree else None


def written_since(trees: Iterable[Any], since: float) -> set[int]:
    """The numbers of the lanes (trees keyed by FIFO or time keys) written at ``since`` or later."""
    return {
        number
        for number, tree in enumerate(trees)
        if (newest := newest_time(tree)) is not None and newest >= since
    }


_time_lock = threading.Lock()
_last_time = -(1 << 62)


def time_key(now: float) -> int:
    """A ledger time key: ``microseconds << 10 | salt``, ascending within a process.

    Unlike :func:`new_key` it never runs ahead of ``now`` by more than the
    keys of one second: a caller going back in time (tests do; a clock may)
    gets keys at its own time, and the ledger moves on from one that is
    taken.
    """
    global _last_time
    micros = int(now * 1_000_000)
    with _time_lock:
        if 0 <= _last_time - micros < 1_000_000:
            micros = _last_time + 1
        _last_time = micros
    return micros << 10 | _SALT


# --- records ----------------------------------------------------------------


class _Bytes:
    """The bytes of a message kept inline (``data``) or in a blob file (``blob``)."""

    data: bytes | None = None
    blob: Blob | None = None

    @property
    def raw(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.blob is not None
        with self.blob.open("r") as handle:
            return handle.read()


class MessageRecord(Persistent, _Bytes):
    """One queued message: bytes inline, or a blob for big ones, and ``done``.

    After it is stored only one transaction ever writes a record: the one
    of the consumer holding the claim on it, setting ``done``.  Claims live
    in the queue's own trees, written by the claimers, so a consumer's commit
    never conflicts with anybody's claim, on any storage (MappingStorage
    resolves no conflicts at all).
    """

    __module__ = PICKLED_MODULE

    arrived: float = 0.0
    done: bool = False

    def __init__(self, raw: bytes | Blob, arrived: float, use_blob: bool) -> None:
        self.arrived = arrived
        if isinstance(raw, Blob):
            self.blob = raw
        elif use_blob:
            blob = Blob()
            with blob.open("w") as handle:
                handle.write(raw)
                handle.flush()
                # ZODB renames blob files into place without syncing them.
                os.fsync(handle.fileno())
            self.blob = blob
        else:
            self.data = raw


def blob_from_file(path: str, jar: Any) -> Blob:
    """A blob made of the file at ``path`` by renaming it (``Blob.consumeFile``): no copy.

    The blob joins the connection first: ZODB then moves the file within
    the storage's temporary directory, where a blob without a connection
    would go to the system's (a copy, when that is another filesystem).
    The file must already be synced: ZODB renames it into place without.
    """
    blob = Blob()
    jar.add(blob)
    blob.consumeFile(path)
    return blob


class QuarantineRecord(Persistent, _Bytes):
    """A message set aside with its error; a big one shares its record's blob.

    ``rule`` and ``queue`` are set on the records of the review area only
    (the rule whose refusal was discarded, the queue it had found).
    """

    __module__ = PICKLED_MODULE

    rule: str | None = None
    queue: str | None = None

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


class DeadLetter(Persistent):
    """Mail the decision failed on: kept with its traceback instead of lost."""

    __module__ = PICKLED_MODULE

    def __init__(
        self, raw: bytes, sender: str, recipients: tuple[str, ...], error: str, when: float
    ) -> None:
        self.data = raw
        self.sender = sender
        self.recipients = recipients
        self.error = error
        self.when = when


# --- trees with small nodes -------------------------------------------------


class MessageTree(LOBTree):
    """A queue's messages, FIFO by key: appended to at the end, consumed from the front.

    Every commit writes its last leaf again, and at every split the node
    above it: LOBTree's nodes of up to 500 children made that a write of
    12 KiB every 30 messages once a queue held tens of thousands
    (docs/performance.md).  Smaller nodes make both writes small.
    """

    __module__ = PICKLED_MODULE

    max_leaf_size = SMALL_LEAF_SIZE
    max_internal_size = SMALL_INTERNAL_SIZE


class Ledger(LLBTree):
    """The duplicate ledger's main tree: 64-bit key -> check and arrival.

    Its keys are hashes, so every delivery adds to a random leaf, and the
    whole leaf is written again at the commit.  Smaller leaves than
    LLBTree's 120 entries make that write smaller (measured:
    docs/performance.md, "What was changed").
    """

    __module__ = PICKLED_MODULE

    max_leaf_size = SMALL_LEAF_SIZE
    max_internal_size = SMALL_INTERNAL_SIZE


class LedgerTimes(LLBTree):
    """The ledger's time index: appended to in time order, pruned from the front.

    Every commit writes its last leaf again, and the node above it at every
    split; small nodes keep both writes small.
    """

    __module__ = PICKLED_MODULE

    max_leaf_size = SMALL_LEAF_SIZE
    max_internal_size = SMALL_INTERNAL_SIZE
