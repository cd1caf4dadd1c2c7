"""The LMTP server: listening, sessions, signals, and the entry point of ``serve``.

:class:`LmtpServer` listens (through :mod:`postoffice.sockets`: a unix
socket born with its mode, stale sockets replaced, live ones left alone;
TCP on loopback only unless ``allow_remote``), counts sessions against
``max_sessions``, and owns the commit writer.  SIGTERM stops it cleanly:
no new sessions, idle ones get 421, transactions under way finish for up
to :data:`SHUTDOWN_GRACE`.  SIGHUP reloads the rules.

:func:`serve` is what ``postoffice serve`` and ``python -m postoffice.lmtp``
both run, so the two cannot drift apart: it shares a ``file://`` depot over
the embedded ZEO server while it serves.  Tests run :class:`LmtpServer`
in a thread of its own instead (``start()`` / ``stop()`` / ``reload()``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import ZODB
from aiosmtpd.smtp import DATA_SIZE_DEFAULT

from postoffice import config, logs, retry, sockets
from postoffice.config import ListenAddress, Settings
from postoffice.deliver import Depot
from postoffice.embedded import shared
from postoffice.errors import ConfigError, PostofficeError, exit_code
from postoffice.lmtp.session import LmtpHandler, LmtpSession
from postoffice.lmtp.writer import CommitWriter

# The package's one logger name (see postoffice.lmtp.session).
log = logging.getLogger("postoffice.lmtp")

# How long SIGTERM waits for the transactions under way.
SHUTDOWN_GRACE = 30.0
# The least umask serve runs with: what it creates is not for other users.
SERVE_UMASK = 0o007
# Without max_message_size, aiosmtpd's own default bounds what one DATA
# may hold in memory (32 MiB).
FALLBACK_SIZE_LIMIT = DATA_SIZE_DEFAULT


def listen_address(settings: Settings, listen: str | None = None) -> ListenAddress:
    """Where to listen (``listen`` overrides the file), refused as configuration if unusable.

    A TCP address beyond loopback without ``allow_remote`` is refused here,
    before anything opens: LMTP has no authentication.
    """
    return sockets.listen_address(
        listen or settings.lmtp.listen, settings.lmtp.allow_remote, "lmtp"
    )


class LmtpServer:
    """The LMTP server: listening socket, sessions, the writer thread, signals.

    In ``serve()`` it runs on the main thread's event loop (:meth:`run`);
    tests run it in a thread with :meth:`start` / :meth:`stop` /
    :meth:`reload`, or as a context manager.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        settings_path: Path | None = None,
        listen: str | None = None,
        db: ZODB.DB | None = None,
        grace: float = SHUTDOWN_GRACE,
    ) -> None:
        self.settings_path = Path(settings_path) if settings_path else settings.source
        self.address = listen_address(settings, listen)
        self._listen_override = listen
        self.depot = Depot(settings, db=db)
        self.writer = CommitWriter(
            self.depot, settings.lmtp.commit_batch, settings.lmtp.commit_delay
        )
        self.handler = LmtpHandler(self)
        self.hostname = socket.gethostname() or "localhost"
        self.grace = grace
        self.sessions: set[LmtpSession] = set()
        self.closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._socket_id: tuple[int, int] | None = None
        self._stop: asyncio.Event | None = None
        self._all_gone: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.listening_on: str | None = None
        # aiosmtpd logs every command at INFO on "mail.log": keep that for -v.
        library_log = logging.getLogger("mail.log")
        if library_log.level == logging.NOTSET:
            library_log.setLevel(logging.WARNING)

    # -- what sessions read ------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The rules in force (SIGHUP replaces them)."""
        return self.depot.settings

    @property
    def size_limit(self) -> int:
        """Octets one DATA may hold: ``max_message_size``, else aiosmtpd's 32 MiB."""
        return self.settings.max_message_size or FALLBACK_SIZE_LIMIT

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the server is not running"
        return self._loop

    def admit(self, session: LmtpSession) -> bool:
        """Count a new session in, unless max_sessions are open or we are stopping."""
        if self.closing or len(self.sessions) >= self.settings.lmtp.max_sessions:
            log.warning("refusing a session: %d open (max_sessions)", len(self.sessions))
            return False
        self.sessions.add(session)
        if self._all_gone is not None:
            self._all_gone.clear()
        return True

    def forget(self, session: LmtpSession) -> None:
        self.sessions.discard(session)
        self.writer.forget(session)
        if not self.sessions and self._all_gone is not None:
            self._all_gone.set()

    def transaction_done(self, session: LmtpSession) -> None:
        """After the replies of a DATA: a stopping server lets the session go now."""
        if self.closing:
            session.say_goodbye("421 4.3.2 postoffice shutting down")

    # -- running ---------------------------------------------------------------------

    def _begin(self) -> None:
        """The loop and the events a stop request needs, before anything can be requested."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._all_gone = asyncio.Event()
        self._all_gone.set()

    async def open(self) -> None:
        """Listen, start the writer, open the database; print where we listen.

        A stop requested meanwhile (SIGTERM) ends the wait for the database
        and returns without the "listening" line; :meth:`run` then stops.
        """
        self._begin()
        assert self._loop is not None
        listening = await sockets.start_listening(
            self.address, self.settings.lmtp.socket_mode, lambda: LmtpSession(self)
        )
        self._server = listening.server
        self._socket_id = listening.socket_id
        self.listening_on = listening.listening_on
        self.writer.opening = True
        self.writer.start()
        try:
            ready = await self._until_stopped(self._prepare())
        except BaseException:
            await self._close_everything()
            raise
        if not ready:
            log.info("stop requested while the database was being opened")
            return
        print(f"postoffice: listening on {self.listening_on}", flush=True)
        log.info("listening on %s", self.listening_on)

    async def _until_stopped(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run ``work`` unless a stop comes first: True when it finished (errors raised).

        Opening an unreachable ZEO server takes up to its ``wait_timeout``;
        a SIGTERM in that time must not wait for it.  The writer thread
        finishes the call alone; nobody waits for its result.
        """
        assert self._stop is not None
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
        task.result()
        return True

    async def _prepare(self) -> None:
        """Open the database and create the queues now if we can; unreachable is not fatal.

        Until the database has been opened (or found unreachable), deliveries
        get 451 at once instead of waiting behind the opening; creating the
        queues and warming the cache come after, and deliveries queue behind
        those as behind any commit.
        """
        try:
            try:
                await self.writer.call(self.depot.db)
            except PostofficeError:
                self.writer.opening = False
                raise
            # A cancel (a stop came first) skips this: deliveries keep their 451.
            self.writer.opening = False
            await self.writer.call(lambda: self.depot.prepare(warm=True))
        except ConfigError:
            raise
        except PostofficeError as exc:  # StorageUnavailable: open_db wraps what the storage raised
            log.warning("database not reachable at start (mail gets 451 until it is): %s", exc)

    async def run(self, install_signals: bool = False) -> int:
        """Serve until :meth:`request_stop` (SIGTERM); exit code 0 after a clean stop.

        The signal handlers come first, before the socket exists: a SIGTERM
        at any moment after that is a clean stop (421, the socket removed),
        never the default action that kills the process.
        """
        self._begin()
        if install_signals:
            self._install_signals()
        await self.open()
        assert self._stop is not None
        await self._stop.wait()
        await self.shutdown()
        return os.EX_OK

    def _install_signals(self) -> None:
        loop = self.loop
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        task = self.loop.create_task(self.reload_rules())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request_stop(self) -> None:
        """SIGTERM: begin a clean stop (on the loop's thread)."""
        if self._stop is not None:
            self._stop.set()

    async def shutdown(self) -> None:
        """Stop accepting, close idle sessions, let DATA under way finish, close the DB."""
        log.info("stopping: %d sessions open", len(self.sessions))
        self.closing = True
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            if not session.busy:
                session.say_goodbye("421 4.3.2 postoffice shutting down")
        assert self._all_gone is not None
        try:
            await asyncio.wait_for(self._all_gone.wait(), self.grace)
        except TimeoutError:
            log.warning(
                "%d sessions still busy after %ss; closing them", len(self.sessions), self.grace
            )
            for session in list(self.sessions):
                if session.transport is not None:
                    session.transport.close()
        await self._close_everything()
        log.info("stopped")

    async def _close_everything(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        # A commit stuck on an unreachable server must not hold the exit forever.
        # The writer thread closes the depot as it ends (it may still be opening it).
        if not await asyncio.to_thread(self.writer.stop, self.grace):
            log.info("the writer is still busy (opening the database?); not waiting for it")
        if not self.writer.started:
            await asyncio.to_thread(self.depot.close)
        self._remove_socket()

    def _remove_socket(self) -> None:
        """Remove our socket file, but never one another server put there since."""
        path = self.address.path
        if path is None or self._socket_id is None:
            return
        sockets.remove_if_ours(path, self._socket_id)
        self._socket_id = None

    async def reload_rules(self) -> bool:
        """SIGHUP: new rules from the config file; a broken file leaves the old ones."""
        settings = await asyncio.to_thread(config.reload, self.settings_path, log)
        if settings is None:
            return False
        old = self.settings
        warnings = config.warnings(settings)
        warnings += await self.writer.call(lambda: self.depot.reload(settings))
        self.writer.retune(settings.lmtp.commit_batch, settings.lmtp.commit_delay)
        for warning in warnings:
            log.warning("reload: %s", warning)
        if self._listen_override is None and settings.lmtp.listen != old.lmtp.listen:
            log.warning("reload: listen changed to %s; restart to apply", settings.lmtp.listen)
        log.info("reloaded the rules from %s: %d queues", self.settings_path, len(settings.queues))
        return True

    # -- in a thread (tests, embedding) -----------------------------------------------

    def start(self, timeout: float = 60.0) -> LmtpServer:
        """Run the server on an event loop in a new thread; return once it listens."""
        self._thread = threading.Thread(target=self._thread_main, name="postoffice-lmtp")
        self._thread.daemon = True
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the LMTP server did not start in time")
        if self._start_error is not None:
            self._thread.join(timeout)
            raise self._start_error
        return self

    def _thread_main(self) -> None:
        asyncio.run(self._thread_run())

    async def _thread_run(self) -> None:
        self._begin()
        try:
            await self.open()
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        assert self._stop is not None
        await self._stop.wait()
        await self.shutdown()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop a server started with :meth:`start`, as SIGTERM would."""
        if self._thread is None:
            return
        if self._loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.request_stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the LMTP server did not stop in time")

    def reload(self, timeout: float = 60.0) -> bool:
        """SIGHUP for a server started with :meth:`start`."""
        return asyncio.run_coroutine_threadsafe(self.reload_rules(), self.loop).result(timeout)

    def __enter__(self) -> LmtpServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- entry points ------------------------------------------------------------------


def serve(settings_path: Path, listen: str | None = None) -> int:
    """Serve until SIGTERM; 0 after a clean stop.

    With a ``file://`` depot (and ``share``, the default) the FileStorage is
    opened here and shared over the embedded ZEO server while the server
    runs; ``postoffice: consumers use URI`` on stdout tells applications how
    to reach it.  The configuration, the listen address included, is checked
    first: a file that cannot work opens nothing.

    Problems at start are one line on stderr and a non-zero exit: 78 for
    the configuration (including a non-loopback address without
    ``allow_remote``, and a database this user may not open), 69 when the
    address is taken or unusable, 75 when the depot cannot be shared now (a
    retry may work).
    """
    # Data.fs, its index, blobs and the ZEO socket: for the service user and
    # its group (Postfix's, or the consumers'), never readable by everybody.
    os.umask(os.umask(0o077) | SERVE_UMASK)
    try:
        settings = config.load(settings_path)
        listen_address(settings, listen)  # refused before the depot opens
        check_metrics(settings)
        logs.configure(settings.logging, "postoffice")
        for warning in config.warnings(settings):
            log.warning("%s", warning)
        with shared(settings.zodb_uri, share=settings.share) as depot:
            db: ZODB.DB | None = None
            if depot is not None:
                print(f"postoffice: consumers use {depot.client_uri}", flush=True)
                db = depot.db
            server = LmtpServer(settings, settings_path=Path(settings_path), listen=listen, db=db)
            stop_metrics = _start_metrics(settings, server)
            try:
                code = asyncio.run(server.run(install_signals=True))
            finally:
                if stop_metrics is not None:
                    stop_metrics()
            log.info("%d commits retried after a conflict", int(retry.conflicts_retried))
            return code
    except PostofficeError as exc:
        return _fail(exit_code(exc), str(exc))


def check_metrics(settings: Settings) -> None:
    """``[metrics] listen`` beyond loopback without ``allow_remote``: refused, as for LMTP."""
    if settings.metrics.listen is not None:
        address = config.parse_listen(settings.metrics.listen)
        sockets.check_loopback(address, settings.metrics.allow_remote, config.METRICS_SECTION)


def _start_metrics(settings: Settings, server: LmtpServer) -> Callable[[], None] | None:
    """``[metrics]``: Prometheus' figures of this server over HTTP; the stop function."""
    if settings.metrics.listen is None:
        return None
    try:
        from postoffice import metrics
    except ImportError:
        raise ConfigError(
            "[metrics] listen is set but prometheus_client is not installed "
            "(pip install 'postoffice[metrics]')"
        ) from None
    figures = metrics.Metrics()
    server.depot.observer = figures.delivered
    figures.sessions.set_function(lambda: len(server.sessions))
    depot = server.depot
    figures.watch(lambda: metrics.folder_of(depot.db(), depot.settings.zodb_path))
    return metrics.start(settings.metrics, figures)


def _fail(code: int, message: str) -> int:
    print(f"postoffice: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m postoffice.lmtp [-C FILE] [--listen ADDR] [-v]``: serve without the CLI."""
    parser = argparse.ArgumentParser(prog="python -m postoffice.lmtp", description=serve.__doc__)
    parser.add_argument("-C", "--config", help="configuration file (default: search order)")
    parser.add_argument("--listen", help="unix:/path, HOST:PORT or [IPv6]:PORT")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    args = parser.parse_args(argv)
    logs.to_stderr(args.verbose)
    try:
        path = config.find_config(args.config)
    except ConfigError as exc:
        return _fail(exit_code(exc), str(exc))
    return serve(path, args.listen)
