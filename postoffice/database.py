"""Opening the depot's database, the one way every command and consumer does it.

A depot is named by a zodburi URI (``file://``, ``zeo://``, ``memory://``,
RelStorage's).  Three things make opening it more than
``zodburi.resolve_uri``:

- A ``file://`` FileStorage can be opened by one process only.  While
  ``postoffice serve`` runs on one, it shares it through a ZEO server on
  ``zeo.sock`` beside ``Data.fs``; everybody else (``queues``, the pipe, a
  consumer given the ``file://`` URI) is sent there instead
  (:func:`consumer_uri`).
- ``postoffice-deliver`` may find the file locked for a moment by another
  short-lived process: it waits that out (:func:`open_db_waiting`).
- The front doors must tell "the database is away" (defer: 451 / 75) from a
  bug of ours (:func:`is_storage_away`).

Errors: a URI zodburi cannot read is a :class:`ConfigError`; a storage that
cannot be opened is :class:`StorageUnavailable`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import struct
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zc.lockfile
import ZODB
from ZODB.interfaces import IBlobStorage
from ZODB.POSException import ConflictError, POSError

from postoffice import relstorage_uri, retry, sockets
from postoffice.errors import ConfigError, NoInput, StorageUnavailable

log = logging.getLogger("postoffice.database")

SOCKET_NAME = "zeo.sock"
# postoffice-deliver waits this long, polling, while another process holds
# a FileStorage's lock.
LOCK_WAIT = 10.0
LOCK_POLL = 0.2
# Creating the root object of a new database, against other processes doing it too.
ROOT_ATTEMPTS = 5
ROOT_PATIENCE = 10.0

# zodburi's file:// options that belong to the FileStorage (opened by serve;
# ZEO clients with the shared blob folder read its layout from its .layout
# file); every other option (database_name, connection_*) is for ZODB.DB
# and goes on into the client URI too.
_STORAGE_OPTIONS = ("create", "read_only", "quota", "blobstorage_layout")
_UNSHAREABLE = ("demostorage",)

# What "the database is not there" is, rather than a bug of ours: ZODB's and
# ZEO's storage errors (ZEO's ClientDisconnected, ReadOnlyError, ...) and
# the operating system's (a socket, a file, a disk).
_STORAGE_AWAY: tuple[type[BaseException], ...] = (POSError, OSError)


@dataclass(frozen=True)
class FileDepot:
    """What a ``file://`` zodb_uri names, and the ZEO URI that shares it."""

    data_fs: Path
    blob_dir: Path | None
    db_options: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, uri: str) -> FileDepot:
        """Read a ``file://`` URI as zodburi does (the path is not %-decoded)."""
        if not uri.startswith("file://"):
            raise ConfigError(f"zodb_uri {uri!r}: not a file:// URI")
        path, _, query = uri[len("file://") :].partition("?")
        if not path:
            raise ConfigError(f"zodb_uri {uri!r}: no file path")
        blob_dir: Path | None = None
        db: list[tuple[str, str]] = []
        for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            if name == "blobstorage_dir":
                blob_dir = Path(os.path.abspath(value)) if value else None
            elif name in _UNSHAREABLE:
                raise ConfigError(
                    f"zodb_uri {uri!r}: {name} cannot be shared through ZEO (set share = no)"
                )
            elif name in _STORAGE_OPTIONS:
                continue
            else:
                db.append((name, value))
        data_fs = Path(os.path.abspath(os.path.normpath(path)))
        return cls(data_fs, blob_dir, tuple(db))

    @property
    def socket_path(self) -> Path:
        """``zeo.sock`` beside Data.fs: found from the config alone, by every tool."""
        return self.data_fs.parent / SOCKET_NAME

    @property
    def client_uri(self) -> str:
        """The ``zeo://`` URI of the shared depot, for ``serve`` and for consumers."""
        sock = str(self.socket_path)
        if "?" in sock or "#" in sock:
            raise ConfigError(f"{sock}: a ZEO socket path cannot contain '?' or '#'")
        query: list[tuple[str, str]] = []
        if self.blob_dir is not None:
            query += [("shared_blob_dir", "true"), ("blob_dir", str(self.blob_dir))]
        query += self.db_options
        text = urllib.parse.urlencode(query, safe="/", quote_via=urllib.parse.quote)
        return f"zeo://{sock}?{text}" if text else f"zeo://{sock}"


# --- the running-server redirect ------------------------------------------------


def running_client_uri(uri: str) -> str | None:
    """The consumer URI when a ``serve`` is sharing this ``file://`` depot right now.

    None when the URI is not ``file://`` or no ZEO server answers on its socket.
    """
    if not uri.startswith("file://"):
        return None
    try:
        depot = FileDepot.parse(uri)
        client_uri = depot.client_uri
    except ConfigError:
        return None
    alive = sockets.probe(depot.socket_path, greet=zeo_greet) is sockets.SocketState.ALIVE
    return client_uri if alive else None


def consumer_uri(uri: str) -> str:
    """The URI to open ``uri`` by from another process: the running server's, if any."""
    return running_client_uri(uri) or uri


def zeo_greet(sock: socket.socket) -> None:
    """Ask a ZEO server ``ruok`` (what ``ZEO.nagios`` sends).

    A bare connect-and-close makes ZEO's server log an ERROR every time;
    this is a conversation it expects.  What it answers does not matter.
    """
    sock.sendall(struct.pack(">I", 4) + b"ruok")
    _read_zeo_message(sock)  # the server's protocol announcement
    json.loads(_read_zeo_message(sock))


def _read_zeo_message(sock: socket.socket) -> bytes:
    """One of ZEO's size-prefixed messages."""
    (size,) = struct.unpack(">I", _read_exactly(sock, 4))
    return _read_exactly(sock, size)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ValueError("connection closed")
        data += chunk
    return data


# --- opening --------------------------------------------------------------------


def open_db(uri: str, *, create: bool = True, read_only: bool = False) -> ZODB.DB:
    """Open a database by zodburi URI; StorageUnavailable when it cannot be reached.

    A ``file://`` depot that a running ``postoffice serve`` is sharing is
    opened through that server: the file itself is locked by it.

    The administrator's commands pass ``create=False``: run as root before
    the first ``serve``, they would otherwise make a ``Data.fs`` (and its
    folders) owned by root, which the service user then cannot lock.  A
    ``file://`` depot that does not exist yet is then :class:`~postoffice.errors.NoInput`.
    ``read_only`` opens a file that nobody serves without taking its lock,
    so a look at the queues never stops a ``serve`` from starting.
    """
    uri = consumer_uri(uri)
    if uri.startswith("file://"):
        if not create:
            data_fs = FileDepot.parse(uri).data_fs
            if not data_fs.exists():
                raise NoInput(f"no database at {data_fs} yet (postoffice serve creates it)")
        if read_only:
            uri = with_query(uri, "read_only", "true")
    storage, dbkw = open_storage(uri, make_dirs=create, create=create)
    return db_for(storage, dbkw, uri)


def with_query(uri: str, name: str, value: str) -> str:
    """``uri`` with one more query parameter (a zodburi option)."""
    return f"{uri}{'&' if '?' in uri else '?'}{name}={value}"


def open_db_waiting(
    uri: str,
    wait: float = LOCK_WAIT,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> ZODB.DB:
    """``open_db``, waiting up to ``wait`` seconds while another process holds the file lock."""
    deadline = clock() + wait
    told = False  # one line for the wait, not one a poll
    while True:
        try:
            return open_db(uri)
        except StorageUnavailable as exc:
            if not is_lock_error(exc) or clock() >= deadline:
                raise
            if not told:
                log.info("database locked by another process, waiting up to %gs: %s", wait, exc)
                told = True
        sleep(LOCK_POLL)


# Query parameters whose value is a secret (RelStorage's and ZEO's spellings).
_SECRET_PARAMETER = re.compile(
    r"(?i)((?:^|[&;?\s]|%20)(?:password|passwd|pass|secret)(?:\s*=\s*|%3D))"
    r"([^&;\s']+?)(?=%20|[&;\s']|$)"
)


def redact_uri(uri: str) -> str:
    """``uri`` with its password replaced by ``***``, fit to print or log.

    ``postoffice check``, error messages and logs are read by people who
    must not learn the database's password: the ``user:password@`` part and
    ``password=`` parameters (also inside a ``dsn=`` value) are hidden.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return _SECRET_PARAMETER.sub(r"\1***", uri)
    authority, tail = _split_authority(rest)
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.split(':', 1)[0]}:***@{host}"
    return f"{scheme}://{authority}" + _SECRET_PARAMETER.sub(r"\1***", tail)


def _split_authority(rest: str) -> tuple[str, str]:
    """``host...`` and the path, query and fragment after it, of what follows ``://``."""
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    return rest[:end], rest[end:]


def redact(text: str, uri: str) -> str:
    """``text`` (an error message) with ``uri`` and each secret in it hidden."""
    redacted = redact_uri(uri)
    if redacted == uri:
        return text
    text = text.replace(uri, redacted)
    for secret in _secrets(uri):
        text = text.replace(secret, "***")
    return text


def _secrets(uri: str) -> list[str]:
    found = [match.group(2) for match in _SECRET_PARAMETER.finditer(uri)]
    authority, _ = _split_authority(uri.partition("://")[2])
    userinfo, at, _ = authority.rpartition("@")
    if at and ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    decoded = [urllib.parse.unquote(secret) for secret in found]
    return sorted({s for s in found + decoded if s}, key=len, reverse=True)


# Where the resolvers of the other schemes come from.
RESOLVER_HINTS = {
    "postgres": " (pip install 'postoffice[postgresql]')",
    "postgresql": " (pip install 'postoffice[postgresql]'; the scheme is postgres://)",
    "sqlite": " (pip install 'postoffice[sqlite]')",
    "mysql": " (pip install 'RelStorage[mysql]')",
}


def open_storage(
    uri: str, make_dirs: bool = True, create: bool = True
) -> tuple[Any, dict[str, Any]]:
    """The storage a zodburi URI names, opened, and the keywords for its ``ZODB.DB``.

    A storage the operating system refuses to open for this user
    (``Data.fs.lock`` owned by root, a blob folder it may not enter) is a
    :class:`ConfigError`, not a temporary failure: retrying cannot help,
    and ``serve`` exiting 75 would make systemd restart it for ever.
    """
    try:
        factory, dbkw = relstorage_uri.resolve_uri(uri, create=create)
    except KeyError as exc:  # zodburi's answer to a scheme, or to parameters, it does not know
        if "Unrecognized database keyword" in str(exc):
            raise ConfigError(
                f"zodb_uri {redact_uri(uri)!r}: unknown parameters: "
                f"{', '.join(sorted(getattr(exc, 'kw', None) or ['?']))}"
            ) from None
        scheme = uri.partition(":")[0]
        raise ConfigError(
            f"zodb_uri {redact_uri(uri)!r}: no resolver for {scheme}: URIs is installed"
            f"{RESOLVER_HINTS.get(scheme.lower(), '')}"
        ) from None
    except NoInput:
        raise
    except Exception as exc:
        raise ConfigError(redact(f"zodb_uri {uri!r}: {exc}", uri)) from None
    if make_dirs:
        _make_file_dirs(uri)
    try:
        return relstorage_uri.open_storage(factory), dbkw
    except NoInput:
        raise
    except Exception as exc:
        # One line: libpq's messages run over two.
        message = " ".join(redact(f"cannot open {uri}: {exc}", uri).split())
        if is_permission_error(exc):
            raise ConfigError(f"{message} (run as the user that owns the database)") from None
        raise StorageUnavailable(message) from None


def db_for(storage: Any, dbkw: dict[str, Any], uri: str) -> ZODB.DB:
    """``ZODB.DB(storage)``; the storage is closed again if that fails."""
    _forget_prefetched_oids(storage)
    error: Exception | None = None
    # ZODB.DB creates the root object of a new database; another process
    # creating it at the same moment makes this a ConflictError (or a
    # ReadConflictError: "object deleted", the root committed since this
    # snapshot), and the root is there when it is tried again.
    for _number in retry.attempts(ROOT_ATTEMPTS, ROOT_PATIENCE):
        try:
            return ZODB.DB(storage, **dbkw)
        except ConflictError as exc:
            error = exc
        except Exception as exc:
            error = exc
            break
    with contextlib.suppress(Exception):
        storage.close()
    raise StorageUnavailable(redact(f"cannot open {uri}: {error}", uri)) from None


def has_blobs(db: ZODB.DB) -> bool:
    return IBlobStorage.providedBy(db.storage)


# --- what the errors mean ---------------------------------------------------------


def is_storage_away(exc: BaseException) -> bool:
    """The database is not there (defer and retry), rather than a bug of ours."""
    return isinstance(exc, _STORAGE_AWAY)


def is_permission_error(exc: BaseException) -> bool:
    """The operating system said no to this user, somewhere in the chain."""
    return _in_chain(exc, PermissionError)


def is_lock_error(exc: BaseException) -> bool:
    """zc.lockfile's LockError in the chain: FileStorage is busy, not broken."""
    return _in_chain(exc, zc.lockfile.LockError)


def _in_chain(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# --- private: ZEO and FileStorage details -------------------------------------------


def _forget_prefetched_oids(storage: Any) -> None:
    """A ZEO client drops the object ids it fetched ahead when it reconnects.

    ``ClientStorage`` fetches new oids from the server a hundred at a time
    and keeps the unused ones across a reconnection (ZEO 6.2).  A ZEO server
    that was restarted counts on from the highest oid *committed*, so it
    hands those out again: the next transaction that uses up the old ones
    and asks for more gets two objects with one oid and fails with
    ``ValueError: A different object already has the same oid`` (after a
    ZEO outage, docs/reliability.md), and two clients could be given the
    same ones.  Forgetting them costs at most a hundred oids a reconnection.

    Private members used: ``ClientStorage._oids`` (the prefetched ids) and
    ``notify_connected`` (wrapped); ZEO's version range is pinned for them.
    """
    if not isinstance(getattr(storage, "_oids", None), list):
        return
    from ZEO.ClientStorage import ClientStorage

    if not isinstance(storage, ClientStorage):
        return
    connected = storage.notify_connected

    def notify_connected(conn: Any, info: Any) -> None:
        storage._oids = []
        connected(conn, info)

    storage.notify_connected = notify_connected


def _make_file_dirs(uri: str) -> None:
    """A file:// depot creates its folders (the embedded default lives in ``var/``)."""
    if not uri.startswith("file://"):
        return
    parts = urllib.parse.urlsplit(uri)
    paths = [Path(parts.path).parent]
    blob_dir = dict(urllib.parse.parse_qsl(parts.query)).get("blobstorage_dir")
    if blob_dir:
        paths.append(Path(blob_dir).parent)
    for path in paths:
        # On failure FileStorage will say what is wrong, in its own words.
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True, mode=0o750)
