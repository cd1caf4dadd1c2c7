"""The LMTP front door: ``postoffice serve`` and ``python -m postoffice.lmtp``.

A thin protocol edge on aiosmtpd, in three parts: :mod:`.session` speaks
LMTP and reads the message, :mod:`.writer` commits what every session
received (group commit) and answers each only after that commit,
:mod:`.server` listens, counts sessions, handles the signals and is the
entry point of ``serve``.  The names below are what the rest of postoffice,
the tests and the benchmarks import.
"""

from __future__ import annotations

from postoffice.lmtp.server import (
    FALLBACK_SIZE_LIMIT,
    SHUTDOWN_GRACE,
    LmtpServer,
    listen_address,
    main,
    serve,
)
from postoffice.lmtp.session import (
    IDENT,
    LONGEST_LINE_RUN,
    LmtpHandler,
    LmtpSession,
    parse_address,
)
from postoffice.lmtp.writer import CommitWriter

__all__ = [
    "FALLBACK_SIZE_LIMIT",
    "IDENT",
    "LONGEST_LINE_RUN",
    "SHUTDOWN_GRACE",
    "CommitWriter",
    "LmtpHandler",
    "LmtpServer",
    "LmtpSession",
    "listen_address",
    "main",
    "parse_address",
    "serve",
]
