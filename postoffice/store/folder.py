"""The queues folder at ``zodb_path``: every queue, and the dead letters.

Layout::

    QueuesFolder
      queues: OOBTree  name -> Queue
      dead_letters: LOBTree  id -> DeadLetter   (mail we failed to decide)
      dead_letter_count: Length
      review_lanes: LANES x (LOBTree id -> QuarantineRecord, Length)
                             (refusals discarded, review.py; made at the
                              first use, a process adding to its own lane)
      review, review_count: the one such pair before lanes: read, emptied
      recent_lanes, recent, recent_count: the same, for the last deliveries
                             kept for replay when replay_keep is set

Also what the depot needs of it: finding (or creating) it under the root,
reconciling its queues with the configuration, and the read-only view
:class:`FolderState` that ``decide`` asks its questions of.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

from BTrees.Length import Length
from BTrees.LOBTree import LOBTree
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from persistent.mapping import PersistentMapping

from postoffice.decide import ThrottleView
from postoffice.errors import ConfigError, NotFound
from postoffice.store.queue import Queue
from postoffice.store.records import (
    LANES,
    PICKLED_MODULE,
    DeadLetter,
    new_key,
    own_lane,
    use_lane,
)
from postoffice.store.review import KeptArea
from postoffice.store.review import new_lanes as new_kept_lanes

log = logging.getLogger("postoffice.store")


class QueuesFolder(Persistent):
    """The container of all queues, at ``zodb_path``: a mapping of name to ``Queue``."""

    __module__ = PICKLED_MODULE

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

    def get(self, name: str, default: Any = None) -> Any:
        return self.queues.get(name, default)

    def names(self) -> list[str]:
        return list(self.queues.keys())

    def unknown_queue(self, name: str, where: str = "") -> str:
        """What every command says of a queue name the folder does not hold."""
        known = ", ".join(repr(n) for n in self.names()) or "none"
        return f"no queue {name!r}{where} (known queues: {known})"

    def named(self, name: str) -> Queue:
        """The queue of that name; NotFound (exit 65) naming the known ones."""
        queue = self.queues.get(name)
        if queue is None:
            raise NotFound(self.unknown_queue(name))
        return queue

    # The rest of a mapping, as 0.25's folder (an OOBTree) was one.
    def keys(self) -> list[str]:
        return self.names()

    def values(self) -> list[Queue]:
        return list(self.queues.values())

    def items(self) -> list[tuple[str, Queue]]:
        return list(self.queues.items())

    def __setitem__(self, name: str, queue: Queue) -> None:
        """Add (or replace) a queue; the configuration's queues come back at ``reconcile``."""
        if not isinstance(queue, Queue):
            raise TypeError(f"a queues folder holds queues, not {type(queue).__name__}")
        self.queues[name] = queue

    def __delitem__(self, name: str) -> None:
        """Drop a queue and what it holds (KeyError when there is none)."""
        del self.queues[name]

    def review_area(self, create: bool = False) -> KeptArea | None:
        """The review area; None when it was never made and ``create`` is false.

        Made at the first use, not in ``__init__``: a folder written before
        it existed keeps its layout, and reads as one with nothing to review.
        """
        return self._kept("review", create)

    def recent_area(self, create: bool = False) -> KeptArea | None:
        """The recent deliveries kept for ``replay`` (``replay_keep``), made as the review area."""
        return self._kept("recent", create)

    def _kept(self, name: str, create: bool) -> KeptArea | None:
        """An area, made (or given its lanes) with ``create``; None when never made."""
        records = getattr(self, name, None)
        lanes = getattr(self, f"{name}_lanes", None)
        if records is None:
            if not create:
                return None
            records = LOBTree()
            setattr(self, name, records)
            setattr(self, f"{name}_count", Length())
        if lanes is None and create:  # new, or written before lanes
            lanes = new_kept_lanes()
            setattr(self, f"{name}_lanes", lanes)
        return KeptArea((records, getattr(self, f"{name}_count")), lanes)

    def add_dead_letter(
        self,
        raw: bytes,
        sender: str,
        recipients: tuple[str, ...],
        error: str,
        now: float,
        keep: int,
    ) -> int:
        """Keep mail the decision failed on; past ``keep``, the oldest goes, loudly.

        Each of these was answered 250: dropping one loses mail, so it is
        logged at ERROR with what it was, never silently.
        """
        key = new_key(now)
        self.dead_letters[key] = DeadLetter(raw, sender, recipients, error, now)
        self.dead_letter_count.change(1)
        while self.dead_letter_count() > keep and len(self.dead_letters):
            oldest = self.dead_letters.minKey()
            dropped = self.dead_letters[oldest]
            log.error(
                "dead letter %d (from <%s> to %s) dropped: more than dead_letter_max = %d kept",
                oldest,
                dropped.sender,
                ", ".join(f"<{r}>" for r in dropped.recipients),
                keep,
            )
            del self.dead_letters[oldest]
            self.dead_letter_count.change(-1)
        return key

    def count_dead_letters(self) -> int:
        return self.dead_letter_count()


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
        if type(folder).__module__.startswith("repoze.postoffice"):
            raise ConfigError(
                f"{path} in the database holds a repoze.postoffice 0.25 folder: point zodb_uri "
                "(or zodb_path) at a new depot, then copy the old mail into it with "
                "postoffice import-repoze OLD_URI"
            )
        raise ConfigError(f"{path} in the database is not a postoffice queues folder")
    return folder


def reconcile(folder: QueuesFolder, names: tuple[str, ...]) -> list[str]:
    """Create queues the config names; retire those it dropped, unless they hold mail.

    Returns warnings for the log: a removed queue that still holds messages
    (or quarantined ones) is kept, so nothing is lost by editing the config.
    """
    for name in names:
        if name not in folder.queues:
            folder.queues[name] = Queue()
        else:
            folder.queues[name].upgrade()
    warnings = retired(folder, names)
    for name in list(folder.queues.keys()):
        if name not in names and not holds_mail(folder.queues[name]):
            del folder.queues[name]
    return warnings


# A serve at its start appends to a lane no other process wrote to for this long.
LANE_IN_USE = 3600.0


def choose_lane(folder: QueuesFolder, now: float) -> tuple[int, set[int]]:
    """Append to a lane no other process wrote to lately; (the lane, the lanes in use).

    Two serves whose random key salts name the same lane (one chance in
    ``LANES``) would write one tree again and retry as before lanes.  The
    lanes of a serve that stopped within the hour count as in use too;
    when every lane is, this process keeps its own.  Two serves started
    before either wrote anything may still pick one lane.  Read only.
    """
    busy: set[int] = set()
    for _name, queue in folder.items():
        busy |= queue.lanes_written_since(now - LANE_IN_USE)
    quiet = [lane for lane in range(LANES) if lane not in busy]
    if own_lane() in busy and quiet:
        use_lane(random.choice(quiet))
    return own_lane(), busy


def holds_mail(queue: Queue) -> bool:
    return bool(len(queue) or queue.count_quarantined_messages())


def retired(folder: QueuesFolder, names: tuple[str, ...]) -> list[str]:
    """Warnings for the queues the configuration dropped that still hold mail (read only)."""
    return [
        f"queue {name!r} is no longer in the configuration but holds "
        f"{len(queue)} messages and {queue.count_quarantined_messages()} "
        "quarantined ones; kept until they are consumed, or moved with "
        f"postoffice queues move {name!r} --to QUEUE"
        for name, queue in folder.queues.items()
        if name not in names and holds_mail(queue)
    ]


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
