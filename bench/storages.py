"""The storage servers of the servers part: a stock ZEO server, and PostgreSQL for RelStorage.

They are started by the integration tests' own code
(``tests/integration/storage_servers.py``), loaded here from its file so
that neither the tests package nor pytest need be importable where the
benchmark runs.  What that code raises (a part not installed, a server
that did not start) becomes a ``BenchError`` with the reason, so it shows
as the row's error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from common import BENCH, BenchError
from procs import error_lines

# ZEO's server logs this at ERROR when a consumer exits as another commits.
CLOSED_WHILE_SENDING = re.compile(
    r" ERROR ZEO\.asyncio\.server: Disconnected (?:ConnectionResetError|BrokenPipeError):"
)
SHARED_CODE = BENCH.parent / "tests" / "integration" / "storage_servers.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("storage_servers", SHARED_CODE)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {SHARED_CODE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


stores: Any = _load()
free_port = stores.free_port


@contextlib.contextmanager
def reasons() -> Iterator[None]:
    """A missing part or a server that would not start, as the row's one-line error."""
    try:
        yield
    except (stores.Unavailable, stores.ServerError) as exc:
        raise BenchError(one_line(str(exc))) from None


def one_line(text: str, room: int = 400) -> str:
    """A server's complaint on one line: how it begins (what failed) and how it ends (why)."""
    text = " ".join(text.split())
    if len(text) <= room:
        return text
    return f"{text[: room // 3]} ... {text[-(room - room // 3) :]}"


@dataclass
class SharedDepot:
    """A depot that every serve and consumer of a case opens by ``uri``."""

    backend: str
    uri: str
    log: Path | None = None

    def errors_logged(self) -> list[str]:
        """The ERROR lines of the storage server's own log (ZEO's; PostgreSQL's are not ours).

        Less the one docs/scaling.md explains as harmless: a client that
        closed while the server still sent it news of another's commit.
        """
        lines = [] if self.log is None else error_lines(self.log)
        return [line for line in lines if not CLOSED_WHILE_SENDING.search(line)]


@contextlib.contextmanager
def zeo_depot(folder: Path) -> Iterator[SharedDepot]:
    """``runzeo -C`` with postfix-examples/zeo.conf in ``folder``, on a fresh FileStorage."""
    folder.mkdir(parents=True, exist_ok=True)
    server = stores.ZeoServer(folder / "zeo.sock", folder, example=True)
    with reasons():
        try:
            server.start()
            yield SharedDepot("zeo", server.uri(), server.log_path)
        finally:
            server.stop()


@contextlib.contextmanager
def postgres_cluster(parent: Path) -> Iterator[Any]:
    """A private PostgreSQL server in a folder under ``parent``, for the part's databases."""
    with reasons():
        cluster = stores.PostgresCluster(parent)
        try:
            missing = stores.relstorage_missing()
            if missing is not None:
                raise stores.Unavailable(missing)
            yield cluster.start()
        finally:
            cluster.stop()


def postgres_depot(cluster: Any, name: str, blobs: Path) -> SharedDepot:
    """A fresh database in ``cluster``, by the unix-socket URI of docs/scaling.md."""
    with reasons():
        database = cluster.create_database(name)
    uri = cluster.socket_uri(database, keep_history="false", blob_dir=str(blobs))
    return SharedDepot("postgres", uri)
