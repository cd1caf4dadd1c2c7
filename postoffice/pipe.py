"""``postoffice-deliver``: the front door for Postfix's pipe(8) transport.

::

    postoffice-deliver [-C FILE] [-f SENDER] [--] RECIPIENT...

One message on standard input, the envelope on the command line, and the
same ``Depot.deliver`` call the LMTP server makes: same decisions, same
stored bytes (with the LF line ends pipe(8) writes), same duplicate ledger.
This module only translates: bytes in, outcomes out as an exit status
(sysexits, the worst recipient's) and one line per refused recipient on
standard error.

What Postfix does with them (``pipe_command.c``): exit 0 is delivered,
whatever the output.  On any other exit, when the output starts with an
RFC 3463 code such as ``5.7.1``, that code decides (4.x.x defers, 5.x.x
bounces) and the rest of the output is the reason in the log and the
bounce; Postfix keeps about 4 KB of it, newlines turned into spaces.  So
every line we print starts with the enhanced status of its outcome, the
worst one first, so that it always agrees with the exit status.  An exit
status of 75 (EX_TEMPFAIL) defers; 67 and 69 bounce.

Anything that is not a decision about the message (a configuration that
cannot be read, a database that cannot be reached, a bug of ours) exits 75
so that Postfix keeps the message and retries, and never prints a
traceback: Postfix would mail that to the sender.  Tracebacks go to the
log (see :func:`postoffice.logs.for_pipe`).

The message is read in chunks, as the LMTP server reads DATA: up to
``spool.SPOOL_THRESHOLD`` in memory, the rest into a spool file in the
storage's blob temporary directory, which becomes the stored blob by a
rename (so the database is opened before standard input is read).
Reading stops as soon as the message is larger than ``max_message_size``:
the rest is never read, and nothing of it is kept.  Postfix writes into a
pipe whose reader is gone, gets EPIPE, and goes by our exit status.
"""

from __future__ import annotations

import contextlib
import getopt
import io
import logging
import logging.handlers
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import ZODB

from postoffice import config, logs
from postoffice.database import open_db_waiting
from postoffice.decide import Action, Decision, Rule, deferred, too_big
from postoffice.deliver import Delivery, Depot, Outcome, log_outcomes
from postoffice.errors import ConfigError, StorageUnavailable, UsageError
from postoffice.spool import Spooled, Spooler
from postoffice.version import version

PROG = "postoffice-deliver"
USAGE = f"usage: {PROG} [-C FILE] [-f SENDER] [--version] [--] RECIPIENT..."


# Which exit status wins when recipients fare differently: the worst.
SEVERITY = {os.EX_OK: 0, os.EX_NOUSER: 1, os.EX_UNAVAILABLE: 2, os.EX_TEMPFAIL: 3}

CHUNK = 256 * 1024
# Postfix keeps the first 4096 bytes of the command's output; stay well within.
MAX_OUTPUT = 3000
MAX_LINES = 10

# The lines Postfix gets when we cannot even look at the message.  Details
# stay in our log: Postfix copies these into delay warnings and bounces that
# go to the outside world, and a configuration error may quote a database
# URI with its password.
CONFIG_FAILED = "4.3.0 postoffice configuration error (see its log, or run postoffice check)"
INTERNAL_ERROR = "4.3.0 postoffice internal error (see its log)"
STORAGE_DOWN = "storage temporarily unavailable, try again later"

log = logging.getLogger("postoffice.pipe")


@dataclass(frozen=True)
class Arguments:
    """The command line, parsed."""

    config: str | None
    sender: str
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class TooBig:
    """Standard input ran past the size limit after ``seen`` bytes; the rest was not read."""

    seen: int
    limit: int


class AskedVersion(Exception):
    """``--version`` was given: print the version and deliver nothing."""


def parse_args(argv: Sequence[str]) -> Arguments:
    """getopt, as mail delivery agents do: ``-f`` takes the next word whatever it is.

    Postfix passes the null sender as an empty word (``null_sender=`` in
    master.cf) and ``--`` keeps a recipient that starts with ``-`` from
    being read as an option.  Options and recipients may be mixed.
    """
    try:
        options, recipients = getopt.gnu_getopt(list(argv), "C:f:h", ["config=", "help", "version"])
    except getopt.GetoptError as exc:
        raise UsageError(str(exc)) from None
    config_path: str | None = None
    sender = ""
    for name, value in options:
        if name in ("-h", "--help"):
            raise UsageError("")
        if name == "--version":
            raise AskedVersion
        if name in ("-C", "--config"):
            config_path = value
        elif name == "-f":
            sender = value
    if not recipients:
        raise UsageError("at least one RECIPIENT is required")
    return Arguments(config_path, sender, tuple(recipients))


def read_message(
    stream: BinaryIO, limit: int | None, spooler: Spooler, chunk: int = CHUNK
) -> bytes | Spooled | TooBig:
    """All of ``stream`` through ``spooler``, or TooBig as soon as it is over ``limit`` bytes.

    Past the limit we stop reading and the spooler keeps nothing: whatever
    comes in, memory holds at most the spooler's threshold.
    """
    size = 0
    try:
        while True:
            data = stream.read(chunk)
            if not data:
                break
            size += len(data)
            if limit is not None and size > limit:
                spooler.abandon()
                return TooBig(size, limit)
            spooler.write(data)
        return spooler.finish()
    except BaseException:
        spooler.abandon()
        raise


def exit_code(decision: Decision) -> int:
    """The sysexits code pipe(8) reads: 0 stored or discarded, 67 no such queue, 69 refused,
    75 try again."""
    if decision.action in (Action.ACCEPT, Action.DISCARD):
        return os.EX_OK
    if decision.action is Action.DEFER:
        return os.EX_TEMPFAIL
    return os.EX_NOUSER if decision.rule is Rule.NO_QUEUE else os.EX_UNAVAILABLE


def worst_exit_code(outcomes: Sequence[Outcome]) -> int:
    """75 over 69 over 67 over 0; no outcome at all counts as a deferral."""
    codes = [exit_code(o.decision) for o in outcomes] or [os.EX_TEMPFAIL]
    return max(codes, key=SEVERITY.__getitem__)


def report_lines(outcomes: Sequence[Outcome]) -> list[str]:
    """What Postfix gets on stderr: one line per refused recipient, worst first.

    Each line is the enhanced status and the reason (``5.1.1 <rcpt>: no
    queue for this recipient``), the way pipe(8) reads a command's output.
    With several recipients, pipe(8) gives every one of them the status of
    the whole run, so each line names its recipient, unless all of them
    were refused for the same reason (a deferral): then one line says it.
    The whole stays short enough for Postfix's bounce.
    """
    refused = [o for o in outcomes if exit_code(o.decision) != os.EX_OK]
    refused.sort(key=lambda o: -SEVERITY[exit_code(o.decision)])
    plain = [f"{o.decision.status} {o.text}" for o in refused]
    alike = len(refused) == len(outcomes) and len(set(plain)) == 1
    lines: list[str] = []
    for outcome, line in zip(refused, plain, strict=True):
        if not alike and f"<{outcome.recipient}>".lower() not in outcome.text.lower():
            line = f"{outcome.decision.status} <{outcome.recipient}>: {outcome.text}"
        if line not in lines:
            lines.append(line)
    kept: list[str] = []
    for line in lines:
        if len(kept) == MAX_LINES or sum(len(k) + 1 for k in kept) + len(line) > MAX_OUTPUT:
            kept.append(f"(and {len(lines) - len(kept)} more)")
            break
        kept.append(line)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """Deliver stdin to the recipients; the exit status tells Postfix what became of it."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(args_list)
    except AskedVersion:
        print(f"{PROG} {version()}")
        return os.EX_OK
    except UsageError as exc:
        if not str(exc):
            print(USAGE)
            return os.EX_OK
        print(f"{USAGE}\n{PROG}: {exc}", file=sys.stderr)
        return os.EX_USAGE

    logs.for_pipe(PROG)
    # Libraries may write to stdout or stderr (warnings, a thread's traceback):
    # Postfix would put that into a bounce.  It goes to the log instead.
    real_stderr = sys.stderr
    stray = io.StringIO()
    with contextlib.redirect_stdout(stray), contextlib.redirect_stderr(stray):
        try:
            code, lines = _deliver(args)
        except BaseException:
            # A bug of ours, or SIGINT: Postfix keeps the message and retries.
            log.exception("delivery failed; exit %d so that Postfix retries", os.EX_TEMPFAIL)
            code, lines = os.EX_TEMPFAIL, [INTERNAL_ERROR]
    if stray.getvalue().strip():
        log.warning("output of the libraries we use:\n%s", stray.getvalue().rstrip())
    if lines:
        # pipe(8) turns each newline into a space: no newline after the last
        # line, or the reason in Postfix's log and bounce ends in a blank.
        with contextlib.suppress(OSError, ValueError):
            end = "\n" if real_stderr.isatty() else ""
            real_stderr.write("\n".join(lines) + end)
            real_stderr.flush()
    return code


def _deliver(args: Arguments) -> tuple[int, list[str]]:
    try:
        settings = config.load(config.find_config(args.config))
    except ConfigError as exc:
        log.error("configuration error, deferring the message: %s", exc)
        return os.EX_TEMPFAIL, [CONFIG_FAILED]
    logs.for_pipe(PROG, settings=settings.logging)

    stdin = sys.stdin.buffer if sys.stdin is not None else None
    if stdin is None:
        raise OSError("standard input is closed")
    # Opened first: a big message is spooled where the storage keeps its blobs.
    db: ZODB.DB | None = None
    try:
        db = open_db_waiting(settings.zodb_uri)
    except StorageUnavailable as exc:
        log.warning("storage unavailable, deferring the message: %s", exc)
    depot = None if db is None else Depot(settings, db=db)
    try:
        directory = None if depot is None else depot.spool_directory()
        spooler = Spooler(directory, args.sender, args.recipients[0], b"\n")
        received = read_message(stdin, settings.max_message_size, spooler)
        try:
            outcomes = _store(depot, args, received)
        finally:
            if isinstance(received, Spooled):
                received.remove()
    finally:
        if depot is not None:
            depot.close()
        if db is not None:
            db.close()
    return worst_exit_code(outcomes), report_lines(outcomes)


def _store(
    depot: Depot | None, args: Arguments, received: bytes | Spooled | TooBig
) -> list[Outcome]:
    """``Depot.deliver`` of what was read, unless it was too big or the database is away."""
    if isinstance(received, TooBig):
        decision = too_big(received.limit)
        outcomes = [Outcome(rcpt, decision) for rcpt in args.recipients]
        log_outcomes(Delivery(args.sender, args.recipients, b""), outcomes, size=received.seen)
        return outcomes
    if depot is None:
        outcomes = [Outcome(rcpt, deferred(STORAGE_DOWN)) for rcpt in args.recipients]
        log_outcomes(Delivery.of(args.sender, args.recipients, received), outcomes)
        return outcomes
    return depot.deliver(args.sender, args.recipients, received)  # logged by the depot


if __name__ == "__main__":
    sys.exit(main())
