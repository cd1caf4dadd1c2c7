"""The consumer's view of a stored message, and the bytes a message is stored as.

``pop_next`` parses the stored bytes into a :class:`StoredMessage`: header
values decoded as ``email``'s modern policy does, and the stored bytes
kept, so that a message handed back unchanged (to ``quarantine``, say) is
stored again byte for byte.
"""

from __future__ import annotations

import email.policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import Any

from transaction.interfaces import TransientError

from postoffice.errors import UnreadableMessage


def as_bytes(message: Message) -> bytes:
    """Bytes of a message to store: as popped when unchanged, else generated."""
    try:
        return message.as_bytes()
    except Exception:
        # Hostile headers can defeat the modern policy's folding; compat32 copes.
        return message.as_bytes(policy=email.policy.compat32)


class StoredMessage(EmailMessage):
    """What ``pop_next`` returns: header values decoded, and the stored bytes.

    ``as_bytes()`` (and ``bytes()``) of a message nobody changed give back
    exactly the bytes stored, which ``email``'s generator does not (it
    refolds headers, rewrites line ends and multipart boundaries).  Once any
    part is changed, the message is generated as ``email`` always does.
    """

    postoffice_id: int | None = None
    _stored: bytes | None = None
    _pristine: tuple[Any, ...] | None = None

    def as_bytes(self, unixfrom: bool = False, policy: Any = None) -> bytes:
        stored = self._stored
        if stored is not None and not unixfrom and policy is None and self._unchanged():
            return stored
        return super().as_bytes(unixfrom=unixfrom, policy=policy)

    def __bytes__(self) -> bytes:
        return self.as_bytes()

    def _unchanged(self) -> bool:
        return self._pristine is not None and _same_shape(_shape(self), self._pristine)


def _shape(message: Message) -> tuple[Any, ...]:
    """Every part with what the generator reads from it, for an identity comparison."""
    parts = []
    for part in message.walk():
        payload = part._payload  # type: ignore[attr-defined]
        parts.append(
            (
                part,
                tuple(part._headers),  # type: ignore[attr-defined]
                tuple(payload) if isinstance(payload, list) else payload,
                part.preamble,
                part.epilogue,
                part._unixfrom,  # type: ignore[attr-defined]
                part._charset,  # type: ignore[attr-defined]
                part._default_type,  # type: ignore[attr-defined]
                part.policy,
            )
        )
    return tuple(parts)


def _same_shape(now: tuple[Any, ...], then: tuple[Any, ...]) -> bool:
    if len(now) != len(then):
        return False
    for a, b in zip(now, then, strict=True):
        if len(a) != len(b):
            return False
        for x, y in zip(a, b, strict=True):
            if isinstance(x, tuple) and isinstance(y, tuple):
                if len(x) != len(y) or any(i is not j for i, j in zip(x, y, strict=True)):
                    return False
            elif x is not y:
                return False
    return True


def stored_message(raw: bytes, key: int | None = None, quarantined: bool = False) -> StoredMessage:
    """The consumer's view of stored bytes (``postoffice_id`` names the record).

    A quarantined one carries its id as ``X-Postoffice-Id`` too, as in 0.25.
    """
    if quarantined and key is not None:
        from postoffice.store.quarantine import with_id_header

        raw = with_id_header(raw, key)
    message = BytesParser(_class=StoredMessage, policy=email.policy.default).parsebytes(raw)
    assert isinstance(message, StoredMessage)
    message._stored = raw
    message._pristine = _shape(message)
    message.postoffice_id = key
    if quarantined and key is not None:
        message.__name__ = key  # type: ignore[attr-defined]
    return message


def read_bytes(record: Any, key: int) -> bytes:
    """A record's bytes, or :class:`UnreadableMessage` (with a stand-in) if they cannot be read.

    What a retry can cure (``TransientError``: a conflict, ZEO's
    ``ClientDisconnected``) goes up as it is.
    """
    try:
        return bytes(record.raw)
    except TransientError:
        raise
    except Exception as error:
        raise UnreadableMessage(key, error, stored_message(b"", key)) from error


def readable(record: Any, key: int) -> StoredMessage:
    """The consumer's view of a record it has just claimed.

    When the bytes cannot be read, :class:`UnreadableMessage` carries a
    stand-in with the record's id, so that the consumer can quarantine the
    record itself instead of stopping at it at every start.
    """
    return stored_message(read_bytes(record, key), key)


def quarantined_view(record: Any, key: int) -> tuple[StoredMessage, str]:
    """(message, error text) of a quarantined record, also when its bytes are gone.

    One unreadable record must not hide the others from whoever lists the
    quarantine: it is shown as an empty message whose error text ends with
    why its bytes cannot be read.
    """
    try:
        raw = read_bytes(record, key)
    except UnreadableMessage as error:
        return stored_message(b"", key, quarantined=True), f"{record.error}\n{error}"
    return stored_message(raw, key, quarantined=True), record.error
