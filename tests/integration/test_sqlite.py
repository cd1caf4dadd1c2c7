"""A ``sqlite://`` depot is one process's: a second process is refused in one line.

RelStorage's SQLite adapter let a consumer in another process meet its
CacheConsistencyError, and a KeyError from inside ``pop_next`` (tried:
postoffice/relstorage_uri.py says what was seen), so postoffice opens such a
depot in one process at a time.  Here a real ``serve`` holds it; a consumer
process and ``postoffice queues`` are each told why in one line; once serve
has stopped, the consumer opens it and gets the mail serve accepted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import client, message, run_postoffice, send, write_config
from tests.integration.servers import Serve, require_relstorage, socket_path, start_serve

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CONSUMER = textwrap.dedent(
    """
    import sys, transaction
    from postoffice import open_queue
    with open_queue(sys.argv[1], "A") as queue:
        print(queue.pop_next()["Message-Id"])
        transaction.commit()
    """
)


def _consume(uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CONSUMER, uri],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        check=False,
    )


def test_a_second_process_is_refused_while_serve_has_the_depot(
    tmp_path: Path, servers: list[Serve]
) -> None:
    require_relstorage()
    (tmp_path / "sqlite").mkdir()
    uri = f"sqlite://?data_dir={tmp_path / 'sqlite'}"
    sock = socket_path(tmp_path, "lmtp.sock")
    config = write_config(
        tmp_path,
        zodb_uri=uri,
        lmtp={"listen": f"unix:{sock}"},
        queues={"A": "to_hostname: a.example"},
    )
    serve = start_serve(servers, config)
    lmtp = client(sock)
    [(code, text)] = send(lmtp, ["rcpt@a.example"], message(1))
    lmtp.quit()
    assert code == 250, text

    refused = _consume(uri)
    assert refused.returncode != 0
    assert "another process has the sqlite:// depot" in refused.stderr
    assert "use zeo:// or postgres://" in refused.stderr

    listing = run_postoffice("-C", str(config), "queues")
    assert listing.returncode != 0
    [line] = listing.stderr.strip().splitlines()
    assert "another process has the sqlite:// depot" in line
    assert "Traceback" not in listing.stderr

    serve.stop()
    assert "ERROR" not in serve.log()
    consumed = _consume(uri)
    assert consumed.returncode == 0, consumed.stderr
    assert consumed.stdout.split() == ["<1@outside.example>"]


def test_the_commands_never_create_the_depot(tmp_path: Path) -> None:
    """Before serve made it, a look at a sqlite:// depot makes no file (root's, in /var/lib)."""
    require_relstorage()
    data_dir = tmp_path / "sqlite"
    config = write_config(
        tmp_path, zodb_uri=f"sqlite://?data_dir={data_dir}", queues={"A": "to_hostname: a.example"}
    )
    for present in (False, True):
        if present:
            data_dir.mkdir()  # made by the package, empty until serve starts
        checked = run_postoffice("-C", str(config), "check")
        assert checked.returncode == 0, checked.stderr
        assert f"no database in {data_dir} yet (postoffice serve creates it)" in checked.stdout
        listed = run_postoffice("-C", str(config), "queues")
        assert listed.returncode == 66, listed.stderr
        assert (
            listed.stderr
            == f"postoffice: no database in {data_dir} yet (postoffice serve creates it)\n"
        )
        assert data_dir.exists() == present
        assert not present or list(data_dir.iterdir()) == []
