"""The queue state for the policy service: read in a thread of its own, never written.

The policy service asks one thing of the depot: is this sender throttled
in this queue.  It asks through a connection of its own, in a fresh
transaction each time (so it sees what ``serve`` committed since), and
aborts it again: nothing is ever written, and no lock is held that could
delay ``serve``.

The database is opened the way a consumer opens it: a ``file://`` depot
only through the ZEO server a running ``serve`` shares it on (opening the
file itself would lock ``serve`` out), any other URI as it is.  The work
runs in one daemon thread (a ZODB connection belongs to one thread; an
opening that hangs on an unreachable server must neither block the event
loop nor hold up the exit), and an answer that does not come within
:data:`STATE_WAIT` is taken as "not known".

When the state cannot be read the decision answers DUNNO where it would
have needed it, and mail still flows to the rules after DATA.  That is
logged once at WARNING when it starts and once at INFO when it ends, not
once per request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import transaction
import ZODB

from postoffice import database
from postoffice.config import Settings
from postoffice.errors import StorageUnavailable
from postoffice.policy.decide import UNKNOWN, PolicyDecision, ThrottleState, decide
from postoffice.store import find_folder

log = logging.getLogger("postoffice.policy")

# How long a request waits for the depot's answer before it answers without it.
STATE_WAIT = 5.0
# After a failed opening, the next one is tried no sooner than this.
RETRY_AFTER = 1.0

T = TypeVar("T")
_Job = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


class DepotReader:
    """Decides with the queue state, read through one connection in one thread."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="postoffice-policy-db", daemon=True)
        self._lock = threading.Lock()
        self._away = False
        self._busy = 0  # jobs submitted and not finished
        # Owned by the thread:
        self._uri: str | None = None
        self._db: ZODB.DB | None = None
        self._connection: Any = None
        self._manager: transaction.TransactionManager | None = None
        self._last_failure: tuple[float, BaseException] | None = None

    # -- on the event loop -------------------------------------------------------

    def start(self, settings: Settings) -> None:
        """Start the thread and open the database in it now, not at the first request."""
        self._thread.start()
        self._submit(lambda: self._state(settings))

    async def decide(
        self, settings: Settings, recipient: str, sender: str, now: float
    ) -> PolicyDecision:
        """The decision with the throttle state as the depot has it now, or without it.

        While the depot is away and the thread still busy with it, nobody
        waits behind it: the answer is the one without the state, at once.
        """

        def with_state() -> PolicyDecision:
            return decide(settings, recipient, sender, now, self._state(settings))

        with self._lock:
            stuck = self._away and self._busy > 0
        if not stuck:
            future = asyncio.wrap_future(self._submit(with_state))
            try:
                return await asyncio.wait_for(future, STATE_WAIT)
            except TimeoutError:
                self.went_away(f"no answer within {STATE_WAIT:g}s")
        return decide(settings, recipient, sender, now, UNKNOWN)

    def close(self) -> None:
        """Close the connection and the database in the thread, once it is free; no waiting."""
        if self._thread.is_alive():
            self._jobs.put(None)

    def reset(self) -> None:
        """The database URI changed (SIGHUP): the next request opens the new one."""
        self._submit(self._close_db)

    # -- the log, once per outage ---------------------------------------------------

    def went_away(self, why: object) -> None:
        with self._lock:
            if self._away:
                return
            self._away = True
        log.warning(
            "cannot read the queue state, answering DUNNO where it decides until it can: %s", why
        )

    def came_back(self) -> None:
        with self._lock:
            if not self._away:
                return
            self._away = False
        log.info("the queue state can be read again")

    # -- in the thread ------------------------------------------------------------

    def _submit(self, work: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            self._busy += 1
        self._jobs.put((work, future))
        return future

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._close_db()
                return
            work, future = job
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(work())
                    except BaseException as exc:
                        future.set_exception(exc)
            finally:
                with self._lock:
                    self._busy -= 1

    def _open(self, uri: str) -> None:
        """Open ``uri`` the way a consumer does, unless it is open; StorageUnavailable if not."""
        if self._connection is not None and self._uri == uri:
            return
        self._close_db()
        failure = self._last_failure
        if failure is not None and time.monotonic() < failure[0] + RETRY_AFTER:
            raise failure[1]
        try:
            db = database.open_db(_readable_uri(uri))
        except Exception as exc:
            self._last_failure = (time.monotonic(), exc)
            raise
        self._last_failure = None
        self._manager = transaction.TransactionManager(explicit=False)
        self._db = db
        self._connection = db.open(transaction_manager=self._manager)
        self._uri = uri

    def _close_db(self) -> None:
        connection, self._connection = self._connection, None
        db, self._db = self._db, None
        self._uri = None
        try:
            if connection is not None:
                assert self._manager is not None
                self._manager.abort()
                connection.close()
        except Exception:
            log.debug("closing the policy service's connection failed", exc_info=True)
        try:
            if db is not None:
                db.close()
        except Exception:
            log.debug("closing the policy service's database failed", exc_info=True)

    def _state(self, settings: Settings) -> ThrottleState:
        try:
            self._open(settings.zodb_uri)
        except Exception as exc:
            self.went_away(exc)
            return UNKNOWN
        return _FolderThrottles(self, settings.zodb_path)

    def read_throttle(self, path: str, queue_name: str, sender: str, now: float) -> bool | None:
        """Whether ``sender`` is throttled in ``queue_name``, in a fresh transaction, aborted."""
        manager = self._manager
        assert manager is not None and self._db is not None and self._connection is not None
        try:
            _check_connected(self._db)
            manager.abort()  # a new transaction: what serve committed since is seen
            try:
                folder = find_folder(self._connection.root(), path)
            except KeyError:
                throttled = False  # no depot yet: serve never ran, nobody is throttled
            else:
                target = folder.get(queue_name)
                throttled = target is not None and target.is_throttled(sender, now)
        except Exception as exc:
            self.went_away(exc)
            return None
        finally:
            manager.abort()
        self.came_back()
        return throttled


class _FolderThrottles:
    """The :class:`ThrottleState` the decision asks, over the reader's connection."""

    def __init__(self, reader: DepotReader, path: str) -> None:
        self._reader = reader
        self._path = path

    def is_throttled(self, queue: str, sender: str, now: float) -> bool | None:
        return self._reader.read_throttle(self._path, queue, sender, now)


def _check_connected(db: ZODB.DB) -> None:
    """StorageUnavailable when a ZEO client has lost its server.

    A disconnected ``ClientStorage`` still answers from its cache, with
    the state as it was when the server went away; that is not the
    depot's state, so it is not used.
    """
    is_connected = getattr(db.storage, "is_connected", None)
    if callable(is_connected) and not is_connected():
        raise StorageUnavailable("the ZEO server of the depot is not connected")


def _readable_uri(uri: str) -> str:
    """The URI to read ``uri`` by without locking anyone out.

    A ``file://`` FileStorage may be open in one process only: it is read
    through the ZEO server that ``serve`` shares it on, or not at all.
    """
    if not uri.startswith("file://"):
        return uri
    shared = database.running_client_uri(uri)
    if shared is None:
        raise StorageUnavailable(
            f"{database.redact_uri(uri)} is read only through a running postoffice serve "
            "that shares it (share = yes), and none answers"
        )
    return shared
