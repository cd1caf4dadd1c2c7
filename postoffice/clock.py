"""The depot's one notion of "now": wall-clock seconds since the epoch.

Arrival times, FIFO keys, claim leases and the windows of the duplicate
ledger and of the throttle are all measured on it.  Code that is given a
time (``Depot.deliver(now=...)``, ``Queue.store(raw, now)``) uses that one;
code that has none (``Depot`` without an injected clock, a consumer's
``pop_next``, ``len(queue)``) calls :func:`now` at the moment it needs the
time.  It is looked up through this module at every use, so a test that
replaces it (``monkeypatch.setattr(postoffice.clock, "now", ...)``) moves
the store and the depot together.
"""

from __future__ import annotations

import datetime
import time


def now() -> float:
    """Seconds since the epoch, as ``time.time()``."""
    return time.time()


def iso(when: float) -> str:
    """A time as people and scripts read it in the commands' output: ISO 8601, UTC, seconds."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="seconds")
