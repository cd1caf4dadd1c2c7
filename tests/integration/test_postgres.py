"""A depot in a real PostgreSQL server through RelStorage, by the URIs docs/scaling.md gives.

Each test gets a fresh database in a private PostgreSQL server (the
``postgres_cluster`` fixture): reached through its unix socket with
``postgres://?dsn=...`` and over loopback TCP with a password in the URI.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transaction

from postoffice import open_queue
from postoffice.deliver import Depot
from tests.helpers import codes, message, run_postoffice, settings_for, write_config
from tests.integration.servers import PostgresCluster, require_relstorage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

QUEUES = {"A": "to_hostname: a.example"}


@pytest.fixture(autouse=True)
def _relstorage() -> None:
    require_relstorage()


def _deliver_and_pop(tmp_path: Path, uri: str) -> None:
    depot = Depot(settings_for(tmp_path, zodb_uri=uri, queues=QUEUES))
    try:
        outcomes = depot.deliver("s@outside.example", ["rcpt@a.example"], message(1))
        assert codes(outcomes) == ["250 2.0.0"]
    finally:
        depot.close()
    with open_queue(uri, "A") as queue:
        popped = queue.pop_next()
        assert popped["Message-Id"] == "<1@outside.example>"
        transaction.commit()
        assert len(queue) == 0


def test_a_depot_on_the_unix_socket_takes_and_gives_mail(
    tmp_path: Path, postgres_cluster: PostgresCluster, postgres_db: str
) -> None:
    uri = postgres_cluster.socket_uri(postgres_db, keep_history="false")
    assert uri.startswith("postgres://?dsn=host%3D%2F")
    _deliver_and_pop(tmp_path, uri)


def test_a_depot_over_tcp_with_a_password_takes_and_gives_mail(
    tmp_path: Path, postgres_cluster: PostgresCluster, postgres_db: str
) -> None:
    _deliver_and_pop(tmp_path, postgres_cluster.tcp_uri(postgres_db, keep_history="false"))


def test_blobs_go_into_the_database_through_a_local_cache(
    tmp_path: Path, postgres_cluster: PostgresCluster, postgres_db: str
) -> None:
    """A large message is a blob, which RelStorage keeps in PostgreSQL itself."""
    uri = postgres_cluster.socket_uri(
        postgres_db, keep_history="false", blob_dir=str(tmp_path / "blobcache")
    )
    big = message(2, size=1_400_000)  # over the blob threshold
    depot = Depot(settings_for(tmp_path, zodb_uri=uri, queues=QUEUES))
    try:
        assert codes(depot.deliver("s@outside.example", ["rcpt@a.example"], big)) == ["250 2.0.0"]
    finally:
        depot.close()
    other_cache = tmp_path / "other-cache"
    with open_queue(uri.replace("blobcache", "other-cache"), "A") as queue:
        popped = queue.pop_next()
        assert popped["Message-Id"] == "<2@outside.example>"
        assert len(popped.get_content()) > 1_300_000
        transaction.commit()
    # Read from the database into the reader's own cache, not from the writer's files.
    assert list(other_cache.rglob("*.blob"))


def test_check_reaches_the_server_and_never_prints_the_password(
    tmp_path: Path, postgres_cluster: PostgresCluster, postgres_db: str
) -> None:
    uri = postgres_cluster.tcp_uri(postgres_db, keep_history="false")
    _deliver_and_pop(tmp_path, uri)  # the depot serve makes
    path = write_config(tmp_path, zodb_uri=uri, queues=QUEUES)
    result = run_postoffice("-C", str(path), "check")
    assert result.returncode == 0, result.stderr
    assert f"{PostgresCluster.USER}:***@127.0.0.1" in result.stdout
    assert "is reachable" in result.stdout
    assert PostgresCluster.PASSWORD not in result.stdout + result.stderr

    wrong = uri.replace(PostgresCluster.PASSWORD, "not-the-password")
    path.write_text(path.read_text().replace(uri, wrong))
    result = run_postoffice("-C", str(path), "check")
    assert result.returncode == 75, result.stderr  # the database is away: try again later
    assert "password authentication failed" in result.stderr
    assert "not-the-password" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("postoffice:")]
    assert "postoffice:***@127.0.0.1" in line


def _tables(cluster: PostgresCluster, database: str) -> list[str]:
    import psycopg2

    dsn = f"host={cluster.socket_dir} port={cluster.port} user={cluster.USER} dbname={database}"
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return sorted(name for (name,) in cursor.fetchall())


@pytest.mark.parametrize("keep_history", ["false", "true"])
def test_the_commands_never_create_the_depot_in_an_empty_database(
    tmp_path: Path, postgres_cluster: PostgresCluster, postgres_db: str, keep_history: str
) -> None:
    """As for a missing Data.fs: a look at a depot ``serve`` has not made yet makes nothing."""
    uri = postgres_cluster.socket_uri(postgres_db, keep_history=keep_history)
    path = write_config(tmp_path, zodb_uri=uri, queues=QUEUES)

    checked = run_postoffice("-C", str(path), "check")
    assert checked.returncode == 0, checked.stderr
    assert "no postoffice depot in this database yet (postoffice serve creates it)" in (
        checked.stdout
    )
    assert "is reachable" not in checked.stdout
    listed = run_postoffice("-C", str(path), "queues")
    assert listed.returncode == 66, listed.stderr  # nothing to read (EX_NOINPUT)
    assert "no postoffice depot in this database yet" in listed.stderr
    assert "Traceback" not in checked.stderr + listed.stderr
    assert _tables(postgres_cluster, postgres_db) == []

    # Once serve's side has made it, the same commands read it.
    _deliver_and_pop(tmp_path, uri)
    tables = _tables(postgres_cluster, postgres_db)
    checked = run_postoffice("-C", str(path), "check")
    assert checked.returncode == 0, checked.stderr
    assert "is reachable" in checked.stdout
    assert run_postoffice("-C", str(path), "queues").returncode == 0
    assert _tables(postgres_cluster, postgres_db) == tables


def test_the_zconfig_file_of_the_manual_opens_the_same_storage(
    tmp_path: Path, postgres_cluster: PostgresCluster, postgres_db: str
) -> None:
    """docs/scaling.md's ``zconfig://`` file, its dsn and cache folder pointed at this server."""
    manual = (Path(__file__).resolve().parents[2] / "docs" / "scaling.md").read_text()
    [block] = re.findall(r"```\n(%import relstorage\n.*?)```", manual, re.DOTALL)
    dsn = (
        f"host={postgres_cluster.socket_dir} port={postgres_cluster.port} "
        f"user={PostgresCluster.USER} dbname={postgres_db}"
    )
    conf = tmp_path / "storage.conf"
    conf.write_text(
        re.sub(r"dsn .*", f"dsn {dsn}", block).replace(
            "/var/cache/postoffice/blobs", str(tmp_path / "blobs")
        )
    )
    _deliver_and_pop(tmp_path, f"zconfig://{conf}")
