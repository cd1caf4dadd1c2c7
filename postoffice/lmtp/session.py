"""One LMTP session: aiosmtpd's LMTP protocol with our replies, DATA and limits.

:class:`LmtpHandler` answers the commands before DATA through aiosmtpd's
``handle_*`` hooks: LHLO advertises PIPELINING, ENHANCEDSTATUSCODES,
8BITMIME, SMTPUTF8 and ``SIZE n`` when ``max_message_size`` is set, and a
declared ``SIZE=`` over the limit gets ``552 5.3.4`` at MAIL FROM.
:class:`LmtpSession` reads DATA in bulk and gives every outcome ("too much
mail data", a line over 1000 octets, an internal error) one reply per
recipient, never a single line: a reply-count mismatch makes Postfix
bounce good mail.  Data over the limit is drained, not kept; data past
``spool.SPOOL_THRESHOLD`` goes to a spool file that becomes the message's
blob, so a session holds at most that threshold of a message in memory,
whatever its size.  Nothing here decides about mail: the message
goes to the server's commit writer, and the replies are the depot's
``Outcome.reply`` lines, in RCPT order, joined with CRLF (RFC 2033).

aiosmtpd has no API for most of this, so the session relies on private
members of ``aiosmtpd.smtp.SMTP`` as aiosmtpd 1.4 has them (read in 1.4.6;
hence ``aiosmtpd<2`` in ``pyproject.toml``):

- ``_getaddr``, overridden: aiosmtpd's defines a class at every call;
  :func:`parse_address` is the same parse without it, remembered.
- ``_timeout_cb``, overridden: an idle session gets ``421 4.4.2`` before
  the close, where aiosmtpd closes without a word.
- ``_reader``, read from: DATA comes off this ``StreamReader`` in bulk; its
  limit is aiosmtpd's ``line_length_limit``, hence ``LimitOverrunError``.
- ``_reset_timeout()``, called: the idle timer restarts while DATA arrives
  and after the replies, as aiosmtpd restarts it after each command.
- ``_timeout_handle``, cancelled: no idle timeout while a commit runs.
- ``_timeout_duration``, read: named in the idle-timeout log line.
- ``_set_post_data_state()``, called: the fresh envelope aiosmtpd's own
  ``smtp_DATA`` leaves behind.
- ``_handle_client``, relied on: its command loop calls our ``smtp_DATA``
  and has read nothing past the DATA line, so the message is in ``_reader``;
  it hands an error of a command, the ``IncompleteReadError`` of a read at
  the end of the client's input included, to ``handle_exception`` and
  ``push()``es what that returns; it ends only when cancelled (QUIT,
  ``connection_lost``).

Public members used beyond the hooks: ``smtp_DATA`` and ``smtp_VRFY``,
replaced whole; ``handle_exception()`` and ``push()``, extended (the end of
the client's input); ``command_size_limits``, which aiosmtpd shares between
all sessions and grows at every EHLO, made one per session;
``check_helo_needed()``, ``@syntax``, ``session``, ``envelope``,
``transport``, ``local_part_limit``; and the asyncio protocol methods
``connection_made``, ``connection_lost``, ``data_received``, extended, and
``eof_received``, which calls ``asyncio.StreamReaderProtocol``'s instead
of aiosmtpd's (that one cancels the session).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import TYPE_CHECKING, Any, AnyStr

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from postoffice.decide import too_big
from postoffice.deliver import LOG_HEAD, Delivery, Outcome, log_decision, message_id_of, reply_line
from postoffice.spool import Spooled, Spooler

if TYPE_CHECKING:
    from postoffice.lmtp.server import LmtpServer

# The package's one logger name, as before it was a package: what
# administrators filter their logs on.
log = logging.getLogger("postoffice.lmtp")

IDENT = "postoffice LMTP"
# RFC 5321 4.5.3.1.6: a line is at most 1000 octets with its CRLF, so at
# most 999 octets (text and CR) before the LF.
LONGEST_LINE_RUN = 999
# RFC 1870: a SIZE value is at most 20 digits.
SIZE_DIGITS = 20

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
        try:
            declared = _declared_size(mail_options)
        except ValueError:
            return "501 5.5.4 Syntax error in SIZE parameter"
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
        """Every recipient is accepted here: the rules need the message, so they run after DATA."""
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
    """The ``SIZE=`` of MAIL FROM, None if not given; ValueError if it is not a size.

    RFC 1870: ``size-value ::= 1*20DIGIT``, ASCII digits.  aiosmtpd checks
    ``str.isdigit()``, which is also true of ``"²"`` (and ``int()`` fails on
    it) and of other scripts' digits (which ``int()`` would take).
    """
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE":
            if not (value.isascii() and value.isdigit() and len(value) <= SIZE_DIGITS):
                raise ValueError(f"SIZE={value!r} is not 1 to {SIZE_DIGITS} digits")
            return int(value)
    return None


# --- one LMTP session ------------------------------------------------------------


@dataclass
class _Received:
    """What came between 354 and the final dot."""

    data: bytes | Spooled  # dot-unstuffed, CRLF kept; a spool file past its threshold
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
        self._hung_up = False  # nothing more is written (the client's input ended)

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
        """The client closed its side: answer what it sent, then close (RFC 5321 4.1.1.10).

        aiosmtpd cancels the session here, so a client that sends the final
        dot and QUIT and then half-closes (``nc -N``, scripted clients) lost
        the replies of a message that was committed all the same.  Instead
        the reader is told of the end (as ``StreamReaderProtocol`` does) and
        the session goes on: a DATA under way is committed and answered, the
        commands already read are answered, and the next command read, which
        finds nothing, ends the session (:meth:`handle_exception`).  True
        keeps our side of the connection open for those replies.
        """
        if self.refused:
            return False
        log.debug("%r closed its side", self.session and self.session.peer)
        return asyncio.StreamReaderProtocol.eof_received(self)

    async def handle_exception(self, error: Exception) -> str:
        """A read at the end of the client's input ends the session without a word.

        aiosmtpd's command loop sends whatever this returns; after the
        hang-up :meth:`push` sends nothing.  Any other error goes to the
        handler's hook (a 451).
        """
        if isinstance(error, asyncio.IncompleteReadError):
            self._hang_up()
            return ""
        return await super().handle_exception(error)

    async def push(self, status: AnyStr) -> None:
        """aiosmtpd's push, except after a hang-up: then wait to be cancelled.

        The command loop goes on reading until ``connection_lost`` cancels
        it, and each read at the end of the input comes back here at once;
        waiting is what keeps that loop from spinning.
        """
        if self._hung_up:
            await asyncio.Event().wait()  # connection_lost cancels the session
            return
        await super().push(status)

    def _hang_up(self) -> None:
        """Close after what was written has gone out; no reply is owed any more."""
        self._hung_up = True
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        if self.transport is not None:
            self.transport.close()

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
        if self.transport is None or self._hung_up:
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

    # -- VRFY -------------------------------------------------------------------

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str | None) -> None:
        """RFC 5321 3.5.3: ``252``, since every recipient is accepted at RCPT anyway.

        The argument is never echoed: aiosmtpd's ``502 Could not VRFY <arg>``
        cannot be encoded when the argument holds octets that are not UTF-8
        (a 451 and a traceback), and an echo is nothing Postfix needs.
        """
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
        elif not self._getaddr(arg)[0]:
            await self.push("502 5.5.1 Could not VRFY: not an address")
        else:
            await self.push(
                "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery"
            )

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
        self._lmtp.writer.expect(self)  # a commit may wait a little for this message
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                self.receiving = True
                received = await self._receive(sender, recipients[0])
            except (asyncio.CancelledError, ConnectionError):
                raise
            except asyncio.IncompleteReadError:
                # The client closed its side before the final dot: no message.
                log.info(
                    "%r closed its side before the final dot; nothing stored",
                    self.session and self.session.peer,
                )
                self._hang_up()
                return
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
            self._lmtp.writer.forget(self)  # no message is coming, whatever became of it
            if self.transport is not None and not self._hung_up:
                self._reset_timeout()
        self._lmtp.transaction_done(self)

    async def _replies(self, sender: str, recipients: list[str], received: _Received) -> list[str]:
        """Exactly one reply per accepted recipient, in RCPT order, for every outcome."""
        if received.problem is not None:
            # Refused by the protocol before the depot sees it; logged like a decision.
            self._lmtp.writer.forget(self)
            if received.problem == "size":
                decision = too_big(self._lmtp.size_limit, received.size)
                replies = [Outcome(rcpt, decision).reply for rcpt in recipients]
                rule, reason = "size", decision.reason
            else:
                replies = [
                    reply_line(500, "5.5.2", f"<{rcpt}> line too long (over 1000 octets)")
                    for rcpt in recipients
                ]
                rule, reason = "line_length", "line over 1000 octets (RFC 5321 4.5.3.1.6)"
            message_id = message_id_of(received.head)
            for rcpt, reply in zip(recipients, replies, strict=True):
                log_decision(message_id, sender, rcpt, None, reply, rule, reason, received.size)
            return replies
        # From here the writer owns a spool file: it removes it after the commit.
        delivery = Delivery.of(sender, recipients, received.data)
        # A commit may take long (a ZEO server coming back): not an idle session.
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        try:
            outcomes = await self._lmtp.writer.submit(delivery, self)
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

    async def _receive(self, sender: str, recipient: str) -> _Received:
        """Read up to the final dot in bulk; dot-unstuff; spool past a threshold; stop at the limit.

        ``readuntil(b".\\r\\n")`` lets the stream reader search in C and
        never reads past the final dot (the client may pipeline the next
        command behind it).  A match is the end of data only when the dot
        starts a line; the last two octets seen carry that across reads,
        starting with the CRLF that ended the DATA command.

        The octets go to a :class:`Spooler`: past ``SPOOL_THRESHOLD`` into a
        file in the storage's blob temporary directory, which a refusal, a
        client gone mid-DATA or any error removes at once.
        """
        spooler = Spooler(self._lmtp.depot.spool_directory(), sender, recipient, b"\r\n")
        try:
            return await self._read_into(spooler)
        except BaseException:
            spooler.abandon()
            raise

    async def _read_into(self, spooler: Spooler) -> _Received:
        reader = self._reader
        limit = self._lmtp.size_limit
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
                        spooler.write(data)
                    else:
                        # Keep nothing over the limit: memory stays bounded by it.
                        head = (spooler.head + data[:LOG_HEAD])[:LOG_HEAD]
                        spooler.abandon()
            if final:
                break
        if problem is not None:
            return _Received(b"", size, problem, head)
        if not spooler.spooling:
            return _Received(spooler.finish(), size, None, b"")
        return _Received(await _synced(spooler), size, None, b"")


async def _synced(spooler: Spooler) -> bytes | Spooled:
    """The spool file, synced in a thread: an fsync of megabytes must not stop the loop.

    A session cancelled meanwhile (the client went away) leaves the thread
    to finish; the file it gives is then removed.
    """
    work = asyncio.ensure_future(asyncio.to_thread(spooler.finish))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        work.add_done_callback(_remove_result)
        raise


def _remove_result(work: asyncio.Future[bytes | Spooled]) -> None:
    if work.cancelled() or work.exception() is not None:
        return
    result = work.result()
    if isinstance(result, Spooled):
        result.remove()


def _check_lines(run: int, data: bytes) -> tuple[int, bool]:
    """(length of the unfinished last line, whether any line is over 1000 octets)."""
    parts = data.split(b"\n")
    if len(parts) == 1:
        run += len(data)
        return run, run > LONGEST_LINE_RUN
    longest = max(run + len(parts[0]), max(map(len, parts[1:]), default=0))
    return len(parts[-1]), longest > LONGEST_LINE_RUN
