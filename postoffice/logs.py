"""Where postoffice's log goes, set up once for every command.

The long-running commands (``serve``, ``policy``, the administrator's
commands) log to stderr, where systemd's journal or the terminal takes it.
``postoffice-deliver`` must never write to stderr (pipe(8) puts what it
prints into bounces), so it logs to ``$POSTOFFICE_LOG`` or to syslog's
``mail`` facility, beside Postfix's own lines.  ZODB, ZEO and transaction
are told to keep their INFO lines to themselves unless asked (``-v``).

Once ``serve`` or ``policy`` has read its configuration, :func:`configure`
moves the log where ``[logging]`` says (stderr, syslog with a facility, or a
file that logrotate may move away) at the level it says; ``-v`` still wins.
``-v`` shows each session's commands (aiosmtpd's ``mail.log`` at INFO),
never ZODB's transaction-by-transaction lines nor a message's content.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
import sys
from collections.abc import Mapping

from postoffice.config import LoggingSettings
from postoffice.errors import ConfigError

LOG_ENV = "POSTOFFICE_LOG"
SYSLOG_SOCKET = "/dev/log"
_LIBRARIES = ("ZODB", "ZEO")
# One line per transaction begun and committed: noise even at -v.
_NOISE = ("txn",)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The handlers this module put on the root logger (replaced by configure),
# and whether -v was given.
_installed: list[logging.Handler] = []
_verbose = False


def to_stderr(verbose: bool = False) -> None:
    """Log INFO (DEBUG with ``verbose``) to stderr; a program that set up logging keeps it."""
    global _verbose
    _verbose = verbose
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    _install(handler, logging.DEBUG if verbose else logging.INFO)


def configure(settings: LoggingSettings, prog: str) -> None:
    """Log where and as much as ``[logging]`` says; a program that set up logging keeps it.

    Only the handler :func:`to_stderr` installed is replaced: tests and
    programs that run our servers in their own process keep theirs.  A file
    that cannot be opened is a configuration error.
    """
    if not _installed:
        return
    handler: logging.Handler | None
    if settings.target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
    elif settings.target == "syslog":
        handler = _syslog_handler(prog, settings.facility)
        if handler is None:
            raise ConfigError(f"[logging] target = syslog: no syslog socket at {SYSLOG_SOCKET}")
    else:
        handler = _file_handler(settings.target, prog)
        if handler is None:
            raise ConfigError(f"[logging] target = {settings.target}: cannot open it for writing")
    assert handler is not None
    _install(handler, logging.DEBUG if _verbose else settings.level)


def _install(handler: logging.Handler, level: int) -> None:
    root = logging.getLogger()
    for old in _installed:
        root.removeHandler(old)
        old.close()
    _installed[:] = [handler]
    root.addHandler(handler)
    root.setLevel(level)
    _quiet_libraries(_verbose)


def for_pipe(
    prog: str,
    environ: Mapping[str, str] | None = None,
    settings: LoggingSettings | None = None,
) -> None:
    """Send the log where an administrator finds it, and never to stderr.

    ``$POSTOFFICE_LOG`` names a file to append to; otherwise syslog through
    ``/dev/log`` with the ``mail`` facility; where neither works, nowhere.
    With ``settings`` (the ``[logging]`` section, read once the configuration
    is), its file or syslog facility and its level instead; ``stderr`` there
    means this default.  A program that already configured logging (a
    wrapper, the tests) keeps its own setup.
    """
    root = logging.getLogger()
    if root.handlers and not _installed:
        return
    environ = os.environ if environ is None else environ
    level = logging.INFO if settings is None else settings.level
    handler = _file_handler(environ.get(LOG_ENV, ""), prog)
    if handler is None and settings is not None and settings.target != "stderr":
        if settings.target == "syslog":
            handler = _syslog_handler(prog, settings.facility)
        else:
            handler = _file_handler(settings.target, prog)
    if handler is None:
        handler = _syslog_handler(prog, "mail")
    _install(handler or logging.NullHandler(), level)
    # A handler that fails (disk full) must not print its own traceback on stderr.
    logging.raiseExceptions = False
    logging.captureWarnings(True)


def _quiet_libraries(verbose: bool = False) -> None:
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    for name in _NOISE:
        logging.getLogger(name).setLevel(logging.WARNING)
    if verbose:  # the session's commands, not the message (that is DEBUG)
        logging.getLogger("mail.log").setLevel(logging.INFO)


def _file_handler(path: str, prog: str) -> logging.Handler | None:
    if not path:
        return None
    try:
        # Reopened when logrotate moves the file away.
        handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {prog}[%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    return handler


def _syslog_handler(prog: str, facility: str) -> logging.Handler | None:
    try:
        if not stat.S_ISSOCK(os.stat(SYSLOG_SOCKET).st_mode):
            return None
        handler = logging.handlers.SysLogHandler(
            SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.facility_names[facility]
        )
    except OSError:
        return None
    handler.setFormatter(logging.Formatter(f"{prog}[%(process)d]: %(levelname)s %(message)s"))
    return handler
