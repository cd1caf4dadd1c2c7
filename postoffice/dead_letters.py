"""``postoffice dead-letters``: mail answered 250 whose decision failed with a bug of ours.

Such a message is kept in the folder's dead-letter area with the
traceback (Postfix was told it was delivered, so it must not be lost).
This module is what the command does with the area: list it, show one,
deliver messages again through the rules once the cause is fixed, or
delete them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from postoffice.clock import iso
from postoffice.errors import NotFound
from postoffice.message import ParsedMessage
from postoffice.store import QueuesFolder
from postoffice.store.records import DeadLetter

COLUMNS = ("id", "kept", "from", "to", "message-id", "error")


@dataclass(frozen=True)
class Entry:
    """One dead letter as the listing shows it."""

    id: int
    kept: str  # ISO 8601 UTC
    sender: str
    recipients: tuple[str, ...]
    message_id: str | None
    error: str  # the traceback's last line

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def cells(self) -> tuple[object, ...]:
        return (
            self.id,
            self.kept,
            f"<{self.sender}>",
            ", ".join(f"<{r}>" for r in self.recipients),
            self.message_id,
            self.error,
        )


def last_line(error: str) -> str:
    return (str(error).strip().splitlines() or [""])[-1]


def entries(folder: QueuesFolder) -> list[Entry]:
    """Every dead letter, oldest first."""
    return [
        Entry(
            key,
            iso(letter.when),
            letter.sender,
            tuple(letter.recipients),
            ParsedMessage(bytes(letter.data)[:65536]).message_id,
            last_line(letter.error),
        )
        for key, letter in folder.dead_letters.items()
    ]


def letter(folder: QueuesFolder, key: int) -> DeadLetter:
    """One dead letter by id; NotFound naming the id when there is none."""
    found = folder.dead_letters.get(key)
    if found is None:
        raise NotFound(f"no dead letter {key}")
    return found


def chosen(folder: QueuesFolder, keys: Sequence[int]) -> list[int]:
    """The ids asked for, all checked first (a wrong one acts on none); all when none given."""
    for key in keys:
        letter(folder, key)
    return list(keys) if keys else list(folder.dead_letters.keys())


def remove(folder: QueuesFolder, keys: Sequence[int]) -> int:
    """Forget dead letters; how many.  The caller commits."""
    for key in keys:
        letter(folder, key)
    for key in keys:
        del folder.dead_letters[key]
        folder.dead_letter_count.change(-1)
    return len(keys)
