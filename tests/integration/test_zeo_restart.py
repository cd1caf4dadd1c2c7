"""After a ZEO server restarts, the first deliveries are stored, not deferred with a ValueError.

A ZEO client fetches new object ids a hundred at a time and (ZEO 6.2) keeps
the unused ones across a reconnection; a restarted server counts on from the
highest id committed and hands them out again.  The first transaction that
used up the old ones and asked for more got two objects with one id:
``ValueError: A different object already has the same oid``, a 451 for the
whole batch.  ``postoffice.store`` makes its ZEO clients forget them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from postoffice.database import open_db
from postoffice.deliver import Delivery, Depot
from tests.helpers import message, settings_for
from tests.integration.servers import ZeoServer, socket_path

pytestmark = pytest.mark.integration

RCPT = "someone@app.example"


def deliver(depot: Depot, numbers: range) -> list[str]:
    batch = [
        Delivery(
            "sender@outside.example", (RCPT,), message(n, to=RCPT, subject=str(n), body="Hello.\n")
        )
        for n in numbers
    ]
    return [outcomes[0].reply[:3] for outcomes in depot.deliver_batch(batch)]


def test_the_first_batch_after_a_zeo_restart_is_stored(
    tmp_path: Path, zeo_servers: list[ZeoServer]
) -> None:
    folder = tmp_path / "zeo"
    folder.mkdir()
    zeo = ZeoServer(socket_path(tmp_path, "zeo.sock"), folder)
    zeo_servers.append(zeo)
    zeo.start()
    uri = f"zeo://{zeo.sock}?wait_timeout=30&blob_dir={folder / 'blobs'}&shared_blob_dir=true"
    settings = settings_for(tmp_path, zodb_uri=uri, queues={"App": "to_hostname: app.example"})
    db = open_db(uri)
    depot = Depot(settings, db=db)
    try:
        depot.prepare()
        # Uses part of the ids fetched ahead; the client keeps the rest.
        assert deliver(depot, range(30)) == ["250"] * 30
        prefetched = len(db.storage._oids)
        assert prefetched > 0, "nothing fetched ahead: the test would prove nothing"

        zeo.stop()
        zeo.start()
        deadline = time.monotonic() + 30
        while not db.storage.is_connected():  # until then a delivery gets 451, rightly
            assert time.monotonic() < deadline, "the client did not reconnect"
            time.sleep(0.05)
        # More new objects than the ids left over, in one transaction.
        assert deliver(depot, range(100, 100 + prefetched + 30)) == ["250"] * (prefetched + 30)
    finally:
        depot.close()
        db.close()
