"""The one error hierarchy of postoffice, split by whether a retry can help.

::

    PostofficeError
     +-- ConfigError          bad configuration: fix the file (exit 78 / refuse to start)
     +-- ListenError          the listening address is taken or unusable (exit 69)
     +-- UsageError           a wrong command line (exit 64 with the usage line)
 +-- NotFound             a command named an id that is not there (exit 65)
 +-- NoInput              a command found nothing to read: file, Maildir, database (exit 66)
     +-- TemporaryError       a retry can succeed: LMTP 451 4.3.0, pipe exit 75
     |    +-- StorageUnavailable   the database cannot be reached or a commit failed
     |         +-- EmbeddedZeoError   serve could not share its file:// depot
     +-- QueueEmpty (also IndexError)   pop_next() on an empty queue
     +-- UnreadableMessage    pop_next() claimed a message whose bytes cannot be read

Permanent refusals of a message are not exceptions: they are decisions
(:class:`postoffice.decide.Decision`), because refusing mail is normal work.
Every error's ``str()`` is one line meant for a person: the commands print
it as it is, never a traceback.
"""

from __future__ import annotations

import os
from typing import Any


class PostofficeError(Exception):
    """Base class of every error postoffice raises on purpose."""


class ConfigError(PostofficeError):
    """The configuration cannot be used; ``str()`` is one line naming where and what."""


class ListenError(PostofficeError):
    """The server cannot listen where it was told: taken, not a socket, too long a path.

    Not a configuration error: the same file works once the other server
    is gone, so ``serve`` exits 69 (unavailable), not 78.
    """


class UsageError(PostofficeError):
    """The command line is wrong; an empty message asks for the usage text alone."""


class NotFound(PostofficeError, KeyError):
    """A command named a message, sender or queue the depot does not hold.

    Also a KeyError, so code that looks things up in the depot's mappings
    catches it as it catches theirs.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class NoInput(PostofficeError):
    """What a command reads is not there: a message file, a Maildir, the database.

    The administrator's commands never create a ``file://`` database: the
    first ``serve``, run as the service user, does, with that user's
    ownership; before that they find none to read.
    """


class TemporaryError(PostofficeError):
    """Retrying later may succeed; Postfix keeps the message (451 / exit 75)."""


class StorageUnavailable(TemporaryError):
    """The database cannot be opened, reached, or the commit did not happen."""


class EmbeddedZeoError(StorageUnavailable):
    """The embedded ZEO server could not start; ``str()`` says why, in one line."""


class QueueEmpty(PostofficeError, IndexError):
    """``pop_next()`` found nothing to pop; an IndexError as in the old package."""


class UnreadableMessage(PostofficeError):
    """``pop_next()`` claimed the oldest message but cannot read its stored bytes.

    A blob file gone, a consumer whose URI has no ``blob_dir``, a blob folder
    it may not read: retrying reads the same bytes the same way, so the
    consumer would stop at this message for ever.  ``message`` stands for
    it (its ``postoffice_id`` names the record) so that
    ``queue.quarantine(error.message, error)`` moves the stored record, all
    its bytes, into the quarantine without reading them; after the cause
    is fixed ``postoffice quarantine requeue`` puts it back.  Errors a retry
    can cure (a conflict, ZEO's ``ClientDisconnected``: ``TransientError``)
    are raised as they are, not as this.
    """

    def __init__(self, key: int, cause: BaseException, message: Any) -> None:
        super().__init__(f"message {key} cannot be read: {type(cause).__name__}: {cause}")
        self.key = key
        self.message = message


def exit_code(error: PostofficeError) -> int:
    """What a command exits with when ``error`` stops it: the sysexits of the tree above.

    64 for a wrong command line, 65 for an id that is not there, 66 for
    nothing to read, 78 for the configuration, 75 when a retry
    can succeed, 69 otherwise (an address taken, something unavailable).  The commands and ``serve``
    share this so that each problem exits the same way from all of them;
    the pipe has its own codes, which Postfix reads as bounce or defer.
    """
    if isinstance(error, UsageError):
        return os.EX_USAGE
    if isinstance(error, NotFound):
        return os.EX_DATAERR
    if isinstance(error, NoInput):
        return os.EX_NOINPUT
    if isinstance(error, ConfigError):
        return os.EX_CONFIG
    if isinstance(error, TemporaryError):
        return os.EX_TEMPFAIL
    return os.EX_UNAVAILABLE
