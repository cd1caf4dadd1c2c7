"""A queue's quarantine: messages set aside with their error, for a person to look at.

Two attributes of the queue, read and written only here:

- ``_quarantine``: ``LOBTree`` id -> ``QuarantineRecord``, oldest first;
- ``_quarantine_length``: ``Length``, how many (so counting is O(1)).

An id is the key the message had in the queue when it was quarantined
from there, else a new key; ``pop_next`` sets it as ``postoffice_id`` and
the old API knew it as ``__name__``.
"""

from __future__ import annotations

from collections.abc import Iterator
from email.message import Message

from BTrees.Length import Length
from BTrees.LOBTree import LOBTree

from postoffice.store.records import QuarantineRecord, new_key


class Quarantine:
    """The quarantine of one queue, over the queue's own tree and counter."""

    def __init__(self, records: LOBTree, length: Length) -> None:
        self._records = records
        self._length = length

    def add(self, record: QuarantineRecord, key: int | None, now: float) -> int:
        """Keep ``record`` under ``key`` when that id is free, else a new one; the id."""
        qkey = key if key is not None and key not in self._records else new_key(now)
        self._records[qkey] = record
        self._length.change(1)
        return qkey

    def items(self) -> Iterator[tuple[int, QuarantineRecord]]:
        """(id, record), oldest first."""
        yield from self._records.items()

    def get(self, key: int) -> QuarantineRecord:
        """The record of an id; KeyError when there is none."""
        record: QuarantineRecord = self._records[int(key)]
        return record

    def count(self) -> int:
        return int(self._length())

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def remove(self, key: int) -> QuarantineRecord:
        """Forget an id; its record (KeyError when there is none)."""
        record = self.get(key)
        del self._records[int(key)]
        self._length.change(-1)
        return record

    def ids(self) -> list[int]:
        return list(self._records.keys())


def quarantine_id(message: Message) -> int | None:
    """The quarantine id of a message: ``__name__`` (old API) or ``postoffice_id``."""
    for name in ("__name__", "postoffice_id"):
        key = getattr(message, name, None)
        if isinstance(key, int):
            return key
    return None
