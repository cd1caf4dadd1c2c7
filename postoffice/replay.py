"""``postoffice replay``: what a rule set would decide for the mail the depot holds.

Every stored message (waiting in a queue, quarantined by a consumer, kept
in the review area, and the recent deliveries ``replay_keep`` keeps, also
those refused, discarded or consumed) is decided again by
:func:`postoffice.decide.decide` under the new settings, and compared
with what it was stored under: the queue it is in, for the review area the
rule whose refusal was discarded, for a recent delivery what its reply
said.  A recent delivery that is also queued (or quarantined, or kept for
review) is replayed once, where it is.  With old settings too (``--from OLD.ini``) both rule sets
decide and the two decisions are compared, so that what the old rules
would say today, not what they said then, is the baseline.

It reads in a connection that is never committed: it stores and changes
nothing.  The duplicate ledger and the loop throttle depend on the traffic
around a message, most of which is not stored; replay decides as if no
earlier mail had come, and a message stored under one of those two rules
that the new rules would queue in the same queue is counted as "not
re-decided", not as a change.
"""

from __future__ import annotations

import datetime
import hashlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from postoffice.clock import iso
from postoffice.config import Settings
from postoffice.decide import DISCARD_FAMILY, Action, Decision, Envelope, ThrottleView, decide
from postoffice.message import ParsedMessage, without_added_headers
from postoffice.store import QueuesFolder
from postoffice.store.records import QuarantineRecord

# The kinds of change, in the order the counts are printed.
KINDS = ("other queue", "refused", "discarded", "queued", "not re-decided", "unchanged")
# Rules whose answer depends on mail that came before, which replay does not have.
HISTORY_RULES = frozenset({"duplicate", "throttled"})
# Rules whose refusal ``discard`` can keep for review instead.
REVIEW_RULES = frozenset(rule.name.lower() for rule in DISCARD_FAMILY)


@dataclass(frozen=True)
class Verdict:
    """What a rule set does (or did) with one message for one recipient."""

    outcome: str  # queued | refused | discarded | review
    queue: str | None
    rule: str
    reason: str = ""

    def label(self) -> str:
        if self.outcome == "queued":
            return f"queued in {self.queue}"
        if self.outcome == "review":
            return f"kept for review ({self.rule})"
        return f"{self.outcome} ({self.rule})"

    def same(self, other: Verdict) -> bool:
        return (self.outcome, self.queue) == (other.outcome, other.queue) and (
            self.outcome == "queued" or self.rule == other.rule
        )


def verdict(decision: Decision) -> Verdict:
    rule = decision.rule.name.lower()
    if decision.action is Action.ACCEPT:
        return Verdict("queued", decision.queue, rule, decision.reason)
    if decision.review:
        return Verdict("review", decision.queue, rule, decision.reason)
    if decision.action is Action.DISCARD:
        return Verdict("discarded", decision.queue, rule, decision.reason)
    return Verdict(
        "refused", decision.queue, rule, f"{decision.code} {decision.status} {decision.reason}"
    )


@dataclass(frozen=True)
class Item:
    """One stored message for one recipient, what it was stored under and what is decided now."""

    where: str  # "queue A", "quarantine of A", "review"
    id: int
    arrival: float
    sender: str
    recipient: str
    message_id: str | None
    stored: Verdict
    new: Verdict
    old: Verdict | None = None

    @property
    def change(self) -> str:
        """The kind of change (one of KINDS) from the baseline to the new decision."""
        base = self.old if self.old is not None else self.stored
        if self.new.same(base):
            return "unchanged"
        if (
            base.rule in HISTORY_RULES
            and self.new.outcome == "queued"
            and self.new.queue == base.queue
        ):
            return "not re-decided"
        if self.new.outcome == "queued":
            return "other queue" if base.outcome == "queued" else "queued"
        if self.new.outcome == "refused":
            return "refused"
        return "discarded"

    def as_json(self) -> dict[str, Any]:
        def one(v: Verdict | None) -> dict[str, Any] | None:
            if v is None:
                return None
            return {"outcome": v.outcome, "queue": v.queue, "rule": v.rule, "reason": v.reason}

        return {
            "where": self.where,
            "id": self.id,
            "arrival": iso(self.arrival),
            "sender": self.sender,
            "recipient": self.recipient,
            "message_id": self.message_id,
            "change": self.change,
            "stored": one(self.stored),
            "old": one(self.old),
            "new": one(self.new),
        }


@dataclass
class Report:
    """Every message replayed, and the counts per kind of change."""

    rules: str
    baseline: str
    items: list[Item] = field(default_factory=list)
    skipped: int = 0

    @property
    def counts(self) -> dict[str, int]:
        counted = Counter(item.change for item in self.items)
        return {kind: counted.get(kind, 0) for kind in KINDS}

    @property
    def changes(self) -> list[Item]:
        return [item for item in self.items if item.change not in ("unchanged", "not re-decided")]

    def as_json(self) -> dict[str, Any]:
        return {
            "rules": self.rules,
            "compared_with": self.baseline,
            "messages": len(self.items),
            "skipped": self.skipped,
            "counts": self.counts,
            "changes": [item.as_json() for item in self.changes],
        }

    def table(self) -> list[str]:
        lines = [
            f"postoffice: replayed {len(self.items)} stored messages under {self.rules}, "
            f"compared with {self.baseline}"
        ]
        for item in self.changes:
            base = item.old if item.old is not None else item.stored
            lines.append(
                f"{item.where}  {item.id}  <{item.recipient}>  {item.message_id or '-'}: "
                f"{base.label()} -> {item.new.label()}  [{item.change}] {item.new.reason}"
            )
        counts = ", ".join(f"{kind} {n}" for kind, n in self.counts.items())
        lines.append(f"changes: {counts}")
        if self.skipped:
            lines.append(f"skipped {self.skipped} messages without an envelope recipient")
        return lines


class _NoHistory:
    """The queue state replay decides against: no earlier mail (see the module's docstring)."""

    def is_duplicate(self, queue: str, message_id: str, recipient: str, since: float) -> bool:
        return False

    def throttle_view(self, queue: str, key: str, now: float, window: float) -> ThrottleView:
        return ThrottleView(None, None, 0)


@dataclass(frozen=True)
class _Kept:
    """A stored message as read: where, its id, bytes, a fallback time, and its verdict."""

    where: str
    id: int
    raw: bytes
    when: float
    stored: Verdict


def stored_messages(folder: QueuesFolder, queues: Sequence[str]) -> Iterator[_Kept]:
    """Every message of the named queues (all when none), their quarantines, the review area."""
    for name, queue in folder.items():
        if queues and name not in queues:
            continue
        for key, raw, arrived in queue.messages():
            yield _Kept(f"queue {name}", key, raw, arrived, Verdict("queued", name, "queued"))
        for key, raw, when, error in queue.quarantined():
            last = (error.strip().splitlines() or [""])[-1]
            kept = Verdict("queued", name, "queued", f"quarantined: {last}")
            yield _Kept(f"quarantine of {name}", key, raw, when, kept)
    area = folder.review_area(create=False)
    for key, record in area.items() if area is not None else ():
        if queues and record.queue not in queues:
            continue
        kept = Verdict("review", record.queue, record.rule or "-", str(record.error))
        yield _Kept("review", key, record.raw, record.when, kept)
    recent = folder.recent_area(create=False)
    for key, record in recent.items() if recent is not None else ():
        if queues and record.queue not in queues:
            continue
        yield _Kept("recent", key, record.raw, record.when, recent_verdict(record))


def recent_verdict(record: QuarantineRecord) -> Verdict:
    """What a delivery kept for replay was decided: its rule, queue and reply tell."""
    rule, reply = record.rule or "-", str(record.error)
    if rule == "queued":
        return Verdict("queued", record.queue, rule, reply)
    if not reply.startswith("2"):
        return Verdict("refused", record.queue, rule, reply)
    if rule in REVIEW_RULES and "kept for review" in reply:
        return Verdict("review", record.queue, rule, reply)
    return Verdict("discarded", record.queue, rule, reply)


def replay(
    folder: QueuesFolder,
    new: Settings,
    old: Settings | None = None,
    queues: Sequence[str] = (),
    since: float | None = None,
) -> Report:
    """Decide every stored message again; nothing is written (the caller aborts)."""
    report = Report(
        rules=str(new.source or "the new rules"),
        baseline=str(old.source) if old is not None else "what they were stored under",
    )
    seen: set[bytes] = set()  # digests: a depot's worth of bytes would not fit
    for kept in stored_messages(folder, queues):
        digest = hashlib.blake2b(kept.raw, digest_size=16).digest()
        if kept.where == "recent" and digest in seen:
            continue  # also queued, quarantined or kept for review: replayed there
        seen.add(digest)
        envelope = without_added_headers(kept.raw)
        if envelope is not None:
            raw, sender, rcpt = envelope.received, envelope.sender, envelope.recipient
            arrival = float(envelope.arrival)
        else:  # a copy a consumer quarantined after changing its headers
            head = ParsedMessage(kept.raw)
            raw, sender = kept.raw, (head.get("Return-Path") or "").strip().strip("<>")
            rcpt, arrival = (head.get("X-Original-To") or "").strip(), kept.when
        if not rcpt:
            report.skipped += 1
            continue
        if since is not None and arrival < since:
            continue
        message = ParsedMessage(raw)
        at = (message, Envelope(sender, (rcpt,)), rcpt, arrival)
        report.items.append(
            Item(
                where=kept.where,
                id=kept.id,
                arrival=arrival,
                sender=sender,
                recipient=rcpt,
                message_id=message.message_id,
                stored=kept.stored,
                new=_decided(*at, new),
                old=_decided(*at, old) if old is not None else None,
            )
        )
    return report


def _decided(
    message: ParsedMessage, envelope: Envelope, rcpt: str, arrival: float, settings: Settings
) -> Verdict:
    try:
        return verdict(decide(message, envelope, rcpt, arrival, _NoHistory(), settings))
    except Exception as exc:  # a bug of ours: one message, not the whole replay
        return Verdict("error", None, "error", f"{type(exc).__name__}: {exc}")


def parse_since(text: str) -> float:
    """``2026-12-01`` or ``2026-12-01T08:00`` (UTC unless an offset is given): a timestamp."""
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since: not an ISO 8601 date or time: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()
