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
classes ``RelStorageURIResolver``, ``Resolver`` and the adapter helpers
(what the ``postgres`` and ``sqlite`` entry points are made of, reused
with our adapter helper and without schema creation), its schema
installer's ``list_tables``, and zodburi's private ``_get_dbkw`` (the
database keywords of a query).
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
from postoffice.errors import NoInput

DSN = "dsn"
NO_DEPOT = "no postoffice depot in this database yet (postoffice serve creates it)"
# The table of object states, in RelStorage's history-free and history-preserving schemas alike.
OBJECT_TABLE = "object_state"

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


def resolve_uri(uri: str, create: bool = True) -> tuple[Any, dict[str, Any]]:
    """``zodburi.resolve_uri``, plus ``postgres://?dsn=`` and the one-process ``sqlite://``.

    Without ``create``, a RelStorage depot whose tables do not exist yet is
    not made: opening it is :class:`~postoffice.errors.NoInput`, as a
    ``Data.fs`` that is not there is for the administrator's commands.
    """
    scheme, _, rest = uri.partition("://")
    if scheme == "sqlite":
        zodburi.resolve_uri(uri)  # first: no resolver installed says so
        factory, dbkw = _relstorage(_helper("SqliteAdapterHelper"), uri, create)
        data_dir = dict(urllib.parse.parse_qsl(rest.partition("?")[2])).get("data_dir")
        if not create and data_dir and not os.path.exists(os.path.join(data_dir, SQLITE_FILE)):
            # Not even the lock file: sqlite3 would make an empty database to look into.
            raise NoInput(f"no database in {data_dir} yet (postoffice serve creates it)")
        return _one_process(factory, data_dir), dbkw
    if scheme != "postgres":
        return zodburi.resolve_uri(uri)
    authority, _, query = rest.partition("?")
    parameters = urllib.parse.parse_qsl(query, keep_blank_values=True)
    dsn = [value for name, value in parameters if name == DSN]
    if not dsn:
        zodburi.resolve_uri(uri)  # first: no resolver installed says so
        _require_parts(uri)
        return _relstorage(_helper("PostgreSQLAdapterHelper"), uri, create)
    if len(dsn) > 1:
        raise ValueError("give dsn= once")
    if authority.strip("/"):
        raise ValueError(
            "with dsn=, the connection string names the server and the database: "
            "write postgres://?dsn=..., nothing between // and ?"
        )
    rest_uri = "postgres://?" + urllib.parse.urlencode([p for p in parameters if p[0] != DSN])
    return _relstorage(_dsn_helper(dsn[0]), rest_uri, create)


# --- sqlite:// is for one process ----------------------------------------------------

# Tried with a serve and two consumers in three processes on one sqlite://
# depot: consumers saw RelStorage's CacheConsistencyError and, in one run
# of four, a KeyError from inside pop_next (a tree read half old, half
# new).  Mail was not lost, but a consumer must not meet that; so a second
# process is refused, as a FileStorage refuses it.
LOCK_NAME = "postoffice.lock"
# The database file RelStorage's SQLite adapter keeps in data_dir.
SQLITE_FILE = "main.sqlite3"
_held: dict[str, tuple[zc.lockfile.LockFile, int]] = {}
_held_lock = threading.Lock()


def _one_process(factory: Callable[[], Any], data_dir: str | None) -> Callable[[], Any]:
    """``factory``, opening the SQLite depot only while no other process has it open.

    The lock (``postoffice.lock`` in ``data_dir``) is held from the open to
    the storage's ``close()``, which is wrapped for it (an attribute of the
    storage instance); connections of this same process share it.
    """

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


def _dsn_helper(dsn: str) -> Any:
    """RelStorage's PostgreSQL adapter on the connection string given whole."""
    from relstorage.zodburi_resolver import Resolver

    class DsnAdapterHelper(Resolver):  # type: ignore[misc]
        def __call__(self, parsed_uri: Any, kw: dict[str, str]) -> tuple[Any, dict[str, str]]:
            def factory(options: Any) -> Any:
                from relstorage.adapters.postgresql import PostgreSQLAdapter

                return PostgreSQLAdapter(dsn=dsn, options=options)

            return factory, kw

    return DsnAdapterHelper()


def _helper(name: str) -> Any:
    """One of RelStorage's own adapter helpers (what its resolvers are made of)."""
    from relstorage import zodburi_resolver

    return getattr(zodburi_resolver, name)()


# --- opening, and not creating ------------------------------------------------------


def _relstorage(helper: Any, uri: str, create: bool) -> tuple[Any, dict[str, Any]]:
    """RelStorage's resolver over ``helper``; without ``create``, nothing made in the database.

    RelStorage creates (or updates) its tables when it opens a database,
    unless told ``create_schema`` false; and told so, it opens an empty
    database with "Schema mismatch", which is no answer for an
    administrator.  So the adapter looks for RelStorage's object table
    first, and its absence is :class:`NoInput`.
    """
    from relstorage.zodburi_resolver import RelStorageURIResolver

    def adapter_helper(parsed_uri: Any, kw: dict[str, str]) -> tuple[Any, dict[str, str]]:
        adapter_factory, unused = helper(parsed_uri, kw)
        if create:
            return adapter_factory, unused

        def factory(options: Any) -> Any:
            adapter = adapter_factory(options)
            if not _has_tables(adapter):
                raise NoInput(
                    "no postoffice depot in this database yet (postoffice serve creates it)"
                )
            return adapter

        return factory, unused

    class URIResolver(RelStorageURIResolver):  # type: ignore[misc]
        def interpret_kwargs(self, kw: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
            options, unused = super().interpret_kwargs(kw)
            if not create:
                options["create_schema"] = False
            return options, unused

    factory, unused = URIResolver(adapter_helper)(uri)
    return factory, zodburi._get_dbkw(unused)


def _has_tables(adapter: Any) -> bool:
    """Whether RelStorage's tables are in the adapter's database (a read, in a transaction)."""

    def listed(_connection: Any, cursor: Any) -> list[str]:
        return [str(name).lower() for name in adapter.schema.list_tables(cursor)]

    return OBJECT_TABLE in adapter.connmanager.open_and_call(listed)
