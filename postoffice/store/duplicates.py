"""A queue's duplicate ledger: which (Message-Id, recipient) it stored in the last 24 h.

One entry per pair, in trees of integers (docs/performance.md measures
them against the strings and tuples they replace), attributes of the
queue, read and written only here.  A process writes to the lane of its
key salt (``records.own_lane``), so that two writers in different
processes (two serves, a serve and a pipe run) never write to, and never
split, the same tree; a lookup reads every lane.  Each lane is a pair:

- a ``Ledger``, ``key -> check << 32 | arrival``.  ``key`` and ``check``
  are 64 and 31 bits of a BLAKE2b hash of the pair, keyed with the queue's
  random ``_ledger_salt``; ``arrival`` is in whole seconds;
- a ``LedgerTimes``, ``time key -> key``, oldest first, for pruning.  Time
  keys are the arrival in microseconds, shifted, plus the process's salt,
  as the queue's own keys: in arrival order, so a commit appends to one
  leaf.

The queue's attributes: ``_ledger_lanes``, a tuple of ``LANES`` such
pairs; and ``_ledger`` with ``_ledger_by_time``, the one pair of the
releases before lanes, still read and pruned, never written to.

A different pair with the same 64-bit key is told apart by ``check``, so
it is taken for a duplicate only when 95 bits agree; in the same lane it
replaces the older entry, which could then be delivered twice (a
duplicate, never a loss), about once in 2**64 / entries deliveries.  Two
serves that store the same message for the same recipient within the
same moment (both commits under way at once) each record it in their own
lane, and both keep it: a duplicate, which a single serve, whose
deliveries are one after the other, never lets through.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import hashlib
import itertools
from collections.abc import Sequence
from email.message import Message

from postoffice.decide import DUPLICATE_WINDOW
from postoffice.store.records import (
    LANES,
    PRUNE_BATCH,
    Laned,
    Ledger,
    LedgerTimes,
    time_key,
    written_since,
)

_ARRIVAL_MASK = (1 << 32) - 1

# One lane of the ledger: its entries, and their time index.
Lane = tuple[Ledger, LedgerTimes]


def new_lanes() -> tuple[Lane, ...]:
    """The empty lanes of a new queue's ledger (or of one written before lanes, at its upgrade)."""
    return tuple((Ledger(), LedgerTimes()) for _ in range(LANES))


class DuplicateLedger:
    """The ledger of one queue, over the queue's own trees and salt."""

    def __init__(self, legacy: Lane, lanes: Sequence[Lane] | None, salt: bytes) -> None:
        # lanes None: a queue written before lanes, until its upgrade.
        self._parts = Laned(legacy, lanes)
        self._salt = salt

    def lanes_written_since(self, since: float) -> set[int]:
        """The lanes in which a delivery was recorded at ``since`` or later."""
        return written_since((times for _entries, times in self._parts.lanes), since)

    def has_delivered(self, message_id: str, recipient: str, since: float) -> bool:
        """Stored for this recipient at ``since`` or later (to the second), by any writer?"""
        key, check = _ledger_hash(self._salt, message_id, recipient)
        for entries, _times in self._parts.all():
            value = entries.get(key)
            if value is not None and value >> 32 == check and value & _ARRIVAL_MASK >= int(since):
                return True
        return False

    def record(self, message_id: str, recipient: str, now: float) -> None:
        """Remember the pair as stored at ``now``; forget a few that left the window."""
        key, check = _ledger_hash(self._salt, message_id, recipient)
        entries, times = self._parts.own()
        entries[key] = check << 32 | _seconds(now)
        when = time_key(now)
        while not times.insert(when, key):
            when += 1 << 10  # taken (the clock went back): the next microsecond
        self.prune(now - DUPLICATE_WINDOW, everywhere=False)

    def prune(self, before: float, limit: int = PRUNE_BATCH, everywhere: bool = True) -> int:
        """Forget up to ``limit`` entries recorded before ``before``: O(log n) each.

        Lane by lane, as ``Laned.to_prune`` orders them (not
        ``everywhere``: at each delivery).
        """
        pruned = 0
        for lane in self._parts.to_prune(everywhere):
            pruned += _prune_lane(lane, before, limit - pruned)
            if pruned >= limit:
                break
        return pruned

    def warm_up(self, budget: int) -> int:
        """Load up to ``budget`` leaves into the cache, lane by lane; how many it loaded."""
        loaded = 0
        for entries, _times in self._parts.all():
            with contextlib.suppress(AttributeError):  # an empty tree has no first leaf
                leaf = entries._firstbucket
                while leaf is not None and loaded < budget:
                    leaf._p_activate()
                    loaded += 1
                    leaf = leaf._next
        return loaded

    def size(self) -> int:
        """How many entries (walks every leaf: for tests and tools, not deliveries)."""
        return sum(len(entries) for entries, _times in self._parts.all())

    def time_entries(self) -> int:
        """How many time index entries (walks every leaf: for tests and tools)."""
        return sum(len(times) for _entries, times in self._parts.all())


def _prune_lane(lane: Lane, before: float, limit: int) -> int:
    entries, times = lane
    end = int(before * 1_000_000) << 10
    # The truth of a tree is O(1); its len() would walk every leaf.
    if limit <= 0 or not times or times.minKey() >= end:
        return 0
    old = list(itertools.islice(times.items(max=end, excludemax=True), limit))
    cutoff = _seconds(before)
    for when, key in old:
        del times[when]
        value = entries.get(key)
        # Unless it was recorded again since (its newer time key prunes it).
        if value is not None and value & _ARRIVAL_MASK < cutoff:
            del entries[key]
    return len(old)


def ledger_pair(message: Message | bytes) -> tuple[str, str]:
    """(Message-Id, recipient) a message is recorded under when it is added, not delivered.

    As a delivery records it: the Message-Id token, and the recipient the
    message says it was delivered to, ``X-Original-To`` (the line our
    delivery puts on top), else the first ``To`` address.  ``""`` for
    what is missing.
    """
    from postoffice.message import normalize_message_id, parse_addresses

    if isinstance(message, bytes):
        parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
        message = parser.parsebytes(message)
    message_id = normalize_message_id(_header(message, "Message-Id")) or ""
    for name in ("X-Original-To", "To"):
        value = _header(message, name)
        addresses = parse_addresses([value]) if value else []
        if addresses:
            return message_id, addresses[0]
    return message_id, ""


def _header(message: Message, name: str) -> str | None:
    try:
        value = message.get(name)
    except Exception:  # a header the modern policy cannot parse
        return None
    return None if value is None else str(value)


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
