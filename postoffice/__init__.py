"""postoffice: a mail delivery agent for Postfix, with application queues in ZODB.

The public API is what applications import: ``open_queue`` and
``find_queue`` to reach a queue, ``consume`` to process what waits in it,
``SMTPSender``/``send_mail`` for bounces and notices, and the error classes.
"""

from postoffice.api import find_queue, open_queue
from postoffice.consumer import Consumed, consume
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
    "Consumed",
    "PostofficeError",
    "Queue",
    "QueueEmpty",
    "QueuesFolder",
    "SMTPSender",
    "StorageUnavailable",
    "TemporaryError",
    "UnreadableMessage",
    "consume",
    "find_queue",
    "open_queue",
    "send_mail",
]
