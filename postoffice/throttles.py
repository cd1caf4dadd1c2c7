"""``postoffice throttles``: the senders the mail-loop throttle refuses, and clearing them.

A sender whose automatic replies arrive faster than ``ooo_loop_frequency``
is refused for ``ooo_throttle_period`` (the throttle rule of
docs/decisions.md).  When that was a person, not a loop, the administrator
needs to see it and lift it without a Python shell.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from postoffice.clock import iso
from postoffice.errors import NotFound
from postoffice.store import QueuesFolder
from postoffice.store.queue import Queue


@dataclass(frozen=True)
class Throttled:
    """One throttled sender of one queue."""

    queue: str
    sender: str
    headers: tuple[str, ...]  # the values of ooo_loop_headers the throttle is for
    until: str  # ISO 8601 UTC

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def cells(self) -> tuple[str, ...]:
        return (self.queue, f"<{self.sender}>", self.until, " / ".join(self.headers) or "-")


COLUMNS = ("queue", "sender", "until", "headers")


def queues_of(folder: QueuesFolder, name: str | None) -> list[tuple[str, Queue]]:
    """One queue by name (NotFound naming the known ones), or all of them."""
    if name is None:
        return folder.items()
    return [(name, folder.named(name))]


def throttled(folder: QueuesFolder, queue: str | None, now: float) -> list[Throttled]:
    """Every sender throttled at ``now``, queue by queue, senders in order."""
    return [
        Throttled(name, sender, headers, iso(until))
        for name, q in queues_of(folder, queue)
        for sender, headers, until in q.throttled_senders(now)
    ]


def clear(folder: QueuesFolder, sender: str, queue: str | None) -> int:
    """Forget a sender's throttle and recent arrivals; how many entries.  The caller commits.

    NotFound when the sender has none, so that a typo is not taken for success.
    """
    cleared = sum(q.clear_throttle(sender) for _name, q in queues_of(folder, queue))
    if not cleared:
        where = f" in queue {queue!r}" if queue else ""
        raise NotFound(f"no throttle state for sender <{sender}>{where}")
    return cleared
