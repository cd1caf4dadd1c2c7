"""The one error hierarchy of postoffice, split by whether a retry can help.

::

    PostofficeError
     +-- ConfigError          bad configuration: fix the file (exit 78 / refuse to start)
     +-- TemporaryError       a retry can succeed: LMTP 451 4.3.0, pipe exit 75
     |    +-- StorageUnavailable   the database cannot be reached or a commit failed
     +-- QueueEmpty (also IndexError)   pop_next() on an empty queue

Permanent refusals of a message are not exceptions: they are decisions
(:class:`postoffice.decide.Decision`), because refusing mail is normal work.
"""

from __future__ import annotations


class PostofficeError(Exception):
    """Base class of every error postoffice raises on purpose."""


class ConfigError(PostofficeError):
    """The configuration cannot be used; ``str()`` is one line naming where and what."""


class TemporaryError(PostofficeError):
    """Retrying later may succeed; Postfix keeps the message (451 / exit 75)."""


class StorageUnavailable(TemporaryError):
    """The database cannot be opened, reached, or the commit did not happen."""


class QueueEmpty(PostofficeError, IndexError):
    """``pop_next()`` found nothing to pop; an IndexError as in the old package."""
