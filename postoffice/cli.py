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
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import transaction

from postoffice import clock, config, logs
from postoffice.database import consumer_uri, open_db, redact_uri
from postoffice.errors import ConfigError, PostofficeError, StorageUnavailable, exit_code
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

    queues = sub.add_parser("queues", help="list queues: name, depth, quarantined, oldest")
    queues.add_argument("--json", action="store_true", help="machine-readable output")
    queues.set_defaults(func=cmd_queues)

    quarantine = sub.add_parser("quarantine", help="look at and act on quarantined messages")
    qsub = quarantine.add_subparsers(dest="action", required=True, parser_class=_Parser)
    qlist = qsub.add_parser("list", help="list quarantined messages of a queue")
    qlist.add_argument("queue")
    qshow = qsub.add_parser("show", help="print a quarantined message and its error")
    qshow.add_argument("queue")
    qshow.add_argument("id", type=int)
    qrequeue = qsub.add_parser("requeue", help="put quarantined messages back in the queue")
    qrequeue.add_argument("queue")
    qrequeue.add_argument("ids", type=int, nargs="*", help="ids (default: all)")
    qdelete = qsub.add_parser("delete", help="delete quarantined messages")
    qdelete.add_argument("queue")
    qdelete.add_argument("ids", type=int, nargs="+")
    quarantine.set_defaults(func=cmd_quarantine)

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
    check.set_defaults(func=cmd_check)

    trial = sub.add_parser("try", help="dry run: print the decision for a message, store nothing")
    trial.add_argument("message_file")
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
        return func(args)
    except PostofficeError as exc:
        return _fail(exit_code(exc), str(exc))
    except KeyError as exc:
        return _fail(os.EX_DATAERR, str(exc.args[0]) if exc.args else "not found")
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug of ours: the log gets the traceback, the user one line
        log.debug("unexpected error", exc_info=True)
        return _fail(os.EX_TEMPFAIL, f"unexpected error: {type(exc).__name__}: {exc}")


def _fail(code: int, message: str) -> int:
    print(f"postoffice: {message}", file=sys.stderr)
    return code


def load_settings(args: argparse.Namespace) -> config.Settings:
    return config.load(config.find_config(args.config))


@contextmanager
def open_folder(settings: config.Settings, create: bool = False) -> Iterator[Any]:
    """The QueuesFolder in a connection of its own; aborted unless the caller commits."""
    from postoffice.store import find_folder

    db = open_db(settings.zodb_uri)
    try:
        connection = db.open()
        try:
            yield find_folder(connection.root(), settings.zodb_path, create=create)
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


def cmd_queues(args: argparse.Namespace) -> int:
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
                    "oldest": _iso(oldest) if oldest else None,
                    "configured": name in settings.queue_names,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return os.EX_OK
    width = max([len(r["name"]) for r in rows] + [5])
    print(f"{'queue':<{width}}  {'depth':>7}  {'quarantined':>11}  oldest")
    for r in rows:
        note = "" if r["configured"] else "  (not in the configuration)"
        print(
            f"{r['name']:<{width}}  {r['depth']:>7}  {r['quarantined']:>11}  "
            f"{r['oldest'] or '-'}{note}"
        )
    return os.EX_OK


def _iso(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="seconds")


def cmd_quarantine(args: argparse.Namespace) -> int:
    from postoffice.api import find_queue

    settings = load_settings(args)
    with open_folder(settings) as folder:
        queue = find_queue(folder, args.queue, settings.zodb_path)
        if args.action == "list":
            for message, error in queue.get_quarantined_messages():
                last = (error.strip().splitlines() or [""])[-1]
                print(
                    f"{message.postoffice_id}\t{message.get('Message-Id', '-')}\t"
                    f"{message.get('From', '-')}\t{last}"
                )
            return os.EX_OK
        if args.action == "show":
            message = queue.get_quarantined_message(args.id)
            sys.stdout.buffer.write(message.as_bytes())
            print("\n--- error ---")
            print(queue.get_quarantine_error(args.id))
            return os.EX_OK
        if args.action == "requeue":
            ids = args.ids or None
            if ids is None:
                count = queue.requeue_quarantined_messages()
            else:
                for key in ids:
                    queue.requeue_quarantined_message(key)
                count = len(ids)
            transaction.commit()
            print(f"postoffice: requeued {count} messages in {args.queue}")
            return os.EX_OK
        for key in args.ids:
            queue.remove_from_quarantine(key)
        transaction.commit()
        print(f"postoffice: deleted {len(args.ids)} quarantined messages from {args.queue}")
        return os.EX_OK


def cmd_review(args: argparse.Namespace) -> int:
    from postoffice import review

    settings = load_settings(args)
    with open_folder(settings) as folder:
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
    from postoffice.deliver import Depot

    path = config.find_config(args.config)
    settings = config.load(path)
    print(f"postoffice: {path}: configuration is valid ({len(settings.queues)} queues)")
    uri = consumer_uri(settings.zodb_uri)
    db = open_db(uri)
    try:
        for warning in Depot(settings, db=db).prepare():
            print(f"postoffice: warning: {warning}")
    finally:
        db.close()
    print(f"postoffice: database {redact_uri(uri)} is reachable")
    return os.EX_OK


def cmd_try(args: argparse.Namespace) -> int:
    from postoffice.decide import Envelope, decide
    from postoffice.message import ParsedMessage
    from postoffice.store import FolderState

    settings = load_settings(args)
    raw = Path(args.message_file).read_bytes()
    message = ParsedMessage(raw)
    envelope = Envelope(args.sender, tuple(args.rcpt))
    now = clock.now()

    def show(state: Any, note: str) -> None:
        for rcpt in args.rcpt:
            d = decide(message, envelope, rcpt, now, state, settings)
            where = f" queue={d.queue}" if d.queue else ""
            print(
                f"{rcpt}: {d.action.value} (rule {int(d.rule)}) {d.code} {d.status}"
                f"{where}: {d.reason}"
            )
        if note:
            print(note)

    try:
        with open_folder(settings) as folder:
            show(FolderState(folder), "")
    except (StorageUnavailable, KeyError) as exc:
        show(_EmptyState(), f"(database not read: {exc}; duplicates and throttle not checked)")
    return os.EX_OK


class _EmptyState:
    def is_duplicate(self, queue: str, message_id: str, recipient: str, since: float) -> bool:
        return False

    def throttle_view(self, queue: str, key: str, now: float, window: float) -> Any:
        from postoffice.decide import ThrottleView

        return ThrottleView(None, None, 0)


def cmd_shell(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    with open_folder(settings) as folder:
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
