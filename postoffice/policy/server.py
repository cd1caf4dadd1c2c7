"""The policy service's protocol edge: Postfix's policy delegation, signals, the entry point.

Postfix's smtpd connects (``check_policy_service``) and sends requests of
``name=value`` lines, each ended by an empty line; each gets one
``action=...`` line and an empty line, and the connection stays open for
the next.  This module only reads requests and writes answers: what the
answer is comes from :func:`postoffice.policy.decide.decide`, with the
queue state read by :class:`postoffice.policy.state.DepotReader`.

A request that breaks the protocol (no ``request=``, a line without ``=``)
is answered ``DEFER_IF_PERMIT 4.3.0``; one that could make us hold
unbounded input (a line over :data:`MAX_LINE` octets, more than
:data:`MAX_ATTRIBUTES` attributes) is answered so and its connection
closed.  Nothing a client sends stops the service: the next connection is
served.  A request we fail on answers DUNNO, as an unreadable depot does:
the rules after DATA still apply to that mail.

SIGTERM stops cleanly (exit 0), SIGHUP reloads the rules; a configuration
that does not load leaves the old rules in force and says so in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from pathlib import Path

from postoffice import clock, config, logs, sockets
from postoffice.config import ListenAddress, Settings
from postoffice.errors import PostofficeError, exit_code
from postoffice.policy.decide import UNKNOWN, PolicyDecision, Verdict, decide
from postoffice.policy.state import DepotReader

log = logging.getLogger("postoffice.policy")

# Postfix's own limits for a policy request's lines and attributes are far
# below these; anything beyond is not Postfix.
MAX_LINE = 4096
MAX_ATTRIBUTES = 1000
# A connection with no request for this long is closed (Postfix closes its
# own after smtpd_policy_service_max_idle, 300 s by default).
IDLE_TIMEOUT = 1000.0
# How long SIGTERM waits for the answers under way.
SHUTDOWN_GRACE = 5.0

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

ACCESS_POLICY = "smtpd_access_policy"
RCPT_STATE = "RCPT"


class Malformed(Exception):
    """A request that breaks the protocol; ``fatal``: the connection cannot go on."""

    def __init__(self, why: str, fatal: bool = False) -> None:
        super().__init__(why)
        self.fatal = fatal


def listen_address(settings: Settings, listen: str | None = None) -> ListenAddress:
    """Where the policy service listens: ``--listen``, else ``[policy] listen``."""
    text = listen or settings.policy.listen
    return sockets.listen_address(text, settings.policy.allow_remote, config.POLICY_SECTION)


def action(decision: PolicyDecision) -> str:
    """The ``action=`` value Postfix reads for a decision.

    The reply text names the recipient or sender the client gave; a control
    character in it becomes ``?``, so that it can end neither our line nor
    the SMTP reply Postfix makes of it.
    """
    reply = _CONTROL.sub("?", decision.reply)
    if decision.verdict is Verdict.REJECT:
        return f"REJECT {reply}"
    if decision.verdict is Verdict.DEFER:
        return f"DEFER_IF_PERMIT {reply}"
    return "DUNNO"


async def read_request(reader: asyncio.StreamReader) -> dict[str, str] | None:
    """The attributes of the next request; None when the client closed between requests.

    Malformed when it breaks the protocol; the lines up to its empty line
    are read first unless the break is fatal, so the next request can follow.
    """
    attributes: dict[str, str] = {}
    count = 0
    problem: str | None = None
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial or count:
                raise Malformed("the connection ended inside a request", fatal=True) from None
            return None
        except asyncio.LimitOverrunError:
            raise Malformed(f"a line over {MAX_LINE} octets", fatal=True) from None
        line = line[:-1].removesuffix(b"\r")
        if len(line) > MAX_LINE:
            raise Malformed(f"a line over {MAX_LINE} octets", fatal=True)
        if not line:
            break
        count += 1
        if count > MAX_ATTRIBUTES:
            raise Malformed(f"over {MAX_ATTRIBUTES} attributes", fatal=True)
        name, sep, value = line.partition(b"=")
        if not sep or not name:
            problem = problem or "a line that is not name=value"
            continue
        attributes[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    if problem is not None:
        raise Malformed(problem)
    if "request" not in attributes:
        raise Malformed("no request= attribute")
    return attributes


class PolicyServer:
    """The listening socket, the connections, the rules in force and the depot reader."""

    def __init__(
        self, settings: Settings, *, settings_path: Path | None = None, listen: str | None = None
    ) -> None:
        self.settings = settings
        self.settings_path = Path(settings_path) if settings_path else settings.source
        self.address = listen_address(settings, listen)
        self._listen_override = listen
        self.reader = DepotReader()
        self.listening_on: str | None = None
        self._listening: sockets.Listening | None = None
        self._stop: asyncio.Event | None = None
        self._connections: dict[asyncio.Task[None], bool] = {}  # task -> answering now
        self._tasks: set[asyncio.Task[object]] = set()
        self.closing = False

    # -- connections ------------------------------------------------------------------

    def _protocol(self) -> asyncio.StreamReaderProtocol:
        # The limit lets a line of MAX_LINE octets and its CRLF through, and no more.
        reader = asyncio.StreamReader(limit=MAX_LINE + 2)
        return asyncio.StreamReaderProtocol(reader, self._connected)

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve_connection(reader, writer))
        self._connections[task] = False
        task.add_done_callback(self._connections.pop)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            while not self.closing:
                try:
                    request = await asyncio.wait_for(read_request(reader), IDLE_TIMEOUT)
                except TimeoutError:
                    break
                except Malformed as exc:
                    log.warning("malformed policy request: %s", exc)
                    writer.write(f"action=DEFER_IF_PERMIT 4.3.0 {exc}\n\n".encode())
                    await writer.drain()
                    if exc.fatal:
                        break
                    continue
                if request is None:
                    break
                self._connections[task] = True
                answer = await self._answer(request)
                writer.write(f"action={answer}\n\n".encode())
                await writer.drain()
                self._connections[task] = False
        except OSError:
            pass  # the client went away; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, request: dict[str, str]) -> str:
        """The ``action=`` value for one well-formed request."""
        if request.get("request") != ACCESS_POLICY:
            return "DUNNO"
        if request.get("protocol_state", "").upper() != RCPT_STATE:
            return "DUNNO"
        recipient = request.get("recipient", "")
        sender = request.get("sender", "")
        settings = self.settings
        try:
            now = clock.now()
            decision = decide(settings, recipient, sender, now, UNKNOWN)
            if decision.state_unknown:
                decision = await self.reader.decide(settings, recipient, sender, now)
        except Exception:
            log.exception("deciding on <%s> failed; answering DUNNO", recipient)
            return "DUNNO"
        answer = action(decision)
        level = logging.DEBUG if decision.verdict is Verdict.DUNNO else logging.INFO
        why = "" if decision.reason in answer else f" ({decision.reason})"
        log.log(level, "from=<%s> to=<%s>: %s%s", sender, recipient, answer, why)
        return answer

    # -- running ------------------------------------------------------------------------

    async def run(self, install_signals: bool = False) -> int:
        """Serve until SIGTERM (:meth:`request_stop`); 0 after a clean stop."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if install_signals:
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        self._listening = await sockets.start_listening(
            self.address, self._socket_mode(), self._protocol
        )
        self.listening_on = self._listening.listening_on
        self.reader.start(self.settings)
        print(f"postoffice: policy service listening on {self.listening_on}", flush=True)
        log.info("policy service listening on %s", self.listening_on)
        await self._stop.wait()
        await self.shutdown()
        return os.EX_OK

    def _socket_mode(self) -> int:
        """Postfix's smtpd connects to this socket as to the LMTP one: the same mode."""
        return self.settings.lmtp.socket_mode

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _on_sighup(self) -> None:
        task = asyncio.ensure_future(self.reload_rules())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload_rules(self) -> bool:
        """SIGHUP: the rules of the configuration file now; a broken file keeps the old ones."""
        settings = await asyncio.to_thread(config.reload, self.settings_path, log)
        if settings is None:
            return False
        old, self.settings = self.settings, settings
        if settings.zodb_uri != old.zodb_uri:
            self.reader.reset()
        if self._listen_override is None and settings.policy.listen != old.policy.listen:
            log.warning("reload: listen changed to %s; restart to apply", settings.policy.listen)
        log.info("reloaded the rules from %s: %d queues", self.settings_path, len(settings.queues))
        return True

    async def shutdown(self) -> None:
        """Stop listening, let the answers under way go out, close the rest and the depot."""
        log.info("stopping: %d connections open", len(self._connections))
        self.closing = True
        listening = self._listening
        if listening is not None:
            listening.server.close()
        for task, answering in list(self._connections.items()):
            if not answering:
                task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=SHUTDOWN_GRACE)
        for task in list(self._connections):
            task.cancel()
        if listening is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listening.server.wait_closed(), SHUTDOWN_GRACE)
            if self.address.path is not None:
                sockets.remove_if_ours(self.address.path, listening.socket_id)
        self.reader.close()
        log.info("stopped")


def policy(settings_path: Path, listen: str | None = None) -> int:
    """Serve Postfix's policy requests until SIGTERM; 0 after a clean stop.

    Problems at start are one line on stderr and a non-zero exit: 78 for
    the configuration (a non-loopback address without ``allow_remote``
    included), 69 when the address is taken or unusable.  An unreachable
    depot is no reason not to start: the answers that need it are DUNNO
    until it can be read.
    """
    try:
        settings = config.load(settings_path)
        logs.configure(settings.logging, "postoffice-policy")
        server = PolicyServer(settings, settings_path=Path(settings_path), listen=listen)
        return asyncio.run(server.run(install_signals=True))
    except PostofficeError as exc:
        print(f"postoffice: {exc}", file=sys.stderr, flush=True)
        return exit_code(exc)
