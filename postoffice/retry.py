"""Retrying ZODB transactions that conflict, without letting anyone see the conflict.

Conflicts come from other writers and consumers of the same queues: two
consumers reach for the same message, a counter is changed by two at once,
a consumer removes consumed records from a lane whose writer was idle just
as it appends again (each writer process appends to a lane of its own, and
removes what was consumed there itself).  Each retried conflict is logged
at DEBUG with what ZODB says of it (the object's oid and class), for an
administrator who wants to know which objects collide.

``transaction``'s own ``attempts()`` retries at once and a fixed number of
times, which is right for a rare conflict and wrong for a busy depot, where
the same writers meet again on the next attempt.  Here a retry waits a
random pause that doubles up to ``BACKOFF_MAX``, so that writers fall out
of step, and gives up only after ``minimum`` attempts *and* ``patience``
seconds: a busy depot makes a delivery wait (Postfix waits ten minutes for
the reply after DATA), it does not make it fail.
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ZODB.POSException import ConflictError

T = TypeVar("T")

log = logging.getLogger("postoffice.retry")

BACKOFF_FIRST = 0.005
BACKOFF_MAX = 0.25


def attempts(minimum: int, patience: float) -> Iterator[int]:
    """Attempt numbers 0, 1, ...; each retry after a random, growing pause.

    The caller breaks out of the loop when its transaction commits; when
    the loop ends by itself, the conflicts won and the caller says so.
    """
    deadline = time.monotonic() + patience
    for number in itertools.count():
        if number:
            if number >= minimum and time.monotonic() > deadline:
                return
            pause = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (number - 1))
            time.sleep(random.uniform(0, pause))
        yield number


class _Count:
    """A number threads add to: the conflicts retried, for the log and the metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def add(self) -> None:
        with self._lock:
            self._value += 1

    def __int__(self) -> int:
        return self._value


# Every ConflictError :func:`committed` retried in this process, and every
# transaction it committed (a consumer's claims: the share of its commits
# that conflicted).
conflicts_retried = _Count()
transactions_committed = _Count()


def committed(manager: Any, work: Callable[[], T], minimum: int, patience: float) -> T:
    """``work()`` in a transaction of ``manager``, committed; its result.

    A ConflictError (or RelStorage's stale cache, :func:`is_stale_cache`)
    aborts and tries again, as :func:`attempts` paces it;
    when the conflicts win, the last one is raised for the caller to say
    what failed.  Any other exception aborts and goes on up.
    """
    last: BaseException | None = None
    for _number in attempts(minimum, patience):
        try:
            manager.begin()
            result = work()
            manager.commit()
        except BaseException as exc:
            manager.abort()
            if not (isinstance(exc, ConflictError) or is_stale_cache(exc)):
                raise
            last = exc
            conflicts_retried.add()
            log.debug("retrying after a conflict: %s", exc)
            continue
        transactions_committed.add()
        return result
    assert last is not None  # attempts() yields at least once
    raise last


def is_stale_cache(exc: BaseException) -> bool:
    """RelStorage's CacheConsistencyError: its cache was behind the database; try again.

    RelStorage raises it (a ``TransientError``, its cache already cleared)
    when its local cache and the database disagree, which on SQLite happens
    while another process commits.  Like a conflict, the same transaction
    succeeds when tried again.  Looked up only where RelStorage is in use
    (imported), so that other depots never import it.
    """
    interfaces = sys.modules.get("relstorage.cache.interfaces")
    error = getattr(interfaces, "CacheConsistencyError", None)
    return error is not None and isinstance(exc, error)
