"""The group-commit writer of the LMTP server, and how its results reach the sessions.

This is where the writer thread meets the event loop: jobs go into a
queue from the loop, results come back through ``call_soon_threadsafe``,
and a session that went away by then is simply no longer waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from postoffice.decide import deferred
from postoffice.deliver import Delivery, Depot, Outcome, log_outcomes
from postoffice.errors import PostofficeError

# The package's one logger name (see postoffice.lmtp.session).
log = logging.getLogger("postoffice.lmtp")

T = TypeVar("T")

# How often stop() looks again whether what the thread still runs is worth waiting for.
STOP_POLL = 0.05
# A commit waits for a message on its way only while its session has been
# sending it for less than this: a small message from Postfix takes well
# under a millisecond, and a big or slow one would make every commit wait
# its full delay for as long as it lasts.
SENDING_FOR = 0.05


@dataclass
class _Job:
    """A delivery, or a call, waiting for the writer thread."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    delivery: Delivery | None = None
    call: Callable[[], Any] | None = None


class _Nudge:
    """Put in the queue when an expected message will not come: look again."""


_NUDGE = _Nudge()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Runs on the event loop: a session that went away no longer waits."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class CommitWriter:
    """The one thread that commits for every session (group commit).

    The event loop never waits on parsing, rules or ZODB: sessions put their
    message here and await a future.  The thread takes whatever queued up
    while the previous commit ran (up to ``commit_batch``), delivers it in
    one transaction, and only then resolves each future on the loop.  Other
    work on the database (opening it, preparing the queues, SIGHUP's
    reload) goes through the same thread, so it never races a commit; and
    the thread closes the depot as it ends, so a stop never closes it under
    an opening still under way.

    A commit costs far more than a message in it (through the embedded ZEO
    server about 2.9 ms of CPU a commit against 0.6 ms a message), so once
    the queue is empty the thread waits up to ``delay`` seconds for the
    messages of sessions that are sending one (between the 354 and the
    final dot: :meth:`expect`), as PostgreSQL's ``commit_delay`` waits for
    transactions already under way.  It never waits when no other session
    is sending (one session alone, a quiet server) or when they have been
    sending for longer than ``SENDING_FOR`` (a big message), and it stops
    waiting as soon as the last of them has handed its message over or
    ended without one.
    """

    def __init__(self, depot: Depot, batch: int, delay: float = 0.0) -> None:
        self._depot = depot
        self.retune(batch, delay)  # _batch and _delay, bounded as SIGHUP bounds them
        self._jobs: queue.SimpleQueue[_Job | _Nudge | None] = queue.SimpleQueue()
        # Sessions whose message is on its way, with the time they began to
        # send it: changed on the event loop only; the thread copies the times
        # (one step under the GIL) before it reads them.
        self._expected: dict[object, float] = {}
        self._thread = threading.Thread(target=self._run, name="postoffice-writer", daemon=True)
        self._stopped = False
        # While the server opens the database at start, which can take as long
        # as a ZEO server's wait_timeout, a message is deferred at once rather
        # than queued behind the opening (where a SIGTERM would wait for it).
        self.opening = False
        self._lock = threading.Lock()
        self._deliveries = 0  # submitted and not yet settled
        self._in_call = False  # the thread runs a call (not a delivery)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        """Start the thread; the server does so once it listens."""
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Finish the deliveries queued, then end the thread (called off the loop).

        True once the thread has ended.  A call under way with no delivery
        waiting behind it (the opening of a database that does not answer)
        is not waited for, since no message depends on it: the thread ends
        on its own when the call returns, and closes the depot then.
        """
        self._stopped = True
        if not self._thread.is_alive():
            return True
        self._jobs.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive():
            with self._lock:
                if self._in_call and self._deliveries == 0:
                    return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._thread.join(STOP_POLL)
        return True

    def retune(self, batch: int, delay: float) -> None:
        """SIGHUP's new ``commit_batch`` and ``commit_delay``, from the next commit on."""
        self._batch = max(1, batch)
        self._delay = max(0.0, delay)

    def expect(self, session: object) -> None:
        """A session is sending a message (on the loop): a commit may wait for it."""
        self._expected[session] = time.monotonic()

    def forget(self, session: object) -> None:
        """The session's DATA ended without a message for us (refused, or the client went away)."""
        if self._expected.pop(session, None) is not None:
            self._jobs.put(_NUDGE)  # a commit waiting for it looks again

    def submit(
        self, delivery: Delivery, session: object | None = None
    ) -> asyncio.Future[list[Outcome]]:
        """Queue a message; the future gives one Outcome per recipient after the commit."""
        self._expected.pop(session, None)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Outcome]] = loop.create_future()
        if self._stopped or self.opening:
            why = "the server is stopping" if self._stopped else "the database is being opened"
            outcomes = _deferred_all(delivery, why)
            with contextlib.suppress(Exception):  # the log must not cost the replies
                log_outcomes(delivery, outcomes)
            _remove_spool(delivery)
            future.set_result(outcomes)
        else:
            with self._lock:
                self._deliveries += 1
            self._jobs.put(_Job(loop, future, delivery=delivery))
        return future

    def call(self, func: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``func`` in the writer thread, between commits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._stopped:
            future.set_exception(PostofficeError("the server is stopping"))
        else:
            self._jobs.put(_Job(loop, future, call=func))
        return future

    def _run(self) -> None:
        """Deliveries in batches, calls alone: a call never shares a transaction."""
        held: _Job | None = None
        while True:
            job = held if held is not None else self._jobs.get()
            held = None
            if isinstance(job, _Nudge):
                continue
            if job is None:
                # The thread that may still be opening it is the one to close it.
                try:
                    self._depot.close()
                except Exception:
                    log.warning("closing the database failed", exc_info=True)
                return
            if job.call is not None:
                self._run_call(job)
                continue
            batch = [job]
            held = self._gather(batch)
            self._deliver(batch)

    def _gather(self, batch: list[_Job]) -> _Job | None:
        """Fill the batch with what queued up, then with what is on its way (up to the delay).

        Returns what must not join the batch: a call, or the stop.
        """
        deadline: float | None = None
        while len(batch) < self._batch:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                if self._delay <= 0 or not self._expected:
                    return None
                now = time.monotonic()
                if not any(now - began < SENDING_FOR for began in list(self._expected.values())):
                    return None
                if deadline is None:
                    deadline = now + self._delay
                if now >= deadline:
                    return None
                try:
                    item = self._jobs.get(timeout=deadline - now)
                except queue.Empty:
                    return None
            if isinstance(item, _Nudge):
                continue
            if item is None or item.call is not None:
                return item
            batch.append(item)
        return None

    def _run_call(self, job: _Job) -> None:
        assert job.call is not None
        with self._lock:
            self._in_call = True
        try:
            result, error = job.call(), None
        except BaseException as exc:
            result, error = None, exc
        finally:
            with self._lock:
                self._in_call = False
        _resolve(job, result, error)

    def _deliver(self, batch: list[_Job]) -> None:
        """One transaction for the batch; any failure defers all of it, logged as decided."""
        deliveries = [job.delivery for job in batch if job.delivery is not None]
        try:
            try:
                results = self._depot.deliver_batch(deliveries)
            finally:
                # The writer owns the spool files of what it was given: whatever
                # the outcome, and whether or not the session still waits.
                for delivery in deliveries:
                    _remove_spool(delivery)
            if len(results) != len(deliveries) or any(
                len(outcomes) != len(d.recipients)
                for d, outcomes in zip(deliveries, results, strict=True)
            ):
                raise RuntimeError("the depot did not answer every recipient")
        except Exception:
            log.exception("delivering %d messages failed; deferring them", len(deliveries))
            results = [_deferred_all(d, "internal error") for d in deliveries]
            for delivery, outcomes in zip(deliveries, results, strict=True):
                with contextlib.suppress(Exception):  # every session waits on this thread
                    log_outcomes(delivery, outcomes)
        # One wake-up of the event loop for the whole batch, not one per session.
        settled: dict[asyncio.AbstractEventLoop, list[tuple[Any, ...]]] = {}
        for job, outcomes in zip(batch, results, strict=True):
            settled.setdefault(job.loop, []).append((job.future, outcomes, None))
        for loop, items in settled.items():
            _call_on(loop, _settle_all, items)
        with self._lock:
            self._deliveries -= len(batch)


def _settle_all(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """Runs on the event loop: the futures of one batch, in one wake-up."""
    for future, result, error in items:
        _settle(future, result, error)


def _resolve(job: _Job, result: Any, error: BaseException | None) -> None:
    """Settle one job's future on its own loop (from the writer thread)."""
    _call_on(job.loop, _settle, job.future, result, error)


def _call_on(loop: asyncio.AbstractEventLoop, func: Callable[..., None], *args: Any) -> None:
    """Run ``func`` on ``loop`` soon; a loop closed meanwhile has nobody left to tell."""
    try:
        loop.call_soon_threadsafe(func, *args)
    except RuntimeError:  # the loop is closed: nobody waits any more
        log.debug("event loop closed before a result could be delivered")


def _remove_spool(delivery: Delivery) -> None:
    if delivery.spooled is not None:
        try:
            delivery.spooled.remove()
        except OSError:
            log.warning("could not remove the spool file %s", delivery.spooled.path, exc_info=True)


def _deferred_all(delivery: Delivery, reason: str) -> list[Outcome]:
    """A 451 for every recipient: what Postfix keeps and tries again."""
    decision = deferred(reason)
    return [Outcome(rcpt, decision) for rcpt in delivery.recipients]
