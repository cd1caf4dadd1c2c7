"""The ``postoffice`` command: ``serve`` and the administrator's subcommands.

Every subcommand loads the configuration the same way and reports problems
as one line on stderr with a non-zero exit: people read these, not
tracebacks.  Exit codes follow sysexits where one fits (64 usage, 69
unavailable, 75 temporary, 78 configuration).
"""

from __future__ import annotations

import argparse
import code
import datetime
import json
import logging
import mailbox
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import transaction

from postoffice import clock, config, listing, logs
from postoffice.clock import iso
from postoffice.database import consumer_uri, open_db, redact_uri
from postoffice.errors import (
    ConfigError,
    NoInput,
    PostofficeError,
    StorageUnavailable,
    exit_code,
)
from postoffice.version import version

log = logging.getLogger("postoffice.cli")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 64."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"postoffice: {message}", file=sys.stderr)
        raise SystemExit(os.EX_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="postoffice", description=__doc__.splitlines()[0])
    parser.add_argument("-C", "--config", help="configuration file (default: search order)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--version", action="version", version=f"postoffice {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the LMTP server")
    serve.add_argument("--listen", help="unix:/path, HOST:PORT or [IPv6]:PORT")
    serve.set_defaults(func=cmd_serve)

    policy = sub.add_parser(
        "policy",
        help="run the Postfix policy service: refuse at RCPT time what the envelope decides",
    )
    policy.add_argument("--listen", help="unix:/path, HOST:PORT or [IPv6]:PORT")
    policy.set_defaults(func=cmd_policy)

    imp = sub.add_parser("import-maildir", help="import a Maildir (the old postoffice script)")
    imp.add_argument("--maildir", help="Maildir to import (default: the maildir option)")
    imp.set_defaults(func=cmd_import_maildir)

    old = sub.add_parser(
        "import-repoze",
        help="copy the queued and quarantined mail of a repoze.postoffice 0.25 depot",
    )
    old.add_argument("old_uri", metavar="OLD_URI", help="the 0.25 database (a zodburi URI)")
    old.add_argument(
        "--path", default="/postoffice", help="its queues folder (0.25's zodb_path; /postoffice)"
    )
    old.set_defaults(func=cmd_import_repoze)

    queues = sub.add_parser("queues", help="list queues: name, depth, quarantined, oldest")
    queues.add_argument("--json", action="store_true", help="machine-readable output")
    queues_sub = queues.add_subparsers(dest="action", parser_class=_Parser)
    qmove = queues_sub.add_parser(
        "move", help="move a queue's waiting and quarantined messages into another queue"
    )
    qmove.add_argument("queue")
    qmove.add_argument("--to", required=True, metavar="QUEUE", help="the queue to move into")
    qpurge = queues_sub.add_parser(
        "purge", help="delete a queue no longer in the configuration, with its messages"
    )
    qpurge.add_argument("queue")
    queues.set_defaults(func=cmd_queues)

    quarantine = sub.add_parser("quarantine", help="look at and act on quarantined messages")
    qsub = quarantine.add_subparsers(dest="action", required=True, parser_class=_Parser)
    qlist = qsub.add_parser("list", help="list quarantined messages of a queue")
    qlist.add_argument("queue")
    qlist.add_argument("--json", action="store_true", help="machine-readable output")
    qshow = qsub.add_parser("show", help="print a quarantined message and its error")
    qshow.add_argument("queue")
    qshow.add_argument("id", type=int)
    qrequeue = qsub.add_parser("requeue", help="put quarantined messages back in the queue")
    qrequeue.add_argument("queue")
    qrequeue.add_argument("ids", type=int, nargs="*", help="ids (default: all)")
    qdelete = qsub.add_parser("delete", help="delete quarantined messages")
    qdelete.add_argument("queue")
    qdelete.add_argument("ids", type=int, nargs="*", help="ids")
    qdelete.add_argument("--all", action="store_true", help="every quarantined message")
    quarantine.set_defaults(func=cmd_quarantine)

    throttles = sub.add_parser("throttles", help="senders the mail-loop throttle refuses")
    tsub = throttles.add_subparsers(dest="action", required=True, parser_class=_Parser)
    tlist = tsub.add_parser("list", help="throttled senders: queue, sender, until")
    tlist.add_argument("queue", nargs="?", help="only this queue")
    tlist.add_argument("--json", action="store_true", help="machine-readable output")
    tclear = tsub.add_parser("clear", help="lift a sender's throttle and forget its arrivals")
    tclear.add_argument("sender")
    tclear.add_argument("queue", nargs="?", help="only in this queue (default: every queue)")
    throttles.set_defaults(func=cmd_throttles)

    dead = sub.add_parser(
        "dead-letters", help="mail answered 250 whose decision failed with an internal error"
    )
    dsub = dead.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dlist = dsub.add_parser("list", help="list the dead letters")
    dlist.add_argument("--json", action="store_true", help="machine-readable output")
    dshow = dsub.add_parser("show", help="print a dead letter and its traceback")
    dshow.add_argument("id", type=int)
    drequeue = dsub.add_parser(
        "requeue", help="deliver dead letters again through the rules, then forget them"
    )
    drequeue.add_argument("ids", type=int, nargs="*", help="ids (default: all)")
    ddelete = dsub.add_parser("delete", help="delete dead letters")
    ddelete.add_argument("ids", type=int, nargs="*", help="ids")
    ddelete.add_argument("--all", action="store_true", help="every dead letter")
    dead.set_defaults(func=cmd_dead_letters)

    review = sub.add_parser("review", help="messages discarded instead of refused, kept for review")
    rsub = review.add_subparsers(dest="action", required=True, parser_class=_Parser)
    rlist = rsub.add_parser("list", help="list the messages kept for review")
    rlist.add_argument("--json", action="store_true", help="machine-readable output")
    rshow = rsub.add_parser("show", help="print a message kept for review and its refusal")
    rshow.add_argument("id", type=int)
    rrequeue = rsub.add_parser("requeue", help="move messages kept for review into a queue")
    rrequeue.add_argument("--to", required=True, metavar="QUEUE", help="the queue to move into")
    rrequeue.add_argument("ids", type=int, nargs="*", help="ids (default: all)")
    rdelete = rsub.add_parser("delete", help="delete messages kept for review")
    rdelete.add_argument("ids", type=int, nargs="+")
    review.set_defaults(func=cmd_review)

    replay = sub.add_parser(
        "replay", help="what these rules would decide for the stored mail; changes nothing"
    )
    replay.add_argument("queues", nargs="*", metavar="QUEUE", help="only mail stored in these")
    replay.add_argument("--from", dest="old", metavar="OLD.ini", help="compare with these rules")
    replay.add_argument("--since", metavar="DATE", help="only mail that arrived since (ISO 8601)")
    replay.add_argument("--json", action="store_true", help="machine-readable output")
    replay.set_defaults(func=cmd_replay)

    check = sub.add_parser("check", help="validate the configuration and reach the database")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=cmd_check)

    trial = sub.add_parser(
        "try",
        help="dry run: print the decision for a message, store nothing; "
        "exits as postoffice-deliver would",
    )
    trial.add_argument("message_file", help="the message, or - for standard input")
    trial.add_argument("--json", action="store_true", help="machine-readable output")
    trial.add_argument("--rcpt", required=True, action="append", help="envelope recipient")
    trial.add_argument("--sender", default="", help="envelope sender (default: <>)")
    trial.set_defaults(func=cmd_try)

    shell = sub.add_parser("shell", help="Python shell with the queues folder")
    shell.set_defaults(func=cmd_shell)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.to_stderr(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        status = func(args)
        sys.stdout.flush()  # a reader that went away shows here, not at the interpreter's exit
        return status
    except PostofficeError as exc:
        return _fail(exit_code(exc), str(exc))
    except KeyError as exc:
        return _fail(os.EX_DATAERR, str(exc.args[0]) if exc.args else "not found")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError as exc:
        if _stdout_is_a_pipe():
            return _reader_gone()
        log.debug("unexpected error", exc_info=True)
        return _fail(os.EX_TEMPFAIL, f"unexpected error: {type(exc).__name__}: {exc}")
    except Exception as exc:  # a bug of ours: the log gets the traceback, the user one line
        log.debug("unexpected error", exc_info=True)
        return _fail(os.EX_TEMPFAIL, f"unexpected error: {type(exc).__name__}: {exc}")


def _stdout_is_a_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError):
        return False


def _reader_gone() -> int:
    """``postoffice queues | head``: the reader closed the pipe; stop quietly, as ``ls`` does.

    The rest of the output goes nowhere (Python's documented way: else it
    fails again when the interpreter flushes stdout at exit), and the
    status is a shell's for a command a SIGPIPE ended.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _fail(code: int, message: str) -> int:
    print(f"postoffice: {message}", file=sys.stderr)
    return code


def load_settings(args: argparse.Namespace) -> config.Settings:
    return config.load(config.find_config(args.config))


@contextmanager
def open_folder(settings: config.Settings, write: bool = False) -> Iterator[Any]:
    """The QueuesFolder in a connection of its own; aborted unless the caller commits.

    Never creates the database or the folder (``serve`` does, as the service
    user), and without ``write`` opens a ``file://`` depot nobody serves
    read-only, without its lock.
    """
    from postoffice.store import find_folder

    db = open_db(settings.zodb_uri, create=False, read_only=not write)
    try:
        connection = db.open()
        try:
            yield find_folder(connection.root(), settings.zodb_path)
        finally:
            transaction.abort()
            connection.close()
    finally:
        db.close()


# --- serve --------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """The LMTP server: what ``python -m postoffice.lmtp`` runs, sharing included."""
    from postoffice import lmtp

    return lmtp.serve(config.find_config(args.config), args.listen)


def cmd_policy(args: argparse.Namespace) -> int:
    """The Postfix policy service (postoffice.policy): refusals the envelope alone decides."""
    from postoffice.policy import policy

    return policy(config.find_config(args.config), args.listen)


# --- import-maildir -------------------------------------------------------------


def cmd_import_maildir(args: argparse.Namespace) -> int:
    from postoffice.deliver import Depot

    settings = load_settings(args)
    folder = Path(args.maildir) if args.maildir else settings.maildir
    if folder is None:
        raise ConfigError(f"{settings.source}: [post office] maildir: not set (or use --maildir)")
    depot = Depot(settings)
    try:
        counts = import_maildir(depot, folder)
    finally:
        depot.close()
    print(
        f"postoffice: imported {counts['queued']} queued, {counts['discarded']} discarded, "
        f"{counts['rejected']} rejected, {counts['deferred']} left for the next run"
    )
    return os.EX_TEMPFAIL if counts["deferred"] else os.EX_OK


def import_maildir(depot: Any, path: Path, now: float | None = None) -> dict[str, int]:
    """Deliver each message of a Maildir through the same decision as LMTP.

    The recipient is the message's ``X-Original-To`` (written by Postfix's
    local delivery), the sender its ``Return-Path``, the arrival time (for
    ``X-Postoffice-Date`` and the loop throttle) the file's modification
    time, when Postfix wrote it: a backlog is decided as it arrived, oldest
    first, not as if all of it came at once.  Every message decided
    (queued, discarded or refused) is moved into the Maildir folder of the
    day of ``now`` (the run), ``.YYYY.MM.DD``; one refused is logged as a
    warning with the reply; a message the database could not take stays
    for the next run.
    """
    from postoffice.message import ParsedMessage, parse_addresses

    if not (path / "cur").is_dir() and not (path / "new").is_dir():
        raise ConfigError(f"{path}: not a Maildir (no cur/ or new/)")
    maildir = mailbox.Maildir(str(path), factory=None, create=False)
    run_time = clock.now() if now is None else now
    day = datetime.datetime.fromtimestamp(run_time).strftime("%Y.%m.%d")
    counts = {"queued": 0, "discarded": 0, "rejected": 0, "deferred": 0}
    archive = None
    # Oldest first, as they arrived (the names' order is not always that).
    backlog = sorted((_arrival(maildir, key, run_time), key) for key in maildir.iterkeys())
    for arrived, key in backlog:
        try:
            raw = maildir.get_bytes(key)
        except (KeyError, OSError):
            continue
        parsed = ParsedMessage(raw)
        recipients = parse_addresses(parsed.get_all_raw("X-Original-To"))
        sender_list = parse_addresses(parsed.get_all_raw("Return-Path"))
        sender = sender_list[0] if sender_list else ""
        if not recipients:
            log.warning("%s: no X-Original-To; archived without delivery", key)
            outcomes = []
        else:
            outcomes = depot.deliver(sender, recipients, raw, now=arrived)
        if any(o.decision.action.value == "defer" for o in outcomes):
            counts["deferred"] += 1
            log.warning("%s: database unavailable; left for the next run", key)
            continue
        for outcome in outcomes:
            action = outcome.decision.action.value
            counts[{"accept": "queued", "discard": "discarded"}.get(action, "rejected")] += 1
            if action == "reject":
                log.warning("%s: %s: not queued: %s", key, outcome.recipient, outcome.reply)
            else:
                log.info("%s: %s: %s", key, outcome.recipient, outcome.reply)
        if archive is None:
            archive = (
                maildir.add_folder(day)
                if day not in maildir.list_folders()
                else maildir.get_folder(day)
            )
        archive.add(mailbox.MaildirMessage(raw))
        maildir.remove(key)
    return counts


# --- queues and quarantine ------------------------------------------------------


def _arrival(maildir: mailbox.Maildir, key: str, default: float) -> float:
    """When a Maildir message arrived: its file's modification time (``default`` if gone)."""
    try:
        return os.path.getmtime(os.path.join(maildir._path, maildir._lookup(key)))  # type: ignore[attr-defined]
    except (KeyError, OSError):
        return default


def cmd_import_repoze(args: argparse.Namespace) -> int:
    """0.25's mail into this depot, which ``serve`` must have made (never created here)."""
    from postoffice import repoze

    settings = load_settings(args)
    with open_folder(settings, write=True) as folder:
        copied = repoze.copy(args.old_uri, folder, settings.queue_names, args.path)
    for row in copied:
        note = "" if row.configured else " (not in the configuration: postoffice queues move)"
        print(
            f"postoffice: {row.queue}: copied {row.messages} messages and "
            f"{row.quarantined} quarantined{note}"
        )
    return os.EX_OK


def cmd_queues(args: argparse.Namespace) -> int:
    if args.action == "move":
        return _move_queue(args)
    if args.action == "purge":
        return _purge_queue(args)
    settings = load_settings(args)
    rows = []
    with open_folder(settings) as folder:
        for name, queue in folder.items():
            oldest = queue.oldest_arrival()
            rows.append(
                {
                    "name": name,
                    "depth": len(queue),
                    "quarantined": queue.count_quarantined_messages(),
                    "oldest": iso(oldest) if oldest else None,
                    "configured": name in settings.queue_names,
                }
            )
        dead = folder.count_dead_letters()
        area = folder.review_area()
        kept = area.count() if area is not None else 0
    if args.json:
        print(listing.as_json({"queues": rows, "dead_letters": dead, "review": kept}))
        return os.EX_OK
    cells = [
        (
            r["name"],
            r["depth"],
            r["quarantined"],
            f"{r['oldest'] or '-'}{'' if r['configured'] else '  (not in the configuration)'}",
        )
        for r in rows
    ]
    columns = ("queue", "depth", "quarantined", "oldest")
    print("\n".join(listing.table(columns, cells, "postoffice: no queues")))
    print(f"dead letters: {dead}, kept for review: {kept}")
    return os.EX_OK


def _move_queue(args: argparse.Namespace) -> int:
    from postoffice import retire

    settings = load_settings(args)
    with open_folder(settings, write=True) as folder:
        moved = retire.move(folder, args.queue, args.to, settings.queue_names, clock.now)
    gone = f"; queue {args.queue!r} removed" if moved.removed else ""
    print(
        f"postoffice: moved {moved.messages} messages and {moved.quarantined} quarantined "
        f"from {args.queue!r} to {args.to!r}{gone}"
    )
    return os.EX_OK


def _purge_queue(args: argparse.Namespace) -> int:
    from postoffice import retire

    settings = load_settings(args)
    with open_folder(settings, write=True) as folder:
        waiting, quarantined = retire.purge(folder, args.queue, settings.queue_names)
    print(
        f"postoffice: purged queue {args.queue!r}: deleted {waiting} messages "
        f"and {quarantined} quarantined"
    )
    return os.EX_OK


def cmd_quarantine(args: argparse.Namespace) -> int:
    from postoffice.api import find_queue
    from postoffice.dead_letters import last_line

    settings = load_settings(args)
    with open_folder(settings, write=args.action in ("requeue", "delete")) as folder:
        queue = find_queue(folder, args.queue, settings.zodb_path)
        if args.action == "list":
            rows = [
                {
                    "id": message.postoffice_id,
                    "message_id": message.get("Message-Id"),
                    "from": message.get("From"),
                    "error": last_line(error),
                }
                for message, error in queue.get_quarantined_messages()
            ]
            listing.show(
                rows,
                ("id", "message-id", "from", "error"),
                [tuple(r.values()) for r in rows],
                f"postoffice: nothing quarantined in {args.queue}",
                args.json,
            )
            return os.EX_OK
        if args.action == "show":
            _quarantined_ids(queue, args.queue, [args.id])
            message = queue.get_quarantined_message(args.id)
            sys.stdout.buffer.write(message.as_bytes())
            print("\n--- error ---")
            print(queue.get_quarantine_error(args.id))
            return os.EX_OK
        ids = _quarantined_ids(queue, args.queue, args.ids)
        if args.action == "requeue":
            if args.ids:
                for key in ids:
                    queue.requeue_quarantined_message(key)
                count = len(ids)
            else:
                count = queue.requeue_quarantined_messages()
            transaction.commit()
            print(f"postoffice: requeued {count} messages in {args.queue}")
            return os.EX_OK
        if not args.ids and not args.all:
            return _fail(
                os.EX_USAGE,
                f"nothing deleted: name the ids, or add --all to delete every quarantined "
                f"message of {args.queue}",
            )
        for key in ids:
            queue.remove_from_quarantine(key)
        transaction.commit()
        print(f"postoffice: deleted {len(ids)} quarantined messages from {args.queue}")
        return os.EX_OK


def _quarantined_ids(queue: Any, name: str, given: Sequence[int]) -> list[int]:
    """The ids a quarantine action names, every one checked first; all of them when none."""
    from postoffice.errors import NotFound

    wanted = list(given)
    known = queue.quarantined_ids()
    present = set(known)
    for key in wanted:
        if key not in present:
            raise NotFound(f"no quarantined message {key} in queue {name!r}")
    return wanted or known


def cmd_throttles(args: argparse.Namespace) -> int:
    from postoffice import throttles

    settings = load_settings(args)
    if args.action == "list":
        with open_folder(settings) as folder:
            rows = throttles.throttled(folder, args.queue, clock.now())
        listing.show_records(
            rows, throttles.COLUMNS, "postoffice: no sender is throttled", args.json
        )
        return os.EX_OK
    with open_folder(settings, write=True) as folder:
        count = throttles.clear(folder, args.sender, args.queue)
        transaction.commit()
    print(f"postoffice: cleared {count} throttle entries of <{args.sender}>")
    return os.EX_OK


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from postoffice import dead_letters

    settings = load_settings(args)
    if args.action == "requeue":
        return _redeliver(settings, args.ids)
    with open_folder(settings, write=args.action == "delete") as folder:
        if args.action == "list":
            rows = dead_letters.entries(folder)
            listing.show_records(
                rows, dead_letters.COLUMNS, "postoffice: no dead letters", args.json
            )
            return os.EX_OK
        if args.action == "show":
            letter = dead_letters.letter(folder, args.id)
            sys.stdout.buffer.write(bytes(letter.data))
            print(f"\n--- from <{letter.sender}> to {', '.join(letter.recipients)}")
            print(letter.error)
            return os.EX_OK
        if not args.ids and not args.all:
            return _fail(
                os.EX_USAGE,
                "nothing deleted: name the ids, or add --all to delete every dead letter",
            )
        count = dead_letters.remove(folder, dead_letters.chosen(folder, args.ids))
        transaction.commit()
    print(f"postoffice: deleted {count} dead letters")
    return os.EX_OK


def _redeliver(settings: config.Settings, ids: Sequence[int]) -> int:
    """Deliver dead letters again, as they came (envelope and bytes), then forget each.

    Each goes through the whole decision again, in a transaction of its
    own; the dead letter is forgotten after that commit.  Should the
    command stop between the two, running it again finds the message
    already delivered (the duplicate rule), so nothing is stored twice.
    """
    from postoffice import dead_letters
    from postoffice.deliver import Depot

    db = open_db(settings.zodb_uri, create=False)
    depot = Depot(settings, db=db)
    worst = os.EX_OK
    try:
        connection = db.open()
        try:
            folder = _folder(connection, settings)
            for key in dead_letters.chosen(folder, ids):
                letter = dead_letters.letter(folder, key)
                outcomes = depot.deliver(
                    letter.sender, tuple(letter.recipients), bytes(letter.data)
                )
                for outcome in outcomes:
                    print(f"postoffice: dead letter {key}: {outcome.reply}")
                if any(o.decision.action.value == "defer" for o in outcomes):
                    worst = os.EX_TEMPFAIL
                    continue
                transaction.begin()
                dead_letters.remove(_folder(connection, settings), [key])
                transaction.commit()
        finally:
            transaction.abort()
            connection.close()
    finally:
        depot.close()
        db.close()
    return worst


def _folder(connection: Any, settings: config.Settings) -> Any:
    from postoffice.store import find_folder

    return find_folder(connection.root(), settings.zodb_path)


def cmd_review(args: argparse.Namespace) -> int:
    from postoffice import review

    settings = load_settings(args)
    with open_folder(settings, write=args.action in ("requeue", "delete")) as folder:
        if args.action == "list":
            rows = review.entries(folder)
            if args.json:
                print(json.dumps([row.as_json() for row in rows], indent=2))
            else:
                print("\n".join(review.table(rows)))
            return os.EX_OK
        if args.action == "show":
            record = review.record(folder, args.id)
            sys.stdout.buffer.write(record.raw)
            print(f"\n--- {record.rule}: {record.error}")
            return os.EX_OK
        if args.action == "requeue":
            try:
                count = review.requeue(folder, args.ids, args.to, clock.now())
            except review.NoSuchQueue as exc:
                return _fail(os.EX_NOUSER, str(exc))
            transaction.commit()
            print(f"postoffice: moved {count} messages from the review area to {args.to}")
            return os.EX_OK
        count = review.delete(folder, args.ids)
        transaction.commit()
        print(f"postoffice: deleted {count} messages from the review area")
        return os.EX_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from postoffice import replay

    settings = load_settings(args)
    old = config.load(config.find_config(args.old)) if args.old else None
    try:
        since = replay.parse_since(args.since) if args.since else None
    except ValueError as exc:
        return _fail(os.EX_USAGE, str(exc))
    with open_folder(settings) as folder:
        report = replay.replay(folder, settings, old, args.queues, since)
    print(json.dumps(report.as_json(), indent=2) if args.json else "\n".join(report.table()))
    return os.EX_OK


# --- check, try, shell --------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    """Everything ``serve`` would refuse, refused here; reads the database, never creates it."""
    from postoffice.lmtp.server import check_metrics, listen_address
    from postoffice.policy.server import listen_address as policy_address
    from postoffice.store import find_folder, retired

    path = config.find_config(args.config)
    settings = config.load(path)
    listen_address(settings)
    policy_address(settings)
    check_metrics(settings)
    warnings = config.warnings(settings)
    uri = consumer_uri(settings.zodb_uri)
    report: dict[str, Any] = {
        "config": str(path),
        "queues": len(settings.queues),
        "database": redact_uri(uri),
        "database_exists": True,
        "dead_letters": 0,
    }
    try:
        db = open_db(uri, create=False, read_only=True)
    except NoInput as exc:
        report["database_exists"] = False
        warnings.append(str(exc))
    else:
        try:
            connection = db.open()
            try:
                folder = find_folder(connection.root(), settings.zodb_path)
            except KeyError:
                warnings.append(f"no {settings.zodb_path} in the database yet (serve creates it)")
            else:
                warnings += retired(folder, settings.queue_names)
                report["dead_letters"] = dead = folder.count_dead_letters()
                if dead:
                    warnings.append(f"{dead} dead letters (postoffice dead-letters list)")
            finally:
                transaction.abort()
                connection.close()
        finally:
            db.close()
    report["warnings"] = warnings
    if args.json:
        print(listing.as_json(report))
        return os.EX_OK
    print(f"postoffice: {path}: configuration is valid ({len(settings.queues)} queues)")
    for warning in warnings:
        print(f"postoffice: warning: {warning}")
    if report["database_exists"]:
        print(f"postoffice: database {report['database']} is reachable")
    return os.EX_OK


def cmd_try(args: argparse.Namespace) -> int:
    """The decision for each recipient, and the exit status ``postoffice-deliver`` would have."""
    from postoffice import pipe
    from postoffice.decide import Envelope, decide
    from postoffice.message import ParsedMessage
    from postoffice.store import FolderState

    settings = load_settings(args)
    raw = _read_input(args.message_file)
    message = ParsedMessage(raw)
    envelope = Envelope(args.sender, tuple(args.rcpt))
    now = clock.now()
    note = ""
    try:
        with open_folder(settings) as folder:
            decisions = [
                decide(message, envelope, r, now, FolderState(folder), settings) for r in args.rcpt
            ]
    except (StorageUnavailable, NoInput, KeyError) as exc:
        note = f"database not read: {exc}; duplicates and throttle not checked"
        decisions = [decide(message, envelope, r, now, _EmptyState(), settings) for r in args.rcpt]
    codes = [pipe.exit_code(d) for d in decisions]
    status = max(codes, key=lambda c: pipe.SEVERITY[c])
    if args.json:
        rows = [
            {
                "recipient": rcpt,
                "action": d.action.value,
                "rule": d.rule.name.lower(),
                "code": d.code,
                "status": d.status,
                "queue": d.queue,
                "reason": d.reason,
                "exit": code,
            }
            for rcpt, d, code in zip(args.rcpt, decisions, codes, strict=True)
        ]
        print(listing.as_json({"recipients": rows, "exit": status, "note": note or None}))
        return status
    for rcpt, d in zip(args.rcpt, decisions, strict=True):
        where = f" queue={d.queue}" if d.queue else ""
        print(
            f"{rcpt}: {d.action.value} (rule {int(d.rule)}) {d.code} {d.status}{where}: {d.reason}"
        )
    if note:
        print(f"({note})")
    return status


def _read_input(name: str) -> bytes:
    """A message file's bytes, or standard input's for ``-``; NoInput (66) when it is not there."""
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise NoInput(f"{name}: {exc.strerror or exc}") from None


class _EmptyState:
    def is_duplicate(self, queue: str, message_id: str, recipient: str, since: float) -> bool:
        return False

    def throttle_view(self, queue: str, key: str, now: float, window: float) -> Any:
        from postoffice.decide import ThrottleView

        return ThrottleView(None, None, 0)


def cmd_shell(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    with open_folder(settings, write=True) as folder:
        banner = (
            f"postoffice shell on {redact_uri(consumer_uri(settings.zodb_uri))}\n"
            "  folder (or root): the queues folder; folder['NAME'] is a queue\n"
            "  transaction: commit or abort your changes"
        )
        code.interact(
            banner=banner,
            # ``root``: the old po_debug name of the folder.
            local={
                "folder": folder,
                "root": folder,
                "transaction": transaction,
                "settings": settings,
            },
        )
    return os.EX_OK


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["import_maildir", "main"]
