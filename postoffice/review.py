"""``postoffice review``: the messages a refusal was discarded for, for a person to judge.

With ``[post office] discard``, a refusal of the families it names is
answered 250 and the message kept in the review area of the queues folder
(``postoffice.store.review``) rather than refused after DATA, which would
make Postfix bounce it to a sender who is often forged.  This module is
what the command does with that area: list it, show one message, move
messages into a queue (the rule was wrong for them) or delete them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from postoffice.clock import iso
from postoffice.message import ParsedMessage, without_added_headers
from postoffice.store import QueuesFolder
from postoffice.store.records import QuarantineRecord
from postoffice.store.review import KeptArea


class NoSuchQueue(KeyError):
    """``requeue --to`` names a queue the depot does not have (the command exits 67)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    """One message of the review area, as the listing shows it."""

    id: int
    kept: str  # when, ISO 8601 UTC
    rule: str
    queue: str | None
    sender: str
    recipient: str
    message_id: str | None
    refusal: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def entry(key: int, record: QuarantineRecord) -> Entry:
    """What the listing says of one record: read from its envelope lines and headers."""
    raw = record.raw
    stored = without_added_headers(raw)
    head = ParsedMessage(raw[:65536])
    return Entry(
        id=key,
        kept=iso(record.when),
        rule=record.rule or "-",
        queue=record.queue,
        sender=stored.sender if stored else "",
        recipient=stored.recipient if stored else (head.get("X-Original-To") or ""),
        message_id=head.message_id,
        refusal=str(record.error),
    )


def area_of(folder: QueuesFolder) -> KeptArea | None:
    return folder.review_area(create=False)


def entries(folder: QueuesFolder) -> list[Entry]:
    """Every message kept for review, oldest first."""
    area = area_of(folder)
    return [] if area is None else [entry(key, record) for key, record in area.items()]


def table(rows: Sequence[Entry]) -> list[str]:
    """The human listing: one line a message, the refusal it replaced last."""
    if not rows:
        return ["postoffice: nothing to review"]
    lines = [
        f"{'id':<20}  {'kept':<25}  {'rule':<13}  {'queue':<12}  recipient  message-id  refusal"
    ]
    for r in rows:
        lines.append(
            f"{r.id:<20}  {r.kept:<25}  {r.rule:<13}  {r.queue or '-':<12}  "
            f"<{r.recipient}>  {r.message_id or '-'}  {r.refusal}"
        )
    return lines


def record(folder: QueuesFolder, key: int) -> QuarantineRecord:
    """One record by id; KeyError naming the id when there is none."""
    area = area_of(folder)
    if area is None or key not in area:
        raise KeyError(f"no message {key} in the review area")
    return area.get(key)


def requeue(folder: QueuesFolder, keys: Sequence[int], queue_name: str, now: float) -> int:
    """Move messages into a queue, as they were kept (envelope lines and all); how many.

    The caller commits.  Every id is checked before any is moved, so a
    wrong one moves nothing.
    """
    queue = folder.get(queue_name)
    if queue is None:
        raise NoSuchQueue(folder.unknown_queue(queue_name))
    for key in keys:
        record(folder, key)
    area = area_of(folder)
    if area is None:
        return 0
    chosen = list(keys) if keys else [key for key, _record in area.items()]
    for key in chosen:
        queue.add(area.remove(key).raw, now)
    return len(chosen)


def delete(folder: QueuesFolder, keys: Sequence[int]) -> int:
    """Forget messages of the review area; how many.  The caller commits."""
    for key in keys:
        record(folder, key)
    area = area_of(folder)
    if area is None:
        return 0
    for key in keys:
        area.remove(key)
    return len(keys)
