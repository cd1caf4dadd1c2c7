"""The LMTP front door: ``postoffice serve`` (SPEC 5 "LMTP protocol duties", SPEC 7).

A thin protocol edge on aiosmtpd.  The session (:class:`LmtpSession`) speaks
LMTP and reads the message; one writer thread (:class:`CommitWriter`) hands
everything that arrived while the previous commit ran to
``Depot.deliver_batch`` (group commit) and answers each session only after
that commit.  Nothing here decides about mail: the replies are the
``Outcome.reply`` lines of the depot, one per accepted recipient, in RCPT
order, joined with CRLF (RFC 2033).

What aiosmtpd does not do by itself and this module adds:

- LHLO advertises PIPELINING, ENHANCEDSTATUSCODES, 8BITMIME, SMTPUTF8 and
  ``SIZE n`` when ``max_message_size`` is set; a declared ``SIZE=`` over the
  limit gets ``552 5.3.4`` at MAIL FROM.
- DATA is read in bulk, and "too much mail data", a line over 1000 octets
  or an internal error get one reply per recipient, never a single line
  (a reply-count mismatch makes Postfix bounce good mail).  Data over the
  limit is drained, not kept: memory stays bounded by the limit.
- ``max_sessions``, an idle timeout that says 421, a unix socket created
  with its mode from the start, stale/live socket handling, SIGTERM with
  the transactions under way finishing, SIGHUP reloading the rules.

``serve()`` is the blocking entry point of ``postoffice serve``;
:class:`LmtpServer` can also run in a thread of its own (``start()`` /
``stop()`` / ``reload()``), which is how the tests drive it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import logging
import os
import queue
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import ZODB
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import DATA_SIZE_DEFAULT, SMTP, Envelope, Session, syntax

from postoffice import config, logs, sockets
from postoffice.config import ListenAddress, Settings
from postoffice.decide import deferred, too_big
from postoffice.deliver import (
    LOG_HEAD,
    Delivery,
    Depot,
    Outcome,
    log_decision,
    log_outcomes,
    message_id_of,
    reply_line,
)
from postoffice.errors import ConfigError, ListenError, PostofficeError

log = logging.getLogger("postoffice.lmtp")

T = TypeVar("T")


IDENT = "postoffice LMTP"
# RFC 5321 4.5.3.1.6: a line is at most 1000 octets with its CRLF, so at
# most 999 octets (text and CR) before the LF.
LONGEST_LINE_RUN = 999
# Without max_message_size, aiosmtpd's own default bounds what one DATA
# may hold in memory (32 MiB).
FALLBACK_SIZE_LIMIT = DATA_SIZE_DEFAULT
# How long SIGTERM waits for the transactions under way.
SHUTDOWN_GRACE = 30.0

# --- the commit writer -------------------------------------------------------


@dataclass
class _Job:
    """A delivery, or a call, waiting for the writer thread."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    delivery: Delivery | None = None
    call: Callable[[], Any] | None = None


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
    work on the database (preparing the queues, SIGHUP's reload) goes
    through the same thread, so it never races a commit.
    """

    def __init__(self, depot: Depot, batch: int) -> None:
        self._depot = depot
        self._batch = max(1, batch)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="postoffice-writer", daemon=True)
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the thread (called off the loop)."""
        self._stopped = True
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)

    def submit(self, delivery: Delivery) -> asyncio.Future[list[Outcome]]:
        """Queue a message; the future gives one Outcome per recipient after the commit."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Outcome]] = loop.create_future()
        if self._stopped:
            future.set_result(_deferred_all(delivery, "the server is stopping"))
        else:
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
        held: _Job | None = None
        while True:
            job = held if held is not None else self._jobs.get()
            held = None
            if job is None:
                return
            if job.call is not None:
                self._run_call(job)
                continue
            batch = [job]
            while len(batch) < self._batch:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None or more.call is not None:
                    held = more
                    break
                batch.append(more)
            self._deliver(batch)

    def _run_call(self, job: _Job) -> None:
        assert job.call is not None
        try:
            result, error = job.call(), None
        except BaseException as exc:
            result, error = None, exc
        _resolve(job, result, error)

    def _deliver(self, batch: list[_Job]) -> None:
        deliveries = [job.delivery for job in batch if job.delivery is not None]
        try:
            results = self._depot.deliver_batch(deliveries)
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


def _settle_all(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in items:
        _settle(future, result, error)


def _resolve(job: _Job, result: Any, error: BaseException | None) -> None:
    _call_on(job.loop, _settle, job.future, result, error)


def _call_on(loop: asyncio.AbstractEventLoop, func: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(func, *args)
    except RuntimeError:  # the loop is closed: nobody waits any more
        log.debug("event loop closed before a result could be delivered")


def _deferred_all(delivery: Delivery, reason: str) -> list[Outcome]:
    decision = deferred(reason)
    return [Outcome(rcpt, decision) for rcpt in delivery.recipients]


# --- the handler: replies before DATA -----------------------------------------


class LmtpHandler:
    """aiosmtpd's hooks: LHLO, MAIL (SIZE), RCPT and the small talk, with enhanced codes.

    aiosmtpd calls these with the session protocol as ``server``; the limits
    come from the running :class:`LmtpServer`, so SIGHUP changes them for
    the next transaction.
    """

    def __init__(self, lmtp: LmtpServer) -> None:
        self._lmtp = lmtp

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """The LHLO reply (aiosmtpd's LMTP answers LHLO through this EHLO hook)."""
        session.host_name = hostname
        lines = [server.hostname, "PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        advertised = self._lmtp.settings.max_message_size
        if advertised:
            lines.append(f"SIZE {advertised}")
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """MAIL FROM; a declared SIZE over the limit is refused before any data moves."""
        declared = _declared_size(mail_options)
        limit = self._lmtp.size_limit
        if declared is not None and declared > limit:
            decision = too_big(limit, declared)
            return f"{decision.code} {decision.status} {decision.reason}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Every recipient is accepted here; the rules run after DATA (SPEC 5)."""
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str | None
    ) -> str:
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "221 2.0.0 Bye"

    async def handle_exception(self, error: Exception) -> str:
        """A bug of ours while answering a command: a temporary failure, never a 500."""
        log.error("error while answering a command", exc_info=error)
        return "451 4.3.0 internal error, try again later"


def _declared_size(mail_options: Sequence[str]) -> int | None:
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


# --- one LMTP session ------------------------------------------------------------


@dataclass
class _Received:
    """What came between 354 and the final dot."""

    data: bytes  # dot-unstuffed, CRLF kept; empty when refused
    size: int  # octets after dot-unstuffing, all of them, also when refused
    problem: str | None  # None, "size" or "line"
    head: bytes  # the first octets, to name the Message-Id of a refused message


@functools.lru_cache(maxsize=4096)
def parse_address(arg: str, local_part_limit: int) -> tuple[str | None, str | None]:
    """``SMTP._getaddr`` of aiosmtpd 1.4, without its per-call class, and remembered.

    aiosmtpd defines a ``typing.Protocol`` class inside ``_getaddr`` for its
    type checker, so every MAIL FROM and RCPT TO built a class: 38 us a
    call, a fifth of the event loop's time under load (py-spy,
    docs/performance.md).  The parse itself (the email package's header
    parser) is the next largest cost of a session, and its result depends on
    nothing but the argument: the same few recipient addresses of an
    application domain come back in every transaction Postfix sends, so the
    last 4096 are kept.  The parse is aiosmtpd's: ``get_angle_addr`` or
    ``get_addr_spec``, then the limit on the local part (tests/test_lmtp.py
    compares the two on hostile and generated arguments).
    """
    if not arg:
        return "", ""
    address: Any  # AngleAddr or AddrSpec: both have addr_spec
    try:
        if arg.lstrip().startswith("<"):
            address, rest = get_angle_addr(arg)
        else:
            address, rest = get_addr_spec(arg)
    except HeaderParseError:
        return None, None
    addr: str = address.addr_spec
    localpart, _at, _domain = addr.rpartition("@")
    if local_part_limit and len(localpart) > local_part_limit:
        return None, None
    return addr, rest


class LmtpSession(LMTP):
    """aiosmtpd's LMTP protocol with our DATA, session limit and timeouts."""

    def __init__(self, lmtp: LmtpServer) -> None:
        idle = lmtp.settings.lmtp.idle_timeout
        super().__init__(
            lmtp.handler,
            data_size_limit=None,  # our own limit, in handle_MAIL and smtp_DATA
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=lmtp.hostname,
            ident=IDENT,
            timeout=idle if idle > 0 else 10.0**9,
            loop=lmtp.loop,
        )
        # aiosmtpd grows a class-wide dict at every EHLO; keep ours per session.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self._lmtp = lmtp
        self.busy = False  # from 354 until the replies after the final dot are out
        self.receiving = False  # from 354 until the final dot
        self.refused = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's own parse of a MAIL or RCPT address, faster (see ``parse_address``)."""
        return parse_address(arg, self.local_part_limit)

    # -- connection -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._lmtp.admit(self):
            self.refused = True
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"421 4.3.2 too many sessions, try again later\r\n")
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.refused:
            return
        try:
            super().connection_lost(error)
        finally:
            self._lmtp.forget(self)

    def eof_received(self) -> bool | None:
        if self.refused:
            return False
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        """Any octets of DATA restart the idle timer: a slow link is not an idle one.

        ``_receive`` only wakes up for a final dot or a full read buffer,
        so a client trickling less than that within ``idle_timeout`` would
        otherwise be cut off while it is still sending.
        """
        super().data_received(data)
        if self.receiving and self.transport is not None:
            self._reset_timeout()

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        log.info(
            "%r idle for %ss, closing", self.session and self.session.peer, self._timeout_duration
        )
        self.say_goodbye("421 4.4.2 idle timeout, closing")

    def say_goodbye(self, reply: str) -> None:
        """Send a last 421 and close (shutdown, idle timeout)."""
        transport = self.transport
        if transport is None:
            return
        with contextlib.suppress(Exception):
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(reply.encode("ascii") + b"\r\n")
        transport.close()

    # -- DATA -------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed("LHLO"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        mail_from = self.envelope.mail_from or ""
        sender = "" if mail_from == "<>" else mail_from
        recipients = list(self.envelope.rcpt_tos)
        self.busy = True
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                self.receiving = True
                received = await self._receive()
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception:
                # Out of step with the client: no reply can be trusted, so hang up.
                log.exception("reading DATA failed; closing the session")
                self.say_goodbye("421 4.3.0 internal error, closing")
                return
            finally:
                self.receiving = False
            replies = await self._replies(sender, recipients, received)
            self._set_post_data_state()
            await self.push("\r\n".join(replies))
        finally:
            self.busy = False
            if self.transport is not None:
                self._reset_timeout()
        self._lmtp.transaction_done(self)

    async def _replies(self, sender: str, recipients: list[str], received: _Received) -> list[str]:
        """Exactly one reply per accepted recipient, in RCPT order, for every outcome."""
        if received.problem is not None:
            # Refused by the protocol before the depot sees it; logged like a decision.
            if received.problem == "size":
                decision = too_big(self._lmtp.size_limit, received.size)
                replies = [Outcome(rcpt, decision).reply for rcpt in recipients]
                reason = f"size: {decision.reason}"
            else:
                replies = [
                    reply_line(500, "5.5.2", f"<{rcpt}> line too long (over 1000 octets)")
                    for rcpt in recipients
                ]
                reason = "line over 1000 octets (RFC 5321 4.5.3.1.6)"
            message_id = message_id_of(received.head)
            for rcpt, reply in zip(recipients, replies, strict=True):
                log_decision(message_id, sender, rcpt, None, reply, reason, received.size)
            return replies
        delivery = Delivery(sender, tuple(recipients), received.data)
        # A commit may take long (a ZEO server coming back): not an idle session.
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        try:
            outcomes = await self._lmtp.writer.submit(delivery)
            replies = [outcome.reply for outcome in outcomes]
            if len(replies) != len(recipients):
                raise RuntimeError(f"{len(replies)} replies for {len(recipients)} recipients")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivery failed; deferring %d recipients", len(recipients))
            replies = [
                reply_line(451, "4.3.0", f"<{rcpt}> internal error, try again later")
                for rcpt in recipients
            ]
        return replies

    async def _receive(self) -> _Received:
        """Read up to the final dot in bulk; dot-unstuff; keep no more than the limit.

        ``readuntil(b".\\r\\n")`` lets the stream reader search in C and
        never reads past the final dot (the client may pipeline the next
        command behind it).  A match is the end of data only when the dot
        starts a line; the last two octets seen carry that across reads,
        starting with the CRLF that ended the DATA command.
        """
        reader = self._reader
        limit = self._lmtp.size_limit
        chunks: list[bytes] = []
        head = b""
        size = 0
        run = 0  # octets of the current line so far (after unstuffing)
        tail = b"\r\n"
        problem: str | None = None
        while True:
            try:
                piece = await reader.readuntil(b".\r\n")
                final = (tail + piece)[-5:-3] == b"\r\n"
            except asyncio.LimitOverrunError as exc:
                piece = await reader.read(exc.consumed)
                final = False
            self._reset_timeout()
            if final:
                piece = piece[:-3]
            if piece:
                wire = tail + piece
                tail = wire[-2:]
                data = wire.replace(b"\r\n.", b"\r\n")[2:]
                size += len(data)
                if problem is None:
                    run, too_long = _check_lines(run, data)
                    if too_long:
                        problem = "line"
                    elif size > limit:
                        problem = "size"
                    if problem is None:
                        chunks.append(data)
                    else:
                        # Keep nothing over the limit: memory stays bounded by it.
                        head = _first_bytes([*chunks, data], LOG_HEAD)
                        chunks.clear()
            if final:
                break
        if problem is not None:
            return _Received(b"", size, problem, head)
        return _Received(b"".join(chunks), size, None, b"")


def _check_lines(run: int, data: bytes) -> tuple[int, bool]:
    """(length of the unfinished last line, whether any line is over 1000 octets)."""
    parts = data.split(b"\n")
    if len(parts) == 1:
        run += len(data)
        return run, run > LONGEST_LINE_RUN
    longest = max(run + len(parts[0]), max(map(len, parts[1:]), default=0))
    return len(parts[-1]), longest > LONGEST_LINE_RUN


def _first_bytes(chunks: Sequence[bytes], count: int) -> bytes:
    taken: list[bytes] = []
    total = 0
    for chunk in chunks:
        if total >= count:
            break
        taken.append(chunk[: count - total])
        total += len(taken[-1])
    return b"".join(taken)


# --- the server --------------------------------------------------------------------


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
        try:
            self.address = config.parse_listen(listen or settings.lmtp.listen)
        except ValueError as exc:
            raise ConfigError(f"listen {listen or settings.lmtp.listen!r}: {exc}") from None
        self._listen_override = listen
        self.depot = Depot(settings, db=db)
        self.writer = CommitWriter(self.depot, settings.lmtp.commit_batch)
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
        if not self.sessions and self._all_gone is not None:
            self._all_gone.set()

    def transaction_done(self, session: LmtpSession) -> None:
        """After the replies of a DATA: a stopping server lets the session go now."""
        if self.closing:
            session.say_goodbye("421 4.3.2 postoffice shutting down")

    # -- running ---------------------------------------------------------------------

    async def open(self) -> None:
        """Listen, start the writer, create and reconcile the queues; print where we listen."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._all_gone = asyncio.Event()
        self._all_gone.set()
        sockets.check_loopback(self.address, self.settings.lmtp.allow_remote)
        if self.address.path is not None:
            sock = sockets.bind_unix(self.address.path, self.settings.lmtp.socket_mode)
            self._socket_id = sockets.file_id(self.address.path)
            try:
                self._server = await self._loop.create_unix_server(
                    lambda: LmtpSession(self), sock=sock
                )
            except BaseException:
                sock.close()
                self._remove_socket()
                raise
            self.listening_on = str(self.address)
        else:
            assert self.address.port is not None
            try:
                self._server = await self._loop.create_server(
                    lambda: LmtpSession(self),
                    self.address.host,
                    self.address.port,
                    reuse_address=True,
                    backlog=sockets.LISTEN_BACKLOG,
                )
            except OSError as exc:
                raise ListenError(
                    f"cannot listen on {self.address}: {exc.strerror or exc}"
                ) from None
            bound = self._server.sockets[0].getsockname()
            self.listening_on = str(ListenAddress(host=bound[0], port=bound[1]))
        self.writer.start()
        try:
            await self._prepare()
        except BaseException:
            await self._close_everything()
            raise
        print(f"postoffice: listening on {self.listening_on}", flush=True)
        log.info("listening on %s", self.listening_on)

    async def _prepare(self) -> None:
        """Create the queues now if we can; an unreachable database is not fatal."""
        try:
            await self.writer.call(lambda: self.depot.prepare(warm=True))
        except ConfigError:
            raise
        except PostofficeError as exc:
            log.warning("database not reachable at start (mail gets 451 until it is): %s", exc)

    async def run(self, install_signals: bool = False) -> int:
        """Serve until :meth:`request_stop` (SIGTERM); exit code 0 after a clean stop."""
        await self.open()
        if install_signals:
            self._install_signals()
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
        await asyncio.to_thread(self.writer.stop, self.grace)
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
        if self.settings_path is None:
            log.warning("reload: no configuration file to read")
            return False
        try:
            settings = await asyncio.to_thread(config.load, self.settings_path)
        except ConfigError as exc:
            log.error("reload refused, the old rules stay in force: %s", exc)
            return False
        old = self.settings
        warnings = await self.writer.call(lambda: self.depot.reload(settings))
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


def serve(settings_path: Path, listen: str | None = None, *, db: ZODB.DB | None = None) -> int:
    """``postoffice serve``: serve until SIGTERM; 0 after a clean stop.

    Problems at start are one line on stderr and a non-zero exit: 78 for
    the configuration (including a non-loopback address without
    ``allow_remote``), 69 when the address is taken or unusable.
    """
    try:
        settings = config.load(settings_path)
        server = LmtpServer(settings, settings_path=Path(settings_path), listen=listen, db=db)
        return asyncio.run(server.run(install_signals=True))
    except ConfigError as exc:
        return _fail(os.EX_CONFIG, str(exc))
    except ListenError as exc:
        return _fail(os.EX_UNAVAILABLE, str(exc))


def _fail(code: int, message: str) -> int:
    print(f"postoffice: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m postoffice.lmtp [-C FILE] [--listen ADDR]``: serve without the CLI."""
    parser = argparse.ArgumentParser(prog="python -m postoffice.lmtp", description=serve.__doc__)
    parser.add_argument("-C", "--config", help="configuration file (default: search order)")
    parser.add_argument("--listen", help="unix:/path, HOST:PORT or [IPv6]:PORT")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    args = parser.parse_args(argv)
    logs.to_stderr(args.verbose)
    try:
        path = config.find_config(args.config)
    except ConfigError as exc:
        return _fail(os.EX_CONFIG, str(exc))
    return serve(path, args.listen)


if __name__ == "__main__":
    sys.exit(main())
