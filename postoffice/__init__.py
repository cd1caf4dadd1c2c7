"""postoffice: a mail delivery agent for Postfix, with application queues in ZODB.

The public API is what applications import: ``open_queue`` and
``find_queue`` to consume a queue, ``SMTPSender``/``send_mail`` for bounces
and notices, and the error classes.
"""

from postoffice.api import find_queue, open_queue
from postoffice.errors import (
    ConfigError,
    PostofficeError,
    QueueEmpty,
    StorageUnavailable,
    TemporaryError,
    UnreadableMessage,
)
from postoffice.notices import SMTPSender, send_mail
from postoffice.store import Queue, QueuesFolder

__all__ = [
    "ConfigError",
    "PostofficeError",
    "Queue",
    "QueueEmpty",
    "QueuesFolder",
    "SMTPSender",
    "StorageUnavailable",
    "TemporaryError",
    "UnreadableMessage",
    "find_queue",
    "open_queue",
    "send_mail",
]
