"""The embedded default serves applications too: a real ZEO server beside Data.fs.

A FileStorage can be opened by one process only.  These tests open a
``file://`` depot as ``postoffice serve`` does (the file itself, plus the
ZEO server thread that shares it), deliver into it as ``serve`` does, and
consume from other processes with the printed URI, the way applications
on the same host do.  After the server stops, the same data is read from
the file directly.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import transaction

from postoffice import open_queue
from postoffice.database import FileDepot, open_db, running_client_uri
from postoffice.deliver import Delivery, Depot
from postoffice.embedded import SharedDepot, shared
from postoffice.errors import ConfigError, EmbeddedZeoError
from postoffice.store import BLOB_THRESHOLD
from tests.helpers import config_text, message, settings_for, uri_for
from tests.integration.servers import finished, reaped

pytestmark = pytest.mark.integration

QUEUE = "Customer A"
RCPT = "someone@app.customera.example"
# Every wait in this file is bounded by this.
WAIT = 60.0

QUEUES = {QUEUE: "to_hostname: app.customera.example"}

# A consumer as an application writes it: pop, work, commit; it stops at
# the message whose Subject is "stop", and prints the Message-Ids it got.
CONSUMER = textwrap.dedent(
    """
    import json, sys, time
    import transaction
    from postoffice import QueueEmpty, open_queue

    uri, name = sys.argv[1], sys.argv[2]
    got = []
    deadline = time.monotonic() + float(sys.argv[3])
    with open_queue(uri, name) as queue:
        while time.monotonic() < deadline:
            try:
                message = queue.pop_next()
            except QueueEmpty:
                transaction.abort()
                time.sleep(0.02)
                continue
            subject = message["Subject"]
            body = message.get_payload(decode=True)
            transaction.commit()
            if subject == "stop":
                break
            got.append([message["Message-Id"], len(body)])
    print(json.dumps(got))
    """
)


def deliver(depot: Depot, numbers: range, subject: str = "hello", body: bytes = b"Hi.\r\n") -> None:
    """Deliver a batch as the LMTP server does; every recipient must be queued (250)."""
    batch = [
        Delivery(
            "sender@outside.example",
            (RCPT,),
            message(n, to=RCPT, subject=subject, body=body),
        )
        for n in numbers
    ]
    for outcomes in depot.deliver_batch(batch):
        assert [o.reply[:3] for o in outcomes] == ["250"], [o.reply for o in outcomes]


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:") and "Z" in line for line in status)
    except FileNotFoundError:
        return True


def wait_for(condition: object, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def var(tmp_path: Path) -> Path:
    return tmp_path / "var"


@pytest.fixture
def zeo(var: Path) -> Iterator[SharedDepot]:
    """The depot as serve holds it: the file open here, shared on zeo.sock."""
    with SharedDepot(uri_for(var)) as server:
        yield server


# --- sharing one depot between processes ------------------------------------------


def test_consumers_in_other_processes_get_every_message_exactly_once(
    zeo: SharedDepot, var: Path, tmp_path: Path
) -> None:
    """serve delivers into the file while two applications consume through ZEO."""
    depot = Depot(settings_for(tmp_path, zodb_uri=uri_for(var), queues=QUEUES), db=zeo.db)
    depot.prepare()
    consumers = [
        subprocess.Popen(
            [sys.executable, "-c", CONSUMER, zeo.client_uri, QUEUE, str(WAIT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        with reaped(consumers):
            big = b"B" * (BLOB_THRESHOLD + 1000)  # a blob, in the shared blob folder
            deliver(depot, range(0, 1), body=big)
            for start in range(1, 50, 7):
                deliver(depot, range(start, min(start + 7, 50)))
            deliver(depot, range(1000, 1002), subject="stop")  # one for each consumer
            results = [item for out in finished(consumers, WAIT) for item in json.loads(out)]
            # Left in the queue: two messages, one a blob, for after the server stops.
            deliver(depot, range(2000, 2001), body=big)
            deliver(depot, range(2001, 2002))
    finally:
        depot.close()

    ids = [message_id for message_id, _ in results]
    assert len(ids) == 50
    assert sorted(ids) == sorted(f"<{n}@outside.example>" for n in range(50))
    assert dict(results)["<0@outside.example>"] == len(big)

    zeo.stop()
    assert not zeo.socket_path.exists()
    assert running_client_uri(uri_for(var)) is None

    # The data is in Data.fs: the file opened directly, as with share = no.
    with open_queue(uri_for(var), QUEUE) as queue:
        assert len(queue) == 2
        first = queue.pop_next()
        second = queue.pop_next()
        assert [first["Message-Id"], second["Message-Id"]] == [
            "<2000@outside.example>",
            "<2001@outside.example>",
        ]
        assert first.get_payload(decode=True) == big
        transaction.abort()


def test_running_client_uri_finds_the_server_while_it_runs(zeo: SharedDepot, var: Path) -> None:
    """``postoffice queues`` and friends use the ZEO while serve holds the file."""
    assert running_client_uri(uri_for(var)) == zeo.client_uri
    zeo.stop()
    assert running_client_uri(uri_for(var)) is None


def test_the_socket_is_not_for_everyone(zeo: SharedDepot, var: Path) -> None:
    mode = os.stat(zeo.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660
    assert stat.S_IMODE(os.stat(var / "Data.fs").st_mode) & 0o007 == 0


def test_a_private_socket_mode(var: Path) -> None:
    with SharedDepot(uri_for(var), socket_mode=0o600) as server:
        assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o600


# --- a client that holds the commit lock ----------------------------------------------

# A ZEO client that votes (the server then holds the storage's commit lock
# for it) and never finishes: stopped with SIGSTOP, or hung.
HANGING_CLIENT = textwrap.dedent(
    """
    import sys, time
    from ZEO.ClientStorage import ClientStorage
    from ZODB.Connection import TransactionMetaData

    storage = ClientStorage(sys.argv[1], blob_dir=sys.argv[2], shared_blob_dir=True)
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    storage.store(storage.new_oid(), b"\\0" * 8, b"never committed", "", txn)
    storage.tpc_vote(txn)
    print("voted", flush=True)
    time.sleep(120)
    """
)


def test_a_client_hanging_in_its_commit_holds_up_serve_only_until_the_timeout(
    var: Path, tmp_path: Path
) -> None:
    with SharedDepot(uri_for(var), transaction_timeout=2.0) as server:
        depot = Depot(settings_for(tmp_path, zodb_uri=uri_for(var), queues=QUEUES), db=server.db)
        depot.prepare()
        hanging = subprocess.Popen(
            [sys.executable, "-c", HANGING_CLIENT, str(server.socket_path), str(var / "blobs")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert hanging.stdout is not None
            assert hanging.stdout.readline() == "voted\n", hanging.stderr.read()
            started = time.monotonic()
            # Waits for the commit lock, then gets it once ZEO dropped the client.
            delivering = threading.Thread(target=deliver, args=(depot, range(1)), daemon=True)
            delivering.start()
            delivering.join(timeout=20.0)
            waited = time.monotonic() - started
            stuck = delivering.is_alive()
        finally:
            hanging.kill()
            hanging.wait()
        assert not stuck, "serve's delivery still waits for the commit lock the client took"
        depot.close()
        assert 1.0 < waited < 2.0 + 10.0
    with open_queue(uri_for(var), QUEUE) as queue:
        assert len(queue) == 1


# --- one server per Data.fs ---------------------------------------------------------


def test_a_second_server_for_the_same_data_fs_is_refused(
    zeo: SharedDepot, var: Path, tmp_path: Path
) -> None:
    with pytest.raises(EmbeddedZeoError, match="already shared by a running ZEO server"):
        SharedDepot(uri_for(var)).start()
    # The first one is untouched and still serves (here a writer through ZEO,
    # as postoffice-deliver is while serve runs).
    assert zeo.running()
    depot = Depot(settings_for(tmp_path, zodb_uri=zeo.client_uri, queues=QUEUES))
    try:
        deliver(depot, range(1))
    finally:
        depot.close()
    with open_queue(zeo.client_uri, QUEUE) as queue:
        assert len(queue) == 1


def test_a_data_fs_locked_by_another_process_is_a_clear_error(var: Path) -> None:
    """Someone opened the file:// URI directly (share = no, a consumer, postoffice-deliver)."""
    db = open_db(uri_for(var))
    try:
        server = SharedDepot(uri_for(var))
        with pytest.raises(EmbeddedZeoError, match=r"Data\.fs is locked by another process"):
            server.start()
        assert not server.running()
        assert not server.socket_path.exists()
    finally:
        db.close()
    # Once the other process lets go, the server starts.
    with SharedDepot(uri_for(var)) as server:
        assert server.running()


def test_a_stale_socket_is_replaced(var: Path) -> None:
    """A server killed with SIGKILL (or a crash of the host) leaves zeo.sock behind."""
    var.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(var / "zeo.sock"))
    stale.close()
    with SharedDepot(uri_for(var)) as server:
        db = open_db(server.client_uri)
        try:
            assert db.storage.is_connected()
        finally:
            db.close()


def test_a_file_where_the_socket_goes_is_left_alone(var: Path) -> None:
    var.mkdir()
    (var / "zeo.sock").write_text("not a socket")
    with pytest.raises(EmbeddedZeoError, match="not a socket"):
        SharedDepot(uri_for(var)).start()
    assert (var / "zeo.sock").read_text() == "not a socket"


# --- a serve that dies ---------------------------------------------------------------


def test_after_serve_is_killed_the_next_one_shares_the_same_data(var: Path, tmp_path: Path) -> None:
    """SIGKILL leaves zeo.sock behind but frees the file: the next serve starts and has it all."""
    killed = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from postoffice.embedded import SharedDepot\n"
            "from postoffice.config import loads\n"
            "from postoffice.deliver import Depot\n"
            "from pathlib import Path\n"
            "server = SharedDepot(sys.argv[1]).start()\n"
            "depot = Depot(loads(sys.argv[2], Path('postoffice.ini')), db=server.db)\n"
            "raw = sys.argv[3].encode()\n"
            "outcomes = depot.deliver('s@outside.example', ['a@app.customera.example'], raw)\n"
            "print(outcomes[0].reply, flush=True)\n"
            "time.sleep(120)\n",
            uri_for(var),
            config_text(uri_for(var), queues=QUEUES),
            message(1, to=RCPT).decode(),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert killed.stdout is not None
        assert "queued in Customer A" in killed.stdout.readline()
        assert running_client_uri(uri_for(var)) is not None
    finally:
        killed.kill()
        killed.wait()
    assert (var / "zeo.sock").exists()  # stale
    assert running_client_uri(uri_for(var)) is None
    with SharedDepot(uri_for(var)) as server, open_queue(server.client_uri, QUEUE) as queue:
        assert [queue.pop_next()["Message-Id"]] == ["<1@outside.example>"]
        transaction.abort()


# --- what serve opens --------------------------------------------------------------------


def test_only_file_uris_are_shared(var: Path) -> None:
    for other in ("zeo://localhost:8100", "memory://", "postgres://db/postoffice"):
        with shared(other) as depot:
            assert depot is None
    with shared(uri_for(var), share=False) as depot:
        assert depot is None
    assert FileDepot.parse(uri_for(var)).client_uri == (
        f"zeo://{var}/zeo.sock?shared_blob_dir=true&blob_dir={var}/blobs"
    )


def test_shared_runs_the_server_only_for_the_block(var: Path) -> None:
    with shared(uri_for(var)) as depot:
        assert depot is not None
        assert running_client_uri(uri_for(var)) == depot.client_uri
    assert running_client_uri(uri_for(var)) is None
    assert not (var / "zeo.sock").exists()
    open_db(uri_for(var)).close()  # the file is free again


def test_database_options_follow_the_uri_and_storage_options_stay_with_the_server(
    var: Path,
) -> None:
    depot = FileDepot.parse(
        f"file://{var}/Data.fs?blobstorage_dir={var}/blobs&quota=1g&database_name=main"
        "&connection_cache_size=5000"
    )
    assert depot.client_uri.endswith("&database_name=main&connection_cache_size=5000")
    with pytest.raises(ConfigError, match="demostorage"):
        FileDepot.parse(f"file://{var}/Data.fs?demostorage=true")


def test_a_socket_path_too_long_for_unix_sockets_is_a_config_error(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 120)
    with pytest.raises(ConfigError, match="at most 107 bytes"):
        SharedDepot(uri_for(deep))
