"""Where postoffice's log goes, set up once for every command.

The long-running commands (``serve``, ``policy``, the administrator's
commands) log to stderr, where systemd's journal or the terminal takes it.
``postoffice-deliver`` must never write to stderr (pipe(8) puts what it
prints into bounces), so it logs to ``$POSTOFFICE_LOG`` or to syslog's
``mail`` facility, beside Postfix's own lines.  ZODB, ZEO and transaction
are told to keep their INFO lines to themselves unless asked (``-v``).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
import sys
from collections.abc import Mapping

LOG_ENV = "POSTOFFICE_LOG"
SYSLOG_SOCKET = "/dev/log"
_LIBRARIES = ("ZODB", "ZEO", "txn")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def to_stderr(verbose: bool = False) -> None:
    """Log INFO (DEBUG with ``verbose``) to stderr; a program that set up logging keeps it."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format=_FORMAT, stream=sys.stderr
    )
    if not verbose:
        _quiet_libraries()


def for_pipe(prog: str, environ: Mapping[str, str] | None = None) -> None:
    """Send the log where an administrator finds it, and never to stderr.

    ``$POSTOFFICE_LOG`` names a file to append to; otherwise syslog through
    ``/dev/log`` with the ``mail`` facility; where neither works, nowhere.
    A program that already configured logging (a wrapper, the tests) keeps
    its own setup.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    environ = os.environ if environ is None else environ
    handler = _file_handler(environ.get(LOG_ENV, ""), prog) or _syslog_handler(prog)
    root.addHandler(handler or logging.NullHandler())
    root.setLevel(logging.INFO)
    _quiet_libraries()
    # A handler that fails (disk full) must not print its own traceback on stderr.
    logging.raiseExceptions = False
    logging.captureWarnings(True)


def _quiet_libraries() -> None:
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def _file_handler(path: str, prog: str) -> logging.Handler | None:
    if not path:
        return None
    try:
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {prog}[%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    return handler


def _syslog_handler(prog: str) -> logging.Handler | None:
    try:
        if not stat.S_ISSOCK(os.stat(SYSLOG_SOCKET).st_mode):
            return None
        handler = logging.handlers.SysLogHandler(
            SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
    except OSError:
        return None
    handler.setFormatter(logging.Formatter(f"{prog}[%(process)d]: %(levelname)s %(message)s"))
    return handler
