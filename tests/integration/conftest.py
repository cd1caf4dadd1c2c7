"""Fixtures that give integration tests real Postfix parts, cleaned up at teardown."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.integration.postfix_instance import (
    PostfixInstance,
    make_traversable,
    require_root,
    require_tool,
)
from tests.integration.servers import PostgresCluster, Serve, ZeoServer

PostfixFactory = Callable[..., PostfixInstance]


@pytest.fixture
def postfix_factory(tmp_path: Path) -> Iterator[PostfixFactory]:
    """Create and start private Postfix instances under ``tmp_path``; stop them all after.

    The callable takes PostfixInstance's arguments after ``base_dir``
    (``transports``, ``extra_master_cf``, ``extra_main_cf``, ``recipient_limits=``). Each
    instance gets its own folder, root-owned and 0755 as Postfix demands, with
    pytest's 0700 parents opened for traversal by the postfix user.
    """
    require_tool("postfix")
    require_tool("postqueue")
    require_root()
    make_traversable(tmp_path)
    instances: list[PostfixInstance] = []

    def create(
        transports: Mapping[str, str],
        extra_master_cf: str = "",
        extra_main_cf: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> PostfixInstance:
        base = tmp_path / f"postfix-{len(instances)}"
        instance = PostfixInstance(base, transports, extra_master_cf, extra_main_cf, **kwargs)
        instances.append(instance)
        instance.start()
        return instance

    try:
        yield create
    finally:
        for instance in reversed(instances):
            instance.stop()


@pytest.fixture
def servers() -> Iterator[list[Serve]]:
    """Collects the ``postoffice serve`` processes a test starts; kills any it left running."""
    started: list[Serve] = []
    yield started
    for server in started:
        server.kill()


@pytest.fixture
def zeo_servers() -> Iterator[list[ZeoServer]]:
    """Collects the ZEO servers a test starts; stops any it left running."""
    started: list[ZeoServer] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One private PostgreSQL server for the session (initdb takes seconds); stopped at the end."""
    cluster = PostgresCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def postgres_db(postgres_cluster: PostgresCluster) -> str:
    """A fresh, empty database in the private cluster, for one test: its name."""
    name = f"mail{next(_database_numbers)}"
    return postgres_cluster.create_database(name)


_database_numbers = itertools.count(1)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder outside pytest's tree for sockets that other users (postfix) connect to.

    Whenever a pytest session starts, it resets ``/tmp/pytest-of-<user>`` to
    0700. Another session started while a test runs (a second terminal, a
    benchmark) then cuts the postfix user off from every socket below it:
    Postfix defers with "Permission denied". A folder directly in /tmp stays
    reachable, and its name is short (unix socket paths are limited).
    """
    folder = Path(tempfile.mkdtemp(prefix="po-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
