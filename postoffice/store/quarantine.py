"""A queue's quarantine: messages set aside with their error, for a person to look at.

Two attributes of the queue, read and written only here:

- ``_quarantine``: ``LOBTree`` id -> ``QuarantineRecord``, oldest first;
- ``_quarantine_length``: ``Length``, how many (so counting is O(1)).

An id is the key the message had in the queue when it was quarantined
from there, else a new key; ``pop_next`` sets it as ``postoffice_id`` and
the old API knew it as ``__name__`` and as the ``X-Postoffice-Id`` header
(a string) of a quarantined message: :func:`with_id_header` puts it on
top of the stored bytes as they are read back, the bytes kept stay as
they were received.
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

    def oldest(self) -> int | None:
        """The id of the oldest record; None when there is none."""
        return int(self._records.minKey()) if self._records else None

    def newest(self) -> int | None:
        """The id of the newest record; None when there is none."""
        return int(self._records.maxKey()) if self._records else None

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


ID_HEADER = "X-Postoffice-Id"


def quarantine_id(message: Message) -> int | None:
    """The quarantine id of a message: ``__name__``, ``X-Postoffice-Id`` or ``postoffice_id``."""
    key = getattr(message, "__name__", None)
    if isinstance(key, int):
        return key
    header = message.get(ID_HEADER)
    if header is not None:
        return parse_id(str(header))
    key = getattr(message, "postoffice_id", None)
    return key if isinstance(key, int) else None


def parse_id(value: object) -> int | None:
    """A quarantine id given as an int or as the text of one (None when it is neither)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str | bytes):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def with_id_header(raw: bytes, key: int) -> bytes:
    """The stored bytes with ``X-Postoffice-Id: key`` on top, in the message's line ends."""
    first_line = raw.split(b"\n", 1)[0]
    eol = b"\r\n" if first_line.endswith(b"\r") else b"\n"
    return f"{ID_HEADER}: {key}".encode() + eol + raw
