"""``postoffice queues move`` and ``queues purge``: a queue the configuration no longer names.

``serve`` keeps such a queue while it holds mail (nothing is lost by
editing the file) and warns at every start.  The administrator then moves
its messages into a queue that is read, or, knowing what is lost, purges
it.  Moving pops the messages the way a consumer does (claims and all), so
it is safe while consumers of either queue run, and commits in batches so
that a big queue does not make one huge transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import transaction

from postoffice.errors import QueueEmpty, UnreadableMessage, UsageError
from postoffice.store import QueuesFolder

BATCH = 100


@dataclass(frozen=True)
class Moved:
    messages: int
    quarantined: int
    removed: bool  # the emptied source queue was dropped (it is not configured)


def move(
    folder: QueuesFolder,
    source: str,
    target: str,
    configured: tuple[str, ...],
    now: Callable[[], float],
) -> Moved:
    """Every waiting and quarantined message of ``source`` into ``target``; commits.

    Waiting messages join the tail of ``target`` in their order; a message
    whose bytes cannot be read goes to the quarantine, which moves too.  A
    source the configuration does not name is dropped once empty.
    """
    if source == target:
        raise UsageError(f"queue {source!r} cannot be moved into itself")
    folder.named(target)
    moved = 0
    while True:
        batch = 0
        src, dst = folder.named(source), folder.named(target)
        while batch < BATCH:
            try:
                message = src.pop_next()
            except QueueEmpty:
                break
            except UnreadableMessage as error:
                src.quarantine(error.message, error)
                continue
            dst.add(message.as_bytes(), now())
            batch += 1
        transaction.commit()
        moved += batch
        if batch < BATCH:
            break
    src, dst = folder.named(source), folder.named(target)
    quarantined = dst.adopt_quarantine(src, now())
    removed = source not in configured and not len(src) and not src.count_quarantined_messages()
    if removed:
        del folder[source]
    transaction.commit()
    return Moved(moved, quarantined, removed)


def purge(folder: QueuesFolder, name: str, configured: tuple[str, ...]) -> tuple[int, int]:
    """Drop a queue that is no longer configured, with what it holds; (waiting, quarantined).

    A queue still in the configuration is refused: ``serve`` would only
    make it again, and the mail in it is what an application reads.
    """
    queue = folder.named(name)
    if name in configured:
        raise UsageError(
            f"queue {name!r} is in the configuration; remove it there first "
            "(or move its messages with: postoffice queues move)"
        )
    counts = (len(queue), queue.count_quarantined_messages())
    del folder[name]
    transaction.commit()
    return counts
