"""RelStorage's URIs as postoffice opens them: ``postgres://?dsn=...``, one-process ``sqlite://``.

RelStorage's own zodburi resolver builds the connection string from the
URI's parts (``postgres://user:password@host:port/dbname``) and writes
each part that is absent as the word ``None`` (``user='None'``,
``port='None'``), so all five must be given; and a unix socket, which
libpq names by its folder (``host=/run/postgresql``), cannot be written in
a URI's host at all.  A ``dsn`` parameter gives libpq's connection string
whole instead (``host=/run/postgresql dbname=mail``, anything libpq takes:
``sslmode``, ``passfile``, ``service``).  Everything else in the query is
read as RelStorage's resolver reads it (``keep_history``, ``blob_dir``,
``cache_local_mb``, ...) and as zodburi reads it (``connection_*``,
``database_name``): only the connection string is ours.

A ``sqlite://`` depot is opened by one process at a time (see
``_one_process``); a second is told so in one line.

Members of our dependencies used here that their documentation does not
list, pinned in ``pyproject.toml``: RelStorage's ``zodburi_resolver``
classes ``RelStorageURIResolver`` and ``Resolver`` (the resolver the
``postgres`` entry point is made of, reused with our adapter helper), and
zodburi's private ``_get_dbkw`` (the database keywords of a query).
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

import zc.lockfile
import zodburi

from postoffice import retry

DSN = "dsn"

# RelStorage creates its tables, functions and triggers when it first opens
# a database, in one transaction, after looking which exist, and without a
# lock: of two processes opening a new database at once, the second fails
# with one of these PostgreSQL errors (duplicate table, object, function;
# a unique index of the catalog; a deadlock between the two) once the
# first commits.  Its own transaction was rolled back; opened again, it
# finds the schema complete.
SCHEMA_RACE = frozenset({"42P07", "42710", "42723", "23505", "40P01"})
OPEN_ATTEMPTS = 5
OPEN_PATIENCE = 10.0


def open_storage(factory: Callable[[], Any]) -> Any:
    """``factory()``, opened again when another process was creating the schema meanwhile."""
    last: BaseException | None = None
    for _number in retry.attempts(OPEN_ATTEMPTS, OPEN_PATIENCE):
        try:
            return factory()
        except Exception as exc:
            if getattr(exc, "pgcode", None) not in SCHEMA_RACE:
                raise
            last = exc
    assert last is not None
    raise last


def resolve_uri(uri: str) -> tuple[Any, dict[str, Any]]:
    """``zodburi.resolve_uri``, plus ``postgres://?dsn=`` and the one-process ``sqlite://``."""
    scheme, _, rest = uri.partition("://")
    if scheme == "sqlite":
        factory, dbkw = zodburi.resolve_uri(uri)
        return _one_process(factory, rest), dbkw
    if scheme != "postgres":
        return zodburi.resolve_uri(uri)
    authority, _, query = rest.partition("?")
    parameters = urllib.parse.parse_qsl(query, keep_blank_values=True)
    dsn = [value for name, value in parameters if name == DSN]
    if not dsn:
        resolved = zodburi.resolve_uri(uri)  # first: no resolver installed says so
        _require_parts(uri)
        return resolved
    if len(dsn) > 1:
        raise ValueError("give dsn= once")
    if authority.strip("/"):
        raise ValueError(
            "with dsn=, the connection string names the server and the database: "
            "write postgres://?dsn=..., nothing between // and ?"
        )
    rest_uri = "postgres://?" + urllib.parse.urlencode([p for p in parameters if p[0] != DSN])
    return _resolve_dsn(rest_uri, dsn[0])


# --- sqlite:// is for one process ----------------------------------------------------

# Tried with a serve and two consumers in three processes on one sqlite://
# depot: consumers saw RelStorage's CacheConsistencyError and, in one run
# of four, a KeyError from inside pop_next (a tree read half old, half
# new).  Mail was not lost, but a consumer must not meet that; so a second
# process is refused, as a FileStorage refuses it.
LOCK_NAME = "postoffice.lock"
_held: dict[str, tuple[zc.lockfile.LockFile, int]] = {}
_held_lock = threading.Lock()


def _one_process(factory: Callable[[], Any], rest: str) -> Callable[[], Any]:
    """``factory``, opening the SQLite depot only while no other process has it open.

    The lock (``postoffice.lock`` in ``data_dir``) is held from the open to
    the storage's ``close()``, which is wrapped for it (an attribute of the
    storage instance); connections of this same process share it.
    """
    data_dir = dict(urllib.parse.parse_qsl(rest.partition("?")[2])).get("data_dir")

    def opened() -> Any:
        if not data_dir:
            return factory()
        path = os.path.join(os.path.abspath(data_dir), LOCK_NAME)
        _acquire(path)
        try:
            storage = factory()
        except BaseException:
            _release(path)
            raise
        close = storage.close

        def closing() -> None:
            try:
                close()
            finally:
                _release(path)

        storage.close = closing
        return storage

    return opened


def _acquire(path: str) -> None:
    with _held_lock:
        lock, count = _held.get(path, (None, 0))
        if lock is None:
            try:
                lock = zc.lockfile.LockFile(path, content_template="{pid}")
            except zc.lockfile.LockError:
                raise SqliteInUse(
                    f"another process has the sqlite:// depot in {os.path.dirname(path)} open "
                    "(RelStorage's SQLite depot is for one process at a time; "
                    "for serve and consumers in several processes use zeo:// or postgres://)"
                ) from None
        _held[path] = (lock, count + 1)


def _release(path: str) -> None:
    with _held_lock:
        lock, count = _held.pop(path, (None, 0))
        if lock is None:
            return
        if count > 1:
            _held[path] = (lock, count - 1)
        else:
            lock.close()


class SqliteInUse(zc.lockfile.LockError):
    """A second process opening a sqlite:// depot: told why, as a FileStorage's lock is."""


# --- postgres:// ------------------------------------------------------------------------


def _require_parts(uri: str) -> None:
    """RelStorage would connect to port ``None`` as user ``None``: say what is missing instead."""
    parts = urllib.parse.urlsplit(uri.replace("postgres://", "http://", 1))
    try:
        port = parts.port
    except ValueError:
        port = None
    missing = [
        name
        for name, value in (
            ("user", parts.username),
            ("host", parts.hostname),
            ("port", port),
            ("database name", parts.path.strip("/")),
        )
        if not value
    ]
    if missing:
        raise ValueError(
            f"no {', '.join(missing)}: RelStorage needs postgres://USER:PASSWORD@HOST:PORT/DBNAME, "
            "or the libpq connection string whole in dsn= (postgres://?dsn=host%3D/run/postgresql"
            "%20dbname%3Dmail for a unix socket)"
        )


def _resolve_dsn(uri: str, dsn: str) -> tuple[Any, dict[str, Any]]:
    """RelStorage's resolver for ``uri`` (the options), its adapter opened on ``dsn``."""
    from relstorage.zodburi_resolver import RelStorageURIResolver, Resolver

    class DsnAdapterHelper(Resolver):  # type: ignore[misc]
        """RelStorage's PostgreSQL adapter on the connection string given whole."""

        def __call__(self, parsed_uri: Any, kw: dict[str, str]) -> tuple[Any, dict[str, str]]:
            def factory(options: Any) -> Any:
                from relstorage.adapters.postgresql import PostgreSQLAdapter

                return PostgreSQLAdapter(dsn=dsn, options=options)

            return factory, kw

    factory, unused = RelStorageURIResolver(DsnAdapterHelper())(uri)
    return factory, zodburi._get_dbkw(unused)
