"""The one error hierarchy of postoffice, split by whether a retry can help.

::

    PostofficeError
     +-- ConfigError          bad configuration: fix the file (exit 78 / refuse to start)
     +-- ListenError          the listening address is taken or unusable (exit 69)
     +-- UsageError           a wrong command line (exit 64 with the usage line)
     +-- TemporaryError       a retry can succeed: LMTP 451 4.3.0, pipe exit 75
     |    +-- StorageUnavailable   the database cannot be reached or a commit failed
     |         +-- EmbeddedZeoError   serve could not share its file:// depot
     +-- QueueEmpty (also IndexError)   pop_next() on an empty queue

Permanent refusals of a message are not exceptions: they are decisions
(:class:`postoffice.decide.Decision`), because refusing mail is normal work.
Every error's ``str()`` is one line meant for a person: the commands print
it as it is, never a traceback.
"""

from __future__ import annotations

import os


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


class TemporaryError(PostofficeError):
    """Retrying later may succeed; Postfix keeps the message (451 / exit 75)."""


class StorageUnavailable(TemporaryError):
    """The database cannot be opened, reached, or the commit did not happen."""


class EmbeddedZeoError(StorageUnavailable):
    """The embedded ZEO server could not start; ``str()`` says why, in one line."""


class QueueEmpty(PostofficeError, IndexError):
    """``pop_next()`` found nothing to pop; an IndexError as in the old package."""


def exit_code(error: PostofficeError) -> int:
    """What a command exits with when ``error`` stops it: the sysexits of the tree above.

    78 for the configuration, 75 when a retry can succeed, 69 otherwise (an
    address taken, something unavailable).  The commands and ``serve``
    share this so that each problem exits the same way from all of them;
    the pipe has its own codes, which Postfix reads as bounce or defer.
    """
    if isinstance(error, ConfigError):
        return os.EX_CONFIG
    if isinstance(error, TemporaryError):
        return os.EX_TEMPFAIL
    return os.EX_UNAVAILABLE
