"""The one entry point of both front doors: decide, store, commit, answer.

``Depot.deliver`` takes (envelope sender, recipients, raw bytes) and returns
one :class:`Outcome` per recipient.  ``Depot.deliver_batch`` does the same
for several messages in one ZODB transaction (group commit): the LMTP
server hands it everything that arrived while the previous commit was
under way, and answers each session only after the commit.

A reply of 250 for an accepted recipient is only ever produced after
``transaction.commit()`` returned.  Conflicts are retried (the whole batch
is decided again against the new state); when the database cannot be
reached, or the commit fails, every recipient gets a deferral (451 / 75).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import transaction
import ZODB
from persistent import Persistent
from ZODB.blob import Blob
from ZODB.POSException import ConflictError

from postoffice import clock, retry, spool
from postoffice.config import Settings
from postoffice.database import has_blobs, is_storage_away, open_db
from postoffice.decide import (
    Action,
    Decision,
    Envelope,
    Rule,
    decide,
    deferred,
    throttle_window,
)
from postoffice.errors import StorageUnavailable
from postoffice.message import ParsedMessage, added_headers, line_ending
from postoffice.spool import Spooled
from postoffice.store import (
    FolderState,
    QueuesFolder,
    choose_lane,
    find_folder,
    reconcile,
    records,
)

log = logging.getLogger("postoffice.deliver")

# Conflicts with other writers and consumers are retried (postoffice.retry)
# for at least this many attempts and this many seconds before the
# deliveries are deferred (451 / 75) for Postfix to retry.
COMMIT_ATTEMPTS = 10
COMMIT_PATIENCE = 30.0


@dataclass(frozen=True)
class Outcome:
    """What became of a message for one recipient: the decision and its reply."""

    recipient: str
    decision: Decision
    message_id: str | None = None
    queue_key: int | None = None

    @property
    def text(self) -> str:
        """What the reply says after its codes: one line of printable ASCII."""
        d = self.decision
        if d.action is Action.ACCEPT:
            text = f"<{self.recipient}> queued in {d.queue} as {self.queue_key}"
        elif d.review:
            text = f"<{self.recipient}> accepted, kept for review as {self.queue_key}: {d.reason}"
        elif d.action is Action.DISCARD:
            text = f"<{self.recipient}> accepted, not queued: {d.reason}"
        else:
            text = d.reason
        return ascii_line(text)

    @property
    def reply(self) -> str:
        """The LMTP reply line for this recipient (without CRLF)."""
        return reply_line(self.decision.code, self.decision.status, self.text)


@dataclass(frozen=True)
class Delivery:
    """One message as the front door received it: its bytes, or a spool file.

    A message past ``spool.SPOOL_THRESHOLD`` comes as ``spooled`` (and
    ``raw`` is empty): the depot reads its header block, lets the body
    rules scan the file, and stores the file as the blob.
    """

    sender: str
    recipients: tuple[str, ...]
    raw: bytes
    spooled: Spooled | None = None

    @classmethod
    def of(cls, sender: str, recipients: Sequence[str], received: bytes | Spooled) -> Delivery:
        if isinstance(received, Spooled):
            return cls(sender, tuple(recipients), b"", received)
        return cls(sender, tuple(recipients), received)

    @property
    def size(self) -> int:
        return len(self.raw) if self.spooled is None else self.spooled.size

    @property
    def head(self) -> bytes:
        """The first octets, enough to name the Message-Id in the log."""
        return self.raw[:LOG_HEAD] if self.spooled is None else self.spooled.head

    @property
    def eol(self) -> bytes:
        """The line ending of the lines added on top (``message.line_ending``)."""
        return line_ending(self.raw) if self.spooled is None else self.spooled.eol

    def whole(self) -> bytes:
        """All of it in memory: only where it must be (a dead letter, a storage without blobs)."""
        return self.raw if self.spooled is None else self.spooled.read()

    def parsed(self) -> ParsedMessage:
        """The view the rules read: headers from the header block, the body streamed."""
        spooled = self.spooled
        if spooled is None:
            return ParsedMessage(self.raw)
        return ParsedMessage(spooled.header_block(), spooled.size, spooled.chunks)


def reply_line(code: int, status: str, text: str) -> str:
    """Every reply line postoffice writes: ``CODE X.Y.Z text``, the text made one clean line."""
    return f"{code} {status} {ascii_line(text)}"


def ascii_line(text: str) -> str:
    """Replies are one line of printable ASCII, whatever the reason or address quoted.

    An envelope address may hold a NUL or another control character
    (aiosmtpd takes them in ``RCPT TO``); in a reply line it would cut or
    garble what Postfix logs and puts in the bounce, so it is escaped.
    """
    text = " ".join(text.split())
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)[:400]


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# What each action is called in the decision line, in the words of Postfix's own lines.
STATUS = {
    Action.ACCEPT: "sent",
    Action.DISCARD: "discarded",
    Action.REJECT: "refused",
    Action.DEFER: "deferred",
}
# Bytes of a message read to name its Message-Id in the log when it was not parsed.
LOG_HEAD = spool.HEAD


def log_outcomes(delivery: Delivery, outcomes: Sequence[Outcome], size: int | None = None) -> None:
    """One line per recipient (:func:`decision_line`), from both front doors alike."""
    message_id = next((o.message_id for o in outcomes if o.message_id), None)
    if message_id is None:
        message_id = message_id_of(delivery.head)
    for outcome in outcomes:
        decision = outcome.decision
        log_decision(
            message_id,
            delivery.sender,
            outcome.recipient,
            decision.queue,
            outcome.reply,
            decision.rule.name.lower(),
            decision.reason,
            delivery.size if size is None else size,
            STATUS[decision.action],
        )


def log_decision(
    message_id: str | None,
    sender: str,
    rcpt: str,
    queue: str | None,
    reply: str,
    rule: str,
    reason: str,
    size: int,
    status: str | None = None,
) -> None:
    """The decision line, also for replies made before the depot saw the message.

    Without ``status`` it is read from the reply's code (4xx deferred, 5xx refused).
    """
    if status is None:
        status = "sent" if reply[:1] == "2" else "deferred" if reply[:1] == "4" else "refused"
    log.info(
        "%s", decision_line(message_id, sender, rcpt, size, queue, rule, reason, status, reply)
    )


def decision_line(
    message_id: str | None,
    sender: str,
    rcpt: str,
    size: int,
    queue: str | None,
    rule: str,
    reason: str,
    status: str,
    reply: str,
) -> str:
    """``msgid=<...> from=<...> to=<...> size=N queue=... rule=... reason=... status=... (reply)``.

    The keys and their order are those of Postfix's own delivery lines
    (``from=<>``, ``to=<>``, ``size=``, ``status=sent (250 ...)``), so that
    the same ``grep`` and log tools read both; a value with a space, a quote
    or a backslash is written in double quotes, escaped as in C.
    """
    return (
        f"msgid={quoted(message_id or '-')} from=<{log_text(sender)}> "
        f"to=<{log_text(rcpt)}> size={size} queue={quoted(queue or '-')} "
        f"rule={rule} reason={quoted(reason)} status={status} ({reply})"
    )


_PLAIN = re.compile(r"[^\s\"\\=()]+")


def log_text(value: str) -> str:
    """A value fit for one log line: control characters (a CR, LF) written as ``\\xNN``.

    Not made ASCII: an address in UTF-8 is logged as it came, as Postfix does.
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)


def quoted(value: str) -> str:
    """A log value as it is when it is one plain word, else in escaped double quotes."""
    value = log_text(value)
    if _PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def message_id_of(head: bytes) -> str | None:
    """The Message-Id for the log, from the whole message or its first octets."""
    try:
        return ParsedMessage(head).message_id
    except Exception:
        return None


def _unique(recipients: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for rcpt in recipients:
        key = rcpt.lower()
        if key not in seen:
            seen.add(key)
            result.append(rcpt)
    return result


class Depot:
    """The database plus the rules, shared by the threads of one process.

    Thread-safe: each call of :meth:`deliver_batch` opens its own connection
    with its own transaction manager.  :meth:`reload` swaps the rules
    atomically (SIGHUP); a delivery under way keeps the rules it started with.
    """

    def __init__(
        self,
        settings: Settings,
        db: ZODB.DB | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._owns_db = db is None
        self._lock = threading.Lock()
        # The server's clock gives arrival times (rule 8, X-Postoffice-Date):
        # the one given, else the depot's (postoffice.clock), read at each use.
        self._clock: Callable[[], float] | None = clock
        self._reconciled = False
        # Told of every batch (its outcomes and how long deciding and the
        # commit took): ``serve``'s metrics, when ``[metrics]`` is on.
        self.observer: Callable[[Sequence[Outcome], float], None] | None = None

    @property
    def settings(self) -> Settings:
        return self._settings

    def reload(self, settings: Settings) -> list[str]:
        """Use new rules from now on; create queues they name (returns warnings)."""
        with self._lock:
            self._settings = settings
            self._reconciled = False
        try:
            return self.prepare()
        except StorageUnavailable:
            return ["database unreachable; queues will be created at the next delivery"]

    def db(self) -> ZODB.DB:
        with self._lock:
            if self._db is None:
                self._db = open_db(self._settings.zodb_uri)
            return self._db

    def prepare(self, warm: bool = False) -> list[str]:
        """Create the queues folder and reconcile the queues with the config.

        With ``warm`` (the LMTP server, at start), the duplicate ledgers are
        then read into the connection's object cache, up to half of it: the
        deliveries that follow use that connection, and each would otherwise
        wait for one read of a random leaf until the cache has them all.
        """
        manager = transaction.TransactionManager()
        connection = self._open(manager)

        def create() -> tuple[QueuesFolder, list[str]]:
            folder = find_folder(connection.root(), self._settings.zodb_path, create=True)
            # Made here, not at the first use: that one would write the folder.
            if self._settings.discard:
                folder.review_area(create=True)
            if self._settings.replay_keep:
                folder.recent_area(create=True)
            return folder, reconcile(folder, self._settings.queue_names)

        try:
            # Conflicts: two serve processes starting together, a consumer.
            folder, warnings = retry.committed(manager, create, COMMIT_ATTEMPTS, COMMIT_PATIENCE)
            if warm:
                manager.begin()
                lane, busy = choose_lane(folder, clock.now())
                log.info(
                    "appending to lane %d of %d (lanes written to in the last hour: %s)",
                    lane,
                    records.LANES,
                    ", ".join(map(str, sorted(busy))) or "none",
                )
                queues = [queue for _name, queue in folder.items()]
                budget = self.db().getCacheSize() // 2 // max(1, len(queues))
                for queue in queues:
                    queue.warm_up(budget)
        except ConflictError as exc:
            raise StorageUnavailable(
                f"could not create the queues: too many conflicts: {exc}"
            ) from None
        except StorageUnavailable:
            raise
        except Exception as exc:
            if is_storage_away(exc):
                raise StorageUnavailable(f"database error: {exc}") from None
            raise
        finally:
            _close(manager, connection)
        self._reconciled = True
        for warning in warnings:
            log.warning("%s", warning)
        return warnings

    def _open(self, manager: transaction.TransactionManager) -> ZODB.Connection.Connection:
        try:
            return self.db().open(transaction_manager=manager)
        except StorageUnavailable:
            raise
        except Exception as exc:
            raise StorageUnavailable(f"cannot open a connection: {exc}") from None

    def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
        if db is not None and self._owns_db:
            db.close()

    # -- delivering -----------------------------------------------------------

    def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        raw: bytes | Spooled,
        now: float | None = None,
    ) -> list[Outcome]:
        """Decide and store one message for every recipient; one Outcome each."""
        return self.deliver_batch([Delivery.of(sender, recipients, raw)], now)[0]

    def spool_directory(self) -> str | None:
        """Where a front door spools a big message: the storage's blob temporary directory.

        ZODB makes its own new blobs there, on the filesystem of the blob
        folder, so a spool file becomes a blob by a rename.  None while the
        database is not open, or keeps no blobs: the system's then.
        """
        db = self._db
        if db is None or not has_blobs(db):
            return None
        try:
            directory = db.storage.temporaryDirectory()
        except Exception:  # a ZEO client without a blob folder
            return None
        return directory if isinstance(directory, str) else None

    def deliver_batch(
        self, deliveries: Sequence[Delivery], now: float | None = None
    ) -> list[list[Outcome]]:
        """Several messages, one transaction; each list answers one delivery, and is logged."""
        started = time.monotonic()
        results = self._decide_and_store(deliveries, now)
        observer = self.observer
        if observer is not None:
            try:
                observer([o for outcomes in results for o in outcomes], time.monotonic() - started)
            except Exception:  # figures that fail must not lose the replies
                log.exception("counting a batch for the metrics failed")
        for delivery, outcomes in zip(deliveries, results, strict=True):
            try:
                log_outcomes(delivery, outcomes)
            except Exception:  # a log that fails must not lose the replies
                log.exception("logging a decision failed")
        return results

    def _decide_and_store(
        self, deliveries: Sequence[Delivery], now: float | None
    ) -> list[list[Outcome]]:
        settings = self._settings
        if now is None:
            now = self._clock() if self._clock is not None else clock.now()
        parsed = [d.parsed() for d in deliveries]
        try:
            if not self._reconciled:
                self.prepare()
            return self._commit_batch(settings, deliveries, parsed, now)
        except StorageUnavailable as exc:
            log.warning("storage unavailable, deferring %d messages: %s", len(deliveries), exc)
            # The details (a URI may hold a password) stay in our log; Postfix
            # would put the reply text into delay warnings sent outside.
            return [
                self._all(d, deferred("storage temporarily unavailable, try again later"))
                for d in deliveries
            ]
        except Exception as exc:
            log.exception("commit failed, deferring %d messages", len(deliveries))
            return [
                self._all(d, deferred(f"commit failed: {type(exc).__name__}")) for d in deliveries
            ]

    @staticmethod
    def _all(delivery: Delivery, decision: Decision) -> list[Outcome]:
        return [Outcome(r, decision) for r in delivery.recipients]

    def _commit_batch(
        self,
        settings: Settings,
        deliveries: Sequence[Delivery],
        parsed: list[ParsedMessage],
        now: float,
    ) -> list[list[Outcome]]:
        manager = transaction.TransactionManager()
        connection = self._open(manager)

        blobs = SpoolBlobs()

        def store() -> tuple[list[list[Outcome]], list[Persistent]]:
            folder = find_folder(connection.root(), settings.zodb_path, create=False)
            created: list[Persistent] = []
            blobs.attempt()
            results = [
                self._apply(folder, settings, d, m, now, created, blobs)
                for d, m in zip(deliveries, parsed, strict=True)
            ]
            return results, created

        try:
            results, created = retry.committed(manager, store, COMMIT_ATTEMPTS, COMMIT_PATIENCE)
            for record in created:
                record._p_deactivate()
            return results
        except ConflictError as exc:
            raise StorageUnavailable(f"too many conflicts: {exc}") from None
        except KeyError as exc:
            self._reconciled = False
            raise StorageUnavailable(f"queues folder missing: {exc}") from None
        except Exception as exc:
            if is_storage_away(exc):
                raise StorageUnavailable(str(exc) or type(exc).__name__) from None
            raise
        finally:
            _close(manager, connection)
            blobs.drop_uncommitted()

    def _apply(
        self,
        folder: QueuesFolder,
        settings: Settings,
        delivery: Delivery,
        message: ParsedMessage,
        now: float,
        created: list[Persistent],
        blobs: SpoolBlobs,
    ) -> list[Outcome]:
        """Decide every recipient against the state before this message, then store."""
        envelope = Envelope(delivery.sender, delivery.recipients)
        state = FolderState(folder)
        recipients = _unique(delivery.recipients)
        try:
            decisions = {r: decide(message, envelope, r, now, state, settings) for r in recipients}
        except Exception:
            error = traceback.format_exc()
            log.error("deciding %s failed; kept as a dead letter:\n%s", message.message_id, error)
            folder.add_dead_letter(
                delivery.whole(),
                delivery.sender,
                delivery.recipients,
                error,
                now,
                settings.dead_letter_max,
            )
            kept = Decision(
                Action.DISCARD,
                Rule.ERROR,
                250,
                "2.0.0",
                "kept in the dead-letter area after an internal error",
            )
            return self._all(delivery, kept)

        outcomes: dict[str, Outcome] = {}
        eol = delivery.eol
        arrivals: dict[str, tuple[str, float | None]] = {}
        for rcpt, decision in decisions.items():
            key = None
            if decision.action is Action.ACCEPT and decision.queue is not None:
                queue = folder[decision.queue]
                lines = added_headers(delivery.sender, rcpt, int(now), eol)
                key = queue.store(blobs.stored(delivery, lines, queue._p_jar), now, created)
                if message.message_id:
                    queue.record_delivery(message.message_id, rcpt, now)
            elif decision.review:
                key = self._keep_for_review(
                    folder, settings, delivery, rcpt, decision, now, eol, blobs
                )
            if decision.count_arrival and decision.queue and decision.throttle_key:
                _, until = arrivals.get(decision.queue, (decision.throttle_key, None))
                if decision.throttle_until is not None:
                    until = max(until or 0.0, decision.throttle_until)
                arrivals[decision.queue] = (decision.throttle_key, until)
            outcomes[rcpt.lower()] = outcome = Outcome(rcpt, decision, message.message_id, key)
            if settings.replay_keep and delivery.size <= records.BLOB_THRESHOLD:
                area = folder.recent_area(create=True)
                assert area is not None
                raw = added_headers(delivery.sender, rcpt, int(now), eol) + delivery.whole()
                rule = decision.rule.name.lower()
                area.add(raw, rule, decision.queue, outcome.reply, now, settings.replay_keep)
        window = throttle_window(settings.ooo_loop_frequency or 1.0)
        for queue_name, (throttle_key, until) in arrivals.items():
            folder[queue_name].record_arrival(throttle_key, now, window, until)
        # One outcome per recipient as given, duplicates included (LMTP counts them).
        return [replace(outcomes[r.lower()], recipient=r) for r in delivery.recipients]

    @staticmethod
    def _keep_for_review(
        folder: QueuesFolder,
        settings: Settings,
        delivery: Delivery,
        rcpt: str,
        decision: Decision,
        now: float,
        eol: bytes,
        blobs: SpoolBlobs,
    ) -> int:
        """A refusal discarded: the message kept in the review area, as a queue would keep it."""
        area = folder.review_area(create=True)
        assert area is not None
        lines = added_headers(delivery.sender, rcpt, int(now), eol)
        raw = blobs.stored(delivery, lines, folder._p_jar)
        refusal = decision.refusal or decision.reason
        key, dropped = area.add(
            raw, decision.rule.name.lower(), decision.queue, refusal, now, settings.review_max
        )
        if dropped:
            log.info(
                "review area full (review_max %d): dropped the %d oldest",
                settings.review_max,
                dropped,
            )
        return key


class SpoolBlobs:
    """The blobs one batch makes of spool files, attempt after attempt.

    A record keeps our ``lines`` on top of the message.  A spooled message
    becomes a blob of its spool file itself (the lines written into the
    room at its start) for the first record of an attempt that fits; any
    other record of it gets a copy, streamed.  Only a storage without blobs
    (or a message the blob threshold keeps inline) has it read into memory.

    ZODB removes the file of a blob whose transaction aborted when the blob
    object is collected; a traceback that holds on to it (a log handler
    keeping records) would keep the file.  So after the batch, each blob
    that did not end up in the database (no ``_p_jar`` since the abort) is
    invalidated, ZODB's own way of letting its uncommitted file go
    (``Blob._p_invalidate``, the persistence protocol's method).
    """

    def __init__(self) -> None:
        self._made: list[Blob] = []
        self._used: set[int] = set()

    def attempt(self) -> None:
        """A new attempt at the transaction: every spool file may be used as it is again."""
        self._used.clear()

    def stored(self, delivery: Delivery, lines: bytes, jar: Any) -> bytes | Blob:
        """``lines`` then the message, as bytes or as a blob made of the spool file."""
        spooled = delivery.spooled
        if spooled is None:
            return lines + delivery.raw
        if (
            jar is None
            or not has_blobs(jar.db())
            or len(lines) + spooled.size <= records.BLOB_THRESHOLD
        ):
            return lines + spooled.read()
        in_place = id(spooled) not in self._used and spooled.fits(lines)
        if in_place:
            self._used.add(id(spooled))
        blob = records.blob_from_file(spooled.blob_file(lines, in_place), jar)
        self._made.append(blob)
        return blob

    def drop_uncommitted(self) -> None:
        for blob in self._made:
            if blob._p_jar is None:
                try:
                    blob._p_invalidate()
                except Exception:
                    log.debug("dropping an aborted blob's file failed", exc_info=True)
        self._made.clear()


def _close(manager: transaction.TransactionManager, connection: object) -> None:
    try:
        manager.abort()
    except Exception:
        log.debug("abort failed", exc_info=True)
    try:
        connection.close()  # type: ignore[attr-defined]
    except Exception:
        log.debug("closing a connection failed", exc_info=True)
