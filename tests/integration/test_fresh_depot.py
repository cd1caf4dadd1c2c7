"""Several processes opening one fresh depot at the same moment all deliver.

The first process to open a new depot creates what it holds: on
PostgreSQL, RelStorage's tables; in every database, ZODB's root object,
then the queues folder and its queues.  Postfix starts several
``postoffice-deliver`` at once (and an administrator starts several
``serve``); each one must find what another is creating, or create it,
never fail.  Each round here starts four pipe deliveries together on a new
depot, on a real ZEO server and on a real PostgreSQL server; every one must
exit 0 and the queue must then hold all four messages.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postoffice import open_queue
from tests.helpers import message, run_pipe, write_config
from tests.integration.servers import PostgresCluster, ZeoServer, require_relstorage, socket_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROUNDS = 5
AT_ONCE = 4


def _deliver_at_once(folder: Path, uri: str) -> None:
    config = write_config(folder, zodb_uri=uri, queues={"A": "to_hostname: a.example"})
    start = threading.Barrier(AT_ONCE)

    def deliver(number: int) -> tuple[int, str]:
        start.wait()
        done = run_pipe(
            config,
            "s@outside.example",
            ["rcpt@a.example"],
            message(number),
            folder / f"{number}.log",
        )
        log = (folder / f"{number}.log").read_text() if (folder / f"{number}.log").exists() else ""
        return done.returncode, done.stderr.decode(errors="replace") + log

    with ThreadPoolExecutor(AT_ONCE) as pool:
        results = list(pool.map(deliver, range(AT_ONCE)))
    assert [code for code, _ in results] == [0] * AT_ONCE, results
    assert not any("Traceback" in text or " ERROR " in text for _, text in results), results
    with open_queue(uri, "A") as queue:
        assert len(queue) == AT_ONCE


def test_four_deliveries_create_a_fresh_zeo_depot_together(
    tmp_path: Path, zeo_servers: list[ZeoServer]
) -> None:
    for round_ in range(ROUNDS):
        folder = tmp_path / f"round-{round_}"
        folder.mkdir()
        server = ZeoServer(socket_path(folder, "zeo.sock"), folder)
        zeo_servers.append(server)
        server.start()
        blobs = folder / "blobs"
        _deliver_at_once(folder, f"zeo://{server.sock}?blob_dir={blobs}&shared_blob_dir=true")
        server.stop()


def test_four_deliveries_create_a_fresh_postgres_depot_together(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    require_relstorage()
    for round_ in range(ROUNDS):
        folder = tmp_path / f"round-{round_}"
        folder.mkdir()
        database = postgres_cluster.create_database(f"fresh{round_}_{id(folder)}")
        _deliver_at_once(folder, postgres_cluster.socket_uri(database, keep_history="false"))
